"""The one attention entry point.

Models call :func:`get_attention_backend` once, at build time, and then call the returned backend with
``q, k, v`` laid out as ``[B, L, num_heads, head_dim]``; it returns ``[B, Lq, num_heads, head_dim]``.
Each backend declares what it supports, so a request for one that cannot run here fails when the model is
built, not in the middle of a generation.

Names: every attention name of LightX2V is known (:mod:`lightx2v.ops.attention.names`, the table). An exact
backend that cannot run here (not installed, wrong GPU, dtype) is replaced by the best exact backend that can,
with one warning naming both; an approximate or sparse one we do not implement, or that cannot run here, is a
:class:`UserError` naming it and what is available: never a silent switch to different math.

A backend with ``needs_grid`` (``radial_attn``) is called as ``attn(q, k, v, grid=TokenGrid(frames, height,
width))`` (self-attention over the video tokens); the others ignore ``grid``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from lightx2v.errors import UserError
from lightx2v.ops.attention import names as _names
from lightx2v.ops.attention.cudnn_fe import CudnnSdpa, cudnn_frontend_available
from lightx2v.ops.attention.flash import (flash_attn2_attention, flash_attn2_available, flash_attn3_attention,
                                          flash_attn3_available, flash_attn3_check, flash_attn3_fp8_attention,
                                          flash_attn4_attention, flash_attn4_available)
from lightx2v.ops.attention.names import APPROXIMATE, EXACT, NAME_TABLE, SPARSE, AttentionName
from lightx2v.ops.attention.radial import RadialAttention, RadialSettings, TokenGrid
from lightx2v.ops.attention.torch_sdpa import torch_sdpa_attention

log = logging.getLogger("lightx2v")

__all__ = ["AttentionBackend", "AttentionName", "NAME_TABLE", "RadialAttention", "RadialSettings", "TokenGrid",
           "accepted_names", "available_backends", "describe", "get_attention_backend", "register_backend",
           "validate_attention_name"]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[..., torch.Tensor]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    needs_cuda: bool = False
    # further requirements (packages, GPU generation, dtype limits of one provider): raises UserError when the
    # backend cannot run ``dtype`` / ``head_dim`` on ``device``
    requires: Callable[[torch.dtype, int, torch.device], None] | None = None
    min_capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0) for Hopper
    available: Callable[[], bool] | None = None  # whether the package it needs is installed
    missing_hint: str = ""
    kind: str = EXACT  # exact | approximate | sparse (names.KINDS)
    head_dim_multiple: int = 1
    needs_grid: bool = False  # called as fn(q, k, v, grid)

    def problem(self, dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
        """Why this backend cannot run ``dtype``/``head_dim`` on ``device`` (one sentence), or None."""
        if self.available is not None and not self.available():
            return f"attention backend {self.name!r} is not installed here{self.missing_hint}"
        if dtype not in self.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"attention backend {self.name!r} does not support dtype {dtype}; allowed: {allowed}"
        if head_dim > self.max_head_dim:
            return f"attention backend {self.name!r} supports head_dim <= {self.max_head_dim}, got {head_dim}"
        if head_dim % self.head_dim_multiple:
            return (f"attention backend {self.name!r} needs head_dim divisible by {self.head_dim_multiple}, "
                    f"got {head_dim}")
        if self.needs_cuda and device.type != "cuda":
            return f"attention backend {self.name!r} needs a CUDA GPU, but the model runs on {device}"
        if self.requires is not None:
            try:
                self.requires(dtype, head_dim, device)
            except UserError as e:
                return str(e)
        if self.min_capability is not None and device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap < self.min_capability:
                return (f"attention backend {self.name!r} needs compute capability >= "
                        f"{self.min_capability[0]}.{self.min_capability[1]}, this GPU has {cap[0]}.{cap[1]}")
        return None

    def check(self, dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
        """Raise UserError (with :meth:`problem`'s sentence) unless the backend can run here."""
        reason = self.problem(dtype, head_dim, torch.device(device))
        if reason is not None:
            raise UserError(reason)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid | None = None
                 ) -> torch.Tensor:
        if self.needs_grid:
            if grid is None:
                raise ValueError(f"attention backend {self.name!r} needs the token grid: call attn(q, k, v, grid=...)")
            return self.fn(q, k, v, grid)
        return self.fn(q, k, v)


