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

MODEL_CLASSES = ("wan2.1", "wan2.1_distill", "wan2.2_moe", "wan2.2_moe_distill", "wan2.2")
_DISTILL = {"denoising_step_list": [1000, 750, 500, 250], "enable_cfg": False, "sample_shift": 5.0}
# Defaults a model class brings, per task (at the "defaults" tier: config JSON and arguments still win). Wan2.2's
# are the Wan2.2 release's: A14B T2V shift 12, guidance 4.0 (high-noise expert) / 3.0 (low), boundary 0.875; A14B
# I2V shift 5, guidance 3.5 / 3.5, boundary 0.9; TI2V-5B 1280x704, 121 frames at 24 fps, shift 5, guidance 5.
_MOE_T2V = {"guidance_scale": [4.0, 3.0], "sample_shift": 12.0, "infer_steps": 40, "boundary": 0.875}
_MOE_I2V = {"guidance_scale": [3.5, 3.5], "sample_shift": 5.0, "infer_steps": 40, "boundary": 0.9}
_TI2V_5B = {"height": 704, "width": 1280, "num_frames": 121, "fps": 24, "guidance_scale": 5.0, "sample_shift": 5.0,
            "infer_steps": 50}
MODEL_CLASS_DEFAULTS = {
    "wan2.1": {"t2v": {}, "i2v": {}, "flf2v": {}},
    "wan2.1_distill": {"t2v": _DISTILL, "i2v": _DISTILL, "flf2v": _DISTILL},
    "wan2.2_moe": {"t2v": _MOE_T2V, "i2v": _MOE_I2V},
    "wan2.2_moe_distill": {"t2v": {**_DISTILL, "boundary_step_index": 2},
                           "i2v": {**_DISTILL, "boundary_step_index": 2}},
    "wan2.2": {"t2v": _TI2V_5B, "i2v": _TI2V_5B},
}
TASKS = ("t2v", "i2v", "flf2v")
DTYPES = ("bf16", "fp16", "fp32")
SOLVERS = ("unipc", "euler")
RESIZE_MODES = ("crop", "adaptive", "stretch")

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
    "mm_config": None, "parallel": None,
    "t5_quantized": False, "clip_quantized": False, "use_prompt_enhancer": False,
}
# LightX2V keys whose value is fixed for Wan: accepted only with that value.
FIXED = {"text_len": 512, "patch_size": [1, 2, 2]}
IGNORED = ("_comment",)


