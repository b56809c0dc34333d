"""The Wan2.1 3D causal VAE: video [B, 3, 1+4k, H, W] <-> latents [B, 16, 1+k, H/8, W/8].

Numerics follow diffusers' ``AutoencoderKLWan`` (itself a port of Wan2.1's ``wan/modules/vae.py``); parameter names
follow the ORIGINAL Wan release, so ``Wan2.1_VAE.pth`` loads with ``strict=True``. A declared rename table maps them
to and from diffusers' names.

Time is processed in chunks, exactly as the reference does it:

* encoder: the first frame alone, then chunks of 4 frames (each chunk gives 1 latent frame, the first frame 1 too);
* decoder: one latent frame at a time (the first gives 1 video frame, every later one 4).

A causal convolution with a temporal kernel of 3 needs the last 2 input frames of the previous chunk; those are
kept in an explicit :class:`CausalCache` that lives for one ``encode``/``decode`` call only (the modules keep no
state between calls).

Large frames can be processed in overlapping spatial tiles (:class:`TilingConfig`, LightX2V's ``use_tiling_vae``):
each tile runs the whole causal time loop with its own cache, and the tiles are blended linearly across their
overlaps exactly as diffusers' ``AutoencoderKLWan.tiled_encode``/``tiled_decode`` blend them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import CheckpointError, UserError

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN_VAE_FILE",
    "WanVAEConfig",
    "CausalCache",
    "TilingConfig",
    "WanVAE",
    "vae_rename_table",
    "vae_state_dict_to_diffusers",
    "vae_state_dict_from_diffusers",
    "load_wan_vae",
    "save_wan_vae",
]

WAN_VAE_FILE = "Wan2.1_VAE.pth"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

# Per-channel statistics of the Wan2.1 latents (from the Wan2.1 release; the same values are diffusers' defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

ENCODER_CHUNK = 4  # video frames per encoder chunk after the first frame (as in the reference)
CACHE_T = 2  # history frames a causal conv with temporal kernel 3 needs


# --- config ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the Wan2.1 VAE; the defaults are Wan2.1's (the field names are diffusers', typo included)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        # Normalise lists (from JSON) to tuples so that the config stays hashable and comparable.
        set_ = object.__setattr__
        set_(self, "base_dim", int(self.base_dim))
        set_(self, "z_dim", int(self.z_dim))
        set_(self, "num_res_blocks", int(self.num_res_blocks))
        set_(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        set_(self, "attn_scales", tuple(float(s) for s in self.attn_scales))
        set_(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        set_(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        set_(self, "latents_std", tuple(float(v) for v in self.latents_std))

        problems = []
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            problems.append(f"base_dim={self.base_dim}, z_dim={self.z_dim}, num_res_blocks={self.num_res_blocks} "
                            "must all be >= 1")
        if not self.dim_mult or min(self.dim_mult) < 1:
            problems.append(f"dim_mult={list(self.dim_mult)} must be a non-empty list of integers >= 1")
        elif any(self.base_dim * m % 2 for m in self.dim_mult[1:]):
            problems.append(f"base_dim * dim_mult[1:] must be even (the decoder's upsamplers halve the channels), "
                            f"got base_dim={self.base_dim}, dim_mult={list(self.dim_mult)}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            problems.append(f"temperal_downsample={list(self.temperal_downsample)} must have len(dim_mult) - 1 = "
                            f"{len(self.dim_mult) - 1} entries")
        if sum(self.temperal_downsample) > 2:
            problems.append(f"temperal_downsample={list(self.temperal_downsample)}: at most 2 temporal downsamplings "
                            f"fit the reference's chunks of {ENCODER_CHUNK} frames")
        if self.attn_scales:
            problems.append(f"attn_scales={list(self.attn_scales)} is not supported: Wan2.1 has none, and the "
                            "original and diffusers' decoders disagree about where such attention blocks go")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            problems.append(f"latents_mean and latents_std must have z_dim={self.z_dim} values, got "
                            f"{len(self.latents_mean)} and {len(self.latents_std)}")
        if any(s <= 0 for s in self.latents_std):
            problems.append(f"latents_std must be > 0, got {list(self.latents_std)}")
        if problems:
            raise UserError("invalid Wan VAE config: " + "; ".join(problems))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first one (4 for Wan2.1)."""
        return 2 ** sum(self.temperal_downsample)

    # diffusers ``vae/config.json`` keys that must hold one value (the key: what it is checked against)
    _DIFFUSERS_FIXED: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None}
    )
    # keys that only matter for training
    _DIFFUSERS_IGNORED: ClassVar[tuple[str, ...]] = ("dropout",)

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> WanVAEConfig:
        """Read a diffusers ``vae/config.json`` dict; raise UserError naming every key we do not understand."""
        names = {f.name for f in fields(cls)}
        kwargs, bad = {}, []
        for key, value in d.items():
            if key.startswith("_") or key in cls._DIFFUSERS_IGNORED:
                continue  # _class_name, _diffusers_version, _name_or_path; dropout
            if key in names:
                kwargs[key] = value
            elif key in cls._DIFFUSERS_FIXED:
                if value != cls._DIFFUSERS_FIXED[key]:
                    bad.append(f"{key}={value!r} (only {cls._DIFFUSERS_FIXED[key]!r} is supported)")
            elif key not in ("decoder_base_dim", "scale_factor_temporal", "scale_factor_spatial"):
                bad.append(f"{key}={value!r} (unknown key)")
        if bad:
            raise UserError("unsupported Wan VAE config (diffusers AutoencoderKLWan): " + ", ".join(bad))
        try:
            cfg = cls(**kwargs)
        except UserError:
            raise
        except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
            raise UserError(f"invalid Wan VAE config {dict(kwargs)}: {e}") from e
        # Derived keys: they must agree with the architecture when present.
        derived = {"decoder_base_dim": cfg.base_dim, "scale_factor_temporal": cfg.temporal_factor,
                   "scale_factor_spatial": cfg.spatial_factor}
        bad = [f"{k}={d[k]!r} (must be {v} or null)" for k, v in derived.items() if d.get(k) not in (None, v)]
        if bad:
            raise UserError("unsupported Wan VAE config (diffusers AutoencoderKLWan): " + ", ".join(bad))
        return cfg

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> WanVAEConfig:
        """Infer the architecture from tensors with the original Wan names (a ``Wan2.1_VAE.pth`` carries no config).

        The latent statistics cannot be inferred: they are Wan2.1's, so z_dim must be 16. Raises CheckpointError
        if the tensors do not describe a Wan2.1-style VAE.
        """
        try:
            base_dim = sd["encoder.conv1.weight"].shape[0]
            z_dim = sd["conv2.weight"].shape[0]
            # encoder.downsamples: per level num_res_blocks residual blocks, then a resampler (none after the last)
            levels: list[list[int]] = [[]]  # output channels of each level's residual blocks
            temporal: list[bool] = []
            n, prefix = 0, "encoder.downsamples.0."
            while prefix + "residual.0.gamma" in sd or prefix + "resample.1.weight" in sd:
                if prefix + "resample.1.weight" in sd:
                    temporal.append(prefix + "time_conv.weight" in sd)
                    levels.append([])
                else:
                    levels[-1].append(sd[prefix + "residual.6.weight"].shape[0])
                n += 1
                prefix = f"encoder.downsamples.{n}."
            blocks = {len(level) for level in levels}
            if len(blocks) != 1 or not levels[0] or any(len(set(level)) != 1 for level in levels):
                raise ValueError("the encoder's levels differ in size")
            dim_mult = tuple(level[0] // base_dim for level in levels)
        except (KeyError, ValueError, AttributeError, IndexError) as e:
            raise CheckpointError(f"cannot infer the VAE architecture from the checkpoint's tensors ({e})") from e
        if z_dim != len(WAN21_LATENTS_MEAN):
            raise CheckpointError(f"the checkpoint has z_dim={z_dim}: its latent statistics are unknown, pass a "
                                  "WanVAEConfig with latents_mean and latents_std")
        return cls(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=blocks.pop(),
                   temperal_downsample=tuple(temporal))

    def to_diffusers_config(self) -> dict[str, Any]:
        """A ``vae/config.json`` dict that diffusers' AutoencoderKLWan accepts."""
        return {
            "_class_name": "AutoencoderKLWan",
            "base_dim": self.base_dim,
            "decoder_base_dim": None,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_scales": list(self.attn_scales),
            "temperal_downsample": list(self.temperal_downsample),
            "dropout": 0.0,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
            **self._DIFFUSERS_FIXED,
            "scale_factor_temporal": self.temporal_factor,
            "scale_factor_spatial": self.spatial_factor,
        }


# --- spatial tiling -------------------------------------------------------------------------------------------------

TILE_MULTIPLE = 8  # tile sizes and strides are in pixels and must be whole latent pixels (Wan2.1: 8 px per latent px)


@dataclass(frozen=True)
class TilingConfig:
    """Spatial tiling of VAE encode/decode (LightX2V's ``use_tiling_vae``); the defaults are diffusers'.

    All four values are in video pixels and must be positive multiples of 8 (a latent tile is 1/8 of them); a stride
    must not exceed its tile size. Tiles start every ``stride`` pixels, are ``tile`` pixels tall/wide (smaller at the
    bottom/right edge) and overlap their upper/left neighbours by ``tile - stride`` pixels, over which the two are
    blended linearly. A video (or latent) no larger than one tile in both dimensions is processed untiled.
    """

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % TILE_MULTIPLE:
                problems.append(f"{f.name}={v!r} must be a positive multiple of {TILE_MULTIPLE} (pixels)")
        if not problems:
            for dim in ("height", "width"):
                tile = getattr(self, f"tile_sample_min_{dim}")
                stride = getattr(self, f"tile_sample_stride_{dim}")
                if stride > tile:
                    problems.append(f"tile_sample_stride_{dim}={stride} must be <= tile_sample_min_{dim}={tile} "
                                    "(tiles would leave gaps)")
        if problems:
            raise UserError("invalid VAE tiling: " + "; ".join(problems))

    @property
    def tile(self) -> tuple[int, int]:
        """(height, width) of a tile in pixels."""
        return self.tile_sample_min_height, self.tile_sample_min_width

    @property
    def stride(self) -> tuple[int, int]:
        """(height, width) distance between tile starts in pixels."""
        return self.tile_sample_stride_height, self.tile_sample_stride_width


def _blend_edge_(tile: torch.Tensor, prev: torch.Tensor, extent: int, dim: int) -> None:
    """Blend the first rows (dim=-2) or columns (dim=-1) of ``tile`` with the last ones of its neighbour, in place.

    diffusers' ``blend_v``/``blend_h``: with e = min(extent, both sizes along dim), position y < e becomes
    prev[-e + y] * (1 - y/e) + tile[y] * (y/e). ``prev`` may be just the neighbour's trailing strip (>= e long).
    Computed in float32 and written back in the tile's dtype. tile, prev: [B, C, T, h, w].
    """
    e = min(extent, tile.shape[dim], prev.shape[dim])
    if e <= 0:
        return
    w = torch.arange(e, device=tile.device, dtype=torch.float32) / e  # y / e
    w = w.view(-1, 1) if dim == -2 else w  # broadcast along rows or columns
    head = tile.narrow(dim, 0, e)
    tail = prev.narrow(dim, prev.shape[dim] - e, e)
    head.copy_(tail.float() * (1 - w) + head.float() * w)


def _run_tiled(
    x: torch.Tensor,
    process: Callable[[torch.Tensor], torch.Tensor],
    tile_in: tuple[int, int],
    stride_in: tuple[int, int],
    stride_out: tuple[int, int],
    blend_out: tuple[int, int],
    size_out: tuple[int, int],
) -> torch.Tensor:
    """Run ``process`` over overlapping spatial tiles of ``x`` [B, C, T, H, W] and stitch its outputs.

    Tile (i, j) is ``x[..., i*sh : i*sh + th, j*sw : j*sw + tw]`` (input units); ``process`` maps it to a fresh
    [B, C', T', h', w'] tensor in output units. Tiles are handled in row-major order, each exactly as diffusers'
    ``tiled_encode``/``tiled_decode`` treat it: its top rows are blended with the (already blended) tile above, its
    left columns with the (already blended) tile to its left, then its top-left ``stride_out`` crop is written into
    the preallocated output [B, C', T', *size_out].

    Alive between tiles besides the output: the bottom ``blend_out[0]`` rows of every tile of the previous row and
    the right ``blend_out[1]`` columns of the previous tile; each tile itself is freed before the next is processed.
    """
    (th, tw), (sh, sw), (soh, sow), (bh, bw) = tile_in, stride_in, stride_out, blend_out
    height, width = x.shape[-2:]
    out = None
    above: list[torch.Tensor | None] = []  # per column: the bottom strip of the tile above
    for i, y0 in enumerate(range(0, height, sh)):
        row: list[torch.Tensor | None] = []
        left = None  # the right strip of the tile to the left
        for j, x0 in enumerate(range(0, width, sw)):
            tile = process(x[..., y0 : y0 + th, x0 : x0 + tw])  # [B, C', T', h', w']
            if i > 0 and above[j] is not None:
                _blend_edge_(tile, above[j], bh, dim=-2)
            if j > 0 and left is not None:
                _blend_edge_(tile, left, bw, dim=-1)
            if out is None:
                out = tile.new_empty(*tile.shape[:3], *size_out)
            crop = tile[..., :soh, :sow]  # only the last row/column can be smaller than the stride
            out[..., i * soh : i * soh + crop.shape[-2], j * sow : j * sow + crop.shape[-1]] = crop
            h_t, w_t = tile.shape[-2:]
            row.append(tile[..., h_t - min(bh, h_t) :, :].clone() if bh else None)
            left = tile[..., w_t - min(bw, w_t) :].clone() if bw else None
            del tile, crop
        above = row
    assert out is not None
    return out


# --- causal cache -----------------------------------------------------------------------------------------------------


class CausalCache:
    """What the cached layers remember from the previous chunk, for one chunked encode or decode call.

    Every chunk visits the cached layers in the same order; the k-th one visited owns ``slots[k]``:

    * ``None`` before the layer has seen its first chunk;
    * for a causal conv with temporal kernel 3: its last 2 input frames ``[B, C, <=2, H, W]`` (1 frame after a
      single-frame first chunk; a zero frame stands for "no history" where the first chunk skipped the conv);
    * for a temporal downsampler: its last input frame ``[B, C, 1, H, W]``.
    """

    __slots__ = ("slots", "_cursor")

    def __init__(self) -> None:
        self.slots: list[torch.Tensor | None] = []
        self._cursor = 0

    def reset(self) -> None:
        """Forget everything (a new video)."""
        self.slots.clear()
        self._cursor = 0

    def start_chunk(self) -> None:
        """Call before each chunk: the layers will be visited from the first slot again."""
        if self._cursor != len(self.slots):
            raise RuntimeError(f"causal cache: the last chunk visited {self._cursor} of {len(self.slots)} slots")
        self._cursor = 0

    def next_slot(self) -> int:
        """Index of the slot of the next cached layer (created empty on the first chunk)."""
        i = self._cursor
        self._cursor += 1
        if i == len(self.slots):
            self.slots.append(None)
        return i


# --- building blocks --------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: ``2 * padding_t`` frames of history in front (zeros or cached), none behind.

    Spatial padding is the conv's own zero padding. x: [B, Cin, T, H, W] -> [B, Cout, T', H', W'].
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def step(self, x: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk with the history ``past`` ([B, Cin, <=2, H, W] or None): returns (output, new history)."""
        # New history: the last 2 input frames; a single-frame chunk takes its other frame from the old history.
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T and past is not None:
            keep = torch.cat([past[:, :, -1:], keep], dim=2)
        else:
            keep = keep.clone()  # not a view: do not keep the whole chunk alive
        pad_t = self.time_pad
        if past is not None:
            x = torch.cat([past, x], dim=2)
            pad_t -= past.shape[2]
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        return super().forward(x), keep

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if cache is None or self.time_pad == 0:  # whole sequence, or no temporal extent (1x1x1 shortcut)
            if self.time_pad:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
            return super().forward(x)
        slot = cache.next_slot()
        y, cache.slots[slot] = self.step(x, cache.slots[slot])
        return y


class RMSNorm(nn.Module):
    """x / ||x||_2 (over channels, dim 1) * sqrt(C) * gamma, computed in float32 and cast back.

    gamma: [C, 1, 1, 1] for video [B, C, T, H, W] (``spatial_dims=3``), [C, 1, 1] for frames [N, C, H, W].
    """

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()
        return y.to(x.dtype)


class ResidualBlock(nn.Module):
    """RMSNorm, SiLU, CausalConv3d(3), RMSNorm, SiLU, (Dropout), CausalConv3d(3), plus a 1x1x1 shortcut if Cin != Cout.

    The Sequential's indices are the original Wan names: residual.0 / .3 norms, residual.2 / .6 convs.
    x: [B, Cin, T, H, W] -> [B, Cout, T, H, W].
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin, 3), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout, 3), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)
        h = conv2(F.silu(norm2(h)), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W pixels of each frame (no attention across time).

    x: [B, C, T, H, W] -> same shape.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [BT, C, H, W]
        qkv = self.to_qkv(self.norm(frames))  # [BT, 3C, H, W]: q, k, v along channels
        # pixels as tokens, channels last: [BT, 1 head, HW, 3C], split into q, k, v of [BT, 1, HW, C] each
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).reshape(b, t, c, h, w).transpose(1, 2)  # [B, C, T, H, W]
        return x + out


