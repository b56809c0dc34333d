"""HunyuanVideo-1.5: per-step DiT time and VAE decode time, ours against diffusers, in one process, on one GPU.

Both DiTs hold the SAME random bf16 weights at the release's real size (8.3B: 54 dual-stream blocks of 2048; ours is
given diffusers' tensors under the same names, no copy) and get the same request-shaped inputs: the 16:9 bucket of the
resolution (480p: 848x480, 720p: 1280x720) at 121 frames, 65 input channels, a prompt of ``--text-tokens`` Qwen tokens
(diffusers: padded to 1000 and masked, plus 256 masked ByT5 tokens and 729 masked image tokens for T2V, as its pipeline
feeds them; ours: the valid tokens only) and a negative prompt of 40 tokens. A step is CFG: two forwards, as the
pipelines run it. I2V (``--task i2v``) adds 729 valid SigLIP tokens to both.

The VAE decode (``AutoencoderKLHunyuanVideo15`` vs ours, same weights) decodes the step's latents
``[1, 32, 31, h/16, w/16]`` with diffusers' spatial tiling (``enable_tiling()``: 256 px tiles, 25% overlap; ours:
``VAETiling()``), the setting diffusers' example uses (an untiled 121-frame decode does not fit at these sizes).

Each row: a warm-up run, then ``--repeats`` timed runs (median), the peak GPU memory above what was allocated before,
and the relative L2 distance of our output to diffusers'.

    python bench/bench_hunyuan_video_15.py                        # 480p and 720p, DiT step and VAE decode
    python bench/bench_hunyuan_video_15.py --sizes 480p --parts dit --attn sage_attn
    python bench/bench_hunyuan_video_15.py --tiny --device cpu    # a dry run on the CPU at the tiny model's sizes
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.models.hunyuan_video_15 import tiny  # noqa: E402
from lightx2v.models.hunyuan_video_15.arch import (HunyuanVideo15DiTConfig, HunyuanVideo15VAEConfig,  # noqa: E402
                                                    closest_bucket)
from lightx2v.models.hunyuan_video_15.dit import HunyuanVideo15DiT  # noqa: E402
from lightx2v.models.hunyuan_video_15.vae import HunyuanVideo15VAE, VAETiling  # noqa: E402
from lightx2v.models.hunyuan_video_15.checkpoint import assign_strict  # noqa: E402
from lightx2v.ops.attention import get_attention_backend  # noqa: E402

# resolution: (frames, bucket base size); sizes are the 16:9 buckets the pipelines pick
REAL = {"480p": (121, 640), "720p": (121, 960)}
TINY = {"tiny": (9, 64)}
PAD_TEXT, PAD_GLYPH, IMAGE_TOKENS, NEG_TOKENS = 1000, 256, 729, 40


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak GiB above the memory in use before, last output) after one warm-up call."""
    with torch.inference_mode():
        out = fn()
        sync(device)
        del out
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Realistic scales: N(0, 1/fan_in) matrices, norm weights / gammas near 1, small vectors (on the device)."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name or name.endswith("gamma"):
            p.fill_(1.0).add_(torch.randn(p.shape, generator=g, device=p.device), alpha=0.05)
        else:
            p.normal_(0, 0.02, generator=g)
    return module


def diffusers_kwargs(cfg) -> dict:
    d = cfg.to_diffusers_config()
    d.pop("_class_name")
    return d


def dit_rows(cfg: HunyuanVideo15DiTConfig, sizes: dict, task: str, device, dtype, attn_name: str, text_tokens: int,
             repeats: int, rows: list) -> None:
    import diffusers

    with torch.device(device):
        ref = diffusers.HunyuanVideo15Transformer3DModel(**diffusers_kwargs(cfg))
    randomise_(ref, 0).to(dtype).eval().requires_grad_(False)
    attn = get_attention_backend(attn_name, dtype=dtype, head_dim=cfg.attention_head_dim, device=device)
    with torch.device("meta"):
        ours = HunyuanVideo15DiT(cfg, attn)
    assign_strict(ours, ref.state_dict().items(), what="bench", device=device)  # the same tensors, no copy
    ours.eval()
    for label, (frames, base) in sizes.items():
        height, width = closest_bucket(9, 16, base)
        g = torch.Generator(device=device).manual_seed(1)
        lat = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 16, width // 16)
        x = torch.randn(lat, generator=g, device=device, dtype=dtype)
        t = torch.tensor([700.0], device=device, dtype=dtype)
        text = torch.randn(1, PAD_TEXT, cfg.text_embed_dim, generator=g, device=device, dtype=dtype)
        masks = {}
        for name, n in (("cond", text_tokens), ("uncond", NEG_TOKENS)):
            m = torch.zeros(1, PAD_TEXT, device=device, dtype=dtype)
            m[:, :n] = 1
            masks[name] = m
        glyph = torch.zeros(1, PAD_GLYPH, cfg.text_embed_2_dim, device=device, dtype=dtype)
        glyph_mask = torch.zeros(1, PAD_GLYPH, device=device, dtype=dtype)
        image = (torch.randn(1, IMAGE_TOKENS, cfg.image_embed_dim, generator=g, device=device, dtype=dtype)
                 if task == "i2v" else torch.zeros(1, IMAGE_TOKENS, cfg.image_embed_dim, device=device, dtype=dtype))

        def theirs_step():
            return [ref(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=masks[b],
                        encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask, image_embeds=image,
                        return_dict=False)[0] for b in ("cond", "uncond")]

        def ours_step():
            return [ours(x, t, text[:, :n], None, image if task == "i2v" else None)
                    for n in (text_tokens, NEG_TOKENS)]

        row = {"part": f"DiT step ({task}, CFG)", "size": f"{width}x{height}x{frames}",
               "tokens": lat[2] * lat[3] * lat[4]}
        try:
            row["diffusers s"], row["diffusers peak GiB"], out_ref = timed(theirs_step, device, repeats)
        except torch.OutOfMemoryError:
            row["diffusers s"], out_ref = "OOM", None
            gc.collect(), torch.cuda.empty_cache()
        row["ours s"], row["ours peak GiB"], out_ours = timed(ours_step, device, repeats)
        if out_ref is not None:
            row["ours/diffusers"] = row["ours s"] / row["diffusers s"]
            row["rel L2"] = max(rel_l2(a, b) for a, b in zip(out_ours, out_ref))
        rows.append(row)
        print(row, flush=True)
        del out_ref, out_ours
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del ref, ours


