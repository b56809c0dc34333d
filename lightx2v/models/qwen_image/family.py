"""The Qwen-Image family registered with the engine: model class ``qwen_image`` (and LightX2V's aliases
``qwen-image``, ``qwen-image-2512``, ``qwen-image-edit``, ``qwen-image-edit-2509``, ``qwen-image-edit-2511``), tasks
``t2i`` (text-to-image) and ``i2i`` (editing: one image for Qwen-Image-Edit, one or more for Edit-2509 / 2511), its
three stages behind the engine's stage protocol and messages.

The request's generic sampling settings map onto Qwen-Image's (:class:`~lightx2v.models.qwen_image.stages.
QwenImageRequest`):

* size: ``height``/``width`` (multiples of 16; LightX2V's ``target_shape``), or ``aspect_ratio``: a name of
  LightX2V's table (``arch.ASPECT_RATIOS``, the release's sizes; the config's ``aspect_ratios`` on top), or
  ``"auto"``: the task's default size (t2i: 16:9; i2i: the last edit image's aspect ratio at ``resolution``**2
  pixels, what the reference pipelines do without a size; the i2i default);
* ``infer_steps``; ``guidance_scale``: the true-CFG scale (``sample_guide_scale``; CFG runs above 1, with the
  reference's norm rescaling); ``enable_cfg`` false turns it off; ``sample_shift``: "auto" (the default) is the
  release's resolution-dependent shift, a number a fixed shift; ``seed``; ``negative_prompt`` as given (diffusers:
  "" is a negative prompt too);
* images: ``image_path`` (LightX2V's comma-separated paths for several images, or a list of paths / PIL images /
  tensors) -> ``GenerationRequest.images`` (:func:`read_images`).

Settings that do not apply (frames, step lists, two-expert boundaries, changing resolution, other solvers or resize
modes) are one-line :class:`UserError`s, and so are load-time features not implemented for this family
(:func:`_unsupported`). Implemented on the DiT through its hook plan: ``dit_quant_scheme`` (fp8 / int8 block
linears, quantized as they load or pre-quantized), ``cpu_offload`` (``offload_granularity`` model / block / phase),
``lora_configs`` (merge or dynamic, switchable per request; the release's parameter names, kohya / diffusers / PEFT
/ ComfyUI spellings of them).
"""

from __future__ import annotations

import contextlib
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
from lightx2v.models.qwen_image import checkpoint as ckpt
from lightx2v.models.qwen_image.scheduler import QwenImageScheduler
from lightx2v.models.qwen_image.stages import (TASKS, QwenImageDecoder, QwenImageEncoded, QwenImageEncoder,
                                               QwenImageOptions, QwenImageRequest, QwenImageTransformer,
                                               check_aspect_ratios)
from lightx2v.models.qwen_image.text_encoder import EDIT_DROP_IDX, EDIT_TEMPLATE, T2I_DROP_IDX, T2I_TEMPLATE

AUTO = "auto"  # aspect_ratio "auto": the task's default size (i2i: from the last edit image)

# LightX2V's shipped Qwen-Image configs: Qwen-Image-2512 t2i (50 steps, 16:9, true CFG 4), Edit-2511 i2i (40 steps,
# true CFG 4, the size from the image).
_COMMON = {"guidance_scale": 4.0, "enable_cfg": True, "sample_shift": AUTO, "num_frames": 1, "fps": 1,
           "resize_mode": "adaptive"}
TASK_DEFAULTS = {"t2i": {**_COMMON, "infer_steps": 50, "aspect_ratio": "16:9"},
                 "i2i": {**_COMMON, "infer_steps": 40, "aspect_ratio": AUTO}}
# LightX2V's model_cls aliases (its pipeline.py maps them to qwen_image) and what each sets: the vision tower's image
# area and "Picture i:" for edits, the prompt template of the task.
_ALIASES = {"qwen-image": (384 * 384, True), "qwen-image-2512": (384 * 384, True),
            "qwen-image-edit": (1024 * 1024, False), "qwen-image-edit-2509": (384 * 384, True),
            "qwen-image-edit-2511": (384 * 384, True)}
