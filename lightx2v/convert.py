"""``lightx2v convert SRC DST --layout ...``: rewrite a checkpoint in another public layout, through the model
family that recognizes it (each family's ``convert``; Wan: lightx2v.models.wan.convert)."""

from __future__ import annotations

from pathlib import Path

from lightx2v.errors import UserError


def convert_checkpoint(src: str | Path, dst: str | Path, *, layout: str, quantize: str | None = None) -> Path:
    from lightx2v.engine.family import families

    src = Path(src)
    if not src.exists():
        raise UserError(f"model path {str(src)!r} does not exist")
    able = [f for f in families().values() if f.convert is not None and f.recognizes is not None]
    for family in able:
        if family.recognizes(src):
            return family.convert(src, Path(dst), layout, quantize)
    # let the first family say precisely what is missing (its loaders' messages)
    if able:
        return able[0].convert(src, Path(dst), layout, quantize)
    raise UserError(f"no model family can convert {str(src)!r}")
