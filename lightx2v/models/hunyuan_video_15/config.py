"""LightX2V's HunyuanVideo-1.5 config JSONs (``configs/hunyuan_video_15/*.json``) in this family's terms.

:func:`load_lightx2v_config` takes such a dict (or a path) and returns the stage options and the request defaults it
sets. Keys of features this family implements are mapped; keys of features it does not implement yet are accepted
only with their "off" value, and a config asking for one is refused with one message naming every such feature
(nothing a user asked for is silently ignored); unknown keys are refused with near-match suggestions.

Implemented: ``transformer_model_name, infer_steps, target_video_length, target_height, target_width, aspect_ratio,
fps, vae_stride ([4, 16, 16]), sample_shift, sample_guide_scale, enable_cfg, denoising_step_list (step-distilled),
dit_original_ckpt, attn_type, use_tiling_vae, seed`` and the run keys ``model_cls, task``.
Not yet (refused when switched on): CPU offload of the DiT or of any encoder, quantized DiT / Qwen2.5-VL, feature
caching (TeaCache / MagCache), sequence parallelism, the LightTAE decoder, video super-resolution.
"""

from __future__ import annotations

import difflib
import json
import numbers
from dataclasses import dataclass
from pathlib import Path

from lightx2v.errors import UserError
from lightx2v.models.hunyuan_video_15.arch import parse_aspect_ratio, parse_transformer_model_name
from lightx2v.models.hunyuan_video_15.stages import DEFAULTS, HunyuanVideo15Options, HunyuanVideo15Request

MODEL_CLASSES = ("hunyuan_video_1.5", "hunyuan_video_1.5_distill")
VAE_STRIDE = [4, 16, 16]
# LightX2V attn_type -> our attention backend (lightx2v.ops.attention); sage_attn is our INT8-QK / FP8-PV Triton kernel
ATTN_TYPES = {"torch_sdpa": "torch_sdpa", "flash_attn2": "flash_attn2", "flash_attn3": "flash_attn3",
              "sage_attn2": "sage_attn", "sage_attn": "sage_attn"}

# LightX2V key -> HunyuanVideo15Request field
_REQUEST_KEYS = {"infer_steps": "infer_steps", "target_video_length": "num_frames", "target_height": "height",
                 "target_width": "width", "aspect_ratio": "aspect_ratio", "sample_shift": "sample_shift",
                 "sample_guide_scale": "guidance_scale", "enable_cfg": "enable_cfg",
                 "denoising_step_list": "denoising_step_list", "seed": "seed"}
_OPTION_KEYS = {"transformer_model_name": "transformer_model_name", "dit_original_ckpt": "dit_original_ckpt",
                "use_tiling_vae": "use_tiling_vae", "attn_type": "attn_mode"}
_OTHER_KEYS = ("model_cls", "task", "fps", "vae_stride")

# features not implemented yet: key -> (value meaning "off", what the feature is called in the refusal)
_NOT_YET = {
    "cpu_offload": (False, "DiT CPU offload (cpu_offload)"),
    "vae_cpu_offload": (False, "VAE CPU offload (vae_cpu_offload)"),
    "byt5_cpu_offload": (False, "ByT5 CPU offload (byt5_cpu_offload)"),
    "qwen25vl_cpu_offload": (False, "Qwen2.5-VL CPU offload (qwen25vl_cpu_offload)"),
    "siglip_cpu_offload": (False, "SigLIP CPU offload (siglip_cpu_offload)"),
    "lazy_load": (False, "lazy loading of DiT blocks (lazy_load)"),
    "dit_quantized": (False, "quantized DiT (dit_quantized / dit_quant_scheme)"),
    "dit_quant_scheme": (None, "quantized DiT (dit_quantized / dit_quant_scheme)"),
    "dit_quantized_ckpt": (None, "quantized DiT checkpoint (dit_quantized_ckpt)"),
    "qwen25vl_quantized": (False, "quantized Qwen2.5-VL (qwen25vl_quantized)"),
    "qwen25vl_quant_scheme": (None, "quantized Qwen2.5-VL (qwen25vl_quant_scheme)"),
    "qwen25vl_quantized_ckpt": (None, "quantized Qwen2.5-VL checkpoint (qwen25vl_quantized_ckpt)"),
    "feature_caching": ("NoCaching", "feature caching (feature_caching: TeaCache / MagCache)"),
    "parallel": (None, "sequence / CFG parallelism (parallel)"),
    "use_tae": (False, "the LightTAE decoder (use_tae / tae_path)"),
    "tae_path": (None, "the LightTAE decoder (use_tae / tae_path)"),
    "video_super_resolution": (None, "video super-resolution (video_super_resolution)"),
    "use_prompt_enhancer": (False, "the prompt enhancer (use_prompt_enhancer)"),
}
# settings of a feature above; accepted (and unused) only when that feature is off
_FEATURE_SETTINGS = {
    "offload_granularity": "cpu_offload",
    "coefficients": "feature_caching", "teacache_thresh": "feature_caching", "use_ret_steps": "feature_caching",
    "magcache_calibration": "feature_caching", "magcache_K": "feature_caching", "magcache_thresh": "feature_caching",
    "magcache_retention_ratio": "feature_caching", "magcache_ratios": "feature_caching",
}
_IGNORED = ("_comment",)
ALL_KEYS = sorted({*_REQUEST_KEYS, *_OPTION_KEYS, *_OTHER_KEYS, *_NOT_YET, *_FEATURE_SETTINGS, *_IGNORED})


