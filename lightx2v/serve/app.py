"""The HTTP service: FastAPI routes over the durable queue and the generation worker.

    app = create_app(ServeSettings(data_dir="data", max_batch_size=2))   # uvicorn.run(app, host=..., port=...)

Routes (docs/serve.md has the request fields and examples):

* LightX2V's, so its clients work unchanged: ``POST /v1/tasks/video/`` (JSON), ``/v1/tasks/video/form``
  (multipart), ``POST /v1/tasks/image/``, ``/v1/tasks/image/form``, ``/v1/tasks/image/sync`` (single-frame models),
  ``GET /v1/tasks/``, ``/v1/tasks/queue/status``, ``/v1/tasks/{id}/status``, ``/v1/tasks/{id}/result``,
  ``DELETE /v1/tasks/{id}``, ``DELETE /v1/tasks/all/running``, ``GET /v1/service/status``,
  ``/v1/service/metadata``, ``/v1/files/download/{name}``;
* OpenAI's: ``POST /v1/videos``, ``GET /v1/videos``, ``GET /v1/videos/{id}``, ``GET /v1/videos/{id}/content``,
  ``DELETE /v1/videos/{id}``, ``POST /v1/images/generations`` (image models);
* ``GET /health`` (alive), ``/ready`` (model loaded), ``/metrics`` (Prometheus), and a Server-Sent Events progress
  stream per task: ``GET /v1/tasks/{id}/events`` (= ``/v1/videos/{id}/events``).

Submissions are validated before they are queued: the schema (field-level 422), then the engine itself
(``pipe.make_request`` and every stage's ``check_request``: its UserError text becomes the 422 message). A full queue
answers 503 with Retry-After; an ``Idempotency-Key`` header returns the task it first created.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import random
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightx2v.errors import UserError
from lightx2v.serve.files import DataLayout, confined, resolve_image, store_image
from lightx2v.serve.metrics import Metrics, gpu_gauges
from lightx2v.serve.queue import (FINAL, DuplicateTaskId, IdempotencyConflict, QueueFull, TaskQueue,
                                  request_hash)
from lightx2v.serve.schemas import (TASK_ID, ApiError, ImageGeneration, ServeSettings, TaskRequest, VideoCreate,
                                    engine_param, validation_message)
from lightx2v.serve.worker import USER_CANCEL, Worker

log = logging.getLogger("lightx2v.serve")

OPENAI_STATUS = {"pending": "queued", "processing": "in_progress", "completed": "completed", "failed": "failed",
                 "cancelled": "failed"}
ENGINE_FIELDS = {"seed", "prompt", "negative_prompt", "image_path", "last_frame_path", "infer_steps", "height",
                 "width", "num_frames", "guidance_scale", "sample_shift", "sample_solver", "enable_cfg", "fps",
                 "resize_mode", "boundary", "aspect_ratio", "task", "target_shape", "lora_configs"}
MEDIA = {".mp4": "video/mp4", ".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class Service:
    """What the routes share: settings, data folder, queue, worker, the loaded pipeline, metrics."""

    def __init__(self, settings: ServeSettings):
        from lightx2v.engine.family import default_model_cls, family_of

        self.settings = settings
        self.model_cls = settings.model_cls or default_model_cls()
        self.family = family_of(self.model_cls)
        self.output = self.family.output  # "video" | "image"
        self.layout = DataLayout.create(settings.data_dir, settings.input_dir)
        self.metrics = Metrics()
        self.queue: TaskQueue | None = None
        self.worker: Worker | None = None
        self.pipe = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.on_load_error = None  # called with the exception when loading fails (the CLI stops the server)
        self.recovered: dict = {}

    # --- life ------------------------------------------------------------------------------------------------

    def start(self, load: bool = True) -> None:
        self.queue = TaskQueue(self.layout.db)
        self.layout.remove_partials()
        self.recovered = self.queue.recover(self.layout.results, rerun=self.settings.rerun_interrupted)
        if any(self.recovered.values()):
            log.info("recovered after a restart: %s", {k: len(v) for k, v in self.recovered.items()})
        self.worker = Worker(self.queue, self.layout, self.metrics, self.build_request,
                             max_batch_size=self.settings.max_batch_size, output=self.output)
        if load:
            threading.Thread(target=self._load, name="lightx2v-load", daemon=True).start()

    def _load(self) -> None:
        from lightx2v.pipeline import LightX2VPipeline

        try:
            s = self.settings
            pipe = LightX2VPipeline(model_path=s.model_path, model_cls=self.model_cls, task=s.task)
            pipe.create_generator(config_json=s.config_json, **s.overrides)
        except BaseException as e:  # noqa: BLE001 - reported by /ready; the CLI exits
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        self.use_pipeline(pipe)

    def use_pipeline(self, pipe) -> None:
        """Serve with ``pipe`` (a loaded LightX2VPipeline) and start the worker."""
        self.pipe = pipe
        self.worker.start(pipe)
        self.ready.set()
        self.metrics.set("lightx2v_model_ready", 1)
        log.info("model ready: %s (%s)", self.model_cls, self.settings.task)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.queue is not None:
            self.queue.close()

    # --- requests ----------------------------------------------------------------------------------------------

    def engine_kwargs(self, params: dict) -> dict:
        kw = {"seed": params["seed"], "prompt": params["prompt"], "negative_prompt": params["negative_prompt"],
              "image_path": params.get("image"), "last_frame_path": params.get("last_frame"), **params["sampling"]}
        if params.get("loras"):
            kw["lora_configs"] = params["loras"]
        return kw

    def build_request(self, pipe, row: dict, save_path: str):
        return pipe.make_request(**self.engine_kwargs(row["params"]), save_result_path=save_path,
                                 return_result_tensor=True, request_id=row["id"])

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_failed")
        if not self.ready.is_set():
            raise ApiError(503, "the model is loading; try again shortly", code="model_loading",
                           headers={"Retry-After": "5"})

    def check_route(self, kind: str) -> None:
        if kind != self.output:
            raise ApiError(400, f"this server's model ({self.model_cls}, task {self.settings.task}) makes "
                                f"{self.output}s; use the {self.output} routes", code="wrong_route")

    def lora(self, name: str | None, strength: float) -> list | None:
        if not name:
            return None
        if not self.settings.lora_dir:
            raise ApiError(422, "lora_name: this server has no LoRA folder (start it with --lora_dir)", "lora_name")
        path = confined(Path(self.settings.lora_dir), name, "lora_name")
        if not path.is_file():
            raise ApiError(422, f"lora_name: no file {name!r} in the LoRA folder", "lora_name")
        return [{"path": str(path), "strength": strength}]

    def submit(self, kind: str, fields: dict, *, image: str | None = None, last_frame: str | None = None,
               loras: list | None = None, task_id: str | None = None, info: dict | None = None,
               idem_key: str | None = None, idem_payload: Any = None) -> tuple[dict, bool]:
        """Validate a request against the engine and queue it. ``fields``: prompt, negative_prompt, seed and the
        sampling overrides (engine names). Returns ``(task, created)``."""
        self.require_ready()
        self.check_route(kind)
        pipe = self.pipe
        seed = fields.get("seed")
        params = {"prompt": fields["prompt"], "negative_prompt": fields.get("negative_prompt", ""),
                  "seed": int(seed) if seed is not None else random.randint(0, 2**32 - 1),
                  "image": image, "last_frame": last_frame, "loras": loras,
                  "sampling": dict(fields.get("sampling", {}))}
        try:
            request = pipe.make_request(**self.engine_kwargs(params), return_result_tensor=True)
            pipe.runner.check_request(request)
        except UserError as e:
            self.metrics.inc("lightx2v_tasks_rejected_total", reason="invalid")
            raise ApiError(422, str(e), engine_param(str(e), ENGINE_FIELDS), "invalid_value") from None
        s = request.sampling
        batch_key = json.dumps({"task": request.task, "sampling": s.to_dict(), "images": len(request.images)},
                               sort_keys=True) if loras is None else uuid.uuid4().hex
        info = {"model": self.model_cls, "size": f"{s.width}x{s.height}", "seconds": f"{s.num_frames / s.fps:g}",
                "num_frames": s.num_frames, "infer_steps": s.infer_steps, "prompt": params["prompt"],
                **(info or {})}
        task_id = task_id or uuid.uuid4().hex
        try:
            task, created = self.queue.submit(task_id, kind, params, batch_key, info,
                                              max_active=self.settings.max_queue_size, idem_key=idem_key,
                                              idem_payload=idem_payload)
        except QueueFull as e:
            self.metrics.inc("lightx2v_tasks_rejected_total", reason="queue_full")
            raise ApiError(503, f"{e}; retry later", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())}) from None
        except IdempotencyConflict as e:
            raise ApiError(409, str(e), "Idempotency-Key", "idempotency_conflict") from None
        except DuplicateTaskId as e:
            raise ApiError(409, str(e), "task_id", "duplicate_task_id") from None
        if created:
            self.metrics.inc("lightx2v_tasks_submitted_total")
            self.worker.wake()
        return task, created

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean task time so far (5 s before any)."""
        mean = self.metrics.mean("lightx2v_task_seconds")
        return 5 if mean is None else max(1, int(mean + 0.999))

    def task(self, task_id: str) -> dict:
        t = self.queue.get(task_id) if TASK_ID.match(task_id or "") else None
        if t is None:
            raise ApiError(404, f"task_id {task_id!r} not found", "task_id", "not_found")
        return t

    def live(self, task: dict) -> dict:
        """Stage/step/steps/progress of a task (the worker's, while it runs)."""
        if task["state"] == "processing":
            p = self.worker.progress_of(task["id"]) or {}
            step, steps, stage = p.get("step", task["step"]), p.get("steps", task["steps"]), p.get("stage", "starting")
        else:
            step, steps = task["step"], task["steps"] or task["info"].get("infer_steps", 0)
            stage = task["state"]
        if task["state"] == "completed":
            pct = 100
        elif steps:
            pct = min(99, int(100 * step / steps))
        else:
            pct = 0
        return {"stage": stage, "step": step, "steps": steps, "progress": pct}

    def cancel(self, task_id: str, reason: str = USER_CANCEL) -> dict:
        task = self.task(task_id)
        if task["state"] == "pending" and self.queue.cancel_pending(task_id, reason):
            return {"stop_status": "success", "reason": "Task cancelled (it was queued).", "task_id": task_id,
                    "status": "cancelled"}
        stopped = self.worker.cancel(task_id, reason, wait=self.settings.cancel_wait_s) if self.worker else None
        if stopped is not None:
            state = self.queue.get(task_id)["state"]
            return {"stop_status": "success" if state in FINAL else "stopping",
                    "reason": "Task stopped." if state in FINAL else "Task is stopping at its next step.",
                    "task_id": task_id, "status": state, **stopped}
        return {"stop_status": "do_nothing", "reason": "Task already finished.", "task_id": task_id,
                "status": self.queue.get(task_id)["state"]}

    # --- views -----------------------------------------------------------------------------------------------

    def lightx2v_status(self, t: dict) -> dict:
        live = self.live(t)
        return {"task_id": t["id"], "status": t["state"], "start_time": _iso(t["started_at"] or t["created_at"]),
                "end_time": _iso(t["completed_at"]), "error": t["error"], "error_type": t["error_code"] or "",
                "save_result_path": t["info"].get("save_result_path") or t["result"] or "",
                "created_at": t["created_at"], "started_at": t["started_at"], "completed_at": t["completed_at"],
                "queue_position": self.queue.position(t["id"]), "seed": t["params"]["seed"],
                "batch_size": t["batch"], **live,
                "result_url": f"/v1/tasks/{t['id']}/result" if t["state"] == "completed" else None}

    def openai_video(self, t: dict) -> dict:
        err = None
        if t["state"] in ("failed", "cancelled"):
            err = {"code": t["error_code"] or t["state"], "message": t["error"] or t["state"]}
        return {"id": t["id"], "object": "video", "model": t["info"].get("model", self.model_cls),
                "status": OPENAI_STATUS[t["state"]], "progress": self.live(t)["progress"],
                "created_at": int(t["created_at"]), "completed_at": None if t["completed_at"] is None
                else int(t["completed_at"]), "expires_at": None, "error": err, "prompt": t["params"]["prompt"],
                "seconds": t["info"].get("seconds"), "size": t["info"].get("size"), "remixed_from_video_id": None}

    def event(self, t: dict | None, task_id: str) -> dict:
        if t is None:
            return {"task_id": task_id, "status": "deleted"}
        return {"task_id": t["id"], "status": t["state"], "openai_status": OPENAI_STATUS[t["state"]], **self.live(t),
                "queue_position": self.queue.position(t["id"]), "error": t["error"]}

    def result_path(self, t: dict, variant: str = "video") -> Path:
        if t["state"] != "completed" or not t["result"]:
            raise ApiError(404, f"task {t['id']!r} is {t['state']}, not completed: no result yet", "task_id",
                           "not_ready")
        name = t["result"]
        if variant == "thumbnail" and self.output == "video":
            name = f"{t['id']}.thumb.png"
        path = self.layout.result_file(name)
        if path is None:
            raise ApiError(404, f"the result file of task {t['id']!r} is missing", "task_id", "result_missing")
        return path

    def file_response(self, t: dict, path: Path) -> FileResponse:
        name = t["info"].get("save_result_path") or path.name
        if Path(name).suffix.lower() != path.suffix.lower():
            name = Path(name).stem + path.suffix
        return FileResponse(path, media_type=MEDIA.get(path.suffix.lower(), "application/octet-stream"),
                            filename=Path(name).name)


