"""FlashAttention 2 / 3 / 4 backends, used only when their packages happen to be installed (nothing is compiled at
install time for our own fast path).

* FlashAttention 2: ``flash_attn`` (``flash_attn.flash_attn_interface``).
* FlashAttention 3: ``flash_attn_interface`` (upstream's ``hopper/`` build) or ``fa3_fwd_interface`` (the
  ``fa3-fwd`` wheel: the same forward kernels, prebuilt for CUDA 13 against torch's stable ABI; built without
  fp16, so bf16 and fp8 only).
* FlashAttention 4: ``flash_attn.cute`` (the ``flash-attn-4`` wheel, CuTe DSL kernels compiled at first use;
  needs ``nvidia-cutlass-dsl``). Hopper and newer are its targets; its FP8 path is Blackwell (sm_100) only.

All take and return ``[B, L, H, D]`` (their native layout), no mask, softmax scale 1/sqrt(D).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from lightx2v.errors import UserError


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


# --- FlashAttention 2 --------------------------------------------------------------------------------------------

def flash_attn2_available() -> bool:
    # not just "flash_attn": the flash-attn-4 wheel installs flash_attn/cute without FlashAttention 2
    return _has_module("flash_attn.flash_attn_interface")


def flash_attn2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D] (flash_attn's native layout)."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


# --- FlashAttention 3 --------------------------------------------------------------------------------------------

FA3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")  # preferred first


def flash_attn3_provider() -> str | None:
    """The module that provides FlashAttention 3 here, or None."""
    return next((m for m in FA3_MODULES if _has_module(m)), None)


def flash_attn3_available() -> bool:
    return flash_attn3_provider() is not None


def flash_attn3_check(dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
    provider = flash_attn3_provider()
    if provider == "fa3_fwd_interface" and dtype == torch.float16:
        raise UserError("attention backend 'flash_attn3' is provided here by the fa3-fwd wheel, which is built "
                        "without fp16 kernels; use bf16, or torch_sdpa for fp16")


def _fa3_func():
    return importlib.import_module(flash_attn3_provider() or FA3_MODULES[0]).flash_attn_func


def flash_attn3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = _fa3_func()(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def flash_attn3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, smooth_k: bool = True,
                              smooth_v: bool = False) -> torch.Tensor:
    """FlashAttention 3 on e4m3 operands with one scale per (batch, head) (``q/k/v_descale``), K smoothed
    (exact for softmax). Output in q's dtype (the kernel writes bf16)."""
    from lightx2v.ops.attention.fp8 import quantize_fp8

    qz = quantize_fp8(q, per_head=True, smooth=False)
    kz = quantize_fp8(k, per_head=True, smooth=smooth_k)
    vz = quantize_fp8(v, per_head=True, smooth=smooth_v)
    out = flash_attn3_fp8_quantized(qz.x8, kz.x8, vz.x8, qz.scale, kz.scale, vz.scale)
    if vz.mean is not None:
        out = out + vz.mean.to(out.dtype)
    return out.to(q.dtype)


def flash_attn3_fp8_quantized(q8, k8, v8, q_descale, k_descale, v_descale) -> torch.Tensor:
    """The kernel alone on e4m3 [B, L, H, D] operands with float32 [B, H] descales -> bf16 [B, Lq, H, D]."""
    out = _fa3_func()(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    return out[0] if isinstance(out, tuple) else out


# --- FlashAttention 4 --------------------------------------------------------------------------------------------

def flash_attn4_available() -> bool:
    return _has_module("flash_attn.cute") and _has_module("cutlass")


def flash_attn4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 4 (CuTe DSL); the first call for a shape compiles its kernel (seconds)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out
