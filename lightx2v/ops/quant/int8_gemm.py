"""INT8 GEMM with the dequantization epilogue fused (Triton): y = (xq @ wq^T) * sx * sw^T + bias, in one kernel.

    xq [M, K] int8, sx [M, 1] float32 (per token)      wq [N, K] int8 (QuantLinear's layout), sw [N, 1] float32
    -> y [M, N] in out_dtype (bf16 / fp16 / fp32): int32 accumulation on the tensor cores (tl.dot on int8 tiles),
       then acc.to(f32) * sx[m] * sw[n] + bias[n], rounded once and stored once.

Why: ``torch._int_mm`` returns an int32 [M, N] that then needs a float32 epilogue pass of its own (~3.6 GB of
traffic at the Wan 14B FFN shape [32760x5120]x[5120x13824]); Hopper's int8 tensor cores peak at twice the bf16 rate.
Measured on an H100 (torch 2.11, triton 3.6; bench/bench_kernels.py --only int8_gemm): at that shape bf16
torch.matmul 5.86 ms (791 TFLOP/s), fp8 torch._scaled_mm rowwise 3.88 ms (1196), torch._int_mm alone 5.20 ms (892
TOPS) and with the eager epilogue 10.16 ms (456), this kernel autotuned 3.97 ms (1168 TOPS, 1.48x bf16); the whole
QuantLinear int8 forward (activation quantization included) 4.03 ms against 11.95 ms through torch._int_mm.

Two kernels, same math:
  "ptr": one program per output tile (grouped ordering for L2 reuse of A's row blocks), pointer loads; tails of M
         and N read wrapped-around rows (never stored), the tail of K is masked. Any GPU that Triton supports.
  "tma": Hopper+ (sm_90): persistent (one program per SM walking the tiles), operands through the tensor-memory
         accelerator (host-side TensorDescriptor; out-of-bounds parts of a tile read as zero).
Tile sizes come from ``triton.autotune`` over a short list of configs (key: M rounded up to a power of two, at most
4096, and N, K), on the GPU only; under ``TRITON_INTERPRET=1`` one small config runs (tests).

Requirements checked by :func:`triton_problem` (else callers fall back to ``torch._int_mm`` or float32 math):
K % 16 == 0 and 16-byte aligned, row-major operands (TMA's stride rule; 16-byte vector loads for "ptr").
Triton is imported on the first launch only (``lightx2v.ops.triton.lazy_jit``).
"""

from __future__ import annotations

import functools

import torch

from lightx2v.ops import triton as pkg

tl = None  # triton.language, bound on the first launch (lazy_jit)

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VARIANTS = ("ptr", "tma")
# None: "tma" on sm_90+ where triton has host-side tensor descriptors, else "ptr". bench/bench_kernels.py sets it.
VARIANT: str | None = None


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps) tried by the autotuner on the GPU, for both kernels.
# Hopper sizes: a 128x256x128 int8 stage is 48 KB of shared memory, four stages fit in its 227 KB. The BLOCK_M <= 64
# ones are for M <= 64 tokens (the autotuner's pruning keeps one kind or the other). A module constant:
# bench/bench_kernels.py --only int8_gemm --tune sweeps the first six. Measured on an H100 (triton 3.6), "tma" kernel,
# TOPS at [32760x5120]x[5120x13824] / [32760x5120]x[5120x5120]: 128x256x128 s3 1211/1122, s4 1175/1157;
# 256x128x128 s3 1239/1110, s4 1177/1196; 128x128x128 s4 w8 1026/970, s5 w4 1069/1021 (bf16 torch.matmul: 791/787).
# BLOCK_K 64 (1062/1007) and 256 (1088/1007) were slower; every config compiled without spills, on wgmma.
CONFIGS = (
    (128, 256, 128, 8, 3, 8), (128, 256, 128, 8, 4, 8), (256, 128, 128, 8, 3, 8), (256, 128, 128, 8, 4, 8),
    (128, 128, 128, 8, 4, 8), (128, 128, 128, 8, 5, 4),
    (64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 3, 4), (32, 128, 128, 8, 4, 4),
)


INTERPRETER_CONFIG = (32, 32, 32, 2, 1, 4)  # small tiles: the tests' odd sizes span several tiles and tails


