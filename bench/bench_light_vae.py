"""Decode speed and memory of the lightweight Wan autoencoders (TAE, LightVAE) against our full Wan VAE, on the same
latents, with the PSNR of their videos to the full VAE's; and RIFE frame-interpolation throughput. One process, one
device.

All models hold RANDOM weights at their real sizes (the files cannot be downloaded here): the timings and memory are
those of the real networks, but the PSNR figures are only a smoke check that the outputs are videos of the right
shape and range. A random TAE and a random full VAE are unrelated functions, so their PSNR says nothing about the
quality of the trained taew2_1 / lightvaew2_1 against Wan2.1_VAE (report those only from the real files).

Rows (Wan2.1 latents of 480x832x81 = [1, 16, 21, 60, 104] by default, bf16 on the GPU):

* ``vae``: our full WanVAE (``decode``: normalised latents -> [-1, 1]), the reference video;
* ``lightvae``: LightX2V's pruned VAE (every width x 0.25, base_dim 24);
* ``tae chunk=N``: the TAE with N latent frames per pass (``all``: one pass), the memory/speed trade-off;
* ``rife batch=N``: the full VAE's frames (as the decode stage hands them over: [F, H, W, 3] float32 on the CPU)
  from 16 to 32 fps (81 -> 161 frames, 80 by RIFE), N frame pairs per network call.

Each decode row: a warm-up decode of 2 latent frames (autotuning included, reported), then ``--repeats`` timed full
decodes (median); "peak" is the most GPU memory allocated during the call above what was allocated before it (the
weights and the input excluded). ``--json PATH`` writes the rows.

    python bench/bench_light_vae.py                  # Wan2.1 480x832x81, bf16, on the GPU
    python bench/bench_light_vae.py --wan22          # Wan2.2 TI2V-5B 704x1280x121 (taew2_2, the Wan2.2 VAE)
    python bench/bench_light_vae.py --tiny           # a dry run on the CPU at toy sizes (float32)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.models.rife import IFNet, interpolate  # noqa: E402
from lightx2v.models.wan.lightvae import LIGHTVAE_CONFIG  # noqa: E402
from lightx2v.models.wan.tae import TAEConfig, TinyAutoencoder  # noqa: E402
from lightx2v.models.wan.vae import WanVAE, WanVAEConfig  # noqa: E402

FPS, TARGET_FPS = 16, 32


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, dev: torch.device, repeats: int):
    """(result of the last call, median seconds, peak bytes above the allocation before the call)."""
    times, peak = [], 0
    out = None
    for _ in range(repeats):
        out = None
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
    return out, statistics.median(times), peak


def psnr(video: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1], compared in [0, 1]."""
    mse = (((video.float() - ref.float()) / 2) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def build(model: torch.nn.Module, dev: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model.to(dev, dtype).eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 CPU")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (a dry run of the script)")
    ap.add_argument("--wan22", action="store_true", help="Wan2.2 TI2V-5B latents (48 channels, 16x) at 704x1280x121")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tae_chunks", default="1,4,all", help="TAE latent frames per pass to try")
    ap.add_argument("--rife_batches", default="4,8,16", help="RIFE frame pairs per call to try")
    ap.add_argument("--parts", default="vae,lightvae,tae,rife")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args()
    if args.tiny:
        args.device = "cpu"
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    parts = set(args.parts.split(","))

    if args.wan22:
        vae_cfg, tae_cfg, light_cfg = WanVAEConfig.wan22(), TAEConfig.wan22(), None  # no Wan2.2 LightVAE release
        frames, height, width = 121, 704, 1280
    else:
        vae_cfg, tae_cfg, light_cfg = WanVAEConfig(), TAEConfig(), LIGHTVAE_CONFIG
        frames, height, width = 81, 480, 832
    if args.tiny:  # narrow full VAE / LightVAE so that the dry run takes seconds; the TAE and RIFE at full width
        small = dict(dim_mult=(1, 2, 4, 4), num_res_blocks=1)
        vae_cfg = WanVAEConfig(base_dim=16, **small) if not args.wan22 else WanVAEConfig(
            base_dim=16, decoder_base_dim=16, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=1, is_residual=True,
            patch_size=2, latents_mean=vae_cfg.latents_mean, latents_std=vae_cfg.latents_std)
        light_cfg = WanVAEConfig(base_dim=4, **small) if light_cfg is not None else None
        frames, height, width = 9, 32 * vae_cfg.patch, 48 * vae_cfg.patch
    sf = vae_cfg.spatial_factor
    t_lat = (frames - 1) // 4 + 1
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, vae_cfg.z_dim, t_lat, height // sf, width // sf, generator=g).to(dev, dtype)
    warm = latents[:, :, :2]
    name = "Wan2.2 TI2V-5B" if args.wan22 else "Wan2.1"
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# {name} latents {list(latents.shape)} -> {frames}x{height}x{width}, {dtype}, {gpu}, torch "
          f"{torch.__version__}; RANDOM weights: PSNR is a smoke check only")
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        peak = f"peak {row['peak_gib']:6.2f} GiB" if dev.type == "cuda" else "peak n/a (CPU)"
        cells = [f"{row['row']:<20}", f"{row['seconds'] * 1000:9.1f} ms", peak]
        if "warmup_s" in row:
            cells.append(f"warm-up {row['warmup_s']:.2f} s")
        if "psnr_db" in row:
            cells.append(f"PSNR vs vae {row['psnr_db']:.2f} dB (random weights)")
        if "frames_per_s" in row:
            cells.append(f"{row['frames_per_s']:.1f} RIFE frames/s")
        print("  ".join(cells), flush=True)

    def decode_row(label: str, model, call) -> torch.Tensor:
        t0 = time.perf_counter()
        call(warm)
        sync(dev)
        warmup = time.perf_counter() - t0
        video, sec, peak = measure(lambda: call(latents), dev, args.repeats)
        row = {"row": label, "seconds": sec, "peak_gib": peak / 2**30, "warmup_s": warmup,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "shape": list(video.shape)}
        if reference is not None and video.shape == reference.shape:
            row["psnr_db"] = psnr(video, reference)
        report(row)
        return video

    reference = None
    vae = None
    if "vae" in parts or "rife" in parts:
        vae = build(WanVAE(vae_cfg), dev, dtype, 1)
        reference = decode_row("vae", vae, lambda z: vae.decode(z))
    if "lightvae" in parts and light_cfg is not None:
        light = build(WanVAE(light_cfg), dev, dtype, 2)
        decode_row("lightvae", light, lambda z: light.decode(z))
        del light
    if "tae" in parts:
        tae = build(TinyAutoencoder(tae_cfg), dev, dtype, 3)
        for chunk in args.tae_chunks.split(","):
            c = None if chunk == "all" else int(chunk)
            decode_row(f"tae chunk={chunk}", tae, lambda z, c=c: tae.decode(z, time_chunk=c))
        del tae
    if "rife" in parts:
        del vae
        net = build(IFNet(), dev, dtype, 4)
        video = reference if reference is not None else torch.rand(1, 3, frames, height, width, device=dev) * 2 - 1
        clip = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()  # [F, H, W, 3], as Frames holds
        for bs in (int(b) for b in args.rife_batches.split(",")):
            interpolate(clip[:3], FPS, TARGET_FPS, net, batch_size=bs)  # warm-up: every conv shape once
            (out, _), sec, peak = measure(lambda bs=bs: interpolate(clip, FPS, TARGET_FPS, net, batch_size=bs), dev,
                                          args.repeats)
            made = out.shape[0] - clip.shape[0]
            report({"row": f"rife batch={bs}", "seconds": sec, "peak_gib": peak / 2**30,
                    "frames_per_s": made / sec, "shape": list(out.shape)})
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "dtype": str(dtype), "device": gpu, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
