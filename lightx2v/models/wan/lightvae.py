"""LightX2V's LightVAE (``use_lightvae: true``, ``vae_path: .../lightvaew2_1.safetensors``): the Wan VAE with its
channels pruned (LightX2V builds Wan2.1's VAE with every width times 1 - 0.75, i.e. ``base_dim`` 24 instead of 96),
same layers, same parameter names, same latent space.

Nothing here is a new network: the widths are read from the checkpoint's tensors
(:meth:`~lightx2v.models.wan.vae.WanVAEConfig.from_state_dict`: encoder and decoder widths separately, Wan2.1 or
Wan2.2 layout), and the result is a :class:`~lightx2v.models.wan.vae.WanVAE` that encodes and decodes exactly as the
full one does (normalised latents in, video in [-1, 1] out), only faster. Loading is strict: one CheckpointError
names every missing, unexpected or mis-shaped tensor. LightX2V prunes with ``int(width * (1 - rate))``; rates that
leave the widths proportional to Wan's (0.75, 0.5, ...) give a VAE :class:`WanVAEConfig` describes, others are
rejected with the widths found.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightx2v.errors import CheckpointError
from lightx2v.loading import key_report
from lightx2v.loading import require_file, torch_load_state_dict
from lightx2v.models.wan.vae import WanVAE, WanVAEConfig, load_wan_vae

__all__ = ["LIGHTVAE_FILE", "LIGHTVAE_CONFIG", "read_vae_tensors", "infer_lightvae_config", "pruning_rate",
           "load_lightvae"]

LIGHTVAE_FILE = "lightvaew2_1.safetensors"  # LightX2V's release name (lightx2v/Autoencoders)
LIGHTVAE_PRUNING = 0.75  # the rate LightX2V's WanVAE applies for use_lightvae
LIGHTVAE_CONFIG = WanVAEConfig(base_dim=round(WanVAEConfig().base_dim * (1 - LIGHTVAE_PRUNING)))  # base_dim 24


def read_vae_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``.pth`` state dict (the two forms LightX2V reads)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read it as safetensors: {e}") from e
    return torch_load_state_dict(path)


def infer_lightvae_config(sd: dict[str, torch.Tensor]) -> WanVAEConfig:
    """The (pruned) Wan VAE the tensors describe, with original Wan names; CheckpointError if they describe none."""
    return WanVAEConfig.from_state_dict(sd)


def pruning_rate(cfg: WanVAEConfig) -> float:
    """How much narrower than the released Wan VAE of the same kind: 1 - base_dim / full base_dim (0.75 for
    lightvaew2_1: 24 of 96 channels)."""
    full = WanVAEConfig.wan22() if cfg.is_residual else WanVAEConfig()
    return 1.0 - cfg.base_dim / full.base_dim


def load_lightvae(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  part: str = "both") -> WanVAE:
    """Load a pruned Wan VAE from ``path``: a ``.safetensors`` or ``.pth`` file with the original Wan names, a folder
    holding ``lightvaew2_1.safetensors``, or a diffusers ``vae/`` folder (config.json with the pruned widths).

    The architecture comes from the tensors' shapes. Raises CheckpointError naming the expected and the found keys
    when the file is not a Wan VAE, or when a tensor is missing, unexpected or mis-shaped. ``part``: "encoder" or
    "decoder" builds and loads only that half (the file is still checked whole), as ``load_wan_vae``.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return load_wan_vae(path, device=device, dtype=dtype, part=part)
        path = path / LIGHTVAE_FILE
    source = require_file(path, "LightVAE checkpoint (vae_path)")
    sd = read_vae_tensors(source)
    try:
        cfg = infer_lightvae_config(sd)
    except CheckpointError as e:
        with torch.device("meta"):
            expected = WanVAE(LIGHTVAE_CONFIG).state_dict()
        problems = key_report({k: v.shape for k, v in expected.items()}, sd)
        raise CheckpointError(f"{source} is not a Wan VAE ({e}); against lightvaew2_1's layout (base_dim "
                              f"{LIGHTVAE_CONFIG.base_dim}): " + "; ".join(problems)) from e
    with torch.device("meta"):
        expected = {k: v.shape for k, v in WanVAE(cfg).state_dict().items()}
        vae = WanVAE(cfg, part=part)
    problems = key_report(expected, sd)
    if problems:
        raise CheckpointError(f"{source} does not fit the Wan VAE its shapes describe (base_dim {cfg.base_dim}, "
                              f"decoder_base_dim {cfg.decoder_base_dim}, z_dim {cfg.z_dim}; the file holds "
                              f"{len(sd)} tensors): " + "; ".join(problems))
    tensors = {k: sd[k].to(device=device, dtype=dtype) for k in vae.state_dict()}
    result = vae.load_state_dict(tensors, strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return vae.eval().requires_grad_(False)
