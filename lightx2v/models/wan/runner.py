"""Wan2.1 T2V / I2V / FLF2V: three stages (encode -> denoise -> decode) exchanging the messages of ``stages.py``.

The runner loads each component once; every stage gets only the components it uses, so that a later version can
run each stage as its own service.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lightx2v.config import GeneratorConfig, SamplingConfig
from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.checkpoint import (WAN_T5_FILE, WAN_TOKENIZER_DIR, WAN_VAE_FILE, detect_layout, dit_folder,
                                            load_dit, read_dit_config, safetensors_files)
from lightx2v.ops.attention import get_attention_backend
from lightx2v.schedulers import make_scheduler
from lightx2v.stages import Frames, ImageCond, Latents, TextEmbeds

log = logging.getLogger("lightx2v")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WAN_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} was requested but no CUDA GPU is available; use device 'cpu'")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, _DTYPES[dtype]


def check_model_files(root: Path, layout: str, image_input: bool = False) -> None:
    """Fail early, naming the first missing file or folder of the checkpoint."""
    if layout == "wan":
        names = ["config.json", WAN_VAE_FILE, WAN_T5_FILE, WAN_TOKENIZER_DIR] + ([WAN_CLIP_FILE] if image_input else [])
    else:
        names = ["transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"]
        names += ["image_encoder/config.json", "image_processor"] if image_input else []
    for name in names:
        if not (root / name).exists():
            raise CheckpointError(f"missing {name} in the {layout} checkpoint folder {root}")
    safetensors_files(dit_folder(root, layout), "diffusion_pytorch_model")


class ComponentSlot:
    """Where a component (text encoder, image encoder, VAE) lives between uses.

    ``resident``: loaded once on the device. ``cpu``: loaded once on the CPU and moved to the device only while it
    is used (LightX2V's ``t5_cpu_offload`` / ``clip_cpu_offload`` / ``vae_cpu_offload``). ``unload``: loaded from
    disk when used and freed right after (``unload_modules``), for the smallest footprint.
    """

    def __init__(self, load, device: torch.device, policy: str = "resident"):
        self.load, self.device, self.policy = load, device, policy
        self.obj = None if policy == "unload" else load(device if policy == "resident" else torch.device("cpu"))

    @contextlib.contextmanager
    def use(self):
        if self.policy == "resident":
            yield self.obj
        elif self.policy == "cpu":
            self.obj.to(self.device)
            try:
                yield self.obj
            finally:
                self.obj.to(torch.device("cpu"))
                _empty_cache(self.device)
        else:
            obj = self.load(self.device)
            try:
                yield obj
            finally:
                del obj
                _empty_cache(self.device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class EncodeStage:
    """prompt(s) (+ image(s)) -> TextEmbeds (+ ImageCond)."""

    def __init__(self, text_encoder: ComponentSlot, device: torch.device, image_encoder: ComponentSlot | None = None,
                 vae: ComponentSlot | None = None, tiling=None):
        self.text_encoder, self.image_encoder, self.vae = text_encoder, image_encoder, vae
        self.device, self.tiling = device, tiling

    @torch.inference_mode()
    def text(self, prompt: str, negative_prompt: str, do_cfg: bool) -> TextEmbeds:
        prompts = [prompt, negative_prompt] if do_cfg else [prompt]
        with self.text_encoder.use() as encoder:
            embeds = encoder.encode(prompts, max_length=512, device=self.device)
        return TextEmbeds(context=embeds[:1], context_null=embeds[1:2] if do_cfg else None)

    @torch.inference_mode()
    def image(self, images: list, s: SamplingConfig, sizes: list[tuple[int, int]] | None = None
              ) -> tuple[list[ImageCond], SamplingConfig]:
        """images: [first] or [first, last] RGB PIL images. Returns one conditioning per pixel size in ``sizes``
        (default: the output size) and the sampling settings with the size actually used
        (``resize_mode="adaptive"`` picks it from the first image's aspect ratio)."""
        from lightx2v.io.image import adaptive_size, center_crop_to_aspect

        if s.resize_mode == "adaptive":
            h, w = adaptive_size(images[0], s.height * s.width, multiple=VAE_SPATIAL * 2)
            s = replace(s, height=h, width=w)
        elif s.resize_mode == "crop":
            images = [center_crop_to_aspect(img, s.width, s.height) for img in images]
        with self.image_encoder.use() as image_encoder:
            clip = image_encoder.encode(images, device=self.device)  # [N, 257, C]
        clip_tokens = clip.reshape(1, -1, clip.shape[-1])
        sizes = sizes(s) if callable(sizes) else (sizes or [(s.height, s.width)])
        with self.vae.use() as vae:
            return [ImageCond(clip_tokens, self._latent_condition(vae, images, h, w, s.num_frames))
                    for h, w in sizes], s

    def _latent_condition(self, vae, images: list, height: int, width: int, f: int) -> torch.Tensor:
        """Frame mask + VAE latents of the conditioning frame(s) -> [1, 4 + z, T, h, w]."""
        from lightx2v.io.image import to_model_tensor

        # The VAE sees the conditioning frame(s) followed by zeros (FLF2V: the last frame at the end).
        pixels = [to_model_tensor(img, height, width) for img in images]  # [1, 3, H, W] each
        video = torch.zeros(1, 3, f, height, width)
        video[:, :, 0] = pixels[0][0]
        if len(pixels) == 2:
            video[:, :, f - 1] = pixels[1][0]
        z = vae.encode(video.to(self.device, vae.dtype), tiling=self.tiling).float()  # [1, z, T, h, w], normalised

        # Frame mask: 1 on the given frames. The first frame's flag is repeated VAE_TEMPORAL times so that every
        # latent frame carries VAE_TEMPORAL flags -> [1, 4, T, h, w].
        t_lat, h_lat, w_lat = z.shape[2:]
        mask = torch.zeros(1, 1, f, h_lat, w_lat, device=self.device)
        mask[:, :, 0] = 1
        if len(pixels) == 2:
            mask[:, :, f - 1] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(VAE_TEMPORAL, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, t_lat, VAE_TEMPORAL, h_lat, w_lat).transpose(1, 2)
        return torch.cat([mask, z], dim=1)


class DenoiseStage:
    """TextEmbeds (+ ImageCond per resolution stage, seed, sampling settings) -> Latents."""

    def __init__(self, dit, device: torch.device, cache=None, cfg_batch: bool = False, offload=None):
        self.dit, self.device = dit, device
        self.offload = offload  # an offload handle (lightx2v.hooks.offload) or None
        self.cache = cache  # a feature-caching hook (lightx2v.hooks.caching) or None
        self.cfg_batch = cfg_batch and cache is None  # caching keeps per-branch state: one branch per forward

    def stage_shapes(self, s: SamplingConfig) -> list[tuple[int, ...]]:
        """Latent shape per resolution stage: the reduced ones of ``changing_resolution``, then the full one."""
        full = (1, self.dit.cfg.out_dim, (s.num_frames - 1) // VAE_TEMPORAL + 1, s.height // VAE_SPATIAL,
                s.width // VAE_SPATIAL)
        rates = s.resolution_rate if s.changing_resolution else ()
        return [full[:3] + (int(full[3] * r) // 2 * 2, int(full[4] * r) // 2 * 2) for r in rates] + [full]

    def stage_pixel_sizes(self, s: SamplingConfig) -> list[tuple[int, int]]:
        return [(shape[3] * VAE_SPATIAL, shape[4] * VAE_SPATIAL) for shape in self.stage_shapes(s)]

    def _scheduler(self, s: SamplingConfig, shift: float, generator: torch.Generator):
        if s.denoising_step_list is not None:
            from lightx2v.schedulers.distill import StepDistillScheduler

            sched = StepDistillScheduler(s.denoising_step_list, shift=shift, generator=generator)
        else:
            sched = make_scheduler(s.solver, shift=shift)
        sched.set_timesteps(s.infer_steps, device=self.device)
        return sched

    def velocity(self, x, t, text: TextEmbeds, image: ImageCond | None, s: SamplingConfig) -> torch.Tensor:
        """The guided velocity at latents ``x`` and timestep ``t`` (one forward, or two with CFG)."""
        clip = image.clip_tokens if image is not None else None
        if image is not None:
            x = torch.cat([x, image.latent_cond], dim=1)
        if self.cfg_batch and text.context_null is not None:
            # cond and uncond as one batch of 2 (one pass over the weights instead of two)
            both = self.dit(torch.cat([x, x]), t.expand(2), torch.cat([text.context, text.context_null]),
                            None if clip is None else torch.cat([clip, clip]))
            v, v_null = both[:1], both[1:]
            return v_null + s.guidance_scale * (v - v_null)
        if self.cache is not None:
            self.cache.set_branch("cond")
        v = self.dit(x, t, text.context, clip)
        if text.context_null is not None:
            if self.cache is not None:
                self.cache.set_branch("uncond")
            v_null = self.dit(x, t, text.context_null, clip)
            v = v_null + s.guidance_scale * (v - v_null)
        return v

    def __call__(self, text: TextEmbeds, images: list[ImageCond] | None, seed: int, s: SamplingConfig,
                 progress: bool = True) -> Latents:
        if self.offload is None:
            return self._denoise(text, images, seed, s, progress)
        with self.offload.resident():  # weights (or their slots) on the GPU only for the loop
            return self._denoise(text, images, seed, s, progress)

    @torch.inference_mode()
    def _denoise(self, text: TextEmbeds, images: list[ImageCond] | None, seed: int, s: SamplingConfig,
                 progress: bool) -> Latents:
        # The initial noise is drawn exactly as diffusers' Wan pipelines draw it: float32, on a CPU generator.
        # With changing_resolution, one noise per stage is drawn in stage order (the full-size one last); the
        # step-distill sampler draws its re-noising noise from the same generator, so a seed fixes everything.
        g = torch.Generator("cpu").manual_seed(seed)
        noises = [torch.randn(shape, generator=g, dtype=torch.float32) for shape in self.stage_shapes(s)]
        stage, latents = 0, noises[0].to(self.device)
        scheduler = self._scheduler(s, s.sample_shift, g)
        if self.cache is not None:
            self.cache.begin_generation(s.infer_steps)
        switch_after = set(s.changing_resolution_steps or ()) if s.changing_resolution else set()
        for i in tqdm(range(s.infer_steps), desc="denoise", disable=not progress, leave=False):
            t = scheduler.timesteps[i].reshape(1)
            v = self.velocity(latents, t, text, images[stage] if images else None, s)
            if i + 1 not in switch_after:
                latents = scheduler.step(v, latents)
                continue
            # Change resolution: predict the clean latents, resize them to the next stage and re-noise them to
            # the current noise level with that stage's noise; continue on a schedule with a larger shift.
            sigma = scheduler.sigmas[i].item()
            stage += 1
            x0 = F.interpolate(latents - sigma * v, size=noises[stage].shape[2:], mode="trilinear")
            latents = (1 - sigma) * x0 + sigma * noises[stage].to(self.device)
            scheduler = self._scheduler(s, s.sample_shift + stage, g)
            scheduler.restart_at(i + 1)
        return Latents(latents=latents)


class DecodeStage:
    """Latents -> Frames."""

    def __init__(self, vae: ComponentSlot, device: torch.device, tiling=None):
        self.vae, self.device, self.tiling = vae, device, tiling

    @torch.inference_mode()
    def __call__(self, latents: Latents, fps: int) -> Frames:
        with self.vae.use() as vae:  # -> [1, 3, F, H, W] in [-1, 1]
            video = vae.decode(latents.latents.to(self.device, vae.dtype), tiling=self.tiling)
        frames = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()  # [F, H, W, 3]
        return Frames(frames=frames, fps=fps)


class WanRunner:
    def __init__(self, model_path: Path, task: str, cfg: GeneratorConfig):
        from lightx2v.models.wan.encoders import load_text_encoder
        from lightx2v.models.wan.vae import load_wan_vae

        self.root, self.task, self.cfg = Path(model_path), task, cfg
        self.layout = detect_layout(self.root)
        dit_cfg = read_dit_config(self.root, self.layout)
        _check_task(task, dit_cfg.model_type, self.root)
        image_input = task in ("i2v", "flf2v")
        check_model_files(self.root, self.layout, image_input)
        self.device, self.dtype = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)
        dev, dt = self.device, self.dtype

        rt = cfg.runtime
        policy = lambda offload: "unload" if rt.unload_modules else ("cpu" if offload else "resident")  # noqa: E731
        text_slot = ComponentSlot(lambda d: load_text_encoder(self.root, self.layout, device=d, dtype=dt), dev,
                                  policy(rt.t5_cpu_offload))
        vae_path = self.root / WAN_VAE_FILE if self.layout == "wan" else self.root / "vae"
        vae_slot = ComponentSlot(lambda d: load_wan_vae(vae_path, device=d, dtype=dt), dev, policy(rt.vae_cpu_offload))
        image_slot = None
        if image_input:
            from lightx2v.models.wan.clip import load_image_encoder

            image_slot = ComponentSlot(lambda d: load_image_encoder(self.root, self.layout, device=d, dtype=dt), dev,
                                       policy(rt.clip_cpu_offload))
        text_dim = _text_width(self.root, self.layout)
        if text_dim != dit_cfg.text_dim:
            raise CheckpointError(f"text encoder width {text_dim} does not match the DiT's text_dim {dit_cfg.text_dim}")
        attn = get_attention_backend(cfg.attention.self_attn_1_type, dtype=dt, head_dim=dit_cfg.head_dim, device=dev)
        from lightx2v.ops.quant import resolve_scheme

        weights = cfg.checkpoint.dit_original_ckpt
        off = cfg.offload
        if off.lazy_load:  # block weights stay on disk; only the rest is loaded
            from lightx2v.hooks.offload import load_dit_without_blocks

            if weights:
                raise UserError("lazy_load with dit_original_ckpt is not supported; convert the file into a "
                                "checkpoint folder with `lightx2v convert` first")
            dit = load_dit_without_blocks(self.root, self.layout, attn=attn, device=dev, dtype=dt)
        else:
            dit = load_dit(self.root, self.layout, attn=attn, device="cpu" if off.cpu_offload else dev, dtype=dt,
                           weights_file=Path(weights) if weights else None,
                           quant_scheme=resolve_scheme(cfg.checkpoint.dit_quant_scheme))

        # Runtime features, attached from outside the model.
        self.lora = None
        if cfg.lora.loras:
            from lightx2v.hooks.lora import apply_lora

            self.lora = apply_lora(dit, cfg.lora)
        cache = None
        if cfg.cache.method != "NoCaching":
            from lightx2v.hooks.caching import apply_feature_caching

            cache = apply_feature_caching(dit, cfg.cache)

        self.offload = None
        if off.cpu_offload:  # after LoRA merging (offloaded weights are read-only)
            from lightx2v.hooks.offload import apply_offload

            self.offload = apply_offload(dit, off, dev, weights_source=(self.root, self.layout))
            self.offload.offload()  # nothing on the GPU until the denoising loop
        if rt.use_compile:
            from lightx2v.hooks.compile import apply_compile

            apply_compile(dit, mode=rt.compile_mode)
        cfg_batch = rt.cfg_batch if isinstance(rt.cfg_batch, bool) else dev.type == "cuda"

        from lightx2v.models.wan.vae import TilingConfig

        tiling = TilingConfig() if rt.use_tiling_vae else None
        self.encode = EncodeStage(text_slot, dev, image_slot, vae_slot if image_input else None, tiling)
        self.denoise = DenoiseStage(dit, dev, cache, cfg_batch=cfg_batch and not off.cpu_offload,
                                    offload=self.offload)
        self.decode = DecodeStage(vae_slot, dev, tiling)

    def run(self, prompt: str, negative_prompt: str, seed: int, images: list | None = None,
            progress: bool = True) -> tuple[Frames, dict]:
        s = self.cfg.sampling
        timings, memory = {}, {}
        with self._stage("text encode", timings, memory):
            text = self.encode.text(prompt, negative_prompt, s.do_cfg)
        conds = None
        if images:
            with self._stage("image encode", timings, memory):
                conds, s = self.encode.image(images, s, sizes=self.denoise.stage_pixel_sizes)
        with self._stage("denoise", timings, memory):
            latents = self.denoise(text, conds, seed, s, progress=progress)
        if self.denoise.cache is not None:
            stats = self.denoise.cache.stats()
            skipped = sum(b["skipped"] for b in stats.values())
            total = skipped + sum(b["computed"] for b in stats.values())
            log.info("feature caching (%s): skipped %d of %d block-stack evaluations", self.cfg.cache.method,
                     skipped, total)
            self.last_cache_stats = stats
        with self._stage("VAE decode", timings, memory):
            frames = self.decode(latents, s.fps)
        memory["host RSS"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process peak
        self.last_memory = memory
        log.info("peak memory (GiB): " + " | ".join(f"{k} {v:.2f}" for k, v in memory.items()))
        return frames, timings

    @contextlib.contextmanager
    def _stage(self, name: str, timings: dict, memory: dict):
        """Time a stage and, on a GPU, record its peak allocated memory."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        timings[name] = _sync_time(self.device, t0)
        if cuda:
            memory[f"GPU {name}"] = torch.cuda.max_memory_allocated(self.device) / 2**30


def _text_width(root: Path, layout: str) -> int:
    """d_model of the text encoder, read without loading it (diffusers config, or the Wan file's embedding)."""
    import json

    if layout == "diffusers":
        return json.loads((root / "text_encoder" / "config.json").read_text())["d_model"]
    sd = torch.load(root / WAN_T5_FILE, map_location="cpu", weights_only=True, mmap=True)
    return sd["token_embedding.weight"].shape[1]


def _check_task(task: str, model_type: str, root: Path) -> None:
    if task != model_type:
        hint = {"t2v": "a text-to-video", "i2v": "an image-to-video", "flf2v": "a first-last-frame"}[model_type]
        raise UserError(f"task {task!r} does not fit the checkpoint {str(root)!r}, which is {hint} model "
                        f"(model_type {model_type!r}); use task {model_type!r} or another checkpoint")


def _sync_time(device: torch.device, t0: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
