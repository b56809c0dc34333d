"""The tiny autoencoder for Wan latents (TAEHV: ``taew2_1.pth`` for Wan2.1 / Wan2.2 A14B latents, ``taew2_2.pth`` for
Wan2.2 TI2V-5B's; LightX2V's ``use_tae: true, tae_path: ...``, and LightX2V's own distilled ``lighttaew2_*`` files).

A fraction of the full VAE's cost: 2D convolutions only, with time handled by three kinds of layers:

* ``MemBlock``: ReLU(conv3(ReLU(conv2(ReLU(conv1([x_t, x_{t-1}]))))) + skip(x_t)), where x_{t-1} is the same block's
  input one frame earlier (zeros before the first frame): the only path along which information moves in time, and
  only forward (causal).
* ``TPool(stride)`` (encoder): each run of ``stride`` consecutive frames, stacked on channels, through a 1x1 conv ->
  one frame.
* ``TGrow(stride)`` (decoder): a 1x1 conv to ``stride`` times the channels, unstacked into ``stride`` frames.

Encoder: [3p^2 (pixels folded into channels, ``pixel_unshuffle`` by p), F frames] -> conv 64 -> TPool 2, stride-2
conv, 3 MemBlocks -> TPool 2, stride-2 conv, 3 MemBlocks -> TPool 1, stride-2 conv, 3 MemBlocks -> conv to z: 8x in
space, 4x in time (F is padded at the end to a multiple of 4 by repeating its last frame). Decoder: tanh(x/3)*3,
conv 256, 3 MemBlocks, 2x upsample, TGrow 1, conv 128, 3 MemBlocks, 2x, TGrow 2, conv 64, 3 MemBlocks, 2x, TGrow 2,
conv 64, ReLU, conv 3p^2 -> clamp [0, 1], ``pixel_shuffle`` by p, and the first 3 frames dropped: T latent frames ->
4T - 3 = 1 + 4(T - 1) video frames, the full VAE's count. Wan2.1: z = 16, p = 1 (8x); Wan2.2 TI2V-5B: z = 48, p = 2
(16x). Parameter names are the release's (``encoder.{i}.*``, ``decoder.{i}.*``: indices into the two sequences), so
the files load with no renames.

Latent space (LightX2V's ``need_scaled``): ``taew2_1.pth`` / ``taew2_2.pth`` were trained on the diffusion model's
NORMALISED latents ((mu - mean) / std), which :meth:`TinyAutoencoder.decode` receives as they are; LightX2V's
``lighttae*`` files work on the RAW latents, so with ``need_scaled`` the latents are first mapped back
(z * std + mean) and :meth:`~TinyAutoencoder.encode` maps its output forward. LightX2V's ``enable_lightvae`` turns
``need_scaled`` on for a Wan model when the file name contains "lighttae"; :func:`load_tae` does the same when
``need_scaled`` is not given.

Time is processed in chunks of latent frames (``time_chunk``; the encoder takes 4x as many video frames): each chunk
runs through all layers at once (fast), and each MemBlock keeps the last frame of its input for the next chunk
(:class:`TAEState`), so the result equals frame-by-frame processing while memory is bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import CheckpointError, UserError
from lightx2v.loading import key_report
from lightx2v.loading import require_file, torch_load_state_dict
from lightx2v.models.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

__all__ = ["TAE_FILE", "TAE22_FILE", "TAE_PARTS", "TAEConfig", "TAEState", "TinyAutoencoder", "load_tae",
           "save_tae", "read_tae_tensors"]

TAE_FILE = "taew2_1.pth"  # LightX2V's default file name under model_path (Wan2.1, Wan2.2 A14B)
TAE22_FILE = "taew2_2.pth"  # ... for Wan2.2 TI2V-5B
LIGHTTAE_MARK = "lighttae"  # LightX2V's distilled TAEs (raw latents): "lighttaew2_1.safetensors", ...
VIDEO_CHANNELS = 3
TEMPORAL_FACTOR = 4  # two TPool/TGrow of stride 2
SPATIAL_LEVELS = 3  # three stride-2 convs / 2x upsamplings
DEFAULT_TIME_CHUNK = 4  # latent frames per decoder pass (x4 video frames per encoder pass)
TAE_PARTS = ("both", "encoder", "decoder")
_KNOWN_STATS = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}


@dataclass(frozen=True)
class TAEConfig:
    """Sizes of a TAEHV for Wan latents; the defaults are ``taew2_1.pth``'s.

    ``latent_channels`` (z) and ``patch_size`` (p): 16 and 1 for Wan2.1, 48 and 2 for Wan2.2 TI2V-5B.
    ``encoder_channels``: the encoder's width; ``decoder_channels``: the decoder's four widths, coarsest first.
    ``need_scaled``: the network works on raw latents (LightX2V's lighttae), whose statistics ``latents_mean`` /
    ``latents_std`` are then needed (Wan2.1's for z = 16, Wan2.2's for z = 48).
    """

    latent_channels: int = 16
    patch_size: int = 1
    encoder_channels: int = 64
    decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 64)
    need_scaled: bool = False
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        set_(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        set_(self, "latents_std", tuple(float(v) for v in self.latents_std))
        problems = []
        if min(self.latent_channels, self.patch_size, self.encoder_channels) < 1:
            problems.append(f"latent_channels={self.latent_channels}, patch_size={self.patch_size}, "
                            f"encoder_channels={self.encoder_channels} must be >= 1")
        if len(self.decoder_channels) != 4 or min(self.decoder_channels) < 1:
            problems.append(f"decoder_channels={list(self.decoder_channels)} must be 4 widths >= 1")
        if not isinstance(self.need_scaled, bool):
            problems.append(f"need_scaled={self.need_scaled!r} must be true or false")
        if len(self.latents_mean) != self.latent_channels or len(self.latents_std) != self.latent_channels:
            problems.append(f"latents_mean and latents_std must have {self.latent_channels} values, got "
                            f"{len(self.latents_mean)} and {len(self.latents_std)}")
        elif any(s <= 0 for s in self.latents_std):
            problems.append("latents_std must be > 0")
        if problems:
            raise UserError("invalid TAE config: " + "; ".join(problems))

    @classmethod
    def wan22(cls, need_scaled: bool = False) -> TAEConfig:
        """``taew2_2.pth``: Wan2.2 TI2V-5B's 48 latent channels, 2x2 pixel patches (16x in space)."""
        return cls(latent_channels=48, patch_size=2, need_scaled=need_scaled, latents_mean=WAN22_LATENTS_MEAN,
                   latents_std=WAN22_LATENTS_STD)

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def image_channels(self) -> int:
        """Channels of the patchified frames the encoder takes and the decoder returns: 3 * p^2."""
        return VIDEO_CHANNELS * self.patch_size**2

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W: 8 * p."""
        return 2**SPATIAL_LEVELS * self.patch_size

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first: 4."""
        return TEMPORAL_FACTOR

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], need_scaled: bool = False) -> TAEConfig:
        """Read the sizes from the release's tensors: z from ``decoder.1.weight`` [c0, z, 3, 3], p from
        ``encoder.0.weight`` [e, 3p^2, 3, 3], the decoder widths from its convs 1, 8, 14, 20. The latent statistics
        are Wan2.1's for z = 16, Wan2.2's for z = 48 (other z need ``need_scaled=False``). Raises CheckpointError."""
        try:
            enc0, dec1 = sd["encoder.0.weight"], sd["decoder.1.weight"]
            widths = tuple(int(sd[f"decoder.{i}.weight"].shape[0]) for i in (1, 8, 14, 20))
            z, folded, enc = int(dec1.shape[1]), int(enc0.shape[1]), int(enc0.shape[0])
        except (KeyError, IndexError, AttributeError) as e:
            raise CheckpointError(f"not a TAEHV: cannot read its sizes ({type(e).__name__}: {e})") from e
        p = round((folded / VIDEO_CHANNELS) ** 0.5)
        if VIDEO_CHANNELS * p * p != folded:
            raise CheckpointError(f"not a TAEHV: its encoder takes {folded} channels, not 3 * p^2")
        if z in _KNOWN_STATS:
            mean, std = _KNOWN_STATS[z]
        elif need_scaled:
            raise CheckpointError(f"a TAE of {z} latent channels: the statistics need_scaled uses are known for 16 "
                                  "(Wan2.1) and 48 (Wan2.2) only")
        else:
            mean, std = (0.0,) * z, (1.0,) * z  # unused without need_scaled
        try:
            return cls(latent_channels=z, patch_size=p, encoder_channels=enc, decoder_channels=widths,
                       need_scaled=need_scaled, latents_mean=mean, latents_std=std)
        except UserError as e:
            raise CheckpointError(f"not a TAEHV: {e}") from e


