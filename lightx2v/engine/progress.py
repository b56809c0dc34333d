"""Progress reports and cancellation of one request.

The stages call ``ctx.step(stage, i, n)`` after each unit of work (a denoising step) and ``ctx.check()`` at their
boundaries; a request whose :class:`CancelToken` was cancelled stops there with :class:`lightx2v.errors.Cancelled`,
after the stage has released what it held (the ``with`` blocks of its resources exit as the exception passes).
``ctx.stage(name)`` times a named piece of work and, on a GPU, records its peak memory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lightx2v.errors import Cancelled

ProgressCallback = Callable[[str, int, int], None]  # (stage, steps done, steps in all)


class CancelToken:
    """Set from any thread (a server's DELETE, a UI's cancel button); checked by the stages between steps."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class RunContext:
    """What the stages of one request share: progress callback, cancel token, timings and peak memory."""

    progress: ProgressCallback | None = None
    cancel: CancelToken | None = None
    show_progress_bar: bool = False
    device: torch.device | None = None
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`Cancelled` if the request was cancelled."""
        if self.cancel is not None and self.cancel.cancelled:
            raise Cancelled(self.cancel.reason or "cancelled")

    def step(self, stage: str, done: int, total: int) -> None:
        """Report ``done`` of ``total`` steps of ``stage``, then stop here if the request was cancelled."""
        if self.progress is not None:
            self.progress(stage, done, total)
        self.check()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time ``name`` (synchronising the GPU) and record its peak allocated GPU memory."""
        cuda = self.device is not None and self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.memory[f"GPU {name}"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.timings[name] = time.perf_counter() - t0
