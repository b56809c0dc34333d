"""Wan2.1 / Wan2.2: the three stages and their messages.

    GenerationRequest -> WanEncoder -> WanConditioning -> WanTransformer -> WanLatents -> WanDecoder -> Frames

* :class:`WanEncoder` holds the UMT5 text encoder, the CLIP image encoder (Wan2.1 I2V / FLF2V) and the VAE
  *encoder* (I2V tasks). Besides the embeddings it resolves what the later stages need without their models: the
  output size (``resize_mode="adaptive"`` picks it from the image), the latent shape of every resolution stage and the
  frame rate; all of it travels in the message.
* :class:`WanTransformer` holds the DiT (or the two experts of Wan2.2 A14B) with the hooks attached to it, and runs
  the denoising loop with the request's sampling settings (steps, size, guidance, shift, solver can differ per
  request). Classifier-free guidance is a strategy chosen when it is built (:mod:`lightx2v.engine.guidance`).
* :class:`WanDecoder` holds the VAE *decoder*.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lightx2v.engine.components import ComponentSlot
from lightx2v.engine.guidance import Guidance, SequentialCFG
from lightx2v.engine.messages import Frames, message
from lightx2v.engine.progress import RunContext
from lightx2v.engine.request import GenerationRequest, SamplingConfig
from lightx2v.errors import CheckpointError, UserError
from lightx2v.schedulers import make_scheduler

log = logging.getLogger("lightx2v")

VAE_TEMPORAL = 4
TEXT_LEN = 512


# --- messages ----------------------------------------------------------------------------------------------------

@message("wan.text")
@dataclass(frozen=True)
class TextEmbeds:
    context: torch.Tensor               # [1, text_len, text_dim], zero past the prompt's tokens
    context_null: torch.Tensor | None   # the negative prompt's, same shape; None without CFG


@message("wan.image")
@dataclass(frozen=True)
class ImageCond:
    """How the conditioning image(s) enter the DiT.

    ``mode="concat"`` (Wan2.1 I2V/FLF2V, Wan2.2 A14B I2V): ``latent_cond`` [1, 4 + z_dim, T, h, w] is the frame mask
    and the VAE latents of the conditioning frames, concatenated to the noise latents on channels.
    ``mode="first_frame"`` (Wan2.2 TI2V-5B): ``latent_cond`` [1, z_dim, 1, h, w] replaces the first latent frame,
    whose timestep is then 0.
    """

    clip_tokens: torch.Tensor | None  # [1, 257 (or 514), 1280] CLIP tokens (Wan2.1 only), else None
    latent_cond: torch.Tensor
    mode: str = "concat"


@message("wan.conditioning")
@dataclass(frozen=True)
class WanConditioning:
    """Encoder -> transformer."""

    request: dict  # GenerationRequest.to_wire(), with the size the encoder resolved
    text: TextEmbeds
    images: tuple  # one ImageCond per resolution stage (the reduced ones of changing_resolution, then the full one)
    latent_shapes: tuple  # [1, z_dim, T, h, w] per resolution stage
    fps: int


@message("wan.latents")
@dataclass(frozen=True)
class WanLatents:
    """Transformer -> decoder."""

    request: dict
    latents: torch.Tensor  # [1, z_dim, T, h, w] float32, normalised (what the DiT works in)
    fps: int


def stage_shapes(s: SamplingConfig, z_dim: int, spatial: int) -> list[tuple[int, ...]]:
    """Latent shape per resolution stage: the reduced ones of ``changing_resolution``, then the full one."""
    full = (1, z_dim, (s.num_frames - 1) // VAE_TEMPORAL + 1, s.height // spatial, s.width // spatial)
    rates = s.resolution_rate if s.changing_resolution else ()
    return [full[:3] + (int(full[3] * r) // 2 * 2, int(full[4] * r) // 2 * 2) for r in rates] + [full]


# --- encoder -----------------------------------------------------------------------------------------------------

class WanEncoder:
    """GenerationRequest -> WanConditioning (text embeddings, image conditioning, latent shapes)."""

    name = "encoder"

    def __init__(self, text_encoder: ComponentSlot, device: torch.device, *, z_dim: int, vae_spatial: int,
                 size_multiple: int, tasks: tuple[str, ...], image_encoder: ComponentSlot | None = None,
                 vae: ComponentSlot | None = None, tiling=None, first_frame_images: bool = False):
        self.text_encoder, self.image_encoder, self.vae = text_encoder, image_encoder, vae
        self.device, self.tiling = device, tiling
        # how an image conditions the DiT: its latents replace the first latent frame (Wan2.2 TI2V-5B), or the mask
        # and the latents of the given frames are concatenated on channels (the others)
        self.first_frame_images = first_frame_images
        self.z_dim, self.vae_spatial, self.size_multiple, self.tasks = z_dim, vae_spatial, size_multiple, tasks

    def check_request(self, request: GenerationRequest) -> None:
        if request.task not in self.tasks:
            raise UserError(f"task {request.task!r} is not available with this generator; it does "
                            f"{', '.join(self.tasks)}")
        check_images(request.task, len(request.images))
        self.check_sampling(request.sampling)

    def check_sampling(self, s: SamplingConfig) -> None:
        if s.aspect_ratio is not None:
            raise UserError(f"aspect_ratio={s.aspect_ratio!r} is for image models; Wan takes height and width")
        if s.sample_shift == "auto":
            raise UserError("sample_shift='auto' (the checkpoint's own shift) is not available for Wan, whose "
                            "checkpoints carry none; give a number")
        for name in ("height", "width"):
            value = getattr(s, name)
            if value % self.size_multiple:
                m = self.size_multiple
                raise UserError(f"{name}={value} is not divisible by {m} (this model's VAE and patch size); "
                                f"use e.g. {max(m, value // m * m)}")

    @torch.inference_mode()
    def __call__(self, request: GenerationRequest, ctx: RunContext) -> WanConditioning:
        s = request.sampling
        with ctx.stage("text encode"):
            text = self.text(request.prompt, request.negative_prompt, s.do_cfg)
        conds: list[ImageCond] = []
        if request.images:
            ctx.check()
            with ctx.stage("image encode"):
                conds, s = self.image(list(request.images), s)
        shapes = stage_shapes(s, self.z_dim, self.vae_spatial)
        wire = replace(request, sampling=s).to_wire()
        return WanConditioning(wire, text, tuple(conds), tuple(shapes), s.fps)

    def text(self, prompt: str, negative_prompt: str, do_cfg: bool) -> TextEmbeds:
        prompts = [prompt, negative_prompt] if do_cfg else [prompt]
        with self.text_encoder.use() as encoder:
            embeds = encoder.encode(prompts, max_length=TEXT_LEN, device=self.device)
        return TextEmbeds(context=embeds[:1], context_null=embeds[1:2] if do_cfg else None)

    def image(self, images: list, s: SamplingConfig) -> tuple[list[ImageCond], SamplingConfig]:
        """images: [first] or [first, last] RGB PIL images. Returns one conditioning per resolution stage and the
        sampling settings with the size actually used (``resize_mode="adaptive"`` picks it from the first image's
        aspect ratio)."""
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
        sp = self.vae_spatial
        sizes = [(shape[3] * sp, shape[4] * sp) for shape in stage_shapes(s, self.z_dim, sp)]
        with self.vae.use() as vae:
            if self.first_frame_images:
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


def check_images(task: str, n: int) -> None:
    """The number of conditioning images a Wan task takes: t2v 0, i2v 1, flf2v 2."""
    want = {"t2v": 0, "i2v": 1, "flf2v": 2}[task]
    if n != want:
        raise UserError(f"task {task!r} takes {want} image(s), got {n}")


# --- transformer -------------------------------------------------------------------------------------------------

@dataclass
class Expert:
    """One DiT of the denoising loop (Wan2.2 A14B has two: the high-noise and the low-noise expert) with what
    belongs to it: its offload handle, its feature-caching hook, its LoRA handle and its index into
    ``guidance_scales``."""

    dit: Any
    offload: Any = None  # an offload handle (lightx2v.hooks.offload) or None
    cache: Any = None  # a feature-caching hook (lightx2v.hooks.caching) or None
    index: int = 0  # 0: high-noise (or the only) expert, 1: low-noise expert
    lora: Any = None  # a LoRA handle (lightx2v.hooks.lora) or None
    name: str | None = None  # the expert's folder name (LoRA entries' "name"), None for one DiT


class WanTransformer:
    """WanConditioning -> WanLatents: the denoising loop.

    With two experts, the high-noise one runs while the timestep is >= ``boundary`` x 1000 (or, for step-distilled
    models, for the first ``boundary_step_index`` steps) and the low-noise one after; they are used in one run each,
    so with offloading only the expert in use is on the GPU.
    """

    name = "transformer"

    def __init__(self, experts: list[Expert], device: torch.device, guidance: Guidance | None = None,
                 cache_method: str = "NoCaching"):
        self.experts = experts
        self.device = device
        self.guidance = guidance or SequentialCFG()
        self.cache_method = cache_method
        self.last_cache_stats: dict | None = None
        self.last_stats: dict = {}

    @property
    def dit(self):
        return self.experts[0].dit

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    def check_request(self, request: GenerationRequest) -> None:
        self.check_sampling(request.sampling)
        if request.loras is not None:
            self._lora_configs(request.loras)  # raises for what cannot be switched

    def check_sampling(self, s: SamplingConfig) -> None:
        check_expert_settings(s, len(self.experts))

    def scheduler(self, s: SamplingConfig, shift: float):
        if s.denoising_step_list is not None:
            from lightx2v.schedulers.distill import StepDistillScheduler

            sched = StepDistillScheduler(s.denoising_step_list, shift=shift)
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

    def velocity(self, x, t, text: TextEmbeds, image: ImageCond | None, s: SamplingConfig, expert: Expert
                 ) -> torch.Tensor:
        """The guided velocity at latents ``x`` and timestep ``t`` (one forward, or CFG as the strategy does it)."""
        dit, cache, scale = expert.dit, expert.cache, s.guidance_scales[expert.index]
        clip = image.clip_tokens if image is not None else None
        if image is not None and image.mode == "first_frame":
            # Wan2.2 TI2V: the image's latents are the first latent frame, at timestep 0 (one timestep per frame)
            x = torch.cat([image.latent_cond.to(x.dtype), x[:, :, 1:]], dim=2)
            t = torch.cat([torch.zeros_like(t), t.expand(x.shape[2] - 1)])[None]  # [1, F]
        elif image is not None:
            x = torch.cat([x, image.latent_cond], dim=1)

        def predict(x, t, contexts: list, branches: list):
            if len(contexts) == 1:
                if cache is not None:
                    cache.set_branch(branches[0])
                return dit(x, t, contexts[0], clip)
            n = len(contexts)  # t: [1] or [B] (a batch of requests), [1, F] (TI2V): one copy per branch
            return dit(torch.cat([x] * n), torch.cat([t] * n), torch.cat(contexts),
                       None if clip is None else torch.cat([clip] * n))

        return self.guidance(predict, x, t, text.context, text.context_null, scale)

    def _lora_configs(self, loras) -> list:
        """A request's LoRA entries -> the LoRAConfig of each expert (dynamic mode only)."""
        from lightx2v.hooks.lora import LoRAConfig

        handles = [e.lora for e in self.experts]
        if any(h is None or h.mode != "dynamic" for h in handles):
            raise UserError('a request can choose LoRAs only when the generator applied its LoRAs with lora_mode '
                            '"dynamic" (lora_configs in create_generator)')
        cfg = LoRAConfig.from_lightx2v(list(loras), mode="dynamic",
                                       names=tuple(e.name for e in self.experts if e.name))
        return loras_per_expert(cfg, self.experts)

    def switch_lora(self, loras) -> None:
        for expert, cfg in zip(self.experts, self._lora_configs(loras)):
            from lightx2v.hooks.lora import LoRAConfig

            expert.lora = expert.lora.switch_lora(cfg or LoRAConfig((), mode="dynamic"))

    @torch.inference_mode()
    def __call__(self, cond: WanConditioning, ctx: RunContext) -> WanLatents:
        req = cond.request
        s = SamplingConfig.from_dict(req["sampling"])
        self._check_message(cond)
        if req.get("loras") is not None:
            self.switch_lora(req["loras"])
        with ctx.stage("denoise"):
            latents = self.denoise(cond.text, list(cond.images) or None, req["seed"], s, cond.latent_shapes, ctx)
        cache = self.experts[0].cache  # feature caching runs with one expert only
        self.last_cache_stats = None
        if cache is not None:
            stats = cache.stats()
            skipped = sum(b["skipped"] for b in stats.values())
            total = skipped + sum(b["computed"] for b in stats.values())
            log.info("feature caching (%s): skipped %d of %d block-stack evaluations", self.cache_method,
                     skipped, total)
            self.last_cache_stats = stats
        self.last_stats = {"cache": self.last_cache_stats} if self.last_cache_stats is not None else {}
        return WanLatents(req, latents, cond.fps)

    def _check_message(self, cond: WanConditioning) -> None:
        cfg = self.dit.cfg
        width = cond.text.context.shape[-1]
        if width != cfg.text_dim:
            raise CheckpointError(f"text embeddings of width {width} do not fit the DiT's text_dim {cfg.text_dim}")
        z = cond.latent_shapes[-1][1]
        if z != cfg.out_dim:
            raise CheckpointError(f"latents of {z} channels do not fit the DiT's {cfg.out_dim} output channels")

    def denoise(self, text: TextEmbeds, images: list[ImageCond] | None, seed: int, s: SamplingConfig,
                shapes, ctx: RunContext) -> torch.Tensor:
        # The initial noise is drawn exactly as diffusers' Wan pipelines draw it: float32, on a CPU generator.
        # With changing_resolution, one noise per stage is drawn in stage order (the full-size one last), so a seed
        # fixes everything.
        g = torch.Generator("cpu").manual_seed(seed)
        noises = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for shape in shapes]
        stage, latents = 0, noises[0].to(self.device)
        scheduler = self.scheduler(s, s.sample_shift)
        for e in self.experts:
            if e.cache is not None:
                e.cache.begin_generation(s.infer_steps)
        switch_after = set(s.changing_resolution_steps or ()) if s.changing_resolution else set()
        with contextlib.ExitStack() as resident:
            active = None
            host_timesteps = scheduler.timesteps.tolist()  # expert choice without a device sync per step
            for i in tqdm(range(s.infer_steps), desc="denoise", disable=not ctx.show_progress_bar, leave=False):
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
                else:
                    # Change resolution: predict the clean latents, resize them to the next stage and re-noise them
                    # to the current noise level with that stage's noise; continue on a schedule with a larger
                    # shift.
                    sigma = scheduler.sigmas[i].item()
                    stage += 1
                    x0 = F.interpolate(latents - sigma * v, size=noises[stage].shape[2:], mode="trilinear")
                    latents = (1 - sigma) * x0 + sigma * noises[stage].to(self.device)
                    scheduler = self.scheduler(s, s.sample_shift + stage)
                    scheduler.restart_at(i + 1)
                    host_timesteps = scheduler.timesteps.tolist()
                del v
                ctx.step("denoise", i + 1, s.infer_steps)  # progress, and the cancel point
        if images and images[-1].mode == "first_frame":  # the conditioning frame is the image's latents
            latents = torch.cat([images[-1].latent_cond.to(latents.dtype), latents[:, :, 1:]], dim=2)
        return latents


    # --- several requests as one batch (a server's queue) -----------------------------------------------------

    def batch_blocker(self, cond: WanConditioning) -> str | None:
        """Why this request cannot share a batch through :meth:`call_batch` (None: it can)."""
        if any(e.cache is not None for e in self.experts):
            return "feature caching keeps per-request state"
        if cond.request.get("loras") is not None:
            return "per-request LoRAs"
        if len(cond.latent_shapes) != 1:
            return "changing_resolution"
        if any(image.mode == "first_frame" for image in cond.images):
            return "first-frame conditioning (one timestep per latent frame)"
        return None

    @torch.inference_mode()
    def call_batch(self, conds: list[WanConditioning], ctxs: list[RunContext]) -> list:
        """Denoise several requests of equal sampling settings and latent shape as one batch through the DiT.

        Each request keeps what makes it itself: its noise from its own seed ([1, z, T, h, w], drawn as
        :meth:`denoise` draws it), its text (and image) conditioning, its own scheduler (the solver's history is per
        request), its progress reports and its cancel token. The DiT sees the latents of the B requests stacked
        ([B, z, T, h, w]) with their contexts ([B, text_len, text_dim]); guidance (equal for all, as the sampling
        settings are) combines each request's own cond/uncond predictions. A request cancelled between steps leaves
        the batch at that step; the others go on. Returns, per request, its :class:`WanLatents` or the
        :class:`lightx2v.errors.Cancelled` that stopped it. Each result equals the request's run alone up to the
        float rounding of a larger matmul.
        """
        from lightx2v.errors import Cancelled

        if len(conds) != len(ctxs) or not conds:
            raise ValueError("call_batch needs one RunContext per conditioning")
        first = conds[0]
        for cond in conds:
            self._check_message(cond)
            blocker = self.batch_blocker(cond)
            if blocker is not None:
                raise ValueError(f"request {cond.request['request_id']} cannot be batched: {blocker}")
            if cond.request["sampling"] != first.request["sampling"] or cond.latent_shapes != first.latent_shapes \
                    or len(cond.images) != len(first.images) or cond.request["task"] != first.request["task"]:
                raise ValueError("call_batch needs requests of equal task, sampling settings and latent shape")
            if (cond.text.context_null is None) != (first.text.context_null is None):
                raise ValueError("call_batch needs requests that all use CFG or none")
        s = SamplingConfig.from_dict(first.request["sampling"])
        shape = tuple(first.latent_shapes[0])
        results: list = [None] * len(conds)
        active = list(range(len(conds)))
        latents = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(c.request["seed"]),
                                         dtype=torch.float32) for c in conds]).to(self.device)
        schedulers = [self.scheduler(s, s.sample_shift) for _ in conds]

        def batched(idx: list[int]) -> tuple[TextEmbeds, ImageCond | None]:
            text = TextEmbeds(torch.cat([conds[k].text.context for k in idx]),
                              None if first.text.context_null is None
                              else torch.cat([conds[k].text.context_null for k in idx]))
            if not first.images:
                return text, None
            images = [conds[k].images[0] for k in idx]
            clip = None if images[0].clip_tokens is None else torch.cat([im.clip_tokens for im in images])
            return text, ImageCond(clip, torch.cat([im.latent_cond for im in images]), images[0].mode)

        text, image = batched(active)
        with contextlib.ExitStack() as timed:
            for ctx in ctxs:
                timed.enter_context(ctx.stage("denoise"))
            with contextlib.ExitStack() as resident:
                current = None
                host_timesteps = schedulers[0].timesteps.tolist()
                for i in range(s.infer_steps):
                    t = schedulers[0].timesteps[i].reshape(1).expand(len(active))  # [B]
                    expert = self.expert_for(i, host_timesteps[i], s)
                    if expert is not current:
                        resident.close()
                        if expert.offload is not None:
                            resident.enter_context(expert.offload.resident())
                        current = expert
                    v = self.velocity(latents, t, text, image, s, expert)  # [B, z, T, h, w]
                    latents = torch.cat([schedulers[k].step(v[j:j + 1], latents[j:j + 1])
                                         for j, k in enumerate(active)])
                    del v
                    keep = []
                    for j, k in enumerate(active):
                        try:
                            ctxs[k].step("denoise", i + 1, s.infer_steps)
                            keep.append(j)
                        except Cancelled as e:
                            results[k] = e
                    if len(keep) < len(active):
                        active = [active[j] for j in keep]
                        if not active:
                            break
                        latents = latents[keep]
                        text, image = batched(active)
        for j, k in enumerate(active):
            results[k] = WanLatents(conds[k].request, latents[j:j + 1], conds[k].fps)
        self.last_cache_stats, self.last_stats = None, {}
        return results