@dataclass(frozen=True)
class HunyuanVideo15Config:
    """What a LightX2V config sets: the stages' options, request defaults (HunyuanVideo15Request fields), fps."""

    model_cls: str
    task: str | None
    options: HunyuanVideo15Options
    request_defaults: dict
    fps: int

    def request(self, prompt: str, **overrides) -> HunyuanVideo15Request:
        """A request with this config's defaults; ``overrides`` (request fields) win."""
        kw = {**self.request_defaults, **overrides}
        if self.task is not None:
            kw.setdefault("task", self.task)
        return HunyuanVideo15Request(prompt=prompt, **kw)


def _suggest(key: str) -> str:
    near = difflib.get_close_matches(key, ALL_KEYS, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _is_off(value, off) -> bool:
    if off is None:
        return value in (None, False, "", {}, [])
    return value == off or (off is False and value in (None, False))


def load_lightx2v_config(src) -> HunyuanVideo15Config:
    """A LightX2V HunyuanVideo-1.5 config (dict or JSON path) -> :class:`HunyuanVideo15Config`, or UserError."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise UserError(f"config_json {str(path)!r} does not exist")
        try:
            src = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"config_json {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(src, dict):
        raise UserError("a HunyuanVideo-1.5 config must be a JSON object")
    d = dict(src)
    unknown = [k for k in d if k not in ALL_KEYS]
    if unknown:
        raise UserError("unknown config keys for hunyuan_video_1.5: "
                        + ", ".join(f"{k!r}{_suggest(k)}" for k in unknown))
    missing_features = []
    for key, (off, feature) in _NOT_YET.items():
        if key in d and not _is_off(d[key], off) and feature not in missing_features:
            missing_features.append(feature)
    for key, owner in _FEATURE_SETTINGS.items():
        if key in d and _is_off(d.get(owner, _NOT_YET[owner][0]), _NOT_YET[owner][0]) and key != "offload_granularity":
            raise UserError(f"{key!r} is a setting of {owner!r}, which this config does not switch on")
    if missing_features:
        raise UserError("this config asks for features hunyuan_video_1.5 does not implement yet: "
                        + "; ".join(missing_features))

    model_cls = d.get("model_cls", "hunyuan_video_1.5")
    if model_cls not in MODEL_CLASSES:
        raise UserError(f"model_cls {model_cls!r} is not a HunyuanVideo-1.5 class; allowed: {', '.join(MODEL_CLASSES)}")
    task = d.get("task")
    if task is not None and task not in ("t2v", "i2v"):
        raise UserError(f"task {task!r} is not supported by hunyuan_video_1.5; allowed: t2v, i2v")
    if "vae_stride" in d and list(d["vae_stride"]) != VAE_STRIDE:
        raise UserError(f"vae_stride {d['vae_stride']!r} does not fit HunyuanVideo-1.5's VAE; it is {VAE_STRIDE}")
    fps = d.get("fps", DEFAULTS["fps"])
    if isinstance(fps, bool) or not isinstance(fps, numbers.Integral) or fps < 1:
        raise UserError(f"fps={fps!r} must be an integer >= 1")

    options = {}
    for key, field in _OPTION_KEYS.items():
        if key in d:
            options[field] = d[key]
    if "transformer_model_name" in options:
        name = options["transformer_model_name"]
        parse_transformer_model_name(name)
        if task is not None and name.split("_")[1] != task:
            raise UserError(f"transformer_model_name {name!r} is a {name.split('_')[1]} model, but task is {task!r}")
    if "attn_mode" in options:
        attn = options["attn_mode"]
        if attn not in ATTN_TYPES:
            raise UserError(f"attn_type {attn!r} is not available; allowed: {', '.join(ATTN_TYPES)}"
                            + (" (SageAttention3's FP4 kernel is not implemented)" if attn == "sage_attn3" else ""))
        options["attn_mode"] = ATTN_TYPES[attn]
    if "use_tiling_vae" in options and not isinstance(options["use_tiling_vae"], bool):
        raise UserError(f"use_tiling_vae={options['use_tiling_vae']!r} must be true or false")

    request = {field: d[key] for key, field in _REQUEST_KEYS.items() if key in d}
    if "denoising_step_list" in request:
        request["denoising_step_list"] = tuple(request["denoising_step_list"])
    elif model_cls == "hunyuan_video_1.5_distill":
        raise UserError("model_cls 'hunyuan_video_1.5_distill' needs denoising_step_list (e.g. [1000, 750, 500, 250])")
    if "aspect_ratio" in request:
        parse_aspect_ratio(request["aspect_ratio"])
    if request.get("enable_cfg") is False and request.get("guidance_scale") is not None:
        request.pop("guidance_scale")  # unused without CFG (LightX2V's distill config sets -1)
    # validate the values now (the same checks a request makes), so a bad config fails when it is loaded
    HunyuanVideo15Request(prompt="", **({"task": "i2v", "image": "unused"} if task == "i2v" else {}), **request)
    return HunyuanVideo15Config(model_cls=model_cls, task=task, options=HunyuanVideo15Options(**options),
                                request_defaults=request, fps=int(fps))