# --- layers -----------------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """x, past [N, C, H, W] (past: this block's input one frame earlier) -> ReLU(convs([x, past]) + skip(x))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * cin, cout), nn.ReLU(inplace=True), _conv(cout, cout),
                                  nn.ReLU(inplace=True), _conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu_(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """[N*T, C, H, W] -> [N*T/stride, C, H, W]: each run of ``stride`` frames, stacked on channels (earliest first),
    through a 1x1 conv (no bias)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        return self.conv(x.reshape(nt // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """[N*T, C, H, W] -> [N*T*stride, C, H, W]: a 1x1 conv (no bias) to ``stride`` x C channels whose k-th group is
    output frame ``stride * t + k``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)


class TAEState:
    """What a chunked pass carries between chunks: per MemBlock (by its index in the sequence), the last frame of its
    input [N, 1, C, H, W]. Lives for one encode/decode call; :meth:`reset` empties it."""

    def __init__(self) -> None:
        self.last: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.last.clear()


def _run_chunk(seq: nn.Sequential, x: torch.Tensor, state: TAEState) -> torch.Tensor:
    """One chunk of frames x [N, T, C, H, W] through ``seq``, all frames at once -> [N, T', C', H', W'].

    A MemBlock's ``past`` is its input shifted one frame later in time, with the previous chunk's last frame (zeros
    for the first chunk) in front. TPool needs T (at that layer) to be a multiple of its stride.
    """
    n = x.shape[0]
    h = x.flatten(0, 1)
    for i, layer in enumerate(seq):
        if isinstance(layer, MemBlock):
            frames = h.unflatten(0, (n, -1))  # [N, T, C, H, W]
            prev = state.last.get(i)
            if prev is None:
                prev = torch.zeros_like(frames[:, :1])
            past = torch.cat([prev, frames[:, :-1]], dim=1).flatten(0, 1)
            state.last[i] = frames[:, -1:].clone()
            h = layer(h, past)
        else:
            h = layer(h)
    return h.unflatten(0, (n, -1))


