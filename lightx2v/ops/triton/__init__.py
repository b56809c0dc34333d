"""Fused memory-bound kernels of the DiT block, written in Triton, each with a PyTorch fallback.

Each op has ONE public function that picks its implementation per call (``impl=None``): the Triton kernel when the
tensors are on CUDA, Triton imports and the layout is one the kernel handles (last dim contiguous), else the
PyTorch fallback, which is exactly the math ``lightx2v.models.wan.dit`` does in eager PyTorch. ``impl="triton"`` or
``impl="torch"`` forces one (tests, benchmarks); a forced Triton call on a layout it cannot handle raises.

    norm_modulate(x, shift, scale, eps)        (layer_norm_f32(x) * (1 + scale) + shift).to(x.dtype)
    gated_residual(x, y, gate)                 (x.float() + y.float() * gate).to(x.dtype);  gated_residual_: in place
    rms_norm(x, weight, eps)                   F.rms_norm(x, (C,), weight.to(x.dtype), eps)
    rope_(x, cos, sin)                         in place: pair (2i, 2i+1) rotated by angle i (float32 math)
    rms_norm_rope_(x, weight, eps, cos, sin)   in place: rms_norm over H*D, then rope_ per head (one pass)

The Wan VAE's row passes (bias + norm + SiLU, bias + residual add on channels-last rows) are in ``vae_rows``.

Triton is imported lazily (on the first kernel launch, or by :func:`available`), so importing this package costs
nothing on machines without it. ``LIGHTX2V_DISABLE_TRITON=1`` makes :func:`available` false (fallbacks only).
Under ``TRITON_INTERPRET=1`` (set before triton is imported) a forced ``impl="triton"`` runs the kernels on CPU
tensors through Triton's interpreter (tests).
"""

from __future__ import annotations

import functools
import os

import torch

from lightx2v.errors import UserError

IMPLS = ("triton", "torch")
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Row kernels (norms): a row of up to MAX_ROW_BLOCK channels is held in registers in one block (next power of two
# of C); longer rows are walked in chunks of ROW_CHUNK (two or three passes over the row, the later ones from cache).
MAX_ROW_BLOCK = 16384
ROW_CHUNK = 4096
# Elementwise kernels (residual, rope): tiles of at most MAX_COL_BLOCK channels of a row; the residual kernel takes
# RESIDUAL_TILE elements (several rows) a program, with RESIDUAL_WARPS warps. Module constants, read at each call:
# bench/bench_kernels.py --tune sweeps them.
MAX_COL_BLOCK = 1024
RESIDUAL_TILE = 4096
RESIDUAL_WARPS = 4
ROW_WARPS: int | None = None  # None: row_num_warps' heuristic
ELEMENTWISE_WARPS: int | None = None  # None: elementwise_num_warps' heuristic


@functools.cache
def available() -> bool:
    """Triton imports (and is not disabled by ``LIGHTX2V_DISABLE_TRITON=1``)."""
    if os.environ.get("LIGHTX2V_DISABLE_TRITON", "") not in ("", "0"):
        return False
    try:
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter is on (kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def select_impl(impl: str | None, op: str, tensors, layout_problem: str | None) -> str:
    """Resolve ``impl`` for one call.

    ``layout_problem``: None when the kernel can take these tensors, else why not (a forced Triton call raises it).
    """
    if layout_problem is None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        layout_problem = "the kernels record no gradients (inputs require grad; run under torch.no_grad())"
    if impl is None:
        x = tensors[0]
        if x.is_cuda and layout_problem is None and available():
            return "triton"
        return "torch"
    if impl not in IMPLS:
        raise UserError(f"{op}: impl={impl!r} is not one of {IMPLS} (or None for automatic)")
    if impl == "torch":
        return impl
    if not available():
        raise RuntimeError(f"{op}: impl='triton' but triton does not import here (or LIGHTX2V_DISABLE_TRITON is set)")
    if layout_problem is not None:
        raise ValueError(f"{op}: the Triton kernel cannot take these tensors: {layout_problem}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors on several devices {sorted(map(str, devices))}")
    if not tensors[0].is_cuda and not interpreting():
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {tensors[0].device}")
    return impl


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_block(c: int) -> tuple[int, int]:
    """(BLOCK, NUM_CHUNKS) for a row kernel over ``c`` channels: one block of next_power_of_2(c) when it is at most
    MAX_ROW_BLOCK, else chunks of ROW_CHUNK."""
    block = next_power_of_2(c)
    if block <= MAX_ROW_BLOCK:
        return block, 1
    return ROW_CHUNK, -(-c // ROW_CHUNK)


def col_block(c: int) -> int:
    """A power-of-two tile width for elementwise kernels: the largest one (<= MAX_COL_BLOCK, >= 128) dividing c,
    else next_power_of_2(c) capped at MAX_COL_BLOCK."""
    largest = MAX_COL_BLOCK
    block = largest
    while block > min(128, largest) and c % block:
        block //= 2
    return block if c % block == 0 else min(largest, next_power_of_2(c))


def elementwise_num_warps(block: int) -> int:
    """Warps for an elementwise program of ``block`` elements: 8 per thread (16 bytes of bf16), 1..8 warps."""
    if ELEMENTWISE_WARPS:
        return ELEMENTWISE_WARPS
    return max(1, min(8, block // 256))


def row_num_warps(block: int) -> int:
    """Warps for a program that holds ``block`` elements of a row (4..16)."""
    if ROW_WARPS:
        return ROW_WARPS
    return max(4, min(16, block // 512))


def per_sample_row(v: torch.Tensor, b: int, c: int) -> torch.Tensor | None:
    """A per-sample row vector ([B, 1, C], [1, 1, C] or [C]: shapes that broadcast against [B, L, C] the same way
    in PyTorch) as a [B, 1, C] view, else None."""
    if v.dim() not in (1, 3) or v.shape[-1] != c or (v.dim() == 3 and v.shape[1] != 1):
        return None
    try:
        return (v[None, None] if v.dim() == 1 else v).expand(b, 1, c)
    except RuntimeError:
        return None


class lazy_jit:
    """``@lazy_jit`` on a module-level Triton kernel: ``triton.jit`` is applied on the first launch.

    The kernel's module names ``tl`` (None until then); the first launch binds it to ``triton.language``. Write
    ``BLOCK: "tl.constexpr"`` (or use ``from __future__ import annotations``) so the annotation is not evaluated
    at import time.
    """

    def __init__(self, fn):
        self.fn = fn
        self._kernel = None
        functools.update_wrapper(self, fn)

    @property
    def kernel(self):
        if self._kernel is None:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language
            self._kernel = triton.jit(self.fn)
        return self._kernel

    def __getitem__(self, grid):
        return self.kernel[grid]


from lightx2v.ops.triton.norm_modulate import norm_modulate  # noqa: E402
from lightx2v.ops.triton.residual import gated_residual, gated_residual_  # noqa: E402
from lightx2v.ops.triton.rmsnorm import rms_norm  # noqa: E402
from lightx2v.ops.triton.rope import rms_norm_rope_, rope_, rope_cos_sin  # noqa: E402

__all__ = ["available", "interpreting", "norm_modulate", "gated_residual", "gated_residual_", "rms_norm", "rope_",
           "rms_norm_rope_", "rope_cos_sin", "IMPLS"]
