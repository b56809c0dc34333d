"""One generation request: everything that may change from one call to the next without reloading a model.

Load-time settings (model, dtype, quantization, attention, offload, compile, caching) live in the generator's
config (:mod:`lightx2v.config`); the generator config also holds the *defaults* of the sampling settings below,
which each request may override. A request is validated when it is built, before any model runs, and travels
between the stages (and processes) as plain values (:meth:`GenerationRequest.to_wire`).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lightx2v.errors import UserError
from lightx2v.validate import check_bool, check_int, check_number

SOLVERS = ("unipc", "euler")
RESIZE_MODES = ("crop", "adaptive", "stretch")


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling settings of one request (a generator's config holds the defaults)."""

    infer_steps: int = 50
    height: int = 480
    width: int = 832
    num_frames: int = 81
    guidance_scale: float | tuple[float, float] = 5.0  # two-expert models: [high-noise expert, low-noise expert]
    sample_shift: float = 5.0
    solver: str = "unipc"
    enable_cfg: bool = True
    fps: int = 16
    resize_mode: str = "crop"  # I2V/FLF2V input image: crop | adaptive | stretch
    denoising_step_list: tuple[int, ...] | None = None  # step-distilled models: the timesteps to evaluate
    changing_resolution: bool = False
    resolution_rate: tuple[float, ...] | None = None  # latent scale per early stage (default [0.75])
    changing_resolution_steps: tuple[int, ...] | None = None  # 1-based steps after which to switch
    boundary: float | None = None  # two-expert models: the high-noise expert runs while t >= boundary * 1000
    boundary_step_index: int | None = None  # two-expert step-distilled models: steps [0, index) use the high expert
    # image models: a named size from the family's table ("16:9", ...); when set, it decides height and width
    # (giving height/width without it clears it)
    aspect_ratio: str | None = None

    def __post_init__(self):
        check_int("infer_steps", self.infer_steps, lo=1)
        check_int("height", self.height, lo=16)
        check_int("width", self.width, lo=16)
        check_int("num_frames", self.num_frames, lo=1)
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise UserError(f"{name}={getattr(self, name)} is not divisible by 16; use a multiple of 16 "
                                f"(e.g. {getattr(self, name) // 16 * 16 or 16})")
        if (self.num_frames - 1) % 4:
            lo = (self.num_frames - 1) // 4 * 4 + 1
            raise UserError(f"num_frames={self.num_frames} is not of the form 4k+1; try {lo} or {lo + 4}")
        if isinstance(self.guidance_scale, (list, tuple)):
            g = self.guidance_scale
            if len(g) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in g):
                raise UserError(f"guidance_scale={list(g)!r} must be a number >= 0 or a list of two "
                                "([high-noise expert, low-noise expert])")
            object.__setattr__(self, "guidance_scale", (float(g[0]), float(g[1])))
        elif self.enable_cfg is False:  # unused without CFG: LightX2V's distilled configs write -1 there
            check_number("guidance_scale", self.guidance_scale)
        else:
            check_number("guidance_scale", self.guidance_scale, lo=0.0)
        if self.sample_shift != "auto":  # "auto": the checkpoint's own shift (families whose scheduler config has one)
            check_number("sample_shift", self.sample_shift, lo=0.0, strict=True)
        if self.aspect_ratio is not None and not isinstance(self.aspect_ratio, str):
            raise UserError(f"aspect_ratio={self.aspect_ratio!r} must be a string such as \"16:9\"")
        if self.boundary is not None and (isinstance(self.boundary, bool) or not isinstance(self.boundary, (int, float))
                                          or not 0 < self.boundary < 1):
            raise UserError(f"boundary={self.boundary!r} must be a number in (0, 1) (a fraction of 1000 timesteps)")
        if self.boundary_step_index is not None:
            check_int("boundary_step_index", self.boundary_step_index, lo=0)
            if self.boundary_step_index > self.infer_steps:
                raise UserError(f"boundary_step_index={self.boundary_step_index} is larger than infer_steps="
                                f"{self.infer_steps}")
        if self.solver not in SOLVERS:
            raise UserError(f"sample_solver={self.solver!r} is not supported; allowed: {', '.join(SOLVERS)}")
        check_bool("enable_cfg", self.enable_cfg)
        check_int("fps", self.fps, lo=1)
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"resize_mode={self.resize_mode!r} is not supported; allowed: {', '.join(RESIZE_MODES)}")
        if self.denoising_step_list is not None:
            from lightx2v.schedulers.distill import check_step_list

            object.__setattr__(self, "denoising_step_list", check_step_list(self.denoising_step_list))
            if self.infer_steps != len(self.denoising_step_list):
                raise UserError(f"infer_steps={self.infer_steps} does not match denoising_step_list "
                                f"{list(self.denoising_step_list)}; leave infer_steps out or make them agree")
        self._check_changing_resolution()

    def _check_changing_resolution(self) -> None:
        check_bool("changing_resolution", self.changing_resolution)
        if not self.changing_resolution:
            if self.resolution_rate is not None or self.changing_resolution_steps is not None:
                raise UserError("resolution_rate / changing_resolution_steps need changing_resolution: true")
            return
        rates = self.resolution_rate if self.resolution_rate is not None else (0.75,)
        steps = self.changing_resolution_steps
        steps = steps if steps is not None else (self.infer_steps // 2,)
        if not isinstance(rates, (list, tuple)) or not rates or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in rates):
            raise UserError(f"resolution_rate={rates!r} must be a list of numbers in (0, 1]")
        if not isinstance(steps, (list, tuple)) or len(steps) != len(rates):
            raise UserError(f"changing_resolution_steps={steps!r} must list one step per resolution_rate entry "
                            f"({len(rates)})")
        if any(isinstance(k, bool) or not isinstance(k, int) for k in steps) or list(steps) != sorted(set(steps)) \
                or steps[0] < 1 or steps[-1] >= self.infer_steps:
            raise UserError(f"changing_resolution_steps={list(steps)} must be increasing integers in "
                            f"1..{self.infer_steps - 1} (1-based: switch after that step)")
        if self.denoising_step_list is not None:
            raise UserError("changing_resolution cannot be combined with denoising_step_list")
        object.__setattr__(self, "resolution_rate", tuple(float(r) for r in rates))
        object.__setattr__(self, "changing_resolution_steps", tuple(steps))

    @property
    def do_cfg(self) -> bool:
        return self.enable_cfg and max(self.guidance_scales) > 1.0

    @property
    def guidance_scales(self) -> tuple[float, float]:
        """(high-noise expert, low-noise expert); one model uses the first."""
        g = self.guidance_scale
        return g if isinstance(g, tuple) else (g, g)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown sampling settings {unknown}; allowed: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


