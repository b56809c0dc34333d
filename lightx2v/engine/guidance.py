"""Classifier-free guidance as a strategy chosen once, when the transformer stage is built.

The denoising loop calls ``guidance(predict, x, t, cond, uncond, scale)`` and does not branch on how CFG is done.
``predict(x, t, conds, branches)`` is the model's forward over a list of conditionings (one per branch, each
with batch size B), returning their predictions concatenated along the batch ([len(conds) * B, ...]);
``branches`` names them ("cond", "uncond") for hooks that keep per-branch state (feature caching).
``uncond=None`` (CFG off for this request) is one forward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Predict = Callable[[torch.Tensor, torch.Tensor, list, list], torch.Tensor]


class Guidance:
    name = "none"

    def __call__(self, predict: Predict, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any | None,
                 scale: float) -> torch.Tensor:
        raise NotImplementedError


class SequentialCFG(Guidance):
    """Two forwards per step, cond then uncond (each branch keeps its own cache state)."""

    name = "sequential"

    def __call__(self, predict, x, t, cond, uncond, scale):
        v = predict(x, t, [cond], ["cond"])
        if uncond is None:
            return v
        v_null = predict(x, t, [uncond], ["uncond"])
        return v_null + scale * (v - v_null)


class BatchedCFG(Guidance):
    """cond and uncond as one batch of 2B: one pass over the weights instead of two (not with per-branch caches)."""

    name = "batched"

    def __call__(self, predict, x, t, cond, uncond, scale):
        if uncond is None:
            return predict(x, t, [cond], ["cond"])
        both = predict(x, t, [cond, uncond], ["cond", "uncond"])
        b = x.shape[0]
        v, v_null = both[:b], both[b:]
        return v_null + scale * (v - v_null)