class Resample(nn.Module):
    """2x spatial up/downsampling per frame, optionally 2x in time (``*3d``), with the reference's chunk rules.

    * downsample2d/3d: pad right/bottom by 1, Conv2d(3, stride 2). 3d then runs a temporal conv (kernel 3,
      stride 2) over [last frame of previous chunk, this chunk]; the first chunk (1 frame) passes unchanged.
      [B, C, T, H, W] -> [B, C, T or T/2, H/2, W/2].
    * upsample2d/3d: nearest 2x, Conv2d(3) to C/2 channels. 3d first runs a causal temporal conv to 2C channels
      whose halves are the even and odd output frames; the first chunk (the first latent frame) skips it.
      [B, C, T, H, W] -> [B, C/2, T or 2T, 2H, 2W].
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            slot = cache.next_slot()
            past = cache.slots[slot]
            if past is None:  # first chunk: no temporal upsampling; later chunks start from zero history
                cache.slots[slot] = x.new_zeros(b, c, 1, h, w)
            else:
                x, cache.slots[slot] = self.time_conv.step(x, past)  # [B, 2C, T, H, W]
                # channel half s holds output frame 2t + s: [B, 2, C, T, H, W] -> [B, C, T, 2, H, W] -> [B, C, 2T, H, W]
                x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
                t = 2 * t

        frames = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # [BT, C', H', W']
        x = frames.reshape(b, t, *frames.shape[1:]).transpose(1, 2)  # [B, C', T, H', W']

        if self.mode == "downsample3d":
            slot = cache.next_slot()
            past = cache.slots[slot]
            cache.slots[slot] = x[:, :, -1:].clone()
            if past is not None:  # [B, C, 1 + T, H', W'] -> [B, C, T/2, H', W']
                x = self.time_conv(torch.cat([past, x], dim=2))
        return x


class Encoder3d(nn.Module):
    """[B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8] (mean and log-variance), one chunk at a time."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        c = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        self.head = nn.Sequential(RMSNorm(c, 3), nn.SiLU(), CausalConv3d(c, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


