"""Wan2.1 T2V / I2V / FLF2V: three stages (encode -> denoise -> decode) exchanging the messages of ``stages.py``.

The runner loads each component once; every stage gets only the components it uses, so that a later version can
run each stage as its own service.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lightx2v.config import GeneratorConfig, SamplingConfig
from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.checkpoint import (EXPERT_FOLDERS, WAN_T5_FILE, WAN_TOKENIZER_DIR, WAN_VAE_FILE,
                                            detect_layout, dit_experts, dit_folder, load_dit, read_dit_config,
                                            safetensors_files, vae_path)
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


def check_model_files(root: Path, layout: str, image_input: bool = False, experts=(None,),
                      vae_file: Path | None = None) -> None:
    """Fail early, naming the first missing file or folder of the checkpoint. ``image_input``: CLIP files too."""
    dit_configs = [str(dit_folder(root, layout, e).relative_to(root) / "config.json") for e in experts]
    if layout == "wan":
        vae = (vae_file or root / WAN_VAE_FILE).relative_to(root)
        names = dit_configs + [str(vae), WAN_T5_FILE, WAN_TOKENIZER_DIR] + ([WAN_CLIP_FILE] if image_input else [])
    else:
        names = dit_configs + ["vae/config.json", "text_encoder/config.json", "tokenizer"]
        names += ["image_encoder/config.json", "image_processor"] if image_input else []
    for name in names:
        if not (root / name).exists():
            raise CheckpointError(f"missing {name} in the {layout} checkpoint folder {root}")
    for e in experts:
        safetensors_files(dit_folder(root, layout, e), "diffusion_pytorch_model")


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
                 vae: ComponentSlot | None = None, tiling=None, image_mode: str = "concat",
                 vae_spatial: int = VAE_SPATIAL, size_multiple: int = 2 * VAE_SPATIAL):
        self.text_encoder, self.image_encoder, self.vae = text_encoder, image_encoder, vae
        self.device, self.tiling, self.image_mode = device, tiling, image_mode
        self.vae_spatial, self.size_multiple = vae_spatial, size_multiple

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
            h, w = adaptive_size(images[0], s.height * s.width, multiple=self.size_multiple)
            s = replace(s, height=h, width=w)
        elif s.resize_mode == "crop":
            images = [center_crop_to_aspect(img, s.width, s.height) for img in images]
        clip_tokens = None
        if self.image_encoder is not None:
            with self.image_encoder.use() as image_encoder:
                clip = image_encoder.encode(images, device=self.device)  # [N, 257, C]
            clip_tokens = clip.reshape(1, -1, clip.shape[-1])
        sizes = sizes(s) if callable(sizes) else (sizes or [(s.height, s.width)])
        with self.vae.use() as vae:
            if self.image_mode == "first_frame":
                return [ImageCond(None, self._first_frame_latents(vae, images[0], h, w), "first_frame")
                        for h, w in sizes], s
            return [ImageCond(clip_tokens, self._latent_condition(vae, images, h, w, s.num_frames))
                    for h, w in sizes], s

    def _first_frame_latents(self, vae, image, height: int, width: int) -> torch.Tensor:
        """The conditioning image alone through the VAE -> [1, z, 1, h, w] (Wan2.2 TI2V)."""
        from lightx2v.io.image import to_model_tensor

        pixels = to_model_tensor(image, height, width)[:, :, None]  # [1, 3, 1, H, W]
        return vae.encode(pixels.to(self.device, vae.dtype), tiling=self.tiling).float()

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


@dataclass
class Expert:
    """One DiT of the denoising loop (Wan2.2 A14B has two: the high-noise and the low-noise expert) with what
    belongs to it: its offload handle, its feature-caching hook and its index into ``guidance_scales``."""

    dit: Any
    offload: Any = None  # an offload handle (lightx2v.hooks.offload) or None
    cache: Any = None  # a feature-caching hook (lightx2v.hooks.caching) or None
    index: int = 0  # 0: high-noise (or the only) expert, 1: low-noise expert


class DenoiseStage:
    """TextEmbeds (+ ImageCond per resolution stage, seed, sampling settings) -> Latents.

    With two experts, the high-noise one runs while the timestep is >= ``boundary`` x 1000 (or, for step-distilled
    models, for the first ``boundary_step_index`` steps) and the low-noise one after; they are used in one run each,
    so with offloading only the expert in use is on the GPU.
    """

    def __init__(self, dit=None, device: torch.device | None = None, cache=None, cfg_batch: bool = False,
                 offload=None, *, experts: list[Expert] | None = None, vae_spatial: int = VAE_SPATIAL):
        self.experts = experts if experts is not None else [Expert(dit, offload, cache)]
        self.dit = self.experts[0].dit
        self.device, self.vae_spatial = device, vae_spatial
        # caching keeps per-branch state: one branch per forward
        self.cfg_batch = cfg_batch and all(e.cache is None for e in self.experts)

    def stage_shapes(self, s: SamplingConfig) -> list[tuple[int, ...]]:
        """Latent shape per resolution stage: the reduced ones of ``changing_resolution``, then the full one."""
        sp = self.vae_spatial
        full = (1, self.dit.cfg.out_dim, (s.num_frames - 1) // VAE_TEMPORAL + 1, s.height // sp, s.width // sp)
        rates = s.resolution_rate if s.changing_resolution else ()
        return [full[:3] + (int(full[3] * r) // 2 * 2, int(full[4] * r) // 2 * 2) for r in rates] + [full]

    def stage_pixel_sizes(self, s: SamplingConfig) -> list[tuple[int, int]]:
        return [(shape[3] * self.vae_spatial, shape[4] * self.vae_spatial) for shape in self.stage_shapes(s)]

    def _scheduler(self, s: SamplingConfig, shift: float, generator: torch.Generator):
        if s.denoising_step_list is not None:
            from lightx2v.schedulers.distill import StepDistillScheduler

            sched = StepDistillScheduler(s.denoising_step_list, shift=shift, generator=generator)
        else:
            sched = make_scheduler(s.solver, shift=shift)
        sched.set_timesteps(s.infer_steps, device=self.device)
        return sched

    def expert_for(self, i: int, t: float, s: SamplingConfig) -> Expert:
        """The expert of step ``i`` at timestep ``t`` (diffusers' rule: high while t >= boundary * 1000)."""
        if len(self.experts) == 1:
            return self.experts[0]
        if s.boundary_step_index is not None:
            high = i < s.boundary_step_index
        else:
            high = t >= s.boundary * 1000
        return self.experts[0 if high else 1]

    def velocity(self, x, t, text: TextEmbeds, image: ImageCond | None, s: SamplingConfig,
                 expert: Expert | None = None) -> torch.Tensor:
        """The guided velocity at latents ``x`` and timestep ``t`` (one forward, or two with CFG)."""
        expert = expert or self.experts[0]
        dit, cache, scale = expert.dit, expert.cache, s.guidance_scales[expert.index]
        clip = image.clip_tokens if image is not None else None
        if image is not None and image.mode == "first_frame":
            # Wan2.2 TI2V: the image's latents are the first latent frame, at timestep 0 (one timestep per frame)
            x = torch.cat([image.latent_cond.to(x.dtype), x[:, :, 1:]], dim=2)
            t = torch.cat([torch.zeros_like(t), t.expand(x.shape[2] - 1)])[None]  # [1, F]
        elif image is not None:
            x = torch.cat([x, image.latent_cond], dim=1)
        if self.cfg_batch and text.context_null is not None:
            # cond and uncond as one batch of 2 (one pass over the weights instead of two)
            both = dit(torch.cat([x, x]), t.expand(2, *t.shape[1:]), torch.cat([text.context, text.context_null]),
                       None if clip is None else torch.cat([clip, clip]))
            v, v_null = both[:1], both[1:]
            return v_null + scale * (v - v_null)
        if cache is not None:
            cache.set_branch("cond")
        v = dit(x, t, text.context, clip)
        if text.context_null is not None:
            if cache is not None:
                cache.set_branch("uncond")
            v_null = dit(x, t, text.context_null, clip)
            v = v_null + scale * (v - v_null)
        return v

    @torch.inference_mode()
    def __call__(self, text: TextEmbeds, images: list[ImageCond] | None, seed: int, s: SamplingConfig,
                 progress: bool = True) -> Latents:
        # The initial noise is drawn exactly as diffusers' Wan pipelines draw it: float32, on a CPU generator.
        # With changing_resolution, one noise per stage is drawn in stage order (the full-size one last); the
        # step-distill sampler draws its re-noising noise from the same generator, so a seed fixes everything.
        g = torch.Generator("cpu").manual_seed(seed)
        noises = [torch.randn(shape, generator=g, dtype=torch.float32) for shape in self.stage_shapes(s)]
        stage, latents = 0, noises[0].to(self.device)
        scheduler = self._scheduler(s, s.sample_shift, g)
        for e in self.experts:
            if e.cache is not None:
                e.cache.begin_generation(s.infer_steps)
        switch_after = set(s.changing_resolution_steps or ()) if s.changing_resolution else set()
        with contextlib.ExitStack() as resident:
            active = None
            host_timesteps = scheduler.timesteps.tolist()  # expert choice without a device sync per step
            for i in tqdm(range(s.infer_steps), desc="denoise", disable=not progress, leave=False):
                t = scheduler.timesteps[i].reshape(1)
                expert = self.expert_for(i, host_timesteps[i], s)
                if expert is not active:  # weights (or their slots) on the GPU only while the expert is in use
                    resident.close()
                    if expert.offload is not None:
                        resident.enter_context(expert.offload.resident())
                    active = expert
                image = images[stage] if images else None
                v = self.velocity(latents, t, text, image, s, expert)
                if i + 1 not in switch_after:
                    latents = scheduler.step(v, latents)
                    continue
                # Change resolution: predict the clean latents, resize them to the next stage and re-noise them
                # to the current noise level with that stage's noise; continue on a schedule with a larger shift.
                sigma = scheduler.sigmas[i].item()
                stage += 1
                x0 = F.interpolate(latents - sigma * v, size=noises[stage].shape[2:], mode="trilinear")
                latents = (1 - sigma) * x0 + sigma * noises[stage].to(self.device)
                scheduler = self._scheduler(s, s.sample_shift + stage, g)
                scheduler.restart_at(i + 1)
                host_timesteps = scheduler.timesteps.tolist()
        if images and images[-1].mode == "first_frame":  # the conditioning frame is the image's latents
            latents = torch.cat([images[-1].latent_cond.to(latents.dtype), latents[:, :, 1:]], dim=2)
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
    def __init__(self, model_path: Path, task: str, cfg: GeneratorConfig, model_cls: str = "wan2.1"):
        from lightx2v.models.wan.encoders import load_text_encoder
        from lightx2v.models.wan.vae import load_wan_vae, read_vae_config

        self.root, self.task, self.cfg, self.model_cls = Path(model_path), task, cfg, model_cls
        self.layout = detect_layout(self.root)
        experts = _experts_for(self.root, self.layout, model_cls)
        dit_cfgs = [read_dit_config(self.root, self.layout, e) for e in experts]
        dit_cfg = dit_cfgs[0]
        if model_cls != "wan2.2" and dit_cfg.model_type == "ti2v":
            raise UserError(f"{str(self.root)!r} is a Wan2.2 TI2V-5B checkpoint: use model_cls 'wan2.2'")
        if len({(c.in_dim, c.out_dim, c.has_image_input, c.text_dim) for c in dit_cfgs}) > 1:
            raise CheckpointError(f"the two experts of {self.root} differ in their inputs: {dit_cfgs}")
        image_mode = _check_task(task, dit_cfg, model_cls, self.root)
        image_input = task in ("i2v", "flf2v")
        clip_input = image_input and dit_cfg.has_image_input
        vae_file = vae_path(self.root, self.layout, wan22=model_cls == "wan2.2")
        check_model_files(self.root, self.layout, clip_input, experts, vae_file)
        self.device, self.dtype = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)
        dev, dt = self.device, self.dtype
        ck = cfg.checkpoint
        if ck.use_image_encoder is not None and ck.use_image_encoder != dit_cfg.has_image_input:
            raise UserError(f"use_image_encoder={str(ck.use_image_encoder).lower()} does not fit this DiT, which "
                            f"{'takes' if dit_cfg.has_image_input else 'takes no'} CLIP image tokens")

        # The VAE fixes the latent size: 16 (Wan2.1) or 48 channels (Wan2.2), 8x or 16x smaller than the pixels.
        vae_cfg = read_vae_config(vae_file)
        if vae_cfg.z_dim == 48 and model_cls != "wan2.2":
            raise UserError(f"{str(self.root)!r} has the Wan2.2 VAE (48 latent channels): use model_cls 'wan2.2'")
        if vae_cfg.z_dim != dit_cfg.out_dim:
            raise CheckpointError(f"the VAE's {vae_cfg.z_dim} latent channels ({vae_file.name}) do not fit the DiT's "
                                  f"{dit_cfg.out_dim} output channels")
        stride = (VAE_TEMPORAL, vae_cfg.spatial_factor, vae_cfg.spatial_factor)
        if ck.vae_stride is not None and ck.vae_stride != stride:
            raise UserError(f"vae_stride={list(ck.vae_stride)} does not fit this checkpoint's VAE ({list(stride)})")
        multiple = vae_cfg.spatial_factor * dit_cfg.patch_size[1]
        for name in ("height", "width"):
            value = getattr(cfg.sampling, name)
            if value % multiple:
                raise UserError(f"{name}={value} is not divisible by {multiple} (this model's VAE and patch size); "
                                f"use e.g. {max(multiple, value // multiple * multiple)}")

        rt = cfg.runtime
        policy = lambda offload: "unload" if rt.unload_modules else ("cpu" if offload else "resident")  # noqa: E731
        text_slot = ComponentSlot(lambda d: load_text_encoder(self.root, self.layout, device=d, dtype=dt), dev,
                                  policy(rt.t5_cpu_offload))
        vae_slot = ComponentSlot(lambda d: load_wan_vae(vae_file, device=d, dtype=dt), dev, policy(rt.vae_cpu_offload))
        image_slot = None
        if clip_input:
            from lightx2v.models.wan.clip import load_image_encoder

            image_slot = ComponentSlot(lambda d: load_image_encoder(self.root, self.layout, device=d, dtype=dt), dev,
                                       policy(rt.clip_cpu_offload))
        text_dim = _text_width(self.root, self.layout)
        if text_dim != dit_cfg.text_dim:
            raise CheckpointError(f"text encoder width {text_dim} does not match the DiT's text_dim {dit_cfg.text_dim}")
        attn = get_attention_backend(cfg.attention.self_attn_1_type, dtype=dt, head_dim=dit_cfg.head_dim, device=dev)

        _check_expert_settings(cfg.sampling, len(experts))
        off = cfg.offload
        weights = _weights_files(ck, experts)
        if len(experts) > 1 and cfg.cache.method != "NoCaching":
            raise UserError("feature_caching is not supported yet for two-expert (Wan2.2 A14B) models")
        self.lora = None
        loras = _loras_per_expert(cfg.lora, experts)
        stage_experts = []
        for index, (expert, weights_file) in enumerate(zip(experts, weights)):
            dit = self._load_dit(expert, weights_file, attn)
            # Runtime features, attached from outside the model.
            if loras[index] is not None:
                from lightx2v.hooks.lora import apply_lora

                handle = apply_lora(dit, loras[index])
                self.lora = self.lora or handle
            cache = None
            if cfg.cache.method != "NoCaching":
                from lightx2v.hooks.caching import apply_feature_caching

                cache = apply_feature_caching(dit, cfg.cache)
            offload = None
            if off.cpu_offload:  # after LoRA merging (offloaded weights are read-only)
                from lightx2v.hooks.offload import CheckpointBlocks, apply_offload

                source = CheckpointBlocks(self.root, self.layout, expert=expert) if off.lazy_load else None
                offload = apply_offload(dit, off, dev, weights_source=source)
                offload.offload()  # nothing on the GPU until the denoising loop
            if rt.use_compile:
                from lightx2v.hooks.compile import apply_compile

                apply_compile(dit, mode=rt.compile_mode)
            stage_experts.append(Expert(dit, offload, cache, index))
        self.offload = stage_experts[0].offload
        cfg_batch = rt.cfg_batch if isinstance(rt.cfg_batch, bool) else dev.type == "cuda"

        from lightx2v.models.wan.vae import TilingConfig

        tiling = TilingConfig() if rt.use_tiling_vae else None
        self.encode = EncodeStage(text_slot, dev, image_slot, vae_slot if image_input else None, tiling,
                                  image_mode=image_mode, vae_spatial=vae_cfg.spatial_factor, size_multiple=multiple)
        self.denoise = DenoiseStage(device=dev, cfg_batch=cfg_batch and not off.cpu_offload, experts=stage_experts,
                                    vae_spatial=vae_cfg.spatial_factor)
        self.decode = DecodeStage(vae_slot, dev, tiling)

    def _load_dit(self, expert: str | None, weights_file: str | None, attn):
        from lightx2v.ops.quant import resolve_scheme

        off, ck = self.cfg.offload, self.cfg.checkpoint
        if off.lazy_load:  # block weights stay on disk; only the rest is loaded
            from lightx2v.hooks.offload import load_dit_without_blocks

            if weights_file:
                raise UserError("lazy_load with dit_original_ckpt is not supported; convert the file into a "
                                "checkpoint folder with `lightx2v convert` first")
            return load_dit_without_blocks(self.root, self.layout, attn=attn, device=self.device, dtype=self.dtype,
                                           expert=expert)
        return load_dit(self.root, self.layout, attn=attn, device="cpu" if off.cpu_offload else self.device,
                        dtype=self.dtype, weights_file=Path(weights_file) if weights_file else None,
                        quant_scheme=resolve_scheme(ck.dit_quant_scheme), expert=expert)

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
        cache = self.denoise.experts[0].cache  # feature caching runs with one expert only
        if cache is not None:
            stats = cache.stats()
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


