"""Strict key checks with readable reports, for the small single-file models (RIFE, TAE, LightVAE).

:func:`key_report` is :func:`lightx2v.loading.key_problems` with every group counted and cut to its
first keys, so that a wrong file (whose keys all miss) gives a message a person can read: what the model expects and
what the file holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["key_report"]


def key_report(expected: Mapping[str, torch.Size | tuple], sd: Mapping[str, torch.Tensor], limit: int = 12
               ) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``sd`` against ``expected`` (name -> shape), one line per group
    with its count and at most ``limit`` entries (sorted), e.g. ``"missing keys (158): block0.conv0.0.0.bias, ...
    (146 more)"``; empty when ``sd`` fits exactly."""
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    mismatched = []
    for k in sorted(expected.keys() & sd.keys()):
        got = tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__
        if got != tuple(expected[k]):
            mismatched.append(f"{k} (file {got}, model {tuple(expected[k])})")
    lines = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            lines.append(f"{label} ({len(keys)}): {', '.join(keys[:limit])}{more}")
    return lines
