"""Tiny random-weight reference models built with diffusers / transformers (test-only)."""

import torch

from lightx2v.models.wan.encoders import build_tiny_tokenizer

FLOW_SHIFT = 3.0


def picture(w, h, seed):
    """A deterministic RGB test picture (smooth gradients + noise) of w x h pixels."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7.0 + seed)], -1) * 200
    return Image.fromarray((base + g.integers(0, 55, (h, w, 3))).astype(np.uint8))


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def tiny_clip(seed: int = 4, image_size: int = 224):
    """A toy CLIP vision tower: (image_size / 14)**2 + 1 tokens per image (257 at 224, as ViT-H/14)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=160, intermediate_size=320, num_hidden_layers=3, num_attention_heads=2,
                           image_size=image_size, patch_size=14, projection_dim=32, hidden_act="gelu")
    model = CLIPVisionModel(cfg).eval()
    randomise(model, seed)
    processor = CLIPImageProcessor(crop_size=image_size, size={"shortest_edge": image_size}, do_center_crop=True,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
    return model, processor


def build_diffusers_wan_i2v_pipeline(tok_dir, flf: bool = False, clip_image_size: int = 224):
    """I2V (or FLF2V) at toy size; FLF2V's pos_embed_seq_len is twice the CLIP's tokens per image."""
    import diffusers

    tokens = (clip_image_size // 14) ** 2 + 1
    t2v = build_diffusers_wan_pipeline(tok_dir, in_channels=36, image_dim=160, flf=flf, pos_embed_seq_len=2 * tokens)
    clip, processor = tiny_clip(image_size=clip_image_size)
    return diffusers.WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, transformer=t2v.transformer, vae=t2v.vae,
        scheduler=t2v.scheduler, image_encoder=clip, image_processor=processor)


def tiny_diffusers_dit(in_channels: int = 16, out_channels: int = 16, image_dim=None, flf: bool = False, seed: int = 2,
                       pos_embed_seq_len: int = 2 * 257):
    import diffusers

    dit = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=in_channels,
        out_channels=out_channels, text_dim=32, freq_dim=64, ffn_dim=96, num_layers=2, cross_attn_norm=True, eps=1e-6,
        image_dim=image_dim, added_kv_proj_dim=48 if image_dim else None,
        pos_embed_seq_len=pos_embed_seq_len if flf else None).eval()
    randomise(dit, seed)
    with torch.no_grad():  # make the prompt matter among 512 mostly padded text tokens
        for block in dit.blocks:
            block.attn2.norm_k.weight.mul_(4.0)
            block.attn2.to_out[0].weight.mul_(4.0)
            if image_dim:  # and the image tokens too
                block.attn2.norm_added_k.weight.mul_(4.0)
    return dit


def build_diffusers_wan22_moe_pipeline(tok_dir, task: str):
    """Wan2.2 A14B at toy size: two experts (different random weights); I2V without CLIP."""
    import diffusers

    base = build_diffusers_wan_pipeline(tok_dir, in_channels=36 if task == "i2v" else 16)
    low = tiny_diffusers_dit(36 if task == "i2v" else 16, seed=12)
    parts = dict(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                 transformer=base.transformer, transformer_2=low)
    if task == "i2v":
        return diffusers.WanImageToVideoPipeline(**parts, image_encoder=None, image_processor=None,
                                                 boundary_ratio=0.9)
    return diffusers.WanPipeline(**parts, boundary_ratio=0.875)


def rel_max(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def diffusers_vae_for_parity(config: dict, seed: int = 0):
    """diffusers' AutoencoderKLWan of ``config`` with its random conv init and non-trivial norm gammas and biases."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def tiny_diffusers_wan22_vae(seed: int = 13):
    """A toy-width Wan2.2 VAE: 48 latent channels, 2x2 patchify + 8x, residual levels."""
    import diffusers

    from lightx2v.models.wan.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    vae = diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2],
                                     num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                                     in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                                     latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD)).eval()
    randomise(vae, seed)
    return vae


def build_diffusers_wan22_ti2v_pipeline(tok_dir, task: str):
    """Wan2.2 TI2V-5B at toy size: 48-channel DiT and VAE, a timestep per token (``expand_timesteps``)."""
    import diffusers

    base = build_diffusers_wan_pipeline(tok_dir)
    parts = dict(tokenizer=base.tokenizer, text_encoder=base.text_encoder, scheduler=base.scheduler,
                 vae=tiny_diffusers_wan22_vae(), transformer=tiny_diffusers_dit(48, 48))
    if task == "i2v":
        return diffusers.WanImageToVideoPipeline(**parts, image_encoder=None, image_processor=None,
                                                 expand_timesteps=True)
    return diffusers.WanPipeline(**parts, expand_timesteps=True)


def build_diffusers_wan_pipeline(tok_dir, in_channels: int = 16, image_dim=None, flf: bool = False,
                                 pos_embed_seq_len: int = 2 * 257):
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer(tok_dir)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)).eval()
    randomise(t5, 1)
    dit = tiny_diffusers_dit(in_channels, image_dim=image_dim, flf=flf, pos_embed_seq_len=pos_embed_seq_len)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    randomise(vae, 3)
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=FLOW_SHIFT, num_train_timesteps=1000)
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=t5, transformer=dit, vae=vae, scheduler=sched)
