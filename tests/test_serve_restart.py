"""The durable queue across a crash: ``python -m lightx2v.server`` killed with SIGKILL while one task runs and others
wait; after a restart on the same data folder the waiting tasks complete in order, the interrupted one is failed with
the reason, earlier results stay downloadable, and no result file is partial."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import TINY, ServerProcess, decode_video, wait_for, wait_task  # noqa: E402


def test_kill_9_and_restart(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    args = ("--data_dir", str(data), "--max_batch_size", "1", "--max_queue_size", "20")
    first = ServerProcess(*args, log=log)
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=30) as http:
            def submit(**fields):
                r = http.post("/v1/tasks/video/", json={"prompt": "a cat", "infer_steps": 1, **TINY, **fields})
                assert r.status_code == 200, r.text
                return r.json()["task_id"]

            done = submit(seed=1)
            assert wait_task(http, done)["status"] == "completed"
            done_bytes = http.get(f"/v1/tasks/{done}/result").content
            running = submit(seed=2, infer_steps=1000)
            wait_for(lambda: http.get(f"/v1/tasks/{running}/status").json()["step"] >= 1, 60, "the long task")
            pending = [submit(seed=10 + i, infer_steps=2) for i in range(3)]
            assert [http.get(f"/v1/tasks/{p}/status").json()["status"] for p in pending] == ["pending"] * 3
        first.kill9()
    finally:
        first.stop()
    assert first.proc.returncode == -9

    second = ServerProcess(*args, port=first.port, log=log)
    try:
        second.wait_ready()
        with httpx.Client(base_url=second.url, timeout=30) as http:
            st = http.get(f"/v1/tasks/{running}/status").json()
            assert st["status"] == "failed" and st["error"] == "server restarted during generation"
            assert st["error_type"] == "server_restarted"
            assert http.get(f"/v1/tasks/{running}/result").status_code == 404
            finals = [wait_task(http, p) for p in pending]
            assert [f["status"] for f in finals] == ["completed"] * 3
            starts = [f["started_at"] for f in finals]
            assert starts == sorted(starts)  # in submission order
            assert http.get(f"/v1/tasks/{done}/result").content == done_bytes  # kept, downloadable
            for p in pending:
                assert tuple(decode_video(http.get(f"/v1/tasks/{p}/result").content, tmp_path).shape) == (5, 32, 32, 3)
            metrics = http.get("/metrics").text
            assert 'lightx2v_tasks{state="failed"} 1' in metrics and 'lightx2v_tasks{state="completed"} 4' in metrics
    finally:
        second.stop()
    # a graceful stop (uvicorn re-raises the SIGTERM it handled once it has shut down)
    assert second.proc.returncode in (0, -15) and "Application shutdown complete" in log.read_text()
    results = sorted(p.name for p in (data / "results").iterdir())
    assert not [n for n in results if n.startswith(".") or "partial" in n], results
    assert sorted(n for n in results if n.endswith(".mp4")) == sorted(f"{t}.mp4" for t in [done, *pending])
