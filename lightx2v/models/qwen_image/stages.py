"""Qwen-Image as three stages: encode (text encoder, VAE encoder) -> denoise (MMDiT + scheduler) -> decode (VAE).

Each stage is built from ``(model_path, device, dtype, options)`` and loads only its own weights; the messages
between them hold only tensors and plain values:

    QwenImageEncoder.encode(request) -> QwenImageEncoded
    QwenImageTransformer.denoise(encoded, request, on_step=None) -> latents [1, 16, H/8, W/8] float32 (normalised)
    QwenImageDecoder.decode(latents, encoded) -> frames [1, H, W, 3] float32 in [0, 1] on the CPU

Tasks (``request.task``): ``t2i`` (diffusers' ``QwenImagePipeline``) and ``i2i`` (``QwenImageEditPipeline`` with
one image, ``QwenImageEditPlusPipeline`` with one or more; which one is the checkpoint's ``model_index.json``).
Everything follows the reference pipelines (diffusers 0.42.1) for the same request and seed:

* size: ``height``/``width`` (multiples of 16), else ``aspect_ratio`` (LightX2V's names, the release's sizes:
  ``arch.ASPECT_RATIOS``), else for t2i the default aspect ratio 16:9 (1664x928) and for i2i the last image's
  aspect ratio at ``resolution``**2 pixels (1024**2: the pipelines' default), sides rounded to 32 then down to 16;
* edit images: each one resized (Lanczos) to ``vae_image_size`` pixels at its own aspect ratio (sides multiples of
  32) for the VAE, and to ``condition_image_size`` pixels for the vision encoder (Edit: the same 1024**2; Edit-2509 /
  2511: 384**2); their latents follow the noise in the DiT's token sequence, and only the generated image's tokens
  are denoised;
* the initial noise is ``torch.randn`` of [1, 1, 16, H/8, W/8] in float32 from a CPU generator seeded with
  ``seed`` (what the reference draws with ``generator=torch.Generator().manual_seed(seed)``), packed into 2x2 patch
  tokens;
* true CFG (``guidance_scale`` > 1 and ``enable_cfg``): ``pred = neg + s * (cond - neg)``, rescaled per token to
  the norm of ``cond`` (the reference's norm rescaling); the negative prompt is encoded with the same images.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lightx2v.errors import UserError
from lightx2v.models.qwen_image.arch import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO, PACK
from lightx2v.models.qwen_image.checkpoint import (VAE_DIR, load_dit, model_root, read_dit_config,
                                                   read_scheduler_config, resolve_variant)
from lightx2v.models.qwen_image.scheduler import QwenImageScheduler, check_sample_shift
from lightx2v.models.qwen_image.text_encoder import PromptFormat, load_text_encoder
from lightx2v.models.qwen_image.vae import read_vae_config

TASKS = ("t2i", "i2i")
SIZE_MULTIPLE = 16  # 8x VAE, then 2x2 packing
DEFAULT_VAE_IMAGE_SIZE = 1024 * 1024  # pixels of the edit images the VAE encodes (the pipelines' VAE_IMAGE_SIZE)
EDIT_PLUS_CONDITION_IMAGE_SIZE = 384 * 384  # pixels of the images the vision encoder sees (Edit-2509 / 2511)
DEFAULT_RESOLUTION = 1024  # i2i without a size: the output has ~resolution**2 pixels


# --- request and options --------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class QwenImageRequest:
    """One generation. Names follow LightX2V's API (``guidance_scale`` is Qwen's true-CFG scale,
    LightX2V's ``sample_guide_scale``; ``images``: paths, PIL images or tensors, LightX2V's comma-separated
    ``image_path``)."""

    prompt: str
    negative_prompt: str = " "
    seed: int = 42
    task: str = "t2i"
    height: int | None = None
    width: int | None = None
    aspect_ratio: str | None = None
    infer_steps: int = 50
    guidance_scale: float = 4.0
    enable_cfg: bool = True
    sample_shift: float | None = None
    images: tuple = ()
    # LightX2V's ``aspect_ratios``: {name: [width, height]} on top of (and overriding) ``arch.ASPECT_RATIOS``
    aspect_ratios: Mapping[str, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"task={self.task!r} is not a Qwen-Image task; allowed: {', '.join(TASKS)}")
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not _is_int(self.seed):
            raise UserError(f"seed={self.seed!r} must be an integer")
        if (self.height is None) != (self.width is None):
            raise UserError(f"give both height and width or neither, got height={self.height!r}, "
                            f"width={self.width!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE):
                raise UserError(f"{name}={v!r} must be a positive multiple of {SIZE_MULTIPLE}")
        if self.aspect_ratios is not None:
            object.__setattr__(self, "aspect_ratios", check_aspect_ratios(self.aspect_ratios))
        if self.aspect_ratio is not None and self.aspect_ratio not in self.ratio_table():
            raise UserError(f"aspect_ratio={self.aspect_ratio!r} is not known; allowed: "
                            f"{', '.join(self.ratio_table())}")
        if not _is_int(self.infer_steps) or self.infer_steps < 1:
            raise UserError(f"infer_steps={self.infer_steps!r} must be an integer >= 1")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not math.isfinite(g) or g < 0:
            raise UserError(f"guidance_scale={g!r} must be a number >= 0 (true CFG is on above 1)")
        if not isinstance(self.enable_cfg, bool):
            raise UserError(f"enable_cfg={self.enable_cfg!r} must be true or false")
        check_sample_shift(self.sample_shift)
        images = self.images
        if images is None:
            images = ()
        elif isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = (images,)
        object.__setattr__(self, "images", tuple(images))
        if self.task == "i2i" and not self.images:
            raise UserError("task i2i (image editing) needs at least one image (image_path)")
        if self.task == "t2i" and self.images:
            raise UserError(f"task t2i takes no images, got {len(self.images)}; use task i2i to edit an image")

    @property
    def do_cfg(self) -> bool:
        return self.enable_cfg and self.guidance_scale > 1.0

    def ratio_table(self) -> dict[str, tuple[int, int]]:
        """aspect-ratio name -> (width, height): the release's table with this request's ``aspect_ratios`` on top."""
        return {**ASPECT_RATIOS, **(self.aspect_ratios or {})}


def check_aspect_ratios(table) -> dict[str, tuple[int, int]]:
    """Validate LightX2V's ``aspect_ratios`` ({name: [width, height]}, sides multiples of 16) -> a plain dict."""
    if not isinstance(table, Mapping):
        raise UserError(f"aspect_ratios must map names to [width, height], got {table!r}")
    out = {}
    for name, wh in table.items():
        ok = isinstance(wh, (list, tuple)) and len(wh) == 2 and all(
            _is_int(v) and v >= SIZE_MULTIPLE and v % SIZE_MULTIPLE == 0 for v in wh)
        if not isinstance(name, str) or not ok:
            raise UserError(f"aspect_ratios[{name!r}] must be [width, height], multiples of {SIZE_MULTIPLE}, got "
                            f"{wh!r}")
        out[name] = (int(wh[0]), int(wh[1]))
    return out


