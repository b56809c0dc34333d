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


OVERRIDES = {  # flag -> (type, help); given flags override the config JSON
    "infer_steps": (int, "denoising steps"),
    "height": (int, "output height in pixels, a multiple of 16"),
    "width": (int, "output width in pixels, a multiple of 16"),
    "num_frames": (int, "frames of the video, of the form 4k+1 (1: one image, saved as PNG)"),
    "guidance_scale": (_guidance, "classifier-free guidance scale (off at <= 1); two-expert models: HIGH,LOW, "
                                  "one per expert"),
    "sample_shift": (float, "flow-matching timestep shift"),
    "attn_mode": (str, "attention backend for self- and cross-attention (torch_sdpa, flash_attn2/3, sage_attn, "
                       "radial_attn, or LightX2V's names)"),
    "sample_solver": (str, "sampler: unipc or euler"),
    "device": (str, "auto (CUDA when present), cpu, cuda or cuda:N"),
    "dtype": (str, "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32"),
    "fps": (int, "frame rate of the saved video"),
    "resize_mode": (str, "how the input image meets the size: crop, adaptive or stretch"),
    "boundary": (float, "two-expert models: the high-noise expert runs while t >= boundary x 1000"),
    "dit_quant_scheme": (str, "quantize the DiT's block linears: fp8 or int8 (LightX2V's fp8-sgl, int8-vllm, ... "
                              "accepted); a pre-quantized checkpoint is recognised without it"),
    "aspect_ratio": (str, "image models: a named size such as 16:9 (it decides height and width)"),
}


def _override_defaults() -> dict[str, str]:
    """What each override flag falls back to, for --help (the model class, a model folder's
    lightx2v_defaults.json and --config_json may set another value)."""
    from dataclasses import fields

    from lightx2v.engine.request import SamplingConfig

    d = {f.name: f.default for f in fields(SamplingConfig)}
    return {"infer_steps": d["infer_steps"], "height": d["height"], "width": d["width"],
            "num_frames": d["num_frames"], "guidance_scale": d["guidance_scale"], "sample_shift": d["sample_shift"],
            "attn_mode": "torch_sdpa", "sample_solver": d["solver"], "device": "auto", "dtype": "auto",
            "fps": d["fps"], "resize_mode": d["resize_mode"], "boundary": "the model class's",
            "dit_quant_scheme": "none", "aspect_ratio": "the model's"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (``--help`` has the rest)
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    from lightx2v.engine.family import all_tasks, default_model_cls, model_classes

    p.add_argument("--model_cls", default=None, help=f"model class: {', '.join(model_classes())} (default "
                   f"{default_model_cls()})")
    p.add_argument("--task", default="t2v", help=" | ".join(all_tasks()) + " (default t2v)")
    p.add_argument("--model_path", default=None, help="checkpoint folder (either layout); omit for the built-in tiny "
                   "model")
    p.add_argument("--config_json", default=None, help="LightX2V-style JSON config file")
    p.add_argument("--prompt", default="", help="text prompt")
    p.add_argument("--negative_prompt", default="", help="negative prompt (used with CFG)")
    p.add_argument("--image_path", default=None, help="input image (i2v, flf2v)")
    p.add_argument("--last_frame_path", default=None, help="last frame image (flf2v)")
    p.add_argument("--seed", type=int, default=42, help="random seed, 0 <= seed < 2**63 (default 42)")
    p.add_argument("--save_result_path", required=True, help="output .mp4 (a single frame is saved as .png)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    g = p.add_argument_group("overrides", "each wins over --config_json, which wins over the model's defaults (the "
                             "model class's, or a model folder's lightx2v_defaults.json; the built-in tiny model: "
                             "128x128, 17 frames, 20 steps)")
    defaults = _override_defaults()
    for flag, (typ, text) in OVERRIDES.items():
        g.add_argument(f"--{flag}", type=typ, default=None, metavar=flag.split("_")[-1].upper(),
                       help=f"{text} (default {defaults[flag]})")


def _generate(args: argparse.Namespace) -> int:
    from lightx2v.engine.request import GenerationRequest, SamplingConfig
    from lightx2v.pipeline import LightX2VPipeline, check_output_path

    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    pipe = LightX2VPipeline(model_path=args.model_path, model_cls=args.model_cls, task=args.task)
    # everything about the request that can be checked without the model, before it loads
    GenerationRequest(task=args.task, sampling=SamplingConfig(), prompt=args.prompt,
                      negative_prompt=args.negative_prompt, seed=args.seed, save_result_path=args.save_result_path)
    pipe.check_images(args.image_path, args.last_frame_path)
    check_output_path(args.save_result_path, args.num_frames)
    pipe.create_generator(config_json=args.config_json, **overrides)
    result = pipe.generate(seed=args.seed, prompt=args.prompt, negative_prompt=args.negative_prompt,
                           image_path=args.image_path, last_frame_path=args.last_frame_path,
                           save_result_path=args.save_result_path, progress=not args.no_progress)
    print(f"saved {result.path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from lightx2v.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, layout=args.layout, quantize=args.quantize)
    print(f"wrote {out} ({args.layout} layout{', DiT ' + args.quantize if args.quantize else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lightx2v import __version__

    parser = _Parser(prog="lightx2v", description="Fast video and image diffusion inference (LightX2V's API, CLI "
                     "and configs).", epilog="lightx2v generate --prompt \"a cat\" --save_result_path out.mp4 runs "
                     "the built-in tiny model; `lightx2v COMMAND --help` lists a command's flags.")
    parser.add_argument("--version", action="version", version=f"lightx2v {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate a video (or an image)")
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
    if getattr(args, "func", None) is None:  # no command: say what there is
        parser.print_help(sys.stderr)
        return 2
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
