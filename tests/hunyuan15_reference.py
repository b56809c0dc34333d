"""Tiny random-weight HunyuanVideo-1.5 reference components built with diffusers / transformers (test-only).

Sizes come from lightx2v.models.hunyuan_video_15.tiny (the built-in tiny model's), the modules from diffusers 0.42.1
and transformers; the tokenizers are built offline (tiny.build_tiny_qwen_tokenizer, transformers' ByT5Tokenizer).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lightx2v.models.hunyuan_video_15 import tiny

PROMPT = 'a cat walks on the grass next to a sign that says "OPEN"'
OTHER_PROMPT = "a red car drives down a dark street at night"
NEGATIVE = "blurred, low quality"


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """N(0, 1/fan_in) matrices, norm weights / gammas near 1, small biases (deterministic per seed)."""
    g = torch.Generator().manual_seed(seed)
    tiny.randomise(module, g)
    return module.eval()


def diffusers_dit(task: str = "t2v", seed: int = 2, **overrides):
    import diffusers

    cfg = replace(tiny.TINY_DIT, task_type=task, **overrides).to_diffusers_config()
    cfg.pop("_class_name")
    dit = randomise(diffusers.HunyuanVideo15Transformer3DModel(**cfg), seed)
    tiny.amplify_condition(dit)  # make the prompt matter at toy size
    return dit


def diffusers_vae(seed: int = 3):
    import diffusers

    cfg = tiny.TINY_VAE.to_diffusers_config()
    cfg.pop("_class_name")
    return randomise(diffusers.AutoencoderKLHunyuanVideo15(**cfg), seed)


def qwen(tok_dir, seed: int = 4):
    from transformers import Qwen2_5_VLTextModel

    tok = tiny.build_tiny_qwen_tokenizer(tok_dir)
    return tok, randomise(Qwen2_5_VLTextModel(tiny.tiny_qwen_config(tok)), seed)


def byt5(tok_dir, seed: int = 5):
    from transformers import T5Config, T5EncoderModel

    tok = tiny.build_tiny_byt5_tokenizer(tok_dir)
    return tok, randomise(T5EncoderModel(T5Config(vocab_size=len(tok), **tiny.TINY_BYT5)), seed)


def siglip(seed: int = 6):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    model = randomise(SiglipVisionModel(SiglipVisionConfig(**tiny.TINY_SIGLIP)), seed)
    size = tiny.TINY_SIGLIP["image_size"]
    processor = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3, resample=3)
    return processor, model


def diffusers_pipeline(tok_root, task: str = "t2v", guidance: float = tiny.TINY_GUIDANCE,
                       shift: float = tiny.TINY_SHIFT):
    """diffusers' HunyuanVideo15Pipeline (t2v) or HunyuanVideo15ImageToVideoPipeline (i2v) of tiny components."""
    import diffusers

    from pathlib import Path

    tok_root = Path(tok_root)
    tokenizer, text_encoder = qwen(tok_root / "qwen")
    tokenizer_2, text_encoder_2 = byt5(tok_root / "byt5")
    parts = dict(text_encoder=text_encoder, tokenizer=tokenizer, transformer=diffusers_dit(task), vae=diffusers_vae(),
                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                 guider=diffusers.ClassifierFreeGuidance(guidance_scale=guidance))
    if task == "i2v":
        processor, image_encoder = siglip()
        return diffusers.HunyuanVideo15ImageToVideoPipeline(**parts, image_encoder=image_encoder,
                                                            feature_extractor=processor)
    return diffusers.HunyuanVideo15Pipeline(**parts)


def run_diffusers(pipe, prompt, seed=42, **kw) -> torch.Tensor:
    """The reference's frames [F, H, W, 3] for one prompt (float32 in [0, 1])."""
    import numpy as np

    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).frames[0]
    return torch.from_numpy(np.asarray(out))