_TEMPLATES = {"t2i": (T2I_TEMPLATE, T2I_DROP_IDX), "i2i": (EDIT_TEMPLATE, EDIT_DROP_IDX)}


def _alias_defaults(condition_size: int, image_ids: bool) -> dict:
    return {task: {**TASK_DEFAULTS[task], "CONDITION_IMAGE_SIZE": condition_size, "USE_IMAGE_ID_IN_PROMPT": image_ids,
                   "prompt_template_encode": _TEMPLATES[task][0],
                   "prompt_template_encode_start_idx": _TEMPLATES[task][1]} for task in TASKS}


MODEL_CLASSES = {"qwen_image": TASK_DEFAULTS, **{name: _alias_defaults(*v) for name, v in _ALIASES.items()}}


@dataclass(frozen=True)
class QwenImageConfig:
    """Qwen-Image's own config keys (LightX2V's names); None: the checkpoint variant's value (``QwenImageOptions``).

    ``prompt_template_encode`` / ``prompt_template_encode_start_idx``: the chat template (one ``{}``) and the number
    of its tokens dropped; ``USE_IMAGE_ID_IN_PROMPT``: ``Picture i:`` before each edit image; ``CONDITION_IMAGE_SIZE``
    / ``vae_image_size``: pixels of the edit images for the vision tower / the VAE; ``resolution``: i2i output of
    ~resolution**2 pixels when no size is asked; ``vae_type`` "baseline" | "tensorrt" with ``trt_vae_config``
    {trt_engine_path, multi_profile} (PyTorch fallback, one log line); ``aspect_ratios``: {name: [width, height]}
    on top of the release's table.
    """

    prompt_template_encode: str | None = None
    prompt_template_encode_start_idx: int | None = None
    USE_IMAGE_ID_IN_PROMPT: bool | None = None
    CONDITION_IMAGE_SIZE: int | None = None
    vae_image_size: int | None = None
    resolution: int | None = None
    vae_type: str = "baseline"
    trt_vae_config: dict | None = None
    aspect_ratios: dict | None = None

    def __post_init__(self):
        if self.aspect_ratios is not None:
            object.__setattr__(self, "aspect_ratios", check_aspect_ratios(self.aspect_ratios))
        opts = self.options()  # validates the values
        for variant, task in (("t2i", "t2i"), ("edit_plus", "i2i")):
            opts.prompt_format(variant, task)

    def options(self, attn_mode: str = "torch_sdpa", dit_original_ckpt: str | None = None) -> QwenImageOptions:
        given = {"prompt_template_encode": self.prompt_template_encode,
                 "prompt_template_encode_start_idx": self.prompt_template_encode_start_idx,
                 "use_image_id_in_prompt": self.USE_IMAGE_ID_IN_PROMPT,
                 "condition_image_size": self.CONDITION_IMAGE_SIZE, "vae_image_size": self.vae_image_size,
                 "resolution": self.resolution, "trt_vae_config": self.trt_vae_config}
        return QwenImageOptions(attn_mode=attn_mode, vae_type=self.vae_type, dit_original_ckpt=dit_original_ckpt,
                                **{k: v for k, v in given.items() if v is not None})


def _family_config(cfg) -> QwenImageConfig:
    fam = cfg.family
    return fam if isinstance(fam, QwenImageConfig) else QwenImageConfig()


def _options(cfg) -> QwenImageOptions:
    return _family_config(cfg).options(cfg.attention.self_attn_1_type, cfg.checkpoint.dit_original_ckpt)


def _device_dtype(cfg) -> tuple[torch.device, torch.dtype]:
    return resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)


# --- requests ------------------------------------------------------------------------------------------------------

def to_qwen_request(request: GenerationRequest, aspect_ratios: dict | None) -> QwenImageRequest:
    """The generic request as Qwen-Image's (validated: task, images, aspect ratio, sizes, guidance)."""
    s = request.sampling
    g = s.guidance_scale
    if isinstance(g, tuple):
        raise UserError(f"guidance_scale={list(g)} is for two-expert models; Qwen-Image takes one number (its true "
                        "CFG scale)")
    sized = s.aspect_ratio is None
    return QwenImageRequest(prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
                            task=request.task, height=s.height if sized else None, width=s.width if sized else None,
                            aspect_ratio=None if sized or s.aspect_ratio == AUTO else s.aspect_ratio,
                            infer_steps=s.infer_steps, guidance_scale=g, enable_cfg=s.enable_cfg,
                            sample_shift=None if s.sample_shift == AUTO else s.sample_shift, images=request.images,
                            aspect_ratios=aspect_ratios)


