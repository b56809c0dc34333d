"""Qwen-Image: our MMDiT step and VAE decode/encode against diffusers', in one process, random weights.

DiT: diffusers' ``QwenImageTransformer2DModel`` at the release's size (20B, the config below) with random weights;
ours assigns the SAME tensors (the release's names: no copy, no renaming), so both hold one set of weights. A step
is true CFG as the pipelines run it: two forwards, the prompt (``--txt`` tokens) and the negative prompt (``--neg``
tokens). Rows: text-to-image at the release's 16:9 and 1:1 sizes, and an Edit-2511 step (``zero_cond_t``: the
1024x1024 condition image's tokens follow the generated image's).

VAE: diffusers' ``AutoencoderKLQwenImage`` (the 3D causal evaluation of a single frame) against ours (the same
network evaluated as the 2D network it is for one frame), on the same weights, decoding latents of the release
sizes and encoding a 1024x1024 edit image.

Each row: median time of ``--repeats`` runs after one warm-up, peak memory above what was allocated before, and the
relative L2 distance of our output to diffusers'. ``--parts trt`` (tensorrt + a GPU; not run on a CPU) builds a
static 16:9 decoder engine and times it against our PyTorch decode (columns: "diffusers" = ours PyTorch, "ours" =
TensorRT).

    python bench/bench_qwen_image.py                       # GPU, bf16, DiT and VAE
    python bench/bench_qwen_image.py --parts vae --repeats 5
    python bench/bench_qwen_image.py --tiny --device cpu   # a dry run at toy sizes on the CPU (float32)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.models.qwen_image.arch import QwenImageDiTConfig, QwenImageVAEConfig  # noqa: E402
from lightx2v.models.qwen_image.dit import QwenImageDiT  # noqa: E402
from lightx2v.models.qwen_image.tiny import TINY_DIT, TINY_VAE  # noqa: E402
from lightx2v.models.qwen_image.vae import QwenImageVAE  # noqa: E402
from lightx2v.models.wan.vae import vae_state_dict_from_diffusers  # noqa: E402
from lightx2v.ops.attention import get_attention_backend  # noqa: E402

# The release's component configs (Qwen/Qwen-Image* transformer/config.json and vae/config.json), as data.
RELEASE_DIT = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
               "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
               "axes_dims_rope": [16, 56, 56]}
RELEASE_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
               "temperal_downsample": [False, True, True], "dropout": 0.0}
# (label, (height, width) generated, condition (height, width) or None, zero_cond_t)
DIT_CASES = [("t2i 16:9", (928, 1664), None, False), ("t2i 1:1", (1328, 1328), None, False),
             ("edit-2511 1024^2", (1024, 1024), (1024, 1024), True)]
VAE_CASES = [("decode 16:9", "decode", (928, 1664)), ("decode 1:1", "decode", (1328, 1328)),
             ("encode 1024^2", "encode", (1024, 1024))]
TINY_DIT_CASES = [("t2i", (64, 96), None, False), ("edit-2511", (64, 64), (64, 80), True)]
TINY_VAE_CASES = [("decode", "decode", (64, 96)), ("encode", "encode", (64, 64))]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def randomise_(module, seed=0):
    """N(0, 1/fan_in) matrices, norm weights near 1, small vectors; drawn on the parameters' device."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif "norm" in name or name.endswith("gamma"):
                p.normal_(1.0, 0.05, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return module


def build_diffusers_dit(cfg: dict, dev, dtype):
    """diffusers' QwenImageTransformer2DModel built directly in ``dtype`` on ``dev`` (no float32 copy of 20B
    parameters): constructed on the meta device, materialised empty, randomised in place. Its RoPE tables are plain
    attributes computed at construction, so that module is rebuilt off the meta device."""
    import diffusers
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = diffusers.QwenImageTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=dev)
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(cfg["axes_dims_rope"]), scale_rope=True)
    return randomise_(model).eval().requires_grad_(False)


