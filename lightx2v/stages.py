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
    clip_tokens: torch.Tensor  # [1, 257 (or 514), 1280] CLIP tokens of the conditioning image(s)
    latent_cond: torch.Tensor  # [1, 4 + z_dim, T, h, w]: frame mask + VAE latents of the conditioning frames


@dataclass(frozen=True)
class Latents:
    latents: torch.Tensor  # [1, z_dim, T, h, w] float32, normalised (what the DiT works in)


@dataclass(frozen=True)
class Frames:
    frames: torch.Tensor  # [F, H, W, 3] float32 in [0, 1], on the CPU
    fps: int
