"""Which device and dtype a stage computes in (``device`` / ``dtype`` config keys)."""

from __future__ import annotations

import torch

from lightx2v.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA if present, else the CPU; bf16 on a GPU, float32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} was requested but no CUDA GPU is available; use device 'cpu'")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, DTYPES[dtype]
