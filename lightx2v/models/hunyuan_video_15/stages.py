"""HunyuanVideo-1.5 as three stages that load alone and exchange tensors and plain values.

    request -> HunyuanVideo15Encoder.encode -> HunyuanVideo15Encoded
            -> HunyuanVideo15Transformer.denoise -> latents [1, 32, T, h, w]
            -> HunyuanVideo15Decoder.decode -> frames [F, H, W, 3] float32 in [0, 1] (CPU)

What each stage does is what diffusers' ``HunyuanVideo15Pipeline`` (T2V) and ``HunyuanVideo15ImageToVideoPipeline``
(I2V) do for one prompt:

* size: an explicit height/width, else the bucket (``arch.closest_bucket``) of the DiT's ``target_size`` closest to
  ``aspect_ratio`` (T2V, LightX2V's key, default 16:9) or to the input image (I2V, which is then resized and
  centre-cropped to it);
* text: Qwen2.5-VL states of the prompt and ByT5 states of its quoted text; with CFG the same for the negative prompt;
* I2V: SigLIP states of the image, and its VAE latents as frame 0 of the condition channels (mask 1 there);
* noise: ``torch.randn`` of ``[1, 32, (F - 1) / 4 + 1, H / 16, W / 16]`` from a CPU generator seeded with ``seed``, in
  the DiT's dtype;
* sampling: Euler over ``linspace(1, 0, steps + 1)[:-1]`` shifted by ``sample_shift`` (or, for step-distilled models,
  the sigmas of ``denoising_step_list``; ``scheduler.py``), the DiT run once per branch per step, CFG as
  ``uncond + guidance_scale * (cond - uncond)``; CFG is on unless ``guidance_scale`` is 1 (diffusers' guider) or
  ``enable_cfg`` is false (LightX2V's key; CFG-distilled models);
* decode: latents / scaling_factor -> VAE decoder -> ``x * 0.5 + 0.5`` clamped to [0, 1].
"""

from __future__ import annotations

import contextlib
import math
import numbers
from os import PathLike
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lightx2v.errors import UserError
from lightx2v.models.hunyuan_video_15.arch import closest_bucket, parse_aspect_ratio
from lightx2v.models.hunyuan_video_15.checkpoint import (detect_layout, load_dit, load_glyph_encoder, load_image_encoder,
                                                         load_qwen_text_encoder, load_vae, read_dit_config,
                                                         read_vae_config, sampling_defaults)
from lightx2v.models.hunyuan_video_15.scheduler import FlowSigmaEuler, default_sigmas, distilled_sigmas

TASKS = ("t2v", "i2v")
DEFAULTS = {"num_frames": 121, "infer_steps": 50, "fps": 24, "aspect_ratio": "16:9"}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class HunyuanVideo15Request:
    """One generation. ``None`` means "the model's default": the bucket size for height/width, the checkpoint's
    guidance (6 for the base models, 1 for CFG-distilled ones) and shift, 50 steps (the length of
    ``denoising_step_list`` for step-distilled models), CFG unless guidance is 1."""

    prompt: str
    negative_prompt: str = ""
    task: str = "t2v"
    image: Any = None  # I2V: a path, a PIL image or a tensor ([3, H, W] / [H, W, 3])
    seed: int = 42
    height: int | None = None
    width: int | None = None
    aspect_ratio: str = DEFAULTS["aspect_ratio"]  # "W:H", T2V without height/width
    num_frames: int = DEFAULTS["num_frames"]
    infer_steps: int | None = None
    guidance_scale: float | None = None
    sample_shift: float | None = None
    enable_cfg: bool | None = None
    denoising_step_list: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise UserError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise UserError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if self.task not in TASKS:
            raise UserError(f"task={self.task!r} is not supported by hunyuan_video_1.5; allowed: {', '.join(TASKS)}")
        if self.task == "i2v" and self.image is None:
            raise UserError("task 'i2v' needs an image (image_path)")
        if self.task == "t2v" and self.image is not None:
            raise UserError("task 't2v' takes no image; use task 'i2v' to condition on one")
        if not _is_int(self.seed) or self.seed < 0:
            raise UserError(f"seed={self.seed!r} must be an integer >= 0")
        if (self.height is None) != (self.width is None):
            raise UserError("give both height and width, or neither (the size then follows aspect_ratio / the image)")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 16 or v % 16):
                raise UserError(f"{name}={v!r} must be a positive multiple of 16 (the VAE's 16x stride)")
        parse_aspect_ratio(self.aspect_ratio)
        if not _is_int(self.num_frames) or self.num_frames < 1 or (self.num_frames - 1) % 4:
            lo = (self.num_frames - 1) // 4 * 4 + 1 if _is_int(self.num_frames) and self.num_frames > 0 else 1
            raise UserError(f"num_frames={self.num_frames!r} must be of the form 4k+1 (e.g. {lo} or {lo + 4}; 121)")
        if self.denoising_step_list is not None:
            from lightx2v.schedulers.distill import check_step_list

            object.__setattr__(self, "denoising_step_list", check_step_list(list(self.denoising_step_list)))
            n = len(self.denoising_step_list)
            if self.infer_steps is not None and self.infer_steps != n:
                raise UserError(f"infer_steps={self.infer_steps} does not match denoising_step_list "
                                f"{list(self.denoising_step_list)} ({n} steps)")
        if self.infer_steps is not None and (not _is_int(self.infer_steps) or self.infer_steps < 1):
            raise UserError(f"infer_steps={self.infer_steps!r} must be an integer >= 1")
        if self.guidance_scale is not None and not _is_number(self.guidance_scale):
            raise UserError(f"guidance_scale={self.guidance_scale!r} must be a finite number")
        if self.sample_shift is not None and (not _is_number(self.sample_shift) or self.sample_shift <= 0):
            raise UserError(f"sample_shift={self.sample_shift!r} must be a number > 0")
        if self.enable_cfg is not None and not isinstance(self.enable_cfg, bool):
            raise UserError(f"enable_cfg={self.enable_cfg!r} must be true or false")
        if self.enable_cfg and self.guidance_scale is not None and self.guidance_scale < 0:
            raise UserError(f"guidance_scale={self.guidance_scale} must be >= 0 with CFG on")


