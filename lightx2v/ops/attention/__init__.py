"""The one attention entry point.

Models call :func:`get_attention_backend` once, at build time, and then call the returned backend with
``q, k, v`` laid out as ``[B, L, num_heads, head_dim]``; it returns ``[B, Lq, num_heads, head_dim]``.
Each backend declares what it supports, so a request for one that cannot run here fails when the model is
built, not in the middle of a generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lightx2v.errors import UserError
from lightx2v.ops.attention.torch_sdpa import torch_sdpa_attention


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    needs_cuda: bool = False

    def check(self, dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
        if dtype not in self.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            raise UserError(f"attention backend {self.name!r} does not support dtype {dtype}; allowed: {allowed}")
        if head_dim > self.max_head_dim:
            raise UserError(f"attention backend {self.name!r} supports head_dim <= {self.max_head_dim}, got {head_dim}")
        if self.needs_cuda and device.type != "cuda":
            raise UserError(f"attention backend {self.name!r} needs a CUDA GPU, but the model runs on {device}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(q, k, v)


_BACKENDS: dict[str, AttentionBackend] = {
    "torch_sdpa": AttentionBackend(
        "torch_sdpa", torch_sdpa_attention, (torch.float32, torch.float16, torch.bfloat16), max_head_dim=512
    ),
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_backend(name: str, *, dtype: torch.dtype, head_dim: int, device: torch.device) -> AttentionBackend:
    """Resolve ``name`` to a backend that can run ``dtype``/``head_dim`` on ``device`` (or raise UserError)."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise UserError(f"unknown attention backend {name!r}; available: {', '.join(available_backends())}")
    backend.check(dtype, head_dim, torch.device(device))
    return backend
