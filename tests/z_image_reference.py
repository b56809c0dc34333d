"""Tiny random-weight Z-Image reference components built with diffusers / transformers (test-only)."""

from __future__ import annotations

import torch

from lightx2v.models.z_image.text_encoder import build_tiny_tokenizer

# The seed example's prompt (LightX2V's Intel XPU Z-Image-Turbo example), exactly.
SEED_PROMPT = ('A coffee shop entrance features a chalkboard sign reading "Qwen Coffee 😊 $2 per cup," with a neon '
               'light beside it displaying "通义千问". Next to it hangs a poster showing a beautiful Chinese woman, '
               'and beneath the poster is written "π≈3.1415926-53589793-23846264-33832795-02384197". Ultra HD, 4K, '
               'cinematic composition, Ultra HD, 4K, cinematic composition.')

DIT_KW = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
              axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
VAE_KW = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[16, 32, 32, 32],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
              use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
QWEN3_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1000000.0,
                max_position_embeddings=1024, tie_word_embeddings=True)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Matrices ~ N(0, 1/fan_in); norm weights 1 + 0.1 N; other vectors 0.1 N (so nothing is left at its init)."""
    g = torch.Generator().manual_seed(seed)
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
    return module.eval()


def tiny_diffusers_dit(seed: int = 1, **overrides):
    import diffusers

    return randomise(diffusers.ZImageTransformer2DModel(**{**DIT_KW, **overrides}), seed)


def tiny_diffusers_vae(seed: int = 2, **overrides):
    import diffusers

    return randomise(diffusers.AutoencoderKL(**{**VAE_KW, **overrides}), seed)


def tiny_qwen3(vocab_size: int, seed: int = 3, pad_token_id=None):
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=vocab_size, pad_token_id=pad_token_id, **QWEN3_KW)
    return randomise(Qwen3Model(cfg), seed)


def tiny_diffusers_pipeline(tok_dir, shift: float = 3.0, **scheduler_kw):
    """A tiny ``ZImagePipeline`` (Z-Image-Turbo's layout and scheduler) with random weights."""
    import diffusers

    tokenizer = build_tiny_tokenizer(tok_dir)
    vocab = 64 * ((len(tokenizer) + 63) // 64)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **scheduler_kw)
    return diffusers.ZImagePipeline(scheduler=scheduler, vae=tiny_diffusers_vae(), text_encoder=tiny_qwen3(
        vocab, pad_token_id=tokenizer.pad_token_id), tokenizer=tokenizer, transformer=tiny_diffusers_dit())


def rel_max(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
