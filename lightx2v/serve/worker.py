"""The generation worker: one thread that takes tasks from the durable queue and runs them on the loaded pipeline.

Each task becomes ``pipe.make_request(...)`` and runs with a :class:`lightx2v.engine.progress.RunContext` whose
progress callback records the step (for status, SSE and metrics) and whose :class:`CancelToken` a DELETE sets:
the engine stops at the next step boundary (:class:`lightx2v.errors.Cancelled`), frees what the request held, and
the worker takes the next task. With ``max_batch_size > 1`` the worker claims, together with the oldest pending
task, later pending tasks of equal settings (the queue's ``batch_key``) and runs them through
``Generator.run_batch``: one DiT batch, each output equal to its run alone.

A result is written under a temporary name (``.<id>.partial.mp4``), made durable and renamed to ``<id>.mp4`` before
the task is marked completed, so no client (and no restart) ever sees a partial file.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lightx2v.engine.progress import CancelToken, RunContext
from lightx2v.errors import Cancelled, UserError
from lightx2v.serve.files import DataLayout, write_whole
from lightx2v.serve.metrics import Metrics
from lightx2v.serve.queue import TaskQueue, partial_name

log = logging.getLogger("lightx2v.serve")

SHUTDOWN_REASON = "server shutting down"
USER_CANCEL = "cancelled by user"


@dataclass
class Running:
    """A task the worker holds: its cancel token and where it is."""

    task_id: str
    token: CancelToken = field(default_factory=CancelToken)
    stage: str = "queued"
    step: int = 0
    steps: int = 0
    started: float = field(default_factory=time.time)
    last_step_at: float = field(default_factory=time.perf_counter)
    cancel_requested_step: int | None = None
    batch: int = 1
    times_steps: bool = True  # records the step metric (one task of a batch does)

    def snapshot(self) -> dict:
        return {"stage": self.stage, "step": self.step, "steps": self.steps, "batch": self.batch}


class Worker:
    """Runs the queue's tasks one claim at a time on ``pipe`` (set by :meth:`start`)."""

    def __init__(self, queue: TaskQueue, layout: DataLayout, metrics: Metrics,
                 build_request: Callable[[Any, dict, str], Any], *, max_batch_size: int = 1, output: str = "video"):
        self.queue, self.layout, self.metrics = queue, layout, metrics
        self.build_request = build_request  # (pipe, task row, save path) -> GenerationRequest
        self.max_batch_size = max_batch_size
        self.output = output
        self.pipe = None
        self._lock = threading.Lock()
        self._running: dict[str, Running] = {}
        self._cancel_early: dict[str, str] = {}  # cancels that came between the claim and the start
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy_since: float | None = None

    # --- control ---------------------------------------------------------------------------------------------

    def start(self, pipe) -> None:
        self.pipe = pipe
        self._thread = threading.Thread(target=self._loop, name="lightx2v-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def pause(self) -> None:
        """Take no new task (the running one finishes); :meth:`resume` goes on."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self.wake()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: the running tasks are cancelled at their next step and handed back to the queue (pending), so the
        next start runs them."""
        self._stop.set()
        with self._lock:
            for r in self._running.values():
                r.token.cancel(SHUTDOWN_REASON)
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def running(self) -> dict[str, dict]:
        with self._lock:
            return {k: r.snapshot() for k, r in self._running.items()}

    def progress_of(self, task_id: str) -> dict | None:
        with self._lock:
            r = self._running.get(task_id)
            return None if r is None else r.snapshot()

    def cancel(self, task_id: str, reason: str = USER_CANCEL, wait: float = 10.0) -> dict | None:
        """Cancel a running task: set its token and wait (up to ``wait`` s) until it has stopped. Returns
        ``{"requested_at_step", "stopped_at_step"}``, or None if the worker does not hold it."""
        with self._lock:
            r = self._running.get(task_id)
            if r is None:
                row = self.queue.get(task_id)
                if row is None or row["state"] != "processing":
                    return None
                self._cancel_early[task_id] = reason  # claimed, not started yet: its token is set when it starts
                requested = 0
            else:
                r.cancel_requested_step = r.step
                requested = r.step
                r.token.cancel(reason)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            row = self.queue.get(task_id)
            if row is None or row["state"] != "processing":
                return {"requested_at_step": requested, "stopped_at_step": None if row is None else row["step"]}
            time.sleep(0.01)
        return {"requested_at_step": requested, "stopped_at_step": None}

    # --- the loop --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._paused.is_set():
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            self._wake.clear()
            try:
                rows = self.queue.claim(self.max_batch_size)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the worker
                log.exception("claiming tasks failed")
                self._wake.wait(1.0)
                continue
            if not rows:
                self._wake.wait(0.5)
                continue
            try:
                self._run(rows)
            except Exception:  # noqa: BLE001
                log.exception("worker error")
                for row in rows:
                    self.queue.finish(row["id"], "failed", error="internal error in the worker",
                                      error_code="internal_error")
            finally:
                with self._lock:
                    for row in rows:
                        self._running.pop(row["id"], None)
                        self._cancel_early.pop(row["id"], None)
                self.busy_since = None

    def _run(self, rows: list[dict]) -> None:
        pipe = self.pipe
        self.busy_since = time.time()
        jobs = []  # (row, running, request, ctx, tmp path)
        for k, row in enumerate(rows):
            r = Running(row["id"], batch=len(rows), times_steps=k == 0)
            with self._lock:
                self._running[row["id"]] = r
                early = self._cancel_early.pop(row["id"], None)
            if early is not None:
                r.cancel_requested_step = 0
                r.token.cancel(early)
            suffix = ".png" if self.output == "image" else ".mp4"
            tmp = self.layout.results / partial_name(row["id"], suffix)
            try:
                request = self.build_request(pipe, row, str(tmp))
            except UserError as e:
                self._fail(row, r, str(e), "invalid_request")
                continue
            except Exception as e:  # noqa: BLE001
                log.exception("task %s: building the request failed", row["id"])
                self._fail(row, r, f"internal error: {type(e).__name__}: {e}", "internal_error")
                continue
            r.steps = request.sampling.infer_steps
            ctx = RunContext(progress=self._progress_cb(r), cancel=r.token)
            jobs.append((row, r, request, ctx, tmp))
        if not jobs:
            return
        self.metrics.observe("lightx2v_batch_size", len(jobs))
        t0 = time.perf_counter()
        for _, r, _, _, _ in jobs:
            r.stage = "starting"
        if len(jobs) == 1:
            row, r, request, ctx, tmp = jobs[0]
            try:
                saved, frames = pipe.run(request, ctx)
                outcomes = [(Path(saved), frames)]
            except Exception as e:  # noqa: BLE001 - reported to the task (Cancelled included)
                outcomes = [e]
        else:
            from lightx2v.io.video import save_result

            results = pipe.runner.run_batch([j[2] for j in jobs], [j[3] for j in jobs])
            outcomes = []
            for (row, r, request, ctx, tmp), res in zip(jobs, results):
                if isinstance(res, BaseException):
                    outcomes.append(res)
                    continue
                try:
                    t1 = time.perf_counter()
                    saved = save_result(res.frames, tmp, res.fps)
                    ctx.timings["save"] = time.perf_counter() - t1
                    outcomes.append((Path(saved), res.frames))
                except Exception as e:  # noqa: BLE001
                    outcomes.append(e)
        elapsed = time.perf_counter() - t0
        for (row, r, request, ctx, tmp), outcome in zip(jobs, outcomes):
            self._settle(row, r, ctx, tmp, outcome, elapsed)
        if any(isinstance(o, BaseException) for o in outcomes):
            gc.collect()
            _empty_cuda_cache()

    def _progress_cb(self, r: Running):
        def progress(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if stage == "denoise" and done > 1 and r.times_steps:  # the first step's time would include encoding
                self.metrics.observe("lightx2v_step_seconds", now - r.last_step_at)
            r.last_step_at = now
            r.stage, r.step, r.steps = stage, done, total

        return progress

    def _settle(self, row: dict, r: Running, ctx: RunContext, tmp: Path, outcome, elapsed: float) -> None:
        task_id = row["id"]
        if isinstance(outcome, BaseException):
            _remove(tmp)
            if isinstance(outcome, Cancelled):
                if str(outcome) == SHUTDOWN_REASON and r.token.reason == SHUTDOWN_REASON:
                    self.queue.requeue(task_id)
                    log.info("task %s handed back to the queue (shutdown)", task_id)
                    return
                self.queue.finish(task_id, "cancelled", error=str(outcome) or USER_CANCEL, error_code="cancelled",
                                  step=r.step, steps=r.steps)
                self.metrics.inc("lightx2v_tasks_finished_total", state="cancelled")
                log.info("task %s cancelled at step %d of %d", task_id, r.step, r.steps)
            elif isinstance(outcome, UserError):
                self._fail(row, r, str(outcome), "invalid_request")
            else:
                code = "out_of_memory" if "OutOfMemory" in type(outcome).__name__ else "internal_error"
                log.error("task %s failed: %s: %s", task_id, type(outcome).__name__, outcome)
                self._fail(row, r, f"{type(outcome).__name__}: {outcome}", code)
            return
        saved, frames = outcome
        try:
            final = self.layout.results / f"{task_id}{saved.suffix}"
            if self.output != "image" and frames is not None and frames.shape[0] > 1:
                from lightx2v.io.video import save_image

                thumb_tmp = self.layout.results / partial_name(task_id, ".thumb.png")
                save_image(frames[0], thumb_tmp)
                write_whole(thumb_tmp, self.layout.results / f"{task_id}.thumb.png")
            write_whole(saved, final)
        except Exception as e:  # noqa: BLE001
            _remove(saved)
            self._fail(row, r, f"writing the result failed: {e}", "internal_error")
            return
        self.queue.finish(task_id, "completed", result=final.name, step=r.steps, steps=r.steps)
        self.metrics.inc("lightx2v_tasks_finished_total", state="completed")
        self.metrics.observe("lightx2v_task_seconds", elapsed)
        for stage, seconds in ctx.timings.items():
            self.metrics.observe("lightx2v_stage_seconds", seconds, stage=stage)
        for stage, gib in ctx.memory.items():
            if stage.startswith("GPU "):
                self.metrics.set("lightx2v_gpu_peak_memory_bytes", gib * 2**30, stage=stage[4:])

    def _fail(self, row: dict, r: Running, message: str, code: str) -> None:
        self.queue.finish(row["id"], "failed", error=message, error_code=code, step=r.step, steps=r.steps)
        self.metrics.inc("lightx2v_tasks_finished_total", state="failed")


def _remove(path: Path) -> None:
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
