"""The Qwen-Image VAE: RGB images [B, 3, H, W] <-> 16-channel latents [B, 16, H/8, W/8].

**Where it agrees with the Wan2.1 VAE** (``lightx2v.models.wan.vae``), reused here: the architecture is the same
3D causal VAE (diffusers' ``AutoencoderKLQwenImage`` is a copy of ``AutoencoderKLWan``'s Wan2.1 branch: base_dim 96,
dim_mult [1, 2, 4, 4], 2 residual blocks per level, temporal downsampling [no, yes, yes], one single-head attention
block in each middle, 16 latent channels, 8x spatial) with the same parameter layout, so its modules are Wan's
``Encoder3d`` / ``Decoder3d`` / ``CausalConv3d`` holding the weights under the Wan names, and the release's diffusers
names are mapped by Wan's declared rename table (``vae_rename_table``). :meth:`QwenImageVAE.to_wan_vae` gives the
full causal video VAE (``WanVAE``) over the same tensors, for multi-frame input.

**Where they differ:**

* the weights: Qwen fine-tuned the Wan2.1 VAE (its decoder on text-rich images); the latent statistics happen to be
  Wan2.1's values and are read from ``vae/config.json``;
* the config: ``AutoencoderKLQwenImage`` takes ``input_channels`` (3 here; Qwen-Image-Layered's RGBA VAE has 4 and
  is not supported) and none of AutoencoderKLWan's Wan2.2 keys (``is_residual``, ``patch_size``, ...);
* rounding in half precision: diffusers' ``QwenImageRMS_norm`` normalizes in float32 but applies gamma in the
  input dtype; Wan's RMSNorm (ours) applies gamma in float32 too (identical in float32);
* Qwen-Image encodes and decodes **single frames**. A causal 3x3x3 convolution on the first (only) frame sees two
  zero frames of causal padding in front of it, so its output is the 2D convolution with its last temporal tap
  ``weight[:, :, -1]``; the temporal resamplers pass a first chunk through untouched. :meth:`QwenImageVAE.encode`
  and :meth:`decode` therefore run the network as the 2D network it is for one frame: a third of the multiply-adds
  of the 3D evaluation diffusers runs (same values up to float32 summation order), with no causal cache, and a
  graph that exports to ONNX / TensorRT as plain Conv2d layers (``lightx2v.models.qwen_image.trt``).

The VAE can be built with only its encoder half (``encoder.*`` + ``conv1``, diffusers' ``quant_conv``) or only its
decoder half (``conv2``, diffusers' ``post_quant_conv``, + ``decoder.*``): the encoder and decoder stages each load
just their own tensors. Latent normalisation is the reference pipelines': ``(mu - mean) / std`` after encoding,
``z / (1 / std) + mean`` before decoding (in the latents' dtype).

On CUDA the 2D network runs channels-last (cuDNN's fast NHWC convolutions); on the CPU contiguous.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.qwen_image.arch import IMAGE_CHANNELS, QwenImageVAEConfig
from lightx2v.loading import key_problems, open_safetensors, read_json, safetensors_files
from lightx2v.models.wan.vae import (AttentionBlock, CausalConv3d, Decoder3d, Encoder3d, ResidualBlock, Resample,
                                     RMSNorm, vae_rename_table)

VAE_WEIGHTS = "diffusion_pytorch_model"
VAE_CONFIG = "config.json"
PARTS = ("encoder", "decoder")
# Wan-name prefixes of each half
_PART_PREFIXES = {"encoder": ("encoder.", "conv1."), "decoder": ("decoder.", "conv2.")}


# --- the 2D evaluation of Wan's modules on one frame ----------------------------------------------------------


def _conv2d(conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
    """A CausalConv3d applied to the first frame of a sequence: x [B, Cin, H, W] -> [B, Cout, H', W'].

    Its kt temporal taps see kt - 1 zero frames of causal padding and then the frame, so only the last tap counts.
    """
    w = conv.weight[:, :, -1]
    if x.is_cuda:
        w = w.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, w, conv.bias, conv.stride[1:], conv.padding[1:])


def _norm2d(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """Wan's channel RMSNorm (gamma [C, 1, 1, 1]) on [B, C, H, W]: float32 math, cast back."""
    y = F.normalize(x.float(), dim=1) * norm.scale * norm.gamma.float().view(1, -1, 1, 1)
    return y.to(x.dtype)


def _norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
    return _conv2d(conv, F.silu(_norm2d(norm, x)))