# --- the app -------------------------------------------------------------------------------------------------

def create_app(settings: ServeSettings | None = None, service: Service | None = None, *, load: bool = True
               ) -> FastAPI:
    """The FastAPI app. ``load=False``: do not load a model at start-up (call ``app.state.service.use_pipeline``)."""
    from contextlib import asynccontextmanager

    service = service or Service(settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app):
        service.start(load=load)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="lightx2v", version=_version(), lifespan=lifespan, redirect_slashes=False)
    app.state.service = service
    app.add_middleware(Guard, service=service)
    _errors(app)
    _routes(app, service)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lightx2v")
    except Exception:  # noqa: BLE001
        return "0"


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        return _error_response(ApiError(422, message, param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error_response(ApiError(e.status_code, str(e.detail), None, None, dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", None, "internal_error"))


def _validate(model, data: Any):
    if not isinstance(data, dict):
        raise ApiError(422, "body: must be a JSON object", "body", "invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise ApiError(422, message, param, "invalid_value") from None


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(422, f"body: not valid JSON ({e})", "body", "invalid_json") from None


def _form_value(v: str) -> Any:
    """Multipart fields are strings; lists (target_shape, guidance_scale) may come as JSON or "a,b"."""
    s = v.strip()
    if s.startswith("["):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return v
    return v


async def _form(request: Request, files: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, f"body: expected multipart/form-data, got {ctype or 'nothing'!r}", "body",
                       "unsupported_media_type")
    try:
        form = await request.form()
    except _TooLarge:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart's errors
        raise ApiError(400, f"body: not a readable multipart form ({e})", "body") from None
    fields: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):  # an upload
            if key not in files:
                raise ApiError(422, f"{key}: unknown file field; allowed: {', '.join(files)}", key)
            data = await value.read()
            if data or value.filename:
                blobs[key] = data
        elif value != "" or key not in files:
            fields[key] = _form_value(value)
    return fields, blobs


def _idem(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise ApiError(422, "Idempotency-Key: must be 1-255 characters", "Idempotency-Key")
    return key


def _routes(app: FastAPI, svc: Service) -> None:  # noqa: C901 - one place for every route
    # --- LightX2V's task routes ------------------------------------------------------------------------------

    def lightx2v_submit(kind: str, body: TaskRequest, idem_key: str | None, image_blobs: dict | None = None,
                        payload: Any = None):
        svc.require_ready()
        svc.check_route(kind)
        blobs = image_blobs or {}
        image = store_image(svc.layout, blobs["image_file"], "image_file") if "image_file" in blobs \
            else resolve_image(svc.layout, body.image_path, "image_path")
        last = store_image(svc.layout, blobs["last_frame_file"], "last_frame_file") if "last_frame_file" in blobs \
            else resolve_image(svc.layout, body.last_frame_path, "last_frame_path")
        name = _result_name(body.save_result_path, svc.output)
        if body.target_fps is not None and body.target_fps != svc.pipe.config.sampling.fps:
            raise ApiError(422, f"target_fps: frame interpolation per request is not available; this server writes "
                                f"{svc.pipe.config.sampling.fps} fps", "target_fps")
        fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
                  "sampling": body.sampling()}
        task, created = svc.submit(kind, fields, image=image, last_frame=last,
                                   loras=svc.lora(body.lora_name, body.lora_strength), task_id=body.task_id,
                                   info={"api": "lightx2v", "save_result_path": name}, idem_key=idem_key,
                                   idem_payload=payload if payload is not None else [kind, body.model_dump()])
        return task, created

    def task_response(task: dict, created: bool) -> JSONResponse:
        body = {"task_id": task["id"], "task_status": task["state"],
                "save_result_path": task["info"].get("save_result_path") or f"{task['id']}"}
        return JSONResponse(body, headers={} if created else {"Idempotent-Replayed": "true"})

    async def submit_json(kind: str, request: Request):
        body = _validate(TaskRequest, await _json_body(request))
        task, created = await run_in_threadpool(lightx2v_submit, kind, body, _idem(request))
        return task_response(task, created)

    async def submit_form(kind: str, request: Request):
        fields, blobs = await _form(request, ("image_file", "last_frame_file"))
        for key in ("image_path", "last_frame_path"):
            if key in fields and f"{key[:-5]}_file" in blobs:
                raise ApiError(422, f"{key}: give the file or the path, not both", key)
        body = _validate(TaskRequest, fields)
        payload = [kind, body.model_dump(), {k: request_hash(base64.b64encode(v).decode()) for k, v in blobs.items()}]
        task, created = await run_in_threadpool(lightx2v_submit, kind, body, _idem(request), blobs, payload)
        return task_response(task, created)

    def json_route(kind: str):
        async def route(request: Request):
            return await submit_json(kind, request)
        return route

    def form_route(kind: str):
        async def route(request: Request):
            return await submit_form(kind, request)
        return route

    for path in ("/v1/tasks/video/", "/v1/tasks/video", "/v1/tasks/", "/v1/tasks"):
        app.post(path, include_in_schema=path == "/v1/tasks/video/")(json_route("video"))
    app.post("/v1/tasks/video/form")(form_route("video"))
    for path in ("/v1/tasks/image/", "/v1/tasks/image"):
        app.post(path, include_in_schema=path == "/v1/tasks/image/")(json_route("image"))
    app.post("/v1/tasks/image/form")(form_route("image"))

    @app.post("/v1/tasks/image/sync")
    async def image_sync(request: Request, timeout_seconds: float = 600, poll_interval_seconds: float = 0.1):
        if not 0 < timeout_seconds <= 3600:
            raise ApiError(422, "timeout_seconds: must be in (0, 3600]", "timeout_seconds")
        if not 0 < poll_interval_seconds <= 10:
            raise ApiError(422, "poll_interval_seconds: must be in (0, 10]", "poll_interval_seconds")
        body = _validate(TaskRequest, await _json_body(request))
        task, _ = await run_in_threadpool(lightx2v_submit, "image", body, _idem(request))
        path = await _wait_result(svc, request, task["id"], timeout_seconds, poll_interval_seconds)
        return Response(path.read_bytes(), media_type="image/png",
                        headers={"Content-Disposition": 'inline; filename="result.png"', "X-Task-Id": task["id"]})

    @app.get("/v1/tasks/queue/status")
    def queue_status():
        counts = svc.queue.counts()
        running = list(svc.worker.running()) if svc.worker else []
        active = counts["pending"] + counts["processing"]
        return {"is_processing": bool(running), "current_task": running[0] if running else None,
                "running_tasks": running, "pending_count": counts["pending"], "active_count": active,
                "queue_size": svc.settings.max_queue_size,
                "queue_available": max(0, svc.settings.max_queue_size - active)}

    @app.get("/v1/tasks/{task_id}/status")
    def task_status(task_id: str):
        return svc.lightx2v_status(svc.task(task_id))

    @app.get("/v1/tasks/{task_id}/result")
    def task_result(task_id: str):
        t = svc.task(task_id)
        return svc.file_response(t, svc.result_path(t))

    @app.get("/v1/tasks/{task_id}/events")
    async def task_events(task_id: str, request: Request):
        svc.task(task_id)
        return _sse(svc, request, task_id)

    @app.delete("/v1/tasks/all/running")
    def cancel_all():
        pending = svc.queue.cancel_all_pending()
        running = list(svc.worker.running()) if svc.worker else []
        for task_id in running:
            svc.worker.cancel(task_id, USER_CANCEL, wait=svc.settings.cancel_wait_s)
        return {"stop_status": "success", "reason": f"Cancelled {len(pending)} queued and {len(running)} running "
                                                    "task(s).", "cancelled": pending + running}

    @app.delete("/v1/tasks/{task_id}")
    def cancel_task(task_id: str):
        return svc.cancel(task_id)

    @app.get("/v1/tasks/")
    @app.get("/v1/tasks", include_in_schema=False)
    def list_tasks(limit: int | None = None, status: str | None = None):
        if limit is not None and not 1 <= limit <= 100000:
            raise ApiError(422, "limit: must be in 1..100000", "limit")
        states = None if status is None else [s.strip() for s in status.split(",")]
        if states is not None and not set(states) <= {"pending", "processing", "completed", "failed", "cancelled"}:
            raise ApiError(422, f"status: {status!r}; allowed: pending, processing, completed, failed, cancelled",
                           "status")
        tasks = svc.queue.list(limit=limit, order="desc" if limit else "asc", states=states)
        return {t["id"]: svc.lightx2v_status(t) for t in tasks}

    @app.get("/v1/files/download/{name:path}")
    def download(name: str):
        path = svc.layout.result_file(name)
        if path is None:
            raise ApiError(404, f"name: no result file {name!r}", "name", "not_found")
        return FileResponse(path, media_type=MEDIA.get(path.suffix.lower(), "application/octet-stream"),
                            filename=path.name)

    @app.get("/v1/service/status")
    def service_status():
        counts = svc.queue.counts()
        running = list(svc.worker.running()) if svc.worker else []
        return {"service_status": "busy" if running else "idle", "current_task": running[0] if running else None,
                "active_tasks": running, "pending_tasks": counts["pending"],
                "queue_size": svc.settings.max_queue_size, "total_tasks": sum(counts.values()),
                "completed_tasks": counts["completed"], "failed_tasks": counts["failed"],
                "cancelled_tasks": counts["cancelled"], "model_ready": svc.ready.is_set()}

    @app.get("/v1/service/metadata")
    def service_metadata():
        s = svc.settings
        meta = {"nproc_per_node": 1, "model_cls": svc.model_cls, "model_path": s.model_path, "task": s.task,
                "output": svc.output, "max_batch_size": s.max_batch_size, "max_queue_size": s.max_queue_size,
                "max_upload_mb": s.max_upload_mb, "version": _version(), "ready": svc.ready.is_set()}
        if svc.pipe is not None:
            meta["defaults"] = svc.pipe.config.sampling.to_dict()
            meta["device"] = str(svc.pipe.runner.device)
        return meta

    # --- OpenAI's routes -------------------------------------------------------------------------------------

    def openai_submit(body: VideoCreate, image_blob: bytes | None, idem_key: str | None, payload: Any):
        svc.require_ready()
        svc.check_route("video")
        if body.model is not None and body.model not in (svc.model_cls, f"{svc.model_cls}-{svc.settings.task}"):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {svc.model_cls!r}",
                           "model", "model_not_found")
        ref = body.input_reference
        image = None
        if image_blob is not None:
            image = store_image(svc.layout, image_blob, "input_reference")
        elif isinstance(ref, dict):
            if set(ref) - {"image_url"} or not isinstance(ref.get("image_url"), str):
                raise ApiError(422, "input_reference: only {\"image_url\": \"data:image/...;base64,...\"} is "
                                    "supported (no file ids)", "input_reference")
            image = resolve_image(svc.layout, ref["image_url"], "input_reference")
        elif isinstance(ref, str):
            image = resolve_image(svc.layout, ref, "input_reference")
        elif ref is not None:
            raise ApiError(422, "input_reference: must be an uploaded image or {\"image_url\": ...}",
                           "input_reference")
        sampling = body.sampling()
        if body.seconds is not None:
            fps = svc.pipe.config.sampling.fps
            sampling["num_frames"] = max(0, round((body.seconds * fps - 1) / 4)) * 4 + 1
        fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
                  "sampling": sampling}
        return svc.submit("video", fields, image=image, info={"api": "openai"}, idem_key=idem_key,
                          idem_payload=payload)

    @app.post("/v1/videos")
    async def create_video(request: Request):
        ctype = request.headers.get("content-type", "")
        blob = None
        if ctype.startswith("application/json"):
            data = await _json_body(request)
            payload = data
        else:
            data, blobs = await _form(request, ("input_reference",))
            blob = blobs.get("input_reference")
            payload = [data, request_hash(base64.b64encode(blob).decode()) if blob else None]
        body = _validate(VideoCreate, data)
        task, created = await run_in_threadpool(openai_submit, body, blob, _idem(request), payload)
        return JSONResponse(svc.openai_video(task), headers={} if created else {"Idempotent-Replayed": "true"})

    @app.get("/v1/videos")
    def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise ApiError(422, "limit: must be in 1..100", "limit")
        if order not in ("asc", "desc"):
            raise ApiError(422, f"order: {order!r}; allowed: asc, desc", "order")
        if after is not None:
            svc.task(after)
        tasks = svc.queue.list(limit=limit + 1, after=after, order=order, kind="video")
        page = tasks[:limit]
        data = [svc.openai_video(t) for t in page]
        return {"object": "list", "data": data, "has_more": len(tasks) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}")
    def get_video(video_id: str):
        t = svc.task(video_id)
        active = t["state"] in ("pending", "processing")  # the openai client's poll helpers read this header
        return JSONResponse(svc.openai_video(t), headers={"openai-poll-after-ms": "200"} if active else {})

    @app.get("/v1/videos/{video_id}/content")
    def video_content(video_id: str, variant: str = "video"):
        if variant not in ("video", "thumbnail"):
            raise ApiError(422, f"variant: {variant!r} is not available; allowed: video, thumbnail", "variant")
        t = svc.task(video_id)
        return svc.file_response(t, svc.result_path(t, variant)) if variant == "video" else \
            FileResponse(svc.result_path(t, variant), media_type="image/png")

    @app.get("/v1/videos/{video_id}/events")
    async def video_events(video_id: str, request: Request):
        svc.task(video_id)
        return _sse(svc, request, video_id)

    @app.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str):
        t = svc.task(video_id)
        if t["state"] in ("pending", "processing"):
            svc.cancel(video_id)
        if not svc.queue.delete(video_id):
            raise ApiError(409, f"video {video_id!r} is still stopping; try again", "video_id", "busy")
        svc.layout.remove_results(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.post("/v1/images/generations")
    async def image_generations(request: Request):
        body = _validate(ImageGeneration, await _json_body(request))

        def submit():
            svc.require_ready()
            svc.check_route("image")
            if body.model is not None and body.model != svc.model_cls:
                raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                                    f"{svc.model_cls!r}", "model", "model_not_found")
            fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
                      "sampling": body.sampling()}
            return svc.submit("image", fields, info={"api": "openai"}, idem_key=_idem(request),
                              idem_payload=body.model_dump())

        task, _ = await run_in_threadpool(submit)
        path = await _wait_result(svc, request, task["id"], 600, 0.05)
        t = svc.queue.get(task["id"])
        item = {"url": f"{str(request.base_url).rstrip('/')}/v1/files/download/{path.name}"} \
            if body.response_format == "url" else {"b64_json": base64.b64encode(path.read_bytes()).decode()}
        return {"created": int(t["created_at"]), "data": [item], "output_format": "png", "size": t["info"]["size"]}

    # --- health, readiness, metrics ----------------------------------------------------------------------------

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        if svc.ready.is_set():
            return {"ready": True, "model_cls": svc.model_cls, "task": svc.settings.task}
        detail = f"the model failed to load: {svc.load_error}" if svc.load_error else "the model is loading"
        return JSONResponse({"ready": False, "detail": detail}, status_code=503)

    @app.get("/metrics")
    def metrics():
        counts = svc.queue.counts()
        gauges = {"lightx2v_queue_depth": {(): counts["pending"]},
                  "lightx2v_queue_capacity": {(): svc.settings.max_queue_size},
                  "lightx2v_tasks": {(("state", k),): v for k, v in counts.items()},
                  "lightx2v_model_ready": {(): 1.0 if svc.ready.is_set() else 0.0}, **gpu_gauges()}
        return PlainTextResponse(svc.metrics.render(gauges), media_type="text/plain; version=0.0.4")


