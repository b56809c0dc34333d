"""RMS norm over the last dim with float32 statistics, times a weight, in one pass.

Matches ``torch.nn.functional.rms_norm(x, (C,), weight.to(x.dtype), eps)`` (the DiT's ``RMSNorm``) to within the
rounding of x's dtype: the kernel rounds once (``x * rstd * w`` in float32), PyTorch's composite rounds the
normalized x before the weight multiply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightx2v.ops import triton as pkg

tl = None  # triton.language, bound by lazy_jit on the first launch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fallback: exactly ``RMSNorm.forward``."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


@pkg.lazy_jit
def _rms_norm_kernel(X, W, OUT, sxr, sor, eps, C: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * sxr
    o_ptr = OUT + row * sor
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < C
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / C + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + cols, (x * rstd * w).to(OUT.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK + cols
            x = tl.load(x_ptr + c, mask=c < C, other=0.0).to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / C + eps)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK + cols
            mask = c < C
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_ptr + c, (x * rstd * w).to(OUT.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as a [R, C] view (None if its leading dims do not collapse)."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None,
             impl: str | None = None) -> torch.Tensor:
    """``F.rms_norm(x, (C,), weight.to(x.dtype), eps)`` over the last dim, float32 statistics.

    x: [..., C] (bf16/fp16/fp32, last dim contiguous); weight: [C] in x's dtype or float32 (rounded to x's dtype,
    as the DiT's ``RMSNorm`` does). ``out``: optional destination of x's shape and dtype.
    """
    c = x.shape[-1]
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"rms_norm: out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    x2 = _rows(x) if x.dim() >= 1 else None
    o2 = None if out is None else _rows(out)
    problem = None
    if x.dtype not in pkg.KERNEL_DTYPES:
        problem = f"x dtype {x.dtype} (kernel takes {pkg.KERNEL_DTYPES})"
    elif weight.shape != (c,) or not weight.is_floating_point():
        problem = f"weight must be a float [{c}], got {tuple(weight.shape)} {weight.dtype}"
    elif x2 is None or (out is not None and o2 is None):
        problem = "the leading dims of x (and out) must collapse into rows"
    elif x2.stride(-1) != 1 or (o2 is not None and o2.stride(-1) != 1):
        problem = "x and out need a contiguous last dim"
    tensors = [x, weight] + ([out] if out is not None else [])
    impl = pkg.select_impl(impl, "rms_norm", tensors, problem)
    if impl == "torch":
        r = rms_norm_torch(x, weight, eps)
        return r if out is None else out.copy_(r)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        o2 = out.view(-1, c)
    if x.numel() == 0:
        return out
    w = weight.to(x.dtype).contiguous()  # the DiT's RMSNorm rounds its weight to x's dtype; a no-op for bf16 weights
    block, chunks = pkg.row_block(c)
    _rms_norm_kernel[(x2.shape[0],)](x2, w, o2, x2.stride(0), o2.stride(0), float(eps),
                                     C=c, BLOCK=block, NUM_CHUNKS=chunks, num_warps=pkg.row_num_warps(block))
    return out