def _residual2d(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    norm1, _, conv1, norm2, _, _, conv2 = block.residual
    h = _norm_silu_conv(norm2, conv2, _norm_silu_conv(norm1, conv1, x))
    shortcut = x if isinstance(block.shortcut, nn.Identity) else _conv2d(block.shortcut, x)
    return h.add_(shortcut)


def _attention2d(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    return block(x.unsqueeze(2)).squeeze(2)  # Wan's block attends within each frame already


def _resample2d(block: Resample, x: torch.Tensor) -> torch.Tensor:
    """2x up/downsampling of one frame; the temporal conv of a ``*3d`` resampler skips the first chunk.

    Upsampling: for a factor of exactly 2, "nearest-exact" (the reference's) and "nearest" pick the same source pixel
    (floor((i + 0.5) / 2) == floor(i / 2)); "nearest" is the one every ONNX exporter and TensorRT take.
    """
    if block.mode.startswith("upsample"):
        return block.resample[1](F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return block.resample(x)


def _layer2d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, ResidualBlock):
        return _residual2d(layer, x)
    if isinstance(layer, Resample):
        return _resample2d(layer, x)
    raise TypeError(f"unexpected VAE layer {type(layer).__name__}")  # Wan2.2's residual levels are not Qwen's


def _encoder2d(enc: Encoder3d, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 2z, H/8, W/8] (mean and log-variance)."""
    x = _conv2d(enc.conv1, x)
    for layer in enc.downsamples:
        x = _layer2d(layer, x)
    x = _residual2d(enc.middle[0], x)
    x = _attention2d(enc.middle[1], x)
    x = _residual2d(enc.middle[2], x)
    norm, _, conv = enc.head
    return _norm_silu_conv(norm, conv, x)


def _decoder2d(dec: Decoder3d, x: torch.Tensor) -> torch.Tensor:
    """[B, z, h, w] (after post_quant_conv) -> [B, 3, 8h, 8w], not clamped."""
    x = _conv2d(dec.conv1, x)
    x = _residual2d(dec.middle[0], x)
    x = _attention2d(dec.middle[1], x)
    x = _residual2d(dec.middle[2], x)
    for layer in dec.upsamples:
        x = _layer2d(layer, x)
    norm, _, conv = dec.head
    return _norm_silu_conv(norm, conv, x)


# --- the VAE --------------------------------------------------------------------------------------------------


class QwenImageVAE(nn.Module):
    """The Qwen-Image VAE, or one half of it (``parts``); parameters under the Wan names (see the module docstring).

    Inputs are cast to the parameters' dtype; outputs come in that dtype.
    """

    def __init__(self, config: QwenImageVAEConfig | None = None, parts: Iterable[str] = PARTS) -> None:
        super().__init__()
        cfg = config if config is not None else QwenImageVAEConfig()
        parts = tuple(parts)
        if not parts or any(p not in PARTS for p in parts):
            raise UserError(f"VAE parts {parts!r}: choose from {PARTS}")
        self.config, self.parts = cfg, parts
        wan, z = cfg.to_wan(), cfg.z_dim
        if "encoder" in parts:
            self.encoder = Encoder3d(wan)
            self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # diffusers: quant_conv
        if "decoder" in parts:
            self.conv2 = CausalConv3d(z, z, 1)  # diffusers: post_quant_conv
            self.decoder = Decoder3d(wan)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as [1, z, 1, 1] in ``like``'s dtype and device."""
        shape = (1, self.config.z_dim, 1, 1)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def _need(self, part: str) -> None:
        if part not in self.parts:
            raise RuntimeError(f"this VAE was built without its {part} (parts={self.parts})")

    @torch.no_grad()
    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1], H and W multiples of 8 -> posterior mean [B, z, H/8, W/8] (not
        normalised): diffusers' ``encode(images[:, :, None]).latent_dist.mode()[:, :, 0]``."""
        self._need("encoder")
        sf = self.spatial_factor
        if images.ndim != 4 or images.shape[1] != IMAGE_CHANNELS or images.shape[2] % sf or images.shape[3] % sf:
            raise UserError(f"images must be [B, 3, H, W] with H and W multiples of {sf}, got {list(images.shape)}")
        h = _encoder2d(self.encoder, self._layout(images))
        z = self.config.z_dim
        return F.conv2d(h, self.conv1.weight[:z, :, 0], self.conv1.bias[:z]).contiguous()  # the mean's half

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """latents [B, z, h, w] (not normalised) -> images [B, 3, 8h, 8w] clamped to [-1, 1]: diffusers'
        ``decode(z[:, :, None]).sample[:, :, 0]``."""
        self._need("decoder")
        if z.ndim != 4 or z.shape[1] != self.config.z_dim:
            raise UserError(f"latents must be [B, {self.config.z_dim}, h, w], got {list(z.shape)}")
        x = _conv2d(self.conv2, self._layout(z))
        return _decoder2d(self.decoder, x).clamp_(-1.0, 1.0).contiguous()

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """(mu - mean) / std, as the edit pipelines normalise the image latents."""
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """z / (1 / std) + mean, as the pipelines denormalise before decoding."""
        mean, std = self._stats(z)
        return z / (1.0 / std) + mean

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> normalised latents [B, z, H/8, W/8]."""
        return self.normalize(self.encode_raw(images))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, z, h, w] -> images [B, 3, 8h, 8w] in [-1, 1]."""
        return self.decode_raw(self.denormalize(z.to(self.dtype)))

    def to_wan_vae(self):
        """The causal video VAE (Wan's ``WanVAE``, for multi-frame input) over this VAE's tensors (not copied)."""
        from lightx2v.models.wan.vae import WanVAE

        if set(self.parts) != set(PARTS):
            raise RuntimeError("to_wan_vae() needs both halves of the VAE")
        with torch.device("meta"):
            wan = WanVAE(self.config.to_wan())
        wan.load_state_dict(self.state_dict(), strict=True, assign=True)
        return wan.eval().requires_grad_(False)


# --- loading --------------------------------------------------------------------------------------------------


def read_vae_config(vae_dir: Path) -> QwenImageVAEConfig:
    return QwenImageVAEConfig.from_diffusers_config(read_json(Path(vae_dir) / VAE_CONFIG, "VAE config"))


def _vae_tensors(vae_dir: Path, cfg: QwenImageVAEConfig, parts: tuple[str, ...]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Wan name, tensor) of the requested halves, streamed from the diffusers safetensors; tensors of the other half
    are not read. Keys that are no Qwen-Image VAE parameter come back under their own name (reported as unexpected)."""
    from_diffusers = {dif: wan for wan, dif in vae_rename_table(cfg.to_wan()).items()}
    wanted = tuple(p for part in parts for p in _PART_PREFIXES[part])
    for f in safetensors_files(Path(vae_dir), VAE_WEIGHTS):
        with open_safetensors(f) as sf:
            for key in sf.keys():
                wan = from_diffusers.get(key)
                if wan is None:
                    yield key, sf.get_tensor(key)  # reported as unexpected
                elif wan.startswith(wanted):
                    yield wan, sf.get_tensor(key)


def load_qwen_image_vae(vae_dir: str | Path, *, parts: Iterable[str] = PARTS, device="cpu",
                        dtype: torch.dtype = torch.float32) -> QwenImageVAE:
    """Build the VAE (or the halves in ``parts``) on the meta device and fill it from a diffusers ``vae/`` folder
    (``config.json`` + ``diffusion_pytorch_model*.safetensors``), reading only the requested halves' tensors.
    CheckpointError names (in the release's names) every missing, unexpected or mis-shaped tensor."""
    vae_dir = Path(vae_dir)
    cfg = read_vae_config(vae_dir)
    parts = tuple(parts)
    with torch.device("meta"):
        vae = QwenImageVAE(cfg, parts)
    to_diffusers = vae_rename_table(cfg.to_wan())
    sd = dict(_vae_tensors(vae_dir, cfg, parts))
    expected = {k: v.shape for k, v in vae.state_dict().items()}
    problems = key_problems(expected, sd, show_key=lambda k: to_diffusers.get(k, k))
    if problems:
        raise CheckpointError(f"VAE checkpoint in {vae_dir}: " + "; ".join(problems))
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    vae.load_state_dict(tensors, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def vae_state_dict_to_diffusers(vae: QwenImageVAE) -> dict[str, torch.Tensor]:
    """Our tensors under the release's (diffusers') names."""
    to_diffusers = vae_rename_table(vae.config.to_wan())
    return {to_diffusers[k]: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}


def save_qwen_image_vae(vae: QwenImageVAE, vae_dir: str | Path) -> Path:
    """Write ``vae`` (both halves) as a diffusers ``vae/`` folder that ``AutoencoderKLQwenImage`` loads."""
    import json

    from safetensors.torch import save_file

    if set(vae.parts) != set(PARTS):
        raise UserError("save_qwen_image_vae needs both halves of the VAE")
    vae_dir = Path(vae_dir)
    vae_dir.mkdir(parents=True, exist_ok=True)
    (vae_dir / VAE_CONFIG).write_text(json.dumps(vae.config.to_diffusers_config(), indent=2) + "\n")
    save_file(vae_state_dict_to_diffusers(vae), str(vae_dir / f"{VAE_WEIGHTS}.safetensors"), metadata={"format": "pt"})
    return vae_dir
