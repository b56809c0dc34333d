"""``python -m lightx2v.server``: the generation service under LightX2V's module name (same as ``lightx2v serve``).
"""

import sys

if __name__ == "__main__":
    from lightx2v.serve.cli import main

    sys.exit(main())