def _sage_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from lightx2v.ops.attention.sage import sage_attention  # on first use: triton is optional and slow to import

    return sage_attention(q, k, v)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _sage_attn_requires(dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
    from lightx2v.ops.attention.sage import check_sage_available

    check_sage_available(device)  # triton importable, an NVIDIA GPU with FP8 tensor cores


def _radial_requires(dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:  # pragma: no cover - torch < 2.5
        raise UserError("attention backend 'radial_attn' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if device.type == "cuda" and head_dim < 16:
        raise UserError(f"attention backend 'radial_attn' (flex_attention on CUDA) needs head_dim >= 16, got {head_dim}")


def _cudnn_fp8_requires(dtype: torch.dtype, head_dim: int, device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        raise UserError("attention backend 'cudnn_sdpa_fp8' needs an FP8 SDPA GPU (Hopper, sm_90, or newer)")


_HALF = (torch.float16, torch.bfloat16)
_ALL = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS: dict[str, AttentionBackend] = {
    "torch_sdpa": AttentionBackend("torch_sdpa", torch_sdpa_attention, _ALL, max_head_dim=512),
    "flash_attn2": AttentionBackend("flash_attn2", flash_attn2_attention, _HALF, max_head_dim=256, needs_cuda=True,
                                    min_capability=(8, 0), available=flash_attn2_available,
                                    missing_hint=" (pip install flash-attn)", head_dim_multiple=8),
    "flash_attn3": AttentionBackend("flash_attn3", flash_attn3_attention, _HALF, max_head_dim=256, needs_cuda=True,
                                    min_capability=(9, 0), available=flash_attn3_available,
                                    requires=flash_attn3_check, head_dim_multiple=8,
                                    missing_hint=" (FlashAttention 3: flash_attn_interface, or the fa3-fwd wheel)"),
    "flash_attn4": AttentionBackend("flash_attn4", flash_attn4_attention, _HALF, max_head_dim=256, needs_cuda=True,
                                    min_capability=(8, 0), available=flash_attn4_available, head_dim_multiple=8,
                                    missing_hint=" (pip install flash-attn-4 nvidia-cutlass-dsl[cu13])"),
    "cudnn_sdpa": AttentionBackend("cudnn_sdpa", CudnnSdpa(fp8=False), _HALF, max_head_dim=256, needs_cuda=True,
                                   min_capability=(8, 0), available=cudnn_frontend_available, head_dim_multiple=8,
                                   missing_hint=" (pip install nvidia-cudnn-frontend)"),
    # our INT8 Q.K^T + FP8 P.V Triton kernel (lightx2v/ops/attention/sage.py): NVIDIA sm_89+, needs triton
    "sage_attn": AttentionBackend("sage_attn", _sage_attn, _HALF, max_head_dim=128, needs_cuda=True,
                                  available=_triton_installed, missing_hint=" (it needs triton: pip install triton)",
                                  requires=_sage_attn_requires, kind=APPROXIMATE),
    "flash_attn3_fp8": AttentionBackend("flash_attn3_fp8", flash_attn3_fp8_attention, _HALF, max_head_dim=256,
                                        needs_cuda=True, min_capability=(9, 0), available=flash_attn3_available,
                                        head_dim_multiple=8, kind=APPROXIMATE,
                                        missing_hint=" (FlashAttention 3: flash_attn_interface, or the fa3-fwd wheel)"),
    # cuDNN's FP8 SDPA with a bf16/fp16 output runs on Blackwell only (cuDNN 9.19 declines it on an H200, sm_90)
    "cudnn_sdpa_fp8": AttentionBackend("cudnn_sdpa_fp8", CudnnSdpa(fp8=True), _HALF, max_head_dim=256,
                                       needs_cuda=True, min_capability=(10, 0), available=cudnn_frontend_available,
                                       requires=_cudnn_fp8_requires, head_dim_multiple=16, kind=APPROXIMATE,
                                       missing_hint=" (pip install nvidia-cudnn-frontend)"),
    # Radial Attention's block mask through flex_attention (lightx2v/ops/attention/radial.py); needs the token grid
    "radial_attn": AttentionBackend("radial_attn", RadialAttention(), _ALL, max_head_dim=256, requires=_radial_requires,
                                    kind=SPARSE, needs_grid=True),
}

_WARNED: set[tuple[str, str]] = set()  # (asked, used) pairs already warned about in this process


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """The registered backends (installed or not); :func:`accepted_names` adds every name a config may carry."""
    return sorted(_BACKENDS)


def accepted_names() -> list[str]:
    """Registered backends plus LightX2V's names we run or (exact ones) replace."""
    return sorted(set(_BACKENDS) | set(_names.accepted_names()))


def describe(name: str) -> AttentionName | None:
    """The table's entry for ``name`` (a LightX2V name or one of ours), or None."""
    entry = _names.lookup(name)
    if entry is None and name in _BACKENDS:
        b = _BACKENDS[name]
        entry = AttentionName(name, b.kind, name, "registered backend", "ours")
    return entry


def validate_attention_name(name: str) -> AttentionName:
    """Config-time check (no device needed): the name is known and is something we run or (exact) replace.
    Raises UserError otherwise."""
    entry = describe(name)
    if entry is None:
        raise UserError(f"{name!r} is not an available attention backend (not one of lightx2v's or LightX2V's "
                        f"names); available: {', '.join(accepted_names())}")
    if entry.kind != EXACT and entry.ours is None:
        what = {"parallel": "sequence parallelism"}.get(entry.kind, f"{entry.kind} attention")
        raise UserError(f"attention backend {name!r} ({entry.what}; {what}) is not implemented in lightx2v, and "
                        f"another kernel would change the results; available: {', '.join(accepted_names())}")
    return entry


def _fallback(asked: str, reason: str, dtype: torch.dtype, head_dim: int, device: torch.device) -> AttentionBackend:
    problems = [reason]
    for name in _names.EXACT_FALLBACK_ORDER:
        if name == asked or name not in _BACKENDS:
            continue
        backend = _BACKENDS[name]
        why = backend.problem(dtype, head_dim, device)
        if why is not None:
            problems.append(why)
            continue
        if (asked, name) not in _WARNED:
            _WARNED.add((asked, name))
            log.warning("attention backend %r cannot run here (%s); using %r instead: exact attention too, the same "
                        "math", asked, reason, name)
        return backend
    raise UserError(f"no exact attention backend can run {dtype} head_dim={head_dim} on {device}: "
                    + "; ".join(problems))


def get_attention_backend(name: str, *, dtype: torch.dtype, head_dim: int, device: torch.device,
                          allow_fallback: bool = True) -> AttentionBackend:
    """Resolve ``name`` to a backend that can run ``dtype``/``head_dim`` on ``device`` (or raise UserError).

    ``name``: ours or any of LightX2V's (``sage_attn2`` is our ``sage_attn``). An exact backend that cannot run here
    falls back to the best exact one that can, with one warning per (asked, used) pair and process
    (``allow_fallback=False``: raise instead). Approximate and sparse backends never fall back."""
    device = torch.device(device)
    entry = validate_attention_name(name)
    if entry.kind != EXACT:
        backend = _BACKENDS[entry.ours]
        backend.check(dtype, head_dim, device)  # no fallback: different math
        return backend
    if entry.ours is None:  # an exact kernel of another platform or model
        reason = f"{entry.what} is not part of lightx2v"
    else:
        backend = _BACKENDS[entry.ours]
        reason = backend.problem(dtype, head_dim, device)
        if reason is None:
            return backend
    if not allow_fallback:
        raise UserError(reason if entry.ours is not None else f"attention backend {name!r}: {reason}")
    return _fallback(name, reason, dtype, head_dim, device)
