"""The three stages of a request, chained in one process.

    request -> encoder(request, ctx) -> message 1 -> transformer(message, ctx) -> message 2
            -> decoder(message, ctx) -> Frames

Each stage is an object built by its family's builder, holding only its own weights, with

* ``device``: where it computes;
* ``check_request(request)``: raise UserError for what this stage cannot do with the request (before anything runs);
* ``__call__(input, ctx)``: one request's work, reporting progress and checking for cancellation through ``ctx``
  (:class:`lightx2v.engine.progress.RunContext`).

The messages are registered dataclasses (:mod:`lightx2v.engine.messages`) that serialize to bytes exactly, so the same
stages run in three processes or on three machines with only the transport between them changing.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, field
from typing import Any

import torch

from lightx2v.engine.messages import Frames
from lightx2v.engine.progress import RunContext
from lightx2v.engine.request import GenerationRequest

log = logging.getLogger("lightx2v")


def empty_device_cache(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Generator:
    """A loaded model: the family's three stages in one process."""

    family: Any  # lightx2v.engine.family.ModelFamily
    model_cls: str
    task: str
    config: Any  # lightx2v.config.GeneratorConfig
    encoder: Any
    transformer: Any
    decoder: Any
    info: dict = field(default_factory=dict)  # what the family read about the checkpoint (layout, ...)
    last_timings: dict = field(default_factory=dict)
    last_memory: dict = field(default_factory=dict)
    last_stats: dict = field(default_factory=dict)  # per-request statistics the stages report (feature caching)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(self.transformer, "dtype", None)

    @property
    def stages(self) -> tuple[Any, Any, Any]:
        return self.encoder, self.transformer, self.decoder

    def check_request(self, request: GenerationRequest) -> None:
        for stage in self.stages:
            stage.check_request(request)

    @torch.inference_mode()
    def run(self, request: GenerationRequest, ctx: RunContext | None = None) -> Frames:
        """One request through the three stages. A cancelled request raises :class:`lightx2v.errors.Cancelled` at
        the next step or stage boundary; the stages free what they held as the exception leaves them."""
        ctx = ctx or RunContext()
        ctx.device = ctx.device or self.device
        self.check_request(request)
        try:
            ctx.check()
            conditioning = self.encoder(request, ctx)
            ctx.check()
            latents = self.transformer(conditioning, ctx)
            del conditioning
            ctx.check()
            frames = self.decoder(latents, ctx)
        except BaseException:
            empty_device_cache(ctx.device)
            raise
        finally:
            self.last_timings = dict(ctx.timings)
            self.last_stats = dict(getattr(self.transformer, "last_stats", {}) or {})
        ctx.memory["host RSS"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, peak
        self.last_memory = dict(ctx.memory)
        log.info("peak memory (GiB): " + " | ".join(f"{k} {v:.2f}" for k, v in ctx.memory.items()))
        return frames
