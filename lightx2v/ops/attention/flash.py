"""FlashAttention 2 / 3 backends, used only when the ``flash_attn`` / ``flash_attn_interface`` packages happen to be
installed (nothing is compiled at install time for our fast path)."""

from __future__ import annotations

import importlib.util

import torch


def flash_attn2_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn3_available() -> bool:
    return importlib.util.find_spec("flash_attn_interface") is not None


def flash_attn2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D] (flash_attn's native layout)."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def flash_attn3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out
