"""The built-in tiny model: Wan2.1's architecture at toy sizes with fixed random weights.

It is written once to a cache folder in the original Wan layout, so that a run without a checkpoint goes through
the real loaders. Its output is noise: it exists to check an installation, and to test the whole pipeline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dataclasses import replace

import torch

from lightx2v.loading import ensure_model_folder
from lightx2v.models.wan.arch import PRESETS
from lightx2v.models.wan.checkpoint import WAN22_VAE_FILE, WAN_T5_FILE, WAN_VAE_FILE, save_dit

TINY_VERSION = 2  # 2: the folder carries its default sizes (lightx2v_defaults.json)
# Sizes a 2-core CPU runs in seconds (keyword overrides and config_json still win).
_TINY = {"height": 128, "width": 128, "num_frames": 17, "infer_steps": 20, "sample_shift": 5.0, "guidance_scale": 5.0}
TINY_DEFAULTS = {"t2v": _TINY, "i2v": {**_TINY, "sample_shift": 3.0}, "flf2v": {**_TINY, "sample_shift": 3.0}}
TINY_CLIP_DIM = 160


def tiny_defaults(task: str, model_cls: str = "wan2.1") -> dict:
    """Sampling defaults for the tiny model (two-expert classes keep their per-expert guidance and boundary)."""
    d = dict(TINY_DEFAULTS[task])
    if model_cls.startswith("wan2.2_moe"):
        d.pop("guidance_scale")
    return d


def _family(model_cls: str) -> str:
    return "wan2.2_moe" if model_cls.startswith("wan2.2_moe") else ("wan2.2" if model_cls == "wan2.2" else "wan2.1")


TINY_VAE22_Z = 48  # the Wan2.2 VAE's latent width (kept real: the latent statistics are 48 values)


def tiny_vae22_config():
    """A toy-width Wan2.2 VAE (48 latent channels, 16x spatial)."""
    from lightx2v.models.wan.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVAEConfig

    return WanVAEConfig(base_dim=8, decoder_base_dim=12, z_dim=TINY_VAE22_Z, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                        temperal_downsample=(False, True, True), latents_mean=WAN22_LATENTS_MEAN,
                        latents_std=WAN22_LATENTS_STD, is_residual=True, patch_size=2)


def ensure_tiny_model(task: str = "t2v", model_cls: str = "wan2.1", root: Path | None = None) -> Path:
    """Return the folder of the tiny model for ``task`` (t2v, i2v, flf2v) and ``model_cls``, writing it first if
    needed (Wan2.1; Wan2.2 A14B: two experts, Wan2.2 I2V without CLIP; Wan2.2 TI2V-5B: the 48-channel VAE), with the
    sizes it runs in seconds as its own defaults (also when the folder is passed as model_path)."""
    family = _family(model_cls)
    if family == "wan2.2_moe" and task == "flf2v":
        task = "i2v"  # Wan2.2 A14B: the I2V experts also take a last frame (LightX2V's wan_moe_flf2v)
    return ensure_model_folder(f"tiny-{family}-{task}-v{TINY_VERSION}", lambda d: write_tiny_model(d, task, family),
                               tiny_defaults(task, family), root)


def _randomise(module: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight") and "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def write_tiny_model(folder: Path, task: str = "t2v", family: str = "wan2.1") -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.models.wan.encoders import WanTextEncoder, build_tiny_tokenizer, save_text_encoder
    from lightx2v.models.wan.vae import WanVAE, WanVAEConfig, save_wan_vae
    from lightx2v.ops.attention import get_attention_backend

    g = torch.Generator().manual_seed(20260101)
    folder = Path(folder)

    # DiT(s), with the cross-attention made loud enough that the prompt visibly changes the output.
    cfg = PRESETS["tiny"]
    clip = task != "t2v" and family == "wan2.1"
    if task != "t2v" and family != "wan2.2":
        cfg = replace(cfg, in_dim=36, model_type=task, image_dim=TINY_CLIP_DIM, clip_input=clip)
    if family == "wan2.2":
        cfg = replace(cfg, in_dim=TINY_VAE22_Z, out_dim=TINY_VAE22_Z, model_type="ti2v")
    attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=cfg.head_dim, device=torch.device("cpu"))
    for expert in (("high", "low") if family == "wan2.2_moe" else (None,)):
        dit = WanDiT(cfg, attn)
        _randomise(dit, g)
        with torch.no_grad():
            for block in dit.blocks:
                block.cross_attn.norm_k.weight.mul_(4.0)
                block.cross_attn.o.weight.mul_(4.0)
        save_dit(dit.state_dict(), cfg, folder, "wan", expert=expert)

    # VAE
    if family == "wan2.2":
        vae = WanVAE(tiny_vae22_config())
        _randomise(vae, g)
        save_wan_vae(vae, folder / WAN22_VAE_FILE, layout="wan")
    else:
        vae = WanVAE(WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
        _randomise(vae, g)
        save_wan_vae(vae, folder / WAN_VAE_FILE, layout="wan")

    # UMT5 text encoder + a small self-made tokenizer
    tok_dir = folder / "tokenizer-tmp"
    tokenizer = build_tiny_tokenizer(tok_dir)
    t5_cfg = UMT5Config(vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    t5 = UMT5EncoderModel(t5_cfg).eval()
    _randomise(t5, g)
    save_text_encoder(WanTextEncoder(tokenizer, t5), folder, "wan")
    shutil.rmtree(tok_dir)
    assert (folder / WAN_T5_FILE).is_file()

    if clip:  # CLIP image encoder (ViT layout at toy width; 257 tokens like the real one)
        from lightx2v.models.wan.clip import build_tiny_clip, save_image_encoder

        clip = build_tiny_clip(seed=7)
        assert clip.model.config.hidden_size == TINY_CLIP_DIM
        save_image_encoder(clip, folder, "wan")
