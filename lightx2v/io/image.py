"""Reading the images users condition on (I2V, FLF2V): a path, a PIL image, a tensor or an array.

Files: JPEG, PNG, WebP (and the other formats Pillow reads). EXIF orientation is applied; greyscale and palette
images become RGB; transparent images are composited onto white (dropping alpha would expose whatever colour the
transparent pixels happen to hold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lightx2v.errors import UserError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


def load_image(src, what: str = "image") -> Image.Image:
    """Return an RGB PIL image from a path, PIL image, tensor ([3, H, W] or [H, W, 3]; float in [0, 1] or uint8)
    or numpy array; raise UserError naming ``what`` and the value when it cannot be read."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise UserError(f"{what} {str(path)!r} does not exist")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read {what} {str(path)!r}: not a readable image "
                            f"(JPEG, PNG or WebP expected): {e}") from None
        if img.format not in FORMATS:
            raise UserError(f"{what} {str(path)!r} is a {img.format} image; allowed: {', '.join(FORMATS)}")
    elif isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (torch.Tensor, np.ndarray)):
        img = _array_to_pil(src, what)
    else:
        raise UserError(f"{what} must be a path, a PIL image, a tensor or an array, not {type(src).__name__}")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    if min(img.size) < 2:
        raise UserError(f"{what} is {img.size[0]}x{img.size[1]} pixels; too small to condition on")
    return img


def _array_to_pil(a, what: str) -> Image.Image:
    t = torch.as_tensor(a).detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if t.ndim == 2:
        t = t[..., None]
    if t.ndim != 3 or t.shape[-1] not in (1, 3, 4):
        raise UserError(f"{what} tensor has shape {tuple(a.shape)}; expected [3, H, W] or [H, W, 3]")
    if t.dtype == torch.uint8:
        arr = t.numpy()
    elif t.is_floating_point():
        if t.min() < 0 or t.max() > 1:
            raise UserError(f"{what} float tensor values must lie in [0, 1], got [{t.min():.3g}, {t.max():.3g}]")
        arr = (t.float() * 255).round().to(torch.uint8).numpy()
    else:
        raise UserError(f"{what} tensor dtype {t.dtype} is not supported; use float in [0, 1] or uint8")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def center_crop_to_aspect(img: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred crop of ``img`` with the aspect ratio ``width:height``."""
    w, h = img.size
    if w * height > h * width:  # too wide
        new_w = max(1, round(h * width / height))
        left = (w - new_w) // 2
        return img.crop((left, 0, left + new_w, h))
    new_h = max(1, round(w * height / width))
    top = (h - new_h) // 2
    return img.crop((0, top, w, top + new_h))


def adaptive_size(img: Image.Image, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """(height, width) keeping the image's aspect ratio within ``max_area`` pixels, rounded down to ``multiple``
    (as Wan's ``max_area`` and diffusers' I2V example compute it)."""
    aspect = img.height / img.width
    height = round(np.sqrt(max_area * aspect)) // multiple * multiple
    width = round(np.sqrt(max_area / aspect)) // multiple * multiple
    if height < multiple or width < multiple:
        raise UserError(f"image of {img.width}x{img.height} has too extreme an aspect ratio for {max_area} pixels")
    return height, width


def to_model_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """Resize (Lanczos, as diffusers' VideoProcessor) to ``height x width`` -> float32 [1, 3, H, W] in [-1, 1]."""
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0
