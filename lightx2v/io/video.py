"""Writing results: H.264 MP4 videos (PyAV's bundled libx264) and still images (Pillow).

Frames are float tensors with values in [0, 1] and channels last: ``[F, H, W, 3]`` for a video, ``[H, W, 3]`` for one
image. Videos are encoded as H.264 yuv420p (CRF 18, BT.709, tagged as such) so they play in browsers and players.
yuv420p stores colour at half resolution and so needs an even width and height: a frame with an odd width or height is
padded by repeating its last column or row, so the video is then one pixel wider or taller than the frames.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc, Interpolation
from PIL import Image

from lightx2v.errors import UserError

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CRF = 18  # x264 constant rate factor: 0 lossless, 23 default, ~18 visually lossless
# swscale's default fast paths round colour conversions with a bias of ~1/255 (darker); these flags avoid it.
_ENCODE_SWS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND
_DECODE_SWS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "read_video", "save_image", "save_result", "save_video"]


def _to_uint8(frames: torch.Tensor, ndim: int, what: str) -> np.ndarray:
    """[..., 3] float in [0, 1] (any device / float dtype) -> uint8 numpy array, rounded and clipped."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != ndim or frames.shape[-1] != 3 or frames.numel() == 0:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        layout = "[F, H, W, 3]" if ndim == 4 else "[H, W, 3]"
        raise UserError(f"{what} must be a non-empty float tensor {layout}, got {shape}")
    x = torch.nan_to_num(frames.detach().to("cpu", torch.float32), nan=0.0)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _check_fps(fps) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and fps > 0):
        raise UserError(f"fps must be a finite number > 0, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def _make_parent(path: Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {str(folder)!r}: {e.strerror or e}") from e


def _check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> None:
    if path.suffix.lower() not in allowed:
        raise UserError(
            f"unsupported file type {path.suffix or '(none)'!r} for {what} {str(path)!r}; allowed: {', '.join(allowed)}"
        )


def save_video(frames: torch.Tensor, path: str | Path, fps: float) -> Path:
    """Encode ``frames`` (float ``[F, H, W, 3]`` in [0, 1]) as an H.264 yuv420p MP4 at ``fps``; returns the path.

    Odd widths/heights are padded by one pixel (edge repeated), since yuv420p needs even sizes.
    """
    path = Path(path)
    _check_suffix(path, VIDEO_SUFFIXES, "a video")
    rate = _check_fps(fps)
    rgb = _to_uint8(frames, 4, "frames")
    _, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        rgb = np.pad(rgb, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    if "libx264" not in av.codecs_available:
        raise UserError(
            f"this PyAV build (av {av.__version__}) has no libx264 H.264 encoder; install the PyPI wheel of av"
        )
    _make_parent(path)

    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(CRF), "preset": "medium"})
        stream.width, stream.height = rgb.shape[2], rgb.shape[1]
        stream.pix_fmt = "yuv420p"
        cc = stream.codec_context
        cc.colorspace, cc.color_range = Colorspace.ITU709, ColorRange.MPEG
        cc.color_primaries, cc.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
        for i, image in enumerate(rgb):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p",
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
                dst_color_trc=ColorTrc.BT709,
                dst_color_primaries=ColorPrimaries.BT709,
                interpolation=_ENCODE_SWS,
            )
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder
    return path


def save_image(frame: torch.Tensor, path: str | Path) -> Path:
    """Save one frame (float ``[H, W, 3]`` in [0, 1]) as PNG (lossless), JPEG or WebP (quality 95); returns the path."""
    path = Path(path)
    _check_suffix(path, IMAGE_SUFFIXES, "an image")
    rgb = _to_uint8(frame, 3, "frame")
    _make_parent(path)
    options = {} if path.suffix.lower() == ".png" else {"quality": 95}
    Image.fromarray(rgb).save(path, **options)
    return path


def save_result(frames: torch.Tensor, path: str | Path, fps: float) -> Path:
    """Save a generation result ``[F, H, W, 3]``: an MP4 video, or an image when it has a single frame.

    With one frame, an image suffix (.png, .jpg, .jpeg, .webp) is kept and ``.mp4`` becomes ``.png``; more frames need
    ``.mp4``. Returns the path actually written.
    """
    path = Path(path)
    _check_suffix(path, VIDEO_SUFFIXES + IMAGE_SUFFIXES, "a result")
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
        _to_uint8(frames, 4, "frames")  # raises the shape error
    if frames.shape[0] == 1:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            path = path.with_suffix(".png")
        return save_image(frames[0], path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(
            f"{str(path)!r} is an image file name but the result has {frames.shape[0]} frames; "
            f"use one of {', '.join(VIDEO_SUFFIXES)}"
        )
    return save_video(frames, path, fps)


def read_video(path: str | Path) -> torch.Tensor:
    """Decode a video file into a float tensor ``[F, H, W, 3]`` in [0, 1] (RGB)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"video file not found: {str(path)!r}")
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24", interpolation=_DECODE_SWS) for f in container.decode(video=0)]
    if not frames:
        raise UserError(f"no video frames in {str(path)!r}")
    return torch.from_numpy(np.stack(frames)).float() / 255
