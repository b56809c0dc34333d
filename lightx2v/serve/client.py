"""A client of the generation service: submit, follow progress (Server-Sent Events), download, cancel.

    from lightx2v.serve.client import Client

    c = Client("http://127.0.0.1:8000", api_key=None)
    path = c.generate("a cat", "cat.mp4", seed=42, infer_steps=20, on_progress=print)   # submit + follow + download

The same from the shell: ``lightx2v submit --prompt "a cat" --out cat.mp4``. Uses httpx (``pip install
'lightx2v[serve]'``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable, Iterator

FINAL = ("completed", "failed", "cancelled")


class ServiceError(Exception):
    """The server answered with an error: ``status`` and its message."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        import httpx

        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self._output: str | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, r):
        if r.status_code >= 400:
            try:
                body = r.json()
                message = body.get("detail") or body
            except ValueError:
                body, message = None, r.text
            raise ServiceError(r.status_code, str(message), body)
        return r

    @property
    def output(self) -> str:
        """"video" or "image": what the server's model makes."""
        if self._output is None:
            self._output = self.metadata()["output"]
        return self._output

    def metadata(self) -> dict:
        return self._check(self.http.get("/v1/service/metadata")).json()

    def ready(self) -> bool:
        return self.http.get("/ready").status_code == 200

    def submit(self, prompt: str, *, image_path: str | Path | None = None, last_frame_path: str | Path | None = None,
               idempotency_key: str | None = None, **fields: Any) -> str:
        """Queue a task (LightX2V's request fields: seed, infer_steps, target_shape, target_video_length,
        negative_prompt, ...); a local image file is sent as base64. Returns the task id."""
        body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        for key, value in (("image_path", image_path), ("last_frame_path", last_frame_path)):
            if value is not None:
                p = Path(value)
                body[key] = base64.b64encode(p.read_bytes()).decode() if p.is_file() else str(value)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self._check(self.http.post(f"/v1/tasks/{self.output}/", json=body, headers=headers))
        return r.json()["task_id"]

    def status(self, task_id: str) -> dict:
        return self._check(self.http.get(f"/v1/tasks/{task_id}/status")).json()

    def events(self, task_id: str, timeout: float | None = None) -> Iterator[dict]:
        """The task's progress events until its final one (``status`` completed | failed | cancelled)."""
        import httpx

        with self.http.stream("GET", f"/v1/tasks/{task_id}/events",
                              timeout=httpx.Timeout(timeout, connect=10.0)) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            data = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    ev = json.loads("\n".join(data))
                    data = []
                    yield ev
                    if ev.get("status") in FINAL or ev.get("status") == "deleted":
                        return

    def wait(self, task_id: str, timeout: float | None = None,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Follow the task to its end; returns its final status (raises ServiceError if it failed)."""
        for ev in self.events(task_id, timeout=timeout):
            if on_progress is not None:
                on_progress(ev)
        st = self.status(task_id)
        if st["status"] != "completed":
            raise ServiceError(409, f"task {task_id} {st['status']}: {st.get('error')}", st)
        return st

    def download(self, task_id: str, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/tasks/{task_id}/result") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            tmp = path.with_name(f".{path.name}.part")
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
            tmp.replace(path)
        return path

    def cancel(self, task_id: str) -> dict:
        return self._check(self.http.delete(f"/v1/tasks/{task_id}")).json()

    def generate(self, prompt: str, out: str | Path, *, timeout: float | None = None,
                 on_progress: Callable[[dict], None] | None = None, **fields: Any) -> Path:
        task_id = self.submit(prompt, **fields)
        self.wait(task_id, timeout=timeout, on_progress=on_progress)
        return self.download(task_id, out)
