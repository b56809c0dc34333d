"""Helpers of the server tests: an in-process server on a free 127.0.0.1 port, a server subprocess ended by its PID,
and bounded waits."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TINY = {"height": 32, "width": 32, "target_video_length": 5}


def bound_socket() -> socket.socket:
    """A listening-ready socket on a free port of 127.0.0.1 (handed to uvicorn: no race for the port)."""
    # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on the accepted connections (with proto 0 it does not, and
    # every response waits ~40 ms for a delayed ACK)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


class LiveServer:
    """The app served by uvicorn in a thread of this process."""

    def __init__(self, settings, ready_timeout: float = 120.0):
        import uvicorn

        from lightx2v.serve.app import create_app

        self.app = create_app(settings)
        self.service = self.app.state.service
        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn to start")
        wait_for(lambda: self.service.ready.is_set() or self.service.load_error, ready_timeout, "the model")
        assert self.service.load_error is None, self.service.load_error

    def client(self, **headers) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive(), "the server thread did not stop"


class ServerProcess:
    """``python -m lightx2v.server ...`` as a subprocess (its own session), ended by its PID."""

    def __init__(self, *args: str, port: int | None = None, env: dict | None = None, log: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lightx2v.server", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, stdout=out, stderr=out,
            start_new_session=True)
        if log:
            out.close()

    def wait_ready(self, timeout: float = 150.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-3000:] if self.log else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}: {tail}")
            try:
                return httpx.get(self.url + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, "the server subprocess to be ready", interval=0.2)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def png_bytes(size=(48, 40), color=(200, 40, 40)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def wait_task(client: httpx.Client, task_id: str, timeout: float = 60.0, states=("completed", "failed", "cancelled"),
              ) -> dict:
    def done():
        st = client.get(f"/v1/tasks/{task_id}/status").json()
        return st if st["status"] in states else None

    return wait_for(done, timeout, f"task {task_id}")


def decode_video(data: bytes, tmp: Path):
    from lightx2v.io.video import read_video

    path = tmp / f"v{time.perf_counter_ns()}.mp4"
    path.write_bytes(data)
    return read_video(path)
