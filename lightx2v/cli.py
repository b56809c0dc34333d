"""Command line: ``lightx2v generate ...`` and ``lightx2v convert ...``.

``python -m lightx2v.infer`` takes the flags of ``generate`` (LightX2V's entry point). A mistake of the user's
prints one line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lightx2v.errors import UserError

def _guidance(text: str):
    """``5.0`` or, for two-expert models, ``4.0,3.0`` (high-noise expert, low-noise expert)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or two numbers separated by a comma") from None
    return values[0] if len(values) == 1 else values


OVERRIDES = {  # flag -> type; given flags override the config JSON
    "infer_steps": int, "height": int, "width": int, "num_frames": int, "guidance_scale": _guidance,
    "sample_shift": float, "attn_mode": str, "sample_solver": str, "device": str, "dtype": str, "fps": int,
    "resize_mode": str, "boundary": float, "aspect_ratio": str,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    from lightx2v.engine.family import all_tasks, default_model_cls, model_classes

    p.add_argument("--model_cls", default=None, help=f"model class: {', '.join(model_classes())} (default "
                   f"{default_model_cls()})")
    p.add_argument("--task", default="t2v", help=" | ".join(all_tasks()))
    p.add_argument("--model_path", default=None, help="checkpoint folder (either layout); omit for the tiny model")
    p.add_argument("--config_json", default=None, help="LightX2V-style JSON config")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--negative_prompt", default="", help="negative prompt (used with CFG)")
    p.add_argument("--image_path", default=None, help="input image (i2v, flf2v)")
    p.add_argument("--last_frame_path", default=None, help="last frame image (flf2v)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save_result_path", required=True, help="output .mp4 (a single frame is saved as .png)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    for flag, typ in OVERRIDES.items():
        p.add_argument(f"--{flag}", type=typ, default=None)


def _generate(args: argparse.Namespace) -> int:
    from lightx2v.pipeline import LightX2VPipeline

    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    pipe = LightX2VPipeline(model_path=args.model_path, model_cls=args.model_cls, task=args.task)
    pipe.check_images(args.image_path, args.last_frame_path)
    pipe.create_generator(config_json=args.config_json, **overrides)
    saved = pipe.generate(seed=args.seed, prompt=args.prompt, negative_prompt=args.negative_prompt,
                          image_path=args.image_path, last_frame_path=args.last_frame_path,
                          save_result_path=args.save_result_path, progress=not args.no_progress)
    print(f"saved {saved}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from lightx2v.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, layout=args.layout, quantize=args.quantize)
    print(f"wrote {out} ({args.layout} layout{', DiT ' + args.quantize if args.quantize else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lightx2v", description="Fast video and image diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate a video")
    _add_generate_args(gen)
    gen.set_defaults(func=_generate)
    from lightx2v.engine.family import convert_layouts, families

    conv = sub.add_parser("convert", help="convert a checkpoint between its public layouts")
    conv.add_argument("src", help="source checkpoint folder (either layout)")
    conv.add_argument("dst", help="destination folder (must not exist or be empty)")
    conv.add_argument("--layout", required=True, choices=list(convert_layouts()), help="layout to write")
    conv.add_argument("--quantize", default=None, choices=["fp8", "int8"],
                      help="store the DiT block linears quantized (for dit_quant_scheme)")
    conv.set_defaults(func=_convert)
    for family in families().values():  # the families' own sub-commands
        if family.cli_commands is not None:
            family.cli_commands(sub)
    from lightx2v.serve.cli import register_serve

    register_serve(sub)  # serve, submit
    return parser


def run(argv: list[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except UserError as e:  # includes CheckpointError
        print(f"lightx2v: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lightx2v: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, build_parser())


def infer_main(argv: list[str] | None = None) -> int:
    """``python -m lightx2v.infer``: the ``generate`` flags without the sub-command."""
    parser = _Parser(prog="python -m lightx2v.infer", description="Generate a video (same flags as generate).")
    _add_generate_args(parser)
    parser.set_defaults(func=_generate)
    return run(sys.argv[1:] if argv is None else argv, parser)


if __name__ == "__main__":
    sys.exit(main())
