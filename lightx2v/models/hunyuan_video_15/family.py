"""The HunyuanVideo-1.5 family registered with the engine: model classes ``hunyuan_video_1.5`` and
``hunyuan_video_1.5_distill`` (LightX2V's names), tasks ``t2v`` and ``i2v``, the package's three stages behind the
engine's stage protocol and messages.

The two model classes run the same stages; the distilled one (LightX2V's ``HunyuanVideo15DistillRunner``: only its
scheduler differs) defaults to the 4-step schedule ``denoising_step_list [1000, 750, 500, 250]`` without CFG, 81
frames at 16 fps (LightX2V's ``hunyuan_video_t2v_480p_distill.json``). The base class defaults to 50 steps, 121
frames at 24 fps, guidance 6 and the checkpoint's shift (``sample_shift: "auto"``), as LightX2V's configs and the
release.

The request's generic sampling settings map onto :class:`lightx2v.models.hunyuan_video_15.stages.HunyuanVideo15Request`:

* size: T2V: ``aspect_ratio`` ("W:H", default "16:9") picks the bucket of the DiT's ``target_size`` (480p: 848x480
  for 16:9), or ``height``/``width`` without it. I2V: ``aspect_ratio: "auto"`` (the default) takes the bucket of the
  input image, which is resized and centre-cropped to it (LightX2V's and diffusers' rule); a "W:H" ratio takes that
  ratio's bucket instead, ``height``/``width`` an explicit size.
* ``infer_steps``, ``denoising_step_list`` (step-distilled schedules), ``num_frames`` (4k + 1), ``fps``;
* ``guidance_scale``: CFG ``uncond + g * (cond - uncond)``, on unless ``g`` is 1 or ``enable_cfg`` is false;
* ``sample_shift`` ("auto": the checkpoint's: diffusers' scheduler config, or the release's value per model name).

Settings that do not apply (two-expert guidance and boundaries, another solver, changing resolution, a resize mode
other than crop) are refused, and so are load-time features this family does not implement yet (lazy loading,
LoRA, compile, pre-quantized checkpoints, quantized encoders, LightTAE, super-resolution). Implemented: fp8/int8 DiT
linears (``dit_quant_scheme``), DiT CPU offload (``cpu_offload``: model, block or phase), the encoders' and the VAE's
CPU offload, feature caching (Tea / Mag / FirstBlock on the DiT's block stack), VAE tiling, frame interpolation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lightx2v.engine.device import resolve_device_dtype
from lightx2v.engine.family import ModelFamily, StageSpec, register_family
from lightx2v.engine.messages import Frames, message
from lightx2v.engine.progress import RunContext
from lightx2v.engine.request import GenerationRequest, SamplingConfig
from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.hunyuan_video_15.arch import TARGET_SIZES, closest_bucket, parse_aspect_ratio
from lightx2v.models.hunyuan_video_15.checkpoint import (detect_layout, read_dit_config, read_vae_config,
                                                         sampling_defaults)
from lightx2v.models.hunyuan_video_15.config import (FAMILY as NAME, VAE_STRIDE, HunyuanVideo15Config, check_task,
                                                     not_implemented)
from lightx2v.models.hunyuan_video_15.stages import (HunyuanVideo15Decoder, HunyuanVideo15Encoded,
                                                     HunyuanVideo15Encoder, HunyuanVideo15Options,
                                                     HunyuanVideo15Request, HunyuanVideo15Transformer, Sampling)

log = logging.getLogger("lightx2v")

MODEL_CLS, DISTILL_CLS = "hunyuan_video_1.5", "hunyuan_video_1.5_distill"
TASKS = ("t2v", "i2v")
AUTO = "auto"  # aspect_ratio of I2V: the input image's

_BASE = {"infer_steps": 50, "num_frames": 121, "fps": 24, "guidance_scale": 6.0, "sample_shift": "auto",
         "solver": "euler"}
_DISTILL = {"denoising_step_list": [1000, 750, 500, 250], "infer_steps": 4, "enable_cfg": False, "num_frames": 81,
            "fps": 16}
_SIZE = {"t2v": {"aspect_ratio": "16:9"}, "i2v": {"aspect_ratio": AUTO}}
MODEL_CLASSES = {
    MODEL_CLS: {task: {**_BASE, **_SIZE[task]} for task in TASKS},
    DISTILL_CLS: {task: {**_BASE, **_DISTILL, **_SIZE[task]} for task in TASKS},
}


# --- the request ---------------------------------------------------------------------------------------------------

def check_sampling(s: SamplingConfig, task: str) -> None:
    """UserError for a generic sampling setting that HunyuanVideo-1.5 does not have (one line, naming it)."""
    if isinstance(s.guidance_scale, tuple):
        raise UserError(f"guidance_scale={list(s.guidance_scale)} is for two-expert models; {NAME} takes one number")
    for name, value in (("boundary", s.boundary), ("boundary_step_index", s.boundary_step_index)):
        if value is not None:
            raise UserError(f"{name} is for two-expert models, not a {NAME} setting")
    if s.changing_resolution:
        raise UserError(f"changing_resolution is not implemented for {NAME}")
    if s.solver != "euler":
        raise UserError(f"sample_solver={s.solver!r}: {NAME} samples with its flow-matching Euler scheduler "
                        "('euler')")
    if s.resize_mode != "crop":
        raise UserError(f"resize_mode={s.resize_mode!r}: {NAME} resizes and centre-crops the input image ('crop')")
    if s.aspect_ratio == AUTO:
        if task != "i2v":
            raise UserError("aspect_ratio 'auto' follows the input image: it is for task 'i2v'; give 'W:H' (e.g. "
                            "'16:9') or height and width")
    elif s.aspect_ratio is not None:
        parse_aspect_ratio(s.aspect_ratio)


def to_request(request: GenerationRequest, target_size: int) -> HunyuanVideo15Request:
    """The family's request of a generic one. ``target_size``: the DiT's bucket base (for an I2V "W:H" ratio)."""
    s = request.sampling
    check_sampling(s, request.task)
    size: dict[str, Any] = {}
    if s.aspect_ratio is None:
        size = {"height": s.height, "width": s.width}
    elif s.aspect_ratio != AUTO:
        if request.task == "i2v":  # that ratio's bucket; the image is cropped to it
            w, h = parse_aspect_ratio(s.aspect_ratio)
            height, width = closest_bucket(h, w, target_size)
            size = {"height": height, "width": width}
        else:
            size = {"aspect_ratio": s.aspect_ratio}
    return HunyuanVideo15Request(
        prompt=request.prompt, negative_prompt=request.negative_prompt, task=request.task,
        image=request.images[0] if request.task == "i2v" and request.images else None, seed=request.seed,
        num_frames=s.num_frames, infer_steps=s.infer_steps, guidance_scale=float(s.guidance_scale),
        sample_shift=None if s.sample_shift == "auto" else float(s.sample_shift),
        enable_cfg=False if not s.enable_cfg else None, denoising_step_list=s.denoising_step_list, **size)


# --- messages ------------------------------------------------------------------------------------------------------

message("hunyuan_video_1.5.sampling")(Sampling)
message("hunyuan_video_1.5.encoded")(HunyuanVideo15Encoded)


@message("hunyuan_video_1.5.conditioning")
@dataclass(frozen=True)
class HunyuanVideo15Conditioning:
    """Message 1: the request's plain values (its size resolved) and the encoder's output."""

    request: dict
    encoded: Any  # HunyuanVideo15Encoded


@message("hunyuan_video_1.5.latents")
@dataclass(frozen=True)
class HunyuanVideo15Latents:
    """Message 2: the denoised latents ``[1, 32, T, h, w]`` (the DiT's dtype)."""

    request: dict
    latents: torch.Tensor


# --- the stages ----------------------------------------------------------------------------------------------------

class _Stage:
    def __init__(self, task: str):
        self.task = task

    def check_request(self, request: GenerationRequest) -> None:
        if request.task != self.task:
            raise UserError(f"this {NAME} generator does task {self.task!r}; the request asks for {request.task!r}")
        want = 1 if self.task == "i2v" else 0
        if len(request.images) != want:
            raise UserError(f"task {self.task!r} takes {want} image(s), got {len(request.images)}")
        if request.loras is not None:
            raise not_implemented(["LoRA (lora_configs)"])
        self.check_sampling(request.sampling)

    def check_sampling(self, s: SamplingConfig) -> None:
        check_sampling(s, self.task)


class Encoder(_Stage):
    """Qwen2.5-VL + ByT5 (and for I2V SigLIP and the VAE encoder) -> :class:`HunyuanVideo15Conditioning`."""

    name = "encoder"

    def __init__(self, inner: HunyuanVideo15Encoder, task: str):
        super().__init__(task)
        self.inner, self.device = inner, inner.device

    def check_request(self, request: GenerationRequest) -> None:
        super().check_request(request)
        hreq = to_request(request, self.inner.dit_cfg.target_size)
        if hreq.height is None and hreq.image is None:  # the bucket must fit the VAE (an image's is checked later)
            self.inner.output_size(hreq)

    def __call__(self, request: GenerationRequest, ctx: RunContext) -> HunyuanVideo15Conditioning:
        encoded = self.inner.encode(to_request(request, self.inner.dit_cfg.target_size), stage=ctx.stage)
        wire = replace(request, sampling=replace(request.sampling, height=encoded.height, width=encoded.width,
                                                 aspect_ratio=None)).to_wire()
        return HunyuanVideo15Conditioning(wire, encoded)


class Transformer(_Stage):
    """The DiT and the denoising loop -> :class:`HunyuanVideo15Latents`. ``cache``: the feature-caching hook (or
    None); its per-request statistics are ``last_stats``."""

    name = "transformer"

    def __init__(self, inner: HunyuanVideo15Transformer, task: str, cache_method: str = "NoCaching"):
        super().__init__(task)
        self.inner, self.device, self.dit = inner, inner.device, inner.dit
        self.cache_method = cache_method
        self.last_stats: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def _check_message(self, e: HunyuanVideo15Encoded) -> None:
        cfg = self.dit.cfg
        widths = (("prompt_embeds", e.prompt_embeds, cfg.text_embed_dim),
                  ("negative_prompt_embeds", e.negative_prompt_embeds, cfg.text_embed_dim),
                  ("prompt_embeds_2", e.prompt_embeds_2, cfg.text_embed_2_dim),
                  ("negative_prompt_embeds_2", e.negative_prompt_embeds_2, cfg.text_embed_2_dim),
                  ("image_embeds", e.image_embeds, cfg.image_embed_dim))
        for name, t, dim in widths:
            if t is not None and (t.ndim != 3 or t.shape[0] != 1 or t.shape[-1] != dim):
                raise CheckpointError(f"{name} of shape {tuple(t.shape)} does not fit the DiT ([1, L, {dim}])")
        if e.latent_shape[0] != cfg.out_channels:
            raise CheckpointError(f"latents of {e.latent_shape[0]} channels do not fit the DiT's {cfg.out_channels}")
        if (e.task == "i2v") != (e.image_embeds is not None):
            raise UserError(f"a {e.task} message {'without' if e.task == 'i2v' else 'with'} image embeddings")

    def __call__(self, cond: HunyuanVideo15Conditioning, ctx: RunContext) -> HunyuanVideo15Latents:
        from tqdm import tqdm

        e = cond.encoded
        self._check_message(e)
        n = len(e.sampling.sigmas)
        with ctx.stage("denoise"), tqdm(total=n, desc="denoise", disable=not ctx.show_progress_bar,
                                        leave=False) as bar:
            def on_step(i: int, total: int) -> None:
                bar.update(1)
                ctx.step("denoise", i + 1, total)  # progress, and the cancel point

            latents = self.inner.sample(e, cond.request["seed"], on_step)
        self.last_stats = {}
        cache = self.inner.cache
        if cache is not None:
            self.last_stats = {"cache": cache.stats()}
        return HunyuanVideo15Latents(cond.request, latents)


class Decoder(_Stage):
    """The VAE decoder -> :class:`lightx2v.engine.messages.Frames` at the request's fps."""

    name = "decoder"

    def __init__(self, inner: HunyuanVideo15Decoder, task: str):
        super().__init__(task)
        self.inner, self.device, self.vae = inner, inner.device, inner.vae

    def __call__(self, lat: HunyuanVideo15Latents, ctx: RunContext) -> Frames:
        channels = self.vae.cfg.latent_channels
        if lat.latents.ndim != 5 or tuple(lat.latents.shape[:2]) != (1, channels):
            raise CheckpointError(f"latents of shape {tuple(lat.latents.shape)} do not fit the VAE "
                                  f"([1, {channels}, T, h, w])")
        with ctx.stage("VAE decode"):
            frames = self.inner.decode(lat.latents)
        return Frames(frames, lat.request["sampling"]["fps"], lat.request)


# --- building --------------------------------------------------------------------------------------------------------

def _section(cfg) -> HunyuanVideo15Config:
    return cfg.family if isinstance(cfg.family, HunyuanVideo15Config) else HunyuanVideo15Config()


def options(cfg) -> HunyuanVideo15Options:
    """The package's per-load options from a generator config."""
    fam = _section(cfg)
    return HunyuanVideo15Options(
        attn_mode=cfg.attention.self_attn_1_type, transformer_model_name=fam.transformer_model_name,
        dit_original_ckpt=cfg.checkpoint.dit_original_ckpt, use_tiling_vae=cfg.runtime.use_tiling_vae,
        dit_quant_scheme=cfg.checkpoint.dit_quant_scheme, vae_cpu_offload=cfg.runtime.vae_cpu_offload,
        **fam.encoder_offload(cfg.offload.cpu_offload))


def check_generator_config(cfg, task: str) -> None:
    """What a generator config asks of this family that it cannot do: one UserError (before anything is read)."""
    asked = []
    if cfg.offload.lazy_load:
        asked.append("lazy loading of DiT blocks (lazy_load)")
    if cfg.lora.loras:
        asked.append("LoRA (lora_configs)")
    if cfg.runtime.use_compile:
        asked.append("torch.compile of the DiT blocks (use_compile)")
    if cfg.runtime.unload_modules:
        asked.append("loading encoders per use (unload_modules)")
    if asked:
        raise not_implemented(asked)
    ck, rt = cfg.checkpoint, cfg.runtime
    if ck.high_noise_original_ckpt or ck.low_noise_original_ckpt:
        raise UserError(f"high_noise_original_ckpt / low_noise_original_ckpt are for two-expert models; {NAME} takes "
                        "dit_original_ckpt")
    for key, ours in (("t5_cpu_offload", "qwen25vl_cpu_offload / byt5_cpu_offload"),
                      ("clip_cpu_offload", "siglip_cpu_offload")):
        if getattr(rt, key):
            raise UserError(f"{key} is a Wan setting; {NAME}'s is {ours}")
    if rt.cfg_batch is True:
        raise UserError(f"cfg_batch=true is not available for {NAME}: its two CFG branches carry different numbers "
                        "of condition tokens and run as two forwards")
    if _section(cfg).dit_quantized and not ck.dit_quant_scheme:
        raise UserError("dit_quantized=true needs dit_quant_scheme (fp8 or int8), which quantizes the DiT when it is "
                        "loaded")
    check_task(_section(cfg).transformer_model_name, task)
    check_sampling(cfg.sampling, task)
    resolve_device_dtype(rt.device, rt.dtype)


def _text_widths(root: Path, layout: str) -> tuple[int, int]:
    """(Qwen hidden size, ByT5 d_model) from their config.json files (no weights read)."""
    from lightx2v.loading import read_json

    if layout == "diffusers":
        qwen, byt5 = root / "text_encoder" / "config.json", root / "text_encoder_2" / "config.json"
    else:
        qwen, byt5 = root / "text_encoder" / "llm" / "config.json", root / "text_encoder" / "byt5-small" / "config.json"
    q = read_json(qwen, "Qwen2.5-VL config")
    q = q.get("text_config") or q
    return int(q["hidden_size"]), int(read_json(byt5, "ByT5 config")["d_model"])


def _image_width(root: Path, layout: str) -> int:
    from lightx2v.loading import read_json
    from lightx2v.models.hunyuan_video_15.checkpoint import image_encoder_folders

    raw = read_json(image_encoder_folders(root, layout)[0] / "config.json", "SigLIP config")
    return int((raw.get("vision_config") or raw)["hidden_size"])


def check_checkpoint(spec: StageSpec) -> None:
    """The checks across the components, from their config files (before any weight is read)."""
    root, task = Path(spec.model_path), spec.task
    fam = _section(spec.config)
    layout = detect_layout(root)
    dit = read_dit_config(root, layout, fam.transformer_model_name, with_shapes=layout == "diffusers")
    if dit.task_type != task:
        raise UserError(f"task {task!r} does not fit the checkpoint {str(root)!r}, whose DiT is a {dit.task_type} "
                        "model; use the other task or checkpoint")
    if fam.transformer_model_name is not None:
        resolution = fam.transformer_model_name.split("_")[0]
        if dit.target_size in TARGET_SIZES.values() and dit.target_size != TARGET_SIZES[resolution]:
            raise UserError(f"transformer_model_name {fam.transformer_model_name!r} is a {resolution} model, but the "
                            f"DiT of {str(root)!r} has target_size {dit.target_size}")
    vae = read_vae_config(root, layout)
    stride = (vae.temporal_compression_ratio, vae.spatial_compression_ratio, vae.spatial_compression_ratio)
    if fam.vae_stride is not None and fam.vae_stride != stride:
        raise UserError(f"vae_stride={list(fam.vae_stride)} does not fit this checkpoint's VAE ({list(stride)})")
    if vae.latent_channels != dit.out_channels:
        raise CheckpointError(f"the VAE's {vae.latent_channels} latent channels do not fit the DiT's "
                              f"{dit.out_channels}")
    qwen, byt5 = _text_widths(root, layout)
    if qwen != dit.text_embed_dim:
        raise CheckpointError(f"the Qwen2.5-VL hidden size {qwen} does not fit the DiT's text_embed_dim "
                              f"{dit.text_embed_dim}")
    if layout == "diffusers" and byt5 != dit.text_embed_2_dim:  # (the release's DiT reads it from its weights)
        raise CheckpointError(f"the ByT5 width {byt5} does not fit the DiT's text_embed_2_dim {dit.text_embed_2_dim}")
    if task == "i2v" and _image_width(root, layout) != dit.image_embed_dim:
        raise CheckpointError(f"the SigLIP hidden size does not fit the DiT's image_embed_dim {dit.image_embed_dim}")
    s = spec.config.sampling
    own = sampling_defaults(root, layout, fam.transformer_model_name)
    if own["guidance_scale"] == 1.0 and s.enable_cfg and s.guidance_scale != 1.0:
        log.warning("%s is CFG-distilled (its own guidance is 1: one forward per step), but this generator runs "
                    "CFG with guidance_scale %s; set enable_cfg false (as LightX2V's cfg_distilled config does) or "
                    "guidance_scale 1 for the model's own sampling", root, s.guidance_scale)
    if s.aspect_ratio is None:
        for name in ("height", "width"):
            if getattr(s, name) % vae.spatial_compression_ratio:
                raise UserError(f"{name}={getattr(s, name)} is not a multiple of the VAE's stride "
                                f"{vae.spatial_compression_ratio}")


def build_encoder(spec: StageSpec) -> Encoder:
    check_generator_config(spec.config, spec.task)
    dev, dt = resolve_device_dtype(spec.config.runtime.device, spec.config.runtime.dtype)
    inner = HunyuanVideo15Encoder(spec.model_path, dev, dt, options(spec.config), preload_i2v=spec.task == "i2v")
    return Encoder(inner, spec.task)


def build_transformer(spec: StageSpec) -> Transformer:
    cfg = spec.config
    check_generator_config(cfg, spec.task)
    dev, dt = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)
    off = cfg.offload
    inner = HunyuanVideo15Transformer(spec.model_path, dev, dt, options(cfg),
                                      load_device=torch.device("cpu") if off.cpu_offload else None)
    if cfg.cache.method != "NoCaching":  # runtime features, attached from outside the model
        from lightx2v.hooks.caching import apply_feature_caching

        inner.cache = apply_feature_caching(inner.dit, cfg.cache)
    if off.cpu_offload:
        from lightx2v.hooks.offload import apply_offload

        inner.offload = apply_offload(inner.dit, off, dev)
        inner.offload.offload()  # nothing on the device until the denoising loop
    return Transformer(inner, spec.task, cfg.cache.method)


