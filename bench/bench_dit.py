"""Per-step time of our Wan DiT against diffusers' WanTransformer3DModel, in one process, on one GPU.

Both models hold the SAME random bf16 weights (ours assigns diffusers' tensors, renamed, without copying), get the
same inputs, and run eagerly with PyTorch SDPA. A step is CFG: two forwards (cond and uncond), as diffusers'
WanPipeline runs it. Prints a markdown table; the output agreement is the relative L2 distance between the two
models' outputs (and, for the 1.3B model, of each against a float32 run of diffusers).

    python bench/bench_dit.py                  # 1.3B T2V and 14B I2V at 480x832x81
    python bench/bench_dit.py --models 1.3b --steps 3
    python bench/bench_dit.py --models a14b-i2v 5b-ti2v   # Wan2.2: one A14B expert; TI2V-5B at 704x1280x121

Wan2.2 A14B runs one of its two experts per step (the high-noise one, then the low-noise one), so its per-step
time is that of one expert, measured here (I2V expert: 36 input channels, no CLIP). TI2V-5B is measured in its
image-to-video mode: a timestep per token, 0 on the first latent frame (diffusers: ``expand_timesteps``).
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.models.wan.arch import PRESETS  # noqa: E402
from lightx2v.loading import assign_strict  # noqa: E402
from lightx2v.models.wan.checkpoint import dit_key_from_diffusers  # noqa: E402
from lightx2v.models.wan.dit import WanDiT  # noqa: E402
from lightx2v.ops.attention import get_attention_backend  # noqa: E402

MODELS = {"1.3b": "wan2.1-t2v-1.3b", "14b-i2v": "wan2.1-i2v-14b", "a14b-i2v": "wan2.2-i2v-a14b",
          "5b-ti2v": "wan2.2-ti2v-5b"}
# frames, height, width, VAE spatial stride, timestep per token (first latent frame at 0)
SIZES = {"5b-ti2v": (121, 704, 1280, 16, True)}
DEFAULT_SIZE = (81, 480, 832, 8, False)
FP32_MODULES = re.compile(r"(time_embedder|scale_shift_table|norm1|norm2|norm3)")  # diffusers' _keep_in_fp32_modules


def build_diffusers(cfg, dtype):
    import diffusers

    with torch.device("cuda"):
        torch.manual_seed(0)
        kwargs = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
        model = diffusers.WanTransformer3DModel(**kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random weights with realistic scales: ~N(0, 1/fan_in) matrices, small vectors
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0).add_(torch.randn_like(p) * 0.05)
            else:
                p.normal_(0, 0.05)
            target = torch.float32 if (dtype == torch.float32 or FP32_MODULES.search(name)) else dtype
            p.data = p.data.to(target)
    return model.eval().requires_grad_(False)


def ours_from(ref, cfg, dtype):
    attn = get_attention_backend("torch_sdpa", dtype=dtype, head_dim=cfg.head_dim, device=torch.device("cuda"))
    with torch.device("meta"):
        model = WanDiT(cfg, attn)
    dtype_for = lambda n: torch.float32 if WanDiT.is_float32_param(n) else dtype  # noqa: E731
    tensors = ((dit_key_from_diffusers(k), v) for k, v in ref.state_dict().items())
    assign_strict(model, tensors, what="bench", dtype_for=dtype_for, device="cuda")
    return model.eval()


def make_inputs(cfg, frames=81, height=480, width=832, stride=8, per_token_t=False, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    lat = (1, cfg.in_dim, (frames - 1) // 4 + 1, height // stride, width // stride)
    x = torch.randn(lat, generator=g, device="cuda")
    t = torch.tensor([700.0], device="cuda")
    if per_token_t:  # [1, L]: 0 on the tokens of the first latent frame, as diffusers' expand_timesteps gives it
        per_frame = lat[3] * lat[4] // 4
        t = torch.full((1, lat[2] * per_frame), 700.0, device="cuda")
        t[:, :per_frame] = 0
    ctx = torch.randn(1, 512, 4096, generator=g, device="cuda")
    ctx[:, 24:] = 0
    ctx_null = torch.randn(1, 512, 4096, generator=g, device="cuda")
    ctx_null[:, 8:] = 0
    clip = torch.randn(1, 257, 1280, generator=g, device="cuda") if cfg.has_image_input else None
    return x, t, ctx, ctx_null, clip


def step_fn(model, kind, dtype, inputs):
    x, t, ctx, ctx_null, clip = inputs
    if kind == "ours":
        return lambda c: model(x, t, c, clip)
    return lambda c: model(x.to(dtype), t, c.to(dtype), encoder_hidden_states_image=None if clip is None
                           else clip.to(dtype), return_dict=False)[0]


def time_step(fwd, ctx, ctx_null, steps):
    with torch.inference_mode():
        fwd(ctx), fwd(ctx_null)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fwd(ctx), fwd(ctx_null)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def rel_l2(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def run_model(key, steps, rows):
    cfg = PRESETS[MODELS[key]]
    dtype = torch.bfloat16
    frames, height, width, stride, per_token_t = SIZES.get(key, DEFAULT_SIZE)
    inputs = make_inputs(cfg, frames, height, width, stride, per_token_t)
    _, _, ctx, ctx_null, _ = inputs
    row = {"model": MODELS[key], "size": f"{width}x{height}x{frames}",
           "tokens": inputs[0].shape[2] * inputs[0].shape[3] * inputs[0].shape[4] // 4}

    if key == "1.3b":  # float32 truth for the accuracy columns
        ref32 = build_diffusers(cfg, torch.float32)
        with torch.inference_mode():
            truth = step_fn(ref32, "diffusers", torch.float32, inputs)(ctx).float()
            ours32 = ours_from(ref32, cfg, torch.float32)
            row["fp32 ours vs diffusers"] = rel_l2(step_fn(ours32, "ours", torch.float32, inputs)(ctx), truth)
        del ref32, ours32
        gc.collect(), torch.cuda.empty_cache()

    ref = build_diffusers(cfg, dtype)
    ours = ours_from(ref, cfg, dtype)
    f_ref, f_ours = step_fn(ref, "diffusers", dtype, inputs), step_fn(ours, "ours", dtype, inputs)
    with torch.inference_mode():
        out_ref, out_ours = f_ref(ctx).float(), f_ours(ctx).float()
    row["bf16 ours vs diffusers"] = rel_l2(out_ours, out_ref)
    if key == "1.3b":
        row["bf16 diffusers vs fp32"] = rel_l2(out_ref, truth)
        row["bf16 ours vs fp32"] = rel_l2(out_ours, truth)
    del out_ref, out_ours
    torch.cuda.reset_peak_memory_stats()
    row["diffusers s/step"] = time_step(f_ref, ctx, ctx_null, steps)
    row["diffusers peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    row["ours s/step"] = time_step(f_ours, ctx, ctx_null, steps)
    row["ours peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    row["ratio"] = row["ours s/step"] / row["diffusers s/step"]
    rows.append(row)
    print(row, flush=True)
    del ref, ours, f_ref, f_ours
    gc.collect(), torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=2, help="timed CFG steps per model (after one warm-up step)")
    args = ap.parse_args()
    import diffusers

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"diffusers {diffusers.__version__} | CFG (2 forwards per step), SDPA, eager", flush=True)
    rows = []
    for key in args.models:
        run_model(key, args.steps, rows)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")


if __name__ == "__main__":
    main()
