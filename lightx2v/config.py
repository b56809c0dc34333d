"""Typed, frozen configuration, assembled from defaults < config JSON < keyword overrides.

LightX2V's JSON key names are accepted (``target_height``, ``target_video_length``, ``sample_guide_scale``,
``self_attn_1_type`` ...) beside the short names of the Python API (``height``, ``num_frames``, ``guidance_scale``,
``attn_mode``). Every other key of a LightX2V config gets one of the answers of :mod:`lightx2v.compat`: a feature we
do not implement is refused by name ("LightX2V key `X` (feature: Y) is not implemented in lightx2v"), a kernel
selector of the same math is accepted (one log line says what runs), a key LightX2V's Wan runners never read is
ignored as LightX2V ignores it. A key nobody knows is rejected, with a suggestion only when a known key is a close
spelling of it (``infer_step`` -> ``infer_steps``), never a key of another meaning.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lightx2v import compat
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

# Keys of features that other work adds: accepted while they ask for nothing (value off/empty), else refused with
# compat's "not implemented" message naming the feature.
NOT_YET = {"parallel": "multi-GPU parallel inference: cfg, sequence or tensor parallelism"}
IGNORED = ("_comment",)


def _parallel_is_off(value) -> bool:
    """LightX2V's ``parallel``: absent, null, {} or every ``*_size`` at most 1 asks for no parallelism."""
    if value in (None, False, {}, ""):
        return True
    return isinstance(value, dict) and all(not k.endswith("_size") or (isinstance(v, int) and v <= 1)
                                           for k, v in value.items())


@dataclass(frozen=True)
class AttentionConfig:
    """LightX2V's three attention keys: self-attention, cross-attention to the text, and to the CLIP image tokens
    (``attn_mode`` sets all three). Names are ours or LightX2V's (lightx2v.ops.attention.names)."""

    self_attn_1_type: str = "torch_sdpa"
    cross_attn_1_type: str = "torch_sdpa"
    cross_attn_2_type: str = "torch_sdpa"

    def __post_init__(self):
        from lightx2v.ops.attention import describe, validate_attention_name

        for f in fields(self):
            name = getattr(self, f.name)
            known = describe(name) if isinstance(name, str) else None
            if known is not None and known.kind != "exact" and known.ours is None:
                kind = "sequence parallelism" if known.kind == "parallel" else f"{known.kind} attention"
                raise compat.not_implemented(f.name, f"{known.what}, {kind}", value=name)
            entry = validate_attention_name(name)
            if f.name != "self_attn_1_type" and entry.kind == "sparse":
                raise UserError(f"{f.name}={getattr(self, f.name)!r}: a sparse pattern over the video tokens is for "
                                "self-attention only; use an exact backend for cross-attention")


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
    """Where the DiT weights come from, and their format (LightX2V's keys, LightX2V's meaning).

    ``dit_original_ckpt`` (``high/low_noise_original_ckpt`` for two experts): float weights in a ``.safetensors``
    file or a folder of them, instead of the model folder's DiT. ``dit_quantized: true`` says the weights are
    pre-quantized (``X.weight`` int8 / float8 + ``X.weight_scale``, LightX2V's layout) in ``dit_quant_scheme``'s
    format, read from ``dit_quantized_ckpt`` (``high/low_noise_quantized_ckpt``; a file or a folder), or from the
    model folder when none is given; float weights found there are quantized while loading. ``dit_quant_scheme``
    without ``dit_quantized`` quantizes float weights while loading (a pre-quantized checkpoint is recognised
    without either key)."""

    dit_original_ckpt: str | None = None
    dit_quant_scheme: str | None = None  # fp8 | int8 (LightX2V aliases fp8-sgl, int8-vllm, ... accepted)
    high_noise_original_ckpt: str | None = None  # two-expert models: one weights file (or folder) per expert
    low_noise_original_ckpt: str | None = None
    dit_quantized: bool = False
    dit_quantized_ckpt: str | None = None
    high_noise_quantized_ckpt: str | None = None
    low_noise_quantized_ckpt: str | None = None

    def __post_init__(self):
        from lightx2v.ops.quant import resolve_scheme

        if not isinstance(self.dit_quantized, bool):
            raise UserError(f"dit_quantized={self.dit_quantized!r} must be true or false")
        feature = compat.FEATURE_VALUES["dit_quant_scheme"].get(self.dit_quant_scheme)
        if feature is not None:
            raise compat.not_implemented("dit_quant_scheme", feature, value=self.dit_quant_scheme)
        resolve_scheme(self.dit_quant_scheme)  # raises on unknown names
        if self.dit_quantized and resolve_scheme(self.dit_quant_scheme) is None:
            raise UserError("dit_quantized: true needs dit_quant_scheme, the format of the quantized weights (fp8 or "
                            "int8; LightX2V's names such as fp8-sgl or int8-vllm are accepted)")
        for name in ("dit_original_ckpt", "high_noise_original_ckpt", "low_noise_original_ckpt",
                     "dit_quantized_ckpt", "high_noise_quantized_ckpt", "low_noise_quantized_ckpt"):
            value = getattr(self, name)
            if value == "":
                object.__setattr__(self, name, None)  # LightX2V configs write "" for none
                continue
            if value is not None and (not isinstance(value, str) or not Path(value).exists()):
                raise UserError(f"{name} {value!r} does not exist (a .safetensors file or a folder of them)")

    def weights_path(self, expert: str | None) -> str | None:
        """The DiT weights to read instead of the model folder's: ``expert`` None (one DiT), "high" or "low"."""
        prefix = "dit" if expert is None else f"{expert}_noise"
        quantized = getattr(self, f"{prefix}_quantized_ckpt")
        if self.dit_quantized and quantized:
            return quantized
        return getattr(self, f"{prefix}_original_ckpt")


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
    # what the config chose that changes nothing here, each said once in the log when the generator is built:
    # kernel selectors (LightX2V's implementation choices of the same math) and keys LightX2V ignores too
    notes: tuple[str, ...] = ()


