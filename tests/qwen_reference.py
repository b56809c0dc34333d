"""Tiny random-weight Qwen-Image reference pipelines built with diffusers / transformers (test-only).

The tokenizer is the tiny Qwen2 BPE of ``lightx2v.models.qwen_image.tiny`` (no download). transformers 5 cannot build
``Qwen2VLProcessor`` without torchvision (its video processor's base class is missing), so :func:`qwen_processor`
builds the real class with that one type check skipped: the processor's own code (image processing, image-token
expansion, tokenization) is what the edit pipelines then run.
"""

from __future__ import annotations

import contextlib

import torch

from lightx2v.models.qwen_image.tiny import (TINY_DIT, TINY_VAE, build_tiny_tokenizer, make_prompt_matter_,
                                             randomise_, tiny_image_processor, tiny_text_encoder_config)

PROMPT = "a photo of a cat holding a sign that says hello world"
OTHER_PROMPT = "a red car in the snow"


@contextlib.contextmanager
def _no_video_processor_check():
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None if arg is None \
        else check(self, name, arg)
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def qwen_processor(tokenizer, image_processor=None):
    """transformers' Qwen2VLProcessor over ``tokenizer`` and the tiny image processor, without a video processor."""
    from transformers import Qwen2VLProcessor

    with _no_video_processor_check():
        return Qwen2VLProcessor(image_processor=image_processor or tiny_image_processor(), tokenizer=tokenizer,
                                video_processor=None)


def tiny_text_encoder(tokenizer, seed: int = 1):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config(tokenizer)).eval()
    return randomise_(model, torch.Generator().manual_seed(seed))


def tiny_diffusers_dit(seed: int = 2, zero_cond_t: bool = False, **overrides):
    import diffusers

    cfg = TINY_DIT.to_diffusers_config()
    cfg.update(zero_cond_t=zero_cond_t, **overrides)
    dit = diffusers.QwenImageTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    return make_prompt_matter_(randomise_(dit, torch.Generator().manual_seed(seed)))


def tiny_diffusers_vae(seed: int = 3):
    import diffusers

    cfg = TINY_VAE.to_diffusers_config()
    vae = diffusers.AutoencoderKLQwenImage(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    return randomise_(vae, torch.Generator().manual_seed(seed))


def tiny_scheduler():
    import diffusers

    from lightx2v.models.qwen_image.scheduler import FlowMatchConfig

    cfg = FlowMatchConfig().to_diffusers_config()
    return diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def build_pipeline(variant: str, tok_dir, zero_cond_t: bool = False):
    """A diffusers QwenImagePipeline ("t2i"), QwenImageEditPipeline ("edit") or QwenImageEditPlusPipeline
    ("edit_plus") at toy sizes, random weights."""
    import diffusers

    tokenizer = build_tiny_tokenizer(tok_dir)
    parts = dict(scheduler=tiny_scheduler(), vae=tiny_diffusers_vae(), text_encoder=tiny_text_encoder(tokenizer),
                 tokenizer=tokenizer, transformer=tiny_diffusers_dit(zero_cond_t=zero_cond_t))
    if variant == "t2i":
        return diffusers.QwenImagePipeline(**parts)
    cls = diffusers.QwenImageEditPipeline if variant == "edit" else diffusers.QwenImageEditPlusPipeline
    return cls(**parts, processor=qwen_processor(tokenizer))


def save_pipeline(pipe, folder):
    """``save_pretrained``; the processor (which transformers cannot save without its video processor) is written as
    the releases hold it: its tokenizer and image processor in ``processor/``."""
    import json
    from pathlib import Path

    processor = getattr(pipe, "processor", None)
    if processor is None:
        pipe.save_pretrained(str(folder))
        return folder
    pipe.register_modules(processor=None)
    try:
        pipe.save_pretrained(str(folder))
    finally:
        pipe.register_modules(processor=processor)
    processor.tokenizer.save_pretrained(str(Path(folder) / "processor"))
    processor.image_processor.save_pretrained(str(Path(folder) / "processor"))
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2))
    return folder


def rel_max(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def picture(w, h, seed):
    from tiny_reference import picture as _picture

    return _picture(w, h, seed)