def _result_name(value: str, output: str) -> str:
    """LightX2V's save_result_path -> the result's download name (the file itself is <data_dir>/results/<id>.<ext>):
    a relative path inside the results folder; its last part is kept."""
    if not value:
        return ""
    p = value.replace("\\", "/")
    if p.startswith("/") or ":" in p.split("/")[0] or ".." in p.split("/"):
        raise ApiError(403, f"save_result_path: {value!r} leaves the results folder; give a file name",
                       "save_result_path", "forbidden_path")
    name = Path(p).name
    if not name or name.startswith("."):
        raise ApiError(422, f"save_result_path: {value!r} has no file name", "save_result_path")
    allowed = (".mp4",) if output == "video" else (".png", ".jpg", ".jpeg", ".webp")
    if Path(name).suffix and Path(name).suffix.lower() not in allowed:
        raise ApiError(422, f"save_result_path: suffix {Path(name).suffix!r}; allowed: {', '.join(allowed)}",
                       "save_result_path")
    return name


async def _wait_result(svc: Service, request: Request, task_id: str, timeout: float, poll: float) -> Path:
    """Wait for a task to finish (a sync route); its result file, or the error it failed with."""
    deadline = time.monotonic() + timeout
    while True:
        t = svc.queue.get(task_id)
        if t["state"] == "completed":
            return svc.result_path(t)
        if t["state"] == "failed":
            status = 422 if t["error_code"] == "invalid_request" else 500
            raise ApiError(status, t["error"] or "failed", None, t["error_code"])
        if t["state"] == "cancelled":
            raise ApiError(409, t["error"] or "cancelled", None, "cancelled")
        if await request.is_disconnected():
            await run_in_threadpool(svc.cancel, task_id, "client disconnected")
            raise ApiError(499, f"client disconnected; task {task_id} cancelled")
        if time.monotonic() > deadline:
            await run_in_threadpool(svc.cancel, task_id, "timed out")
            raise ApiError(504, f"task {task_id} timed out after {timeout:g} s", None, "timeout")
        await asyncio.sleep(poll)


