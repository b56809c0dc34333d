"""The one attention entry point.

Models call :func:`get_attention_backend` once, at build time, and then call the returned backend with
``q, k, v`` laid out as ``[B, L, num_heads, head_dim]``; it returns ``[B, Lq, num_heads, head_dim]``.
Each backend declares what it supports, so a request for one that cannot run here fails when the model is
built, not in the middle of a generation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from lightx2v.errors import UserError
from lightx2v.ops.attention.flash import (flash_attn2_attention, flash_attn2_available, flash_attn3_attention,
                                          flash_attn3_available)
from lightx2v.ops.attention.torch_sdpa import torch_sdpa_attention


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    needs_cuda: bool = False
    # further requirements (packages, GPU generation): raises UserError when the backend cannot run on `device`
    requires: Callable[[torch.device], None] | None = None
    min_capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0) for Hopper
    available: Callable[[], bool] | None = None  # whether the package it needs is installed
    missing_hint: str = ""

    def check(self, dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
        if self.available is not None and not self.available():
            raise UserError(f"attention backend {self.name!r} is not installed here{self.missing_hint}; "
                            "use torch_sdpa (no extra packages) instead")
        if dtype not in self.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            raise UserError(f"attention backend {self.name!r} does not support dtype {dtype}; allowed: {allowed}")
        if head_dim > self.max_head_dim:
            raise UserError(f"attention backend {self.name!r} supports head_dim <= {self.max_head_dim}, got {head_dim}")
        if self.needs_cuda and device.type != "cuda":
            raise UserError(f"attention backend {self.name!r} needs a CUDA GPU, but the model runs on {device}")
        if self.requires is not None:
            self.requires(device)
        if self.min_capability is not None and device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap < self.min_capability:
                raise UserError(f"attention backend {self.name!r} needs compute capability >= "
                                f"{self.min_capability[0]}.{self.min_capability[1]}, this GPU has {cap[0]}.{cap[1]}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(q, k, v)


def _sage_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from lightx2v.ops.attention.sage import sage_attention  # on first use: triton is optional and slow to import

    return sage_attention(q, k, v)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _sage_attn_requires(device: torch.device) -> None:
    from lightx2v.ops.attention.sage import check_sage_available

    check_sage_available(device)  # triton importable, an NVIDIA GPU with FP8 tensor cores


_HALF = (torch.float16, torch.bfloat16)
_BACKENDS: dict[str, AttentionBackend] = {
    "torch_sdpa": AttentionBackend(
        "torch_sdpa", torch_sdpa_attention, (torch.float32, torch.float16, torch.bfloat16), max_head_dim=512
    ),
    "flash_attn2": AttentionBackend("flash_attn2", flash_attn2_attention, _HALF, max_head_dim=256, needs_cuda=True,
                                    min_capability=(8, 0), available=flash_attn2_available,
                                    missing_hint=" (pip install flash-attn)"),
    "flash_attn3": AttentionBackend("flash_attn3", flash_attn3_attention, _HALF, max_head_dim=256, needs_cuda=True,
                                    min_capability=(9, 0), available=flash_attn3_available,
                                    missing_hint=" (FlashAttention 3's flash_attn_interface, Hopper only)"),
    # our INT8 Q.K^T + FP8 P.V Triton kernel (lightx2v/ops/attention/sage.py): NVIDIA sm_89+, needs triton
    "sage_attn": AttentionBackend("sage_attn", _sage_attn, _HALF, max_head_dim=128, needs_cuda=True,
                                  available=_triton_installed, missing_hint=" (it needs triton: pip install triton)",
                                  requires=_sage_attn_requires),
}


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_backend(name: str, *, dtype: torch.dtype, head_dim: int, device: torch.device) -> AttentionBackend:
    """Resolve ``name`` to a backend that can run ``dtype``/``head_dim`` on ``device`` (or raise UserError)."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise UserError(f"unknown attention backend {name!r}; available: {', '.join(available_backends())}")
    backend.check(dtype, head_dim, torch.device(device))
    return backend