@dataclass(frozen=True)
class QwenImageOptions:
    """Per-load settings of the three stages (LightX2V's config keys in brackets where they differ).

    * ``attn_mode`` [``attn_type``]: the DiT's attention backend (lightx2v.ops.attention);
    * ``prompt_template_encode``, ``prompt_template_encode_start_idx``: override the variant's chat template and
      the number of its tokens dropped; ``use_image_id_in_prompt`` [``USE_IMAGE_ID_IN_PROMPT``]: ``Picture i:``
      before each image (default: on for Edit-2509/2511, off for Edit);
    * ``condition_image_size`` [``CONDITION_IMAGE_SIZE``]: pixels of the images the vision encoder sees (default:
      1024**2 for Edit, 384**2 for Edit-2509/2511); ``vae_image_size``: pixels of the images the VAE encodes;
      ``resolution``: i2i output of ~resolution**2 pixels when no size is asked for; ``resize_mode``: "adaptive"
      (the images keep their aspect ratio; the only mode);
    * ``vae_type`` ("baseline" | "tensorrt") and ``trt_vae_config`` ({trt_engine_path, multi_profile}): the VAE
      (``trt.py``; falls back to PyTorch with one log line);
    * ``dit_original_ckpt``: one safetensors file with the DiT's tensors (release names);
    * ``variant``: "t2i" | "edit" | "edit_plus" instead of model_index.json's.
    """

    attn_mode: str = "torch_sdpa"
    prompt_template_encode: str | None = None
    prompt_template_encode_start_idx: int | None = None
    use_image_id_in_prompt: bool | None = None
    condition_image_size: int | None = None
    vae_image_size: int = DEFAULT_VAE_IMAGE_SIZE
    resolution: int = DEFAULT_RESOLUTION
    resize_mode: str = "adaptive"
    vae_type: str = "baseline"
    trt_vae_config: dict = field(default_factory=dict)
    dit_original_ckpt: str | None = None
    variant: str | None = None

    def __post_init__(self) -> None:
        for name in ("condition_image_size", "vae_image_size", "resolution"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < SIZE_MULTIPLE):
                raise UserError(f"{name}={v!r} must be an integer >= {SIZE_MULTIPLE}")
        if self.resize_mode != "adaptive":
            raise UserError(f"resize_mode={self.resize_mode!r}: Qwen-Image resizes edit images keeping their aspect "
                            "ratio ('adaptive', the only mode)")
        if self.vae_type not in ("baseline", "tensorrt"):
            raise UserError(f"vae_type={self.vae_type!r}: allowed 'baseline' (PyTorch) or 'tensorrt'")
        if not isinstance(self.trt_vae_config, dict):
            raise UserError(f"trt_vae_config must be an object {{trt_engine_path, multi_profile}}, got "
                            f"{self.trt_vae_config!r}")
        unknown = sorted(set(self.trt_vae_config) - {"trt_engine_path", "multi_profile"})
        if unknown:
            raise UserError(f"unknown trt_vae_config keys {unknown}; allowed: trt_engine_path, multi_profile")

    def prompt_format(self, variant: str, task: str) -> PromptFormat:
        fmt = PromptFormat.for_variant(variant, task)
        kw: dict[str, Any] = {}
        if self.prompt_template_encode is not None:
            kw["template"] = self.prompt_template_encode
        if self.prompt_template_encode_start_idx is not None:
            kw["drop_idx"] = self.prompt_template_encode_start_idx
        if self.use_image_id_in_prompt is not None and task == "i2i":
            kw["image_ids"] = self.use_image_id_in_prompt
        return PromptFormat(**{**{f.name: getattr(fmt, f.name) for f in fields(fmt)}, **kw})

    def condition_area(self, variant: str) -> int:
        if self.condition_image_size is not None:
            return self.condition_image_size
        return self.vae_image_size if variant == "edit" else EDIT_PLUS_CONDITION_IMAGE_SIZE


