"""HunyuanVideo-1.5's VAE (diffusers' ``AutoencoderKLHunyuanVideo15``): 16x spatial, 4x temporal, 32 latent channels.

A causal 3D conv autoencoder whose resolution changes are pixel (un)shuffles with an averaging / repeating shortcut
(DC-AE style): a downsampling step packs each 2x2 (or 2x2x2) neighbourhood into channels, an upsampling step unpacks
them. The first frame is always handled on its own (a video of ``1 + 4k`` frames has ``1 + k`` latent frames), and the
middle of each side has one self-attention block over all tokens where a token sees its own and earlier frames.

Parameter names are diffusers' (``encoder.down_blocks.0.resnets.0.conv1.conv.weight``...); the Tencent release's
(``encoder.down.0.block.0.conv1.conv.weight``...) are mapped in ``checkpoint.py``.

Latent normalisation as the reference pipelines apply it: ``encode`` returns ``mean * scaling_factor`` (the mode of the
posterior; the I2V pipeline takes ``argmax``), ``decode`` divides by ``scaling_factor`` first. Frames are in [-1, 1].
Tiling (``VAETiling``) splits height and width into overlapping tiles blended linearly, exactly as diffusers'
``enable_tiling`` does (256-pixel tiles, 25% overlap by default); time is never split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.models.hunyuan_video_15.arch import HunyuanVideo15VAEConfig


class CausalConv3d(nn.Module):
    """3D conv that pads time on the past side only (replicating the first frame) and space symmetrically."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.pad = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, kernel - 1, 0)
        self.conv = nn.Conv3d(cin, cout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class ChannelRMSNorm(nn.Module):
    """``x / ||x||_channels * sqrt(C) * gamma`` over dim 1 of ``[B, C, T, H, W]`` (statistics in float32 for half)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class FrameCausalAttention(nn.Module):
    """Single-head attention over all ``T*H*W`` tokens of ``[B, C, T, H, W]``; a token attends to every token of its
    own and earlier frames. Computed frame by frame (queries of frame i against keys of frames 0..i), which is the
    reference's block-causal mask without materialising it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelRMSNorm(channels)
        self.to_q = nn.Conv3d(channels, channels, 1)
        self.to_k = nn.Conv3d(channels, channels, 1)
        self.to_v = nn.Conv3d(channels, channels, 1)
        self.proj_out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        n = self.norm(x)
        # [B, C, T, H, W] -> [B, 1, T*H*W, C]
        q, k, v = (proj(n).reshape(b, c, t * h * w).transpose(1, 2)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        hw = h * w
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i * hw:(i + 1) * hw], k[:, :, :(i + 1) * hw],
                                                        v[:, :, :(i + 1) * hw]) for i in range(t)], dim=2)
        out = out[:, 0].transpose(1, 2).reshape(b, c, t, h, w)
        return x + self.proj_out(out)


