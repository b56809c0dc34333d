"""RIFE's IFNet, the v4.2x generation that LightX2V runs from RIFEv4.26's ``flownet.pkl`` (Practical-RIFE).

Given two frames I0, I1 [B, 3, H, W] in [0, 1] and a time t in [0, 1], IFNet estimates the two optical flows from the
intermediate frame back to I0 and to I1 and a blending mask, then returns
``warp(I0, flow_t0) * m + warp(I1, flow_t1) * (1 - m)``.

* A small feature head (``encode``) turns each frame into F = 4 feature channels at full resolution.
* Five IFBlocks refine the estimate from coarse to fine: block i works at 1/s_i of the resolution (s = 16, 8, 4, 2, 1
  at ``scale=1``). Block 0 sees the frames, their features and t; each later block sees both frames and both feature
  maps backward-warped by the current flow, t, the previous mask logit, the previous block's 8 feature channels and
  the flow itself, and adds a flow correction (the mask logit and the features are replaced).
* Each block: two stride-2 convolutions (LeakyReLU 0.2) to c channels at 1/4 of its input, 8 residual convolutions
  with a learned per-channel gain ``beta``, and a stride-2 transposed convolution to 4 * 13 channels that a 2x pixel
  shuffle turns into 13 channels at the block's input resolution (4 flow, 1 mask logit, 8 features); the result is
  resized bilinearly back to full resolution and the flow multiplied by s_i (flows are in pixels).

Parameter names are those of the release (without its ``module.`` prefix), so its state dict loads strictly (see
:mod:`lightx2v.models.rife.checkpoint`). Backward warping follows the original: ``grid_sample`` with bilinear
interpolation, ``align_corners=True`` and border padding, flow in pixels.

Precision: the convolutions run in the module's dtype (float32 on the CPU, bf16/fp16 on a GPU); the flow, its
accumulation across blocks, the warps and the final blend run in float32 (a bf16 sampling grid would be off by up to
~1.6 pixels at 832 wide). In float32 the result is the original's operation for operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import UserError

__all__ = ["IFNetConfig", "IFNet", "warp"]

IMAGE_CHANNELS = 3
FLOW_CHANNELS = 4  # (dx, dy) towards frame 0, (dx, dy) towards frame 1
BLOCK_FEATURES = 8  # feature channels a block hands to the next one
BLOCK_OUTPUTS = FLOW_CHANNELS + 1 + BLOCK_FEATURES  # 13: flow, mask logit, features
RES_CONVS = 8  # residual convolutions per block
NEGATIVE_SLOPE = 0.2  # of every LeakyReLU


@dataclass(frozen=True)
class IFNetConfig:
    """Widths of an IFNet; the defaults are RIFE v4.26's.

    ``block_channels``: the working width c of each IFBlock, coarsest first (the number of blocks follows; block i
    runs at 1/2^(n-1-i) of the resolution at ``scale=1``). ``feature_channels``: channels of the feature head's output
    (4 in v4.25/v4.26). ``head_channels``: the feature head's inner width.
    """

    block_channels: tuple[int, ...] = (192, 128, 96, 64, 32)
    feature_channels: int = 4
    head_channels: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_channels", tuple(int(c) for c in self.block_channels))
        problems = []
        if not self.block_channels or any(c < 2 or c % 2 for c in self.block_channels):
            problems.append(f"block_channels={list(self.block_channels)} must be a non-empty list of even widths >= 2")
        if self.feature_channels < 1 or self.head_channels < 1:
            problems.append(f"feature_channels={self.feature_channels}, head_channels={self.head_channels} must be "
                            ">= 1")
        if problems:
            raise UserError("invalid IFNet config: " + "; ".join(problems))

    @property
    def first_block_inputs(self) -> int:
        """Block 0 sees I0, I1, their features and t: 3 + 3 + 2F + 1 channels (15 in v4.26)."""
        return 2 * IMAGE_CHANNELS + 2 * self.feature_channels + 1

    @property
    def later_block_inputs(self) -> int:
        """Later blocks: warped I0, I1 and features, t, mask logit, 8 features, flow: 3+3+2F+1+1+8+4 (28 in v4.26)."""
        return 2 * IMAGE_CHANNELS + 2 * self.feature_channels + 1 + 1 + BLOCK_FEATURES + FLOW_CHANNELS

    def size_multiple(self, scale: float = 1.0) -> int:
        """H and W must be multiples of this: the coarsest block works at 1/s_0 of the size and halves it twice
        (64 for v4.26 at ``scale=1``; LightX2V pads to 128)."""
        return max(1, round(4 * self.block_scales(scale)[0]))

    def block_scales(self, scale: float = 1.0) -> list[float]:
        """Downscaling factor of each block: [16, 8, 4, 2, 1] / scale for five blocks (the original's scale_list)."""
        n = len(self.block_channels)
        return [2 ** (n - 1 - i) / scale for i in range(n)]


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out[b, :, y, x] = x[b, :, y + flow[b, 1, y, x], x + flow[b, 0, y, x]], bilinear.

    x [B, C, H, W], flow [B, 2, H, W] in pixels -> [B, C, H, W] float32. Sampling positions outside the frame are
    clamped to its border (``grid_sample`` with ``padding_mode="border"``, ``align_corners=True``: the normalised
    coordinates -1 and 1 are the centres of the first and last pixels). The grid is built and sampled in float32.
    """
    _, _, h, w = x.shape
    flow = flow.float()
    base_x = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=torch.float32).view(1, 1, w)
    base_y = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=torch.float32).view(1, h, 1)
    grid = torch.stack([base_x + flow[:, 0] / ((w - 1.0) / 2.0), base_y + flow[:, 1] / ((h - 1.0) / 2.0)], dim=-1)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)


def _conv_act(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 convolution (padding 1) + LeakyReLU(0.2): the original ``conv`` helper, indices ``0`` (conv) and ``1``."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))


class Head(nn.Module):
    """The feature head: [B, 3, H, W] -> [B, F, H, W] (a stride-2 conv, two convs at half resolution, and a stride-2
    transposed conv back to full resolution; LeakyReLU between them, none at the end)."""

    def __init__(self, cfg: IFNetConfig) -> None:
        super().__init__()
        c = cfg.head_channels
        self.cnn0 = nn.Conv2d(IMAGE_CHANNELS, c, 3, 2, 1)
        self.cnn1 = nn.Conv2d(c, c, 3, 1, 1)
        self.cnn2 = nn.Conv2d(c, c, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(c, cfg.feature_channels, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.cnn0(x), NEGATIVE_SLOPE)
        x = F.leaky_relu(self.cnn1(x), NEGATIVE_SLOPE)
        x = F.leaky_relu(self.cnn2(x), NEGATIVE_SLOPE)
        return self.cnn3(x)


class ResConv(nn.Module):
    """LeakyReLU(conv3x3(x) * beta + x), beta a learned per-channel gain [1, c, 1, 1]. [B, c, h, w] -> same."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x) * self.beta + x, NEGATIVE_SLOPE)


class IFBlock(nn.Module):
    """One coarse-to-fine step: inputs at full resolution -> (flow [B, 4, H, W] float32 in pixels, mask logit
    [B, 1, H, W], features [B, 8, H, W]), computed at 1/``scale`` of the resolution.

    ``conv0``: two stride-2 conv + LeakyReLU (to c/2, then c channels at 1/4 of the block's input); ``convblock``: 8
    :class:`ResConv`; ``lastconv``: a stride-2 transposed conv to 52 channels and a 2x pixel shuffle to 13 channels at
    the block's input resolution.
    """

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(_conv_act(cin, c // 2, 2), _conv_act(c // 2, c, 2))
        self.convblock = nn.Sequential(*(ResConv(c) for _ in range(RES_CONVS)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * BLOCK_OUTPUTS, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [B, cin - 4 (or cin), H, W] in the block's dtype; flow: [B, 4, H, W] float32 or None (block 0).
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:  # the flow is resized in float32 and, like every length, divided by the scale
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) * 1.0 / scale
            x = torch.cat([x, flow.to(x.dtype)], dim=1)
        feat = self.convblock(self.conv0(x))  # [B, c, h/4, w/4]
        out = self.lastconv(feat)  # [B, 13, h, w]
        out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)  # [B, 13, H, W]
        return out[:, :FLOW_CHANNELS].float() * scale, out[:, FLOW_CHANNELS : FLOW_CHANNELS + 1], \
            out[:, FLOW_CHANNELS + 1 :]


class IFNet(nn.Module):
    """RIFE's flow network: (I0, I1, t) -> the frame at time t between them.

    ``forward(img0, img1, timestep)``: img0, img1 [B, 3, H, W] in [0, 1] with H and W multiples of
    :meth:`IFNetConfig.size_multiple` (64 for v4.26 at ``scale=1``; the caller pads:
    :func:`lightx2v.models.rife.interpolate` pads to multiples of 128 as LightX2V does), timestep [B] (or a float)
    in [0, 1] -> [B, 3, H, W] float32. ``f0``, ``f1``: the frames' features ``encode(img)`` when the caller already
    has them (a frame shared by several pairs is encoded once).
    """

    def __init__(self, config: IFNetConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else IFNetConfig()
        self.config = cfg
        for i, c in enumerate(cfg.block_channels):
            self.add_module(f"block{i}", IFBlock(cfg.first_block_inputs if i == 0 else cfg.later_block_inputs, c))
        self.encode = Head(cfg)

    @property
    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{i}") for i in range(len(self.config.block_channels))]

    @property
    def dtype(self) -> torch.dtype:
        return self.encode.cnn0.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encode.cnn0.weight.device

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor | float, scale: float = 1.0,
                f0: torch.Tensor | None = None, f1: torch.Tensor | None = None) -> torch.Tensor:
        dt = self.dtype
        b, _, h, w = img0.shape
        m = self.config.size_multiple(scale)
        if img1.shape != img0.shape or img0.shape[1] != IMAGE_CHANNELS or h % m or w % m:
            raise UserError(f"IFNet takes two [B, 3, H, W] frames with H and W multiples of {m} (pad them), got "
                            f"{list(img0.shape)} and {list(img1.shape)}")
        img0, img1 = img0.to(dt), img1.to(dt)
        t = torch.as_tensor(timestep, dtype=dt, device=img0.device).reshape(-1, 1, 1, 1).expand(b, 1, h, w)
        f0 = self.encode(img0) if f0 is None else f0.to(dt)  # [B, F, H, W]
        f1 = self.encode(img1) if f1 is None else f1.to(dt)
        flow = mask = feat = None
        warped0, warped1 = img0, img1
        for block, s in zip(self.blocks, self.config.block_scales(scale)):
            if flow is None:
                flow, mask, feat = block(torch.cat([img0, img1, f0, f1, t], dim=1), None, s)
            else:
                wf0, wf1 = warp(f0, flow[:, :2]).to(dt), warp(f1, flow[:, 2:4]).to(dt)
                x = torch.cat([warped0.to(dt), warped1.to(dt), wf0, wf1, t, mask, feat], dim=1)
                delta, mask, feat = block(x, flow, s)
                flow = flow + delta  # float32
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])  # float32
        m = torch.sigmoid(mask.float())
        return warped0 * m + warped1 * (1 - m)
