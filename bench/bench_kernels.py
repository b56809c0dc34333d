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
    python bench/bench_kernels.py --only int8_gemm [--tune]    # just the INT8 GEMM section (below)

int8_gemm section: at [32760x5120]x[5120x13824] (Wan 14B FFN up-projection) and [32760x5120]x[5120x5120] (q/k/v/o),
bf16 torch.matmul, fp8 torch._scaled_mm (rowwise scales), torch._int_mm alone and with QuantLinear's former eager
epilogue (int32 -> f32 * sx * sw -> bf16), and lightx2v.ops.quant.int8_gemm.int8_matmul (autotuned; with --tune each
kernel variant and config too): TFLOP/s (TOPS for int8) = 2MNK / time; then whole QuantLinear forwards (activation
quantization included, bias on) against nn.Linear in bf16. Floor at the FFN shape: 4.64 TFLOP; at the measured 775
TFLOP/s bf16 that is 6.0 ms, at int8's nominal 2x rate 3.0 ms; the bytes (A 168 MB + B 71 MB + C 906 MB bf16) take
0.38 ms at 3 TB/s, so every row is compute-bound. Measured on an H100 (torch 2.11, triton 3.6), FFN shape: bf16
791 TFLOP/s, fp8 1196, torch._int_mm 892 TOPS alone and 456 with the eager epilogue, int8_matmul 1168 (1.48x bf16;
the best single config 1239); the int8 QuantLinear forward 4.03 ms against 11.95 ms via torch._int_mm and 6.30 ms
for nn.Linear in bf16.
"""

from __future__ import annotations

import argparse
import functools
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
    ap.add_argument("--only", choices=["fused", "int8_gemm"], default=None, help="run one section (default: all)")
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

    if args.only == "int8_gemm":
        int8_gemm_section(args, device, info)
        return
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

    if args.only is None:
        print()
        int8_gemm_section(args, device, info)


# --- int8_gemm section -------------------------------------------------------------------------------------------

INT8_SHAPES = ((32760, 5120, 13824), (32760, 5120, 5120))  # (M, K, N): FFN up-projection, q/k/v/o projections
INT8_TUNE_EXTRA = ((128, 256, 64, 8, 4, 8), (128, 256, 128, 16, 3, 8), (128, 128, 256, 8, 3, 8))  # --tune, too


def _compiled_report(jit) -> list:
    """Resource report of each compiled variant of a Triton kernel (registers, spills, shared memory, wgmma in
    the PTX); [] where this triton keeps its cache elsewhere."""
    rows = []
    try:
        for cache in jit.device_caches.values():
            for ck in cache[0].values():
                md = ck.metadata
                rows.append({"warps": md.num_warps, "stages": md.num_stages, "shared": md.shared,
                             "regs": ck.n_regs, "spills": ck.n_spills, "wgmma": "wgmma" in ck.asm.get("ptx", "")})
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        rows.append({"error": f"{type(exc).__name__}: {exc}"[:120]})
    return rows


def _int8_gemm_shape(M, K, N, device, args, add):
    """Time every row of one shape through ``add(op, fn, check=None)``; returns the autotuner's pick."""
    import lightx2v.ops.quant as Q
    from lightx2v.ops.quant import int8_gemm as G

    gpu = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device, generator=g) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(N, device=device, generator=g) * 0.1).to(torch.bfloat16)
    xq, sx = Q.quantize_activation(x, "int8")
    wq, sw = Q.quantize_weight(w, "int8")

    add("bf16 torch.matmul", lambda: torch.matmul(x, w.t()))
    if gpu:
        x8, s8 = Q.quantize_activation(x, "fp8")
        w8, t8 = Q.quantize_weight(w, "fp8")
        add("fp8 torch._scaled_mm rowwise", lambda: torch._scaled_mm(
            x8, w8.t(), scale_a=s8, scale_b=t8.reshape(1, -1), out_dtype=torch.bfloat16))
        add("int8 torch._int_mm (int32 out, no epilogue)", lambda: torch._int_mm(xq, wq.t()))

        def int_mm_eager():  # QuantLinear's int8 path before the fused kernel
            acc = torch._int_mm(xq, wq.t())
            return (acc.float() * sx * sw.reshape(1, -1)).to(torch.bfloat16)

        add("int8 torch._int_mm + eager epilogue", int_mm_eager)
        eager = int_mm_eager()
    else:
        eager = G.int8_matmul_torch(xq, sx, wq, sw, None, torch.bfloat16)

    def ours():
        return G.int8_matmul(xq, sx, wq, sw, None, torch.bfloat16, impl="triton")

    variant = G.pick_variant(xq, wq)
    add(f"int8 int8_matmul (default: {variant}, autotuned)", ours, lambda: rel(ours(), eager))
    picked = {}
    for v in G.VARIANTS if gpu else ():
        if v == "tma" and G._tensor_descriptor_cls() is None:
            continue

        def run(v=v, cfg=None):
            return G.launch(xq, sx, wq, sw, None, torch.bfloat16, variant=v, config=cfg)

        if v != variant:
            add(f"int8 {v} kernel, autotuned", run, lambda f=run: rel(f(), eager))
        picked[v] = str(getattr(G._autotuned(v), "best_config", None))
        print(f"  autotune ({v}) picked: {picked[v]}", flush=True)
        for cfg in (G.CONFIGS[:6] + INT8_TUNE_EXTRA) if args.tune else ():
            f = functools.partial(run, v, cfg)
            add(f"int8 {v} {cfg}", f, lambda f=f: rel(f(), eager))

    # whole layers, activation quantization included (the quantized-input cache is cleared before each call)
    lin = torch.nn.Linear(K, N, device=device, dtype=torch.bfloat16)
    lin.weight.copy_(w)
    lin.bias.copy_(bias)
    want = lin(x)
    add("layer: nn.Linear bf16", lambda: lin(x))
    for scheme in ("fp8", "int8") if gpu else ("int8",):
        ql = Q.QuantLinear.from_linear(lin, scheme)

        def fwd(ql=ql):
            Q._forget_last_input()
            return ql(x)

        add(f"layer: QuantLinear {scheme} (act quant + GEMM)", fwd, lambda f=fwd: rel(f(), want))
        if scheme == "int8" and gpu:
            real = G.triton_problem
            G.triton_problem = lambda *a: "disabled for the benchmark"
            try:
                add("layer: QuantLinear int8 via torch._int_mm (before)", fwd, lambda f=fwd: rel(f(), want))
            finally:
                G.triton_problem = real
    add("activation quant alone (int8)", lambda: Q.quantize_activation(x, "int8"))
    return picked