SAMPLING_KEYS = frozenset(f.name for f in fields(SamplingConfig))
OUTPUT_SUFFIXES = {".mp4": "mp4", ".png": "png"}


@dataclass(frozen=True)
class GenerationRequest:
    """What one ``generate`` call asks for.

    ``images``: the conditioning images (RGB PIL images, already read and checked): ``[first]`` (I2V), ``[first,
    last]`` (FLF2V); reference images for the families that take them. ``loras``: LoRAs for this request
    (LightX2V's ``lora_configs`` entries; needs ``lora_mode: "dynamic"``), None to keep what the generator has.
    """

    task: str
    sampling: SamplingConfig
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 42
    images: tuple = ()
    loras: tuple | None = None
    save_result_path: str | None = None
    return_result_tensor: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise UserError(f"seed={self.seed!r} must be an integer in [0, 2**63)")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise UserError("prompt and negative_prompt must be strings")
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if not isinstance(self.request_id, str) or not self.request_id:
            raise UserError(f"request_id={self.request_id!r} must be a non-empty string")
        object.__setattr__(self, "images", tuple(self.images))
        if self.save_result_path is not None:
            object.__setattr__(self, "save_result_path", str(self.save_result_path))
        if self.save_result_path is None and not self.return_result_tensor:
            raise UserError("nothing to do: pass save_result_path and/or return_result_tensor=True")

    @property
    def output_format(self) -> str | None:
        """"mp4" or "png" from ``save_result_path``'s suffix (a single frame is written as PNG); None: not saved."""
        if self.save_result_path is None:
            return None
        return OUTPUT_SUFFIXES.get(Path(self.save_result_path).suffix.lower())

    def with_sampling(self, **changes) -> "GenerationRequest":
        return replace(self, sampling=replace(self.sampling, **changes))

    def to_wire(self) -> dict[str, Any]:
        """The request as plain JSON values, for the stage messages. The images are not included: what the later
        stages need of them travels in the encoder's message."""
        return {"request_id": self.request_id, "task": self.task, "prompt": self.prompt,
                "negative_prompt": self.negative_prompt, "seed": self.seed, "sampling": self.sampling.to_dict(),
                "num_images": len(self.images), "save_result_path": self.save_result_path,
                "return_result_tensor": self.return_result_tensor,
                "loras": None if self.loras is None else [_lora_entry(e) for e in self.loras]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "GenerationRequest":
        """The request of a stage message (without images)."""
        d = dict(d)
        d.pop("num_images", None)
        sampling = SamplingConfig.from_dict(d.pop("sampling"))
        loras = d.pop("loras", None)
        return cls(sampling=sampling, loras=None if loras is None else tuple(loras), **d)


def _lora_entry(e) -> dict[str, Any]:
    if isinstance(e, dict):
        return dict(e)
    return {"path": e.path, "strength": e.strength, **({"name": e.name} if e.name else {})}
