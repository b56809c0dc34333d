"""Z-Image's VAE: the 16-channel FLUX autoencoder with diffusers' ``AutoencoderKL`` semantics, as plain PyTorch.

Parameter names are diffusers' (``encoder.down_blocks.0.resnets.0.conv1.weight``, ``decoder.mid_block.attentions.0
.to_q.weight`` ...), so the release's ``vae/diffusion_pytorch_model.safetensors`` loads without renaming.

Latent normalisation is the one ``ZImagePipeline`` applies: the DiT works on ``(z - shift_factor) * scaling_factor``
and decoding first undoes it (``z / scaling_factor + shift_factor``). Images are [B, 3, H, W] in [-1, 1]; latents
[B, latent_channels, H / 8, W / 8] (four blocks: three 2x down/up-samplings).

The one attention (a single head over all pixels of the bottleneck, in the mid block of the encoder and of the
decoder) goes through ``lightx2v.ops.attention``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.models.z_image.arch import ZImageVAEConfig
from lightx2v.ops.attention import AttentionBackend

_EPS = 1e-6  # every GroupNorm of the autoencoder


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (diffusers' ``padding=0`` variant)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidAttention(nn.Module):
    """Single-head self-attention over the H*W pixels (GroupNorm first, residual after)."""

    def __init__(self, ch: int, groups: int, attn: AttentionBackend):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=_EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t)[:, :, None] for proj in (self.to_q, self.to_k, self.to_v))  # [B, HW, 1, C]
        out = self.to_out[0](self.attn(q, k, v)[:, :, 0])  # [B, HW, C]
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool, attn: AttentionBackend):
        super().__init__()
        self.attentions = nn.ModuleList([MidAttention(ch, groups, attn)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for d in getattr(self, "downsamplers", ()):
            x = d(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for u in getattr(self, "upsamplers", ()):
            x = u(x)
        return x


class Encoder(nn.Module):
    """[B, 3, H, W] -> moments [B, 2 * latent_channels, H/8, W/8] (mean, then log-variance)."""

    def __init__(self, cfg: ZImageVAEConfig, attn: AttentionBackend):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, attn)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """[B, latent_channels, h, w] -> [B, 3, 8h, 8w]."""

    def __init__(self, cfg: ZImageVAEConfig, attn: AttentionBackend):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, attn)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class ZImageVAE(nn.Module):
    def __init__(self, cfg: ZImageVAEConfig, attn: AttentionBackend):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, attn)
        self.decoder = Decoder(cfg, attn)
        z = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, latent_channels, H/8, W/8] (raw latent space;
        logvar clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
        """Normalised latents of ``images``: the posterior mean, or (``sample``) a draw ``mean + std * eps`` with
        ``eps`` from ``generator`` drawn like diffusers' ``randn_tensor`` (on the generator's device)."""
        mean, logvar = self.encode_moments(images)
        z = mean
        if sample:
            gen_dev = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=gen_dev, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.normalize(z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.cfg.scaling_factor + self.cfg.shift_factor

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) latents [B, C, h, w] -> images [B, 3, 8h, 8w], nominally in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (what the DiT produces) -> images in [-1, 1] (not clamped), in the VAE's dtype. As the
        pipeline, the latents are cast to the VAE's dtype before the normalisation is undone."""
        return self.decode_raw(self.denormalize(latents.to(self.dtype)))