def _denoise_request(request: GenerationRequest, encoded: QwenImageEncoded) -> QwenImageRequest:
    """What the denoiser reads of a request (seed, steps, guidance, shift) at the encoded size; the edit images are
    already in ``encoded`` (their latents), so this one carries none (task "t2i" for the validation)."""
    s = request.sampling
    return QwenImageRequest(prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
                            height=encoded.height, width=encoded.width, infer_steps=s.infer_steps,
                            guidance_scale=s.guidance_scale, enable_cfg=s.enable_cfg,
                            sample_shift=None if s.sample_shift == AUTO else s.sample_shift)


def check_sampling(s: SamplingConfig) -> None:
    """The generic settings Qwen-Image does not have: one-line errors."""
    if s.num_frames != 1:
        raise UserError(f"num_frames={s.num_frames}: Qwen-Image makes one image (num_frames 1)")
    for name, value in (("denoising_step_list", s.denoising_step_list), ("boundary", s.boundary),
                        ("boundary_step_index", s.boundary_step_index)):
        if value is not None:
            raise UserError(f"{name} is not a Qwen-Image setting")
    if s.changing_resolution:
        raise UserError("changing_resolution is not implemented for Qwen-Image")
    if s.solver not in ("unipc", "euler"):  # "unipc": the generic default, i.e. not asked for
        raise UserError(f"sample_solver={s.solver!r}: Qwen-Image samples with its flow-matching Euler scheduler")
    if s.resize_mode != "adaptive":
        raise UserError(f"resize_mode={s.resize_mode!r}: Qwen-Image resizes edit images keeping their aspect ratio "
                        "('adaptive', the only mode)")
    if isinstance(s.guidance_scale, tuple):
        raise UserError(f"guidance_scale={list(s.guidance_scale)} is for two-expert models; Qwen-Image takes one "
                        "number (its true CFG scale)")


def check_aspect_ratio(s: SamplingConfig, aspect_ratios: dict | None) -> None:
    if s.aspect_ratio is not None and s.aspect_ratio != AUTO:
        table = QwenImageRequest(prompt="", aspect_ratios=aspect_ratios).ratio_table()
        if s.aspect_ratio not in table:
            raise UserError(f"aspect_ratio={s.aspect_ratio!r} is not known; allowed: {', '.join(table)}, {AUTO} "
                            "(or height and width)")


def read_images(task: str, image_path, last_frame_path) -> list:
    """The images of a request (LightX2V's ``image_path``: one path, several separated by commas, or a list of
    paths / PIL images / tensors) -> RGB PIL images, read and checked before any model runs."""
    from lightx2v.io.image import load_image

    if task not in TASKS:
        raise UserError(f"task {task!r} is not a Qwen-Image task; allowed: {', '.join(TASKS)}")
    if last_frame_path is not None and last_frame_path != "":
        raise UserError("Qwen-Image takes no last_frame_path; pass the edit images as image_path (comma-separated "
                        "for several)")
    if image_path is None or image_path == "":
        if task == "i2i":
            raise UserError("task 'i2i' (image editing) needs image_path (comma-separated paths for several images)")
        return []
    if task == "t2i":
        raise UserError("task 't2i' takes no image_path; use task 'i2i' to edit an image")
    if isinstance(image_path, (str, Path)):
        sources = [p.strip() for p in str(image_path).split(",")]
        if any(not p for p in sources):
            raise UserError(f"image_path {str(image_path)!r} has an empty entry between its commas")
    elif isinstance(image_path, (list, tuple)):
        sources = list(image_path)
    else:
        sources = [image_path]
    if not sources:
        raise UserError("task 'i2i' (image editing) needs at least one image in image_path")
    return [load_image(src, "image_path" if len(sources) == 1 else f"image_path[{i}]")
            for i, src in enumerate(sources)]


