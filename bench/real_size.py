"""Real-size Wan2.1 components with random weights, built directly on the GPU (no checkpoint needed).

Shared by the GPU benchmarks. Weights are random with realistic scales (N(0, 1/fan_in) matrices, norms near 1);
timings do not depend on the values, accuracy figures compare modes on the SAME weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.models.wan.arch import PRESETS  # noqa: E402
from lightx2v.models.wan.dit import WanDiT  # noqa: E402
from lightx2v.ops.attention import get_attention_backend  # noqa: E402


@torch.no_grad()
def randomise_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name or name.endswith("gamma"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)
    return module


def build_dit(preset: str, dtype=torch.bfloat16, attn: str = "torch_sdpa", seed: int = 0) -> WanDiT:
    cfg = PRESETS[preset]
    backend = get_attention_backend(attn, dtype=dtype, head_dim=cfg.head_dim, device=torch.device("cuda"))
    with torch.device("meta"):
        model = WanDiT(cfg, backend)
    model.to_empty(device="cuda")
    randomise_(model, seed)
    return model.to_inference_dtype(dtype).eval().requires_grad_(False)


def build_vae(dtype=torch.bfloat16):
    from lightx2v.models.wan.vae import WanVAE, WanVAEConfig

    with torch.device("cuda"):
        vae = WanVAE(WanVAEConfig())
    return randomise_(vae, 1).to(dtype).eval().requires_grad_(False)


def build_clip(dtype=torch.bfloat16):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from lightx2v.models.wan.clip import WanImageEncoder, openclip_image_processor

    cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.device("cuda"):
        model = CLIPVisionModel(cfg)
    randomise_(model, 2)
    return WanImageEncoder(openclip_image_processor(), model.to(dtype).eval()).drop_last_layer()


def build_t5(dtype=torch.bfloat16):
    """umt5-xxl sizes (5.7B parameters) with a small self-made tokenizer (prompts are padded to 512 tokens anyway,
    so the cost is that of the real model)."""
    import tempfile

    from transformers import UMT5Config, UMT5EncoderModel

    from lightx2v.models.wan.encoders import WanTextEncoder, build_tiny_tokenizer

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    with torch.device("cuda"):
        model = UMT5EncoderModel(cfg)
    randomise_(model, 3)
    tok = build_tiny_tokenizer(Path(tempfile.mkdtemp()))
    return WanTextEncoder(tok, model.to(dtype).eval())


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30
