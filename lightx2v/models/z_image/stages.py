"""Z-Image text-to-image as three stages that load alone and exchange plain messages.

    ZImageRequest --ZImageEncoder.encode--> ZImageEncoded (prompt features, resolved size, latent shape)
                  --ZImageTransformer.denoise--> latents [1, C, H/8, W/8] float32
                  --ZImageDecoder.decode--> frames [1, H, W, 3] float32 in [0, 1] on the CPU

Each stage class loads only its own weights (the encoder: Qwen3 + tokenizer; the transformer: the DiT; the decoder:
the VAE); the encoder also reads the DiT's and the VAE's ``config.json`` (JSON only) to fix the latent shape.
:func:`generate` chains them; it is what the whole-pipeline parity test compares with diffusers' ``ZImagePipeline``.

Request semantics (LightX2V's names):

* size: ``height``/``width`` (both, multiples of 16) or ``aspect_ratio`` from LightX2V's Z-Image table
  :data:`ASPECT_RATIOS` (``"16:9"`` -> 1664x928, ...), optionally extended/overridden by ``aspect_ratios``
  ({name: [width, height]}, LightX2V's config key).
* guidance: LightX2V's convention. ``guidance_scale <= 1`` (Z-Image-Turbo: 0 or 1) is one DiT forward per step on
  the prompt, no negative prompt. Above 1, classifier-free guidance ``uncond + g * (cond - uncond)``, which is
  diffusers' ``ZImagePipeline`` with ``guidance_scale = g - 1`` (diffusers writes ``cond + g' * (cond - uncond)``
  and turns CFG off at ``g' = 0``). ``enable_cfg=False`` forces it off.
* schedule: ``infer_steps`` Euler steps of the checkpoint's ``scheduler_config.json`` (Turbo: shift 3.0);
  ``sample_shift`` replaces that shift.
* noise: ``torch.randn`` of the latent shape from a CPU ``torch.Generator`` seeded with ``seed``, float32 -- what
  diffusers draws for ``generator=torch.Generator("cpu").manual_seed(seed)`` -- then moved to the device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.z_image import checkpoint as ckpt
from lightx2v.models.z_image.scheduler import ZImageScheduler

#: LightX2V's Z-Image sizes per aspect ratio, (width, height) (its z_image runner's table).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "1:1": (1328, 1328),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ZImageRequest:
    """One text-to-image request (LightX2V's field names). Validated on construction (UserError)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 42
    infer_steps: int = 9
    guidance_scale: float = 0.0
    enable_cfg: bool | None = None  # None: on exactly when guidance_scale > 1
    sample_shift: float | None = None  # None: the checkpoint scheduler's shift
    aspect_ratio: str = "16:9"
    height: int | None = None
    width: int | None = None
    aspect_ratios: Mapping[str, tuple[int, int]] | None = None  # LightX2V's aspect_ratios: {name: [w, h]}
    max_sequence_length: int = 512

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**64:
            raise UserError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not _is_int(self.infer_steps) or self.infer_steps < 1:
            raise UserError(f"infer_steps must be an integer >= 1, got {self.infer_steps!r}")
        if not _is_real(self.guidance_scale) or self.guidance_scale < 0:
            raise UserError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if self.enable_cfg not in (None, True, False):
            raise UserError(f"enable_cfg must be true, false or null, got {self.enable_cfg!r}")
        if self.enable_cfg is True and self.guidance_scale <= 1:
            raise UserError(f"enable_cfg is true but guidance_scale is {self.guidance_scale}; classifier-free "
                            "guidance needs guidance_scale > 1 (Z-Image-Turbo runs without it: 0 or 1)")
        if self.sample_shift is not None and (not _is_real(self.sample_shift) or self.sample_shift <= 0):
            raise UserError(f"sample_shift must be a finite number > 0 (or null: the checkpoint's), "
                            f"got {self.sample_shift!r}")
        if not _is_int(self.max_sequence_length) or self.max_sequence_length < 1:
            raise UserError(f"max_sequence_length must be an integer >= 1, got {self.max_sequence_length!r}")
        if (self.height is None) != (self.width is None):
            raise UserError(f"give both height and width, or neither (then aspect_ratio picks the size); got "
                            f"height={self.height!r}, width={self.width!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 16):
                raise UserError(f"{name} must be an integer >= 16, got {v!r}")
        if self.aspect_ratios is not None:
            if not isinstance(self.aspect_ratios, Mapping):
                raise UserError(f"aspect_ratios must map names to [width, height], got {self.aspect_ratios!r}")
            table = {}
            for name, wh in self.aspect_ratios.items():
                if not isinstance(name, str) or not isinstance(wh, (list, tuple)) or len(wh) != 2 \
                        or not all(_is_int(v) and v >= 16 for v in wh):
                    raise UserError(f"aspect_ratios[{name!r}] must be [width, height] (integers >= 16), got {wh!r}")
                table[name] = (int(wh[0]), int(wh[1]))
            object.__setattr__(self, "aspect_ratios", table)
        if self.height is None and self.aspect_ratio not in self.ratio_table():
            raise UserError(f"unknown aspect_ratio {self.aspect_ratio!r}; allowed: {', '.join(self.ratio_table())} "
                            "(or give height and width)")

    def ratio_table(self) -> dict[str, tuple[int, int]]:
        """LightX2V's table with this request's ``aspect_ratios`` entries on top."""
        return {**ASPECT_RATIOS, **(self.aspect_ratios or {})}

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1 if self.enable_cfg is None else self.enable_cfg

    def size(self, multiple: int) -> tuple[int, int]:
        """(height, width) in pixels; UserError unless both are multiples of ``multiple`` (VAE factor x patch)."""
        if self.height is not None:
            h, w, source = self.height, self.width, "height/width"
        else:
            w, h = self.ratio_table()[self.aspect_ratio]
            source = f"aspect_ratio {self.aspect_ratio!r}"
        if h % multiple or w % multiple:
            raise UserError(f"{source} gives {w}x{h} (width x height), but Z-Image needs both sides to be "
                            f"multiples of {multiple}")
        return h, w


@dataclass(frozen=True)
class ZImageOptions:
    """Per-load choices of the stages (not per request)."""

    attn_mode: str = "torch_sdpa"  # the DiT's attention backend (lightx2v.ops.attention)


#: LightX2V config keys of Z-Image and where they go: ("request", ZImageRequest field), ("options", ZImageOptions
#: field), or ("check", DiT config attribute the value must equal). ``_comment`` keys are ignored.
CONFIG_KEYS: dict[str, tuple[str, str]] = {
    "infer_steps": ("request", "infer_steps"),
    "sample_guide_scale": ("request", "guidance_scale"),
    "enable_cfg": ("request", "enable_cfg"),
    "sample_shift": ("request", "sample_shift"),
    "aspect_ratio": ("request", "aspect_ratio"),
    "aspect_ratios": ("request", "aspect_ratios"),
    "target_height": ("request", "height"),
    "target_width": ("request", "width"),
    "attn_type": ("options", "attn_mode"),
    "num_channels_latents": ("check", "in_channels"),
    "patch_size": ("check", "patch_size"),
}


def split_config(d: Mapping) -> tuple[dict, dict, dict]:
    """A LightX2V Z-Image config -> (ZImageRequest kwargs, ZImageOptions kwargs, {DiT attribute: required value});
    UserError naming unknown keys."""
    unknown = sorted(k for k in d if k not in CONFIG_KEYS and not k.startswith("_comment"))
    if unknown:
        raise UserError(f"unknown Z-Image config keys {unknown}; known: {', '.join(CONFIG_KEYS)}")
    out: dict[str, dict] = {"request": {}, "options": {}, "check": {}}
    for k, v in d.items():
        if k in CONFIG_KEYS:
            where, name = CONFIG_KEYS[k]
            out[where][name] = v
    return out["request"], out["options"], out["check"]


def check_config(checks: Mapping, dit_cfg) -> None:
    """UserError unless every checked key of :func:`split_config` equals the checkpoint's value."""
    wrong = []
    for key, (where, attr) in CONFIG_KEYS.items():
        if where == "check" and attr in checks and checks[attr] != getattr(dit_cfg, attr):
            wrong.append(f"{key}={checks[attr]!r} (the checkpoint has {getattr(dit_cfg, attr)!r})")
    if wrong:
        raise UserError("the config does not fit the checkpoint: " + "; ".join(wrong))


@dataclass(frozen=True)
class ZImageEncoded:
    """Message 1: what the transformer and decoder stages need (tensors and plain values only)."""

    prompt_embeds: torch.Tensor  # [L, cap_feat_dim], the prompt's tokens only
    negative_prompt_embeds: torch.Tensor | None  # [L', cap_feat_dim] with CFG, else None
    height: int
    width: int
    latent_shape: tuple[int, int, int, int]  # (1, latent channels, height / 8, width / 8)


class ZImageEncoder:
    """Stage 1: Qwen3 text encoder + tokenizer (and the DiT/VAE configs, JSON only, for the latent shape)."""

    def __init__(self, model_path, device="cpu", dtype: torch.dtype = torch.float32,
                 options: ZImageOptions | None = None):
        self.root = ckpt.model_root(model_path)
        self.device = torch.device(device)
        dit_cfg = ckpt.read_dit_config(self.root)
        vae_cfg = ckpt.read_vae_config(self.root)
        if vae_cfg.latent_channels != dit_cfg.in_channels:
            raise CheckpointError(f"{self.root}: the VAE has {vae_cfg.latent_channels} latent channels but the DiT "
                                  f"takes {dit_cfg.in_channels}")
        self.latent_channels = dit_cfg.in_channels
        self.vae_scale = vae_cfg.scale_factor
        self.size_multiple = vae_cfg.scale_factor * dit_cfg.patch_size
        self.text_encoder = ckpt.load_text_encoder(self.root, self.device, dtype)
        hidden = self.text_encoder.model.config.hidden_size
        if hidden != dit_cfg.cap_feat_dim:
            raise CheckpointError(f"{self.root}: the text encoder's hidden_size {hidden} differs from the DiT's "
                                  f"cap_feat_dim {dit_cfg.cap_feat_dim}")

    def encode(self, request: ZImageRequest) -> ZImageEncoded:
        height, width = request.size(self.size_multiple)
        n = request.max_sequence_length
        cond = self.text_encoder.encode(request.prompt, n)
        uncond = self.text_encoder.encode(request.negative_prompt, n) if request.do_cfg else None
        shape = (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        return ZImageEncoded(cond, uncond, height, width, shape)


class ZImageTransformer:
    """Stage 2: the DiT and the flow Euler scheduler."""

    def __init__(self, model_path, device="cpu", dtype: torch.dtype = torch.float32,
                 options: ZImageOptions | None = None):
        options = options or ZImageOptions()
        self.root = ckpt.model_root(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.scheduler_cfg = ckpt.read_scheduler_config(self.root)
        self.dit = ckpt.load_dit(self.root, self.device, dtype, options.attn_mode)

    def _check(self, encoded: ZImageEncoded) -> None:
        cfg = self.dit.cfg
        if len(encoded.latent_shape) != 4 or encoded.latent_shape[:2] != (1, cfg.in_channels):
            raise UserError(f"latent shape {encoded.latent_shape} does not fit the DiT ({cfg.in_channels} channels)")
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            t = getattr(encoded, name)
            if t is not None and (t.ndim != 2 or t.shape[1] != cfg.cap_feat_dim):
                raise UserError(f"{name} has shape {tuple(t.shape)}; the DiT takes [L, {cfg.cap_feat_dim}]")
        self.dit.check_sizes(encoded.latent_shape[2], encoded.latent_shape[3], encoded.prompt_embeds.shape[0])

    @torch.inference_mode()
    def denoise(self, encoded: ZImageEncoded, request: ZImageRequest,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """-> the denoised (normalised) latents [1, C, H/8, W/8], float32, on this stage's device."""
        self._check(encoded)
        cfg_on = request.do_cfg
        if cfg_on and encoded.negative_prompt_embeds is None:
            raise UserError("classifier-free guidance needs the negative prompt's embeddings; encode the request "
                            "with guidance_scale > 1")
        gen = torch.Generator("cpu").manual_seed(request.seed)
        latents = torch.randn(encoded.latent_shape, generator=gen, dtype=torch.float32).to(self.device)
        _, _, h, w = encoded.latent_shape
        sched = ZImageScheduler(self.scheduler_cfg, shift=request.sample_shift)
        # the reference counts image tokens as (h // 2) * (w // 2) (2x2 patches) for the dynamic shift
        sched.set_timesteps(request.infer_steps, image_seq_len=(h // 2) * (w // 2), device=self.device)

        cond = encoded.prompt_embeds.to(self.device)[None]  # [1, L, cap_feat_dim]
        uncond = encoded.negative_prompt_embeds.to(self.device)[None] if cfg_on else None
        g = float(request.guidance_scale) - 1.0  # diffusers' guidance scale (see the module doc)
        n = sched.num_inference_steps
        for i, t in enumerate(sched.timesteps):
            t_model = (1000 - t.expand(1)) / 1000  # [1]: 0 at pure noise, 1 at the clean image
            x = latents.to(self.dtype)
            out = self.dit(x, t_model, cond).float()
            if cfg_on:
                out_u = self.dit(x, t_model, uncond).float()
                out = out + g * (out - out_u)
            latents = sched.step(-out, latents)  # the DiT predicts -velocity
            if on_step is not None:
                on_step(i, n)
        return latents


class ZImageDecoder:
    """Stage 3: the VAE decoder."""

    def __init__(self, model_path, device="cpu", dtype: torch.dtype = torch.float32,
                 options: ZImageOptions | None = None):
        self.root = ckpt.model_root(model_path)
        self.device = torch.device(device)
        self.vae = ckpt.load_vae(self.root, self.device, dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, encoded_meta: ZImageEncoded | None = None) -> torch.Tensor:
        """latents [1, C, h, w] (normalised) -> frames [1, 8h, 8w, 3] float32 in [0, 1] on the CPU."""
        if latents.ndim != 4 or latents.shape[1] != self.vae.cfg.latent_channels:
            raise UserError(f"latents of shape {tuple(latents.shape)} do not fit the VAE "
                            f"([B, {self.vae.cfg.latent_channels}, h, w])")
        if encoded_meta is not None and tuple(latents.shape[2:]) != tuple(encoded_meta.latent_shape[2:]):
            raise UserError(f"latents {tuple(latents.shape)} do not match the request's latent shape "
                            f"{encoded_meta.latent_shape}")
        image = self.vae.decode(latents.to(self.device))  # [B, 3, H, W] in [-1, 1], VAE dtype
        image = (image * 0.5 + 0.5).clamp(0, 1)
        return image.permute(0, 2, 3, 1).float().cpu()


def generate(model_path, request: ZImageRequest, device="cpu", dtype: torch.dtype = torch.float32,
             options: ZImageOptions | None = None, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Encode, denoise and decode ``request`` with the checkpoint at ``model_path``: frames [1, H, W, 3] float32 in
    [0, 1] on the CPU. Each stage is loaded, run and released in turn."""
    encoder = ZImageEncoder(model_path, device, dtype, options)
    encoded = encoder.encode(request)
    del encoder
    transformer = ZImageTransformer(model_path, device, dtype, options)
    latents = transformer.denoise(encoded, request, on_step)
    del transformer
    return ZImageDecoder(model_path, device, dtype, options).decode(latents, encoded)
