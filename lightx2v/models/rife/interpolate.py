"""Frame-rate conversion with RIFE: LightX2V's ``video_frame_interpolation`` block.

``{"video_frame_interpolation": {"algo": "rife", "target_fps": 32, "model_path": ".../flownet.pkl"}}``: the decoded
frames (at the config's ``fps``, 16 by default) are resampled in time to ``target_fps`` and the video is written at
``target_fps``. :class:`VFIConfig` reads the block; :func:`interpolate` does the resampling.

Timing (LightX2V's ``RIFEWrapper._calculate_target_frame_positions``): a video of N frames at ``fps`` lasts
(N - 1) / fps seconds; the output has ``floor((N - 1) / fps * target_fps) + 1`` frames, frame k at time
k / target_fps, i.e. at source position p = k * fps / target_fps. Where p is a whole number the source frame is
copied; otherwise frames floor(p) and floor(p) + 1 are blended by RIFE at t = p - floor(p). Positions are computed
exactly (rational arithmetic), where LightX2V's floating point sometimes lands a hair below a whole number (121
frames at 25 -> 60 fps: output frame 276 is RIFE(114, 115, t=0.99999999999999) there, a copy of source frame 115
here); otherwise the positions and counts are the same. ``target_fps = 2 * fps`` gives 2N - 1 frames: the originals
at the even indices, RIFE's midpoints (t = 0.5) at the odd ones.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightx2v.errors import UserError
from lightx2v.models.rife.ifnet import IFNet

__all__ = ["VFIConfig", "FramePosition", "frame_positions", "interpolate", "PAD_MULTIPLE", "SCALES"]

ALGOS = ("rife",)
PAD_MULTIPLE = 128  # frames are zero-padded right/bottom to a multiple of max(128, 128 / scale), as in LightX2V
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # RIFE's ``scale``: the flow is estimated at this fraction of the resolution
DEFAULT_BATCH = 8  # frame pairs per network call


@dataclass(frozen=True)
class VFIConfig:
    """LightX2V's ``video_frame_interpolation`` block: ``algo`` ("rife"), ``target_fps`` (> 0) and ``model_path``
    (``flownet.pkl``, or the folder holding it). ``batch_size``: frame pairs per RIFE call (ours; memory on the
    device grows with it, the result does not change)."""

    target_fps: float
    model_path: str
    algo: str = "rife"
    batch_size: int = DEFAULT_BATCH

    def __post_init__(self) -> None:
        problems = []
        if self.algo not in ALGOS:
            problems.append(f"algo={self.algo!r} is not supported (allowed: {', '.join(map(repr, ALGOS))})")
        if not _is_positive_number(self.target_fps):
            problems.append(f"target_fps={self.target_fps!r} must be a number > 0")
        if not isinstance(self.model_path, (str, Path)) or not str(self.model_path):
            problems.append(f"model_path={self.model_path!r} must name RIFE's flownet.pkl")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} must be an integer >= 1")
        if problems:
            raise UserError("video_frame_interpolation: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VFIConfig:
        """Read the JSON block; unknown keys and missing ``target_fps``/``model_path`` raise UserError."""
        if not isinstance(d, Mapping):
            raise UserError(f"video_frame_interpolation must be an object with algo, target_fps, model_path, got "
                            f"{d!r}")
        known = ("algo", "target_fps", "model_path", "batch_size")
        unknown = sorted(set(d) - set(known))
        missing = [k for k in ("target_fps", "model_path") if d.get(k) is None]
        if unknown or missing:
            raise UserError("video_frame_interpolation: " + "; ".join(
                ([f"unknown keys {unknown} (allowed: {', '.join(known)})"] if unknown else [])
                + ([f"missing {', '.join(missing)}"] if missing else [])))
        return cls(**{k: d[k] for k in known if k in d})

    def check_fps(self, fps: float) -> None:
        """UserError unless ``target_fps >= fps`` (RIFE adds frames; it does not drop them)."""
        _check_rates(fps, self.target_fps)


def _is_positive_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Real) and math.isfinite(x) and x > 0


def _check_rates(fps, target_fps) -> None:
    for name, v in (("fps", fps), ("target_fps", target_fps)):
        if not _is_positive_number(v):
            raise UserError(f"video_frame_interpolation: {name}={v!r} must be a number > 0")
    if target_fps < fps:
        raise UserError(f"video_frame_interpolation: target_fps={target_fps} is below the video's fps={fps}; frame "
                        "interpolation only raises the frame rate (allowed: target_fps >= fps)")


def _rational(x: float) -> Fraction:
    """A frame rate as an exact fraction: 16 -> 16, 29.97 -> 2997/100 (the decimal the user wrote)."""
    return Fraction(x).limit_denominator(1_000_000)


@dataclass(frozen=True)
class FramePosition:
    """Output frame from source frames ``i0`` and ``i1 = i0 + 1`` at time ``t`` in (0, 1); ``t == 0``: a copy of
    frame ``i0`` (then ``i1 == i0``)."""

    i0: int
    i1: int
    t: float


def frame_positions(num_frames: int, fps: float, target_fps: float) -> list[FramePosition]:
    """Where each output frame comes from (see the module docstring); ``num_frames >= 1``, ``target_fps >= fps``."""
    _check_rates(fps, target_fps)
    if num_frames < 1:
        raise UserError(f"video_frame_interpolation: need at least 1 frame, got {num_frames}")
    src, dst = _rational(fps), _rational(target_fps)
    count = math.floor((num_frames - 1) * dst / src) + 1
    out = []
    for k in range(count):
        p = k * src / dst
        i0 = math.floor(p)
        if p == i0 or i0 + 1 >= num_frames:
            out.append(FramePosition(min(i0, num_frames - 1), min(i0, num_frames - 1), 0.0))
        else:
            out.append(FramePosition(i0, i0 + 1, float(p - i0)))
    return out


def _pad_size(h: int, w: int, scale: float) -> tuple[int, int]:
    m = max(PAD_MULTIPLE, int(PAD_MULTIPLE / scale))
    return -(-h // m) * m, -(-w // m) * m


@contextlib.contextmanager
def _cudnn_autotune(on: bool) -> Iterator[None]:
    """cudnn.benchmark on for the duration (restored afterwards): the same few conv shapes repeat for every batch."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@torch.no_grad()
