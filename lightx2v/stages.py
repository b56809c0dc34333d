"""Typed messages between the three stages of a request: encode -> denoise -> decode.

They hold only tensors and plain values, so that a later version can send them between processes or machines
unchanged (each stage running as its own service).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextEmbeds:
    context: torch.Tensor               # [1, text_len, text_dim], zero past the prompt's tokens
    context_null: torch.Tensor | None   # the negative prompt's, same shape; None without CFG


@dataclass(frozen=True)
class ImageCond:
    """How the conditioning image(s) enter the DiT.

    ``mode="concat"`` (Wan2.1 I2V/FLF2V, Wan2.2 A14B I2V): ``latent_cond`` [1, 4 + z_dim, T, h, w] is the frame mask
    and the VAE latents of the conditioning frames, concatenated to the noise latents on channels.
    ``mode="first_frame"`` (Wan2.2 TI2V-5B): ``latent_cond`` [1, z_dim, 1, h, w] replaces the first latent frame,
    whose timestep is then 0.
    """

    clip_tokens: torch.Tensor | None  # [1, 257 (or 514), 1280] CLIP tokens (Wan2.1 only), else None
    latent_cond: torch.Tensor
    mode: str = "concat"


@dataclass(frozen=True)
class Latents:
    latents: torch.Tensor  # [1, z_dim, T, h, w] float32, normalised (what the DiT works in)


@dataclass(frozen=True)
class Frames:
    frames: torch.Tensor  # [F, H, W, 3] float32 in [0, 1], on the CPU
    fps: int