@pkg.lazy_jit
def _int8_mm_ptr_kernel(A, B, C, SA, SB, BIAS, M, N, K, stride_am, stride_bn, stride_cm, stride_sb, M_BUCKET,
                        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # tile order: GROUP_M row blocks walked together down each column of tiles (their A rows stay in L2)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past M (N) re-read valid rows instead of being masked in the loop; their results are not stored
    a_rows = (offs_m % M).to(tl.int64)
    b_rows = (offs_n % N).to(tl.int64)
    a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K], K contiguous
    b_ptrs = B + b_rows[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of W^T, K contiguous
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # epilogue: per-token x per-channel scale, bias, one rounding, one store
    m_ok = offs_m < M
    n_ok = offs_n < N
    sa = tl.load(SA + offs_m, mask=m_ok, other=0.0)
    sb = tl.load(SB + offs_n * stride_sb, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@pkg.lazy_jit
def _int8_mm_tma_kernel(a_desc, b_desc, C, SA, SB, BIAS, M, N, K, stride_cm, stride_sb, M_BUCKET,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * tiles_n
    # persistent: program p takes tiles p, p + NUM_SMS, ...; flatten lets the pipeliner overlap a tile's epilogue
    # with the next tile's first loads
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True):
        first_m = (tile // per_group) * GROUP_M
        rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % rows
        pid_n = (tile % per_group) // rows
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kt in range(k_tiles):
            a = a_desc.load([off_m, kt * BLOCK_K])  # [BLOCK_M, BLOCK_K]; out of bounds reads as 0
            b = b_desc.load([off_n, kt * BLOCK_K])  # [BLOCK_N, BLOCK_K] of W (K-major, as int8 wgmma wants)
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        sa = tl.load(SA + offs_m, mask=m_ok, other=0.0)
        sb = tl.load(SB + offs_n * stride_sb, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# --- host side --------------------------------------------------------------------------------------------------

@functools.cache
def _tensor_descriptor_cls():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # older triton
        return None
    return TensorDescriptor


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _m_bucket(m: int) -> int:
    return min(pkg.next_power_of_2(m), 4096)


def _prune(configs, named_args, **kwargs):
    """Small-M configs for M <= 64 tokens, the big ones otherwise. (The autotuner passes the positional arguments
    as ``named_args`` and the keyword ones, M_BUCKET among them, as ``kwargs``.)"""
    small = {**named_args, **kwargs}["M_BUCKET"] <= 64
    keep = [c for c in configs if (c.kwargs["BLOCK_M"] <= 64) == small]
    return keep or list(configs)


def _set_block_shapes(nargs):
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config being tried."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@functools.cache
def _autotuned(variant: str):
    import triton

    hook = _set_block_shapes if variant == "tma" else None
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_stages=s,
                             num_warps=w, pre_hook=hook) for bm, bn, bk, g, s, w in CONFIGS]
    jit = (_int8_mm_tma_kernel if variant == "tma" else _int8_mm_ptr_kernel).kernel
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune}
                           )(jit)


def pick_variant(xq: torch.Tensor, wq: torch.Tensor) -> str:
    if VARIANT is not None:
        return VARIANT
    if (xq.is_cuda and torch.cuda.get_device_capability(xq.device) >= (9, 0) and _tensor_descriptor_cls() is not None
            and xq.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0):
        return "tma"
    return "ptr"


def triton_problem(xq: torch.Tensor, wq: torch.Tensor) -> str | None:
    """None when the Triton kernel can take these operands, else why not (callers fall back)."""
    if not pkg.available():
        return "triton does not import (or LIGHTX2V_DISABLE_TRITON is set)"
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.dim() != 2 or wq.dim() != 2:
        return f"needs 2-D int8 operands, got {xq.dtype} {tuple(xq.shape)} and {wq.dtype} {tuple(wq.shape)}"
    if xq.shape[1] != wq.shape[1]:
        return f"K mismatch: xq {tuple(xq.shape)}, wq {tuple(wq.shape)}"
    if xq.shape[1] % 16:
        return f"K={xq.shape[1]} is not a multiple of 16"
    if xq.stride(1) != 1 or wq.stride(1) != 1 or xq.stride(0) % 16 or wq.stride(0) % 16:
        return "operands must be row-major with 16-byte aligned rows"
    if xq.shape[0] == 0 or wq.shape[0] == 0:
        return "empty"
    return None


