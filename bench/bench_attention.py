"""Attention throughput on one GPU: cuDNN SDPA, flash SDPA and our sage_attn (INT8 Q.K^T + FP8 P.V, Triton).

Default shape [B=1, H=40, L=32760, D=128] (Wan2.1-14B at 720p), bf16 in and out, no mask. Each method is timed
with CUDA events around single calls (warm-up first, median of --iters); FLOPs are 4*B*H*Lq*Lk*D. Accuracy is
measured against exact float32 attention (softmax(q k^T / sqrt(D)) v, TF32 off) on a sample of query rows, on
inputs with DiT-like outliers (a few large q/k channels, a per-channel offset on k). Prints a markdown table.

    python bench/bench_attention.py                       # cuDNN, flash, sage_attn (+ TMA / prefetch variants)
    python bench/bench_attention.py --variants tma,prefetch --configs "64,128,4,2;prefetch@128,128,8,3"  # no tuning
    python bench/bench_attention.py --variants default,fused_acc,no_magic,pv_fp16 --reuse-config
    python bench/bench_attention.py --seq 4096 --heads 8               # a smaller check

sage_attn autotunes its attention kernel on the first call of each variant (about a minute each: every config
is compiled and timed); --reuse-config runs the other variants with the config the first one picked instead. "sage_attn (kernel only)" times the attention kernel on pre-quantized operands, "sage_attn
(pre-processing)" the K/V statistics + quantization kernels: the two add up to the full call.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name -> sage_attention keyword arguments
    "default": {},  # sm_90+: TMA, no prefetch; older GPUs: prefetch, no TMA
    "tma": {"use_tma": True, "prefetch": False},  # tiles loaded by TMA descriptors instead of cp.async pointers
    "prefetch": {"prefetch": True, "use_tma": False},  # scores of tile j+1 issued before the softmax of tile j
    "prefetch_tma": {"prefetch": True, "use_tma": True},
    "plain": {"prefetch": False, "use_tma": False},  # cp.async pointers, no prefetch
    "fused_acc": {"two_level": False},  # FP8 MMA accumulates straight into the running accumulator
    "no_magic": {"magic_i2f": False},  # INT32 scores converted with I2F
    "pv_fp16": {"pv_fp8": False},  # P.V in fp16 (tensor-core rate of bf16): the accuracy/speed reference point
}


def parse_configs(text):
    """'BM,BN,W,S;variant@BM,BN,W,S' -> [(variant or None, dict(BLOCK_M, BLOCK_N, num_warps, num_stages))]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        name, _, item = item.rpartition("@")
        bm, bn, w, st = (int(x) for x in item.split(","))
        out.append((name or None, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)))
    return out


def outlier_qkv(B, L, H, D, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g, device=device)
    k = torch.randn(B, L, H, D, generator=g, device=device)
    v = torch.randn(B, L, H, D, generator=g, device=device)
    ch = torch.randperm(D, generator=g, device=device)
    q[..., ch[:4]] *= 6.0
    k[..., ch[2:6]] *= 6.0
    k += 4.0 * torch.randn(H, D, generator=g, device=device)
    v += 0.5 * torch.randn(H, D, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@torch.no_grad()
def exact_rows(q, k, v, rows, heads_per_chunk=8):
    """Exact float32 attention for the query rows `rows`: [B, len(rows), H, D]."""
    B, _, H, D = q.shape
    out = torch.empty(B, len(rows), H, D, dtype=torch.float32, device=q.device)
    for h0 in range(0, H, heads_per_chunk):
        hs = slice(h0, h0 + heads_per_chunk)
        qh = q[:, rows, hs].float().transpose(1, 2)  # [B, h, R, D]
        kh = k[:, :, hs].float().transpose(1, 2)
        vh = v[:, :, hs].float().transpose(1, 2)
        p = torch.softmax((qh @ kh.transpose(-1, -2)) / math.sqrt(D), dim=-1)
        out[:, :, hs] = (p @ vh).transpose(1, 2)
        del p
    return out


def time_cuda(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) for a, b in events]
    return statistics.median(times), min(times), max(times)


