"""Z-Image-Turbo: DiT step time and VAE decode time, ours against diffusers, in one process.

Both sides hold the SAME random weights at the release's real sizes (diffusers' ``ZImageTransformer2DModel`` and
``AutoencoderKL`` built from the configs below; ours is given diffusers' tensors -- the parameter names are the same --
without copying), get the same inputs and run eagerly with PyTorch SDPA. A Turbo step is ONE DiT forward (no CFG:
guidance 0/1). Rows per image size: DiT s/step and VAE decode ms (median of the timed runs after a warm-up), peak
memory above the weights, and the output agreement (relative L2 of ours vs diffusers in bf16; on the first size also
both against a float32 diffusers run of the DiT).

    python bench/bench_z_image.py                      # 16:9 (1664x928) and 1:1 (1328x1328), bf16, CUDA
    python bench/bench_z_image.py --sizes 16:9 --steps 3 --repeats 3
    python bench/bench_z_image.py --tiny               # a dry run on the CPU at toy sizes (float32)

The caption is 120 tokens (a long prompt through Qwen3's template: padded to 128 tokens in the DiT).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.loading import assign_strict  # noqa: E402
from lightx2v.models.z_image.arch import Z_IMAGE_TURBO_DIT, Z_IMAGE_TURBO_VAE  # noqa: E402
from lightx2v.models.z_image.dit import ZImageDiT  # noqa: E402
from lightx2v.models.z_image.stages import ASPECT_RATIOS  # noqa: E402
from lightx2v.models.z_image.tiny import TINY_ASPECT_RATIOS, TINY_DIT, TINY_VAE  # noqa: E402
from lightx2v.models.z_image.vae import ZImageVAE  # noqa: E402
from lightx2v.ops.attention import get_attention_backend  # noqa: E402

CAPTION_TOKENS = 120
TINY_CAPTION_TOKENS = 40


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Matrices ~ N(0, 1/fan_in), norm weights near 1, other vectors small (realistic scales; timings do not depend
    on the values)."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "Norm" in type(mod).__name__
            for name, p in mod.named_parameters(recurse=False):
                if p.ndim >= 2:
                    p.normal_(0, p[0].numel() ** -0.5, generator=g)
                elif is_norm and name == "weight":
                    p.normal_(1.0, 0.05, generator=g)
                else:
                    p.normal_(0, 0.02, generator=g)
    return module.eval().requires_grad_(False)


def build_pair(kind: str, cfg, dev, dtype):
    """(diffusers model, ours sharing its tensors) for kind "dit" or "vae"."""
    import diffusers

    d = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device(dev):
        ref = diffusers.ZImageTransformer2DModel(**d) if kind == "dit" else diffusers.AutoencoderKL(**d)
    randomise_(ref, 0 if kind == "dit" else 1).to(dtype)
    head_dim = cfg.head_dim if kind == "dit" else cfg.block_out_channels[-1]
    attn = get_attention_backend("torch_sdpa", dtype=dtype, head_dim=head_dim, device=dev)
    with torch.device("meta"):
        ours = ZImageDiT(cfg, attn) if kind == "dit" else ZImageVAE(cfg, attn)
    assign_strict(ours, ref.state_dict().items(), what=f"bench {kind}", device=dev)  # same tensors, no copy
    return ref, ours.eval()


def timed(fn, steps: int, dev) -> tuple[float, float, object]:
    """(median seconds, peak GiB allocated above the start, last output) of ``steps`` calls after one warm-up."""
    out = fn()
    del out
    gc.collect()
    sync(dev)
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(steps):
        out = None
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else 0.0
    return statistics.median(times), peak, out


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def bench_dit(cfg, sizes, cap_len, dev, dtype, steps, rows, fp32_check):
    ref, ours = build_pair("dit", cfg, dev, dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    for i, (name, (w, h)) in enumerate(sizes.items()):
        lat = torch.randn(1, cfg.in_channels, h // 8, w // 8, generator=g, device=dev)
        cap = torch.randn(cap_len, cfg.cap_feat_dim, generator=g, device=dev)
        t = torch.tensor([0.3], device=dev)
        x, c = lat.to(dtype), cap.to(dtype)
        with torch.inference_mode():
            f_ref = lambda: ref([x[0][:, None]], t, [c], return_dict=False)[0][0][:, 0]  # noqa: E731
            f_ours = lambda: ours(x, t, c[None])[0]  # noqa: E731
            tokens = (h // 16) * (w // 16)
            row = {"part": "DiT step", "size": f"{name} {w}x{h}", "tokens": f"{tokens}+{cap_len}"}
            row["diffusers s"], row["diffusers peak GiB"], out_ref = timed(f_ref, steps, dev)
            row["ours s"], row["ours peak GiB"], out_ours = timed(f_ours, steps, dev)
            row["ours/diffusers"] = row["ours s"] / row["diffusers s"]
            row["rel L2 ours vs diffusers"] = rel_l2(out_ours, out_ref)
            if fp32_check and i == 0 and dtype != torch.float32:
                ref.float()
                truth = ref([lat[0][:, None]], t, [cap], return_dict=False)[0][0][:, 0]
                ref.to(dtype)
                row["rel L2 diffusers vs fp32"] = rel_l2(out_ref, truth)
                row["rel L2 ours vs fp32"] = rel_l2(out_ours, truth)
                del truth
        rows.append(row)
        print(row, flush=True)
        del out_ref, out_ours
        gc.collect()


def bench_vae(cfg, sizes, dev, dtype, repeats, rows):
    ref, ours = build_pair("vae", cfg, dev, dtype)
    g = torch.Generator(device=dev).manual_seed(1)
    for name, (w, h) in sizes.items():
        z = torch.randn(1, cfg.latent_channels, h // 8, w // 8, generator=g, device=dev).to(dtype)
        with torch.inference_mode():
            row = {"part": "VAE decode", "size": f"{name} {w}x{h}", "tokens": ""}
            row["diffusers s"], row["diffusers peak GiB"], out_ref = timed(lambda: ref.decode(z).sample, repeats, dev)
            row["ours s"], row["ours peak GiB"], out_ours = timed(lambda: ours.decode_raw(z), repeats, dev)
            row["ours/diffusers"] = row["ours s"] / row["diffusers s"]
            row["rel L2 ours vs diffusers"] = rel_l2(out_ours, out_ref)
        rows.append(row)
        print(row, flush=True)
        del out_ref, out_ours
        gc.collect()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["16:9", "1:1"], help="LightX2V aspect-ratio names")
    ap.add_argument("--steps", type=int, default=3, help="timed DiT steps per size (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="timed VAE decodes per size (after one warm-up)")
    ap.add_argument("--parts", nargs="+", default=["dit", "vae"], choices=["dit", "vae"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU in float32 (checks the script runs)")
    args = ap.parse_args()
    import diffusers

    if args.tiny:
        dev, dtype = torch.device("cpu"), torch.float32
        dit_cfg, vae_cfg, table, cap_len = TINY_DIT, TINY_VAE, TINY_ASPECT_RATIOS, TINY_CAPTION_TOKENS
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: run with --tiny for a CPU dry run")
        dev, dtype = torch.device("cuda"), torch.bfloat16
        dit_cfg, vae_cfg, table, cap_len = Z_IMAGE_TURBO_DIT, Z_IMAGE_TURBO_VAE, ASPECT_RATIOS, CAPTION_TOKENS
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
              f"diffusers {diffusers.__version__} | bf16, SDPA, eager, one forward per step (Turbo)", flush=True)
    sizes = {name: table[name] for name in args.sizes}
    rows: list[dict] = []
    if "dit" in args.parts:
        bench_dit(dit_cfg, sizes, cap_len, dev, dtype, args.steps, rows, fp32_check=not args.tiny)
        gc.collect()  # the DiT pair is gone with bench_dit's frame
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "vae" in args.parts:
        bench_vae(vae_cfg, sizes, dev, dtype, args.repeats, rows)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")


if __name__ == "__main__":
    main()