# --- messages ------------------------------------------------------------------------------------------------------

message("qwen_image.features")(QwenImageEncoded)


@message("qwen_image.encoded")
@dataclass(frozen=True)
class QwenImageCond:
    """Encoder -> transformer: the request's plain values (size resolved) and the encoder's tensors."""

    request: dict
    encoded: Any  # QwenImageEncoded


@message("qwen_image.latents")
@dataclass(frozen=True)
class QwenImageLatents:
    """Transformer -> decoder: latents [1, 16, H/8, W/8] float32 (normalised) and the size metadata."""

    request: dict
    latents: torch.Tensor
    encoded: Any  # QwenImageEncoded without the embeddings


# --- the stages ------------------------------------------------------------------------------------------------------

class _Stage:
    def check_request(self, request: GenerationRequest) -> None:
        if request.task not in TASKS:
            raise UserError(f"task {request.task!r} is not a Qwen-Image task; allowed: {', '.join(TASKS)}")
        self.check_sampling(request.sampling)

    def check_sampling(self, s: SamplingConfig) -> None:
        check_sampling(s)


class Encoder(_Stage):
    """GenerationRequest -> QwenImageCond (Qwen2.5-VL, and the VAE encoder for edits)."""

    name = "encoder"

    def __init__(self, inner: QwenImageEncoder, aspect_ratios: dict | None):
        self.inner, self.aspect_ratios, self.device = inner, aspect_ratios, inner.device
        self.text_encoder, self.vae = inner.text_encoder, inner.vae

    def check_sampling(self, s: SamplingConfig) -> None:
        super().check_sampling(s)
        check_aspect_ratio(s, self.aspect_ratios)

    def check_request(self, request: GenerationRequest) -> None:
        super().check_request(request)
        qreq = to_qwen_request(request, self.aspect_ratios)
        variant = self.inner.variant
        if qreq.task == "i2i" and variant == "t2i":
            raise UserError(f"task i2i needs an edit checkpoint (Qwen-Image-Edit*), but {self.inner.root} is a "
                            "text-to-image one (model_index.json: QwenImagePipeline)")
        if qreq.task == "i2i" and variant == "edit" and len(qreq.images) != 1:
            raise UserError(f"Qwen-Image-Edit takes one image, got {len(qreq.images)}; several images need "
                            "Qwen-Image-Edit-2509 or -2511")

    def __call__(self, request: GenerationRequest, ctx: RunContext) -> QwenImageCond:
        qreq = to_qwen_request(request, self.aspect_ratios)
        encoded = self.inner.encode(qreq, stage=ctx.stage)
        wire = replace(request, sampling=replace(request.sampling, height=encoded.height, width=encoded.width,
                                                 aspect_ratio=None)).to_wire()
        return QwenImageCond(wire, encoded)


class Transformer(_Stage):
    """QwenImageCond -> QwenImageLatents: the MMDiT's denoising loop (true CFG as two forwards per step), with the
    DiT's runtime features attached: LoRA (``lora``), weight offload (``offload``)."""

    name = "transformer"

    def __init__(self, inner: QwenImageTransformer, offload=None, lora=None):
        self.inner, self.device, self.dit = inner, inner.device, inner.dit
        self.offload, self.lora = offload, lora

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def check_sampling(self, s: SamplingConfig) -> None:
        super().check_sampling(s)
        # the scheduler's own checks (steps and shift against its config), before any model runs
        QwenImageScheduler(self.inner.scheduler_config).set_timesteps(
            s.infer_steps, image_seq_len=1024, sample_shift=None if s.sample_shift == AUTO else s.sample_shift)

    def check_request(self, request: GenerationRequest) -> None:
        super().check_request(request)
        if request.loras is not None:
            self._lora_config(request.loras)

    def _lora_config(self, loras):
        from lightx2v.hooks.lora import LoRAConfig

        if self.lora is None or self.lora.mode != "dynamic":
            raise UserError('a request can choose LoRAs only when the generator applied its LoRAs with lora_mode '
                            '"dynamic" (lora_configs in create_generator)')
        return LoRAConfig.from_lightx2v(list(loras), mode="dynamic", names=())

    def switch_lora(self, loras) -> None:
        """Replace the DiT's LoRAs (``lora_configs`` entries; [] takes them off) without reloading (dynamic mode)."""
        self.lora = self.lora.switch_lora(self._lora_config(loras))

    @torch.inference_mode()
    def __call__(self, cond: QwenImageCond, ctx: RunContext) -> QwenImageLatents:
        request = GenerationRequest.from_wire(cond.request)
        if request.loras is not None:
            self.switch_lora(request.loras)
        e = cond.encoded
        resident = self.offload.resident() if self.offload is not None else contextlib.nullcontext()
        with ctx.stage("denoise"), resident:
            latents = self.inner.denoise(e, _denoise_request(request, e),
                                         on_step=lambda i, n: ctx.step("denoise", i + 1, n))
        meta = replace(e, prompt_embeds=e.prompt_embeds[:, :0], negative_prompt_embeds=None, image_latents=None)
        return QwenImageLatents(cond.request, latents, meta)


