"""Fused Triton kernels (lightx2v.ops.triton) against the DiT's eager PyTorch math, at the DiT's real size.

For each op at x = [1, 32760, 5120] bf16 (Wan 14B, 81 frames at 720p; q/k as [1, 32760, 40, 128]): the eager
PyTorch time (exactly what dit.py does today, out of place) and the kernel's, each the median of 20 CUDA-event
timings after warm-up, and the achieved bandwidth = the fewest bytes the op must move (each input read once, each
output written once) / time, against the HBM ceiling (--peak-gbs; a device-to-device copy is timed too, as the
measured ceiling). Each kernel is checked against the fallback on the same inputs first (relative L2 distance).

Floors (fewest bytes / 3.0 TB/s, the H100's measured copy rate) at [1, 32760, 5120] bf16, N = 167.7M elements:
norm_modulate, rms_norm, rope_, rms_norm_rope_: 2N x 2 B = 671 MB -> 0.22 ms; gated_residual: 3N x 2 B = 1006 MB
-> 0.34 ms. Eager PyTorch moves ~6 GB for norm_modulate (upcast, layer_norm, mul, add, downcast: ~2 ms), ~6.7 GB for
gated_residual (~2.2 ms) and ~3.4 GB for rope (upcast, complex multiply, downcast: ~1.1 ms); so the prediction is
~5-9x for those, and less for rms_norm if this PyTorch has a fused CUDA rms_norm.

    python bench/bench_kernels.py                      # markdown table, last in the output
    python bench/bench_kernels.py --peak-gbs 4300      # H200 (H100 SXM: ~3000 measured by a copy)
    python bench/bench_kernels.py --tune               # also sweep warps / tile sizes of each kernel
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke   # CPU, tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightx2v.ops.triton as T  # noqa: E402
from lightx2v.models.wan.dit import rope_tables  # noqa: E402
from lightx2v.ops.triton.norm_modulate import norm_modulate_torch  # noqa: E402
from lightx2v.ops.triton.residual import gated_residual_torch  # noqa: E402
from lightx2v.ops.triton.rmsnorm import rms_norm_torch  # noqa: E402
from lightx2v.ops.triton.rope import rms_norm_rope_torch, rope_torch  # noqa: E402

EPS = 1e-6


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median of ``reps`` timings (CUDA events on the GPU; the host clock on the CPU for --smoke)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end))
    return statistics.median(ts)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_inputs(B, L, H, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    C = H * D
    x = (torch.randn(B, L, C, device=device, generator=g) + 0.3).to(dtype)
    y = torch.randn(B, L, C, device=device, generator=g).to(dtype)
    e = torch.randn(B, 6, C, device=device, generator=g) * 0.2  # float32 modulation: chunks as WanBlock makes them
    shift, scale, gate = e[:, 0:1], e[:, 1:2], e[:, 2:3]
    w = (1 + 0.1 * torch.randn(C, device=device, generator=g)).to(dtype)
    f = max(1, L // 1560)  # 21 x 30 x 52 = 32760 at 720p
    grid = (f, 30 if L >= 1560 else 1, -(-L // (f * (30 if L >= 1560 else 1))))
    cos, sin = T.rope_cos_sin(rope_tables(D, grid, device)[:L])
    return dict(x=x, y=y, shift=shift, scale=scale, gate=gate, w=w, cos=cos, sin=sin)


def ops(d, H, D):
    """name -> (bytes moved, eager fn, kernel fn, check() -> rel distance kernel vs eager on the same inputs)."""
    x, y, shift, scale, gate, w, cos, sin = (d[k] for k in ("x", "y", "shift", "scale", "gate", "w", "cos", "sin"))
    B, L, C = x.shape
    n, es = x.numel(), x.element_size()
    row_f32 = C * 4
    tab = 2 * cos.numel() * 4
    q = x.unflatten(-1, (H, D)).clone()  # mutated in place by the kernels (rotations / norms keep it bounded)
    xr = x.clone()  # mutated in place by gated_residual_
    out = torch.empty_like(x)

    def chk_nm():
        return rel(T.norm_modulate(x, shift, scale, EPS, impl="triton"), norm_modulate_torch(x, shift, scale, EPS))

    def chk_gr():
        return rel(T.gated_residual(x, y, gate, impl="triton"), gated_residual_torch(x, y, gate))

    def chk_gr_():
        x2 = x.clone()
        return rel(T.gated_residual_(x2, y, gate, impl="triton"), gated_residual_torch(x, y, gate))

    def chk_rms():
        return rel(T.rms_norm(x, w, EPS, impl="triton"), rms_norm_torch(x, w, EPS))

    def chk_rope():
        q0 = x.unflatten(-1, (H, D))
        return rel(T.rope_(q0.clone(), cos, sin, impl="triton"), rope_torch(q0, cos, sin))

    def chk_rnr():
        q0 = x.unflatten(-1, (H, D))
        got = T.rms_norm_rope_(q0.clone(), w, EPS, cos, sin, impl="triton")
        return rel(got, rms_norm_rope_torch(q0, w, EPS, cos, sin))

    return {
        "norm_modulate": (2 * n * es + 2 * B * row_f32, lambda: norm_modulate_torch(x, shift, scale, EPS),
                          lambda: T.norm_modulate(x, shift, scale, EPS, out=out, impl="triton"), chk_nm),
        "gated_residual": (3 * n * es + B * row_f32, lambda: gated_residual_torch(x, y, gate),
                           lambda: T.gated_residual(x, y, gate, out=out, impl="triton"), chk_gr),
        "gated_residual_ (in place)": (3 * n * es + B * row_f32, lambda: gated_residual_torch(xr, y, gate),
                                       lambda: T.gated_residual_(xr, y, gate, impl="triton"), chk_gr_),
        "rms_norm": (2 * n * es + C * es, lambda: rms_norm_torch(x, w, EPS),
                     lambda: T.rms_norm(x, w, EPS, out=out, impl="triton"), chk_rms),
        "rope_ (q/k)": (2 * n * es + tab, lambda: rope_torch(q, cos, sin),
                        lambda: T.rope_(q, cos, sin, impl="triton"), chk_rope),
        "rms_norm_rope_ (q/k)": (2 * n * es + C * es + tab, lambda: rms_norm_rope_torch(q, w, EPS, cos, sin),
                                 lambda: T.rms_norm_rope_(q, w, EPS, cos, sin, impl="triton"), chk_rnr),
    }


TUNE = {  # op -> list of (label, {pkg constant: value})
    "norm_modulate": [(f"ROW_WARPS={w}", {"ROW_WARPS": w}) for w in (4, 8, 16, 32)],
    "rms_norm": [(f"ROW_WARPS={w}", {"ROW_WARPS": w}) for w in (4, 8, 16, 32)],
    "rms_norm_rope_ (q/k)": [(f"ROW_WARPS={w}", {"ROW_WARPS": w}) for w in (4, 8, 16, 32)],
    "gated_residual": [(f"TILE={t} WARPS={w}", {"RESIDUAL_TILE": t, "RESIDUAL_WARPS": w})
                       for t in (2048, 4096, 8192) for w in (4, 8)],
    "rope_ (q/k)": [(f"MAX_COL_BLOCK={b} WARPS={w}", {"MAX_COL_BLOCK": b, "ELEMENTWISE_WARPS": w})
                    for b in (512, 1024, 2048, 4096) for w in (2, 4, 8)],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,32760,40,128", help="B,L,H,D (x is [B, L, H*D])")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--peak-gbs", type=float, default=3000.0, help="HBM ceiling for the %% column (GB/s)")
    ap.add_argument("--tune", action="store_true", help="sweep warps / tile sizes of each kernel too")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny sizes, 2 reps")
    ap.add_argument("--json", default=os.path.join(os.environ["OUT"], "bench_kernels.json") if os.environ.get("OUT")
                    else None, help="also write the numbers here (default: $OUT/bench_kernels.json when $OUT is set)")
    args = ap.parse_args(argv)

    if args.smoke:
        if not T.interpreting():
            sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment")
        device, args.shape, args.reps, args.dtype = torch.device("cpu"), "1,9,4,24", 2, "float32"
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    else:
        device = torch.device("cuda")
    if not T.available():
        sys.exit("triton does not import")
    B, L, H, D = map(int, args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    info = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    import triton

    print(f"device: {info}; torch {torch.__version__}; triton {triton.__version__}; x [{B}, {L}, {H * D}] {dtype}; "
          f"q/k [{B}, {L}, {H}, {D}]; median of {args.reps}", flush=True)

    d = make_inputs(B, L, H, D, dtype, device)
    results = {}
    with torch.no_grad():
        src = d["x"]
        dst = torch.empty_like(src)
        copy_bytes = 2 * src.numel() * src.element_size()
        copy_ms = time_ms(lambda: dst.copy_(src), args.reps)
        results["copy"] = dict(bytes=copy_bytes, ms=copy_ms, gbs=copy_bytes / copy_ms / 1e6)
        for name, (nbytes, eager, kernel, check) in ops(d, H, D).items():
            r = check()
            t_eager = time_ms(eager, args.reps)
            t_kernel = time_ms(kernel, args.reps)
            results[name] = dict(bytes=nbytes, eager_ms=t_eager, kernel_ms=t_kernel, rel=r,
                                 eager_gbs=nbytes / t_eager / 1e6, kernel_gbs=nbytes / t_kernel / 1e6)
            print(f"  {name}: eager {t_eager:.3f} ms, kernel {t_kernel:.3f} ms, rel {r:.2e}", flush=True)
        tuned = {}
        if args.tune:
            for name, configs in TUNE.items():
                for label, consts in configs:
                    saved = {k: getattr(T, k) for k in consts}
                    try:
                        for k, v in consts.items():
                            setattr(T, k, v)
                        d2 = ops(d, H, D)[name]
                        t = time_ms(d2[2], args.reps)
                        r = d2[3]()
                    except Exception as exc:  # a config that does not compile (e.g. too many warps)
                        t, r = float("nan"), f"{type(exc).__name__}: {exc}"[:80]
                    finally:
                        for k, v in saved.items():
                            setattr(T, k, v)
                    tuned.setdefault(name, []).append(dict(config=label, ms=t, rel=r))
                    print(f"  tune {name} {label}: {t:.3f} ms", flush=True)
            results["tune"] = tuned

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    peak = args.peak_gbs
    c = results["copy"]
    print()
    if tuned:
        print("| op | config | kernel ms | GB/s | % of peak |")
        print("| --- | --- | ---: | ---: | ---: |")
        for name, lst in tuned.items():
            nb = results[name]["bytes"]
            best = min((e["ms"] for e in lst if e["ms"] == e["ms"]), default=None)
            for e in lst:
                mark = " **best**" if e["ms"] == best else ""
                gbs = nb / e["ms"] / 1e6 if e["ms"] == e["ms"] else float("nan")
                print(f"| {name} | {e['config']}{mark} | {e['ms']:.3f} | {gbs:.0f} | {100 * gbs / peak:.0f}% |")
        print()
    clock = "CUDA events" if device.type == "cuda" else "host clock"
    print(f"{info}, x [{B}, {L}, {H * D}] {args.dtype}, median of {args.reps} ({clock}); GB/s = fewest bytes "
          f"read + written / time; peak = {peak:.0f} GB/s; a device-to-device copy of x: {c['ms']:.3f} ms = "
          f"{c['gbs']:.0f} GB/s ({100 * c['gbs'] / peak:.0f}% of peak)")
    print()
    print("| op | MB moved | eager PyTorch ms | eager GB/s | Triton ms | Triton GB/s | % of peak | speed-up | "
          "rel. diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if name in ("copy", "tune"):
            continue
        print(f"| {name} | {r['bytes'] / 1e6:.0f} | {r['eager_ms']:.3f} | {r['eager_gbs']:.0f} | "
              f"{r['kernel_ms']:.3f} | {r['kernel_gbs']:.0f} | {100 * r['kernel_gbs'] / peak:.0f}% | "
              f"{r['eager_ms'] / r['kernel_ms']:.2f}x | {r['rel']:.1e} |")


if __name__ == "__main__":
    main()
