"""End-to-end time of 4-step, CFG-free Wan2.1-I2V-14B generation at 480x832x81 on one GPU (fewer-steps issue),
and feature-caching skip counts and times at the published thresholds.

Real-size components with random weights: umt5-xxl text encoder, CLIP ViT-H/14, the Wan2.1 VAE (encode of the
conditioning video, decode of the result) and the 14B I2V DiT, in bf16 and with FP8 block linears. The stages are
ours (lightx2v.models.wan.stages), fed in-memory components instead of files. One warm-up generation, then the
median of 2.

    python bench/bench_e2e.py                 # both parts
    python bench/bench_e2e.py --part e2e
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from PIL import Image

from real_size import build_clip, build_dit, build_t5, build_vae, gib

from lightx2v.config import build_config
from lightx2v.engine.components import ComponentSlot
from lightx2v.engine.progress import RunContext
from lightx2v.engine.request import GenerationRequest
from lightx2v.models.wan.stages import Expert, TextEmbeds, WanDecoder, WanEncoder, WanTransformer, stage_shapes


def _slot(obj):
    return ComponentSlot(lambda d: obj, torch.device("cuda"))


def sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def e2e(rows):
    dev = torch.device("cuda")
    t5, clip, vae = build_t5(), build_clip(), build_vae()
    image = Image.new("RGB", (832, 480), (120, 80, 40))
    cfg = build_config({"denoising_step_list": [1000, 750, 500, 250], "enable_cfg": False, "sample_shift": 5.0,
                        "resize_mode": "crop"}, {}, {})
    request = GenerationRequest("i2v", cfg.sampling, prompt="a cat turns its head", seed=0, images=(image,),
                                return_result_tensor=True)
    encode = WanEncoder(_slot(t5), dev, z_dim=16, vae_spatial=8, size_multiple=16, tasks=("i2v",),
                        image_encoder=_slot(clip), vae=_slot(vae))
    decode = WanDecoder(_slot(vae), dev)
    for scheme, attn in ((None, "torch_sdpa"), (None, "sage_attn"), ("fp8", "sage_attn")):
        dit = build_dit("wan2.1-i2v-14b", attn=attn)
        if scheme:
            from lightx2v.ops.quant import apply_quantization

            apply_quantization(dit, scheme)
            gc.collect(), torch.cuda.empty_cache()
        denoise = WanTransformer([Expert(dit)], dev)
        runs = []
        for _ in range(3):  # the first is a warm-up
            t = {}
            ctx = RunContext(device=dev)
            cond, _ = sync_time(lambda: encode(request, ctx))
            lat, _ = sync_time(lambda: denoise(cond, ctx))
            _, _ = sync_time(lambda: decode(lat, ctx))
            t = {"text": ctx.timings["text encode"], "image": ctx.timings["image encode"],
                 "denoise": ctx.timings["denoise"], "decode": ctx.timings["VAE decode"]}
            t["total"] = sum(t.values())
            runs.append(t)
        med = {k: statistics.median(r[k] for r in runs[1:]) for k in runs[1]}
        rows.append({"DiT": f"{scheme or 'bf16'} + {attn}", **{f"{k} s": v for k, v in med.items()},
                     "peak GiB": gib(torch.cuda.max_memory_allocated())})
        print(rows[-1], flush=True)
        del dit, denoise
        gc.collect(), torch.cuda.empty_cache()


def caching(rows, steps: int):
    """T2V-1.3B, 480x832x81, CFG, `steps` UniPC steps: block-stack evaluations skipped and denoise time per method."""
    from lightx2v.hooks.caching import PRESETS, apply_feature_caching

    dev = torch.device("cuda")
    dit = build_dit("wan2.1-t2v-1.3b")
    g = torch.Generator("cuda").manual_seed(0)
    ctx = torch.randn(1, 512, 4096, device=dev, generator=g, dtype=torch.bfloat16)
    ctx[:, 20:] = 0
    null = torch.zeros_like(ctx)
    text = TextEmbeds(ctx, null)
    s = build_config({}, {}, {"infer_steps": steps, "sample_shift": 5.0}).sampling
    shapes = stage_shapes(s, 16, 8)
    base = None
    for method, preset in [("none", None)] + [(k, v) for k, v in PRESETS.items() if "t2v-1.3b" in k]:
        cache = apply_feature_caching(dit, preset) if preset else None
        denoise = WanTransformer([Expert(dit, cache=cache)], dev)
        lat, secs = sync_time(lambda: denoise.denoise(text, None, 0, s, shapes, RunContext(device=dev)))
        row = {"method": method, "denoise s": secs}
        if cache is not None:
            st = cache.stats()
            row["skipped"] = sum(b["skipped"] for b in st.values())
            row["evaluations"] = row["skipped"] + sum(b["computed"] for b in st.values())
            row["rel L2 vs none"] = ((lat - base).norm() / base.norm()).item()
            cache.remove()
        else:
            base = lat
        rows.append(row)
        print(row, flush=True)


def table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["e2e", "caching", "all"], default="all")
    ap.add_argument("--caching_steps", type=int, default=50)
    args = ap.parse_args()
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    if args.part in ("e2e", "all"):
        rows = []
        e2e(rows)
        table(rows)
        gc.collect(), torch.cuda.empty_cache()
    if args.part in ("caching", "all"):
        rows = []
        caching(rows, args.caching_steps)
        table(rows)


if __name__ == "__main__":
    main()