class Decoder(_Stage):
    """QwenImageLatents -> Frames [1, H, W, 3] float32 in [0, 1] (the VAE decoder, PyTorch or TensorRT)."""

    name = "decoder"

    def __init__(self, inner: QwenImageDecoder):
        self.inner, self.device, self.vae = inner, inner.device, inner.vae

    def __call__(self, lat: QwenImageLatents, ctx: RunContext) -> Frames:
        with ctx.stage("VAE decode"):
            frames = self.inner.decode(lat.latents, lat.encoded)
        return Frames(frames, 1, lat.request)


# --- builders ----------------------------------------------------------------------------------------------------

def _unsupported(cfg) -> None:
    """Load-time features this family does not implement: an error naming them, never a silent drop."""
    rt, off = cfg.runtime, cfg.offload
    asked = [name for name, on in (
        ("feature_caching", cfg.cache.method != "NoCaching"), ("use_compile", rt.use_compile),
        ("lazy_load", off.lazy_load), ("t5_cpu_offload", rt.t5_cpu_offload), ("clip_cpu_offload", rt.clip_cpu_offload),
        ("vae_cpu_offload", rt.vae_cpu_offload), ("unload_modules", rt.unload_modules),
        ("use_tiling_vae", rt.use_tiling_vae), ("cfg_batch", rt.cfg_batch is True),
        ("video_frame_interpolation", cfg.vfi is not None)) if on]
    if asked:
        raise UserError(f"{', '.join(asked)}: not implemented for qwen_image")
    ck = cfg.checkpoint
    if ck.high_noise_original_ckpt or ck.low_noise_original_ckpt:
        raise UserError("high_noise_original_ckpt / low_noise_original_ckpt are for two-expert models; Qwen-Image "
                        "takes dit_original_ckpt")


def build_encoder(spec: StageSpec) -> Encoder:
    _unsupported(spec.config)
    dev, dt = _device_dtype(spec.config)
    return Encoder(QwenImageEncoder(spec.model_path, dev, dt, _options(spec.config)),
                   _family_config(spec.config).aspect_ratios)


def build_transformer(spec: StageSpec) -> Transformer:
    from lightx2v.ops.quant import resolve_scheme

    cfg = spec.config
    _unsupported(cfg)
    dev, dt = _device_dtype(cfg)
    off = cfg.offload
    inner = QwenImageTransformer(spec.model_path, dev, dt, _options(cfg),
                                 quant_scheme=resolve_scheme(cfg.checkpoint.dit_quant_scheme),
                                 load_device="cpu" if off.cpu_offload else dev)
    lora = None
    if cfg.lora.loras or cfg.lora.mode == "dynamic":  # dynamic: a handle even without LoRAs, to switch per request
        from lightx2v.hooks.lora import apply_lora

        lora = apply_lora(inner.dit, cfg.lora)
    offload = None
    if off.cpu_offload:  # after LoRA merging: offloaded weights are read-only
        from lightx2v.hooks.offload import apply_offload

        offload = apply_offload(inner.dit, off, dev)
        offload.offload()  # nothing of the DiT on the GPU until the denoising loop
    return Transformer(inner, offload, lora)


