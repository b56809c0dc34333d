"""The built-in tiny Z-Image model: the release's architecture at toy widths with fixed random weights.

:func:`write_tiny_model` writes it in the release's diffusers layout (``model_index.json``, ``transformer/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), so a run without a checkpoint goes through the real
loaders -- and diffusers' ``ZImagePipeline.from_pretrained`` loads the same folder. Its output is noise: it exists to
check an installation and to test the whole pipeline in seconds on a 2-core CPU.

What stays real: 16 latent channels, the 8x VAE with 2x2 patches (sizes are multiples of 16), the RoPE layout and
table lengths, the scheduler (Turbo's shift 3.0), the chat-template path (a byte-level BPE tokenizer, so any text
tokenizes), 9 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightx2v.models.z_image.arch import ZImageDiTConfig, ZImageSchedulerConfig, ZImageVAEConfig

TINY_SEED = 20260417
TINY_VERSION = 2  # bump when the tiny model changes, so cached copies are rewritten
TINY_DIT = ZImageDiTConfig(in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                           cap_feat_dim=32, axes_dims=(8, 12, 12))
TINY_VAE = ZImageVAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
TINY_SCHEDULER = ZImageSchedulerConfig(shift=3.0)
TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         max_position_embeddings=1024, tie_word_embeddings=True)
#: LightX2V's aspect-ratio names at toy sizes (width, height), multiples of 16, about the real ratios.
TINY_ASPECT_RATIOS = {"16:9": (144, 80), "9:16": (80, 144), "1:1": (112, 112), "4:3": (128, 96), "3:4": (96, 128),
                      "3:2": (144, 96), "2:3": (96, 144)}
#: Request defaults for the tiny model (keyword overrides and config_json still win).
TINY_DEFAULTS = {"infer_steps": 9, "guidance_scale": 0.0, "aspect_ratio": "16:9", "aspect_ratios": TINY_ASPECT_RATIOS}


def _randomise(module: torch.nn.Module, g: torch.Generator) -> None:
    """Matrices ~ N(0, 1/fan_in), norm weights 1 + 0.1 N, other vectors 0.1 N (fixed generator, fixed order)."""
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "Norm" in type(mod).__name__
            for name, p in mod.named_parameters(recurse=False):
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                elif is_norm and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _save_diffusers_module(module: torch.nn.Module, config: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "_diffusers_version": "0.42.1"}, indent=2) + "\n")
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def write_tiny_model(folder) -> Path:
    """Write the tiny model to ``folder`` (created); returns it. Deterministic: the same bytes every time."""
    from transformers import Qwen3Config, Qwen3Model

    from lightx2v.models.z_image.dit import ZImageDiT
    from lightx2v.models.z_image.text_encoder import build_tiny_tokenizer
    from lightx2v.models.z_image.vae import ZImageVAE
    from lightx2v.ops.attention import get_attention_backend

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(TINY_SEED)
    cpu = torch.device("cpu")

    dit = ZImageDiT(TINY_DIT, get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=TINY_DIT.head_dim,
                                                    device=cpu))
    _randomise(dit, g)
    _save_diffusers_module(dit, TINY_DIT.to_diffusers_config(), folder / "transformer")

    vae = ZImageVAE(TINY_VAE, get_attention_backend("torch_sdpa", dtype=torch.float32,
                                                    head_dim=TINY_VAE.block_out_channels[-1], device=cpu))
    _randomise(vae, g)
    _save_diffusers_module(vae, TINY_VAE.to_diffusers_config(), folder / "vae")

    tokenizer = build_tiny_tokenizer(folder / "tokenizer")
    vocab = 64 * ((len(tokenizer) + 63) // 64)
    te_cfg = Qwen3Config(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, **TINY_TEXT_ENCODER)
    text_encoder = Qwen3Model(te_cfg).eval()
    _randomise(text_encoder, g)
    text_encoder.save_pretrained(str(folder / "text_encoder"))

    sched = folder / "scheduler"
    sched.mkdir(exist_ok=True)
    (sched / "scheduler_config.json").write_text(json.dumps(
        {**TINY_SCHEDULER.to_diffusers_config(), "_diffusers_version": "0.42.1"}, indent=2) + "\n")
    index = {"_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def ensure_tiny_model(root: Path | None = None) -> Path:
    """The tiny model's folder under ``root`` (default: lightx2v's cache folder), written first if it is not there,
    with its request defaults in ``lightx2v_defaults.json``."""
    from lightx2v.loading import ensure_model_folder

    return ensure_model_folder(f"tiny-z_image-t2i-v{TINY_VERSION}", write_tiny_model, TINY_DEFAULTS, root)