def _sse(svc: Service, request: Request, task_id: str) -> StreamingResponse:
    """Server-Sent Events: ``event: progress`` while the task waits or runs (on every change), then one event
    named after its final state (completed | failed | cancelled), then the stream ends."""

    async def stream():
        last, beat = None, time.monotonic()
        while True:
            t = svc.queue.get(task_id)
            ev = svc.event(t, task_id)
            final = t is None or t["state"] in FINAL
            if ev != last:
                name = ev["status"] if final else "progress"
                yield f"event: {name}\ndata: {json.dumps(ev)}\n\n"
                last, beat = ev, time.monotonic()
            if final:
                return
            if time.monotonic() - beat > 15:
                yield ": keep-alive\n\n"
                beat = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.05)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- the guard: API key, body size, request metrics ----------------------------------------------------------

class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the API key on every route but /health (``X-API-Key`` or ``Authorization: Bearer``), the
    upload limit (413 from Content-Length, or as soon as a streamed body passes it), and HTTP metrics."""

    def __init__(self, app, service: Service):
        self.app, self.svc = app, service
        self.limit = int(service.settings.max_upload_mb * 2**20)
        key = service.settings.api_key
        self.key = key.encode() if key else None

    def _authorised(self, headers: dict) -> bool:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        headers = dict(scope.get("headers") or [])
        try:
            if self.key is not None and scope["path"] != "/health" and not self._authorised(headers):
                e = ApiError(401, "missing or wrong API key: send X-API-Key or Authorization: Bearer <key>",
                             "api_key", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await _error_response(e)(scope, receive, send_)
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                return await self._too_large(scope, receive, send_)
            seen = 0

            async def receive_():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise _TooLarge()
                return message

            try:
                await self.app(scope, receive_, send_)
            except _TooLarge:
                if not status["started"]:
                    await self._too_large(scope, receive, send_)
        finally:
            route = scope.get("route")
            self.svc.metrics.inc("lightx2v_http_requests_total", method=scope.get("method", ""),
                                 route=getattr(route, "path", "unmatched"), status=str(status["code"]))
            self.svc.metrics.observe("lightx2v_http_request_seconds", time.perf_counter() - t0,
                                     route=getattr(route, "path", "unmatched"))

    async def _too_large(self, scope, receive, send):
        e = ApiError(413, f"body: larger than this server's upload limit ({self.svc.settings.max_upload_mb:g} MB)",
                     "body", "payload_too_large")
        await _error_response(e)(scope, receive, send)