def _unshuffle(x: torch.Tensor, rt: int) -> torch.Tensor:
    """``[B, C, rt*T, 2H, 2W]`` -> ``[B, rt*4*C, T, H, W]`` (channel index = ((dt * 2 + dy) * 2 + dx) * C + c)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // rt, rt, h // 2, 2, w // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, rt * 4 * c, t // rt, h // 2, w // 2)


def _shuffle(x: torch.Tensor, rt: int) -> torch.Tensor:
    """Inverse of :func:`_unshuffle`: ``[B, rt*4*C, T, H, W]`` -> ``[B, C, rt*T, 2H, 2W]``."""
    b, pc, t, h, w = x.shape
    c = pc // (rt * 4)
    x = x.reshape(b, rt, 2, 2, c, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(b, c, t * rt, h * 2, w * 2)


class Downsample(nn.Module):
    """2x space (and 2x time unless ``temporal`` is False; the first frame alone is never merged in time): a conv to
    ``cout / factor`` channels, unshuffled, plus the unshuffled input averaged over channel groups."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        self.factor = 8 if temporal else 4
        self.conv = CausalConv3d(cin, cout // self.factor)
        self.temporal = temporal
        self.group = self.factor * cin // cout

    def _shortcut(self, x: torch.Tensor, rt: int, groups: int, cout: int) -> torch.Tensor:
        s = _unshuffle(x, rt)
        b, _, t, h, w = s.shape
        return s.reshape(b, cout, groups, t, h, w).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not self.temporal:
            h = _unshuffle(h, 1)
            return h + self._shortcut(x, 1, self.group, h.shape[1])
        first = _unshuffle(h[:, :, :1], 1)
        h = torch.cat([torch.cat([first, first], dim=1), _unshuffle(h[:, :, 1:], 2)], dim=2)
        cout = h.shape[1]
        shortcut = torch.cat([self._shortcut(x[:, :, :1], 1, self.group // 2, cout),
                              self._shortcut(x[:, :, 1:], 2, self.group, cout)], dim=2)
        return h + shortcut


class Upsample(nn.Module):
    """Inverse of :class:`Downsample`: a conv to ``cout * factor`` channels, shuffled, plus the input repeated over
    channels and shuffled (the first frame is doubled in space only)."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        factor = 8 if temporal else 4
        self.conv = CausalConv3d(cin, cout * factor)
        self.temporal = temporal
        self.repeats = factor * cout // cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not self.temporal:
            return _shuffle(h, 1) + _shuffle(x.repeat_interleave(self.repeats, dim=1), 1)
        first = _shuffle(h[:, :, :1], 1)
        h = torch.cat([first[:, : first.shape[1] // 2], _shuffle(h[:, :, 1:], 2)], dim=2)
        x_first = _shuffle(x[:, :, :1], 1).repeat_interleave(self.repeats // 2, dim=1)
        x_next = _shuffle(x[:, :, 1:], 2).repeat_interleave(self.repeats, dim=1)
        return h + torch.cat([x_first, x_next], dim=2)


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels), ResnetBlock(channels, channels)])
        self.attentions = nn.ModuleList([FrameCausalAttention(channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, down_out: int | None, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout, down_out, temporal)]) if down_out is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, up_out: int | None, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout, up_out, temporal)]) if up_out is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """``[B, 3, 1 + 4k, 16h, 16w]`` -> moments ``[B, 2 * latent, 1 + k, h, w]`` (mean, log-variance)."""

    def __init__(self, cfg: HunyuanVideo15VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        s_levels = int(math.log2(cfg.spatial_compression_ratio))
        first_t = int(math.log2(cfg.spatial_compression_ratio // cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            if i < s_levels:
                blocks.append(DownBlock(cin, cout, cfg.layers_per_block, ch[i + 1], temporal=i >= first_t))
                cin = ch[i + 1]
            else:
                blocks.append(DownBlock(cin, cout, cfg.layers_per_block, None, temporal=False))
                cin = cout
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ch[-1])
        self.norm_out = ChannelRMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)
        self.group = ch[-1] // (2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        b, c, t, h, w = x.shape
        shortcut = x.reshape(b, c // self.group, self.group, t, h, w).mean(dim=2)
        return self.conv_out(F.silu(self.norm_out(x))) + shortcut


class Decoder(nn.Module):
    """``[B, latent, 1 + k, h, w]`` -> ``[B, 3, 1 + 4k, 16h, 16w]`` in about [-1, 1]."""

    def __init__(self, cfg: HunyuanVideo15VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        s_levels = int(math.log2(cfg.spatial_compression_ratio))
        t_levels = int(math.log2(cfg.temporal_compression_ratio))
        self.repeat = ch[0] // cfg.latent_channels
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.mid_block = MidBlock(ch[0])
        blocks, cin = [], ch[0]
        for i, cout in enumerate(ch):
            if i < s_levels or i < t_levels:
                blocks.append(UpBlock(cin, cout, cfg.layers_per_block + 1, ch[i + 1], temporal=i < t_levels))
                cin = ch[i + 1]
            else:
                blocks.append(UpBlock(cin, cout, cfg.layers_per_block + 1, None, temporal=False))
                cin = cout
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z) + z.repeat_interleave(self.repeat, dim=1)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


@dataclass(frozen=True)
class VAETiling:
    """Spatial tiling as diffusers' ``AutoencoderKLHunyuanVideo15.enable_tiling``: tiles of ``tile_sample_size``
    pixels (``tile_sample_size / 16`` latents) every ``(1 - overlap)`` of a tile, blended linearly over ``overlap`` of
    a tile. Inputs no larger than one tile are not split."""

    tile_sample_size: int = 256
    overlap: float = 0.25

    def __post_init__(self):
        if not isinstance(self.tile_sample_size, int) or self.tile_sample_size < 16:
            raise ValueError(f"tile_sample_size must be an integer >= 16, got {self.tile_sample_size!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the last ``extent`` rows of ``a`` into the first ``extent`` rows of ``b`` along ``dim`` (in place on
    ``b``): row y gets ``a[-extent + y] * (1 - y/extent) + b[y] * (y/extent)``."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    w = torch.arange(extent, device=b.device, dtype=torch.float32) / extent
    shape = [1] * b.ndim
    shape[dim] = extent
    w = w.reshape(shape)
    tail = a.narrow(dim, a.shape[dim] - extent, extent)
    head = b.narrow(dim, 0, extent)
    head.copy_((tail.float() * (1 - w) + head.float() * w).to(b.dtype))
    return b


def _tiled(fn, x: torch.Tensor, tile_in: int, stride_in: int, blend_out: int, keep_out: int) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile_in``-sized tiles of the last two dims of ``x`` (one every ``stride_in``), blend
    each tile with its upper and left neighbours over ``blend_out`` output rows/cols, keep ``keep_out`` of each."""
    height, width = x.shape[-2:]
    rows = [[fn(x[..., i:i + tile_in, j:j + tile_in]) for j in range(0, width, stride_in)]
            for i in range(0, height, stride_in)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend_out, dim=-2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend_out, dim=-1)
            out_row.append(tile[..., :keep_out, :keep_out])
        out_rows.append(torch.cat(out_row, dim=-1))
    return torch.cat(out_rows, dim=-2)


class HunyuanVideo15VAE(nn.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check_frames(self, frames: int, what: str) -> None:
        t = self.cfg.temporal_compression_ratio
        if frames < 1 or (frames - 1) % t:
            raise ValueError(f"{what} has {frames} frames; the VAE needs 1 + {t}k")

    def encode(self, video: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
        """video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1] -> normalised latents ``[B, 32, 1 + k, H/16, W/16]`` (posterior
        mean times ``scaling_factor``)."""
        self._check_frames(video.shape[2], "video")
        video = video.to(self.encoder.conv_in.conv.weight.dtype)
        s = self.cfg.spatial_compression_ratio
        if tiling is not None and max(video.shape[-2:]) > tiling.tile_sample_size:
            tile = tiling.tile_sample_size
            lat_tile = tile // s
            blend = int(lat_tile * tiling.overlap)
            moments = _tiled(self.encoder, video, tile, int(tile * (1 - tiling.overlap)), blend, lat_tile - blend)
        else:
            moments = self.encoder(video)
        mean = moments[:, : self.cfg.latent_channels]
        return mean * self.cfg.scaling_factor

    def decode(self, latents: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
        """normalised latents ``[B, 32, 1 + k, h, w]`` -> video ``[B, 3, 1 + 4k, 16h, 16w]`` in about [-1, 1]."""
        z = latents.to(self.decoder.conv_in.conv.weight.dtype) / self.cfg.scaling_factor
        s = self.cfg.spatial_compression_ratio
        if tiling is not None and max(z.shape[-2:]) > tiling.tile_sample_size // s:
            tile = tiling.tile_sample_size
            lat_tile = tile // s
            blend = int(tile * tiling.overlap)
            return _tiled(self.decoder, z, lat_tile, int(lat_tile * (1 - tiling.overlap)), blend, tile - blend)
        return self.decoder(z)
