"""The Z-Image family (Z-Image-Turbo text-to-image) registered with the engine: model class ``z_image``, task
``t2i``, its three stages behind the engine's stage protocol and messages.

The request's generic sampling settings map onto Z-Image's (:class:`lightx2v.models.z_image.stages.ZImageRequest`):
``aspect_ratio`` (LightX2V's table, or the config's ``aspect_ratios``) or height/width, ``infer_steps``,
``guidance_scale`` (<= 1: one forward per step, LightX2V's convention), ``sample_shift`` ("auto": the checkpoint's
scheduler), ``enable_cfg`` (false forces CFG off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightx2v.engine.device import resolve_device_dtype
from lightx2v.engine.family import ModelFamily, StageSpec, register_family
from lightx2v.engine.messages import Frames, message
from lightx2v.engine.progress import RunContext
from lightx2v.engine.request import GenerationRequest, SamplingConfig
from lightx2v.errors import UserError
from lightx2v.models.z_image import checkpoint as ckpt
from lightx2v.models.z_image.stages import (ZImageDecoder, ZImageEncoded, ZImageEncoder, ZImageOptions, ZImageRequest,
                                            ZImageTransformer, check_config)

DEFAULTS = {"infer_steps": 9, "guidance_scale": 0.0, "aspect_ratio": "16:9", "num_frames": 1, "sample_shift": "auto",
            "fps": 1}


@dataclass(frozen=True)
class ZImageConfig:
    """Z-Image's own config keys: a size table, and values checked against the checkpoint."""

    aspect_ratios: dict | None = None  # {name: [width, height]}, on top of LightX2V's table
    num_channels_latents: int | None = None  # checked: the DiT's in_channels
    patch_size: int | None = None  # checked: the DiT's patch size

    def __post_init__(self):
        if self.aspect_ratios is not None:
            ZImageRequest(prompt="", aspect_ratios=self.aspect_ratios)  # validates the table


def _device_dtype(cfg) -> tuple[torch.device, torch.dtype]:
    return resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)


def to_zimage_request(request: GenerationRequest, aspect_ratios: dict | None) -> ZImageRequest:
    s = request.sampling
    g = s.guidance_scale
    if isinstance(g, tuple):
        raise UserError(f"guidance_scale={list(g)} is for two-expert models; Z-Image takes one number")
    sized = s.aspect_ratio is None
    return ZImageRequest(prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
                         infer_steps=s.infer_steps, guidance_scale=g,
                         enable_cfg=False if not s.enable_cfg else None,
                         sample_shift=None if s.sample_shift == "auto" else s.sample_shift,
                         aspect_ratio=s.aspect_ratio or "16:9", height=s.height if sized else None,
                         width=s.width if sized else None, aspect_ratios=aspect_ratios)


def _check_sampling(s: SamplingConfig) -> None:
    if s.num_frames != 1:
        raise UserError(f"num_frames={s.num_frames}: Z-Image makes one image (num_frames 1)")
    for name, value in (("denoising_step_list", s.denoising_step_list), ("boundary", s.boundary),
                        ("boundary_step_index", s.boundary_step_index)):
        if value is not None:
            raise UserError(f"{name} is not a Z-Image setting")
    if s.changing_resolution:
        raise UserError("changing_resolution is not implemented for Z-Image")
    if s.solver != "unipc" and s.solver != "euler":
        raise UserError(f"sample_solver={s.solver!r}: Z-Image samples with its flow Euler scheduler")


@message("z_image.encoded")
@dataclass(frozen=True)
class ZImageCond:
    request: dict
    encoded: Any  # ZImageEncoded


@message("z_image.latents")
@dataclass(frozen=True)
class ZImageLatents:
    request: dict
    latents: torch.Tensor
    encoded: Any  # ZImageEncoded without the embeddings


message("z_image.features")(ZImageEncoded)


class _Stage:
    def check_request(self, request: GenerationRequest) -> None:
        if request.images:
            raise UserError("task 't2i' takes no image")
        self.check_sampling(request.sampling)

    def check_sampling(self, s: SamplingConfig) -> None:
        _check_sampling(s)