def _experts_for(root: Path, layout: str, model_cls: str) -> tuple[str | None, ...]:
    experts = dit_experts(root, layout)
    moe = model_cls.startswith("wan2.2_moe")
    if moe and len(experts) == 1:
        folders = " and ".join(f"{f}/" for f in EXPERT_FOLDERS[layout].values())
        raise UserError(f"model_cls {model_cls!r} needs a two-expert checkpoint ({folders}); {str(root)!r} has one "
                        "DiT")
    if not moe and len(experts) > 1:
        raise UserError(f"{str(root)!r} is a two-expert (Wan2.2 A14B) checkpoint: use model_cls 'wan2.2_moe' (or "
                        "'wan2.2_moe_distill')")
    return experts


def _check_task(task: str, dit_cfg, model_cls: str, root: Path) -> str:
    """Check that the DiT can do ``task``; return how an image conditions it ("concat" or "first_frame")."""
    model_type = dit_cfg.model_type
    if dit_cfg.has_image_input:  # Wan2.1 I2V / FLF2V: CLIP tokens, and for FLF2V two images
        ok = task == model_type
    elif dit_cfg.concat_condition:  # Wan2.2 A14B I2V: conditioning latents on channels, no CLIP
        ok = task in ("i2v", "flf2v")
    elif model_type == "ti2v" or model_cls == "wan2.2":  # TI2V-5B: text or first image
        ok = task in ("t2v", "i2v")
        if ok and task == "i2v":
            return "first_frame"
    else:
        ok = task == "t2v"
    if not ok:
        kind = {"t2v": "a text-to-video", "i2v": "an image-to-video", "flf2v": "a first-last-frame",
                "ti2v": "a text/image-to-video"}[model_type]
        raise UserError(f"task {task!r} does not fit the checkpoint {str(root)!r}, which is {kind} model "
                        f"(model_type {model_type!r}, {dit_cfg.in_dim} input channels); use another task or "
                        "checkpoint")
    return "concat"