class TinyAutoencoder(nn.Module):
    """TAEHV for Wan latents behind the same calls as :class:`~lightx2v.models.wan.vae.WanVAE`:
    ``decode(normalised latents [B, z, T, h, w]) -> video [B, 3, 1 + 4(T-1), h*s, w*s] in [-1, 1]`` and
    ``encode(video in [-1, 1]) -> normalised latents``. Inputs are cast to the parameters' dtype; outputs come in
    that dtype. ``part``: "both", or only the "encoder" or the "decoder" for a stage that needs one half (the other
    attribute is None)."""

    def __init__(self, config: TAEConfig | None = None, part: str = "both") -> None:
        super().__init__()
        if part not in TAE_PARTS:
            raise ValueError(f"part={part!r} must be one of {TAE_PARTS}")
        cfg = config if config is not None else TAEConfig()
        self.config, self.part = cfg, part
        e, (d0, d1, d2, d3) = cfg.encoder_channels, cfg.decoder_channels

        def mem3(c: int) -> list[nn.Module]:
            return [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c)]

        self.encoder = None if part == "decoder" else nn.Sequential(
            _conv(cfg.image_channels, e), nn.ReLU(inplace=True),
            TPool(e, 2), _conv(e, e, stride=2, bias=False), *mem3(e),
            TPool(e, 2), _conv(e, e, stride=2, bias=False), *mem3(e),
            TPool(e, 1), _conv(e, e, stride=2, bias=False), *mem3(e),
            _conv(e, cfg.latent_channels),
        )  # fmt: skip
        self.decoder = None if part == "encoder" else nn.Sequential(
            Clamp(), _conv(cfg.latent_channels, d0), nn.ReLU(inplace=True),
            *mem3(d0), nn.Upsample(scale_factor=2), TGrow(d0, 1), _conv(d0, d1, bias=False),
            *mem3(d1), nn.Upsample(scale_factor=2), TGrow(d1, 2), _conv(d1, d2, bias=False),
            *mem3(d2), nn.Upsample(scale_factor=2), TGrow(d2, 2), _conv(d2, d3, bias=False),
            nn.ReLU(inplace=True), _conv(d3, cfg.image_channels),
        )  # fmt: skip
        # the decoder's first outputs precede the first latent frame's video frame (TGrow 2 x 2 -> 3 extra frames)
        self.frames_to_trim = cfg.temporal_factor - 1

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _require(self, half: str) -> None:
        if getattr(self, half) is None:
            raise UserError(f"this TAE was loaded with part={self.part!r}: it has no {half}")

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiling=None, time_chunk: int | None = DEFAULT_TIME_CHUNK) -> torch.Tensor:
        """normalised latents [B, z, T, h, w] -> video [B, 3, 1 + 4(T-1), h*s, w*s] in [-1, 1] (s = 8p).

        ``time_chunk``: latent frames per pass (None: all at once; memory grows with it, the result does not
        change). ``tiling`` is accepted for the decode stage's uniform call and not used: the chunks bound the
        memory, and LightX2V applies its VAE tiling to the full VAE only.
        """
        cfg = self.config
        self._require("decoder")
        if z.ndim != 5 or z.shape[1] != cfg.z_dim:
            raise UserError(f"latents must be [B, {cfg.z_dim}, T, h, w], got {list(z.shape)}")
        _check_chunk(time_chunk)
        x = z.float()
        if cfg.need_scaled:  # the network works on raw latents: undo the normalisation
            mean, std = self._stats(x.device)
            x = x * std + mean
        x = x.to(self.dtype).transpose(1, 2)  # [B, T, z, h, w]
        b, t, _, h, w = x.shape
        p, s = cfg.patch_size, cfg.spatial_factor
        out = torch.empty(b, VIDEO_CHANNELS, cfg.temporal_factor * t - self.frames_to_trim, h * s, w * s,
                          dtype=self.dtype, device=x.device)
        state, skip, written = TAEState(), self.frames_to_trim, 0
        with _cudnn_autotune(x.is_cuda):
            for chunk in x.split(time_chunk or t, dim=1):
                y = _run_chunk(self.decoder, chunk, state).clamp_(0.0, 1.0)  # [B, 4Tc, 3p^2, H/p, W/p]
                if p > 1:
                    y = F.pixel_shuffle(y.flatten(0, 1), p).unflatten(0, (b, -1))  # [B, 4Tc, 3, H, W]
                y = y[:, skip:]
                skip = 0
                out[:, :, written : written + y.shape[1]] = y.transpose(1, 2)
                written += y.shape[1]
                del y
        assert written == out.shape[2]
        return out.mul_(2.0).sub_(1.0)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tiling=None, time_chunk: int | None = DEFAULT_TIME_CHUNK) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, z, ceil(F / 4), H/s, W/s] (F = 1 + 4k gives
        k + 1, the full VAE's count). ``time_chunk``: latent frames per pass (4x as many video frames); ``tiling``
        is not used (see :meth:`decode`)."""
        cfg = self.config
        self._require("encoder")
        if video.ndim != 5 or video.shape[1] != VIDEO_CHANNELS:
            raise UserError(f"video must be [B, 3, F, H, W], got {list(video.shape)}")
        _check_chunk(time_chunk)
        b, _, f, h, w = video.shape
        s, p = cfg.spatial_factor, cfg.patch_size
        if h % s or w % s:
            raise UserError(f"video of {h}x{w}: H and W must be divisible by {s}")
        x = ((video.float() + 1.0) / 2.0).to(self.dtype).transpose(1, 2)  # [B, F, 3, H, W] in [0, 1]
        if p > 1:
            x = F.pixel_unshuffle(x.flatten(0, 1), p).unflatten(0, (b, -1))  # [B, F, 3p^2, H/p, W/p]
        pad = -f % cfg.temporal_factor  # repeat the last frame up to a multiple of 4
        if pad:
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        state, parts = TAEState(), []
        frames_per_pass = cfg.temporal_factor * (time_chunk or x.shape[1])
        with _cudnn_autotune(x.is_cuda):
            for chunk in x.split(frames_per_pass, dim=1):
                parts.append(_run_chunk(self.encoder, chunk, state))  # [B, Tc, z, h, w]
        lat = torch.cat(parts, dim=1).transpose(1, 2).float()  # [B, z, T, h, w]
        if cfg.need_scaled:  # raw -> normalised
            mean, std = self._stats(lat.device)
            lat = (lat - mean) / std
        return lat.to(self.dtype).contiguous()


def _check_chunk(time_chunk) -> None:
    if time_chunk is not None and (isinstance(time_chunk, bool) or not isinstance(time_chunk, int) or time_chunk < 1):
        raise UserError(f"time_chunk={time_chunk!r} must be None or an integer >= 1")


class _cudnn_autotune:
    """cudnn.benchmark on for one encode/decode on CUDA (the same conv shapes repeat for every chunk), restored."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.saved or self.on

    def __exit__(self, *exc) -> None:
        torch.backends.cudnn.benchmark = self.saved


# --- loading ----------------------------------------------------------------------------------------------------------


def read_tae_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` (torch.save of a state dict) or ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read it as safetensors: {e}") from e
    return torch_load_state_dict(path)


def _tae_file(path: str | Path) -> Path:
    """``path``, or for a folder the one of taew2_1.pth / taew2_2.pth it holds."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in (TAE_FILE, TAE22_FILE) if (path / n).is_file()]
        if len(found) != 1:
            raise UserError(f"tae_path {str(path)!r} is a folder holding {'both' if found else 'neither'} of "
                            f"{TAE_FILE} and {TAE22_FILE}: name the file")
        path = found[0]
    return require_file(path, "TAE checkpoint (tae_path)")


def _trim_tgrow(sd: dict[str, torch.Tensor], model: TinyAutoencoder) -> None:
    """A TGrow whose file weight has k times the rows the model's has (a TAEHV trained with one more temporal
    upsampling): keep the last rows, the weights of the last of the k frames, as the reference loader does."""
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd:
            want, got = layer.conv.weight.shape[0], sd[key].shape[0]
            if got > want and got % want == 0 and sd[key].shape[1:] == layer.conv.weight.shape[1:]:
                sd[key] = sd[key][-want:]


def load_tae(path: str | Path, *, need_scaled: bool | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, part: str = "both") -> TinyAutoencoder:
    """Load a TAEHV for Wan latents from ``taew2_1.pth`` / ``taew2_2.pth`` / LightX2V's ``lighttaew2_*.safetensors``
    (or a folder holding taew2_1.pth or taew2_2.pth), strictly: sizes from the tensors, every missing, unexpected or
    mis-shaped tensor in one CheckpointError.

    ``need_scaled``: the file works on raw latents (see the module docstring); None: as LightX2V's
    ``enable_lightvae`` decides, True when the file name contains "lighttae". ``part``: "encoder" or "decoder"
    builds and loads only that half (the file is still checked whole).
    """
    source = _tae_file(path)
    if need_scaled is None:
        need_scaled = LIGHTTAE_MARK in source.name.lower()
    sd = read_tae_tensors(source)
    try:
        cfg = TAEConfig.from_state_dict(sd, need_scaled=need_scaled)
    except CheckpointError as e:
        with torch.device("meta"):
            expected = TinyAutoencoder().state_dict()
        problems = key_report({k: v.shape for k, v in expected.items()}, sd)
        raise CheckpointError(f"{source}: {e}; against taew2_1.pth's layout: " + "; ".join(problems)) from e
    with torch.device("meta"):
        whole = TinyAutoencoder(cfg)
        model = TinyAutoencoder(cfg, part=part)
    _trim_tgrow(sd, whole)
    expected = {k: v.shape for k, v in whole.state_dict().items()}
    problems = key_report(expected, sd)
    if problems:
        raise CheckpointError(f"{source} does not fit a TAEHV of {cfg.latent_channels} latent channels, patch "
                              f"{cfg.patch_size}, widths {cfg.encoder_channels}/{list(cfg.decoder_channels)} (the "
                              f"file holds {len(sd)} tensors): " + "; ".join(problems))
    tensors = {k: sd[k].to(device=device, dtype=dtype) for k in model.state_dict()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval().requires_grad_(False)


def save_tae(model: TinyAutoencoder, path: str | Path) -> Path:
    """Write ``model`` as the release does: ``.pth`` (torch.save of the state dict) or ``.safetensors`` by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path