class Decoder3d(nn.Module):
    """[B, z_dim, T, h, w] -> [B, 3, T', 8h, 8w], one chunk at a time."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous level's upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        c = dims[-1]
        self.head = nn.Sequential(RMSNorm(c, 3), nn.SiLU(), CausalConv3d(c, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


# --- the VAE ----------------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """The Wan2.1 VAE with the original release's parameter names (``encoder.*``, ``conv1.*``, ``conv2.*``,
    ``decoder.*``). Inputs are cast to the parameters' dtype; outputs come in that dtype."""

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else WanVAEConfig()
        self.config = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # diffusers: quant_conv
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # diffusers: post_quant_conv
        self.decoder = Decoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as float32 [1, z_dim, 1, 1, 1], as diffusers' pipelines compute them."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, inv_std

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise UserError(f"latents must be [B, {self.config.z_dim}, T, h, w], got {list(z.shape)}")

    def _tile_geometry(self, tiling: TilingConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        """(tile, stride) in latent pixels, checking that the pixel values are whole latent pixels."""
        sf = self.config.spatial_factor
        bad = [v for v in (*tiling.tile, *tiling.stride) if v % sf]
        if bad:
            raise UserError(f"VAE tiling {tiling}: tile sizes and strides must be multiples of the VAE's spatial "
                            f"factor {sf}")
        (th, tw), (sh, sw) = tiling.tile, tiling.stride
        return (th // sf, tw // sf), (sh // sf, sw // sf)

    def _encode_mu(self, x: torch.Tensor) -> torch.Tensor:
        """The causal time loop of the encoder: x [B, 3, 1+4k, H, W] (VAE dtype) -> mu [B, z_dim, T, H/8, W/8]."""
        cache = CausalCache()
        out = []
        for chunk in (x[:, :, :1], *x[:, :, 1:].split(ENCODER_CHUNK, dim=2)):  # 1 frame, then 4 at a time
            cache.start_chunk()
            out.append(self.encoder(chunk, cache))  # [B, 2z, 1 (or 4/temporal_factor), H/8, W/8]
        h_all = torch.cat(out, dim=2)  # [B, 2z, T, H/8, W/8]
        del out, cache
        # conv1 is 1x1x1 and output channels are independent: compute only the mean's half.
        z = self.config.z_dim
        return F.conv3d(h_all, self.conv1.weight[:z], self.conv1.bias[:z])

    def _decode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """The causal time loop of the decoder: x [B, z_dim, T, h, w] (after conv2) -> [B, 3, 1+4(T-1), 8h, 8w],
        not clamped. Each chunk's frames are written into one preallocated tensor (no list + cat)."""
        cache = CausalCache()
        out = None
        t = 0
        for frame in x.split(1, dim=2):  # one latent frame at a time: [B, z, 1, h, w]
            cache.start_chunk()
            y = self.decoder(frame, cache)  # [B, 3, 1 (first) or temporal_factor, 8h, 8w]
            if out is None:
                frames = y.shape[2] + (x.shape[2] - 1) * self.config.temporal_factor
                out = y.new_empty(*y.shape[:2], frames, *y.shape[3:])
            out[:, :, t : t + y.shape[2]] = y
            t += y.shape[2]
            del y
        assert out is not None and t == out.shape[2]
        return out

    @torch.no_grad()
    def encode_raw(self, video: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> latent mean mu [B, z_dim, 1+k', H/8, W/8] (not normalised).

        k' = 4k / temporal_factor (k for Wan2.1). Equals diffusers' ``encode(video).latent_dist.mode()``, and with
        ``tiling`` diffusers' output after ``enable_tiling(**asdict(tiling))``: if H or W exceeds the tile, the video
        is encoded in overlapping tiles (see :class:`TilingConfig`), one at a time.
        """
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != 3:
            raise UserError(f"video must be [B, 3, F, H, W], got {list(video.shape)}")
        _, _, f, h, w = video.shape
        if (f - 1) % ENCODER_CHUNK or h % cfg.spatial_factor or w % cfg.spatial_factor:
            raise UserError(f"video of {f} frames of {h}x{w}: need 1 + {ENCODER_CHUNK}k frames and H, W divisible "
                            f"by {cfg.spatial_factor}")
        x = video.to(self.dtype)
        if tiling is None:
            return self._encode_mu(x)
        (th, tw), (sh, sw) = self._tile_geometry(tiling)  # latent pixels
        if h <= tiling.tile_sample_min_height and w <= tiling.tile_sample_min_width:
            return self._encode_mu(x)
        sf = cfg.spatial_factor
        # Input in pixels, output in latent pixels.
        return _run_tiled(x, self._encode_mu, tile_in=tiling.tile, stride_in=tiling.stride, stride_out=(sh, sw),
                          blend_out=(th - sh, tw - sw), size_out=(h // sf, w // sf))

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """latents [B, z_dim, T, h, w] (not normalised) -> video [B, 3, 1+4(T-1), 8h, 8w] clamped to [-1, 1].

        Equals diffusers' ``decode(z).sample``, and with ``tiling`` diffusers' output after
        ``enable_tiling(**asdict(tiling))``: if h or w exceeds the latent tile (tile / 8), the latents are decoded in
        overlapping tiles, one at a time, each through the whole time loop with its own cache. Memory then holds
        the weights, the input, the preallocated output, the bottom (tile - stride) pixel rows of the previous row of
        tiles, and the one tile being decoded (its frames, its cache and one chunk's activations), whatever the frame
        size: 81 frames at 720x1280 in bf16 with the default tiles peaked at 1.5 GiB allocated on an H100 (10.4 GiB
        untiled; random weights). The blend runs in float32 on the overlap strips only.
        """
        self._check_latents(z)
        z = z.to(self.dtype)
        _, _, _, h, w = z.shape
        if tiling is None:
            return self._decode_frames(self.conv2(z)).clamp_(-1.0, 1.0)
        (th, tw), (sh, sw) = self._tile_geometry(tiling)  # latent pixels
        if h <= th and w <= tw:
            return self._decode_frames(self.conv2(z)).clamp_(-1.0, 1.0)
        sf = self.config.spatial_factor
        (ph, pw), (psh, psw) = tiling.tile, tiling.stride  # pixels
        out = _run_tiled(z, lambda t: self._decode_frames(self.conv2(t)), tile_in=(th, tw), stride_in=(sh, sw),
                         stride_out=(psh, psw), blend_out=(ph - psh, pw - psw), size_out=(h * sf, w * sf))
        return out.clamp_(-1.0, 1.0)

    def encode(self, video: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents (mu - mean) / std, [B, z_dim, 1+k, H/8, W/8].

        ``tiling``: encode in overlapping spatial tiles (see :meth:`encode_raw`)."""
        mu = self.encode_raw(video, tiling)
        mean, inv_std = self._latent_stats(mu.device)
        return ((mu.float() - mean) * inv_std).to(mu.dtype)

    def decode(self, z: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """normalised latents [B, z_dim, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1].

        ``tiling``: decode in overlapping spatial tiles, to bound memory (see :meth:`decode_raw`)."""
        self._check_latents(z)
        mean, inv_std = self._latent_stats(z.device)
        return self.decode_raw((z.float() / inv_std + mean).to(self.dtype), tiling)


# --- rename table: original Wan <-> diffusers -------------------------------------------------------------------------

# Parameter names inside one module: (original Wan, diffusers).
_CONV = (("weight", "weight"), ("bias", "bias"))
_NORM = (("gamma", "gamma"),)
_RESBLOCK = (
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.weight", "conv1.weight"),
    ("residual.2.bias", "conv1.bias"),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.weight", "conv2.weight"),
    ("residual.6.bias", "conv2.bias"),
    ("shortcut.weight", "conv_shortcut.weight"),  # only where in_dim != out_dim
    ("shortcut.bias", "conv_shortcut.bias"),
)
_ATTENTION = (("norm.gamma", "norm.gamma"), ("to_qkv.weight", "to_qkv.weight"), ("to_qkv.bias", "to_qkv.bias"),
              ("proj.weight", "proj.weight"), ("proj.bias", "proj.bias"))
_RESAMPLE = (("resample.1.weight", "resample.1.weight"), ("resample.1.bias", "resample.1.bias"),
             ("time_conv.weight", "time_conv.weight"), ("time_conv.bias", "time_conv.bias"))  # time_conv: 3d only


def _module_renames(cfg: WanVAEConfig) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """One row per module: (original Wan prefix, diffusers prefix, parameter names), generated from the config."""
    rows = []
    for side in ("encoder", "decoder"):
        rows += [
            (f"{side}.conv1.", f"{side}.conv_in.", _CONV),
            (f"{side}.middle.0.", f"{side}.mid_block.resnets.0.", _RESBLOCK),
            (f"{side}.middle.1.", f"{side}.mid_block.attentions.0.", _ATTENTION),
            (f"{side}.middle.2.", f"{side}.mid_block.resnets.1.", _RESBLOCK),
            (f"{side}.head.0.", f"{side}.norm_out.", _NORM),
            (f"{side}.head.2.", f"{side}.conv_out.", _CONV),
        ]
    rows += [("conv1.", "quant_conv.", _CONV), ("conv2.", "post_quant_conv.", _CONV)]

    levels = len(cfg.dim_mult)
    # Encoder: one flat list in both layouts (per level: num_res_blocks residual blocks, then a downsampler).
    n = 0
    for level in range(levels):
        for _ in range(cfg.num_res_blocks):
            rows.append((f"encoder.downsamples.{n}.", f"encoder.down_blocks.{n}.", _RESBLOCK))
            n += 1
        if level != levels - 1:
            rows.append((f"encoder.downsamples.{n}.", f"encoder.down_blocks.{n}.", _RESAMPLE))
            n += 1
    # Decoder: a flat list in Wan, per-level blocks in diffusers (num_res_blocks + 1 resnets, then an upsampler).
    n = 0
    for level in range(levels):
        for r in range(cfg.num_res_blocks + 1):
            rows.append((f"decoder.upsamples.{n}.", f"decoder.up_blocks.{level}.resnets.{r}.", _RESBLOCK))
            n += 1
        if level != levels - 1:
            rows.append((f"decoder.upsamples.{n}.", f"decoder.up_blocks.{level}.upsamplers.0.", _RESAMPLE))
            n += 1
    return rows


def vae_rename_table(cfg: WanVAEConfig) -> dict[str, str]:
    """Every parameter name the config can have: original Wan key -> diffusers key (a bijection)."""
    table = {wan + a: dif + b for wan, dif, leaves in _module_renames(cfg) for a, b in leaves}
    assert len(set(table.values())) == len(table), "rename table is not one-to-one"
    return table


def _rename(sd: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    unknown = sorted(k for k in sd if k not in table)
    if unknown:
        raise CheckpointError(f"{len(unknown)} unknown {what} VAE key(s): {', '.join(unknown)}")
    return {table[k]: v for k, v in sd.items()}


def vae_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: WanVAEConfig) -> dict[str, torch.Tensor]:
    """Original Wan names -> diffusers' AutoencoderKLWan names; CheckpointError lists keys the table lacks."""
    return _rename(sd, vae_rename_table(cfg), "original-Wan")


def vae_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: WanVAEConfig) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKLWan names -> original Wan names; CheckpointError lists keys the table lacks."""
    inverse = {dif: wan for wan, dif in vae_rename_table(cfg).items()}
    return _rename(sd, inverse, "diffusers")


# --- loading and saving -----------------------------------------------------------------------------------------------


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    return path


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers ``vae/`` folder, single-file or sharded (with the ``.index.json``)."""
    from lightx2v.models.wan.checkpoint import read_safetensors_dir

    return read_safetensors_dir(folder, "VAE", stem=DIFFUSERS_WEIGHTS.removesuffix(".safetensors"))


def _check_and_assign(vae: WanVAE, sd: Mapping[str, Any], source: Path, device, dtype: torch.dtype) -> WanVAE:
    expected = {k: v.shape for k, v in vae.state_dict().items()}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    mismatched = []
    for k in sorted(expected.keys() & sd.keys()):
        v = sd[k]
        if not isinstance(v, torch.Tensor) or v.shape != expected[k]:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            mismatched.append(f"{k} (checkpoint {got}, model {tuple(expected[k])})")
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(keys)}" for label, keys in (
            ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
        raise CheckpointError(f"VAE checkpoint {source} does not fit {vae.config}: " + "; ".join(parts))
    tensors = {k: sd[k].to(device=device, dtype=dtype) for k in expected}
    result = vae.load_state_dict(tensors, strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return vae.eval().requires_grad_(False)


def load_wan_vae(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: WanVAEConfig | None = None,
) -> WanVAE:
    """Load the VAE from ``Wan2.1_VAE.pth`` (original names; without ``config`` the architecture is inferred from the
    tensors and the latent statistics are Wan2.1's; a folder holding that file, such as the original Wan model
    folder, works too) or from a diffusers ``vae/`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, possibly sharded; ``config``, if given, must equal the folder's).
    Raises CheckpointError naming missing files, and every missing, unexpected or mis-shaped tensor."""
    path = Path(path)
    if path.is_dir() and (path / WAN_VAE_FILE).is_file():
        path = path / WAN_VAE_FILE
    if path.is_dir():
        from lightx2v.models.wan.checkpoint import read_json

        cfg = WanVAEConfig.from_diffusers_config(read_json(path / DIFFUSERS_CONFIG, "VAE config"))
        if config is not None and config != cfg:
            raise UserError(f"config {config} differs from {path / DIFFUSERS_CONFIG}: {cfg}")
        sd = vae_state_dict_from_diffusers(_read_diffusers_weights(path), cfg)
    else:
        _require(path, "VAE checkpoint")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # not a torch zip file, or holds objects other than tensors
            raise CheckpointError(f"cannot read VAE checkpoint {path}: {e}") from e
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"VAE checkpoint {path} holds a {type(sd).__name__}, not a state dict")
        if config is not None:
            cfg = config
        else:
            try:
                cfg = WanVAEConfig.from_state_dict(sd)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from e
    with torch.device("meta"):
        vae = WanVAE(cfg)
    return _check_and_assign(vae, sd, path, device, dtype)


def save_wan_vae(vae: WanVAE, path: str | Path, layout: str = "wan") -> Path:
    """Write ``vae`` in the original layout (``layout="wan"``: torch.save of the state dict to ``path``, or to
    ``path/Wan2.1_VAE.pth`` if ``path`` is a folder) or as a diffusers ``vae/`` folder (``layout="diffusers"``:
    ``config.json`` + ``diffusion_pytorch_model.safetensors``). Returns the file or folder written."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    path = Path(path)
    if layout == "wan":
        if path.is_dir():
            path = path / WAN_VAE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path)
        return path
    if layout == "diffusers":
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        (path / DIFFUSERS_CONFIG).write_text(json.dumps(vae.config.to_diffusers_config(), indent=2) + "\n")
        save_file(vae_state_dict_to_diffusers(sd, vae.config), path / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
        return path
    raise UserError(f"layout must be 'wan' or 'diffusers', got {layout!r}")

