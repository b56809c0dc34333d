"""The built-in tiny Qwen-Image: the release's architecture at toy sizes with fixed random weights.

:func:`write_tiny_model` writes it in the release's diffusers layout (``model_index.json``, ``transformer/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, and for edit variants ``processor/``), so that a run
without a checkpoint goes through the real loaders, and diffusers' pipelines load the same folder. Its output is
noise: it exists to check an installation and to test the whole pipeline.

The tokenizer is self-made (no download): a byte-level BPE in Qwen2's format (transformers' ``Qwen2Tokenizer``)
trained on the prompt templates, so that every template word is one token, as with the real Qwen2 tokenizer, and
the pipelines' dropped-token counts (34, 64) cut the template exactly where they do with it; plus Qwen's special
tokens (``<|im_start|>``, ``<|image_pad|>``, ...).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from lightx2v.models.qwen_image.arch import VARIANTS, QwenImageDiTConfig, QwenImageVAEConfig
from lightx2v.models.qwen_image.text_encoder import (EDIT_TEMPLATE, PROCESSOR_DIR, T2I_TEMPLATE, TEXT_ENCODER_DIR,
                                                     TOKENIZER_DIR)

TINY_VERSION = 2  # bump when the tiny model (or its lightx2v_defaults.json) changes: cached copies are rewritten
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_CORPUS = (T2I_TEMPLATE, EDIT_TEMPLATE, "Picture 1: Picture 2: Picture 3: ",
           "a photo of a cat holding a sign that says hello world, a red car in the snow, a dog on the beach at "
           "sunset, make the sky blue, turn it into a watercolor painting, add a hat, remove the person")
TEXT_HIDDEN = 32
TINY_DIT = QwenImageDiTConfig(num_layers=2, attention_head_dim=16, num_attention_heads=2,
                              joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6))
TINY_VAE = QwenImageVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
# Sizes a 2-core CPU runs in about a second (edit images: at 256**2 pixels for the VAE and 128**2 for the vision
# tower instead of the release's 1024**2 / 384**2).
TINY_DEFAULTS = {"height": 128, "width": 128, "infer_steps": 8, "guidance_scale": 4.0}
TINY_OPTIONS = {"vae_image_size": 256 * 256, "condition_image_size": 128 * 128, "resolution": 128}
# LightX2V's aspect-ratio names at tiny sizes (the release's ratios, roughly; multiples of 16)
TINY_ASPECT_RATIOS = {"16:9": (160, 96), "9:16": (96, 160), "1:1": (128, 128), "4:3": (128, 96), "3:4": (96, 128),
                      "3:2": (144, 96), "2:3": (96, 144)}
DEFAULTS_FILE = "lightx2v_defaults.json"  # the engine reads a model folder's defaults from it
PIPELINES = {"t2i": "QwenImagePipeline", "edit": "QwenImageEditPipeline", "edit_plus": "QwenImageEditPlusPipeline"}


def build_tiny_tokenizer(out_dir: str | Path | None = None):
    """A small Qwen2 byte-level BPE tokenizer (see the module docstring), saved to ``out_dir`` when given."""
    import tokenizers
    from tokenizers import Regex, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(_CORPUS) * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def tiny_text_encoder_config(tokenizer):
    """A Qwen2.5-VL of hidden size 32 with a 2-block vision tower (patch 14, 2x2 merge), token ids of ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, rope_theta=1e6,
                         max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def tiny_image_processor():
    """transformers' Qwen2-VL image processor (PIL backend) with a small pixel budget (<= 64 merged tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)


def randomise_(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """N(0, 1/fan_in) matrices, norm weights near 1, small biases (in place)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def make_prompt_matter_(dit: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale the text stream's key/value projections (our or diffusers' DiT: same names) so that the image tokens
    attend to the text and the prompt visibly changes a tiny model's output."""
    with torch.no_grad():
        for block in dit.transformer_blocks:
            block.attn.add_k_proj.weight.mul_(factor)
            block.attn.add_v_proj.weight.mul_(factor)
    return dit


