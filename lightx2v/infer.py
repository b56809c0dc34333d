"""``python -m lightx2v.infer --prompt ... --save_result_path out.mp4`` (LightX2V's entry point)."""

import sys

from lightx2v.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main())
