"""``lightx2v build-trt``: build the TensorRT engines of a Qwen-Image VAE (:func:`trt.build_trt_engines`).

    lightx2v build-trt --model_path /models/Qwen-Image-2512 --out /engines/vae_trt_t2i_static
    lightx2v build-trt --model_path /models/Qwen-Image-Edit-2511 --out /engines/vae_trt_mp --multi_profile

The folder it writes is what ``trt_vae_config.trt_engine_path`` names (with the same ``multi_profile``). It needs a
CUDA GPU and the ``tensorrt`` package; without them it stops with one line (exit status 2), before reading weights.
The family registers this sub-command with the CLI (``ModelFamily.cli_commands``).
"""

from __future__ import annotations

import argparse

from lightx2v.errors import UserError


def _size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. ``1024x1024``) -> (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH (e.g. 1024x1024)") from None
    return h, w


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_build_trt_command(subparsers) -> argparse.ArgumentParser:
    """Add ``build-trt`` to a ``lightx2v`` sub-parser set; returns its parser."""
    from lightx2v.models.qwen_image.arch import ASPECT_RATIOS
    from lightx2v.models.qwen_image.trt import MAX_SIZE, MIN_SIZE

    p = subparsers.add_parser("build-trt", help="build TensorRT engines of a Qwen-Image VAE (needs a GPU)",
                              description="Export the Qwen-Image VAE encoder/decoder through ONNX (checked in "
                              "onnxruntime against PyTorch) and build TensorRT engines: static ones per aspect "
                              "ratio (text-to-image), or one multi-profile engine per half (edits).")
    p.add_argument("--model_path", required=True, help="Qwen-Image checkpoint folder (diffusers layout)")
    p.add_argument("--out", required=True, help="engine folder to write (trt_vae_config.trt_engine_path)")
    p.add_argument("--multi_profile", action="store_true",
                   help="one engine per half with several optimization profiles (any edit size) instead of static "
                   "engines per aspect ratio")
    p.add_argument("--parts", type=_list, default=["encoder", "decoder"], help="encoder,decoder (default both)")
    p.add_argument("--aspect_ratios", type=_list, default=None,
                   help=f"static engines for these aspect ratios (default all: {','.join(ASPECT_RATIOS)})")
    p.add_argument("--profiles", type=_list, default=None,
                   help="multi-profile opt sizes HxW,HxW,... (default LightX2V's list)")
    p.add_argument("--min_size", type=int, default=MIN_SIZE, help="smallest side a profile accepts")
    p.add_argument("--max_size", type=int, default=MAX_SIZE, help="largest side a profile accepts")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--workspace_gib", type=float, default=8.0, help="TensorRT builder workspace")
    p.add_argument("--no_check", action="store_true", help="skip the onnxruntime check of the ONNX exports")
    p.set_defaults(func=_build_trt)
    return p


def _build_trt(args: argparse.Namespace) -> int:
    from lightx2v.models.qwen_image.trt import DEFAULT_PROFILES, build_trt_engines

    if args.profiles is not None and not args.multi_profile:
        raise UserError("--profiles are for --multi_profile engines")
    if args.aspect_ratios is not None and args.multi_profile:
        raise UserError("--aspect_ratios are for static engines (without --multi_profile)")
    try:
        profiles = [_size(v) for v in args.profiles] if args.profiles else DEFAULT_PROFILES
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--profiles: {e}") from None
    manifest = build_trt_engines(args.model_path, args.out, multi_profile=args.multi_profile, parts=args.parts,
                                 aspect_ratios=args.aspect_ratios, profiles=profiles, min_size=args.min_size,
                                 max_size=args.max_size, precision=args.precision, workspace_gib=args.workspace_gib,
                                 check=not args.no_check)
    kind = "multi-profile" if args.multi_profile else f"static ({', '.join(manifest.get('static', {}))})"
    print(f"wrote {kind} TensorRT VAE engines to {args.out}")
    return 0
