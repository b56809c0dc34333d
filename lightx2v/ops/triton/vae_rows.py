"""Row passes of the Wan VAE's residual blocks on channels-last activations ([pixels, C] rows), with fallbacks.

    bias_norm_silu_rows(x, bias, gamma, scale, out)   out = silu(normalize(x + bias) * scale * gamma), row by row
    bias_residual_rows_(h, bias, s)                    h = (h + bias) + s, in place

The VAE's causal convolution input is ``silu(norm(h + b))`` of the previous conv's output ``h`` (PyTorch adds the
conv bias in a separate pass); the block's output is ``(h + b) + shortcut``. Each becomes one pass over the rows.
Rounding follows the unfused path: ``h + b`` is rounded to the activation dtype (as PyTorch's bias add does), the
norm is computed in float32 and rounded before SiLU. The Triton kernels run on CUDA tensors (or under
``TRITON_INTERPRET=1``); otherwise the PyTorch fallback computes the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightx2v.ops import triton as pkg

ROW_PASS_BLOCK = 4096  # elements per program (whole rows of C channels)

tl = None  # triton.language, bound by lazy_jit at the first launch


@pkg.lazy_jit
def _bias_norm_silu_kernel(X, BIAS, GAMMA, OUT, R, C, scale, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < R)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        x = (x + b[None, :]).to(X.dtype.element_ty).to(tl.float32)
    inv = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), 1e-12)  # F.normalize
    g = tl.load(GAMMA + cols, mask=cmask, other=0.0).to(tl.float32) * scale
    y = (x * inv[:, None] * g[None, :]).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (y / (1.0 + tl.exp(-y))).to(OUT.dtype.element_ty), mask=mask)


@pkg.lazy_jit
def _bias_residual_kernel(H, BIAS, S, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < R)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    h = (h + b[None, :]).to(H.dtype.element_ty).to(tl.float32)
    sc = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + offs, (h + sc).to(H.dtype.element_ty), mask=mask)


def row_blocks(c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): whole rows of c channels, about ROW_PASS_BLOCK elements per program."""
    block_c = max(16, 1 << (c - 1).bit_length())
    return max(1, ROW_PASS_BLOCK // block_c), block_c


def _use_triton(t: torch.Tensor) -> bool:
    return pkg.available() and (t.is_cuda or pkg.interpreting())


def bias_norm_silu_rows(x: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, scale: float,
                         out: torch.Tensor) -> None:
    """out[r] = silu(normalize(x[r] + bias) * scale * gamma) for rows x, out [R, C] (contiguous); gamma, bias [C]."""
    r, c = x.shape
    if _use_triton(x):
        block_r, block_c = row_blocks(c)
        _bias_norm_silu_kernel[(-(-r // block_r),)](x, x if bias is None else bias, gamma, out, r, c, scale,
                                                    HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c,
                                                    num_warps=8)
        return
    if bias is not None:
        x = x + bias
    y = F.normalize(x.float(), dim=1) * (gamma.float() * scale)
    out.copy_(F.silu(y.to(out.dtype)))


def bias_residual_rows_(h: torch.Tensor, bias: torch.Tensor, s: torch.Tensor) -> None:
    """h[r] = (h[r] + bias) + s[r] in place, for rows h, s [R, C] (contiguous); bias [C]."""
    r, c = h.shape
    if _use_triton(h):
        block_r, block_c = row_blocks(c)
        _bias_residual_kernel[(-(-r // block_r),)](h, bias, s, r, c, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
        return
    h.add_(bias).add_(s)