def engine_defaults(variant: str = "t2i") -> dict:
    """The config keys of the tiny model's ``lightx2v_defaults.json`` (the engine's "defaults" tier: a config JSON
    and arguments still win): few steps, the aspect-ratio names at tiny sizes, and for the edit variants the small
    image areas of ``TINY_OPTIONS`` (LightX2V's key ``CONDITION_IMAGE_SIZE`` for the vision tower's)."""
    out = {"infer_steps": TINY_DEFAULTS["infer_steps"], "guidance_scale": TINY_DEFAULTS["guidance_scale"],
           "aspect_ratios": {k: list(v) for k, v in TINY_ASPECT_RATIOS.items()}}
    if variant != "t2i":
        out.update(vae_image_size=TINY_OPTIONS["vae_image_size"],
                   CONDITION_IMAGE_SIZE=TINY_OPTIONS["condition_image_size"], resolution=TINY_OPTIONS["resolution"])
    return out


def ensure_tiny_model(variant: str = "t2i", root: Path | None = None) -> Path:
    """The folder of the tiny model of ``variant`` (t2i, edit, edit_plus), written first if needed (atomically:
    written aside, then renamed), with its :func:`engine_defaults` in ``lightx2v_defaults.json``."""
    from lightx2v.loading import cache_root

    folder = Path(root or cache_root()) / f"tiny-qwen-image-{variant}-v{TINY_VERSION}"
    if (folder / "COMPLETE").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        write_tiny_model(tmp, variant)
        (tmp / DEFAULTS_FILE).write_text(json.dumps(engine_defaults(variant), indent=2) + "\n")
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            tmp.rename(folder)
        except OSError:  # written meanwhile by another process
            if not (folder / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_tiny_model(folder: str | Path, variant: str = "t2i", seed: int = 20260301) -> Path:
    """Write the tiny model of ``variant`` ("t2i", "edit", "edit_plus"; edit_plus with ``zero_cond_t`` like
    Qwen-Image-Edit-2511) to ``folder`` in the release's layout; returns the folder."""
    from dataclasses import replace

    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lightx2v.models.qwen_image.checkpoint import (DIT_WEIGHTS, MODEL_INDEX, SCHEDULER_CONFIG, SCHEDULER_DIR,
                                                       TRANSFORMER_DIR, VAE_DIR)
    from lightx2v.models.qwen_image.dit import QwenImageDiT
    from lightx2v.models.qwen_image.scheduler import FlowMatchConfig
    from lightx2v.models.qwen_image.vae import QwenImageVAE, save_qwen_image_vae
    from lightx2v.ops.attention import get_attention_backend

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    cfg = replace(TINY_DIT, zero_cond_t=variant == "edit_plus")
    attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=cfg.head_dim, device=torch.device("cpu"))
    dit = make_prompt_matter_(randomise_(QwenImageDiT(cfg, attn), g))
    (folder / TRANSFORMER_DIR).mkdir(exist_ok=True)
    (folder / TRANSFORMER_DIR / "config.json").write_text(json.dumps(cfg.to_diffusers_config(), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(folder / TRANSFORMER_DIR / f"{DIT_WEIGHTS}.safetensors"), metadata={"format": "pt"})

    save_qwen_image_vae(randomise_(QwenImageVAE(TINY_VAE), g), folder / VAE_DIR)

    tokenizer = build_tiny_tokenizer(folder / TOKENIZER_DIR)
    torch.manual_seed(seed)  # transformers' own init, then ours on top
    te = Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config(tokenizer)).eval()
    randomise_(te, g)
    te.save_pretrained(str(folder / TEXT_ENCODER_DIR))

    components = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                  "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                  "tokenizer": ["transformers", "Qwen2Tokenizer"],
                  "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                  "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    if variant != "t2i":
        tokenizer.save_pretrained(str(folder / PROCESSOR_DIR))
        tiny_image_processor().save_pretrained(str(folder / PROCESSOR_DIR))
        components["processor"] = ["transformers", "Qwen2VLProcessor"]

    (folder / SCHEDULER_DIR).mkdir(exist_ok=True)
    (folder / SCHEDULER_DIR / SCHEDULER_CONFIG).write_text(
        json.dumps(FlowMatchConfig().to_diffusers_config(), indent=2) + "\n")
    index = {"_class_name": PIPELINES[variant], "_diffusers_version": "0.42.1", **components}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder
