"""Every attention backend available here, side by side, on one GPU: time and accuracy.

Default shape [B=1, H=40, L=32760, D=128] bf16 (Wan2.1-14B 480P self-attention), no mask, inputs with DiT-like
outliers (a few large q/k channels, a per-(head, channel) key offset). Each row: median of --iters single calls
timed with CUDA events after --warmup calls (the first call, which compiles / tunes / builds a graph, is timed
separately and shown in the note); accuracy against float32 attention over ALL query rows, computed in chunks of
heads x query rows (TF32 off), as cosine similarity and relative L2 of the whole output. "x cuDNN" is the time of
PyTorch SDPA's cuDNN kernel divided by the row's time (higher is faster). A backend that is missing or fails gets
its error in its row; the run goes on.

Rows: PyTorch SDPA (cuDNN, flash, efficient), our sage_attn (autotuned default; prefetch and fp16-P.V variants
at the tuned config; the attention kernel alone on pre-quantized operands), FlashAttention 3 (flash_attn_interface
or fa3-fwd) bf16 and FP8 (full call with quantization, and the kernel alone), FlashAttention 4 bf16 (its FP8 path
is Blackwell-only), cuDNN through nvidia-cudnn-frontend bf16 and FP8 (full call, kernel alone), and radial_attn
(block-sparse, flex_attention; its accuracy is against float32 attention with the same mask, so it is not
comparable with the dense rows).

    python3 bench/bench_attention_backends.py                    # everything available
    python3 bench/bench_attention_backends.py --only sdpa,fa4    # row groups: sdpa sage fa3 fa4 cudnn radial
    python3 bench/bench_attention_backends.py --seq 4096 --heads 8 --iters 5    # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GROUPS = ("sdpa", "sage", "fa3", "fa4", "cudnn", "radial")


def dit_like_qkv(B, L, H, D, dtype, seed, device="cuda"):
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
def fp32_attention(q, k, v, block_table=None, block=128, heads=4, rows=4096):
    """Exact float32 attention [B, L, H, D] -> float32, in chunks of ``heads`` x ``rows`` (scores: heads x rows x L
    floats at a time). ``block_table``: bool [n, n], query block i may see key block j (radial_attn)."""
    B, L, H, D = q.shape
    out = torch.empty(B, L, H, D, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(D)
    kv_blocks = torch.arange(k.shape[1], device=q.device) // block
    for h0 in range(0, H, heads):
        hs = slice(h0, min(h0 + heads, H))
        kh = k[:, :, hs].float().transpose(1, 2)  # [B, h, Lk, D]
        vh = v[:, :, hs].float().transpose(1, 2)
        for r0 in range(0, L, rows):
            rs = slice(r0, min(r0 + rows, L))
            s = (q[:, rs, hs].float().transpose(1, 2) @ kh.transpose(-1, -2)) * scale  # [B, h, r, Lk]
            if block_table is not None:
                qb = torch.arange(rs.start, rs.stop, device=q.device) // block
                s.masked_fill_(~block_table[qb][:, kv_blocks], float("-inf"))
            out[:, rs, hs] = (torch.softmax(s, dim=-1) @ vh).transpose(1, 2)
            del s
    return out


def metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    cos = (o @ r / (o.norm() * r.norm())).item()
    rel = ((o - r).norm() / r.norm()).item()
    return cos, rel, bool(torch.isfinite(out).all())


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_cuda(fn, iters, warmup):
    """Median / min / max ms of single calls: CUDA events (the host clock without a GPU: --smoke)."""
    if not torch.cuda.is_available():
        for _ in range(warmup):
            fn()
        t = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t), min(t), max(t)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    t = [a.elapsed_time(b) for a, b in ev]
    return statistics.median(t), min(t), max(t)


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return text[:240]


def versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn(torch)": torch.backends.cudnn.version()}
    for dist in ("triton", "fa3_fwd", "flash-attn-4", "flash_attn", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13",
                 "quack-kernels", "apache-tvm-ffi", "nvidia-cudnn-frontend", "nvidia-cudnn-cu13"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import cudnn

        out["cudnn(frontend backend)"] = cudnn.backend_version_string()
    except Exception as e:  # noqa: BLE001
        out["cudnn(frontend)"] = f"not importable: {short_error(e)[:80]}"
    from lightx2v.ops.attention.flash import flash_attn3_provider

    out["flash_attn3 provider"] = flash_attn3_provider()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(GROUPS), help=f"row groups: {','.join(GROUPS)}")
    ap.add_argument("--radial-grid", default="", help="F,H,W token grid for radial_attn (default: 21,30,52 at "
                    "L=32760, else 1 x L)")
    ap.add_argument("--sage-variants", default="default,prefetch,pv_fp16",
                    help="sage_attn variants (bench/bench_attention.py VARIANTS); the first is autotuned, the "
                    "others run at its config")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--traceback", action="store_true", help="print the traceback of a failing row")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape: checks that the script runs (most "
                    "rows then report that they need a GPU)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.heads, args.head_dim, args.iters, args.warmup = 1, 1200, 2, 64, 2, 1
        args.radial_grid = args.radial_grid or "6,10,20"
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu_name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke)"
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = groups - set(GROUPS)
    if unknown:
        sys.exit(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    B, L, H, D = args.batch, args.seq, args.heads, args.head_dim
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    flops = 4 * B * H * L * L * D
    dt_name = str(dt).removeprefix("torch.")
    print(f"# attention backends [B={B}, H={H}, L={L}, D={D}] {dt_name}, no mask; {gpu_name}; "
          f"median of {args.iters} after {args.warmup} warm-up", flush=True)
    print("# versions: " + json.dumps(versions()), flush=True)

    q, k, v = dit_like_qkv(B, L, H, D, dt, args.seed, device=dev)
    t0 = time.time()
    ref = fp32_attention(q, k, v)
    sync()
    print(f"fp32 reference (all {L} rows): {time.time() - t0:.1f} s", flush=True)

    rows: list[dict] = []

    def record(group, name, fn, note="", reference=None, setup=None, force=False):
        """Time ``fn`` (after ``setup()``, untimed, if given) and compare its output with the reference."""
        if group not in groups and not force:
            return
        row = dict(group=group, method=name, note=note)
        try:
            if setup is not None:
                setup()
            t = time.time()
            out = fn()
            sync()
            first = time.time() - t
            med, lo, hi = time_cuda(fn, args.iters, args.warmup)
            cos, rel, finite = metrics(out, ref if reference is None else reference)
            del out
            row.update(ms=med, ms_min=lo, ms_max=hi, tflops=flops / med / 1e9, cos=cos, rel=rel, finite=finite,
                       first_call_s=first)
            if first > 2.0:
                row["note"] = (note + "; " if note else "") + f"first call {first:.0f} s"
        except Exception as e:  # noqa: BLE001 - a missing or failing backend: report it, go on
            row["error"] = short_error(e)
            if args.traceback:
                traceback.print_exc()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        if args.json:  # after every row: a run cut short by a timeout keeps what it measured
            Path(args.json).write_text(json.dumps(dict(shape=[B, H, L, D], device=gpu_name, rows=rows), indent=1))
        print(f"  {name}: " + (f"{row['ms']:.2f} ms, cos {row['cos']:.6f}, rel {row['rel']:.4f}" if "ms" in row
                               else row["error"]), flush=True)

    from lightx2v.ops.attention import _BACKENDS

    def backend(name):
        b = _BACKENDS[name]
        why = b.problem(dt, D, q.device)
        if why is not None:
            raise RuntimeError(why)
        return b

    # --- PyTorch SDPA ---------------------------------------------------------------------------------------------
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa(kind):
        def run():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        return run

    record("sdpa", "SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION), force=True)  # the baseline: always
    record("sdpa", "SDPA flash", sdpa(SDPBackend.FLASH_ATTENTION))
    record("sdpa", "SDPA efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION))

    # --- our sage_attn --------------------------------------------------------------------------------------------
    if "sage" in groups:
        try:
            import lightx2v.ops.attention.sage as S
            from bench_attention import VARIANTS

            variants = [x.strip() for x in args.sage_variants.split(",") if x.strip()]
            best = None
            for vname in variants:
                kw = dict(VARIANTS[vname])
                label = "sage_attn" if vname == "default" else f"sage_attn [{vname}]"
                if best is None:
                    record("sage", label, lambda kw=kw: S.sage_attention(q, k, v, **kw), note="autotuned")
                    cfg = getattr(S._sage_attn_fwd_tuned, "best_config", None)
                    if cfg is not None:
                        best = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        rows[-1]["note"] += f" {best}"
                    first_kw = kw
                else:
                    record("sage", label, lambda kw=kw: S.sage_attention(q, k, v, config=best, **kw),
                           note=f"config {best}")
            if best is not None:
                qz = S.sage_quantize(q, k, v)
                kern = {key: val for key, val in first_kw.items() if key != "pv_fp8"}
                kern.setdefault("use_tma", S._has_tma(q))
                kern.setdefault("prefetch", not kern["use_tma"])
                record("sage", "sage_attn (kernel only)",
                       lambda: S.sage_attention_quantized(qz, out_dtype=dt, config=best, **kern),
                       note="pre-quantized operands")
                del qz
        except Exception as e:  # noqa: BLE001
            rows.append(dict(group="sage", method="sage_attn", error=short_error(e)))

    # --- FlashAttention 3 -----------------------------------------------------------------------------------------
    from lightx2v.ops.attention.flash import flash_attn3_fp8_quantized, flash_attn3_provider
    from lightx2v.ops.attention.fp8 import quantize_fp8

    prov = flash_attn3_provider()
    record("fa3", "flash_attn3 bf16", lambda: backend("flash_attn3")(q, k, v), note=str(prov))
    record("fa3", "flash_attn3 fp8 (K smoothed)", lambda: backend("flash_attn3_fp8")(q, k, v),
           note="quantize per (b, h) + kernel")
    if "fa3" in groups:
        fp8_ops = {}

        def fa3_setup():
            backend("flash_attn3_fp8")
            z = [quantize_fp8(q, per_head=True, smooth=False), quantize_fp8(k, per_head=True, smooth=True),
                 quantize_fp8(v, per_head=True, smooth=False)]
            fp8_ops["args"] = (z[0].x8, z[1].x8, z[2].x8, z[0].scale, z[1].scale, z[2].scale)

        record("fa3", "flash_attn3 fp8 (kernel only)", lambda: flash_attn3_fp8_quantized(*fp8_ops["args"]),
               note="pre-quantized e4m3", setup=fa3_setup)
        fp8_ops.clear()

        def fa3_nosmooth():
            from lightx2v.ops.attention.flash import flash_attn3_fp8_attention

            backend("flash_attn3_fp8")
            return flash_attn3_fp8_attention(q, k, v, smooth_k=False)

        record("fa3", "flash_attn3 fp8 (no smoothing)", fa3_nosmooth, note="accuracy without K smoothing")

    # --- FlashAttention 4 -----------------------------------------------------------------------------------------
    record("fa4", "flash_attn4 bf16", lambda: backend("flash_attn4")(q, k, v), note="CuTe DSL")
    # (no FA4 FP8 row: flash_attn.cute asserts "FP8 is only supported on SM100" for e4m3 inputs on other GPUs)

    # --- cuDNN frontend -------------------------------------------------------------------------------------------
    record("cudnn", "cudnn_sdpa bf16 (frontend)", lambda: backend("cudnn_sdpa")(q, k, v))
    if "cudnn" in groups and "ms" in rows[-1]:
        plan = _BACKENDS["cudnn_sdpa"].fn.last_plan
        rows[-1]["note"] = (rows[-1].get("note", "") + f" plan {plan}").strip()
    record("cudnn", "cudnn_sdpa fp8 (K smoothed)", lambda: backend("cudnn_sdpa_fp8")(q, k, v),
           note="quantize per tensor + kernel")
    if "cudnn" in groups and "ms" in rows[-1]:
        plan = _BACKENDS["cudnn_sdpa_fp8"].fn.last_plan
        rows[-1]["note"] = (rows[-1].get("note", "") + f"; plan {plan}").strip()
    if "cudnn" in groups:
        pre = {}

        def cudnn_setup():
            backend("cudnn_sdpa_fp8")
            pre["z"] = (quantize_fp8(q, per_head=False, smooth=False), quantize_fp8(k, per_head=False, smooth=True),
                        quantize_fp8(v, per_head=False, smooth=False))

        record("cudnn", "cudnn_sdpa fp8 (kernel only)",
               lambda: _BACKENDS["cudnn_sdpa_fp8"].fn.run_quantized(*pre["z"], out_dtype=dt),
               note="pre-quantized e4m3", setup=cudnn_setup)
        pre.clear()

    # --- radial_attn ----------------------------------------------------------------------------------------------
    if "radial" in groups:
        from lightx2v.ops.attention.radial import TokenGrid, radial_block_mask

        if args.radial_grid:
            grid = TokenGrid(*(int(x) for x in args.radial_grid.split(",")))
        elif L == 32760:
            grid = TokenGrid(21, 30, 52)
        else:
            grid = TokenGrid(1, 1, L)
        if grid.num_tokens == L:
            table = radial_block_mask(grid).to(q.device)
            masked_ref = fp32_attention(q, k, v, block_table=table)
            density = table.float().mean().item()
            record("radial", f"radial_attn {grid.frames}x{grid.height}x{grid.width} (flex)",
                   lambda: backend("radial_attn")(q, k, v, grid=grid), reference=masked_ref,
                   note=f"{density:.1%} of blocks; accuracy vs fp32 with the same mask")
            del masked_ref
        else:
            rows.append(dict(group="radial", method="radial_attn", error=f"grid {grid} has {grid.num_tokens} "
                             f"tokens, L={L}"))

    # --- table ----------------------------------------------------------------------------------------------------
    base = next((r["ms"] for r in rows if r["method"] == "SDPA cuDNN" and "ms" in r), None)
    print()
    print("| backend | ms | TFLOP/s | x cuDNN SDPA | cos vs fp32 | rel L2 vs fp32 | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | - | - | - | - | - | {r['error']} |")
            continue
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        fin = "" if r["finite"] else " NON-FINITE"
        print(f"| {r['method']} | {r['ms']:.2f} | {r['tflops']:.0f} | {speed} | {r['cos']:.6f} | {r['rel']:.4f}{fin} "
              f"| {r.get('note', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(shape=[B, H, L, D], device=gpu_name,
                                                   versions=versions(), rows=rows), indent=1))



if __name__ == "__main__":
    main()
