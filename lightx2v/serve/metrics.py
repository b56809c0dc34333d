"""Prometheus metrics of the server, in the text exposition format (``GET /metrics``), with no dependency.

Counters and histograms are kept here (thread-safe); the queue's gauges (depth, tasks by state) are read from the
database when scraped, so they are right after a restart too.

    lightx2v_queue_depth                          pending tasks
    lightx2v_queue_capacity                       --max_queue_size
    lightx2v_tasks{state}                         tasks in the database by state
    lightx2v_model_ready                          1 once the model is loaded
    lightx2v_tasks_submitted_total                accepted submissions (idempotent replays not counted)
    lightx2v_tasks_rejected_total{reason}         queue_full | invalid | ...
    lightx2v_tasks_finished_total{state}          completed | failed | cancelled, since this process started
    lightx2v_step_seconds                         histogram: one denoising step after a task's first (a batch's
                                                  step once)
    lightx2v_stage_seconds{stage}                 histogram: text encode, denoise, VAE decode, save, ...
    lightx2v_task_seconds                         histogram: a task from start to result
    lightx2v_batch_size                           histogram: tasks per DiT batch
    lightx2v_http_requests_total{method,route,status}
    lightx2v_http_request_seconds{route}          histogram
    lightx2v_gpu_memory_allocated_bytes, lightx2v_gpu_memory_reserved_bytes   (CUDA only)
    lightx2v_gpu_peak_memory_bytes{stage}         peak of the last task per stage (CUDA only)
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TASK_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)

HELP = {
    "lightx2v_queue_depth": ("gauge", "pending tasks"),
    "lightx2v_queue_capacity": ("gauge", "most pending + processing tasks the queue takes"),
    "lightx2v_tasks": ("gauge", "tasks in the database by state"),
    "lightx2v_model_ready": ("gauge", "1 once the model is loaded"),
    "lightx2v_tasks_submitted_total": ("counter", "accepted task submissions"),
    "lightx2v_tasks_rejected_total": ("counter", "refused task submissions by reason"),
    "lightx2v_tasks_finished_total": ("counter", "tasks finished by final state"),
    "lightx2v_step_seconds": ("histogram", "duration of one denoising step"),
    "lightx2v_stage_seconds": ("histogram", "duration of a stage of a task"),
    "lightx2v_task_seconds": ("histogram", "duration of a task from start to result"),
    "lightx2v_batch_size": ("histogram", "tasks per DiT batch"),
    "lightx2v_http_requests_total": ("counter", "HTTP requests by method, route and status"),
    "lightx2v_http_request_seconds": ("histogram", "HTTP request duration by route"),
    "lightx2v_gpu_memory_allocated_bytes": ("gauge", "GPU memory allocated by PyTorch"),
    "lightx2v_gpu_memory_reserved_bytes": ("gauge", "GPU memory reserved by PyTorch"),
    "lightx2v_gpu_peak_memory_bytes": ("gauge", "peak GPU memory of the last task, by stage"),
}


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    esc = [(k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in labels]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _num(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hists: dict[str, dict[tuple, _Histogram]] = defaultdict(dict)
        self._buckets = {"lightx2v_step_seconds": STEP_BUCKETS, "lightx2v_stage_seconds": TASK_BUCKETS,
                         "lightx2v_task_seconds": TASK_BUCKETS, "lightx2v_batch_size": BATCH_BUCKETS,
                         "lightx2v_http_request_seconds": HTTP_BUCKETS}

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] = self._counters[name].get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._gauges[name][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hists[name].get(key)
            if h is None:
                h = self._hists[name][key] = _Histogram(self._buckets[name])
            h.observe(float(value))

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's value (0 if never set); a histogram's count."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name in self._hists:
                h = self._hists[name].get(key)
                return h.n if h else 0
            return self._counters.get(name, {}).get(key, self._gauges.get(name, {}).get(key, 0.0))

    def mean(self, name: str, **labels) -> float | None:
        """A histogram's mean (None before its first observation)."""
        with self._lock:
            h = self._hists.get(name, {}).get(tuple(sorted(labels.items())))
            return h.sum / h.n if h and h.n else None

    def render(self, gauges: dict[str, dict[tuple, float]] | None = None) -> str:
        """The exposition text; ``gauges``: values read at scrape time (name -> {labels: value})."""
        lines: list[str] = []
        with self._lock:
            all_gauges = {k: dict(v) for k, v in self._gauges.items()}
            for name, series in (gauges or {}).items():
                all_gauges.setdefault(name, {}).update(series)
            families = sorted(set(all_gauges) | set(self._counters) | set(self._hists))
            for name in families:
                kind, text = HELP.get(name, ("untyped", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for key, v in sorted(all_gauges.get(name, {}).items()):
                    lines.append(f"{name}{_labels(key)} {_num(v)}")
                for key, v in sorted(self._counters.get(name, {}).items()):
                    lines.append(f"{name}{_labels(key)} {_num(v)}")
                for key, h in sorted(self._hists.get(name, {}).items()):
                    cum = 0
                    for bound, c in zip(h.buckets + (math.inf,), h.counts):
                        cum += c
                        lines.append(f"{name}_bucket{_labels(key + (('le', _num(bound)),))} {cum}")
                    lines.append(f"{name}_sum{_labels(key)} {_num(h.sum)}")
                    lines.append(f"{name}_count{_labels(key)} {h.n}")
        return "\n".join(lines) + "\n"


def gpu_gauges() -> dict[str, dict[tuple, float]]:
    """GPU memory now (CUDA only; {} without a GPU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {}
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    alloc, reserved = {}, {}
    for i in range(torch.cuda.device_count()):
        alloc[(("device", f"cuda:{i}"),)] = float(torch.cuda.memory_allocated(i))
        reserved[(("device", f"cuda:{i}"),)] = float(torch.cuda.memory_reserved(i))
    return {"lightx2v_gpu_memory_allocated_bytes": alloc, "lightx2v_gpu_memory_reserved_bytes": reserved}
