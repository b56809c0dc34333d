"""Request schemas of the generation service, its settings and its error shape.

Two request vocabularies reach the same tasks:

* LightX2V's (``POST /v1/tasks/video/``, ``/v1/tasks/image/``): :class:`TaskRequest`, the fields of LightX2V's
  ``TaskRequest`` / ``VideoTaskRequest`` (prompt, negative_prompt, image_path, last_frame_path, seed, infer_steps,
  target_video_length, target_shape, lora_name, lora_strength, save_result_path, task_id, ...), plus lightx2v's own
  per-request sampling keys (height, width, num_frames, guidance_scale, sample_shift, sample_solver, enable_cfg,
  resize_mode, aspect_ratio, ...). LightX2V fields of features this server lacks (prompt enhancer, audio, masks,
  presigned uploads, fragments, reuse) are accepted only at their "off" value.
* OpenAI's (``POST /v1/videos``, ``POST /v1/images/generations``): :class:`VideoCreate`, :class:`ImageGeneration`.

Every schema rejects unknown fields (a request cannot carry load-time settings such as quantization or offload;
those are the server's, fixed when it loaded the model). Errors are one JSON shape for both kinds of client::

    {"detail": "infer_steps: Input should be greater than or equal to 1",            # LightX2V / FastAPI clients
     "error": {"message": "...", "type": "invalid_request_error", "param": "infer_steps", "code": "..."}}  # OpenAI's
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

MAX_STEPS = 1000
MAX_FRAMES = 1025
MAX_SIDE = 4096
MAX_PROMPT = 20000
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ApiError(Exception):
    """An HTTP error with a message naming the field (``param``) it is about."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"detail": self.message,
                "error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeSettings:
    """How the server was started (``lightx2v serve`` flags)."""

    model_cls: str | None = None  # None: the default model class (its built-in tiny model without model_path)
    task: str = "t2v"
    model_path: str | None = None  # None: the built-in tiny model (no download)
    config_json: str | None = None
    overrides: dict = field(default_factory=dict)  # load-time keyword arguments of create_generator
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue_size: int = 100  # pending + processing tasks; more -> 503 with Retry-After
    data_dir: str = "lightx2v-data"
    input_dir: str | None = None  # the allow-listed folder for image_path given as a path (default data_dir/inputs)
    lora_dir: str | None = None  # the folder of lora_name files (LoRAs need lora_mode "dynamic" in the config)
    api_key: str | None = None  # required (X-API-Key or Authorization: Bearer) on every route but /health
    max_batch_size: int = 1  # queued requests of equal settings that may share one DiT batch
    max_upload_mb: float = 20.0  # request bodies larger than this -> 413
    rerun_interrupted: bool = False  # after a crash: run the interrupted task again instead of failing it
    cancel_wait_s: float = 10.0  # how long DELETE waits for a running task to stop

    def __post_init__(self):
        from lightx2v.errors import UserError

        if self.max_queue_size < 1:
            raise UserError(f"max_queue_size={self.max_queue_size} must be >= 1")
        if self.max_batch_size < 1:
            raise UserError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.max_upload_mb <= 0:
            raise UserError(f"max_upload_mb={self.max_upload_mb} must be > 0")
        if not 0 <= self.port < 65536:
            raise UserError(f"port={self.port} must be in 0..65535")


def _no_bool(v):
    if isinstance(v, bool):
        raise ValueError("must be a number, not a boolean")
    return v


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Side = Annotated[int, BeforeValidator(_no_bool), Field(ge=16, le=MAX_SIDE)]

_STRICT = ConfigDict(extra="forbid", str_max_length=64 * 2**20)


class SamplingFields(BaseModel):
    """lightx2v's per-request sampling keys (each None: the server's default)."""

    model_config = _STRICT

    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    infer_steps: Int | None = Field(None, ge=1, le=MAX_STEPS)
    height: Side | None = None
    width: Side | None = None
    num_frames: Int | None = Field(None, ge=1, le=MAX_FRAMES)
    guidance_scale: Float | list[Float] | None = None
    sample_shift: Float | None = Field(None, gt=0, le=1000)
    sample_solver: Literal["unipc", "euler"] | None = None
    enable_cfg: bool | None = None
    resize_mode: Literal["crop", "adaptive", "stretch"] | None = None
    boundary: Float | None = Field(None, gt=0, lt=1)
    aspect_ratio: str | None = Field(None, max_length=16)

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v):
        values = v if isinstance(v, list) else [v] if v is not None else []
        if isinstance(v, list) and len(v) != 2:
            raise ValueError("must be a number or a list of two ([high-noise expert, low-noise expert])")
        if any(not 0 <= g <= 100 for g in values):
            raise ValueError("must be in [0, 100]")
        return v

    def sampling(self) -> dict[str, Any]:
        """The sampling overrides this request gives (engine names)."""
        keys = ("infer_steps", "height", "width", "num_frames", "guidance_scale", "sample_shift", "sample_solver",
                "enable_cfg", "resize_mode", "boundary", "aspect_ratio")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


# LightX2V fields of features this server does not have: accepted at their "off" value only
OFF_VALUES = {"use_prompt_enhancer": False, "num_fragments": 1, "audio_path": "", "video_path": "",
              "image_mask_path": "", "presigned_url": "", "reuse": False, "talk_objects": None}