def build_decoder(spec: StageSpec) -> Decoder:
    _unsupported(spec.config)
    dev, dt = _device_dtype(spec.config)
    return Decoder(QwenImageDecoder(spec.model_path, dev, dt, _options(spec.config)))


def check_checkpoint(spec: StageSpec) -> None:
    """What the config files tell before any weight is read: the checkpoint is a Qwen-Image one that can do the
    task, and its components fit each other."""
    from lightx2v.models.qwen_image.text_encoder import PROCESSOR_DIR, TOKENIZER_DIR, read_text_hidden_size
    from lightx2v.models.qwen_image.vae import read_vae_config

    root = ckpt.model_root(spec.model_path)
    variant = ckpt.detect_variant(root)
    if spec.task == "i2i" and variant == "t2i":
        raise UserError(f"task i2i needs an edit checkpoint (Qwen-Image-Edit*), but {str(root)!r} is a "
                        "text-to-image one (model_index.json: QwenImagePipeline); use task t2i")
    dit = ckpt.read_dit_config(root)
    vae = read_vae_config(root / ckpt.VAE_DIR)
    if vae.z_dim != dit.out_channels:
        raise CheckpointError(f"the VAE's {vae.z_dim} latent channels do not fit the DiT's {dit.out_channels} output "
                              f"channels ({root})")
    if dit.in_channels != dit.out_channels * dit.patch_size ** 2:
        raise CheckpointError(f"the DiT's in_channels {dit.in_channels} are not its out_channels {dit.out_channels} "
                              f"x patch_size {dit.patch_size}**2 ({root})")
    width = read_text_hidden_size(root)
    if width != dit.joint_attention_dim:
        raise CheckpointError(f"the text encoder's width {width} does not match the DiT's joint_attention_dim "
                              f"{dit.joint_attention_dim} ({root})")
    ckpt.read_scheduler_config(root)
    tokenizer = PROCESSOR_DIR if variant != "t2i" else TOKENIZER_DIR
    if not (root / tokenizer).is_dir():
        raise CheckpointError(f"missing {tokenizer}/ in the Qwen-Image checkpoint folder {root}")
    if spec.config.checkpoint.dit_original_ckpt is None:
        from lightx2v.loading import safetensors_files

        safetensors_files(root / ckpt.TRANSFORMER_DIR, ckpt.DIT_WEIGHTS)


def build_all(spec: StageSpec):
    cfg = spec.config
    _unsupported(cfg)
    _device_dtype(cfg)
    check_sampling(cfg.sampling)
    check_aspect_ratio(cfg.sampling, _family_config(cfg).aspect_ratios)
    check_checkpoint(spec)
    return build_encoder(spec), build_transformer(spec), build_decoder(spec)


# --- tiny models, images, commands -----------------------------------------------------------------------------------

def _tiny_variant(task: str, model_cls: str) -> str:
    if task == "t2i":
        return "t2i"
    return "edit" if model_cls == "qwen-image-edit" else "edit_plus"


def _tiny_model(task: str, model_cls: str) -> Path:
    from lightx2v.models.qwen_image.tiny import ensure_tiny_model

    return ensure_tiny_model(_tiny_variant(task, model_cls))


def _tiny_defaults(task: str, model_cls: str) -> dict:
    from lightx2v.models.qwen_image.tiny import engine_defaults

    return engine_defaults(_tiny_variant(task, model_cls))


def _cli_commands(subparsers) -> None:
    from lightx2v.models.qwen_image.build_trt import add_build_trt_command

    add_build_trt_command(subparsers)


FAMILY = register_family(ModelFamily(
    name="qwen_image",
    model_classes=MODEL_CLASSES,
    build_encoder=build_encoder,
    build_transformer=build_transformer,
    build_decoder=build_decoder,
    build_all=build_all,
    config_section=QwenImageConfig,
    tiny_model=_tiny_model,
    tiny_defaults=_tiny_defaults,
    output="image",
    read_images=read_images,
    cli_commands=_cli_commands,
))

__all__ = ["FAMILY", "QwenImageConfig", "QwenImageCond", "QwenImageLatents", "build_all", "check_checkpoint",
           "read_images", "to_qwen_request"]