def _cache_keys() -> frozenset:
    from lightx2v.hooks.caching import CACHE_KEYS

    return CACHE_KEYS


LORA_KEYS = ("lora_configs", "lora_mode", "lora_dynamic_apply")  # lora_dynamic_apply: LightX2V's name for lora_mode
VFI_KEY = "video_frame_interpolation"
OFFLOAD_KEYS = ("cpu_offload", "offload_granularity", "lazy_load", "num_prefetch")


_SECTIONS = {"sampling": SamplingConfig, "attention": AttentionConfig, "runtime": RuntimeConfig,
             "checkpoint": CheckpointConfig}
_KEY_TO_SECTION = {f.name: sec for sec, cls in _SECTIONS.items() for f in fields(cls)}
GENERIC_KEYS = frozenset(set(_KEY_TO_SECTION) | set(ALIASES) | set(NOT_YET) | set(IGNORED) | {"attn_mode"}
                         | set(_cache_keys()) | set(LORA_KEYS) | set(OFFLOAD_KEYS) | {VFI_KEY})
# LightX2V keys answered by lightx2v.compat (refused by feature name, kernel choices, keys LightX2V ignores)
COMPAT_KEYS = frozenset(set(compat.FEATURES) | set(compat.ON_FEATURES) | set(compat.INERT)
                        | set(compat.KERNEL_SELECTORS))


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
    if p.is_dir():
        found = sorted(x.name for x in p.glob("*.json"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise UserError(f"config_json {str(p)!r} is a folder, not a JSON file{hint}; name one .json file")
    if not p.is_file():
        raise UserError(f"config_json {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config_json {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config_json {str(p)!r} must hold a JSON object, not {type(data).__name__}")
    return data


def _tokens_close(a: str, b: str) -> bool:
    """``a`` is a misspelling of ``b``: the same words (split at "_") with small typos, or one word more or less
    at the end (``infer_step`` / ``infer_steps``, ``targe_height`` / ``target_height``), never another word
    (``target_fps`` is not ``target_width``, ``disagg_mode`` is not ``lora_mode``)."""
    ta, tb = a.lower().split("_"), b.lower().split("_")
    if len(ta) != len(tb):
        return a.replace("_", "").lower() == b.replace("_", "").lower()
    if len(ta) > 1 and not any(x == y for x, y in zip(ta, tb)):
        return False  # no word in common: another key (lora_mod is not unload_modules)
    return all(x == y or (min(len(x), len(y)) >= 3 and difflib.SequenceMatcher(None, x, y).ratio() >= 0.6)
               for x, y in zip(ta, tb))


def suggest(key: str, known) -> list[str]:
    """Known keys that are close spellings of ``key`` (same words), best first."""
    close = difflib.get_close_matches(key, list(known), n=6, cutoff=0.6)
    return [k for k in close if _tokens_close(key, k)][:2]


def normalise_keys(raw: dict[str, Any], source: str, family=None, notes: list[str] | None = None
                   ) -> dict[str, Any]:
    """Map aliases to canonical names, expand attn_mode, answer LightX2V's other keys (lightx2v.compat), reject
    unknown keys. ``notes`` collects one line per key that is accepted without effect (logged by the caller)."""
    known = all_keys(family)
    fixed = _fixed_keys(family)
    unknown = [k for k in raw if k not in known and k not in COMPAT_KEYS]
    if unknown:
        hints = []
        for k in unknown:
            close = suggest(k, known) if isinstance(k, str) else []
            hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise UserError(f"unknown config keys in {source}: {', '.join(hints)}")
    notes = notes if notes is not None else []
    implemented = set(known) - set(NOT_YET)  # a key a family implements is its, whatever compat says of it
    out: dict[str, Any] = {}
    kernels: dict[str, Any] = {}
    for key, value in raw.items():
        if key in IGNORED:
            continue
        if key in implemented:
            pass
        elif key in compat.INERT:
            notes.append(f"{key} ignored: {compat.INERT[key]}")
            continue
        elif key in compat.KERNEL_SELECTORS:
            compat.check_kernel_selector(key, value)
            kernels[key] = value
            continue
        elif key in compat.ON_FEATURES or key in compat.FEATURES:
            if value is None or value in compat.OFF_VALUES.get(key, ()):
                continue
            raise compat.not_implemented(key, compat.ON_FEATURES.get(key) or compat.FEATURES[key])
        if key in NOT_YET:
            if key == "parallel" and _parallel_is_off(value):
                continue
            raise compat.not_implemented(key, NOT_YET[key])
        if key in fixed:
            if (list(value) if isinstance(value, (list, tuple)) else value) != fixed[key]:
                name = family.name if family is not None else "this model family"
                raise UserError(f"{key}={value!r} ({source}) is not supported; {name} uses {fixed[key]!r}")
            continue
        if key == "lora_dynamic_apply":
            if not isinstance(value, bool):
                raise UserError(f"lora_dynamic_apply={value!r} must be true or false")
            out["lora_mode"] = "dynamic" if value else "merge"
            continue
        key = ALIASES.get(key, key)
        if key == "attn_mode":
            for name in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type"):
                out[name] = value
            continue
        out[key] = value
    if kernels:
        notes.append(compat.kernel_note(kernels))
    return out


def drop_ignored(values: dict[str, Any], ignored: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """Remove the keys the model class does not read (``ignored``: key -> why), noting each once."""
    out = {}
    for key, value in values.items():
        if key in ignored and value is not None:
            notes.append(f"{key} ignored: {ignored[key]}")
            continue
        out[key] = value
    return out


def build_config(defaults: dict[str, Any], json_values: dict[str, Any], overrides: dict[str, Any],
                 family=None, model_cls: str | None = None) -> GeneratorConfig:
    """defaults < config JSON < keyword overrides (None means "not given"). ``family`` (a
    :class:`lightx2v.engine.family.ModelFamily`): its own keys are accepted and built into ``config.family``
    (without it, the keys of every registered family are accepted and checked when a generator is built).
    ``model_cls``: keys that LightX2V's runner of that class does not read (the family's ``ignored_keys``, e.g. a
    step list for a model class that samples without one) are dropped, each with a note."""
    merged: dict[str, Any] = {}
    given: dict[str, Any] = {}  # what the user set (config JSON or arguments), as opposed to defaults
    notes: list[str] = []
    ignored = dict(family.ignored_keys.get(model_cls, {})) if family is not None and model_cls else {}
    for layer, source in ((defaults, "defaults"), (json_values, "config_json"), (overrides, "arguments")):
        values = normalise_keys({k: v for k, v in layer.items() if v is not None}, source, family, notes)
        if source != "defaults":
            values = drop_ignored(values, ignored, notes)
        merged.update(values)
        if source != "defaults":
            given.update(values)
    if ("height" in given or "width" in given) and "aspect_ratio" not in given:
        merged.pop("aspect_ratio", None)  # an explicit size replaces a default aspect ratio
    if merged.get("denoising_step_list") is not None:
        # A step-distilled schedule fixes the step count (LightX2V's step-distill schedulers take len(list) and read
        # no infer_steps) and the sampler.
        steps = merged["denoising_step_list"]
        if isinstance(steps, (list, tuple)) and steps:
            if "infer_steps" in given and given["infer_steps"] != len(steps):
                notes.append(f"infer_steps={given['infer_steps']} ignored: denoising_step_list has {len(steps)} steps "
                             "(as in LightX2V's step-distill schedulers)")
            merged["infer_steps"] = len(steps)
        if "solver" in given:
            raise UserError(f"sample_solver={given['solver']!r} cannot be combined with denoising_step_list "
                            "(step-distilled models use their own sampler)")
    from lightx2v.hooks.caching import CacheConfig
    from lightx2v.hooks.lora import LoRAConfig

    cache_keys = _cache_keys()
    method = merged.get("feature_caching")
    if method in compat.FEATURE_VALUES["feature_caching"]:
        raise compat.not_implemented("feature_caching", compat.FEATURE_VALUES["feature_caching"][method], method)
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
    # a key the family's own section declares is the family's (it may handle a generic key its own way)
    taken = {f.name for f in fields(family.config_section)} if family is not None and family.config_section else set()
    for key, value in merged.items():
        if key in _KEY_TO_SECTION and key not in taken:
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
                          offload=offload, family=section, vfi=vfi, notes=tuple(dict.fromkeys(notes)))
    if offload.cpu_offload and offload.offload_granularity != "model" and cfg.runtime.use_compile:
        raise UserError("use_compile cannot be combined with block/phase cpu_offload (the offload hooks swap the "
                        "weights under the compiled graph); use one of them")
    if offload.lazy_load and lora.loras:
        raise UserError("lazy_load reads block weights straight from disk: it cannot be combined with LoRAs "
                        "(merge them into a checkpoint with `lightx2v convert` first)")
    if cfg.sampling.changing_resolution and cache.method != "NoCaching":
        raise compat.not_implemented("feature_caching", "feature caching across the resolution changes of "
                                     "changing_resolution", cache.method)
    return cfg
