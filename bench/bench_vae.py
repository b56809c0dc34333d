"""VAE decode time of our Wan VAE against diffusers' AutoencoderKLWan, in one process, on one GPU.

Both hold the SAME random weights at the real size (diffusers' init with non-trivial norm gammas and biases; ours gets
diffusers' tensors through our rename table) and decode the same latents (the raw, denormalised latents of a video:
``decode_raw`` against diffusers' ``decode``). Rows:

* diffusers float32 (its usual setting: TF32 convolutions, cudnn.benchmark off) -- the reference output;
* diffusers bf16, and diffusers bf16 with cudnn.benchmark on (is autotuning alone the gain?);
* ours bf16 with all GPU choices on (channels-last, the fused residual-block passes, cuDNN autotune during decode)
  and with one of them off at a time (``lightx2v.models.wan.vae``'s module constants).

Each row: a warm-up decode of 2 latent frames (every conv shape of a full decode; its time includes autotuning,
reported as "warm-up s"), then timed full decodes (median), the output's max abs difference and relative L2
distance to diffusers float32's, the peak of GPU memory allocated during the decode above what was allocated before
it (weights of all loaded models excluded), and the rate of convolution arithmetic (FLOPs counted by hooks).

Measured on an H100 80GB (torch 2.11, cuDNN 9.19, diffusers 0.42.1; ``--profile --budget 190``): Wan2.1 ours bf16
839 ms, diffusers bf16 2074 ms (0.40x), diffusers fp32 3242 ms (0.26x); Wan2.2 ours 3500 ms, diffusers bf16 6220 ms
(0.56x). Max abs difference to diffusers fp32: ours 0.048, diffusers bf16 0.060 (Wan2.1).

    python bench/bench_vae.py                        # Wan2.1 at 480x832x81, then Wan2.2 at 704x1280x121
    python bench/bench_vae.py --models wan2.1 --repeats 3
    python bench/bench_vae.py --device cpu --tiny    # a dry run of the script on the CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.models.wan import vae as vae_mod  # noqa: E402
from lightx2v.models.wan.vae import WanVAE, WanVAEConfig, vae_state_dict_from_diffusers  # noqa: E402

# name: (config, (frames, height, width)) of the timed decode
MODELS = {
    "wan2.1": (WanVAEConfig(), (81, 480, 832)),
    "wan2.2": (WanVAEConfig.wan22(), (121, 704, 1280)),
}
TINY = {
    "wan2.1": (WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1), (9, 32, 48)),
    "wan2.2": (WanVAEConfig(base_dim=8, decoder_base_dim=6, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                            is_residual=True, patch_size=2, latents_mean=vae_mod.WAN22_LATENTS_MEAN,
                            latents_std=vae_mod.WAN22_LATENTS_STD), (9, 32, 64)),
}
# ours: (label, CUDA_CHANNELS_LAST, FUSED_NORM, CUDNN_AUTOTUNE, cudnn.allow_tf32).
# PyTorch caches cuDNN's plan per convolution (shapes, layouts, dtype, deterministic, allow_tf32) for the whole
# process, whether it was autotuned or picked by heuristics, and reuses it whatever cudnn.benchmark says. Rows that
# must not inherit another row's plans therefore differ in allow_tf32, which bf16 convolutions do not depend on.
OURS_VARIANTS = [
    ("ours bf16, no autotune", True, True, False, False),
    ("ours bf16", True, True, True, True),
    ("ours bf16, no fused passes", True, False, True, True),
    ("ours bf16, NCDHW (no channels-last)", False, False, True, True),
]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def mem_allocated(dev):
    return torch.cuda.memory_allocated() if dev.type == "cuda" else 0


@contextlib.contextmanager
def knobs(channels_last: bool, fused: bool, autotune: bool):
    saved = vae_mod.CUDA_CHANNELS_LAST, vae_mod.FUSED_NORM, vae_mod.CUDNN_AUTOTUNE
    vae_mod.CUDA_CHANNELS_LAST, vae_mod.FUSED_NORM, vae_mod.CUDNN_AUTOTUNE = channels_last, fused, autotune
    try:
        yield
    finally:
        vae_mod.CUDA_CHANNELS_LAST, vae_mod.FUSED_NORM, vae_mod.CUDNN_AUTOTUNE = saved


@contextlib.contextmanager
def cudnn_flags(benchmark: bool, allow_tf32: bool = True):
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = benchmark, allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before


def build_diffusers(cfg: WanVAEConfig, dev, seed=0):
    import diffusers

    kwargs = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    torch.manual_seed(seed)
    with torch.device(dev):
        model = diffusers.AutoencoderKLWan(**kwargs)
    with torch.no_grad():  # conv weights keep diffusers' random init; norm gammas around 1, small biases
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def ours_from(ref, cfg: WanVAEConfig) -> WanVAE:
    with torch.device("meta"):
        vae = WanVAE(cfg)
    sd = {k: v.detach().clone() for k, v in vae_state_dict_from_diffusers(ref.state_dict(), cfg).items()}
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def conv_flops(vae: WanVAE, z: torch.Tensor) -> float:
    """Multiply-add FLOPs (x2) of every convolution of ``vae.decode_raw(z)``, counted with forward hooks."""
    total = [0.0]

    def hook(m, args, out):
        k = 1
        for s in m.kernel_size:
            k *= s
        total[0] += 2.0 * out.numel() * (m.in_channels // m.groups) * k

    handles = [m.register_forward_hook(hook) for m in vae.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                       torch.nn.Conv3d))]
    try:
        vae.decode_raw(z)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def decode_flops(vae: WanVAE, z: torch.Tensor) -> float:
    """FLOPs of the full decode from two short ones: the first latent frame costs f1, every later one the same."""
    f2 = conv_flops(vae, z[:, :, :2])
    f3 = conv_flops(vae, z[:, :, :3])
    return f2 + (z.shape[2] - 2) * (f3 - f2)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = out.float() - ref.float()
    return d.abs().max().item(), (d.norm() / ref.float().norm()).item()


def run_row(label, fn, z, dev, repeats, truth=None, flops=None, deadline=None):
    """Warm up on 2 latent frames, then time ``repeats`` full decodes. Returns (row, output of the last decode)."""
    row = {"variant": label}
    sync(dev)
    t0 = time.perf_counter()
    fn(z[:, :, :2])
    sync(dev)
    row["warm-up s"] = time.perf_counter() - t0
    times, out, peak = [], None, 0
    for i in range(repeats):
        del out
        out = None
        gc.collect()
        sync(dev)
        base = mem_allocated(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn(z)
        sync(dev)
        times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if deadline is not None and time.time() > deadline:
            break
    row["ms"] = 1e3 * statistics.median(times)
    row["runs"] = len(times)
    row["peak GiB"] = peak / 2**30
    if flops:
        row["conv TFLOP/s"] = flops / (row["ms"] / 1e3) / 1e12
    if truth is not None:
        row["max abs diff"], row["rel L2"] = errors(out, truth)
        row["clamped %"] = 100.0 * (out.float().abs() >= 1).float().mean().item()
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row, out


def profile(tag, fn, z, dev, top=12):
    """Kernel time of one decode (after a warm-up), by kernel: the top ``top`` printed, the table to $OUT."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn(z)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        fn(z)
        sync(dev)
    events = [e for e in prof.key_averages() if not e.key.startswith("aten::") or dev.type != "cuda"]
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in events) or 1
    lines = [f"{getattr(e, attr, 0) / 1e3:9.1f} ms {100 * getattr(e, attr, 0) / total:5.1f}% {e.count:6d}x  "
             f"{e.key[:90]}" for e in events]
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{tag}.txt").write_text(f"total {total / 1e3:.1f} ms ({attr})\n" + "\n".join(lines) + "\n")
    print(f"--- profile {tag}: {total / 1e3:.1f} ms of kernels for {z.shape[2]} latent frames; top {top}:")
    print("\n".join(lines[:top]), flush=True)