def interpolate(frames: torch.Tensor, fps: float, target_fps: float, model: IFNet, *,
                batch_size: int = DEFAULT_BATCH, scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """Resample ``frames`` [F, H, W, 3] (float in [0, 1], any device) from ``fps`` to ``target_fps`` with RIFE.

    Returns (frames [M, H, W, 3] float32 on the input's device, ``target_fps``); M and the source of each output frame
    are :func:`frame_positions`'. Source frames are copied bit for bit; the others are RIFE's output at their time,
    clamped to [0, 1]. The network runs on ``model``'s device and in its dtype, ``batch_size`` frame pairs per call:
    only those pairs (padded to a multiple of 128, and their activations) are on the device at a time, so memory does
    not grow with the video's length; each source frame's features are computed once per batch. The output does not
    depend on ``batch_size`` (beyond the convolutions' rounding).
    ``target_fps == fps`` returns the frames unchanged (as float32). ``scale``: RIFE's flow resolution (one of
    :data:`SCALES`; 0.5 for 4K), LightX2V always uses 1.
    """
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        shape = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise UserError(f"frames must be a float tensor [F, H, W, 3] with F >= 1, got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} must be an integer >= 1")
    if scale not in SCALES:
        raise UserError(f"scale={scale!r} is not supported (allowed: {', '.join(map(str, SCALES))})")
    positions = frame_positions(frames.shape[0], fps, target_fps)
    frames = frames.float()
    if target_fps == fps:
        return frames, target_fps
    n, h, w, _ = frames.shape
    out = frames.new_empty(len(positions), h, w, 3)
    todo = []
    for k, pos in enumerate(positions):
        if pos.t == 0.0:
            out[k] = frames[pos.i0]
        else:
            todo.append((k, pos))
    dev = model.device
    ph, pw = _pad_size(h, w, scale)
    with _cudnn_autotune(dev.type == "cuda"):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            sources = sorted({p.i0 for _, p in batch} | {p.i1 for _, p in batch})
            slot = {i: j for j, i in enumerate(sources)}
            # [U, H, W, 3] -> [U, 3, ph, pw] on the device, zero-padded right and bottom
            imgs = F.pad(frames[sources].to(dev).permute(0, 3, 1, 2), (0, pw - w, 0, ph - h))
            feats = model.encode(imgs.to(model.dtype))  # [U, F, ph, pw]
            i0 = torch.tensor([slot[p.i0] for _, p in batch], device=dev)
            i1 = torch.tensor([slot[p.i1] for _, p in batch], device=dev)
            t = torch.tensor([p.t for _, p in batch], device=dev, dtype=torch.float32)
            mid = model(imgs[i0], imgs[i1], t, scale=scale, f0=feats[i0], f1=feats[i1])  # [B, 3, ph, pw] float32
            mid = mid[:, :, :h, :w].clamp_(0.0, 1.0).permute(0, 2, 3, 1).to(out.device)
            out[torch.tensor([k for k, _ in batch], device=out.device)] = mid
            del imgs, feats, mid
    return out, target_fps
