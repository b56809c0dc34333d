"""The server's data folder and the files that enter and leave it.

    <data_dir>/tasks.db          the task queue (SQLite, WAL: also tasks.db-wal, tasks.db-shm)
    <data_dir>/results/          <task_id>.mp4 | <task_id>.png, and <task_id>.thumb.png (a video's first frame);
                                 written as .<task_id>.partial.<ext> and renamed when whole
    <data_dir>/inputs/           images that came as uploads or base64 (named by their SHA-256)

An ``image_path`` that is a path must lie inside the allow-listed input folder (``--input_dir``, default
``<data_dir>/inputs``); a URL is refused (this server fetches nothing from the network); base64 (plain or a
``data:image/...;base64,`` URL) is decoded and checked to be a JPEG, PNG or WebP image before the task is queued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lightx2v.serve.schemas import ApiError

IMAGE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
MAX_IMAGE_PIXELS = 8192 * 8192
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.-]+)*;base64,", re.IGNORECASE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LONGEST_PATH = 1024  # a longer image_path that is not a data URL is taken for base64


@dataclass(frozen=True)
class DataLayout:
    data_dir: Path
    input_dir: Path

    @classmethod
    def create(cls, data_dir: str | Path, input_dir: str | Path | None = None) -> "DataLayout":
        data = Path(data_dir).expanduser().resolve()
        layout = cls(data, Path(input_dir).expanduser().resolve() if input_dir else data / "inputs")
        for folder in (layout.data_dir, layout.results, layout.uploads, layout.input_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return layout

    @property
    def db(self) -> Path:
        return self.data_dir / "tasks.db"

    @property
    def results(self) -> Path:
        return self.data_dir / "results"

    @property
    def uploads(self) -> Path:
        return self.data_dir / "inputs"

    def remove_partials(self) -> list[str]:
        """Delete what a crash left half-written (never served: the names start with a dot)."""
        gone = []
        for p in self.results.glob(".*.partial*"):
            p.unlink(missing_ok=True)
            gone.append(p.name)
        return gone

    def result_file(self, name: str) -> Path | None:
        """A file of the results folder by its name, None if it is not there; a name that leaves the folder
        raises 403."""
        path = confined(self.results, name, "result")
        if path.name.startswith(".") or not path.is_file():
            return None
        return path

    def remove_results(self, task_id: str) -> None:
        for p in self.results.glob(f"{task_id}.*"):
            p.unlink(missing_ok=True)


def confined(folder: Path, name: str, field: str) -> Path:
    """``folder / name`` resolved (symlinks followed), which must stay inside ``folder``: else 403."""
    if "\x00" in name:
        raise ApiError(422, f"{field}: contains a NUL character", field)
    root = folder.resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise ApiError(403, f"{field}: {name!r} is outside the folder this server allows", field, "forbidden_path")
    return path


def check_image_bytes(data: bytes, field: str) -> tuple[str, object]:
    """The image's format suffix and the PIL image, or 422 naming ``field``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(422, f"{field}: empty image", field)
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in IMAGE_FORMATS:
            raise ApiError(422, f"{field}: a {img.format} image; allowed: JPEG, PNG, WebP", field)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ApiError(422, f"{field}: {img.width}x{img.height} pixels is larger than this server takes "
                                f"({MAX_IMAGE_PIXELS} pixels)", field)
        img.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(422, f"{field}: not a readable image (JPEG, PNG or WebP expected): {e}", field) from None
    if min(img.size) < 2:
        raise ApiError(422, f"{field}: {img.width}x{img.height} pixels is too small to condition on", field)
    return IMAGE_FORMATS[img.format], img


def store_image(layout: DataLayout, data: bytes, field: str) -> str:
    """Check the bytes are an image and keep them in the uploads folder; returns the file's path."""
    suffix, _ = check_image_bytes(data, field)
    name = hashlib.sha256(data).hexdigest()[:40] + suffix
    path = layout.uploads / name
    if not path.is_file():
        tmp = layout.uploads / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def decode_base64(value: str, field: str) -> bytes:
    payload = _DATA_URL.sub("", value, count=1)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64 (send an image as base64, a data:image/...;base64, URL or "
                            "a file name in the input folder)", field) from None


def resolve_image(layout: DataLayout, value: str | None, field: str) -> str | None:
    """An image field of a request (base64, data URL, or a path in the input folder) -> the path of a checked image
    file; "" / None -> None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"{field}: must be a string (base64 or a file name)", field)
    if _DATA_URL.match(value) or len(value) > LONGEST_PATH:
        return store_image(layout, decode_base64(value, field), field)
    if _URL.match(value):
        raise ApiError(400, f"{field}: URLs are not fetched by this server (it has no network policy); send the "
                            "image as base64 or upload it (/v1/tasks/video/form)", field, "url_not_allowed")
    if len(value) >= 64 and len(value) % 4 == 0 and _BASE64.match(value):
        return store_image(layout, decode_base64(value, field), field)
    path = confined(layout.input_dir, value, field)
    if not path.is_file():
        raise ApiError(422, f"{field}: no file {value!r} in the input folder (and not base64)", field)
    check_image_bytes(path.read_bytes(), field)
    return str(path)


def write_whole(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable and give it its final name (atomic: readers see no file or the whole file)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
