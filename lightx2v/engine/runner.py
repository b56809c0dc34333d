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

    @torch.inference_mode()
    def run_batch(self, requests: list[GenerationRequest], ctxs: list[RunContext] | None = None) -> list:
        """Several requests, their denoising as one batch through the transformer where it can.

        Returns one result per request, in order: its :class:`Frames`, or the exception that stopped it (a
        :class:`lightx2v.errors.Cancelled`, a :class:`lightx2v.errors.UserError`, ...), so that one request's failure
        does not fail the others. The encoder and the decoder run per request; the transformer runs the requests of
        equal sampling settings (and latent shape) as one batch when it has ``call_batch`` (and
        ``batch_blocker(conditioning)`` finds nothing against it), and one by one otherwise. Each request's output
        equals its :meth:`run` alone up to float rounding.
        """
        ctxs = list(ctxs) if ctxs is not None else [RunContext() for _ in requests]
        if len(ctxs) != len(requests):
            raise ValueError(f"run_batch got {len(requests)} requests and {len(ctxs)} contexts")
        call_batch = getattr(self.transformer, "call_batch", None)
        if len(requests) <= 1 or call_batch is None:
            return [self._run_caught(r, c) for r, c in zip(requests, ctxs)]
        results: list = [None] * len(requests)
        conds: dict[int, Any] = {}
        for k, (request, ctx) in enumerate(zip(requests, ctxs)):
            ctx.device = ctx.device or self.device
            try:
                self.check_request(request)
                ctx.check()
                conds[k] = self.encoder(request, ctx)
                ctx.check()
            except Exception as e:  # noqa: BLE001 - the request's own failure, reported to it
                results[k] = e
        groups: dict[Any, list[int]] = {}
        blocker = getattr(self.transformer, "batch_blocker", lambda cond: None)
        for k, cond in conds.items():
            key = (requests[k].task, requests[k].sampling, tuple(map(tuple, cond.latent_shapes))) \
                if blocker(cond) is None else ("alone", k)
            groups.setdefault(key, []).append(k)
        latents: dict[int, Any] = {}
        for members in groups.values():
            try:
                if len(members) == 1:
                    k = members[0]
                    outs = [self.transformer(conds[k], ctxs[k])]
                else:
                    outs = call_batch([conds[k] for k in members], [ctxs[k] for k in members])
            except Exception as e:  # noqa: BLE001 - fails every member of this group
                outs = [e] * len(members)
                empty_device_cache(self.device)
            for k, out in zip(members, outs):
                if isinstance(out, BaseException):
                    results[k] = out
                else:
                    latents[k] = out
                conds.pop(k, None)
        for k, lat in latents.items():
            try:
                ctxs[k].check()
                results[k] = self.decoder(lat, ctxs[k])
            except Exception as e:  # noqa: BLE001
                results[k] = e
        if any(isinstance(r, BaseException) for r in results):
            empty_device_cache(self.device)
        for ctx in ctxs:
            ctx.memory["host RSS"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.last_timings = dict(ctxs[0].timings)
        return results

    def _run_caught(self, request: GenerationRequest, ctx: RunContext):
        try:
            return self.run(request, ctx)
        except Exception as e:  # noqa: BLE001 - reported to the request
            return e
