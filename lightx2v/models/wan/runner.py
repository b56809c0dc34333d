"""Wan2.1 text-to-video: three stages (encode -> denoise -> decode) exchanging the messages of ``stages.py``.

Each stage loads only its own component, so that a later version can run each as its own service.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightx2v.config import GeneratorConfig, SamplingConfig
from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.checkpoint import (WAN_T5_FILE, WAN_TOKENIZER_DIR, WAN_VAE_FILE, detect_layout, dit_folder,
                                            load_dit, safetensors_files)
from lightx2v.ops.attention import get_attention_backend
from lightx2v.schedulers import make_scheduler
from lightx2v.stages import Frames, Latents, TextEmbeds

log = logging.getLogger("lightx2v")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} was requested but no CUDA GPU is available; use device 'cpu'")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, _DTYPES[dtype]


def check_model_files(root: Path, layout: str) -> None:
    """Fail early, naming the first missing file or folder of the checkpoint."""
    if layout == "wan":
        for name in ("config.json", WAN_VAE_FILE, WAN_T5_FILE, WAN_TOKENIZER_DIR):
            if not (root / name).exists():
                raise CheckpointError(f"missing {name} in the Wan checkpoint folder {root}")
    else:
        for name in ("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"):
            if not (root / name).exists():
                raise CheckpointError(f"missing {name} in the diffusers checkpoint folder {root}")
    safetensors_files(dit_folder(root, layout), "diffusion_pytorch_model")


class TextEncodeStage:
    """prompt(s) -> TextEmbeds."""

    def __init__(self, root: Path, layout: str, device: torch.device, dtype: torch.dtype):
        from lightx2v.models.wan.encoders import load_text_encoder

        self.device = device
        self.encoder = load_text_encoder(root, layout, device=device, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, prompt: str, negative_prompt: str, do_cfg: bool) -> TextEmbeds:
        prompts = [prompt, negative_prompt] if do_cfg else [prompt]
        embeds = self.encoder.encode(prompts, max_length=512, device=self.device)
        return TextEmbeds(context=embeds[:1], context_null=embeds[1:2] if do_cfg else None)


class DenoiseStage:
    """TextEmbeds (+ seed, sampling settings) -> Latents."""

    def __init__(self, root: Path, layout: str, device: torch.device, dtype: torch.dtype, cfg: GeneratorConfig,
                 vae_spatial: int = 8, vae_temporal: int = 4):
        from lightx2v.models.wan.checkpoint import read_dit_config

        dit_cfg = read_dit_config(root, layout)
        attn = get_attention_backend(cfg.attention.self_attn_1_type, dtype=dtype, head_dim=dit_cfg.head_dim,
                                     device=device)
        self.dit = load_dit(root, layout, attn=attn, device=device, dtype=dtype)
        self.device = device
        self.vae_spatial, self.vae_temporal = vae_spatial, vae_temporal

    def latent_shape(self, s: SamplingConfig) -> tuple[int, ...]:
        z = self.dit.cfg.out_dim
        return (1, z, (s.num_frames - 1) // self.vae_temporal + 1, s.height // self.vae_spatial,
                s.width // self.vae_spatial)

    @torch.inference_mode()
    def __call__(self, text: TextEmbeds, seed: int, s: SamplingConfig, progress: bool = True) -> Latents:
        # The initial noise is drawn exactly as diffusers' WanPipeline draws it: float32, on a CPU generator.
        g = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(self.latent_shape(s), generator=g, dtype=torch.float32).to(self.device)
        scheduler = make_scheduler(s.solver, shift=s.sample_shift)
        scheduler.set_timesteps(s.infer_steps, device=self.device)
        do_cfg = text.context_null is not None
        for t in tqdm(scheduler.timesteps, desc="denoise", disable=not progress, leave=False):
            t = t.reshape(1)
            v = self.dit(latents, t, text.context)
            if do_cfg:
                v_null = self.dit(latents, t, text.context_null)
                v = v_null + s.guidance_scale * (v - v_null)
            latents = scheduler.step(v, latents)
        return Latents(latents=latents)


class DecodeStage:
    """Latents -> Frames."""

    def __init__(self, root: Path, layout: str, device: torch.device, dtype: torch.dtype):
        from lightx2v.models.wan.vae import load_wan_vae

        path = root / WAN_VAE_FILE if layout == "wan" else root / "vae"
        self.vae = load_wan_vae(path, device=device, dtype=dtype)
        self.device = device

    @torch.inference_mode()
    def __call__(self, latents: Latents, fps: int) -> Frames:
        dtype = next(self.vae.parameters()).dtype
        video = self.vae.decode(latents.latents.to(self.device, dtype))  # [1, 3, F, H, W] in [-1, 1]
        frames = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()  # [F, H, W, 3]
        return Frames(frames=frames, fps=fps)


class WanRunner:
    def __init__(self, model_path: Path, task: str, cfg: GeneratorConfig):
        if task != "t2v":
            raise UserError(f"task {task!r} is not supported by this version of lightx2v yet; supported: t2v")
        self.root = Path(model_path)
        self.layout = detect_layout(self.root)
        check_model_files(self.root, self.layout)
        self.cfg = cfg
        self.device, self.dtype = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)
        self.text = TextEncodeStage(self.root, self.layout, self.device, self.dtype)
        self.denoise = DenoiseStage(self.root, self.layout, self.device, self.dtype, cfg)
        self.decode = DecodeStage(self.root, self.layout, self.device, self.dtype)
        if self.text.encoder.model.config.d_model != self.denoise.dit.cfg.text_dim:
            raise CheckpointError(f"text encoder width {self.text.encoder.model.config.d_model} does not match the "
                                  f"DiT's text_dim {self.denoise.dit.cfg.text_dim}")

    def run(self, prompt: str, negative_prompt: str, seed: int, progress: bool = True) -> tuple[Frames, dict]:
        s = self.cfg.sampling
        timings = {}
        t0 = time.perf_counter()
        text = self.text(prompt, negative_prompt, s.do_cfg)
        timings["text encode"] = _sync_time(self.device, t0)
        t0 = time.perf_counter()
        latents = self.denoise(text, seed, s, progress=progress)
        timings["denoise"] = _sync_time(self.device, t0)
        t0 = time.perf_counter()
        frames = self.decode(latents, s.fps)
        timings["VAE decode"] = _sync_time(self.device, t0)
        return frames, timings


def _sync_time(device: torch.device, t0: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
