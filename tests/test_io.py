"""Video / image output: roundtrips through the encoder and the error cases."""

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lightx2v.errors import UserError
from lightx2v.io.video import read_video, save_image, save_result, save_video


def gradient_video(frames=9, height=48, width=64):
    """Smooth moving gradients, [F, H, W, 3] in [0, 1]."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    return torch.stack(
        [torch.stack([x, y, 0.25 + 0.5 * (x + y) * (f + 1) / (2 * frames)], dim=-1) for f in range(frames)]
    )


def probe(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "fps": stream.average_rate,
            "size": (stream.codec_context.width, stream.codec_context.height),
        }


def test_video_roundtrip(tmp_path):
    frames = gradient_video()
    path = save_video(frames, tmp_path / "out.mp4", fps=16)
    assert path == tmp_path / "out.mp4" and path.stat().st_size > 0
    info = probe(path)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["fps"] == 16 and info["size"] == (64, 48)
    back = read_video(path)
    assert back.shape == (9, 48, 64, 3) and back.dtype == torch.float32
    assert (back - frames).abs().mean() < 0.03
    # Each frame comes back in its place (frames differ in the blue channel).
    errs = (back[:, None] - frames[None]).abs().mean(dim=(2, 3, 4))
    assert torch.equal(errs.argmin(dim=1), torch.arange(9))


def test_video_fractional_fps_and_dtype(tmp_path):
    frames = gradient_video(frames=3).to(torch.bfloat16)
    path = save_video(frames, tmp_path / "ntsc.mp4", fps=30000 / 1001)
    assert abs(float(probe(path)["fps"]) - 29.97) < 0.01


def test_video_odd_size_is_padded(tmp_path):
    frames = gradient_video(frames=3, height=47, width=63)
    path = save_video(frames, tmp_path / "odd.mp4", fps=8)
    assert probe(path)["size"] == (64, 48)
    back = read_video(path)
    assert back.shape == (3, 48, 64, 3)
    assert (back[:, :47, :63] - frames).abs().mean() < 0.03


def test_png_roundtrip_exact(tmp_path):
    frame = torch.rand(13, 17, 3, generator=torch.Generator().manual_seed(0))
    path = save_image(frame, tmp_path / "img.png")
    back = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255
    assert back.shape == (13, 17, 3)
    assert (back - frame).abs().max() <= 0.5 / 255 + 1e-6


def test_image_clamps_out_of_range(tmp_path):
    frame = torch.tensor([[[-1.0, 0.5, 2.0]]])
    back = np.asarray(Image.open(save_image(frame, tmp_path / "c.png")))
    assert back.tolist() == [[[0, 128, 255]]]


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_lossy_images(tmp_path, suffix):
    frame = gradient_video(frames=1)[0]
    path = save_image(frame, tmp_path / f"img{suffix}")
    back = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255
    assert (back - frame).abs().mean() < 0.03


def test_save_result_single_frame_becomes_png(tmp_path):
    frames = gradient_video(frames=1)
    path = save_result(frames, tmp_path / "deep" / "er" / "result.mp4", fps=16)
    assert path == tmp_path / "deep" / "er" / "result.png"
    assert path.is_file() and not path.with_suffix(".mp4").exists()
    assert save_result(frames, tmp_path / "keep.webp", fps=16) == tmp_path / "keep.webp"


def test_save_result_video(tmp_path):
    path = save_result(gradient_video(frames=5), str(tmp_path / "new" / "v.mp4"), fps=24)
    assert isinstance(path, Path) and path == tmp_path / "new" / "v.mp4"
    assert read_video(path).shape[0] == 5


def test_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match=r"'\.gif'.*allowed: \.mp4, \.png, \.jpg, \.jpeg, \.webp"):
        save_result(gradient_video(frames=2), tmp_path / "x.gif", fps=16)
    with pytest.raises(UserError, match=r"'\(none\)'"):
        save_result(gradient_video(frames=1), tmp_path / "noext", fps=16)
    with pytest.raises(UserError, match=r"allowed: \.png"):
        save_image(gradient_video(frames=1)[0], tmp_path / "x.mp4")


def test_many_frames_need_mp4(tmp_path):
    with pytest.raises(UserError, match=r"has 3 frames; use one of \.mp4"):
        save_result(gradient_video(frames=3), tmp_path / "x.png", fps=16)


def test_folder_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"cannot create output folder '{blocker / 'sub'}'"):
        save_result(gradient_video(frames=2), blocker / "sub" / "v.mp4", fps=16)


@pytest.mark.parametrize("fps", [0, -1, float("nan"), "16"])
def test_bad_fps(tmp_path, fps):
    with pytest.raises(UserError, match="fps must be a finite number > 0"):
        save_video(gradient_video(frames=2), tmp_path / "v.mp4", fps=fps)


@pytest.mark.parametrize("shape", [(9, 48, 64), (9, 48, 64, 4), (0, 48, 64, 3)])
def test_bad_frame_shape(tmp_path, shape):
    with pytest.raises(UserError, match=r"frames must be a non-empty float tensor \[F, H, W, 3\]"):
        save_result(torch.zeros(shape), tmp_path / "v.mp4", fps=16)


def test_read_missing_video(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_video(tmp_path / "nope.mp4")


def test_no_stray_files(tmp_path):
    save_result(gradient_video(frames=2), tmp_path / "a.mp4", fps=16)
    save_result(gradient_video(frames=1), tmp_path / "b.mp4", fps=16)
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.png"]
