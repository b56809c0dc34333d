"""Reading conditioning images: formats, orientation, colour modes, tensors, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from lightx2v.errors import UserError
from lightx2v.io.image import adaptive_size, center_crop_to_aspect, load_image, to_model_tensor


def _img(w=30, h=20):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)  # left half red
    return Image.fromarray(a)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_formats(tmp_path, fmt, suffix):
    p = tmp_path / f"x{suffix}"
    _img().save(p, format=fmt, quality=95)
    img = load_image(str(p))
    assert img.mode == "RGB" and img.size == (30, 20)
    assert np.asarray(img)[10, 2, 0] > 200 and np.asarray(img)[10, 27, 0] < 60


def test_exif_orientation(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _img().save(p, exif=exif, quality=95)
    img = load_image(p)
    assert img.size == (20, 30)  # width and height swapped
    assert np.asarray(img)[2, 10, 0] > 200  # the red left half is now on top


def test_rgba_greyscale_palette(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black -> white
    rgba[:4, :, :] = (0, 0, 255, 255)
    img = load_image(Image.fromarray(rgba, "RGBA"))
    assert img.mode == "RGB" and tuple(np.asarray(img)[6, 0]) == (255, 255, 255)
    assert tuple(np.asarray(img)[0, 0]) == (0, 0, 255)
    grey = load_image(Image.fromarray(np.full((8, 8), 100, np.uint8), "L"))
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[0, 0]) == (100, 100, 100)
    pal = _img().convert("P")
    assert load_image(pal).mode == "RGB"


def test_tensor_inputs():
    t = torch.zeros(3, 10, 12)
    t[0] = 1.0
    img = load_image(t)
    assert img.size == (12, 10) and tuple(np.asarray(img)[0, 0]) == (255, 0, 0)
    img2 = load_image(torch.full((10, 12, 3), 128, dtype=torch.uint8))
    assert tuple(np.asarray(img2)[0, 0]) == (128, 128, 128)
    with pytest.raises(UserError, match="values must lie in \\[0, 1\\]"):
        load_image(torch.full((3, 4, 4), 2.0))
    with pytest.raises(UserError, match="shape"):
        load_image(torch.zeros(5, 4, 4, 4))


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(UserError, match="cannot read image .*bad.jpg"):
        load_image(bad)
    with pytest.raises(UserError, match="must be a path"):
        load_image(3.5)


def test_crop_and_adaptive_and_tensor():
    img = _img(90, 40)
    c = center_crop_to_aspect(img, 48, 32)
    assert c.size == (60, 40)
    assert adaptive_size(_img(40, 60), 32 * 48) == (48, 32)
    assert adaptive_size(_img(40, 70), 32 * 48) == (48, 16)
    assert adaptive_size(_img(832, 480), 480 * 832) == (480, 832)
    x = to_model_tensor(img, 32, 48)
    assert x.shape == (1, 3, 32, 48) and x.min() >= -1 and x.max() <= 1