class Encoder(_Stage):
    name = "encoder"

    def __init__(self, inner: ZImageEncoder, aspect_ratios: dict | None):
        self.inner, self.aspect_ratios, self.device = inner, aspect_ratios, inner.device
        self.text_encoder = inner.text_encoder

    def check_request(self, request: GenerationRequest) -> None:
        super().check_request(request)
        to_zimage_request(request, self.aspect_ratios).size(self.inner.size_multiple)

    def __call__(self, request: GenerationRequest, ctx: RunContext) -> ZImageCond:
        zreq = to_zimage_request(request, self.aspect_ratios)
        with ctx.stage("text encode"):
            encoded = self.inner.encode(zreq)
        from dataclasses import replace

        wire = replace(request, sampling=replace(request.sampling, height=encoded.height, width=encoded.width,
                                                 aspect_ratio=None)).to_wire()
        return ZImageCond(wire, encoded)


class Transformer(_Stage):
    name = "transformer"

    def __init__(self, inner: ZImageTransformer):
        self.inner, self.device, self.dit = inner, inner.device, inner.dit

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def __call__(self, cond: ZImageCond, ctx: RunContext) -> ZImageLatents:
        request = GenerationRequest.from_wire(cond.request)
        zreq = to_zimage_request(request, None)
        with ctx.stage("denoise"):
            latents = self.inner.denoise(cond.encoded, zreq, on_step=lambda i, n: ctx.step("denoise", i + 1, n))
        e = cond.encoded
        meta = ZImageEncoded(e.prompt_embeds[:0], None, e.height, e.width, e.latent_shape)
        return ZImageLatents(cond.request, latents, meta)


class Decoder(_Stage):
    name = "decoder"

    def __init__(self, inner: ZImageDecoder):
        self.inner, self.device = inner, inner.device
        self.vae = inner.vae

    def __call__(self, lat: ZImageLatents, ctx: RunContext) -> Frames:
        with ctx.stage("VAE decode"):
            frames = self.inner.decode(lat.latents, lat.encoded)
        return Frames(frames, 1, lat.request)


def _options(cfg) -> ZImageOptions:
    a = cfg.attention
    return ZImageOptions(attn_mode=a.self_attn_1_type)


def _unsupported(cfg) -> None:
    """Load-time features this family does not implement yet: an error, never a silent drop."""
    asked = []
    if cfg.checkpoint.dit_quant_scheme:
        asked.append("dit_quant_scheme")
    if cfg.offload.cpu_offload:
        asked.append("cpu_offload")
    if cfg.lora.loras:
        asked.append("lora_configs")
    if cfg.cache.method != "NoCaching":
        asked.append("feature_caching")
    if cfg.checkpoint.dit_original_ckpt:
        asked.append("dit_original_ckpt")
    if cfg.runtime.use_compile:
        asked.append("use_compile")
    if asked:
        raise UserError(f"{', '.join(asked)}: not implemented yet for z_image")


def build_encoder(spec: StageSpec) -> Encoder:
    dev, dt = _device_dtype(spec.config)
    fam = spec.config.family
    return Encoder(ZImageEncoder(spec.model_path, dev, dt, _options(spec.config)), fam.aspect_ratios if fam else None)


def build_transformer(spec: StageSpec) -> Transformer:
    _unsupported(spec.config)
    dev, dt = _device_dtype(spec.config)
    return Transformer(ZImageTransformer(spec.model_path, dev, dt, _options(spec.config)))


def build_decoder(spec: StageSpec) -> Decoder:
    dev, dt = _device_dtype(spec.config)
    return Decoder(ZImageDecoder(spec.model_path, dev, dt, _options(spec.config)))


def build_all(spec: StageSpec):
    _unsupported(spec.config)
    _check_sampling(spec.config.sampling)
    fam = spec.config.family
    if fam is not None:
        checks = {k: v for k, v in (("in_channels", fam.num_channels_latents), ("patch_size", fam.patch_size))
                  if v is not None}
        check_config(checks, ckpt.read_dit_config(spec.model_path))
    return build_encoder(spec), build_transformer(spec), build_decoder(spec)


def _tiny_model(task: str, model_cls: str) -> Path:
    from lightx2v.models.z_image.tiny import ensure_tiny_model

    return ensure_tiny_model()


def _tiny_defaults(task: str, model_cls: str) -> dict:
    from lightx2v.models.z_image.tiny import TINY_DEFAULTS

    return dict(TINY_DEFAULTS)


FAMILY = register_family(ModelFamily(
    name="z_image",
    model_classes={"z_image": {"t2i": DEFAULTS}},
    build_encoder=build_encoder,
    build_transformer=build_transformer,
    build_decoder=build_decoder,
    build_all=build_all,
    config_section=ZImageConfig,
    tiny_model=_tiny_model,
    tiny_defaults=_tiny_defaults,
    output="image",
))
