"""The durable queue (SQLite, WAL) and the worker, without a model: order, batch claims, idempotency, limits,
recovery after a crash, concurrent writers; the worker's results (atomic), cancel, shutdown hand-back and failures with
a stand-in pipeline."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightx2v.errors import UserError
from lightx2v.serve.files import DataLayout
from lightx2v.serve.metrics import Metrics
from lightx2v.serve.queue import (RESTART_REASON, DuplicateTaskId, IdempotencyConflict, QueueFull, TaskQueue,
                                  partial_name)
from lightx2v.serve.worker import Worker


def add(q, tid, key="k", max_active=100, **kw):
    return q.submit(tid, "video", {"prompt": tid}, key, {}, max_active=max_active, **kw)


def test_wal_order_batches_and_states(tmp_path):
    q = TaskQueue(tmp_path / "t.db")
    assert q._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for tid, key in (("a", "k1"), ("b", "k2"), ("c", "k1"), ("d", "k1"), ("e", "k1")):
        add(q, tid, key)
    assert q.position("a") == 0 and q.position("d") == 3
    assert [t["id"] for t in q.claim(3)] == ["a", "c", "d"]  # the oldest and later ones of its key
    assert {t["id"]: t["batch"] for t in q.list()}["c"] == 3
    assert [t["id"] for t in q.claim(3)] == ["b"]  # then the next oldest (its key has no other)
    assert [t["id"] for t in q.claim(1)] == ["e"] and q.claim(1) == []
    assert q.finish("a", "completed", result="a.mp4", step=2, steps=2)
    assert not q.finish("a", "failed")  # only from processing
    assert q.requeue("b") and q.get("b")["state"] == "pending"
    assert q.cancel_pending("b") and not q.cancel_pending("b")
    assert q.counts() == {"pending": 0, "processing": 3, "completed": 1, "failed": 0, "cancelled": 1}
    assert [t["id"] for t in q.list(order="desc", limit=2)] == ["e", "d"]
    assert [t["id"] for t in q.list(order="desc", after="d", limit=2)] == ["c", "b"]
    assert [t["id"] for t in q.list(after="b")] == ["c", "d", "e"]
    assert q.delete("a") and not q.delete("c")  # a processing task is not deleted
    q.close()
    q2 = TaskQueue(tmp_path / "t.db")  # the states are on disk
    assert q2.get("d")["state"] == "processing" and q2.get("a") is None


def test_limits_idempotency_and_ids(tmp_path):
    q = TaskQueue(tmp_path / "t.db")
    t1, created = add(q, "x1", max_active=2, idem_key="key", idem_payload={"prompt": "p"})
    t2, again = add(q, "x2", max_active=2, idem_key="key", idem_payload={"prompt": "p"})
    assert created and not again and t2["id"] == "x1"
    with pytest.raises(IdempotencyConflict):
        add(q, "x3", max_active=2, idem_key="key", idem_payload={"prompt": "other"})
    with pytest.raises(DuplicateTaskId):
        add(q, "x1", max_active=2)
    add(q, "x4", max_active=2)
    with pytest.raises(QueueFull):
        add(q, "x5", max_active=2)
    q.claim(1)
    q.finish("x1", "completed")
    add(q, "x5", max_active=2)  # a slot is free again
    assert len(q.list()) == 3


def test_concurrent_writers_lose_nothing(tmp_path):
    q = TaskQueue(tmp_path / "t.db")
    with ThreadPoolExecutor(8) as pool:
        def one(i):
            try:
                return add(q, f"t{i}", max_active=300)[0]["id"]
            except QueueFull:
                return None
        got = list(pool.map(one, range(400)))
    accepted = [g for g in got if g]
    assert len(accepted) == 300 == len(set(accepted))
    assert [t["id"] for t in q.list()] == sorted(accepted, key=lambda t: q.get(t)["seq"])
    assert q.counts()["pending"] == 300


def test_recover_after_a_crash(tmp_path):
    layout = DataLayout.create(tmp_path / "data")
    q = TaskQueue(layout.db)
    for tid in ("run1", "run2", "run3", "wait"):
        add(q, tid, key=tid)
    q.claim(1), q.claim(1), q.claim(1)
    (layout.results / "run2.mp4").write_bytes(b"whole")  # renamed, but the crash came before the commit
    (layout.results / partial_name("run3", ".mp4")).write_bytes(b"half")
    q.close()
    q = TaskQueue(layout.db)
    assert layout.remove_partials() == [partial_name("run3", ".mp4")]
    out = q.recover(layout.results)
    assert out == {"failed": ["run1", "run3"], "requeued": [], "completed": ["run2"]}
    assert q.get("run1")["error"] == RESTART_REASON and q.get("run1")["error_code"] == "server_restarted"
    assert q.get("run2")["result"] == "run2.mp4" and q.get("wait")["state"] == "pending"
    add(q, "run4", key="x")
    q.claim(1)
    q.claim(1)
    assert q.recover(layout.results, rerun=True)["requeued"] == ["wait", "run4"]
    assert q.get("wait")["state"] == "pending"


# --- the worker with a stand-in pipeline ---------------------------------------------------------------------

class FakePipe:
    """Runs ``steps`` steps of ``delay`` seconds, then writes the result file (as LightX2VPipeline.run does)."""

    def __init__(self, delay=0.01):
        self.delay = delay

    def run(self, request, ctx):
        n = request.sampling.infer_steps
        for i in range(n):
            time.sleep(self.delay)
            if request.prompt == "explode" and i == 1:
                raise RuntimeError("boom")
            ctx.step("denoise", i + 1, n)
        frames = torch.rand(3, 8, 8, 3)
        from lightx2v.io.video import save_result

        return save_result(frames, request.save_result_path, 8), frames


def build(pipe, row, save_path):
    p = row["params"]
    if p["prompt"] == "invalid":
        raise UserError("height=33 is not divisible by 16")
    return SimpleNamespace(prompt=p["prompt"], sampling=SimpleNamespace(infer_steps=p["steps"]),
                           save_result_path=save_path)


@pytest.fixture
def worker(tmp_path):
    layout = DataLayout.create(tmp_path / "data")
    q = TaskQueue(layout.db)
    w = Worker(q, layout, Metrics(), build)
    w.start(FakePipe())
    yield w
    w.stop()
    q.close()


def put(w, tid, prompt="p", steps=3):
    w.queue.submit(tid, "video", {"prompt": prompt, "steps": steps}, "k", {}, max_active=100)
    w.wake()


def wait_state(w, tid, states=("completed", "failed", "cancelled"), timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = w.queue.get(tid)
        if t["state"] in states:
            return t
        time.sleep(0.01)
    raise TimeoutError(tid)


def test_worker_results_failures_and_cancel(worker):
    put(worker, "ok")
    put(worker, "bad", prompt="invalid")
    put(worker, "boom", prompt="explode")
    put(worker, "long", steps=10000)
    assert wait_state(worker, "ok")["result"] == "ok.mp4"
    res = worker.layout.results
    assert (res / "ok.mp4").stat().st_size > 0 and (res / "ok.thumb.png").is_file()
    bad = wait_state(worker, "bad")
    assert bad["state"] == "failed" and bad["error_code"] == "invalid_request" and "height=33" in bad["error"]
    boom = wait_state(worker, "boom")
    assert boom["state"] == "failed" and boom["error_code"] == "internal_error" and "boom" in boom["error"]
    wait_state(worker, "long", ("processing",))
    deadline = time.monotonic() + 10
    while (worker.progress_of("long") or {}).get("step", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    out = worker.cancel("long")
    assert out["stopped_at_step"] - out["requested_at_step"] <= 1
    t = worker.queue.get("long")
    assert t["state"] == "cancelled" and t["error"] == "cancelled by user" and 3 <= t["step"] < 10000
    assert sorted(p.name for p in res.iterdir()) == ["ok.mp4", "ok.thumb.png"]  # nothing partial
    assert worker.metrics.value("lightx2v_tasks_finished_total", state="failed") == 2


def test_shutdown_hands_the_running_task_back(worker):
    put(worker, "a", steps=10000)
    put(worker, "b")
    wait_state(worker, "a", ("processing",))
    worker.stop()
    assert worker.queue.get("a")["state"] == "pending" and worker.queue.get("a")["step"] == 0
    assert worker.queue.get("b")["state"] == "pending"
    assert not list(worker.layout.results.iterdir())


def test_a_cancel_between_claim_and_start_is_not_lost(tmp_path):
    layout = DataLayout.create(tmp_path / "data")
    q = TaskQueue(layout.db)
    w = Worker(q, layout, Metrics(), build)
    w.pipe = FakePipe()  # the loop is not started: the test plays it
    q.submit("c", "video", {"prompt": "p", "steps": 10000}, "k", {}, max_active=10)
    q.claim(1)  # as the worker's loop does, before it registers the task

    def late_start():
        time.sleep(0.2)
        w._run(q.list(states=["processing"]))

    t = threading.Thread(target=late_start)
    t.start()
    out = w.cancel("c", wait=20)
    t.join(30)
    assert out is not None and q.get("c")["state"] == "cancelled" and q.get("c")["step"] <= 1
    q.close()


def test_service_start_cleans_partials_and_recovers(tmp_path):
    from lightx2v.serve.app import Service
    from lightx2v.serve.schemas import ServeSettings

    svc = Service(ServeSettings(data_dir=str(tmp_path / "data")))
    svc.start(load=False)
    svc.queue.submit("r", "video", {"prompt": "p"}, "k", {}, max_active=10)
    svc.queue.claim(1)
    (svc.layout.results / partial_name("r", ".mp4")).write_bytes(b"half")
    svc.stop()
    svc = Service(ServeSettings(data_dir=str(tmp_path / "data")))
    svc.start(load=False)
    assert svc.recovered["failed"] == ["r"] and not list(svc.layout.results.iterdir())
    assert isinstance(svc.queue._db, sqlite3.Connection)
    svc.stop()
    assert Path(tmp_path / "data" / "tasks.db").is_file()


def test_serve_cli_refuses_a_bad_model_before_listening(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    from lightx2v.cli import main

    assert main(["serve", "--model_path", str(tmp_path / "missing"), "--data_dir", str(tmp_path / "d")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--max_batch_size", "0", "--data_dir", str(tmp_path / "d")]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