def build_decoder(spec: StageSpec) -> Decoder:
    check_generator_config(spec.config, spec.task)
    dev, dt = resolve_device_dtype(spec.config.runtime.device, spec.config.runtime.dtype)
    return Decoder(HunyuanVideo15Decoder(spec.model_path, dev, dt, options(spec.config)), spec.task)


def build_all(spec: StageSpec):
    """The three stages of one process, after the checks across them (before any weight is read)."""
    check_generator_config(spec.config, spec.task)
    check_checkpoint(spec)
    return build_encoder(spec), build_transformer(spec), build_decoder(spec)


def _tiny_model(task: str, model_cls: str) -> Path:
    from lightx2v.models.hunyuan_video_15.tiny import ensure_tiny_model

    return ensure_tiny_model(task)


def _tiny_defaults(task: str, model_cls: str) -> dict:
    from lightx2v.models.hunyuan_video_15.tiny import TINY_DEFAULTS

    return json.loads(json.dumps(TINY_DEFAULTS))


FAMILY = register_family(ModelFamily(
    name=NAME,
    model_classes=MODEL_CLASSES,
    build_encoder=build_encoder,
    build_transformer=build_transformer,
    build_decoder=build_decoder,
    build_all=build_all,
    config_section=HunyuanVideo15Config,
    tiny_model=_tiny_model,
    tiny_defaults=_tiny_defaults,
    output="video",
))

__all__ = ["FAMILY", "MODEL_CLASSES", "HunyuanVideo15Conditioning", "HunyuanVideo15Latents", "Encoder", "Transformer",
           "Decoder", "to_request", "check_sampling", "check_generator_config", "options", "VAE_STRIDE"]