def rel_l2(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def timed(fn, dev, repeats):
    """(median seconds, peak bytes above the start, last output) of ``repeats`` runs after one warm-up."""
    with torch.inference_mode():
        fn()
        sync(dev)
        gc.collect()
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, out = [], None
        for _ in range(repeats):
            del out
            t0 = time.perf_counter()
            out = fn()
            sync(dev)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else 0
    return statistics.median(times), peak, out


def report(row):
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


# --- DiT ------------------------------------------------------------------------------------------------------


def bench_dit(args, dev, dtype, rows):
    cases = TINY_DIT_CASES if args.tiny else DIT_CASES
    base = TINY_DIT.to_diffusers_config() if args.tiny else dict(RELEASE_DIT)
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    for zero_cond_t in sorted({c[3] for c in cases}):
        cfg = {**base, "zero_cond_t": zero_cond_t}
        ref = build_diffusers_dit(cfg, dev, dtype)
        ours_cfg = QwenImageDiTConfig.from_diffusers_config(cfg)
        attn = get_attention_backend(args.attn, dtype=dtype, head_dim=ours_cfg.head_dim, device=dev)
        with torch.device("meta"):
            ours = QwenImageDiT(ours_cfg, attn)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the same tensors
        ours.eval().requires_grad_(False)
        for label, (h, w), cond, zc in cases:
            if zc != zero_cond_t:
                continue
            shapes = [(1, h // 16, w // 16)] + ([(1, cond[0] // 16, cond[1] // 16)] if cond else [])
            n = sum(a * b * c for a, b, c in shapes)
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(1, n, ours_cfg.in_channels, generator=g).to(dev, dtype)
            ctx = torch.randn(1, args.txt, ours_cfg.joint_attention_dim, generator=g).to(dev, dtype)
            neg = torch.randn(1, args.neg, ours_cfg.joint_attention_dim, generator=g).to(dev, dtype)
            t = torch.tensor([0.7], device=dev)
            rope, rope_neg = ours.rope(shapes, args.txt), ours.rope(shapes, args.neg)

            def step_ref():
                kw = dict(hidden_states=x, timestep=t.to(dtype), img_shapes=[shapes], return_dict=False)
                a = ref(encoder_hidden_states=ctx, encoder_hidden_states_mask=None, **kw)[0]
                ref(encoder_hidden_states=neg, encoder_hidden_states_mask=None, **kw)
                return a

            def step_ours():
                a = ours(x, ctx, t, shapes, rope)
                ours(x, neg, t, shapes, rope_neg)
                return a

            row = {"part": "dit", "case": label, "tokens": n, "txt": args.txt}
            row["diffusers s/step"], row["diffusers peak GiB"], out_ref = timed(step_ref, dev, args.repeats)
            row["ours s/step"], row["ours peak GiB"], out_ours = timed(step_ours, dev, args.repeats)
            row["diffusers peak GiB"] /= 2**30
            row["ours peak GiB"] /= 2**30
            row["ratio"] = row["ours s/step"] / row["diffusers s/step"]
            row["rel L2 vs diffusers"] = rel_l2(out_ours, out_ref)
            rows.append(report(row))
            del out_ref, out_ours
        ref = ours = None  # free this configuration's weights before the next one's
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# --- VAE ------------------------------------------------------------------------------------------------------


def bench_vae(args, dev, dtype, rows):
    import diffusers

    cfg = TINY_VAE.to_diffusers_config() if args.tiny else dict(RELEASE_VAE)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device(dev):
        ref = diffusers.AutoencoderKLQwenImage(**cfg)
    ref = randomise_(ref.to(dtype), 1).eval().requires_grad_(False)
    ours_cfg = QwenImageVAEConfig.from_diffusers_config(cfg)
    with torch.device("meta"):
        ours = QwenImageVAE(ours_cfg)
    ours.load_state_dict(vae_state_dict_from_diffusers(ref.state_dict(), ours_cfg.to_wan()), strict=True,
                         assign=True)
    ours.eval().requires_grad_(False)
    for label, op, (h, w) in (TINY_VAE_CASES if args.tiny else VAE_CASES):
        g = torch.Generator(device="cpu").manual_seed(0)
        if op == "decode":
            z = torch.randn(1, ours_cfg.z_dim, h // 8, w // 8, generator=g).to(dev, dtype)
            f_ref = lambda: ref.decode(z[:, :, None]).sample[:, :, 0]  # noqa: E731
            f_ours = lambda: ours.decode_raw(z)  # noqa: E731
        else:
            x = (torch.rand(1, 3, h, w, generator=g) * 2 - 1).to(dev, dtype)
            f_ref = lambda: ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]  # noqa: E731
            f_ours = lambda: ours.encode_raw(x)  # noqa: E731
        row = {"part": "vae", "case": label, "size": f"{w}x{h}"}
        row["diffusers ms"], row["diffusers peak GiB"], out_ref = timed(f_ref, dev, args.repeats)
        row["ours ms"], row["ours peak GiB"], out_ours = timed(f_ours, dev, args.repeats)
        row["diffusers ms"] *= 1e3
        row["ours ms"] *= 1e3
        row["diffusers peak GiB"] /= 2**30
        row["ours peak GiB"] /= 2**30
        row["ratio"] = row["ours ms"] / row["diffusers ms"]
        row["rel L2 vs diffusers"] = rel_l2(out_ours, out_ref)
        rows.append(report(row))
        del out_ref, out_ours


# --- TensorRT VAE ---------------------------------------------------------------------------------------------


def bench_trt(args, dev, dtype, rows):
    """Build a static 16:9 decoder engine from a random-weight release-size VAE (written to a temporary model
    folder) and time it against our PyTorch decode. Needs the tensorrt package and a CUDA GPU."""
    import tempfile

    import diffusers

    from lightx2v.models.qwen_image.stages import QwenImageOptions
    from lightx2v.models.qwen_image.trt import TensorRTVAE, build_trt_engines, make_vae

    cfg = {k: v for k, v in (TINY_VAE.to_diffusers_config() if args.tiny else RELEASE_VAE).items()
           if not k.startswith("_")}
    root = Path(tempfile.mkdtemp(prefix="qwen-trt-bench-"))
    randomise_(diffusers.AutoencoderKLQwenImage(**cfg), 1).save_pretrained(str(root / "model" / "vae"))
    t0 = time.perf_counter()
    build_trt_engines(root / "model", root / "engines", multi_profile=False, aspect_ratios=["16:9"],
                      parts=["decoder"], precision=args.trt_precision, check=False)
    build_s = time.perf_counter() - t0
    opts = QwenImageOptions(vae_type="tensorrt", trt_vae_config={"trt_engine_path": str(root / "engines")})
    trt_vae = make_vae(root / "model", "decoder", device=dev, dtype=dtype, options=opts)
    ours = make_vae(root / "model", "decoder", device=dev, dtype=dtype)
    if not isinstance(trt_vae, TensorRTVAE):
        print("TensorRT VAE fell back to PyTorch (see the log line above); no TensorRT row", flush=True)
        return
    h, w = 928, 1664
    z = torch.randn(1, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    row = {"part": "vae", "case": f"decode 16:9 TensorRT {args.trt_precision} vs ours", "size": f"{w}x{h}",
           "build s": build_s}
    row["diffusers ms"], row["diffusers peak GiB"], out_ref = timed(lambda: ours.decode(z), dev, args.repeats)
    row["ours ms"], row["ours peak GiB"], out_trt = timed(lambda: trt_vae.decode(z), dev, args.repeats)
    row["diffusers ms"] *= 1e3  # the columns hold: ours PyTorch (as "diffusers") vs TensorRT (as "ours")
    row["ours ms"] *= 1e3
    row["diffusers peak GiB"] /= 2**30
    row["ours peak GiB"] /= 2**30
    row["ratio"] = row["ours ms"] / row["diffusers ms"]
    row["rel L2 vs diffusers"] = rel_l2(out_trt, out_ref)
    rows.append(report(row))


def print_table(rows):
    for part in ("dit", "vae"):
        sub = [r for r in rows if r["part"] == part]
        if not sub:
            continue
        cols = list(dict.fromkeys(k for r in sub for k in r if k != "part"))
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in sub:
            print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                    for c in cols) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["dit", "vae"], choices=["dit", "vae", "trt"],
                    help="trt: a static TensorRT decoder engine vs our PyTorch decode (tensorrt + GPU)")
    ap.add_argument("--trt_precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (runs on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--attn", default="torch_sdpa", help="our attention backend (lightx2v.ops.attention)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--txt", type=int, default=None, help="prompt tokens (default 128; tiny 9)")
    ap.add_argument("--neg", type=int, default=None, help="negative-prompt tokens (default 8; tiny 3)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    args.txt = args.txt or (9 if args.tiny else 128)
    args.neg = args.neg or (3 if args.tiny else 8)
    import diffusers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{name} | torch {torch.__version__} | diffusers {diffusers.__version__} | {dtype} | "
          f"{'tiny' if args.tiny else 'release'} sizes | DiT step = CFG (2 forwards)", flush=True)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    if "dit" in args.parts:
        bench_dit(args, dev, dtype, rows)
    if "vae" in args.parts:
        bench_vae(args, dev, dtype, rows)
    if "trt" in args.parts:
        bench_trt(args, dev, dtype, rows)
    print_table(rows)


if __name__ == "__main__":
    main()