# LightX2V config keys this family implements: -> QwenImageOptions field / QwenImageRequest field
LIGHTX2V_OPTION_KEYS = {"attn_type": "attn_mode", "attn_mode": "attn_mode", "USE_IMAGE_ID_IN_PROMPT":
                        "use_image_id_in_prompt", "CONDITION_IMAGE_SIZE": "condition_image_size",
                        "prompt_template_encode": "prompt_template_encode",
                        "prompt_template_encode_start_idx": "prompt_template_encode_start_idx",
                        "resize_mode": "resize_mode", "resolution": "resolution", "vae_type": "vae_type",
                        "trt_vae_config": "trt_vae_config", "dit_original_ckpt": "dit_original_ckpt"}
LIGHTX2V_REQUEST_KEYS = {"infer_steps": "infer_steps", "aspect_ratio": "aspect_ratio", "enable_cfg": "enable_cfg",
                         "sample_guide_scale": "guidance_scale", "guidance_scale": "guidance_scale",
                         "sample_shift": "sample_shift", "target_height": "height", "target_width": "width",
                         "seed": "seed"}


def from_lightx2v_config(config: dict) -> tuple[QwenImageOptions, dict]:
    """Split a LightX2V Qwen-Image config dict into (options, request fields); UserError naming unknown keys."""
    unknown = sorted(set(config) - set(LIGHTX2V_OPTION_KEYS) - set(LIGHTX2V_REQUEST_KEYS))
    if unknown:
        raise UserError(f"config keys not implemented for qwen_image: {', '.join(unknown)}")
    options = {LIGHTX2V_OPTION_KEYS[k]: v for k, v in config.items() if k in LIGHTX2V_OPTION_KEYS}
    request = {LIGHTX2V_REQUEST_KEYS[k]: v for k, v in config.items() if k in LIGHTX2V_REQUEST_KEYS}
    return QwenImageOptions(**options), request