def ceilings(dev):
    """The device's bf16 matrix rate and copy bandwidth, measured (METHOD.md: the two numbers)."""
    if dev.type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    mm = 2 * 8192**3 / statistics.median(ts) / 1e12
    x = torch.randn(2**28, device=dev)  # 1 GiB float32
    y = torch.empty_like(x)
    y.copy_(x)
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    bw = 2 * x.numel() * 4 / statistics.median(ts) / 1e12
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"bf16 matmul TFLOP/s": mm, "copy TB/s (read+write)": bw}


def check_fp32(cfg, ref32, dev, shape, rows):
    """Correctness of our GPU path itself (channels-last, fused passes): float32 with TF32 off against diffusers, at
    half the height and width, without autotuning (cuDNN's float32 trials at full size take minutes)."""
    ours32 = ours_from(ref32, cfg)
    sf = cfg.spatial_factor
    h, w = shape[1] // 2 // sf * sf, shape[2] // 2 // sf * sf
    z = torch.randn(1, cfg.z_dim, 2, h // sf, w // sf, device=dev)
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode(), knobs(True, True, False):
            want = ref32.decode(z).sample
            got = ours32.decode_raw(z)
            video = torch.rand(1, 3, 5, h, w, device=dev) * 2 - 1
            want_mu = ref32.encode(video).latent_dist.mode()
            got_mu = ours32.encode_raw(video)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    row = {"variant": f"CHECK ours fp32 vs diffusers fp32 (TF32 off, 2 latent frames, {h}x{w})"}
    row["max abs diff"], row["rel L2"] = errors(got, want)
    row["encode rel L2"] = errors(got_mu, want_mu)[1]
    print(json.dumps(row), flush=True)
    rows.append(row)
    del ours32


def bench_model(name, cfg, shape, dev, args, rows, deadline):
    f, h, w = shape
    sf = cfg.spatial_factor
    t = 1 + (f - 1) // cfg.temporal_factor
    print(f"=== {name}: decode {f} frames at {h}x{w} (latents {cfg.z_dim}x{t}x{h // sf}x{w // sf})", flush=True)
    g = torch.Generator(dev).manual_seed(1)
    mean = torch.tensor(cfg.latents_mean, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=dev).view(1, -1, 1, 1, 1)
    z = torch.randn(1, cfg.z_dim, t, h // sf, w // sf, generator=g, device=dev) * std + mean  # raw latents

    ref32 = build_diffusers(cfg, dev)
    if dev.type == "cuda" and not args.skip_check:
        check_fp32(cfg, ref32, dev, shape, rows)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    ours = ours_from(ref16, cfg)
    with torch.inference_mode(), knobs(True, True, False), cudnn_flags(False, False):  # the no-autotune row's plans
        flops = decode_flops(ours, z.to(torch.bfloat16))
    print(f"convolution arithmetic of the decode: {flops / 1e12:.1f} TFLOP", flush=True)

    def dif(model, dtype):
        return lambda x: model.decode(x.to(dtype)).sample

    truth = None
    short = dict(name=name, frames=f, size=f"{h}x{w}")
    with torch.inference_mode():
        fp32_full = name == "wan2.1" or args.fp32_everywhere
        if fp32_full:
            row, truth = run_row("diffusers fp32", dif(ref32, torch.float32), z, dev, 1, flops=flops,
                                 deadline=deadline)
            rows.append({**short, **row})
            save(rows)
        else:  # float32 truth on 3 latent frames only (time); the timed rows are then compared on those frames
            truth = ref32.decode(z[:, :, :3]).sample
        del ref32
        gc.collect()
        torch.cuda.empty_cache() if dev.type == "cuda" else None

        def compare(row, out):
            if truth is not None and not fp32_full:
                row["max abs diff"], row["rel L2"] = errors(out[:, :, : truth.shape[2]], truth)
                row["compared frames"] = truth.shape[2]
            return row

        variants = [("diffusers bf16", dif(ref16, torch.bfloat16), None, (False, True))]
        for label, cl, fused, tune, tf32 in OURS_VARIANTS if name == "wan2.1" or args.all_variants \
                else OURS_VARIANTS[1:2]:
            variants.append((label, lambda x: ours.decode_raw(x), (cl, fused, tune), (False, tf32)))
        if name != "wan2.1" and not args.all_variants:  # ours first: the long diffusers row may meet the budget
            variants = variants[1:] + variants[:1]
        repeats = args.repeats if name == "wan2.1" else args.repeats22
        if name == "wan2.1" or args.all_variants:
            variants.append(("diffusers bf16, cudnn.benchmark", dif(ref16, torch.bfloat16), None, (True, False)))
        for label, fn, ours_knobs, flags in variants:
            if time.time() > deadline:
                print(f"(time budget spent: skipped {label})", flush=True)
                continue
            ctx = contextlib.ExitStack()
            ctx.enter_context(cudnn_flags(*flags))
            if ours_knobs:
                ctx.enter_context(knobs(*ours_knobs))
            try:
                with ctx:
                    row, out = run_row(label, fn, z, dev, repeats, truth if fp32_full else None, flops, deadline)
                rows.append({**short, **compare(row, out)})
                save(rows)
                del out
            except Exception as e:  # keep the other rows
                print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({**short, "variant": label, "error": f"{type(e).__name__}: {e}"[:200]})
            gc.collect()
        if args.profile and (name == "wan2.1" or args.all_variants) and time.time() < deadline:
            with knobs(True, True, True):
                profile(f"{name}-ours", lambda x: ours.decode_raw(x), z[:, :, :3], dev)
            if args.profile_diffusers:
                profile(f"{name}-diffusers-bf16", dif(ref16, torch.bfloat16), z[:, :, :3], dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=2, help="timed full decodes per bf16 row (float32: one)")
    ap.add_argument("--repeats22", type=int, default=1, help="timed full decodes per Wan2.2 row")
    ap.add_argument("--budget", type=float, default=230.0, help="seconds; rows starting later are skipped")
    ap.add_argument("--all-variants", action="store_true", help="every row for Wan2.2 too")
    ap.add_argument("--fp32-everywhere", action="store_true", help="a full float32 decode for Wan2.2 too")
    ap.add_argument("--skip-check", action="store_true", help="no float32 correctness check")
    ap.add_argument("--profile", action="store_true", help="kernel-time profile of our 3-latent-frame decode")
    ap.add_argument("--profile-diffusers", action="store_true", help="...and of diffusers' (with --profile)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs and sizes (a dry run of this script)")
    args = ap.parse_args()
    deadline = time.time() + args.budget
    dev = torch.device(args.device)
    import diffusers

    rows: list[dict] = []
    if dev.type == "cuda":
        print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | cuDNN "
              f"{torch.backends.cudnn.version()} | diffusers {diffusers.__version__}", flush=True)
        c = ceilings(dev)
        print(json.dumps(c), flush=True)
        rows.append({"variant": "device ceilings", **c})
    for name in args.models:
        cfg, shape = (TINY if args.tiny else MODELS)[name]
        try:
            bench_model(name, cfg, shape, dev, args, rows, deadline)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            print_table([r for r in rows if r.get("name") == name])
        except Exception as e:
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"[:300]})
            if args.tiny:
                raise
    save(rows)
    print_table(rows)


def save(rows):
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_vae.json").write_text(json.dumps(rows, indent=1))


def print_table(rows):
    cols = ["name", "variant", "ms", "vs diffusers bf16", "vs diffusers fp32", "max abs diff", "rel L2", "peak GiB",
            "conv TFLOP/s", "warm-up s", "runs"]
    base = {}
    for r in rows:
        if r.get("variant") in ("diffusers bf16", "diffusers fp32") and "ms" in r:
            base[(r["name"], r["variant"])] = r["ms"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        if "ms" not in r:
            continue
        r = dict(r)
        for ref in ("bf16", "fp32"):
            b = base.get((r.get("name"), f"diffusers {ref}"))
            if b:
                r[f"vs diffusers {ref}"] = r["ms"] / b
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
    for r in rows:
        if "ms" not in r:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
