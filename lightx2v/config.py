"""Typed, frozen configuration, assembled from defaults < config JSON < keyword overrides.

LightX2V's JSON key names are accepted (``target_height``, ``target_video_length``, ``sample_guide_scale``,
``self_attn_1_type`` ...) beside the short names of the Python API (``height``, ``num_frames``, ``guidance_scale``,
``attn_mode``). Unknown keys are rejected with near-match suggestions; keys of features that this version does
not implement are accepted only with their "off" value, so nothing a user asked for is silently ignored.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lightx2v.errors import UserError

MODEL_CLASSES = ("wan2.1",)
TASKS = ("t2v", "i2v", "flf2v")
DTYPES = ("bf16", "fp16", "fp32")
SOLVERS = ("unipc", "euler")

# LightX2V / alternative names -> our canonical key
ALIASES = {
    "target_height": "height",
    "target_width": "width",
    "target_video_length": "num_frames",
    "sample_guide_scale": "guidance_scale",
    "num_inference_steps": "infer_steps",
    "sample_solver": "solver",
}

# Keys of features that later versions implement: accepted while they ask for nothing (value is off/empty).
NOT_YET = {
    "cpu_offload": False, "offload_granularity": None, "lazy_load": False, "t5_cpu_offload": False,
    "clip_cpu_offload": False, "vae_cpu_offload": False, "unload_modules": False, "use_tiling_vae": False,
    "dit_quant_scheme": None, "mm_config": None, "lora_configs": None, "feature_caching": "NoCaching",
    "use_compile": False, "parallel": None, "changing_resolution": False, "denoising_step_list": None,
    "t5_quantized": False, "clip_quantized": False, "use_prompt_enhancer": False,
}
# LightX2V keys whose value is fixed for Wan2.1: accepted only with that value.
FIXED = {"text_len": 512, "vae_stride": [4, 8, 8], "patch_size": [1, 2, 2]}
IGNORED = ("_comment",)


@dataclass(frozen=True)
class SamplingConfig:
    infer_steps: int = 50
    height: int = 480
    width: int = 832
    num_frames: int = 81
    guidance_scale: float = 5.0
    sample_shift: float = 5.0
    solver: str = "unipc"
    enable_cfg: bool = True
    fps: int = 16

    def __post_init__(self):
        _check_int(self, "infer_steps", lo=1)
        _check_int(self, "height", lo=16)
        _check_int(self, "width", lo=16)
        _check_int(self, "num_frames", lo=1)
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise UserError(f"{name}={getattr(self, name)} is not divisible by 16; use a multiple of 16 "
                                f"(e.g. {getattr(self, name) // 16 * 16 or 16})")
        if (self.num_frames - 1) % 4:
            lo = (self.num_frames - 1) // 4 * 4 + 1
            raise UserError(f"num_frames={self.num_frames} is not of the form 4k+1; try {lo} or {lo + 4}")
        _check_number(self, "guidance_scale", lo=0.0)
        _check_number(self, "sample_shift", lo=0.0, strict=True)
        if self.solver not in SOLVERS:
            raise UserError(f"sample_solver={self.solver!r} is not supported; allowed: {', '.join(SOLVERS)}")
        if not isinstance(self.enable_cfg, bool):
            raise UserError(f"enable_cfg={self.enable_cfg!r} must be true or false")
        _check_int(self, "fps", lo=1)

    @property
    def do_cfg(self) -> bool:
        return self.enable_cfg and self.guidance_scale > 1.0


@dataclass(frozen=True)
class AttentionConfig:
    self_attn_1_type: str = "torch_sdpa"
    cross_attn_1_type: str = "torch_sdpa"
    cross_attn_2_type: str = "torch_sdpa"

    def __post_init__(self):
        from lightx2v.ops.attention import available_backends

        for f in fields(self):
            value = getattr(self, f.name)
            if value not in available_backends():
                raise UserError(f"{f.name}={value!r} is not an available attention backend; "
                                f"available: {', '.join(available_backends())}")
        if len({self.self_attn_1_type, self.cross_attn_1_type, self.cross_attn_2_type}) > 1:
            raise UserError("different attention backends for self- and cross-attention are not supported yet; "
                            "set attn_mode to one backend")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"   # "auto" (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32

    def __post_init__(self):
        if self.dtype not in DTYPES + ("auto",):
            raise UserError(f"dtype={self.dtype!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise UserError(f"device={self.device!r} is not supported; allowed: auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class GeneratorConfig:
    sampling: SamplingConfig
    attention: AttentionConfig
    runtime: RuntimeConfig


_SECTIONS = {"sampling": SamplingConfig, "attention": AttentionConfig, "runtime": RuntimeConfig}
_KEY_TO_SECTION = {f.name: sec for sec, cls in _SECTIONS.items() for f in fields(cls)}
ALL_KEYS = sorted(set(_KEY_TO_SECTION) | set(ALIASES) | set(NOT_YET) | set(FIXED) | set(IGNORED) | {"attn_mode"})


def _check_int(obj, name: str, lo: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UserError(f"{name}={value!r} must be an integer >= {lo}")


def _check_number(obj, name: str, lo: float, strict: bool = False) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > lo if strict else value >= lo)
    if not ok:
        raise UserError(f"{name}={value!r} must be a number {'>' if strict else '>='} {lo}")


def load_config_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config_json {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config_json {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config_json {str(p)!r} must hold a JSON object, not {type(data).__name__}")
    return data


def normalise_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Map aliases to canonical names, expand attn_mode, reject unknown keys and unimplemented features."""
    unknown = [k for k in raw if k not in ALL_KEYS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, ALL_KEYS, n=2)
            hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise UserError(f"unknown config keys in {source}: {', '.join(hints)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in NOT_YET:
            if value not in (NOT_YET[key], None, False, [], {}, "", "NoCaching", "none"):
                raise UserError(f"{key}={value!r} ({source}) is not supported by this version of lightx2v; "
                                f"remove it or set it to {NOT_YET[key]!r}")
            continue
        if key in FIXED:
            if (list(value) if isinstance(value, (list, tuple)) else value) != FIXED[key]:
                raise UserError(f"{key}={value!r} ({source}) is not supported; Wan2.1 uses {FIXED[key]!r}")
            continue
        if key in IGNORED:
            continue
        if key == "attn_mode":
            for name in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type"):
                out[name] = value
            continue
        out[ALIASES.get(key, key)] = value
    return out


def build_config(defaults: dict[str, Any], json_values: dict[str, Any], overrides: dict[str, Any]) -> GeneratorConfig:
    """defaults < config JSON < keyword overrides (None means "not given")."""
    merged: dict[str, Any] = {}
    for layer, source in ((defaults, "defaults"), (json_values, "config_json"), (overrides, "arguments")):
        merged.update(normalise_keys({k: v for k, v in layer.items() if v is not None}, source))
    per_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in merged.items():
        per_section[_KEY_TO_SECTION[key]][key] = value
    return GeneratorConfig(**{s: _SECTIONS[s](**per_section[s]) for s in _SECTIONS})