# --- sizes and image preprocessing ----------------------------------------------------------------------------


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) with ``area`` pixels at aspect ``ratio`` = w / h, each rounded to a multiple of 32 (Python's
    round, as the pipelines)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def output_size(request: QwenImageRequest, images: Sequence, resolution: int = DEFAULT_RESOLUTION
                ) -> tuple[int, int]:
    """(height, width) of the generated image."""
    if request.height is not None:
        return request.height, request.width
    if request.aspect_ratio is not None or not images:
        w, h = request.ratio_table()[request.aspect_ratio or DEFAULT_ASPECT_RATIO]
        return h, w
    iw, ih = images[-1].size
    w, h = calculate_dimensions(resolution * resolution, iw / ih)
    h, w = h // SIZE_MULTIPLE * SIZE_MULTIPLE, w // SIZE_MULTIPLE * SIZE_MULTIPLE
    if h < SIZE_MULTIPLE or w < SIZE_MULTIPLE:
        raise UserError(f"image of {iw}x{ih} has too extreme an aspect ratio")
    return h, w


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)*(w/2), 4C]: 2x2 patches as tokens, channel-major within a token."""
    b, c, h, w = z.shape
    return z.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (h/2)*(w/2), 4C] -> [B, C, h, w]."""
    b, _, ch = x.shape
    c = ch // (PACK * PACK)
    return x.view(b, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def edit_images(sources: Sequence, condition_area: int, vae_area: int):
    """The edit pipelines' preprocessing of each image: (condition PIL image, VAE tensor [1, 3, H, W] in [-1, 1],
    (vae height, vae width)), the two resized (Lanczos) from the original to their areas at its aspect ratio."""
    from PIL import Image

    from lightx2v.io.image import load_image, to_model_tensor

    out = []
    for i, src in enumerate(sources):
        img = load_image(src, what=f"image {i + 1}")
        ratio = img.width / img.height
        cw, ch = calculate_dimensions(condition_area, ratio)
        vw, vh = calculate_dimensions(vae_area, ratio)
        if min(cw, ch, vw, vh) < 32:
            raise UserError(f"image {i + 1} of {img.width}x{img.height} has too extreme an aspect ratio")
        cond = img if img.size == (cw, ch) else img.resize((cw, ch), resample=Image.LANCZOS)
        out.append((img, cond, to_model_tensor(img, vh, vw), (vh, vw)))
    return out


# --- the stage messages ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenImageEncoded:
    """What the encoder stage hands to the transformer stage (tensors and plain values only).

    prompt_embeds / negative_prompt_embeds: [1, L, D] (the negative None without CFG); image_latents: [1, N_c, 64]
    packed normalised latents of all condition images (i2i), else None; image_shapes: (1, h/2, w/2) token grids of
    the generated image then of each condition image; height/width: the output size in pixels; latent_shape:
    (1, 16, H/8, W/8) of the latents being denoised.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    image_latents: torch.Tensor | None
    image_shapes: tuple[tuple[int, int, int], ...]
    height: int
    width: int
    latent_shape: tuple[int, int, int, int]


# --- the three stages -----------------------------------------------------------------------------------------


def _options(options) -> QwenImageOptions:
    if options is None:
        return QwenImageOptions()
    if isinstance(options, dict):
        return QwenImageOptions(**options)
    return options


class QwenImageEncoder:
    """Text encoder (Qwen2.5-VL; its vision tower and the VAE encoder for edits): request -> QwenImageEncoded."""

    def __init__(self, model_path, device="cpu", dtype: torch.dtype = torch.float32, options=None) -> None:
        self.root = model_root(model_path)
        self.options = _options(options)
        self.variant = resolve_variant(self.root, self.options.variant)
        self.device, self.dtype = torch.device(device), dtype
        self.vae_config = read_vae_config(self.root / VAE_DIR)
        edit = self.variant != "t2i"
        self.text_encoder = load_text_encoder(self.root, with_images=edit, device=device, dtype=dtype)
        self.vae = None
        if edit:
            from lightx2v.models.qwen_image.trt import make_vae

            self.vae = make_vae(self.root, "encoder", device=device, dtype=dtype, options=self.options)

    def encode(self, request: QwenImageRequest,
               stage: Callable[[str], contextlib.AbstractContextManager] | None = None) -> QwenImageEncoded:
        """``stage(name)``: a context manager wrapped around the "text encode" and "VAE encode" work (timings)."""
        stage = stage or (lambda name: contextlib.nullcontext())
        opts = self.options
        if request.task == "i2i" and self.vae is None:
            raise UserError(f"task i2i needs an edit checkpoint (Qwen-Image-Edit*), but {self.root} is a "
                            "text-to-image one (model_index.json: QwenImagePipeline)")
        if request.task == "i2i" and self.variant == "edit" and len(request.images) != 1:
            raise UserError(f"Qwen-Image-Edit takes one image, got {len(request.images)}; several images need "
                            "Qwen-Image-Edit-2509 or -2511")
        fmt = opts.prompt_format(self.variant, request.task)
        prepared = edit_images(request.images, opts.condition_area(self.variant), opts.vae_image_size) \
            if request.task == "i2i" else []
        height, width = output_size(request, [p[0] for p in prepared], opts.resolution)
        cond_images = [p[1] for p in prepared]

        with stage("text encode"):
            prompt_embeds = self.text_encoder.encode(request.prompt, fmt, cond_images)
            negative = self.text_encoder.encode(request.negative_prompt, fmt, cond_images) if request.do_cfg \
                else None

        sf = self.vae_config.spatial_factor * PACK
        shapes = [(1, height // sf, width // sf)]
        latents = []
        if prepared:
            with stage("VAE encode"):
                for _, _, tensor, (vh, vw) in prepared:
                    z = self.vae.encode(tensor.to(self.device))  # [1, 16, vh/8, vw/8] normalised
                    latents.append(pack_latents(z.float()))
                    shapes.append((1, vh // sf, vw // sf))
        image_latents = torch.cat(latents, dim=1) if latents else None
        z_dim, s = self.vae_config.z_dim, self.vae_config.spatial_factor
        return QwenImageEncoded(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative,
                                image_latents=image_latents, image_shapes=tuple(shapes), height=height, width=width,
                                latent_shape=(1, z_dim, height // s, width // s))


class QwenImageTransformer:
    """The MMDiT and the scheduler: QwenImageEncoded -> denoised latents."""

    def __init__(self, model_path, device="cpu", dtype: torch.dtype = torch.float32, options=None, *,
                 quant_scheme: str | None = None, load_device=None, dit=None) -> None:
        """``quant_scheme``: "fp8" / "int8" block linears (see ``checkpoint.load_dit``); ``load_device``: where the
        DiT's weights are put (default ``device``; the CPU when an offload hook streams them to ``device``);
        ``dit``: an already built DiT (then neither of the two is used)."""
        from lightx2v.ops.attention import get_attention_backend

        self.root = model_root(model_path)
        self.options = _options(options)
        self.device, self.dtype = torch.device(device), dtype
        if dit is None:
            cfg = read_dit_config(self.root)
            attn = get_attention_backend(self.options.attn_mode, dtype=dtype, head_dim=cfg.head_dim,
                                         device=self.device)
            dit = load_dit(self.root, attn=attn, device=load_device or device, dtype=dtype,
                           weights_file=self.options.dit_original_ckpt, quant_scheme=quant_scheme,
                           copy_mapped=self.device.type == "cpu")
        self.dit = dit
        self.scheduler_config = read_scheduler_config(self.root)

    def initial_noise(self, latent_shape, seed: int) -> torch.Tensor:
        """[1, N, 64] packed float32 noise, drawn on the CPU as the reference draws it ([1, 1, C, h, w])."""
        _, c, h, w = latent_shape
        g = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, 1, c, h, w), generator=g, dtype=torch.float32)
        return pack_latents(noise[:, 0]).to(self.device)

    @torch.no_grad()
    def denoise(self, encoded: QwenImageEncoded, request: QwenImageRequest,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """-> normalised latents [1, 16, H/8, W/8] float32 on the stage's device."""
        dit, dev = self.dit, self.device
        cfg_on = request.do_cfg
        if cfg_on and encoded.negative_prompt_embeds is None:
            raise UserError("this request asks for CFG but was encoded without a negative prompt")
        latents = self.initial_noise(encoded.latent_shape, request.seed)
        n = latents.shape[1]
        cond = encoded.image_latents.to(dev) if encoded.image_latents is not None else None
        shapes = list(encoded.image_shapes)
        emb = encoded.prompt_embeds.to(dev)
        rope = dit.rope(shapes, emb.shape[1])
        if cfg_on:
            neg = encoded.negative_prompt_embeds.to(dev)
            rope_neg = dit.rope(shapes, neg.shape[1])

        sched = QwenImageScheduler(self.scheduler_config)
        sched.set_timesteps(request.infer_steps, image_seq_len=n, sample_shift=request.sample_shift)
        steps = sched.num_inference_steps
        for i, t in enumerate(sched.timesteps.tolist()):
            x = latents if cond is None else torch.cat([latents, cond], dim=1)
            timestep = (torch.tensor([t], dtype=torch.float32) / 1000).to(dev)  # the reference's t / 1000
            pred = dit(x, emb, timestep, shapes, rope)[:, :n].float()
            if cfg_on:
                pred_neg = dit(x, neg, timestep, shapes, rope_neg)[:, :n].float()
                comb = pred_neg + request.guidance_scale * (pred - pred_neg)
                pred = comb * (torch.norm(pred, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            latents = sched.step(pred, latents)
            if on_step is not None:
                on_step(i, steps)
        _, _, h, w = encoded.latent_shape
        return unpack_latents(latents, h, w)


class QwenImageDecoder:
    """The VAE decoder: latents -> frames [1, H, W, 3] float32 in [0, 1] on the CPU."""

    def __init__(self, model_path, device="cpu", dtype: torch.dtype = torch.float32, options=None) -> None:
        from lightx2v.models.qwen_image.trt import make_vae

        self.root = model_root(model_path)
        self.options = _options(options)
        self.device, self.dtype = torch.device(device), dtype
        self.vae = make_vae(self.root, "decoder", device=device, dtype=dtype, options=self.options)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, encoded_meta: QwenImageEncoded | None = None) -> torch.Tensor:
        if encoded_meta is not None and tuple(latents.shape) != tuple(encoded_meta.latent_shape):
            raise UserError(f"latents {list(latents.shape)} do not match the request's latent shape "
                            f"{list(encoded_meta.latent_shape)}")
        images = self.vae.decode(latents.to(self.device))  # [1, 3, H, W] in [-1, 1]
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def generate(model_path, request: QwenImageRequest, device="cpu", dtype: torch.dtype = torch.float32,
             options=None, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The three stages chained in one process: -> frames [1, H, W, 3] float32 in [0, 1]."""
    encoded = QwenImageEncoder(model_path, device, dtype, options).encode(request)
    latents = QwenImageTransformer(model_path, device, dtype, options).denoise(encoded, request, on_step)
    return QwenImageDecoder(model_path, device, dtype, options).decode(latents, encoded)
