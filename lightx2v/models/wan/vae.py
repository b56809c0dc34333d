"""The Wan 3D causal VAEs: video [B, 3, 1+4k, H, W] <-> latents [B, z, 1+k, H/s, W/s].

* Wan2.1 (and Wan2.2 A14B): z = 16 latent channels, s = 8.
* Wan2.2 TI2V-5B (``Wan2.2_VAE.pth``): z = 48, s = 16: 2x2 pixel patches are folded into channels in front of an 8x
  encoder and unfolded after the decoder (``patch_size=2``), and each encoder/decoder level is a residual block
  whose shortcut is parameter-free: a channel-grouped average of the space(-time) cells going down, a channel
  repeat into them going up (``is_residual=True``; diffusers' ``AvgDown3D`` / ``DupUp3D``).

Numerics follow diffusers' ``AutoencoderKLWan`` (a port of Wan's ``wan/modules/vae.py`` and ``vae2_2.py``); parameter
names follow the ORIGINAL Wan releases, so ``Wan2.1_VAE.pth`` and ``Wan2.2_VAE.pth`` load with ``strict=True``. A
declared rename table maps them to and from diffusers' names.

Time is processed in chunks, exactly as the reference does it:

* encoder: the first frame alone, then chunks of 4 frames (each chunk gives 1 latent frame, the first frame 1 too);
* decoder: one latent frame at a time (the first gives 1 video frame, every later one 4).

A causal convolution with a temporal kernel of 3 needs the last 2 input frames of the previous chunk; those are
kept in an explicit :class:`CausalCache` that lives for one ``encode``/``decode`` call only (the modules keep no
state between calls).

Large frames can be processed in overlapping spatial tiles (:class:`TilingConfig`, LightX2V's ``use_tiling_vae``):
each tile runs the whole causal time loop with its own cache, and the tiles are blended linearly across their
overlaps exactly as diffusers' ``AutoencoderKLWan.tiled_encode``/``tiled_decode`` blend them.

On CUDA (see the module constants below): activations and convolution weights are kept channels-last
(``channels_last_3d``: cuDNN's fast 3D convolutions); in each residual block, bias + RMSNorm + SiLU is one Triton pass
written straight into the causal conv's input buffer (no norm temporaries, no ``cat`` with the cached frames), and
bias + residual add another; cuDNN autotuning is on for the duration of an encode/decode only. On the CPU the plain
PyTorch path runs: the same math, diffusers' rounding. Measured on an H100 (bench/bench_vae.py, random weights, bf16):
decoding 81 frames at 480x832 takes 0.40x the time of diffusers' bf16 decode (0.84 s vs 2.07 s), 121 frames at
704x1280 with the Wan2.2 VAE 0.56x (3.5 s vs 6.2 s).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import CheckpointError, UserError
from lightx2v.loading import (key_problems, read_json, read_safetensors_dir, rename_state_dict, require_file,
                              torch_load_state_dict)
from lightx2v.models.wan.checkpoint import WAN22_VAE_FILE, WAN_VAE_FILE
from lightx2v.ops.triton.vae_rows import bias_norm_silu_rows as _bias_norm_silu_rows
from lightx2v.ops.triton.vae_rows import bias_residual_rows_ as _bias_residual_rows_

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WAN_VAE_FILE",
    "WAN22_VAE_FILE",
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
# ...and of the 48 Wan2.2 (TI2V-5B) latent channels (``Wan2_2_VAE`` in the Wan2.2 release; the same values are in
# Wan-AI/Wan2.2-TI2V-5B-Diffusers' vae/config.json).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
# The statistics a checkpoint without a config gets, by its number of latent channels.
_KNOWN_LATENT_STATS = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}

ENCODER_CHUNK = 4  # video frames per encoder chunk after the first frame (as in the reference)
CACHE_T = 2  # history frames a causal conv with temporal kernel 3 needs
VIDEO_CHANNELS = 3

# GPU execution choices, read at every encode/decode call (bench/bench_vae.py flips them to measure each one). None
# changes the numbers beyond rounding; none has an effect on the CPU.
CUDA_CHANNELS_LAST = True  # activations and conv weights channels-last (channels_last_3d) on CUDA
CUDNN_AUTOTUNE = True  # torch.backends.cudnn.benchmark on during an encode/decode on CUDA (restored afterwards)
FUSED_NORM = True  # channels-last residual blocks through the Triton passes below (norm+SiLU, bias+residual)


# --- config ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of a Wan VAE; the defaults are Wan2.1's (the field names are diffusers', typo included).

    ``is_residual``: Wan2.2's residual levels (parameter-free average/repeat shortcuts around each encoder/decoder
    level; the decoder's upsamplers keep the channel count). ``patch_size``: p x p pixel patches folded into channels
    around the network (None: none; 1 is stored as None). ``decoder_base_dim``: the decoder's base width (None: the
    encoder's ``base_dim``; stored resolved). :meth:`wan22` is the Wan2.2 TI2V-5B VAE.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    patch_size: int | None = None
    decoder_base_dim: int | None = None

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
        set_(self, "decoder_base_dim", self.base_dim if self.decoder_base_dim is None else int(self.decoder_base_dim))
        problems = []
        if not isinstance(self.is_residual, bool):
            problems.append(f"is_residual={self.is_residual!r} must be true or false")
        p = self.patch_size
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            problems.append(f"patch_size={p!r} must be null or an integer >= 1")
        elif p == 1:
            set_(self, "patch_size", None)  # a 1x1 patch is no patch (diffusers' patchify returns its input)

        if min(self.base_dim, self.decoder_base_dim, self.z_dim, self.num_res_blocks) < 1:
            problems.append(f"base_dim={self.base_dim}, decoder_base_dim={self.decoder_base_dim}, z_dim={self.z_dim}, "
                            f"num_res_blocks={self.num_res_blocks} must all be >= 1")
        if not self.dim_mult or min(self.dim_mult) < 1:
            problems.append(f"dim_mult={list(self.dim_mult)} must be a non-empty list of integers >= 1")
        elif not self.is_residual and any(self.decoder_base_dim * m % 2 for m in self.dim_mult[1:]):
            problems.append(f"decoder_base_dim * dim_mult[1:] must be even (the decoder's upsamplers halve the "
                            f"channels), got decoder_base_dim={self.decoder_base_dim}, dim_mult={list(self.dim_mult)}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            problems.append(f"temperal_downsample={list(self.temperal_downsample)} must have len(dim_mult) - 1 = "
                            f"{len(self.dim_mult) - 1} entries")
        elif self.is_residual and not problems:
            problems += self._shortcut_problems()
        if sum(self.temperal_downsample) > 2:
            problems.append(f"temperal_downsample={list(self.temperal_downsample)}: at most 2 temporal downsamplings "
                            f"fit the reference's chunks of {ENCODER_CHUNK} frames")
        if self.attn_scales:
            problems.append(f"attn_scales={list(self.attn_scales)} is not supported: Wan has none, and the "
                            "original and diffusers' decoders disagree about where such attention blocks go")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            problems.append(f"latents_mean and latents_std must have z_dim={self.z_dim} values, got "
                            f"{len(self.latents_mean)} and {len(self.latents_std)}")
        if any(s <= 0 for s in self.latents_std):
            problems.append(f"latents_std must be > 0, got {list(self.latents_std)}")
        if problems:
            raise UserError("invalid Wan VAE config: " + "; ".join(problems))

    def _shortcut_problems(self) -> list[str]:
        """The residual levels' shortcuts regroup channels: their channel counts must divide evenly."""
        problems = []
        for i, (cin, cout, ft, fs) in enumerate(self.encoder_levels()):
            if cin * ft * fs * fs % cout:
                problems.append(f"encoder level {i}: {cin} channels x {ft * fs * fs} cells must divide into {cout}")
        for i, (cin, cout, ft, fs) in enumerate(self.decoder_levels()):
            if fs > 1 and cout * ft * fs * fs % cin:
                problems.append(f"decoder level {i}: {cout} channels x {ft * fs * fs} cells must be a multiple of "
                                f"{cin}")
        return problems

    @classmethod
    def wan22(cls) -> WanVAEConfig:
        """The Wan2.2 TI2V-5B VAE (``Wan2.2_VAE.pth``): 48 latent channels, 16x spatial, 4x temporal compression."""
        return cls(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                   temperal_downsample=(False, True, True), latents_mean=WAN22_LATENTS_MEAN,
                   latents_std=WAN22_LATENTS_STD, is_residual=True, patch_size=2)

    @property
    def patch(self) -> int:
        """Pixels per patch side (1 without patchify)."""
        return self.patch_size or 1

    @property
    def in_channels(self) -> int:
        """Channels of the (patchified) video the encoder takes and the decoder returns: 3 * patch**2."""
        return VIDEO_CHANNELS * self.patch**2

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W (8 for Wan2.1, 16 for Wan2.2)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first one (4 for Wan2.1 and Wan2.2)."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def checkpoint_file(self) -> str:
        """The original release's file name for this kind of VAE."""
        return WAN22_VAE_FILE if self.is_residual else WAN_VAE_FILE

    def encoder_levels(self) -> list[tuple[int, int, int, int]]:
        """Per encoder level: (in channels, out channels, temporal factor, spatial factor) of its downsampling."""
        dims = [self.base_dim * m for m in (1, *self.dim_mult)]
        last = len(self.dim_mult) - 1
        return [(dims[i], dims[i + 1], 2 if i < last and self.temperal_downsample[i] else 1, 2 if i < last else 1)
                for i in range(len(self.dim_mult))]

    def decoder_levels(self) -> list[tuple[int, int, int, int]]:
        """Per decoder level: (in channels, out channels, temporal factor, spatial factor) of its upsampling. In the
        Wan2.1 layout the upsamplers halve the channels, so a level's input is half the previous level's output."""
        dims = [self.decoder_base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        up_t = self.temperal_downsample[::-1]
        last = len(self.dim_mult) - 1
        return [(dims[i] // 2 if i > 0 and not self.is_residual else dims[i], dims[i + 1],
                 2 if i < last and up_t[i] else 1, 2 if i < last else 1) for i in range(len(self.dim_mult))]

    # diffusers ``vae/config.json`` keys that only matter for training, or that diffusers itself ignores
    # (``clip_output`` is in Wan2.2-TI2V-5B-Diffusers' config but not an AutoencoderKLWan argument: it always clamps)
    _DIFFUSERS_IGNORED: ClassVar[tuple[str, ...]] = ("dropout", "clip_output")
    # keys whose value follows from the architecture; (diffusers' default when absent, or None: absent is fine)
    _DIFFUSERS_DERIVED: ClassVar[Mapping[str, int | None]] = MappingProxyType(
        {"in_channels": 3, "out_channels": 3, "scale_factor_temporal": None, "scale_factor_spatial": None}
    )

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> WanVAEConfig:
        """Read a diffusers ``vae/config.json`` dict; raise UserError naming every key we do not understand."""
        names = {f.name for f in fields(cls)}
        kwargs, bad = {}, []
        for key, value in d.items():
            if key.startswith("_") or key in cls._DIFFUSERS_IGNORED:
                continue  # _class_name, _diffusers_version, _name_or_path; dropout, clip_output
            if key in names:
                kwargs[key] = value
            elif key not in cls._DIFFUSERS_DERIVED:
                bad.append(f"{key}={value!r} (unknown key)")
        if bad:
            raise UserError("unsupported Wan VAE config (diffusers AutoencoderKLWan): " + ", ".join(bad))
        try:
            cfg = cls(**kwargs)
        except UserError:
            raise
        except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
            raise UserError(f"invalid Wan VAE config {dict(kwargs)}: {e}") from e
        # Derived keys: they must agree with the architecture (absent: diffusers' default, where it has one).
        derived = {"in_channels": (cfg.in_channels, "3 * patch_size**2"),
                   "out_channels": (cfg.in_channels, "3 * patch_size**2"),
                   "scale_factor_temporal": (cfg.temporal_factor, "2**sum(temperal_downsample)"),
                   "scale_factor_spatial": (cfg.spatial_factor, "2**(len(dim_mult) - 1) * patch_size")}
        for key, (want, formula) in derived.items():
            got = d.get(key, cls._DIFFUSERS_DERIVED[key])
            if got is not None and got != want:
                bad.append(f"{key}={got!r} (this architecture has {formula} = {want})")
        if bad:
            raise UserError("unsupported Wan VAE config (diffusers AutoencoderKLWan): " + ", ".join(bad))
        return cfg

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> WanVAEConfig:
        """Infer the architecture from tensors with the original Wan names (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``
        carry no config); both layouts are recognised (Wan2.2's levels are nested: ``encoder.downsamples.0.
        downsamples.0...``).

        The latent statistics cannot be inferred: they are Wan2.1's for z_dim 16 and Wan2.2's for z_dim 48; other
        z_dims raise. Raises CheckpointError if the tensors do not describe a Wan VAE.
        """
        try:
            conv_in = sd["encoder.conv1.weight"]
            base_dim, in_channels = conv_in.shape[0], conv_in.shape[1]
            z_dim = sd["conv2.weight"].shape[0]
            is_residual = "encoder.downsamples.0.downsamples.0.residual.0.gamma" in sd
            levels, temporal = (_residual_levels if is_residual else _flat_levels)(sd)
            blocks = {len(level) for level in levels}
            if len(blocks) != 1 or not levels[0] or any(len(set(level)) != 1 for level in levels):
                raise ValueError("the encoder's levels differ in size")
            if len(temporal) != len(levels) - 1:
                raise ValueError("every encoder level but the last must end with a downsampler")
            if any(level[0] % base_dim for level in levels):
                raise ValueError(f"level widths {[level[0] for level in levels]} are not multiples of {base_dim}")
            dim_mult = tuple(level[0] // base_dim for level in levels)
            dec_out = sd["decoder.head.0.gamma"].shape[0]  # the decoder's last width: decoder_base_dim * dim_mult[0]
            if dec_out % dim_mult[0]:
                raise ValueError(f"decoder width {dec_out} is not a multiple of dim_mult[0]={dim_mult[0]}")
            patch = math.isqrt(in_channels // VIDEO_CHANNELS)
            if VIDEO_CHANNELS * patch * patch != in_channels:
                raise ValueError(f"the encoder takes {in_channels} channels, not 3 * patch**2")
        except (KeyError, ValueError, AttributeError, IndexError) as e:
            raise CheckpointError(f"cannot infer the VAE architecture from the checkpoint's tensors ({e})") from e
        if z_dim not in _KNOWN_LATENT_STATS:
            raise CheckpointError(f"the checkpoint has z_dim={z_dim}: its latent statistics are unknown (Wan2.1 has "
                                  "16, Wan2.2 48), pass a WanVAEConfig with latents_mean and latents_std")
        mean, std = _KNOWN_LATENT_STATS[z_dim]
        try:
            return cls(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=blocks.pop(),
                       temperal_downsample=tuple(temporal), latents_mean=mean, latents_std=std,
                       is_residual=is_residual, patch_size=patch, decoder_base_dim=dec_out // dim_mult[0])
        except UserError as e:
            raise CheckpointError(f"the checkpoint's tensors describe no valid Wan VAE: {e}") from e

    def to_diffusers_config(self) -> dict[str, Any]:
        """A ``vae/config.json`` dict that diffusers' AutoencoderKLWan accepts."""
        return {
            "_class_name": "AutoencoderKLWan",
            "base_dim": self.base_dim,
            "decoder_base_dim": None if self.decoder_base_dim == self.base_dim else self.decoder_base_dim,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_scales": list(self.attn_scales),
            "temperal_downsample": list(self.temperal_downsample),
            "dropout": 0.0,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
            "is_residual": self.is_residual,
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "patch_size": self.patch_size,
            "scale_factor_temporal": self.temporal_factor,
            "scale_factor_spatial": self.spatial_factor,
        }


def _flat_levels(sd: Mapping[str, torch.Tensor]) -> tuple[list[list[int]], list[bool]]:
    """Wan2.1 layout: ``encoder.downsamples`` is one list (per level: residual blocks, then a resampler). Returns
    (per level: output channels of its residual blocks, per resampler: whether it is temporal)."""
    levels: list[list[int]] = [[]]
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
    return levels, temporal


def _residual_levels(sd: Mapping[str, torch.Tensor]) -> tuple[list[list[int]], list[bool]]:
    """Wan2.2 layout: ``encoder.downsamples.{level}.downsamples.{j}`` (residual blocks, then a resampler)."""
    levels: list[list[int]] = []
    temporal: list[bool] = []
    while f"encoder.downsamples.{len(levels)}.downsamples.0.residual.0.gamma" in sd:
        prefix = f"encoder.downsamples.{len(levels)}.downsamples."
        outs = []
        while f"{prefix}{len(outs)}.residual.0.gamma" in sd:
            outs.append(sd[f"{prefix}{len(outs)}.residual.6.weight"].shape[0])
        if f"{prefix}{len(outs)}.resample.1.weight" in sd:
            temporal.append(f"{prefix}{len(outs)}.time_conv.weight" in sd)
        levels.append(outs)
    return levels, temporal


# --- spatial tiling -------------------------------------------------------------------------------------------------

TILE_MULTIPLE = 8  # tile sizes and strides are in pixels and must be whole latent pixels (Wan2.1: 8 px per latent px)


@dataclass(frozen=True)
class TilingConfig:
    """Spatial tiling of VAE encode/decode (LightX2V's ``use_tiling_vae``); the defaults are diffusers'.

    All four values are in video pixels and must be positive multiples of 8 (a latent tile is 1/8 of them; the
    Wan2.2 VAE, 16 px per latent px, needs multiples of 16); a stride must not exceed its tile size. Tiles start every
    ``stride`` pixels, are ``tile`` pixels tall/wide (smaller at the bottom/right edge) and overlap their upper/left
    neighbours by ``tile - stride`` pixels, over which the two are blended linearly. A video (or latent) no larger
    than one tile in both dimensions is processed untiled. (With 2x2 patches, Wan2.2, diffusers applies the values to
    the patchified video when encoding, i.e. to twice as many pixels, and to the decoder's patchified output when
    decoding; we do the same, to stay identical.)
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
    * for a causal conv with temporal kernel 3: its last 2 input frames ``[B, C, 2, H, W]`` (after a single-frame
      first chunk: a zero frame, the causal padding, then that frame);
    * for a temporal upsampler: the history of its temporal conv (a zero frame after the first chunk, which skips it);
    * for a temporal downsampler: its last input frame ``[B, C, 1, H, W]``.

    ``chunks`` counts the chunks started (Wan2.2's decoder shortcuts treat the first chunk differently).
    """

    __slots__ = ("_cursor", "chunks", "slots")

    def __init__(self) -> None:
        self.slots: list[torch.Tensor | None] = []
        self.chunks = 0
        self._cursor = 0

    def reset(self) -> None:
        """Forget everything (a new video)."""
        self.slots.clear()
        self.chunks = 0
        self._cursor = 0

    def start_chunk(self) -> None:
        """Call before each chunk: the layers will be visited from the first slot again."""
        if self._cursor != len(self.slots):
            raise RuntimeError(f"causal cache: the last chunk visited {self._cursor} of {len(self.slots)} slots")
        self._cursor = 0
        self.chunks += 1

    @property
    def first_chunk(self) -> bool:
        """The chunk being processed is the video's first."""
        return self.chunks == 1

    def next_slot(self) -> int:
        """Index of the slot of the next cached layer (created empty on the first chunk)."""
        i = self._cursor
        self._cursor += 1
        if i == len(self.slots):
            self.slots.append(None)
        return i


# --- memory layout ----------------------------------------------------------------------------------------------------


def _is_channels_last(x: torch.Tensor) -> bool:
    """x [B, C, ...] has its channels innermost (channels_last / channels_last_3d)."""
    return x.shape[1] > 1 and x.stride(1) == 1


def _format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format new activations derived from x get: channels-last if x is, else contiguous."""
    if _is_channels_last(x):
        return torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def _cudnn_autotune(on: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = True`` inside the block when ``on`` (restored after; process-wide while
    it lasts). Every chunk after the second repeats the previous chunk's conv shapes, so tuning pays off."""
    before = torch.backends.cudnn.benchmark
    if on:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# --- fused GPU passes -------------------------------------------------------------------------------------------------
# Channels-last activations are [pixels, C] rows per sample. Two memory-bound steps of every residual block run as one
# pass each on CUDA (lightx2v.ops.triton.vae_rows, with PyTorch fallbacks of the same math): the conv input
# silu(norm(h + b)) written straight into the causal conv's padded input buffer, and the block output (h + b) + shortcut.


def _pixel_rows(t: torch.Tensor) -> torch.Tensor | None:
    """One sample t [C, ...] as its [pixels, C] rows (a view), or None unless those rows are contiguous."""
    rows = t.movedim(0, -1)
    return rows.view(-1, t.shape[0]) if rows.is_contiguous() else None


def _use_fused(x: torch.Tensor) -> bool:
    """The residual blocks take the fused passes: ``FUSED_NORM``, a CUDA tensor, channels-last."""
    return FUSED_NORM and x.is_cuda and _is_channels_last(x)


# --- building blocks --------------------------------------------------------------------------------------------------


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

    def silu_into(self, x: torch.Tensor, out: torch.Tensor, in_bias: torch.Tensor | None = None) -> None:
        """``out[...] = silu(self(x + in_bias))`` for video x [B, C, T, H, W] (``in_bias`` [C]: the bias of the conv
        that made x, not yet added); ``out`` may be a view into a larger buffer.

        On CUDA with x and out channels-last (``FUSED_NORM``): one pass per sample over its [pixels, C] rows (bias,
        norm, SiLU; see the fused passes above), written straight into ``out``.
        """
        c = x.shape[1]
        if _use_fused(x) and _is_channels_last(out):
            rows = [(_pixel_rows(x[b]), _pixel_rows(out[b])) for b in range(x.shape[0])]
            if all(xr is not None and o is not None for xr, o in rows):
                for xr, o in rows:
                    _bias_norm_silu_rows(xr, in_bias, self.gamma.view(c), self.scale, o)
                return
        if in_bias is not None:
            x = x + in_bias.view(1, c, *(1,) * (x.dim() - 2))
        out.copy_(self(x))
        F.silu(out, inplace=True)


def _causal_input(x: torch.Tensor, past: torch.Tensor | None, pad: int, norm: RMSNorm | None,
                  in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The input of a causal conv that needs ``pad`` frames before x: [zero frames, past, x or silu(norm(x + in_bias))]
    along time, [B, C, pad + T, H, W], in x's memory format. Written into one buffer (no ``cat``); ``past`` has <= pad
    frames."""
    b, c, t, h, w = x.shape
    n_past = 0 if past is None else past.shape[2]
    buf = torch.empty((b, c, pad + t, h, w), dtype=x.dtype, device=x.device, memory_format=_format_of(x))
    zeros = pad - n_past
    if zeros:
        buf[:, :, :zeros].zero_()
    if n_past:
        buf[:, :, zeros:pad].copy_(past)
    if norm is None:
        assert in_bias is None
        buf[:, :, pad:].copy_(x)
    else:
        norm.silu_into(x, buf[:, :, pad:], in_bias)
    return buf


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: ``2 * padding_t`` frames of history in front (zeros or cached), none behind.

    Spatial padding is the conv's own zero padding. x: [B, Cin, T, H, W] -> [B, Cout, T', H', W'].
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def step(self, x: torch.Tensor, past: torch.Tensor | None, norm: RMSNorm | None = None, *,
             in_bias: torch.Tensor | None = None, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk with the history ``past`` ([B, Cin, <=2, H, W] or None): returns (output, new history).

        The new history is the last 2 frames of the padded input (zero padding included: after a single-frame
        first chunk it is [0, x0], which the next chunk uses exactly as the reference's [x0] plus one zero frame).
        """
        buf = _causal_input(x, past, self.time_pad, norm, in_bias)
        keep = buf[:, :, -CACHE_T:].clone()  # not a view: do not keep the whole buffer alive
        return self._conv_forward(buf, self.weight, self.bias if bias else None), keep

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None, norm: RMSNorm | None = None, *,
                in_bias: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """conv(x), or with ``norm`` conv(silu(norm(x + in_bias))) with the norm written straight into the conv's
        padded input. ``cache``: continue from the previous chunk (None: x is the whole sequence). ``in_bias``: the
        bias of the conv that made x, not yet added to it; ``bias=False``: leave this conv's bias to the caller."""
        b = self.bias if bias else None
        if self.time_pad == 0:  # no temporal extent (1x1x1 convs, the strided temporal downsampler)
            if norm is not None:
                x = F.silu(norm(x if in_bias is None else x + in_bias.view(1, -1, 1, 1, 1)))
            return self._conv_forward(x, self.weight, b)
        if cache is None:
            return self._conv_forward(_causal_input(x, None, self.time_pad, norm, in_bias), self.weight, b)
        slot = cache.next_slot()
        y, cache.slots[slot] = self.step(x, cache.slots[slot], norm, in_bias=in_bias, bias=bias)
        return y


def _bias_residual_(h: torch.Tensor, bias: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """h = (h + bias) + s in place (h, s [B, C, T, H, W], bias [C]): one pass per sample where both are
    channels-last, else PyTorch's two."""
    rows = [(_pixel_rows(h[b]), _pixel_rows(s[b])) for b in range(h.shape[0])]
    if all(hr is not None and sr is not None for hr, sr in rows):
        for hr, sr in rows:
            _bias_residual_rows_(hr, bias, sr)
        return h
    return h.add_(bias.view(1, -1, 1, 1, 1)).add_(s)


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
        if not _use_fused(x):
            h = conv1(x, cache, norm=norm1)  # conv1(silu(norm1(x)))
            h = conv2(h, cache, norm=norm2)
            return h.add_(self.shortcut(x))
        # The same on CUDA, channels-last: each conv's bias joins the next memory pass instead of taking its own.
        h = conv1(x, cache, norm=norm1, bias=False)
        h = conv2(h, cache, norm=norm2, in_bias=conv1.bias, bias=False)  # conv2(silu(norm2(h + conv1.bias)))
        return _bias_residual_(h, conv2.bias, self.shortcut(x))  # h + conv2.bias + shortcut(x)


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
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [BT, C, H, W] (a view when x is channels-last)
        qkv = self.to_qkv(self.norm(frames))  # [BT, 3C, H, W]: q, k, v along channels
        # pixels as tokens, channels last: [BT, 1 head, HW, 3C], split into q, k, v of [BT, 1, HW, C] each
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).reshape(b, t, c, h, w).transpose(1, 2)  # [B, C, T, H, W]
        return x + out


def _interleave_halves(y: torch.Tensor) -> torch.Tensor:
    """[B, 2C, T, H, W] whose channel half s holds output frame 2t + s -> [B, C, 2T, H, W], in y's memory format."""
    b, c2, t, h, w = y.shape
    c = c2 // 2
    out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=_format_of(y))
    # out[b, c, 2t + s] = y[b, s*C + c, t]: [B, 2, C, T, H, W] -> [B, C, T, 2, H, W]
    out.unflatten(2, (t, 2)).copy_(y.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5))
    return out


class Resample(nn.Module):
    """2x spatial up/downsampling per frame, optionally 2x in time (``*3d``), with the reference's chunk rules.

    * downsample2d/3d: pad right/bottom by 1, Conv2d(3, stride 2). 3d then runs a temporal conv (kernel 3,
      stride 2) over [last frame of previous chunk, this chunk]; the first chunk (1 frame) passes unchanged.
      [B, C, T, H, W] -> [B, C, T or T/2, H/2, W/2].
    * upsample2d/3d: nearest 2x, Conv2d(3) to ``out_dim`` channels (C/2 in Wan2.1, C in Wan2.2). 3d first runs a
      causal temporal conv to 2C channels whose halves are the even and odd output frames; the first chunk (the
      first latent frame) skips it. [B, C, T, H, W] -> [B, out_dim, T or 2T, 2H, 2W].
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1),
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
                y, cache.slots[slot] = self.time_conv.step(x, past)  # [B, 2C, T, H, W]
                x = _interleave_halves(y)  # [B, C, 2T, H, W]
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


# --- Wan2.2: residual levels with parameter-free shortcuts ---------------------------------------------------------


def _avg_down(x: torch.Tensor, cout: int, ft: int, fs: int) -> torch.Tensor:
    """diffusers' ``AvgDown3D``: [B, C, T, H, W] -> [B, cout, ceil(T/ft), H/fs, W/fs].

    Time is zero-padded in front to a multiple of ft; each (ft, fs, fs) cell of channel c becomes ft*fs*fs channels
    c*ft*fs*fs + (i*fs + j)*fs + k, and every run of C*ft*fs*fs/cout consecutive ones is averaged into one output
    channel. Returned in x's memory format.
    """
    fmt = _format_of(x)
    pad = -x.shape[2] % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    b, c, t, h, w = x.shape
    cells = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    group = c * ft * fs * fs // cout
    y = cells.reshape(b, cout, group, t // ft, h // fs, w // fs).mean(dim=2)
    return y.contiguous(memory_format=fmt)


def _add_dup_up_(y: torch.Tensor, x: torch.Tensor, ft: int, fs: int, first_chunk: bool) -> torch.Tensor:
    """``y += DupUp3D(x)`` in place (diffusers' ``DupUp3D``): x [B, Cin, T, H, W], y [B, Cout, T*ft, H*fs, W*fs]
    (the first chunk: its first ft-1 frames dropped).

    DupUp3D repeats each input channel r = Cout*ft*fs*fs/Cin times and unfolds the result into (ft, fs, fs) cells:
    output channel o at cell offset s = (i*fs + j)*fs + k is input channel (o*ft*fs*fs + s) // r. When r is 1, fs,
    fs*fs or ft*fs*fs that index depends on o and the leading digits of s only, so x is added through a broadcast
    view without being repeated; other ratios materialise the repeat as the reference does.
    """
    b, cin, t, h, w = x.shape
    cout = y.shape[1]
    factor = ft * fs * fs
    r = cout * factor // cin
    digits = {1: (ft, fs, fs), fs: (ft, fs, 1), fs * fs: (ft, 1, 1), factor: (1, 1, 1)}.get(r)
    if digits is None or (first_chunk and t != 1):
        s = x.repeat_interleave(r, dim=1).reshape(b, cout, ft, fs, fs, t, h, w)
        s = s.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cout, t * ft, h * fs, w * fs)
        return y.add_(s[:, :, ft - 1 :] if first_chunk else s)
    d0, d1, d2 = digits
    s = x.reshape(b, cout, d0, d1, d2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, Cout, T, d0, H, d1, W, d2]
    if first_chunk and ft > 1:  # one latent frame whose output keeps only the last of its ft frames
        s = s[:, :, :, d0 - 1 :]
        y.unflatten(2, (1, 1)).unflatten(4, (h, fs)).unflatten(6, (w, fs)).add_(s)
    else:
        y.unflatten(2, (t, ft)).unflatten(4, (h, fs)).unflatten(6, (w, fs)).add_(s)
    return y


class DownBlock(nn.Module):
    """A Wan2.2 encoder level (original ``Down_ResidualBlock``): ``downsamples`` = residual blocks (and a
    downsampler), plus the parameter-free average-pool shortcut of the level's input.

    x: [B, Cin, T, H, W] -> [B, Cout, T/ft, H/fs, W/fs] (the first chunk's single frame stays single).
    """

    def __init__(self, cin: int, cout: int, num_res_blocks: int, ft: int, fs: int) -> None:
        super().__init__()
        self.cout, self.ft, self.fs = cout, ft, fs
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks)]
        if fs > 1:
            blocks.append(Resample(cout, "downsample3d" if ft > 1 else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        shortcut = _avg_down(x, self.cout, self.ft, self.fs)
        for block in self.downsamples:
            x = block(x, cache)
        return x.add_(shortcut)


class UpBlock(nn.Module):
    """A Wan2.2 decoder level (original ``Up_ResidualBlock``): ``upsamples`` = residual blocks (and an upsampler
    keeping the channel count), plus, on upsampling levels, the parameter-free repeat shortcut of the level's input.

    x: [B, Cin, T, H, W] -> [B, Cout, T*ft, H*fs, W*fs] (the first chunk: T frames stay T).
    """

    def __init__(self, cin: int, cout: int, num_blocks: int, ft: int, fs: int) -> None:
        super().__init__()
        self.ft, self.fs = ft, fs
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)]
        if fs > 1:
            blocks.append(Resample(cout, "upsample3d" if ft > 1 else "upsample2d", out_dim=cout))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        if self.fs > 1:
            _add_dup_up_(y, x, self.ft, self.fs, cache.first_chunk)
        return y


# --- encoder and decoder ----------------------------------------------------------------------------------------------


class Encoder3d(nn.Module):
    """[B, 3p^2, T, H, W] -> [B, 2*z_dim, T', H/2^L, W/2^L] (mean and log-variance), one chunk at a time."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        levels = cfg.encoder_levels()
        self.conv1 = CausalConv3d(cfg.in_channels, levels[0][0], 3, padding=1)
        blocks: list[nn.Module] = []
        for cin, cout, ft, fs in levels:
            if cfg.is_residual:
                blocks.append(DownBlock(cin, cout, cfg.num_res_blocks, ft, fs))
                continue
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if fs > 1:
                blocks.append(Resample(cout, "downsample3d" if ft > 1 else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        c = levels[-1][1]
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
        return conv(x, cache, norm=norm)


class Decoder3d(nn.Module):
    """[B, z_dim, T, h, w] -> [B, 3p^2, T', h*2^L, w*2^L], one chunk at a time."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        levels = cfg.decoder_levels()
        c = levels[0][0]
        self.conv1 = CausalConv3d(cfg.z_dim, c, 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        blocks: list[nn.Module] = []
        for cin, cout, ft, fs in levels:
            if cfg.is_residual:
                blocks.append(UpBlock(cin, cout, cfg.num_res_blocks + 1, ft, fs))
                continue
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if fs > 1:
                blocks.append(Resample(cout, "upsample3d" if ft > 1 else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        c = levels[-1][1]
        self.head = nn.Sequential(RMSNorm(c, 3), nn.SiLU(), CausalConv3d(c, cfg.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(x, cache, norm=norm)


# --- patches ----------------------------------------------------------------------------------------------------------


def _patchify(video: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, C*p*p, F, H/p, W/p]; channel c*p*p + r*p + q holds pixel (q, r) of each p x p patch
    (q down, r across), as Wan2.2's and diffusers' ``patchify``."""
    if p == 1:
        return video
    b, c, f, h, w = video.shape
    x = video.reshape(b, c, f, h // p, p, w // p, p)  # [B, C, F, h, q, w, r]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)


def _unpatchify_into(out: torch.Tensor, y: torch.Tensor, p: int) -> None:
    """out [B, C, T, h*p, w*p] = the inverse of :func:`_patchify` of y [B, C*p*p, T, h, w], written in place."""
    if p == 1:
        out.copy_(y)
        return
    cpp, h, w = y.shape[1], y.shape[3], y.shape[4]
    dst = out.unflatten(4, (w, p)).unflatten(3, (h, p))  # [B, C, T, h, q, w, r]
    dst.copy_(y.unflatten(1, (cpp // (p * p), p, p)).permute(0, 1, 4, 5, 3, 6, 2))  # [B, C, r, q, T, h, w] -> dst


# --- the VAE ----------------------------------------------------------------------------------------------------------


VAE_PARTS = ("both", "encoder", "decoder")


class WanVAE(nn.Module):
    """A Wan VAE with the original release's parameter names (``encoder.*``, ``conv1.*``, ``conv2.*``,
    ``decoder.*``). Inputs are cast to the parameters' dtype; outputs come in that dtype."""

    def __init__(self, config: WanVAEConfig | None = None, part: str = "both") -> None:
        """``part``: "both", or only the "encoder" (``encoder`` + ``conv1``) or the "decoder" (``conv2`` +
        ``decoder``) for a stage that needs one half."""
        super().__init__()
        if part not in VAE_PARTS:
            raise ValueError(f"part={part!r} must be one of {VAE_PARTS}")
        cfg = config if config is not None else WanVAEConfig()
        self.config, self.part = cfg, part
        enc, dec = part in ("both", "encoder"), part in ("both", "decoder")
        self.encoder = Encoder3d(cfg) if enc else None
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1) if enc else None  # diffusers: quant_conv
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1) if dec else None  # diffusers: post_quant_conv
        self.decoder = Decoder3d(cfg) if dec else None
        self._weights_channels_last = False

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as float32 [1, z_dim, 1, 1, 1], as diffusers' pipelines compute them."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, inv_std

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise UserError(f"latents must be [B, {self.config.z_dim}, T, h, w], got {list(z.shape)}")

    def _tile_geometry(self, tiling: TilingConfig, unit: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(tile, stride) divided by ``unit`` (input pixels per latent pixel), checking that they divide."""
        sf, p = self.config.spatial_factor, self.config.patch
        if any(v % unit for v in (*tiling.tile, *tiling.stride)):
            why = "" if unit == sf else f" / patch size {p}: diffusers tiles the patchified video when encoding"
            raise UserError(f"VAE tiling {tiling}: tile sizes and strides must be multiples of {unit} (the VAE's "
                            f"spatial factor {sf}{why})")
        (th, tw), (sh, sw) = tiling.tile, tiling.stride
        return (th // unit, tw // unit), (sh // unit, sw // unit)

    def _run_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in the memory format the networks run in: channels-last on CUDA (``CUDA_CHANNELS_LAST``), converting the
        conv weights to match the first time (values unchanged), else as it is."""
        channels_last = CUDA_CHANNELS_LAST and x.is_cuda
        if channels_last != self._weights_channels_last:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    fmt = (torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last) if channels_last \
                        else torch.contiguous_format
                    m.weight.data = m.weight.data.contiguous(memory_format=fmt)
            self._weights_channels_last = channels_last
        return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x

    def _encode_mu(self, x: torch.Tensor) -> torch.Tensor:
        """The causal time loop of the encoder: x [B, 3p^2, 1+4k, H', W'] (patchified, VAE dtype) -> mu
        [B, z_dim, T, H'/2^L, W'/2^L]."""
        cache = CausalCache()
        out = []
        chunks = (x[:, :, :1], *x[:, :, 1:].split(ENCODER_CHUNK, dim=2)) if x.shape[2] > 1 else (x,)
        for chunk in chunks:  # 1 frame, then 4 at a time
            cache.start_chunk()
            out.append(self.encoder(chunk, cache))  # [B, 2z, 1 (or 4/temporal_factor), h, w]
        h_all = torch.cat(out, dim=2)  # [B, 2z, T, h, w]
        del out, cache
        # conv1 is 1x1x1 and output channels are independent: compute only the mean's half.
        z = self.config.z_dim
        return F.conv3d(h_all, self.conv1.weight[:z], self.conv1.bias[:z])

    def _decode_frames(self, x: torch.Tensor, unpatchify: bool = True) -> torch.Tensor:
        """The causal time loop of the decoder: x [B, z_dim, T, h, w] (after conv2) -> [B, 3, 1+4(T-1), h*s, w*s]
        (``unpatchify=False``: the decoder's own output, [B, 3p^2, 1+4(T-1), h*s/p, w*s/p]), not clamped. Each chunk's
        frames are written into one preallocated contiguous tensor (no list + cat)."""
        cache = CausalCache()
        p = self.config.patch if unpatchify else 1
        out = None
        t = 0
        for frame in x.split(1, dim=2):  # one latent frame at a time: [B, z, 1, h, w]
            cache.start_chunk()
            y = self.decoder(frame, cache)  # [B, 3p^2, 1 (first) or temporal_factor, h*s/p, w*s/p]
            if out is None:
                frames = y.shape[2] + (x.shape[2] - 1) * self.config.temporal_factor
                out = y.new_empty(y.shape[0], y.shape[1] // (p * p), frames, y.shape[3] * p, y.shape[4] * p)
            _unpatchify_into(out[:, :, t : t + y.shape[2]], y, p)
            t += y.shape[2]
            del y
        assert out is not None and t == out.shape[2]
        return out

    @torch.no_grad()
    def encode_raw(self, video: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> latent mean mu [B, z_dim, 1+k', H/s, W/s] (not normalised).

        k' = 4k / temporal_factor (k for Wan2.1 and Wan2.2). Equals diffusers' ``encode(video).latent_dist.mode()``,
        and with ``tiling`` diffusers' output after ``enable_tiling(**asdict(tiling))``: if H or W exceeds the tile,
        the video is encoded in overlapping tiles (see :class:`TilingConfig`), one at a time. With patches (Wan2.2)
        diffusers applies the tile sizes to the patchified video, so a tile then covers p times as many pixels.
        """
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != VIDEO_CHANNELS:
            raise UserError(f"video must be [B, 3, F, H, W], got {list(video.shape)}")
        _, _, f, h, w = video.shape
        sf, p = cfg.spatial_factor, cfg.patch
        if (f - 1) % ENCODER_CHUNK or h % sf or w % sf:
            raise UserError(f"video of {f} frames of {h}x{w}: need 1 + {ENCODER_CHUNK}k frames and H, W divisible "
                            f"by {sf}")
        tiled = False
        if tiling is not None:
            (th, tw), (sh, sw) = self._tile_geometry(tiling, sf // p)  # latent pixels
            tiled = h > tiling.tile_sample_min_height or w > tiling.tile_sample_min_width
        x = self._run_layout(_patchify(video.to(self.dtype), p))
        with _cudnn_autotune(CUDNN_AUTOTUNE and x.is_cuda):
            if not tiled:
                return self._encode_mu(x).contiguous()
            # Input in (patchified) pixels, output in latent pixels.
            return _run_tiled(x, self._encode_mu, tile_in=tiling.tile, stride_in=tiling.stride, stride_out=(sh, sw),
                              blend_out=(th - sh, tw - sw), size_out=(h // sf, w // sf)).contiguous()

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """latents [B, z_dim, T, h, w] (not normalised) -> video [B, 3, 1+4(T-1), h*s, w*s] clamped to [-1, 1].

        Equals diffusers' ``decode(z).sample``, and with ``tiling`` diffusers' output after
        ``enable_tiling(**asdict(tiling))``: if h or w exceeds the latent tile (tile / s), the latents are decoded in
        overlapping tiles, one at a time, each through the whole time loop with its own cache (with patches, blended
        before the final unpatchify, as diffusers does). Memory then holds the weights, the input, the preallocated
        output, the bottom (tile - stride) pixel rows of the previous row of tiles, and the one tile being decoded
        (its frames, its cache and one chunk's activations), whatever the frame size: 81 frames at 720x1280 in bf16
        with the default tiles peaked at 1.34 GiB allocated on an H100 (random weights; untiled at 480x832: 3.4 GiB
        above weights and input). The blend runs in float32 on the overlap strips only.
        """
        self._check_latents(z)
        sf, p = self.config.spatial_factor, self.config.patch
        _, _, _, h, w = z.shape
        tiled = False
        if tiling is not None:
            (th, tw), (sh, sw) = self._tile_geometry(tiling, sf)  # latent pixels
            tiled = h > th or w > tw
        z = self._run_layout(z.to(self.dtype))
        with _cudnn_autotune(CUDNN_AUTOTUNE and z.is_cuda):
            if not tiled:
                return self._decode_frames(self.conv2(z)).clamp_(-1.0, 1.0)
            (ph, pw), (psh, psw) = tiling.tile, tiling.stride  # pixels; the decoder's output has 1/p of them
            out = _run_tiled(z, lambda t: self._decode_frames(self.conv2(t), unpatchify=False), tile_in=(th, tw),
                             stride_in=(sh, sw), stride_out=(psh // p, psw // p),
                             blend_out=(ph // p - psh // p, pw // p - psw // p), size_out=(h * sf // p, w * sf // p))
        if p > 1:
            b, _, f, hp, wp = out.shape
            video = out.new_empty(b, VIDEO_CHANNELS, f, hp * p, wp * p)
            _unpatchify_into(video, out, p)
            out = video
        return out.clamp_(-1.0, 1.0)

    def encode(self, video: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents (mu - mean) / std, [B, z_dim, 1+k, H/s, W/s].

        ``tiling``: encode in overlapping spatial tiles (see :meth:`encode_raw`)."""
        mu = self.encode_raw(video, tiling)
        mean, inv_std = self._latent_stats(mu.device)
        return ((mu.float() - mean) * inv_std).to(mu.dtype)

    def decode(self, z: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """normalised latents [B, z_dim, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] in [-1, 1].

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
    if cfg.is_residual:
        # Wan2.2: one block per level in both layouts: residual blocks, then the resampler (not after the last level).
        nrb = cfg.num_res_blocks
        for level in range(levels):
            enc, dec = f"encoder.downsamples.{level}.downsamples.", f"decoder.upsamples.{level}.upsamples."
            rows += [(f"{enc}{j}.", f"encoder.down_blocks.{level}.resnets.{j}.", _RESBLOCK) for j in range(nrb)]
            rows += [(f"{dec}{j}.", f"decoder.up_blocks.{level}.resnets.{j}.", _RESBLOCK) for j in range(nrb + 1)]
            if level != levels - 1:
                rows.append((f"{enc}{nrb}.", f"encoder.down_blocks.{level}.downsampler.", _RESAMPLE))
                rows.append((f"{dec}{nrb + 1}.", f"decoder.up_blocks.{level}.upsampler.", _RESAMPLE))
        return rows
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
    return rename_state_dict(sd, table.get, f"{what} VAE state dict")


def vae_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: WanVAEConfig) -> dict[str, torch.Tensor]:
    """Original Wan names -> diffusers' AutoencoderKLWan names; CheckpointError lists keys the table lacks."""
    return _rename(sd, vae_rename_table(cfg), "original-Wan")


def vae_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: WanVAEConfig) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKLWan names -> original Wan names; CheckpointError lists keys the table lacks."""
    inverse = {dif: wan for wan, dif in vae_rename_table(cfg).items()}
    return _rename(sd, inverse, "diffusers")


# --- loading and saving -----------------------------------------------------------------------------------------------


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers ``vae/`` folder, single-file or sharded (with the ``.index.json``)."""
    return read_safetensors_dir(folder, "VAE", stem=DIFFUSERS_WEIGHTS.removesuffix(".safetensors"))


def _check_and_assign(vae: WanVAE, sd: Mapping[str, Any], source: Path, device, dtype: torch.dtype) -> WanVAE:
    """Strict against the whole VAE (every key of the file must fit the config), then assign the part ``vae`` holds
    (only those tensors are read from the memory-mapped file)."""
    if vae.part == "both":
        expected = {k: v.shape for k, v in vae.state_dict().items()}
    else:
        with torch.device("meta"):
            expected = {k: v.shape for k, v in WanVAE(vae.config).state_dict().items()}
    problems = key_problems(expected, sd)
    if problems:
        raise CheckpointError(f"VAE checkpoint {source} does not fit {vae.config}: " + "; ".join(problems))
    tensors = {k: sd[k].to(device=device, dtype=dtype) for k in vae.state_dict()}
    result = vae.load_state_dict(tensors, strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return vae.eval().requires_grad_(False)


def _resolve_vae_path(path: str | Path) -> Path:
    """A folder holding ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth`` -> that file; anything else as given."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (WAN_VAE_FILE, WAN22_VAE_FILE) if (path / name).is_file()]
        if len(found) > 1:
            raise UserError(f"{path} holds both {WAN_VAE_FILE} and {WAN22_VAE_FILE}: name the file to load")
        path = found[0] if found else path
    return path


def read_vae_config(path: str | Path) -> WanVAEConfig:
    """The VAE's architecture without building it: the diffusers folder's config.json, or the tensor shapes of an
    original ``.pth`` (memory-mapped; no weights are read)."""
    path = _resolve_vae_path(path)
    if path.is_dir():
        return WanVAEConfig.from_diffusers_config(read_json(path / DIFFUSERS_CONFIG, "VAE config"))
    try:
        return WanVAEConfig.from_state_dict(torch_load_state_dict(require_file(path, "VAE checkpoint")))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_wan_vae(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: WanVAEConfig | None = None,
    part: str = "both",
) -> WanVAE:
    """Load the VAE from ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth`` (original names; without ``config`` the
    architecture is inferred from the tensors, and the latent statistics are Wan2.1's for 16 latent channels,
    Wan2.2's for 48; a folder holding one of those files, such as the original Wan model folder, works too) or from a
    diffusers ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, possibly sharded;
    ``config``, if given, must equal the folder's). Raises CheckpointError naming missing files, and every missing,
    unexpected or mis-shaped tensor. ``part``: "encoder" or "decoder" builds and loads only that half (the file is
    still checked whole)."""
    path = _resolve_vae_path(path)
    if path.is_dir():
        cfg = WanVAEConfig.from_diffusers_config(read_json(path / DIFFUSERS_CONFIG, "VAE config"))
        if config is not None and config != cfg:
            raise UserError(f"config {config} differs from {path / DIFFUSERS_CONFIG}: {cfg}")
        sd = vae_state_dict_from_diffusers(_read_diffusers_weights(path), cfg)
    else:
        sd = torch_load_state_dict(require_file(path, "VAE checkpoint"))
        if config is not None:
            cfg = config
        else:
            try:
                cfg = WanVAEConfig.from_state_dict(sd)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from e
    with torch.device("meta"):
        vae = WanVAE(cfg, part=part)
    return _check_and_assign(vae, sd, path, device, dtype)


def save_wan_vae(vae: WanVAE, path: str | Path, layout: str = "wan") -> Path:
    """Write ``vae`` in the original layout (``layout="wan"``: torch.save of the state dict to ``path``, or, if
    ``path`` is a folder, to ``path/Wan2.1_VAE.pth`` or ``path/Wan2.2_VAE.pth`` after the config's kind) or as a
    diffusers ``vae/`` folder (``layout="diffusers"``: ``config.json`` + ``diffusion_pytorch_model.safetensors``).
    Returns the file or folder written."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    path = Path(path)
    if layout == "wan":
        if path.is_dir():
            path = path / vae.config.checkpoint_file
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