@dataclass(frozen=True)
class SamplingConfig:
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
        if isinstance(self.guidance_scale, (list, tuple)):
            g = self.guidance_scale
            if len(g) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in g):
                raise UserError(f"guidance_scale={list(g)!r} must be a number >= 0 or a list of two "
                                "([high-noise expert, low-noise expert])")
            object.__setattr__(self, "guidance_scale", (float(g[0]), float(g[1])))
        else:
            _check_number(self, "guidance_scale", lo=0.0)
        _check_number(self, "sample_shift", lo=0.0, strict=True)
        if self.boundary is not None and (isinstance(self.boundary, bool) or not isinstance(self.boundary, (int, float))
                                          or not 0 < self.boundary < 1):
            raise UserError(f"boundary={self.boundary!r} must be a number in (0, 1) (a fraction of 1000 timesteps)")
        if self.boundary_step_index is not None:
            _check_int(self, "boundary_step_index", lo=0)
            if self.boundary_step_index > self.infer_steps:
                raise UserError(f"boundary_step_index={self.boundary_step_index} is larger than infer_steps="
                                f"{self.infer_steps}")
        if self.solver not in SOLVERS:
            raise UserError(f"sample_solver={self.solver!r} is not supported; allowed: {', '.join(SOLVERS)}")
        if not isinstance(self.enable_cfg, bool):
            raise UserError(f"enable_cfg={self.enable_cfg!r} must be true or false")
        _check_int(self, "fps", lo=1)
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
        if not isinstance(self.changing_resolution, bool):
            raise UserError(f"changing_resolution={self.changing_resolution!r} must be true or false")
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
    cfg_batch: bool | str = "auto"  # cond + uncond in one batch of 2 ("auto": on GPU, without feature caching)
    use_compile: bool = False  # torch.compile each transformer block (regional compile)
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    t5_cpu_offload: bool = False  # keep the text encoder on the CPU between uses
    clip_cpu_offload: bool = False
    vae_cpu_offload: bool = False
    unload_modules: bool = False  # load encoders/VAE per use and free them after
    use_tiling_vae: bool = False  # VAE encode/decode in overlapping spatial tiles (low memory for large videos)

    def __post_init__(self):
        for name in ("use_compile", "t5_cpu_offload", "clip_cpu_offload", "vae_cpu_offload", "unload_modules",
                     "use_tiling_vae"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.cfg_batch not in (True, False, "auto"):
            raise UserError(f"cfg_batch={self.cfg_batch!r} must be true, false or \"auto\"")
        if self.dtype not in DTYPES + ("auto",):
            raise UserError(f"dtype={self.dtype!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise UserError(f"device={self.device!r} is not supported; allowed: auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class CheckpointConfig:
    dit_original_ckpt: str | None = None  # one .safetensors file with the DiT weights (Wan names), e.g. a distilled DiT
    dit_quant_scheme: str | None = None  # fp8 | int8 (LightX2V aliases fp8-sgl, int8-vllm, ... accepted)
    high_noise_original_ckpt: str | None = None  # two-expert models: one safetensors file per expert
    low_noise_original_ckpt: str | None = None
    use_image_encoder: bool | None = None  # CLIP image tokens: Wan2.1 I2V yes, Wan2.2 no (checked against the DiT)
    vae_stride: tuple[int, int, int] | None = None  # checked against the VAE: [4, 8, 8] Wan2.1, [4, 16, 16] Wan2.2

    def __post_init__(self):
        from lightx2v.ops.quant import resolve_scheme

        resolve_scheme(self.dit_quant_scheme)  # raises on unknown names
        for name in ("dit_original_ckpt", "high_noise_original_ckpt", "low_noise_original_ckpt"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise UserError(f"{name} {value!r} does not exist")
        if self.use_image_encoder is not None and not isinstance(self.use_image_encoder, bool):
            raise UserError(f"use_image_encoder={self.use_image_encoder!r} must be true or false")
        if self.vae_stride is not None:
            if list(self.vae_stride) not in ([4, 8, 8], [4, 16, 16]):
                raise UserError(f"vae_stride={self.vae_stride!r} is not supported; allowed: [4, 8, 8] (Wan2.1 VAE), "
                                "[4, 16, 16] (Wan2.2 VAE)")
            object.__setattr__(self, "vae_stride", tuple(self.vae_stride))


@dataclass(frozen=True)
class GeneratorConfig:
    sampling: SamplingConfig
    attention: AttentionConfig
    runtime: RuntimeConfig
    checkpoint: CheckpointConfig
    cache: Any = None  # lightx2v.hooks.caching.CacheConfig (feature_caching and its keys)
    lora: Any = None   # lightx2v.hooks.lora.LoRAConfig (lora_configs, lora_mode)
    offload: Any = None  # lightx2v.hooks.offload.OffloadConfig (cpu_offload, offload_granularity, lazy_load)


def _cache_keys() -> frozenset:
    from lightx2v.hooks.caching import CACHE_KEYS

    return CACHE_KEYS


LORA_KEYS = ("lora_configs", "lora_mode")
OFFLOAD_KEYS = ("cpu_offload", "offload_granularity", "lazy_load", "num_prefetch")


_SECTIONS = {"sampling": SamplingConfig, "attention": AttentionConfig, "runtime": RuntimeConfig,
             "checkpoint": CheckpointConfig}
_KEY_TO_SECTION = {f.name: sec for sec, cls in _SECTIONS.items() for f in fields(cls)}
ALL_KEYS = sorted(set(_KEY_TO_SECTION) | set(ALIASES) | set(NOT_YET) | set(FIXED) | set(IGNORED) | {"attn_mode"}
                  | set(_cache_keys()) | set(LORA_KEYS) | set(OFFLOAD_KEYS))


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
                raise UserError(f"{key}={value!r} ({source}) is not supported; Wan uses {FIXED[key]!r}")
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
    given: dict[str, Any] = {}  # what the user set (config JSON or arguments), as opposed to defaults
    for layer, source in ((defaults, "defaults"), (json_values, "config_json"), (overrides, "arguments")):
        values = normalise_keys({k: v for k, v in layer.items() if v is not None}, source)
        merged.update(values)
        if source != "defaults":
            given.update(values)
    if merged.get("denoising_step_list") is not None:
        # A step-distilled schedule fixes the step count and the sampler.
        if "infer_steps" not in given and isinstance(merged["denoising_step_list"], (list, tuple)) \
                and merged["denoising_step_list"]:
            merged["infer_steps"] = len(merged["denoising_step_list"])
        if "solver" in given:
            raise UserError(f"sample_solver={given['solver']!r} cannot be combined with denoising_step_list "
                            "(step-distilled models use their own sampler)")
    from lightx2v.hooks.caching import CacheConfig
    from lightx2v.hooks.lora import LoRAConfig

    cache_keys = _cache_keys()
    cache = CacheConfig.from_lightx2v({k: merged.pop(k) for k in list(merged) if k in cache_keys})
    lora_configs, lora_mode = merged.pop("lora_configs", None) or [], merged.pop("lora_mode", "merge")
    lora = LoRAConfig.from_lightx2v(lora_configs, mode=lora_mode)
    from lightx2v.hooks.offload import OffloadConfig

    off = {k: merged.pop(k) for k in OFFLOAD_KEYS if k in merged}
    offload = OffloadConfig.from_lightx2v({k: v for k, v in off.items() if k != "num_prefetch"})
    if "num_prefetch" in off:
        from dataclasses import replace as _replace

        offload = _replace(offload, num_prefetch=off["num_prefetch"])
    per_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in merged.items():
        per_section[_KEY_TO_SECTION[key]][key] = value
    cfg = GeneratorConfig(**{s: _SECTIONS[s](**per_section[s]) for s in _SECTIONS}, cache=cache, lora=lora,
                          offload=offload)
    if offload.cpu_offload and offload.offload_granularity != "model" and cfg.runtime.use_compile:
        raise UserError("use_compile cannot be combined with block/phase cpu_offload (the offload hooks swap the "
                        "weights under the compiled graph); use one of them")
    if offload.lazy_load and (cfg.checkpoint.dit_quant_scheme or lora.loras):
        raise UserError("lazy_load reads block weights straight from disk: it cannot be combined with "
                        "dit_quant_scheme quantizing at load time or with LoRAs (merge them into a checkpoint "
                        "with `lightx2v convert` first)")
    if cfg.sampling.changing_resolution and cache.method != "NoCaching":
        raise UserError("feature_caching cannot be combined with changing_resolution (cached residuals have the "
                        "shape of one resolution)")
    return cfg
