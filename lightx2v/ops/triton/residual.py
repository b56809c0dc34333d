"""Gated residual update ``(x.float() + y.float() * gate).to(x.dtype)`` in one pass (optionally in place into x).

Eager PyTorch: upcast x, upcast y, multiply, add, downcast (five passes, three float32 temporaries of [B, L, C]);
the kernel reads x and y once and writes the result once.
"""

from __future__ import annotations

import torch

from lightx2v.ops import triton as pkg

tl = None  # triton.language, bound by lazy_jit on the first launch


def gated_residual_torch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The fallback: exactly ``WanBlock``'s ``(x.float() + y.float() * gate).to(x.dtype)``."""
    return (x.float() + y.float() * gate).to(x.dtype)


@pkg.lazy_jit
def _gated_residual_kernel(X, Y, G, OUT, R, L, sxb, sxl, syb, syl, sgb, sob, sol,
                           C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, l) row index
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = rows // L
    l = rows - b * L
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    c2 = cols[None, :]
    x = tl.load(X + (b * sxb + l * sxl)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + (b * syb + l * syl)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + (b * sgb)[:, None] + c2, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + (b * sob + l * sol)[:, None] + c2, (x + y * g).to(OUT.dtype.element_ty), mask=mask)


def _layout_problem(x, y, gate3, out) -> str | None:
    if x.dim() != 3:
        return f"x must be [B, L, C], got shape {tuple(x.shape)}"
    if x.dtype not in pkg.KERNEL_DTYPES or y.dtype not in pkg.KERNEL_DTYPES:
        return f"x dtype {x.dtype}, y dtype {y.dtype} (kernel takes {pkg.KERNEL_DTYPES})"
    if y.shape != x.shape:
        return f"y shape {tuple(y.shape)} != x shape {tuple(x.shape)}"
    if gate3 is None:
        return "gate must be [B, 1, C], [1, 1, C] or [C] (a per-sample row)"
    if not gate3.is_floating_point():
        return "gate must be floating point"
    if x.stride(-1) != 1 or y.stride(-1) != 1 or gate3.stride(-1) != 1 or out.stride(-1) != 1:
        return "x, y, gate and out need a contiguous last dim"
    return None


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, out: torch.Tensor | None = None,
                   impl: str | None = None) -> torch.Tensor:
    """``(x.float() + y.float() * gate).to(x.dtype)``.

    x: [B, L, C] (bf16/fp16/fp32); y: [B, L, C] of any float dtype; gate: [B, 1, C] float32 (any batch stride;
    [1, 1, C] broadcasts). ``out``: destination of x's shape and dtype (``out=x`` updates x in place).
    """
    b, c = (x.shape[0], x.shape[-1]) if x.dim() == 3 else (1, x.shape[-1])
    gate3 = pkg.per_sample_row(gate, b, c)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"gated_residual: out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    tensors = [x, y, gate] + ([out] if out is not None else [])
    problem = _layout_problem(x, y, gate3, out if out is not None else x)
    impl = pkg.select_impl(impl, "gated_residual", tensors, problem)
    if impl == "torch":
        r = gated_residual_torch(x, y, gate)
        return r if out is None else out.copy_(r)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    B, L, C = x.shape
    if x.numel() == 0:
        return out
    block_c = pkg.col_block(C)
    block_r = max(1, pkg.RESIDUAL_TILE // block_c)  # several rows a program
    grid = (-(-(B * L) // block_r), -(-C // block_c))
    _gated_residual_kernel[grid](
        x, y, gate3, out, B * L, L, x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate3.stride(0),
        out.stride(0), out.stride(1), C=C, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=pkg.RESIDUAL_WARPS)
    return out


def gated_residual_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """In place: ``x[...] = (x.float() + y.float() * gate).to(x.dtype)``; returns x."""
    return gated_residual(x, y, gate, out=x, impl=impl)
