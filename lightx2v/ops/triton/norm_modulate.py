"""adaLN: LayerNorm (no affine, float32 statistics) then ``* (1 + scale) + shift``, cast to x's dtype; one pass.

Eager PyTorch does this as ~5 passes over [B, L, C] (upcast, layer_norm, mul, add, downcast); the kernel reads x
once and writes the output once (the per-sample shift/scale rows are C floats each, read from cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightx2v.ops import triton as pkg

tl = None  # triton.language, bound by lazy_jit on the first launch


def norm_modulate_torch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The fallback: exactly ``WanBlock``'s ``(layer_norm_f32(x, eps) * (1 + scale) + shift).to(x.dtype)``."""
    return (F.layer_norm(x.float(), (x.shape[-1],), None, None, eps) * (1 + scale) + shift).to(x.dtype)


@pkg.lazy_jit
def _norm_modulate_kernel(X, SHIFT, SCALE, OUT, L, sxb, sxl, sob, sol, ssb, scb, eps,
                          C: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one program per (b, l) row
    b = row // L
    l = row - b * L
    x_ptr = X + b * sxb + l * sxl
    o_ptr = OUT + b * sob + l * sol
    sh_ptr = SHIFT + b * ssb
    sc_ptr = SCALE + b * scb
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:  # the whole row in registers
        mask = cols < C
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / C + eps)
        scale = tl.load(sc_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(sh_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (d * rstd) * (1.0 + scale) + shift
        tl.store(o_ptr + cols, y.to(OUT.dtype.element_ty), mask=mask)
    else:  # long rows: mean, variance, output in three walks (the second and third read the row from cache)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK + cols
            acc += tl.load(x_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / C
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK + cols
            mask = c < C
            d = tl.where(mask, tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / C + eps)
        for i in range(NUM_CHUNKS):
            c = i * BLOCK + cols
            mask = c < C
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            scale = tl.load(sc_ptr + c, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(sh_ptr + c, mask=mask, other=0.0).to(tl.float32)
            y = ((x - mean) * rstd) * (1.0 + scale) + shift
            tl.store(o_ptr + c, y.to(OUT.dtype.element_ty), mask=mask)


def _layout_problem(x, shift3, scale3, out) -> str | None:
    if x.dim() != 3:
        return f"x must be [B, L, C], got shape {tuple(x.shape)}"
    if x.dtype not in pkg.KERNEL_DTYPES:
        return f"x dtype {x.dtype} (kernel takes {pkg.KERNEL_DTYPES})"
    if shift3 is None or scale3 is None:
        return "shift and scale must be [B, 1, C], [1, 1, C] or [C] (per-sample rows)"
    if any(t.stride(-1) != 1 for t in (x, shift3, scale3) + ((out,) if out is not None else ())):
        return "x, shift, scale and out need a contiguous last dim"
    if not (shift3.is_floating_point() and scale3.is_floating_point()):
        return "shift and scale must be floating point"
    return None


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, *,
                  out: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """``(layer_norm(x.float(), no affine, eps) * (1 + scale) + shift).to(x.dtype)``.

    x: [B, L, C] (bf16/fp16/fp32); shift, scale: [B, 1, C] float32 (a view with any batch stride, e.g. a chunk of
    the [B, 6, C] modulation; [1, 1, C] broadcasts). ``out``: optional [B, L, C] destination of x's dtype.
    """
    b, c = (x.shape[0], x.shape[-1]) if x.dim() == 3 else (1, x.shape[-1])
    shift3, scale3 = pkg.per_sample_row(shift, b, c), pkg.per_sample_row(scale, b, c)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"norm_modulate: out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    tensors = [x, shift, scale] + ([out] if out is not None else [])
    impl = pkg.select_impl(impl, "norm_modulate", tensors, _layout_problem(x, shift3, scale3, out))
    if impl == "torch":
        y = norm_modulate_torch(x, shift, scale, eps)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    B, L, C = x.shape
    if x.numel() == 0:
        return out
    block, chunks = pkg.row_block(C)
    _norm_modulate_kernel[(B * L,)](
        x, shift3, scale3, out, L, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        shift3.stride(0), scale3.stride(0), float(eps),
        C=C, BLOCK=block, NUM_CHUNKS=chunks, num_warps=pkg.row_num_warps(block))
    return out