def check_expert_settings(s: SamplingConfig, n_experts: int) -> None:
    """The two-expert settings must fit the model: none of them is silently ignored."""
    if n_experts == 1:
        given = [f"{name}={v}" for name, v in (("boundary", s.boundary), ("boundary_step_index",
                                                                           s.boundary_step_index)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: when to switch from the high-noise to the low-noise expert of a "
                            "two-expert (Wan2.2 A14B) model; this model has one DiT: leave it out")
        if isinstance(s.guidance_scale, tuple):
            raise UserError(f"guidance_scale={list(s.guidance_scale)} gives the two experts of a Wan2.2 A14B model "
                            "their own scales; this model has one DiT: give one number")
        return
    if s.boundary_step_index is not None:
        if s.denoising_step_list is None:
            raise UserError("boundary_step_index is for step-distilled two-expert models (with denoising_step_list); "
                            "use boundary (a fraction of 1000 timesteps)")
        if s.boundary is not None:
            raise UserError("set either boundary or boundary_step_index, not both")
    elif s.boundary is None:
        raise UserError("a two-expert model needs boundary (or boundary_step_index for step-distilled models)")


def loras_per_expert(lora_cfg, experts: list[Expert]) -> list:
    """The LoRA config of each expert: entries named after an expert go to that expert only, unnamed ones to every
    expert."""
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
        mine = tuple(e for e in lora_cfg.loras if not e.name or e.name == expert.name)
        out.append(replace(lora_cfg, loras=mine) if mine else None)
    return out


# --- decoder -----------------------------------------------------------------------------------------------------

class WanDecoder:
    """WanLatents -> Frames."""

    name = "decoder"

    def __init__(self, vae: ComponentSlot, device: torch.device, tiling=None, z_dim: int | None = None):
        self.vae, self.device, self.tiling, self.z_dim = vae, device, tiling, z_dim

    def check_request(self, request: GenerationRequest) -> None:
        pass

    def check_sampling(self, s: SamplingConfig) -> None:
        pass

    @torch.inference_mode()
    def __call__(self, latents: WanLatents, ctx: RunContext) -> Frames:
        z = latents.latents
        if self.z_dim is not None and z.shape[1] != self.z_dim:
            raise CheckpointError(f"latents of {z.shape[1]} channels do not fit this VAE's {self.z_dim}")
        with ctx.stage("VAE decode"):
            with self.vae.use() as vae:  # -> [1, 3, F, H, W] in [-1, 1]
                video = vae.decode(z.to(self.device, vae.dtype), tiling=self.tiling)
            frames = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()  # [F, H, W, 3]
        return Frames(frames=frames, fps=latents.fps, request=latents.request)
