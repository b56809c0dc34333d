"""Checks of user-supplied values, each raising :class:`UserError` with a message that names the value and what
is allowed. Shared by the configs, the request and the hooks' own configs (one wording everywhere)."""

from __future__ import annotations

import math
from typing import Any

from lightx2v.errors import UserError


def is_number(v: Any) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        raise UserError(f"{name}={v!r} must be an integer{rng}")
    return v


def check_number(name: str, v: Any, lo: float | None = None, hi: float | None = None, strict: bool = False) -> float:
    """A finite number >= lo (> lo with ``strict``) and <= hi."""
    low_ok = lo is None or (v > lo if strict else v >= lo) if is_number(v) else False
    if not is_number(v) or not low_ok or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            rng = f" in {'(' if strict else '['}{lo}, {hi}]"
        elif lo is not None:
            rng = f" {'>' if strict else '>='} {lo}"
        else:
            rng = ""
        raise UserError(f"{name}={v!r} must be a finite number{rng}")
    return float(v)


def check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise UserError(f"{name}={v!r} must be true or false")
    return v


def check_choice(name: str, v: Any, allowed) -> Any:
    if v not in allowed:
        raise UserError(f"{name}={v!r} is not supported; allowed: {', '.join(map(str, allowed))}")
    return v