def vae_rows(cfg: HunyuanVideo15VAEConfig, sizes: dict, device, dtype, tile: int, repeats: int, rows: list) -> None:
    import diffusers

    with torch.device(device):
        ref = diffusers.AutoencoderKLHunyuanVideo15(**diffusers_kwargs(cfg))
    randomise_(ref, 2).to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = HunyuanVideo15VAE(cfg)
    assign_strict(ours, ref.state_dict().items(), what="bench", device=device)
    ours.eval()
    ref.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_latent_min_height=tile // 16,
                      tile_latent_min_width=tile // 16)
    tiling = VAETiling(tile_sample_size=tile)
    for label, (frames, base) in sizes.items():
        height, width = closest_bucket(9, 16, base)
        g = torch.Generator(device=device).manual_seed(3)
        z = torch.randn(1, cfg.latent_channels, (frames - 1) // 4 + 1, height // 16, width // 16, generator=g,
                        device=device, dtype=dtype)
        row = {"part": f"VAE decode (tiles {tile} px)", "size": f"{width}x{height}x{frames}",
               "tokens": z.shape[2] * z.shape[3] * z.shape[4]}
        try:
            row["diffusers s"], row["diffusers peak GiB"], out_ref = timed(
                lambda: ref.decode(z / cfg.scaling_factor).sample, device, repeats)
        except torch.OutOfMemoryError:
            row["diffusers s"], out_ref = "OOM", None
            gc.collect(), torch.cuda.empty_cache()
        row["ours s"], row["ours peak GiB"], out_ours = timed(lambda: ours.decode(z, tiling=tiling), device, repeats)
        if out_ref is not None:
            row["ours/diffusers"] = row["ours s"] / row["diffusers s"]
            row["rel L2"] = rel_l2(out_ours, out_ref)
        rows.append(row)
        print(row, flush=True)
        del out_ref, out_ours
        gc.collect()
    del ref, ours


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(REAL), choices=list(REAL))
    ap.add_argument("--parts", nargs="+", default=["dit", "vae"], choices=["dit", "vae"])
    ap.add_argument("--task", default="t2v", choices=["t2v", "i2v"])
    ap.add_argument("--attn", default="torch_sdpa", help="our DiT's attention backend (lightx2v.ops.attention)")
    ap.add_argument("--text-tokens", type=int, default=256, help="valid Qwen tokens of the prompt (<= 1000)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tile", type=int, default=256, help="VAE tile size in pixels (diffusers' default 256)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny model's sizes (a CPU dry run)")
    args = ap.parse_args()
    import diffusers

    device = torch.device(args.device)
    if args.tiny:
        dit_cfg, vae_cfg, sizes, dtype = tiny.TINY_DIT, tiny.TINY_VAE, TINY, torch.float32
        args.text_tokens, args.tile = min(args.text_tokens, 24), 32
    else:
        dit_cfg, vae_cfg, dtype = HunyuanVideo15DiTConfig(), HunyuanVideo15VAEConfig(), torch.bfloat16
        sizes = {k: REAL[k] for k in args.sizes}
    dit_cfg = replace(dit_cfg, task_type=args.task)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
              f"diffusers {diffusers.__version__} | {dtype} | ours: {args.attn}, eager", flush=True)
    rows: list[dict] = []
    if "dit" in args.parts:
        dit_rows(dit_cfg, sizes, args.task, device, dtype, args.attn, args.text_tokens, args.repeats, rows)
    if "vae" in args.parts:
        vae_rows(vae_cfg, sizes, device, dtype, args.tile, args.repeats, rows)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")


if __name__ == "__main__":
    main()
