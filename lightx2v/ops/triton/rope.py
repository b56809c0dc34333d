"""Rotary embedding in place on [B, L, H, D], and the q/k RMSNorm fused with it.

Convention (the DiT's ``apply_rope``): channel pair (2i, 2i+1) of every head is rotated by angle i of its token,
``(x0, x1) -> (x0 * cos - x1 * sin, x0 * sin + x1 * cos)`` in float32; ``cos``/``sin`` are [L, D/2] float32, the
real and imaginary parts of ``rope_tables``' complex rotations (:func:`rope_cos_sin`).

Eager PyTorch for q (and k): rms_norm (upcast, square, mean, scale, downcast, weight), then rope (upcast, complex
multiply, downcast): ~8 passes over [B, L, C]; :func:`rms_norm_rope_` is one read and one write.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightx2v.ops import triton as pkg

tl = None  # triton.language, bound by lazy_jit on the first launch


def rope_cos_sin(rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex rotations [L, D/2] (``rope_tables``) -> (cos, sin), each [L, D/2] float32 contiguous."""
    return rot.real.float().contiguous(), rot.imag.float().contiguous()


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Out of place, exactly the DiT's ``apply_rope(x, rot)`` with ``rot = cos + i sin``."""
    rot = torch.complex(cos.float(), sin.float())
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, D/2]
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).to(x.dtype)


def rms_norm_rope_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    """Out of place, exactly the DiT's ``apply_rope(RMSNorm(x.flatten(2)).unflatten(-1, (H, D)), rot)``."""
    c = x.shape[-2] * x.shape[-1]
    y = F.rms_norm(x.flatten(-2), (c,), weight.to(x.dtype), eps).unflatten(-1, x.shape[-2:])
    return rope_torch(y, cos, sin)


@pkg.lazy_jit
def _rope_kernel(X, COS, SIN, L, sxb, sxl, scl, scp, ssl, ssp,
                 C: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b, l) row; axis 1: BLOCK channels (BLOCK / 2 pairs) of its H * D
    b = row // L
    l = row - b * L
    x_ptr = X + b * sxb + l * sxl
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    q = start // 2 + tl.arange(0, BLOCK // 2)  # pair index in the row
    p = q % HALF_D  # pair index in the head
    pmask = q < C // 2
    cs = tl.load(COS + l * scl + p * scp, mask=pmask, other=0.0).to(tl.float32)
    sn = tl.load(SIN + l * ssl + p * ssp, mask=pmask, other=0.0).to(tl.float32)
    y = tl.interleave(x0 * cs - x1 * sn, x0 * sn + x1 * cs)
    tl.store(x_ptr + cols, y.to(X.dtype.element_ty), mask=mask)


@pkg.lazy_jit
def _rms_norm_rope_kernel(X, W, COS, SIN, L, sxb, sxl, scl, scp, ssl, ssp, eps,
                          C: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one program per (b, l) row of H * D channels
    b = row // L
    l = row - b * L
    x_ptr = X + b * sxb + l * sxl
    cos_ptr = COS + l * scl
    sin_ptr = SIN + l * ssl
    cols = tl.arange(0, BLOCK)
    pairs = tl.arange(0, BLOCK // 2)
    if NUM_CHUNKS == 1:  # the whole row in registers
        mask = cols < C
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / C + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(x * rstd * w, (BLOCK // 2, 2)))
        p = pairs % HALF_D
        pmask = pairs < C // 2
        cs = tl.load(cos_ptr + p * scp, mask=pmask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + p * ssp, mask=pmask, other=0.0).to(tl.float32)
        y = tl.interleave(x0 * cs - x1 * sn, x0 * sn + x1 * cs)
        tl.store(x_ptr + cols, y.to(X.dtype.element_ty), mask=mask)
    else:  # long rows: sum of squares, then normalize + rotate chunk by chunk (the second walk reads from cache)
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
            x0, x1 = tl.split(tl.reshape(x * rstd * w, (BLOCK // 2, 2)))
            q = i * (BLOCK // 2) + pairs
            p = q % HALF_D
            pmask = q < C // 2
            cs = tl.load(cos_ptr + p * scp, mask=pmask, other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + p * ssp, mask=pmask, other=0.0).to(tl.float32)
            y = tl.interleave(x0 * cs - x1 * sn, x0 * sn + x1 * cs)
            tl.store(x_ptr + c, y.to(X.dtype.element_ty), mask=mask)


def _layout_problem(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    if x.dim() != 4:
        return f"x must be [B, L, H, D], got shape {tuple(x.shape)}"
    if x.dtype not in pkg.KERNEL_DTYPES:
        return f"x dtype {x.dtype} (kernel takes {pkg.KERNEL_DTYPES})"
    _, n, _, d = x.shape
    if d % 2:
        return f"head dim D={d} must be even"
    if cos.shape != (n, d // 2) or sin.shape != (n, d // 2):
        return f"cos and sin must be [L, D/2] = [{n}, {d // 2}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
    if not (cos.is_floating_point() and sin.is_floating_point()):
        return "cos and sin must be floating point (float32)"
    if x.stride(-1) != 1 or x.stride(-2) != d:
        return "each token's H * D channels of x must be contiguous"
    return None


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """Rotate x in place and return it. x: [B, L, H, D] (bf16/fp16/fp32, each token's H * D channels contiguous);
    cos, sin: [L, D/2] float32 (any strides)."""
    impl = pkg.select_impl(impl, "rope_", [x, cos, sin], _layout_problem(x, cos, sin))
    if impl == "torch":
        return x.copy_(rope_torch(x, cos, sin))
    if x.numel() == 0:
        return x
    B, L, H, D = x.shape
    C = H * D
    block = pkg.col_block(C)
    _rope_kernel[(B * L, -(-C // block))](
        x, cos, sin, L, x.stride(0), x.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        C=C, HALF_D=D // 2, BLOCK=block, num_warps=pkg.elementwise_num_warps(block))
    return x


def rms_norm_rope_(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, *,
                   impl: str | None = None) -> torch.Tensor:
    """q/k path in place, in one pass: RMS norm over each token's H * D channels (float32 statistics, ``* weight``),
    then :func:`rope_` per head. Returns x.

    x: [B, L, H, D] (bf16/fp16/fp32; e.g. ``q_linear(x).unflatten(-1, (H, D))``); weight: [H * D] in x's dtype or
    float32 (rounded to x's dtype, as the DiT's ``RMSNorm`` does); cos, sin: [L, D/2] float32.
    """
    problem = _layout_problem(x, cos, sin)
    if problem is None:
        c = x.shape[-2] * x.shape[-1]
        if weight.shape != (c,) or not weight.is_floating_point():
            problem = f"weight must be a float [H * D] = [{c}], got {tuple(weight.shape)} {weight.dtype}"
    impl = pkg.select_impl(impl, "rms_norm_rope_", [x, weight, cos, sin], problem)
    if impl == "torch":
        return x.copy_(rms_norm_rope_torch(x, weight, eps, cos, sin))
    if x.numel() == 0:
        return x
    B, L, H, D = x.shape
    C = H * D
    w = weight.to(x.dtype).contiguous()
    block, chunks = pkg.row_block(C)
    _rms_norm_rope_kernel[(B * L,)](
        x, w, cos, sin, L, x.stride(0), x.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        float(eps), C=C, HALF_D=D // 2, BLOCK=block, NUM_CHUNKS=chunks, num_warps=pkg.row_num_warps(block))
    return x
