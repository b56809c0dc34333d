"""One interface for the three Wan latent autoencoders the decode (and I2V encode) stage can use, and LightX2V's
rules for choosing and finding them.

* :class:`~lightx2v.models.wan.vae.WanVAE`: the full VAE (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``);
* LightVAE (``use_lightvae: true``): a pruned WanVAE, :func:`~lightx2v.models.wan.lightvae.load_lightvae`;
* TAE (``use_tae: true``): :class:`~lightx2v.models.wan.tae.TinyAutoencoder`, :func:`~lightx2v.models.wan.tae.load_tae`.

Each is a :class:`LatentAutoencoder`: ``decode(normalised latents [B, z, T, h, w], tiling=None)`` -> video
[B, 3, 1 + 4(T-1), h*s, w*s] in [-1, 1] in its dtype, ``encode(video [B, 3, 1 + 4k, H, W] in [-1, 1],
tiling=None)`` -> normalised latents [B, z, 1 + k, H/s, W/s], plus ``dtype``, ``device`` and ``config.z_dim``,
``config.spatial_factor``, ``config.temporal_factor``. The TAE takes ``tiling`` and ignores it (its time chunks bound
the memory; LightX2V applies ``use_tiling_vae`` to the full VAE only).

LightX2V's choice (``WanRunner.load_vae``): with ``use_tae`` the TAE decodes and the full VAE (or the LightVAE, with
``use_lightvae``) still encodes the I2V/FLF2V conditioning image; with ``use_lightvae`` alone the LightVAE does both,
read from ``vae_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from lightx2v.errors import UserError
from lightx2v.models.wan.tae import TAE22_FILE, TAE_FILE

__all__ = ["LatentAutoencoder", "AUTOENCODER_KINDS", "LIGHTX2V_WEIGHT_SUBDIRS", "find_weight_file",
           "default_tae_file", "load_latent_autoencoder"]

AUTOENCODER_KINDS = ("vae", "lightvae", "tae")
# Sub-folders of model_path where LightX2V's find_torch_model_path looks first, in this order, then model_path itself.
LIGHTX2V_WEIGHT_SUBDIRS = ("distill_int8", "distill_fp8", "distill_models", "int8", "fp8", "original")


@runtime_checkable
class LatentAutoencoder(Protocol):
    """What the decode stage (and the I2V encode) calls; see the module docstring for shapes and ranges."""

    config: object  # has z_dim, spatial_factor, temporal_factor

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def decode(self, z: torch.Tensor, tiling=None) -> torch.Tensor: ...

    def encode(self, video: torch.Tensor, tiling=None) -> torch.Tensor: ...


def find_weight_file(model_path: str | Path | None, explicit: str | Path | None, filename: str, key: str) -> Path:
    """LightX2V's ``find_torch_model_path``: the config's ``key`` (e.g. ``tae_path``) when set, else ``filename`` in
    the first of ``model_path/{distill_int8, distill_fp8, distill_models, int8, fp8, original}/`` and ``model_path/``
    that has it; UserError naming every place looked at."""
    if explicit is not None:
        return Path(explicit)
    if model_path is None:
        raise UserError(f"{key} is not set and there is no model_path to look for {filename} in")
    root = Path(model_path)
    places = [root / sub / filename for sub in LIGHTX2V_WEIGHT_SUBDIRS] + [root / filename]
    for p in places:
        if p.exists():
            return p
    raise UserError(f"{key} is not set and {filename} is in none of: {', '.join(str(p) for p in places)}")


def default_tae_file(z_dim: int) -> str:
    """LightX2V's default TAE file name for the model's latents: taew2_2.pth for Wan2.2 TI2V-5B's 48 channels,
    taew2_1.pth otherwise."""
    return TAE22_FILE if z_dim == 48 else TAE_FILE


def load_latent_autoencoder(kind: str, path: str | Path, *, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, z_dim: int | None = None,
                            need_scaled: bool | None = None, part: str = "both") -> LatentAutoencoder:
    """Load the autoencoder of ``kind`` ("vae", "lightvae", "tae") from ``path``.

    ``z_dim``: the latent channels the DiT produces; a file for other latents is a UserError that says which
    autoencoder fits. ``need_scaled``: TAE only, ignored otherwise (None: from the file name, as LightX2V's
    ``enable_lightvae``). ``part``: "encoder" or "decoder" loads only that half (the file is checked whole).
    """
    if kind not in AUTOENCODER_KINDS:
        raise UserError(f"autoencoder kind {kind!r} is not one of {', '.join(AUTOENCODER_KINDS)}")
    if kind == "tae":
        from lightx2v.models.wan.tae import load_tae

        model = load_tae(path, need_scaled=need_scaled, device=device, dtype=dtype, part=part)
    elif kind == "lightvae":
        from lightx2v.models.wan.lightvae import load_lightvae

        model = load_lightvae(path, device=device, dtype=dtype, part=part)
    else:
        from lightx2v.models.wan.vae import load_wan_vae

        model = load_wan_vae(path, device=device, dtype=dtype, part=part)
    if z_dim is not None and model.config.z_dim != z_dim:
        fits = {"tae": f"a TAE for {z_dim}-channel latents ({default_tae_file(z_dim)})",
                "lightvae": f"a LightVAE of the {'Wan2.2' if z_dim == 48 else 'Wan2.1'} VAE",
                "vae": f"the {'Wan2.2' if z_dim == 48 else 'Wan2.1'} VAE"}[kind]
        raise UserError(f"{path} holds a {kind} for {model.config.z_dim}-channel latents, but this model's latents "
                        f"have {z_dim} channels: use {fits}")
    return model