def int8_gemm_section(args, device, info):
    """INT8 GEMM with the fused epilogue against bf16, fp8 and torch._int_mm (see the module docstring)."""
    from lightx2v.ops.quant import int8_gemm as G

    gpu = device.type == "cuda"
    results = {"device": info, "shapes": {}}
    rows = []  # (shape, op, ms, rate, rel)
    with torch.no_grad():
        for M, K, N in INT8_SHAPES if gpu else ((37, 80, 45),):
            tag = f"[{M}x{K}]x[{K}x{N}]"
            r = results["shapes"][tag] = {}

            def add(op, fn, check=None, tag=tag, r=r, flop=2.0 * M * N * K):
                try:
                    t = time_ms(fn, args.reps)
                    d = check() if check is not None else None
                except Exception as exc:  # noqa: BLE001 - e.g. an op this device lacks: report it, go on
                    t, d = float("nan"), f"{type(exc).__name__}: {exc}"[:100]
                r[op] = {"ms": t, "rate": flop / t / 1e9, "rel": d}
                rows.append((tag, op, t, r[op]["rate"], d))
                print(f"  {tag} {op}: {t:.3f} ms, {r[op]['rate']:.0f} T/s, rel {d}", flush=True)

            r["autotuned_config"] = _int8_gemm_shape(M, K, N, device, args, add)
            if gpu:
                torch.cuda.empty_cache()
        if gpu:
            results["compiled"] = {v: _compiled_report(getattr(G, f"_int8_mm_{v}_kernel").kernel)
                                   for v in G.VARIANTS}
            for v, lst in results["compiled"].items():
                for e in lst:
                    print(f"  compiled {v}: {e}", flush=True)

    if args.json:
        Path(args.json).with_name("bench_int8_gemm.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    clock = "CUDA events" if gpu else "host clock"
    print(f"{info}, median of {args.reps} ({clock}); T/s = 2MNK / time (TFLOP/s; TOPS for int8; the layer rows "
          "count the GEMM's 2MNK too); 'vs bf16' = bf16 torch.matmul's time / time; rel = relative L2 distance "
          "(int8 GEMMs: to torch._int_mm + eager epilogue; layers: to nn.Linear in bf16)")
    print()
    print("| shape | op | ms | T/s | vs bf16 | rel |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for tag, op, t, rate, d in rows:
        base = results["shapes"][tag]["bf16 torch.matmul"]["ms"]
        dd = f"{d:.1e}" if isinstance(d, float) else ("" if d is None else str(d))
        print(f"| {tag} | {op} | {t:.3f} | {rate:.0f} | {base / t:.2f}x | {dd} |")

if __name__ == "__main__":
    main()