class TaskRequest(SamplingFields):
    """LightX2V's task request (``/v1/tasks/video/``, ``/v1/tasks/image/``)."""

    task_id: str | None = Field(None, description="client-chosen task id (letters, digits, _ and -)")
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    image_path: str = Field("", description="base64, a data URL, or a file name in the server's input folder")
    last_frame_path: str = ""
    save_result_path: str = Field("", max_length=255, description="the result's file name (download name)")
    target_shape: list[Side] = Field(default_factory=list, description="[height, width]")
    target_video_length: Int | None = Field(None, ge=1, le=MAX_FRAMES)
    target_fps: Int | None = Field(None, ge=1, le=240)
    lora_name: str | None = Field(None, max_length=255)
    lora_strength: Float = Field(1.0, ge=-10, le=10)
    use_prompt_enhancer: bool = False
    num_fragments: Int = 1
    audio_path: str = ""
    video_path: str = ""
    image_mask_path: str = ""
    presigned_url: str = ""
    reuse: bool = False
    talk_objects: list | None = None

    @field_validator("task_id")
    @classmethod
    def _task_id(cls, v):
        if v is not None and not TASK_ID.match(v):
            raise ValueError("must be 1-64 letters, digits, '_' or '-' (starting with a letter or digit)")
        return v

    @field_validator("target_shape")
    @classmethod
    def _shape(cls, v):
        if len(v) not in (0, 2):
            raise ValueError("must be [height, width]")
        return v

    @model_validator(mode="after")
    def _checks(self):
        for name, off in OFF_VALUES.items():
            if getattr(self, name) != off:
                raise ValueError(f"{name}: not available on this server (only {off!r})")
        if self.target_shape and (self.height is not None or self.width is not None):
            raise ValueError("target_shape: give target_shape or height/width, not both")
        if self.target_video_length is not None and self.num_frames is not None \
                and self.target_video_length != self.num_frames:
            raise ValueError("target_video_length: differs from num_frames (they are the same setting)")
        return self

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.target_shape:
            out["height"], out["width"] = self.target_shape
        if self.target_video_length is not None:
            out["num_frames"] = self.target_video_length
        return out


class VideoCreate(SamplingFields):
    """OpenAI's ``POST /v1/videos`` (multipart or JSON), with lightx2v's sampling keys as extras."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
    model: str | None = Field(None, max_length=128)
    size: str | None = Field(None, description='"WxH", e.g. "832x480"')
    seconds: Float | None = Field(None, gt=0, le=600)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    input_reference: Any = None  # an upload, or {"image_url": "data:image/...;base64,..."}

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and not SIZE.match(v):
            raise ValueError('must be "WIDTHxHEIGHT", e.g. "832x480"')
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.size is not None and (self.height is not None or self.width is not None):
            raise ValueError("size: give size or height/width, not both")
        if self.seconds is not None and self.num_frames is not None:
            raise ValueError("seconds: give seconds or num_frames, not both")
        return self

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.size is not None:
            w, h = (int(g) for g in SIZE.match(self.size).groups())
            out["width"], out["height"] = w, h
        return out


class ImageGeneration(BaseModel):
    """OpenAI's ``POST /v1/images/generations`` (one image per request), with lightx2v's sampling keys."""

    model_config = _STRICT

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
    model: str | None = Field(None, max_length=128)
    n: Int = Field(1, ge=1, le=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    infer_steps: Int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: Float | None = Field(None, ge=0, le=100)
    aspect_ratio: str | None = Field(None, max_length=16)

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and v != "auto" and not SIZE.match(v):
            raise ValueError('must be "WIDTHxHEIGHT", e.g. "1024x1024"')
        return v

    def sampling(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("infer_steps", "guidance_scale", "aspect_ratio")
               if getattr(self, k) is not None}
        if self.size not in (None, "auto"):
            w, h = (int(g) for g in SIZE.match(self.size).groups())
            out["width"], out["height"] = w, h
        return out


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors -> one line naming each field, and the first field."""
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header", "form")]
        msg = e.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        name = ".".join(loc)
        if not name and ":" in msg:  # a model-level check names its field at the start of its message
            name = msg.split(":", 1)[0]
            msg = msg.split(":", 1)[1].strip()
        if e.get("type") == "extra_forbidden":
            msg = "unknown field" + _load_time_hint(loc[0] if loc else "")
        first = first or name or None
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(parts), first


def _load_time_hint(name: str) -> str:
    try:
        from lightx2v.config import all_keys

        if name in set(all_keys()):
            return " (a load-time setting of the server: it cannot change per request)"
    except Exception:  # noqa: BLE001 - only a hint
        pass
    return ""


def engine_param(message: str, known: set[str]) -> str | None:
    """The field an engine UserError names (its messages start with ``name=value`` or ``name ...``)."""
    m = re.match(r"^'?([a-z_]+)'?[=\s:]", message)
    if m and m.group(1) in known:
        return m.group(1)
    for name in sorted(known, key=len, reverse=True):
        if re.search(rf"\b{name}\b", message):
            return name
    return None