def _check_expert_settings(s: SamplingConfig, n_experts: int) -> None:
    """The two-expert settings must fit the model: none of them is silently ignored."""
    if n_experts == 1:
        given = [name for name, v in (("boundary", s.boundary), ("boundary_step_index", s.boundary_step_index))
                 if v is not None]
        if isinstance(s.guidance_scale, tuple):
            given.append(f"guidance_scale={list(s.guidance_scale)}")
        if given:
            raise UserError(f"{', '.join(given)}: two-expert (Wan2.2 A14B) settings, but this model has one DiT; "
                            "give guidance_scale as one number")
        return
    if s.boundary_step_index is not None:
        if s.denoising_step_list is None:
            raise UserError("boundary_step_index is for step-distilled two-expert models (with denoising_step_list); "
                            "use boundary (a fraction of 1000 timesteps)")
        if s.boundary is not None:
            raise UserError("set either boundary or boundary_step_index, not both")
    elif s.boundary is None:
        raise UserError("a two-expert model needs boundary (or boundary_step_index for step-distilled models)")


def _weights_files(ck, experts) -> list[str | None]:
    """One weights file per expert: dit_original_ckpt for one DiT, high/low_noise_original_ckpt for two."""
    if len(experts) == 1:
        if ck.high_noise_original_ckpt or ck.low_noise_original_ckpt:
            raise UserError("high_noise_original_ckpt / low_noise_original_ckpt are for two-expert models; use "
                            "dit_original_ckpt")
        return [ck.dit_original_ckpt]
    if ck.dit_original_ckpt:
        raise UserError("a two-expert model takes high_noise_original_ckpt and low_noise_original_ckpt, not "
                        "dit_original_ckpt")
    return [ck.high_noise_original_ckpt, ck.low_noise_original_ckpt]


def _loras_per_expert(lora_cfg, experts) -> list:
    """The LoRA config of each expert: entries named "high_noise_model" / "low_noise_model" go to that expert
    only, unnamed ones to every expert."""
    if not lora_cfg.loras:
        return [None] * len(experts)
    if len(experts) == 1:
        named = [e.name for e in lora_cfg.loras if e.name]
        if named:
            raise UserError(f"LoRA entries named {named} are for two-expert models (high_noise_model / "
                            "low_noise_model); this model has one DiT")
        return [lora_cfg]
    out = []
    for expert in experts:
        folder = EXPERT_FOLDERS["wan"][expert]
        mine = tuple(e for e in lora_cfg.loras if not e.name or e.name == folder)
        out.append(replace(lora_cfg, loras=mine) if mine else None)
    return out


def _sync_time(device: torch.device, t0: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