def metrics(out, ref, rows):
    o = out[:, rows].double().flatten()
    r = ref.double().flatten()
    cos = F.cosine_similarity(o, r, dim=0).item()
    rel = ((o - r).norm() / r.norm()).item()
    return cos, rel, bool(torch.isfinite(out).all())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1024, help="query rows checked against exact attention")
    ap.add_argument("--variants", default="default,tma,prefetch,prefetch_tma",
                    help=f"sage_attn variants, the first is the reference for the split: {','.join(VARIANTS)}")
    ap.add_argument("--reuse-config", action="store_true", help="autotune only the first variant; run the others "
                    "with its config")
    ap.add_argument("--configs", default="", help="fixed configs 'BM,BN,warps,stages;variant@BM,BN,warps,stages;...': "
                    "every variant (or the one named) runs at each of them, no autotuning (quick sweeps)")
    ap.add_argument("--no-split", action="store_true", help="skip the kernel-only / pre-processing rows")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the PyTorch SDPA rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import lightx2v.ops.attention.sage as S

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    B, L, H, D = args.batch, args.seq, args.heads, args.head_dim
    flops = 4 * B * H * L * L * D
    dev = torch.cuda.get_device_name()
    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = "missing"
    print(f"# attention [B={B}, H={H}, L={L}, D={D}] {args.dtype}, no mask; {dev}, torch {torch.__version__}, "
          f"triton {tv}; median of {args.iters} after {args.warmup} warm-up", flush=True)

    q, k, v = outlier_qkv(B, L, H, D, dtype, args.seed)
    rows = torch.linspace(0, L - 1, min(args.rows, L), device="cuda").round().long().unique()
    t0 = time.time()
    ref = exact_rows(q, k, v, rows)
    print(f"exact reference on {len(rows)} rows: {time.time() - t0:.1f} s", flush=True)

    results = []

    def record(name, fn, note=""):
        try:
            out = fn()
            torch.cuda.synchronize()
            med, lo, hi = time_cuda(fn, args.iters, args.warmup)
            cos, rel, finite = metrics(out, ref, rows)
            del out
            results.append(dict(method=name, ms=med, ms_min=lo, ms_max=hi, tflops=flops / med / 1e9, cos=cos,
                                rel=rel, finite=finite, note=note))
        except Exception as e:  # a backend that is not available here: report, go on
            results.append(dict(method=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
        torch.cuda.empty_cache()
        r = results[-1]
        print(f"  {name}: " + (f"{r['ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s, cos {r['cos']:.6f}"
                               if "ms" in r else r["error"]), flush=True)

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views, as the torch_sdpa backend passes
    if not args.no_sdpa:
        def sdpa(backend):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            return run

        record("SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION))
        record("SDPA flash", sdpa(SDPBackend.FLASH_ATTENTION))

    best = None
    first = None
    fixed = parse_configs(args.configs)
    for name in [n.strip() for n in args.variants.split(",") if n.strip()] if fixed else []:
        for only, cfg in fixed:
            if only is not None and only != name:
                continue
            label = f"sage_attn [{name}] {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
            t0 = time.time()
            try:
                S.sage_attention(q, k, v, config=cfg, **VARIANTS[name])  # compiles
                torch.cuda.synchronize()
            except Exception as e:
                results.append(dict(method=label, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                print(f"  {label}: {results[-1]['error']}", flush=True)
                continue
            record(label, lambda kw=VARIANTS[name], cfg=cfg: S.sage_attention(q, k, v, config=cfg, **kw),
                   f"compiled in {time.time() - t0:.0f} s")
    for name in [n.strip() for n in args.variants.split(",") if n.strip()] if not fixed else []:
        kw = dict(VARIANTS[name])
        label = "sage_attn" if name == "default" else f"sage_attn [{name}]"
        if best is None or not args.reuse_config:
            t0 = time.time()
            try:
                S.sage_attention(q, k, v, **kw)  # autotunes
                torch.cuda.synchronize()
                cfg = S._sage_attn_fwd_tuned.best_config
                note = f"tuned in {time.time() - t0:.0f} s: {cfg}"
                if best is None:
                    best = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    first = kw
            except Exception as e:
                results.append(dict(method=label, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                print(f"  {label}: {results[-1]['error']}", flush=True)
                continue
            record(label, lambda kw=kw: S.sage_attention(q, k, v, **kw), note)
        else:
            record(label, lambda kw=kw, cfg=best: S.sage_attention(q, k, v, config=cfg, **kw), f"config {best}")

    if best is not None and not args.no_split:  # the split (first variant): pre-processing vs the attention kernel
        qz = S.sage_quantize(q, k, v, pv_dtype=torch.float16 if first.get("pv_fp8") is False else torch.float8_e4m3fn)
        kern_kw = {key: val for key, val in first.items() if key != "pv_fp8"}
        kern_kw.setdefault("use_tma", S._has_tma(q))  # as sage_attention resolves its defaults (env aside)
        kern_kw.setdefault("prefetch", not kern_kw["use_tma"])
        record("sage_attn (kernel only)",
               lambda: S.sage_attention_quantized(qz, out_dtype=dtype, config=best, **kern_kw), f"config {best} {first}")
        med, _, _ = time_cuda(lambda: S.sage_quantize(q, k, v), args.iters, args.warmup)
        results.append(dict(method="sage_attn (pre-processing)", ms=med, note="stats + quantize Q, K, V"))

    base = next((r["ms"] for r in results if r["method"] == "SDPA cuDNN" and "ms" in r), None)
    print()
    print("| method | ms | TFLOP/s | vs cuDNN | cos vs exact | rel-L2 vs exact | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['method']} | - | - | - | - | - | {r['error']} |")
            continue
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        acc = (f"{r['cos']:.6f} | {r['rel']:.4f}" + ("" if r["finite"] else " NON-FINITE")) if "cos" in r else "- | -"
        print(f"| {r['method']} | {r['ms']:.2f} | {tf} | {speed} | {acc} | {r.get('note', '')} |")
    sages = [r for r in results if r["method"].startswith("sage_attn") and "cos" in r]
    if sages and base:
        sage = min(sages, key=lambda r: r["ms"])
        ok = base / sage["ms"] >= 1.5 and sage["cos"] >= 0.995
        print(f"\ntarget (>= 1.5x cuDNN, cos >= 0.995): {'MET' if ok else 'NOT MET'} by the fastest full call, "
              f"{sage['method']}: {base / sage['ms']:.2f}x, cos {sage['cos']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(shape=[B, H, L, D], dtype=args.dtype, device=dev,
                                                   results=results), indent=1))


if __name__ == "__main__":
    main()