@dataclass(frozen=True)
class HunyuanVideo15Options:
    """Per-load settings of the three stages (LightX2V's names where it has them)."""

    attn_mode: str = "torch_sdpa"  # lightx2v.ops.attention backend of the DiT
    transformer_model_name: str | None = None  # release layout: which transformer/<name>/ (e.g. "480p_t2v")
    dit_original_ckpt: str | None = None  # one safetensors file with the DiT weights (e.g. a step-distilled DiT)
    use_tiling_vae: bool = False  # VAE encode/decode in 256 px tiles (diffusers' enable_tiling)
    vae_tile_size: int = 256
    dit_quant_scheme: str | None = None  # "fp8" / "int8": the blocks' linears quantized at load (lightx2v.ops.quant)
    # components kept on the CPU between uses and moved to the device only while they run (LightX2V's keys)
    qwen25vl_cpu_offload: bool = False
    byt5_cpu_offload: bool = False
    siglip_cpu_offload: bool = False
    vae_cpu_offload: bool = False

    def __post_init__(self):
        if not isinstance(self.attn_mode, str):
            raise UserError(f"attn_mode={self.attn_mode!r} must be the name of an attention backend")
        if self.transformer_model_name is not None:
            from lightx2v.models.hunyuan_video_15.arch import parse_transformer_model_name

            parse_transformer_model_name(self.transformer_model_name)
        if self.dit_original_ckpt is not None and not isinstance(self.dit_original_ckpt, (str, PathLike)):
            raise UserError(f"dit_original_ckpt={self.dit_original_ckpt!r} must be a path to a .safetensors file")
        for name in ("use_tiling_vae", "qwen25vl_cpu_offload", "byt5_cpu_offload", "siglip_cpu_offload",
                     "vae_cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r} must be true or false")
        if not _is_int(self.vae_tile_size) or self.vae_tile_size < 32 or self.vae_tile_size % 16:
            raise UserError(f"vae_tile_size={self.vae_tile_size!r} must be a multiple of 16, at least 32")
        if self.dit_quant_scheme is not None:
            from lightx2v.ops.quant import resolve_scheme

            object.__setattr__(self, "dit_quant_scheme", resolve_scheme(self.dit_quant_scheme))


@dataclass(frozen=True)
class Sampling:
    """The resolved sampling settings of a request (plain values; part of the encoder's message)."""

    guidance_scale: float
    sample_shift: float
    do_cfg: bool
    sigmas: tuple[float, ...]  # unshifted, one per step


def resolve_sampling(request: HunyuanVideo15Request, defaults: dict) -> Sampling:
    guidance = defaults["guidance_scale"] if request.guidance_scale is None else float(request.guidance_scale)
    shift = defaults["sample_shift"] if request.sample_shift is None else float(request.sample_shift)
    do_cfg = (not math.isclose(guidance, 1.0)) if request.enable_cfg is None else request.enable_cfg
    if request.denoising_step_list is not None:
        sigmas = distilled_sigmas(request.denoising_step_list)
    else:
        sigmas = default_sigmas(request.infer_steps if request.infer_steps is not None else DEFAULTS["infer_steps"])
    return Sampling(guidance, shift, bool(do_cfg), tuple(float(s) for s in sigmas))


