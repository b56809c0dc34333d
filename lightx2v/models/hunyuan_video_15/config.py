"""HunyuanVideo-1.5's own keys in a LightX2V config: the family's config section (``ModelFamily.config_section``).

A LightX2V HunyuanVideo-1.5 config (``configs/hunyuan_video_15/*.json``) goes through the engine's config layer
(``lightx2v.config.build_config`` with this family), which reads the keys every family shares: ``infer_steps``,
``target_video_length``, ``target_height`` / ``target_width``, ``aspect_ratio``, ``fps``, ``sample_shift``,
``sample_guide_scale``, ``enable_cfg``, ``denoising_step_list``, ``attn_type``, ``dit_original_ckpt``,
``dit_quant_scheme``, ``cpu_offload`` / ``offload_granularity``, ``vae_cpu_offload``, ``use_tiling_vae``,
``feature_caching`` and its keys. The keys below are this family's alone; :class:`HunyuanVideo15Config` holds them:

* ``transformer_model_name`` (``"480p_t2v"``, ``"720p_i2v_distilled"``, ...): which DiT of the release layout
  (``transformer/<name>/``); its task must be the generator's (checked when the generator is built);
* ``vae_stride``: checked, ``[4, 16, 16]`` (and the checkpoint's VAE);
* ``qwen25vl_cpu_offload``, ``byt5_cpu_offload``, ``siglip_cpu_offload``: keep that encoder on the CPU between uses
  (unset: as ``cpu_offload``, LightX2V's rule);
* ``dit_quantized``: LightX2V's flag that the DiT is quantized; only with ``dit_quant_scheme`` (which quantizes the
  float DiT when it is loaded).

Keys of features this family does not implement yet are accepted only with their "off" value; a config that asks
for one is refused with one message naming every such feature (nothing a user asked for is silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lightx2v.errors import UserError
from lightx2v.models.hunyuan_video_15.arch import parse_transformer_model_name

FAMILY = "hunyuan_video_1.5"
VAE_STRIDE = (4, 16, 16)

# features not implemented yet: key -> what the refusal calls it
NOT_YET = {
    "dit_quantized_ckpt": "pre-quantized DiT checkpoints (dit_quantized_ckpt; dit_quant_scheme alone quantizes the "
                          "DiT when it is loaded)",
    "qwen25vl_quantized": "quantized Qwen2.5-VL (qwen25vl_quantized)",
    "qwen25vl_quant_scheme": "quantized Qwen2.5-VL (qwen25vl_quant_scheme)",
    "qwen25vl_quantized_ckpt": "quantized Qwen2.5-VL checkpoints (qwen25vl_quantized_ckpt)",
    "use_tae": "the LightTAE decoder (use_tae / tae_path)",
    "tae_path": "the LightTAE decoder (use_tae / tae_path)",
    "video_super_resolution": "video super-resolution (video_super_resolution)",
}


def _is_off(value: Any) -> bool:
    return value in (None, False, "", {}, []) or (isinstance(value, str) and value.lower() in ("none", "false"))


def not_implemented(features: list[str]) -> UserError:
    """The one refusal of features this family does not have yet (each named once)."""
    return UserError(f"{'; '.join(dict.fromkeys(features))}: not implemented yet for {FAMILY}")


@dataclass(frozen=True)
class HunyuanVideo15Config:
    """The config keys only HunyuanVideo-1.5 reads (see the module docstring)."""

    transformer_model_name: str | None = None
    vae_stride: tuple[int, int, int] | None = None
    qwen25vl_cpu_offload: bool | None = None  # None: as cpu_offload
    byt5_cpu_offload: bool | None = None
    siglip_cpu_offload: bool | None = None
    dit_quantized: bool = False
    # not implemented yet (accepted while off)
    dit_quantized_ckpt: str | None = None
    qwen25vl_quantized: bool = False
    qwen25vl_quant_scheme: str | None = None
    qwen25vl_quantized_ckpt: str | None = None
    use_tae: bool = False
    tae_path: str | None = None
    video_super_resolution: dict | None = None

    def __post_init__(self):
        asked = [NOT_YET[f.name] for f in fields(self) if f.name in NOT_YET and not _is_off(getattr(self, f.name))]
        if asked:
            raise not_implemented(asked)
        if self.transformer_model_name is not None:
            parse_transformer_model_name(self.transformer_model_name)
        if self.vae_stride is not None:
            if not isinstance(self.vae_stride, (list, tuple)) or tuple(self.vae_stride) != VAE_STRIDE:
                raise UserError(f"vae_stride={self.vae_stride!r} does not fit HunyuanVideo-1.5's VAE; it is "
                                f"{list(VAE_STRIDE)}")
            object.__setattr__(self, "vae_stride", tuple(self.vae_stride))
        for name in ("qwen25vl_cpu_offload", "byt5_cpu_offload", "siglip_cpu_offload"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise UserError(f"{name}={value!r} must be true or false")
        if not isinstance(self.dit_quantized, bool):
            raise UserError(f"dit_quantized={self.dit_quantized!r} must be true or false")

    def encoder_offload(self, cpu_offload: bool) -> dict[str, bool]:
        """``{key: on}`` of the three encoders' CPU offload; an unset key follows ``cpu_offload`` (LightX2V)."""
        return {name: cpu_offload if getattr(self, name) is None else getattr(self, name)
                for name in ("qwen25vl_cpu_offload", "byt5_cpu_offload", "siglip_cpu_offload")}


def check_task(transformer_model_name: str | None, task: str) -> None:
    """UserError unless ``transformer_model_name`` (if given) is a model for ``task``."""
    if transformer_model_name is None:
        return
    _, name_task, _ = parse_transformer_model_name(transformer_model_name)
    if name_task != task:
        raise UserError(f"transformer_model_name {transformer_model_name!r} is a {name_task} model, but the task is "
                        f"{task!r}")