def int8_matmul_torch(xq, sx, wq, sw, bias=None, out_dtype=torch.bfloat16):
    """The same math in PyTorch: ``torch._int_mm`` where it runs (CUDA, M > 16, K and N multiples of 8), else an
    exact float64 product of the integers; then the epilogue in float32, in the kernel's order."""
    m, k = xq.shape
    n = wq.shape[0]
    if xq.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0:
        acc = torch._int_mm(xq, wq.t()).float()
    else:
        acc = (xq.double() @ wq.double().t()).float()  # exact: |acc| < 2^53
    y = acc * sx.float().reshape(-1, 1) * sw.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_matmul(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                out: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """(xq [M, K] int8 * sx [M, 1]) @ (wq [N, K] int8 * sw [N, 1] or [1, N]).T + bias [N] -> [M, N] out_dtype.

    ``impl=None``: the Triton kernel on CUDA when :func:`triton_problem` finds nothing, else
    :func:`int8_matmul_torch`; "triton" / "torch" force one (a forced Triton call that cannot run raises).
    """
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"int8_matmul: out_dtype {out_dtype} not in {OUT_DTYPES}")
    problem = triton_problem(xq, wq)
    if impl == "torch" or pkg.select_impl(impl, "int8_matmul", (xq, wq), problem) == "torch":
        y = int8_matmul_torch(xq, sx, wq, sw, bias, out_dtype)
        return y if out is None else out.copy_(y)
    return launch(xq, sx, wq, sw, bias, out_dtype, out=out)


def launch(xq, sx, wq, sw, bias=None, out_dtype=torch.bfloat16, *, out=None, variant: str | None = None,
           config: tuple | None = None) -> torch.Tensor:
    """Run a kernel (no checks beyond shapes: see :func:`triton_problem`). ``variant``: "ptr" / "tma" (None: as
    :func:`pick_variant`); ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps) instead of the
    autotuner (tests, benchmark sweeps; the interpreter always runs one fixed config)."""
    m, k = xq.shape
    n = wq.shape[0]
    sa = sx.reshape(-1).float().contiguous()
    sb = sw.reshape(-1).float().contiguous()
    if sa.numel() != m or sb.numel() != n or (bias is not None and bias.numel() != n):
        raise ValueError(f"int8_matmul: scales / bias do not fit M={m}, N={n}: sx {tuple(sx.shape)}, "
                         f"sw {tuple(sw.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype not in OUT_DTYPES:
        raise ValueError(f"int8_matmul: out must be [{m}, {n}] with contiguous rows, got {tuple(out.shape)}")
    b = bias.contiguous() if bias is not None else sb  # dummy pointer when HAS_BIAS is off
    variant = variant or pick_variant(xq, wq)
    if variant not in VARIANTS:
        raise ValueError(f"int8_matmul: variant {variant!r} not in {VARIANTS}")
    if config is None and pkg.interpreting():
        config = INTERPRETER_CONFIG
    common = {"M_BUCKET": _m_bucket(m), "HAS_BIAS": bias is not None}
    fixed = {} if config is None else dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_stages", "num_warps"),
                                               config, strict=True))

    def tiles(meta):
        return triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"])

    def grid(meta):
        return (tiles(meta),)

    if variant == "ptr":
        args = (xq, wq, out, sa, sb, b, m, n, k, xq.stride(0), wq.stride(0), out.stride(0), 1)
        if config is None:  # every autotuned BLOCK_K divides K (Wan: K % 128 == 0), else the masked loop
            even = all(k % c[2] == 0 for c in CONFIGS)
            _autotuned("ptr")[grid](*args, EVEN_K=even, **common)
        else:
            _int8_mm_ptr_kernel.kernel[grid](*args, EVEN_K=k % config[2] == 0, **common, **fixed)
        return out
    desc = _tensor_descriptor_cls()
    if desc is None:
        raise RuntimeError("int8_matmul: variant 'tma' needs triton.tools.tensor_descriptor (triton >= 3.4)")
    bm, bn, bk = (config[:3] if config is not None else (64, 64, 64))  # the autotuner's pre-hook resets these
    a_desc = desc(xq, [m, k], [xq.stride(0), 1], [bm, bk])
    b_desc = desc(wq, [n, k], [wq.stride(0), 1], [bn, bk])
    sms = _num_sms(xq.device.index if xq.device.index is not None else torch.cuda.current_device()) \
        if xq.is_cuda else 4
    kernel = _int8_mm_tma_kernel.kernel if config is not None else _autotuned("tma")
    kernel[lambda meta: (min(sms, tiles(meta)),)](
        a_desc, b_desc, out, sa, sb, b, m, n, k, out.stride(0), 1, NUM_SMS=sms, **common, **fixed)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
