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

from lightx2v.engine.request import SamplingConfig
from lightx2v.errors import UserError

DTYPES = ("bf16", "fp16", "fp32")

# LightX2V / alternative names -> our canonical key
ALIASES = {
    "target_height": "height",
    "target_width": "width",
    "target_video_length": "num_frames",
    "sample_guide_scale": "guidance_scale",
    "num_inference_steps": "infer_steps",
    "sample_solver": "solver",
    "attn_type": "attn_mode",  # LightX2V's attention key of the image / HunyuanVideo families
}

# Keys of features that later versions implement: accepted while they ask for nothing (value is off/empty).
NOT_YET = {
    "mm_config": None, "parallel": None,
    "t5_quantized": False, "clip_quantized": False, "use_prompt_enhancer": False,
}
IGNORED = ("_comment",)


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

    def __post_init__(self):
        from lightx2v.ops.quant import resolve_scheme

        resolve_scheme(self.dit_quant_scheme)  # raises on unknown names
        for name in ("dit_original_ckpt", "high_noise_original_ckpt", "low_noise_original_ckpt"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise UserError(f"{name} {value!r} does not exist")


@dataclass(frozen=True)
class GeneratorConfig:
    sampling: SamplingConfig
    attention: AttentionConfig
    runtime: RuntimeConfig
    checkpoint: CheckpointConfig
    cache: Any = None  # lightx2v.hooks.caching.CacheConfig (feature_caching and its keys)
    lora: Any = None   # lightx2v.hooks.lora.LoRAConfig (lora_configs, lora_mode)
    offload: Any = None  # lightx2v.hooks.offload.OffloadConfig (cpu_offload, offload_granularity, lazy_load)
    family: Any = None  # the model family's own section (its ModelFamily.config_section), or None
    vfi: Any = None  # lightx2v.models.rife.VFIConfig (video_frame_interpolation), or None


def _cache_keys() -> frozenset:
    from lightx2v.hooks.caching import CACHE_KEYS

    return CACHE_KEYS


LORA_KEYS = ("lora_configs", "lora_mode")
VFI_KEY = "video_frame_interpolation"
OFFLOAD_KEYS = ("cpu_offload", "offload_granularity", "lazy_load", "num_prefetch")


_SECTIONS = {"sampling": SamplingConfig, "attention": AttentionConfig, "runtime": RuntimeConfig,
             "checkpoint": CheckpointConfig}
_KEY_TO_SECTION = {f.name: sec for sec, cls in _SECTIONS.items() for f in fields(cls)}
GENERIC_KEYS = frozenset(set(_KEY_TO_SECTION) | set(ALIASES) | set(NOT_YET) | set(IGNORED) | {"attn_mode"}
                         | set(_cache_keys()) | set(LORA_KEYS) | set(OFFLOAD_KEYS) | {VFI_KEY})


def all_keys(family=None) -> list[str]:
    """Every key a config may hold: the generic ones, plus ``family``'s (or every registered family's)."""
    from lightx2v.engine.family import families

    fams = [family] if family is not None else list(families().values())
    return sorted(GENERIC_KEYS.union(*(f.config_keys() for f in fams)))


def _fixed_keys(family=None) -> dict[str, Any]:
    from lightx2v.engine.family import families

    out: dict[str, Any] = {}
    for f in [family] if family is not None else families().values():
        out.update(f.fixed_keys)
    return out


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


def normalise_keys(raw: dict[str, Any], source: str, family=None) -> dict[str, Any]:
    """Map aliases to canonical names, expand attn_mode, reject unknown keys and unimplemented features."""
    known = all_keys(family)
    fixed = _fixed_keys(family)
    unknown = [k for k in raw if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=2)
            hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise UserError(f"unknown config keys in {source}: {', '.join(hints)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in NOT_YET:
            if value not in (NOT_YET[key], None, False, [], {}, "", "NoCaching", "none"):
                raise UserError(f"{key}={value!r} ({source}) is not supported by this version of lightx2v; "
                                f"remove it or set it to {NOT_YET[key]!r}")
            continue
        if key in fixed:
            if (list(value) if isinstance(value, (list, tuple)) else value) != fixed[key]:
                name = family.name if family is not None else "this model family"
                raise UserError(f"{key}={value!r} ({source}) is not supported; {name} uses {fixed[key]!r}")
            continue
        if key in IGNORED:
            continue
        key = ALIASES.get(key, key)
        if key == "attn_mode":
            for name in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type"):
                out[name] = value
            continue
        out[key] = value
    return out


def build_config(defaults: dict[str, Any], json_values: dict[str, Any], overrides: dict[str, Any],
                 family=None) -> GeneratorConfig:
    """defaults < config JSON < keyword overrides (None means "not given"). ``family`` (a
    :class:`lightx2v.engine.family.ModelFamily`): its own keys are accepted and built into ``config.family``
    (without it, the keys of every registered family are accepted and checked when a generator is built)."""
    merged: dict[str, Any] = {}
    given: dict[str, Any] = {}  # what the user set (config JSON or arguments), as opposed to defaults
    for layer, source in ((defaults, "defaults"), (json_values, "config_json"), (overrides, "arguments")):
        values = normalise_keys({k: v for k, v in layer.items() if v is not None}, source, family)
        merged.update(values)
        if source != "defaults":
            given.update(values)
    if ("height" in given or "width" in given) and "aspect_ratio" not in given:
        merged.pop("aspect_ratio", None)  # an explicit size replaces a default aspect ratio
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
    lora = LoRAConfig.from_lightx2v(lora_configs, mode=lora_mode,
                                    names=family.lora_names if family is not None else None)
    from lightx2v.hooks.offload import OffloadConfig

    vfi = None
    if merged.get(VFI_KEY) is not None:
        from lightx2v.models.rife import VFIConfig

        vfi = VFIConfig.from_dict(merged.pop(VFI_KEY))
    merged.pop(VFI_KEY, None)
    off = {k: merged.pop(k) for k in OFFLOAD_KEYS if k in merged}
    offload = OffloadConfig.from_lightx2v({k: v for k, v in off.items() if k != "num_prefetch"})
    if "num_prefetch" in off:
        from dataclasses import replace as _replace

        offload = _replace(offload, num_prefetch=off["num_prefetch"])
    per_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    own: dict[str, Any] = {}  # the family's keys
    for key, value in merged.items():
        if key in _KEY_TO_SECTION:
            per_section[_KEY_TO_SECTION[key]][key] = value
        else:
            own[key] = value
    section = None
    fams = [family] if family is not None else []
    if family is None:  # check each registered family's keys in its own section
        from lightx2v.engine.family import families

        fams = [f for f in families().values() if own.keys() & f.config_keys()]
    for fam in fams:
        if fam.config_section is not None:
            mine = {k: v for k, v in own.items() if k in {f.name for f in fields(fam.config_section)}}
            built = fam.config_section(**mine)
            section = built if family is not None or section is None else section
    cfg = GeneratorConfig(**{s: _SECTIONS[s](**per_section[s]) for s in _SECTIONS}, cache=cache, lora=lora,
                          offload=offload, family=section, vfi=vfi)
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