@dataclass
class HunyuanVideo15Encoded:
    """The encoder's message: tensors (batch 1, valid tokens only) and plain values."""

    task: str
    height: int
    width: int
    num_frames: int
    latent_shape: tuple[int, int, int, int]  # (C, T, h, w)
    sampling: Sampling
    prompt_embeds: torch.Tensor  # [1, Lt, 3584] Qwen2.5-VL
    prompt_embeds_2: torch.Tensor  # [1, Lg, 1472] ByT5 (Lg may be 0)
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds_2: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None  # I2V: [1, Li, 1152] SigLIP
    image_latents: torch.Tensor | None = None  # I2V: [1, 32, 1, h, w] normalised VAE latents of the image


def _home(device: torch.device, offloaded: bool) -> torch.device:
    """Where a component lives between uses: the CPU when it is offloaded, else its device."""
    return torch.device("cpu") if offloaded else device


@contextlib.contextmanager
def _in_use(component, device: torch.device, offloaded: bool):
    """``component`` on ``device`` inside the block; an offloaded one is moved in and back to the CPU after."""
    if not offloaded:
        yield component
        return
    component.to(device)
    try:
        yield component
    finally:
        component.to(torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"dtype {dtype!r} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    return dtype


class HunyuanVideo15Encoder:
    """Text encoders (Qwen2.5-VL + ByT5) and, for I2V, SigLIP and the VAE encoder; loaded here and nowhere else.
    The I2V parts are loaded on the first I2V request (``preload_i2v=True``: at once)."""

    def __init__(self, model_path, device="cpu", dtype=torch.float32, options: HunyuanVideo15Options | None = None,
                 preload_i2v: bool = False):
        self.model_path, self.device, self.dtype = model_path, torch.device(device), _check_dtype(dtype)
        self.options = options or HunyuanVideo15Options()
        self.layout = detect_layout(model_path)
        # config.json only (target_size, latent width); the DiT's weights are the transformer stage's
        self.dit_cfg = read_dit_config(model_path, self.layout, self.options.transformer_model_name, with_shapes=False)
        self.vae_cfg = read_vae_config(model_path, self.layout)
        self.defaults = sampling_defaults(model_path, self.layout, self.options.transformer_model_name)
        o = self.options
        self.text = load_qwen_text_encoder(model_path, self.layout, device=_home(self.device, o.qwen25vl_cpu_offload),
                                           dtype=self.dtype)
        self.glyph = load_glyph_encoder(model_path, self.layout, device=_home(self.device, o.byt5_cpu_offload),
                                        dtype=self.dtype)
        self.image_encoder = self.vae = None
        if preload_i2v:
            self._load_i2v()

    def _load_i2v(self) -> None:
        if self.image_encoder is None:
            o = self.options
            self.image_encoder = load_image_encoder(self.model_path, self.layout,
                                                    device=_home(self.device, o.siglip_cpu_offload), dtype=self.dtype)
            self.vae = load_vae(self.model_path, self.layout, device=_home(self.device, o.vae_cpu_offload),
                                dtype=self.dtype, parts=("encoder",))

    def output_size(self, request: HunyuanVideo15Request, image=None) -> tuple[int, int]:
        if request.height is not None:
            return request.height, request.width
        if image is not None:
            return closest_bucket(image.height, image.width, self.dit_cfg.target_size)
        w, h = parse_aspect_ratio(request.aspect_ratio)
        return closest_bucket(h, w, self.dit_cfg.target_size)

    @torch.inference_mode()
    def encode(self, request: HunyuanVideo15Request, stage=None) -> HunyuanVideo15Encoded:
        """The request's message for the transformer stage. ``stage(name)``: a context manager timing each part
        ("text encode", "image encode"; e.g. ``RunContext.stage``), or None."""
        from lightx2v.io.image import load_image
        from lightx2v.models.hunyuan_video_15.image_encoder import resize_and_crop, vae_input

        sampling = resolve_sampling(request, self.defaults)
        image = load_image(request.image, "image") if request.task == "i2v" else None
        height, width = self.output_size(request, image)
        s, t = self.vae_cfg.spatial_compression_ratio, self.vae_cfg.temporal_compression_ratio
        if height % s or width % s:
            raise UserError(f"height/width {height}x{width} must be multiples of the VAE stride {s}")
        if (request.num_frames - 1) % t:
            raise UserError(f"num_frames={request.num_frames} must be of the form {t}k+1")
        latent_shape = (self.vae_cfg.latent_channels, (request.num_frames - 1) // t + 1, height // s, width // s)
        o, dev = self.options, self.device
        stage = stage or (lambda name: contextlib.nullcontext())
        prompts = [request.prompt] + ([request.negative_prompt] if sampling.do_cfg else [])
        with stage("text encode"):
            with _in_use(self.text, dev, o.qwen25vl_cpu_offload) as text:
                text_states = [text.encode(p) for p in prompts]
            with _in_use(self.glyph, dev, o.byt5_cpu_offload) as glyph:
                glyph_states = [glyph.encode(p) for p in prompts]
        out = HunyuanVideo15Encoded(
            task=request.task, height=height, width=width, num_frames=request.num_frames, latent_shape=latent_shape,
            sampling=sampling, prompt_embeds=text_states[0], prompt_embeds_2=glyph_states[0])
        if sampling.do_cfg:
            out.negative_prompt_embeds, out.negative_prompt_embeds_2 = text_states[1], glyph_states[1]
        if image is not None:
            self._load_i2v()
            with stage("image encode"):
                image = resize_and_crop(image, height, width)
                with _in_use(self.image_encoder, dev, o.siglip_cpu_offload) as siglip:
                    out.image_embeds = siglip.encode(image)
                tiling = _tiling(self.options)
                with _in_use(self.vae, dev, o.vae_cpu_offload) as vae:
                    out.image_latents = vae.encode(vae_input(image).to(dev), tiling=tiling)
        return out


def _tiling(options: HunyuanVideo15Options):
    from lightx2v.models.hunyuan_video_15.vae import VAETiling

    return VAETiling(tile_sample_size=options.vae_tile_size) if options.use_tiling_vae else None


def condition_channels(encoded: HunyuanVideo15Encoded, dtype, device) -> torch.Tensor:
    """``[1, C + 1, T, h, w]``: the condition latents (the image's in frame 0 for I2V, zeros otherwise) and the frame
    mask (1 on the conditioned frame)."""
    c, t, h, w = encoded.latent_shape
    cond = torch.zeros(1, c + 1, t, h, w, dtype=dtype, device=device)
    if encoded.image_latents is not None:
        img = encoded.image_latents
        if tuple(img.shape) != (1, c, 1, h, w):
            raise UserError(f"image latents of shape {tuple(img.shape)} do not fit the latent shape {(1, c, 1, h, w)}")
        cond[:, :c, :1] = img.to(device=device, dtype=dtype)
        cond[:, c, 0] = 1.0
    return cond


class HunyuanVideo15Transformer:
    """The DiT and the sampler (the denoising loop); loads only the DiT's weights.

    ``load_device``: where the weights are loaded (default ``device``; the CPU when an offload handle will stream them
    to ``device``). Runtime features attached from outside (``lightx2v.hooks``) are given to the loop as attributes:
    ``cache`` (a feature-caching hook: told the step count and the branch of every forward) and ``offload`` (an
    offload handle: the weights are made resident for the loop and released after it)."""

    def __init__(self, model_path, device="cpu", dtype=torch.float32, options: HunyuanVideo15Options | None = None,
                 load_device=None):
        from lightx2v.ops.attention import get_attention_backend

        self.device, self.dtype = torch.device(device), _check_dtype(dtype)
        self.options = options or HunyuanVideo15Options()
        layout = detect_layout(model_path)
        cfg = read_dit_config(model_path, layout, self.options.transformer_model_name)
        attn = get_attention_backend(self.options.attn_mode, dtype=self.dtype, head_dim=cfg.attention_head_dim,
                                     device=self.device)
        self.dit = load_dit(model_path, layout, attn=attn, device=self.device if load_device is None else load_device,
                            dtype=self.dtype, transformer_model_name=self.options.transformer_model_name,
                            weights_file=self.options.dit_original_ckpt, quant_scheme=self.options.dit_quant_scheme)
        self.cache = None
        self.offload = None

    def initial_noise(self, encoded: HunyuanVideo15Encoded, seed: int) -> torch.Tensor:
        """Drawn as diffusers' ``randn_tensor`` with a CPU generator: on the CPU, in the DiT's dtype."""
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((1, *encoded.latent_shape), generator=g, dtype=self.dtype).to(self.device)

    def denoise(self, encoded: HunyuanVideo15Encoded, request: HunyuanVideo15Request,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """-> denoised latents ``[1, 32, T, h, w]`` in the DiT's dtype (the request gives the seed)."""
        return self.sample(encoded, request.seed, on_step)

    @torch.inference_mode()
    def sample(self, encoded: HunyuanVideo15Encoded, seed: int,
               on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The denoising loop of ``encoded`` (whose ``sampling`` holds the resolved settings) from the noise of
        ``seed`` -> latents ``[1, 32, T, h, w]`` in the DiT's dtype. ``on_step(i, n)`` after step i (of n)."""
        with contextlib.ExitStack() as resident:
            if self.offload is not None:  # the weights (or their slots) on the device for the loop only
                resident.enter_context(self.offload.resident())
            return self._sample(encoded, seed, on_step)

    def _sample(self, encoded: HunyuanVideo15Encoded, seed: int, on_step) -> torch.Tensor:
        dit, dtype, dev, cache = self.dit, self.dtype, self.device, self.cache
        if encoded.latent_shape[0] != dit.cfg.out_channels:
            raise UserError(f"the VAE's {encoded.latent_shape[0]} latent channels do not fit this DiT's "
                            f"{dit.cfg.out_channels}")
        sampling = encoded.sampling
        sched = FlowSigmaEuler(sampling.sigmas, sampling.sample_shift)
        latents = self.initial_noise(encoded, seed)
        cond = condition_channels(encoded, dtype, dev)

        def to_dev(x):
            return None if x is None else x.to(device=dev, dtype=dtype)

        text, glyph = to_dev(encoded.prompt_embeds), to_dev(encoded.prompt_embeds_2)
        neg_text, neg_glyph = to_dev(encoded.negative_prompt_embeds), to_dev(encoded.negative_prompt_embeds_2)
        image = to_dev(encoded.image_embeds)
        if sampling.do_cfg and neg_text is None:
            raise UserError("CFG is on but the encoder produced no negative prompt embeddings")
        # diffusers' I2V pipeline gives MeanFlow DiTs the next timestep as timestep_r (0 after the last step)
        use_r = dit.cfg.use_meanflow and encoded.task == "i2v"
        n = sched.num_inference_steps
        if cache is not None:
            cache.begin_generation(n)
        for i in range(n):
            t = sched.timesteps[i].to(dev)
            x_in = torch.cat([latents, cond], dim=1)
            tt = t.expand(1).to(dtype)
            t_r = None
            if use_r:
                nxt = sched.timesteps[i + 1] if i + 1 < n else torch.tensor(0.0)
                t_r = nxt.to(dev).expand(1).to(dtype)
            if cache is not None:
                cache.set_branch("cond")
            v = dit(x_in, tt, text, glyph, image, t_r)
            if sampling.do_cfg:
                if cache is not None:
                    cache.set_branch("uncond")
                v_uncond = dit(x_in, tt, neg_text, neg_glyph, image, t_r)
                v = v_uncond + sampling.guidance_scale * (v - v_uncond)
            latents = sched.step(v, latents)
            if on_step is not None:
                on_step(i, n)
        return latents


class HunyuanVideo15Decoder:
    """The VAE decoder; loads only the decoder half of the VAE."""

    def __init__(self, model_path, device="cpu", dtype=torch.float32, options: HunyuanVideo15Options | None = None):
        self.device, self.dtype = torch.device(device), _check_dtype(dtype)
        self.options = options or HunyuanVideo15Options()
        self.vae = load_vae(model_path, detect_layout(model_path), dtype=self.dtype, parts=("decoder",),
                            device=_home(self.device, self.options.vae_cpu_offload))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, encoded_meta: HunyuanVideo15Encoded | None = None) -> torch.Tensor:
        """latents ``[1, 32, T, h, w]`` -> frames ``[F, H, W, 3]`` float32 in [0, 1] on the CPU."""
        with _in_use(self.vae, self.device, self.options.vae_cpu_offload) as vae:
            video = vae.decode(latents.to(self.device), tiling=_tiling(self.options))
        frames = (video[0] * 0.5 + 0.5).clamp(0, 1)  # [3, F, H, W]
        return frames.permute(1, 2, 3, 0).float().cpu()


def generate(model_path, request: HunyuanVideo15Request, device="cpu", dtype=torch.float32,
             options: HunyuanVideo15Options | None = None, on_step=None) -> torch.Tensor:
    """Encode, denoise and decode one request -> frames ``[F, H, W, 3]`` float32 in [0, 1] (CPU)."""
    encoded = HunyuanVideo15Encoder(model_path, device, dtype, options).encode(request)
    latents = HunyuanVideo15Transformer(model_path, device, dtype, options).denoise(encoded, request, on_step)
    return HunyuanVideo15Decoder(model_path, device, dtype, options).decode(latents, encoded)
