"""FP8 (e4m3) operands for the FP8 attention backends (FlashAttention 3, cuDNN), in plain PyTorch.

One scale per (batch, head) (``per_head=True``, what FlashAttention 3's ``q/k/v_descale`` take) or one per tensor
(cuDNN's FP8 SDPA). Optional smoothing, both exact for softmax attention:

* K: ``k - mean_tokens(k)`` adds a per-row constant to the scores, which softmax ignores; it removes the
  per-channel offset DiT keys carry, so the e4m3 range is spent on what differs between keys.
* V: ``v - mean_tokens(v)``, added back to the output (``out + mean``; softmax rows sum to one).

The quantization reads the input a few times (mean, amax, scale + cast): about 2 ms for q, k and v at
[1, 32760, 40, 128] bf16 on a GPU with ~4 TB/s, next to ~20 ms of attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0


@dataclass
class Fp8Operand:
    """``x8``: [B, L, H, D] float8_e4m3fn with ``x ~= x8 * scale + mean``."""

    x8: torch.Tensor
    scale: torch.Tensor  # float32, [B, H] (per head) or [1] (per tensor): the "descale" the kernels take
    mean: torch.Tensor | None  # [B, 1, H, D] in x's dtype, or None without smoothing


def quantize_fp8(x: torch.Tensor, *, per_head: bool, smooth: bool) -> Fp8Operand:
    """x: [B, L, H, D] (fp16 / bf16 / fp32) -> e4m3 values and their scale(s), amax / 448 (all-zero: scale 1)."""
    if x.dim() != 4:
        raise ValueError(f"quantize_fp8 wants [B, L, H, D], got {tuple(x.shape)}")
    mean = None
    if smooth:
        mean = x.mean(dim=1, keepdim=True)  # [B, 1, H, D] (reduced-precision inputs accumulate in float32)
        x = x - mean
    dims = (1, 3) if per_head else (0, 1, 2, 3)
    amax = torch.linalg.vector_norm(x, float("inf"), dim=dims).float()  # [B, H] or []; a max is exact in x's dtype
    amax = amax.reshape(-1) if not per_head else amax
    ok = amax > 0
    scale = torch.where(ok, amax / E4M3_MAX, torch.ones_like(amax))
    inv = torch.where(ok, E4M3_MAX / amax.clamp_min(1e-30), torch.zeros_like(amax))
    inv = inv[:, None, :, None] if per_head else inv.reshape(1, 1, 1, 1)
    # scaled in x's dtype (bf16 keeps 8 mantissa bits, e4m3 3), clamped: a value rounded past 448 would be NaN
    y = (x * inv.to(x.dtype)).clamp_(-E4M3_MAX, E4M3_MAX)
    return Fp8Operand(y.to(torch.float8_e4m3fn), scale.contiguous(), mean)


def dequantize_fp8(op: Fp8Operand) -> torch.Tensor:
    """Back to float32 [B, L, H, D] (tests)."""
    s = op.scale[:, None, :, None] if op.scale.dim() == 2 else op.scale.reshape(1, 1, 1, 1)
    out = op.x8.float() * s
    return out if op.mean is None else out + op.mean.float()


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, per_head: bool = True,
                            smooth_k: bool = True, smooth_v: bool = False) -> torch.Tensor:
    """What an FP8 backend computes, in float32 (the kernels add their own rounding of P): attention over the
    dequantized e4m3 operands. [B, L, H, D] -> [B, Lq, H, D] float32."""
    qz = quantize_fp8(q, per_head=per_head, smooth=False)
    kz = quantize_fp8(k, per_head=per_head, smooth=smooth_k)
    vz = quantize_fp8(v, per_head=per_head, smooth=smooth_v)
    qd = dequantize_fp8(qz)
    kd = dequantize_fp8(Fp8Operand(kz.x8, kz.scale, None))  # smoothed keys: the mean is not added back
    vd = dequantize_fp8(Fp8Operand(vz.x8, vz.scale, None))
    out = torch.nn.functional.scaled_dot_product_attention(qd.transpose(1, 2), kd.transpose(1, 2),
                                                           vd.transpose(1, 2)).transpose(1, 2)
    return out if vz.mean is None else out + vz.mean.float()
