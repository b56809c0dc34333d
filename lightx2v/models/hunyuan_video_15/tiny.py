"""The built-in tiny HunyuanVideo-1.5: the real architecture at toy sizes with fixed random weights.

``write_tiny_model(folder)`` writes it in diffusers' layout (``model_index.json`` + the pipeline's folders, loadable by
diffusers' ``HunyuanVideo15Pipeline`` / ``HunyuanVideo15ImageToVideoPipeline`` too) or in the release's
(``layout="release"``), so that a run without a checkpoint goes through the real loaders. Its output is noise.

The tokenizers are made here, offline: a byte-level BPE trained (deterministically) on the reference's system message
and a few hundred common words, with a Qwen-style chat template, sized so that the template before the user's text is
exactly the 108 tokens the reference crops (as with the real Qwen2.5-VL tokenizer); and transformers' ``ByT5Tokenizer``
(which needs no files).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from lightx2v.models.hunyuan_video_15.arch import HunyuanVideo15DiTConfig, HunyuanVideo15VAEConfig

TINY_VERSION = 1  # bump when the tiny model changes, so cached copies are rewritten
TINY_DIT = HunyuanVideo15DiTConfig(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=2, num_refiner_layers=2, text_embed_dim=32, text_embed_2_dim=24,
                                   image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v")
TINY_VAE = HunyuanVideo15VAEConfig(latent_channels=4, block_out_channels=(8, 16, 16, 32, 32), layers_per_block=1)
TINY_QWEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]})
TINY_BYT5 = dict(d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3, relative_attention_num_buckets=32,
                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)
TINY_SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                   patch_size=14)
TINY_SHIFT, TINY_GUIDANCE = 5.0, 6.0
# Request defaults of the tiny model (config keys; a config JSON and arguments still win): a 2-core CPU runs them in
# seconds. The size is the family's (T2V: the 16:9 bucket of target_size 64, 80x48; I2V: the image's bucket).
TINY_DEFAULTS = {"num_frames": 9, "infer_steps": 4}

_QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_QWEN_VOCAB = 868  # trained size at which the template prefix is 108 tokens (checked below)
_WORDS = """a an the and or of in on at with to is are was from by for into over under near through while as his her
their its this that it he she they one two three some many very not no up down out off back front behind cat cats dog
dogs man men woman women person people child children girl boy baby bird birds fish horse car cars city street forest
tree trees river lake sea ocean beach wave waves mountain mountains sky cloud clouds sun moon star stars night day
morning evening light rain snow wind water fire road house room kitchen garden field flower flowers grass table chair
window door book food cake ball hat dress shirt hair face eyes hand hands red blue green yellow white black orange
purple pink brown gray golden dark bright small large big tall little old young new beautiful happy slow fast slowly
quickly gentle soft warm cold walks walking runs running flies flying sits sitting stands standing plays playing dances
dancing swims swimming jumps jumping looks looking eats eating holds holding wears wearing rides riding drives driving
smiles smiling moves moving falls falling camera shot view close wide scene video style realistic cinematic motion
background foreground detailed high quality low picture frame frames sign text says reads open welcome""".split()


def build_tiny_qwen_tokenizer(folder) -> "object":
    """Write the tiny Qwen-style tokenizer to ``folder`` and return it (loaded back with ``AutoTokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lightx2v.models.hunyuan_video_15.text_encoder import SYSTEM_MESSAGE, TEMPLATE_PREFIX_TOKENS

    prefix = f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_QWEN_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator([" ".join(_WORDS)] * 4 + [prefix], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="right", model_max_length=4096)
    fast.chat_template = _QWEN_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    n = len(loaded(prefix, add_special_tokens=False)["input_ids"])
    if n != TEMPLATE_PREFIX_TOKENS:  # pragma: no cover - depends only on the tokenizers library's BPE trainer
        raise RuntimeError(f"tiny Qwen tokenizer: template prefix is {n} tokens, expected {TEMPLATE_PREFIX_TOKENS}")
    return loaded


def tiny_qwen_config(tokenizer):
    from transformers import Qwen2_5_VLTextConfig

    return Qwen2_5_VLTextConfig(vocab_size=len(tokenizer), bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), **TINY_QWEN)


def build_tiny_byt5_tokenizer(folder):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.save_pretrained(str(folder))
    return tok


def randomise(module: torch.nn.Module, g: torch.Generator) -> None:
    """N(0, 1/fan_in) matrices, norm weights near 1, small vectors."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith(("gamma", "norm.weight")) or ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def amplify_condition(dit: torch.nn.Module, factor: float = 4.0) -> None:
    """Make the condition tokens matter at toy size: larger condition keys and values in every joint attention.
    Works on our DiT and on diffusers' (same parameter names)."""
    with torch.no_grad():
        for block in dit.transformer_blocks:
            block.attn.norm_added_k.weight.mul_(factor)
            block.attn.add_v_proj.weight.mul_(factor)


def _save_hf(model, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)


def write_tiny_model(folder, task: str = "t2v", layout: str = "diffusers", seed: int = 20260115) -> Path:
    """Write the tiny model for ``task`` ("t2v" or "i2v": the I2V one adds SigLIP) in ``layout``; returns ``folder``."""
    from transformers import (Qwen2_5_VLTextModel, SiglipImageProcessor, SiglipVisionConfig,
                              SiglipVisionModel, T5Config, T5EncoderModel)

    from lightx2v.models.hunyuan_video_15.checkpoint import save_dit, save_vae
    from lightx2v.models.hunyuan_video_15.dit import HunyuanVideo15DiT
    from lightx2v.models.hunyuan_video_15.vae import HunyuanVideo15VAE
    from lightx2v.ops.attention import get_attention_backend

    if task not in ("t2v", "i2v") or layout not in ("diffusers", "release"):
        raise ValueError(f"task {task!r} / layout {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    cfg = replace(TINY_DIT, task_type=task)
    attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=cfg.attention_head_dim,
                                 device=torch.device("cpu"))
    dit = HunyuanVideo15DiT(cfg, attn)
    randomise(dit, g)
    amplify_condition(dit)
    vae = HunyuanVideo15VAE(TINY_VAE)
    randomise(vae, g)

    tmp_tok = folder / ".tok"
    qwen_tok = build_tiny_qwen_tokenizer(tmp_tok / "qwen")
    qwen = Qwen2_5_VLTextModel(tiny_qwen_config(qwen_tok))
    byt5_tok = build_tiny_byt5_tokenizer(tmp_tok / "byt5")
    byt5 = T5EncoderModel(T5Config(vocab_size=len(byt5_tok), **TINY_BYT5))
    for m in (qwen, byt5):
        randomise(m, g)
    if task == "i2v":
        siglip = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP))
        randomise(siglip, g)
        processor = SiglipImageProcessor(size={"height": TINY_SIGLIP["image_size"],
                                               "width": TINY_SIGLIP["image_size"]},
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3)

    if layout == "diffusers":
        name = "transformer"
        save_dit(dit, folder / name, "diffusers")
        save_vae(vae, folder, "diffusers")
        _save_hf(qwen, folder / "text_encoder")
        qwen_tok.save_pretrained(str(folder / "tokenizer"))
        _save_hf(byt5, folder / "text_encoder_2")
        byt5_tok.save_pretrained(str(folder / "tokenizer_2"))
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": TINY_SHIFT}))
        (folder / "guider").mkdir(exist_ok=True)
        (folder / "guider" / "guider_config.json").write_text(json.dumps(
            {"_class_name": "ClassifierFreeGuidance", "guidance_scale": TINY_GUIDANCE, "guidance_rescale": 0.0,
             "use_original_formulation": False, "start": 0.0, "stop": 1.0, "enabled": True}))
        index = {"_class_name": "HunyuanVideo15ImageToVideoPipeline" if task == "i2v" else "HunyuanVideo15Pipeline",
                 "_diffusers_version": "0.42.1",
                 "transformer": ["diffusers", "HunyuanVideo15Transformer3DModel"],
                 "vae": ["diffusers", "AutoencoderKLHunyuanVideo15"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "guider": ["diffusers", "ClassifierFreeGuidance"],
                 "text_encoder": ["transformers", "Qwen2_5_VLTextModel"],
                 "tokenizer": ["transformers", type(qwen_tok).__name__],
                 "text_encoder_2": ["transformers", "T5EncoderModel"],
                 "tokenizer_2": ["transformers", "ByT5Tokenizer"]}
        if task == "i2v":
            _save_hf(siglip, folder / "image_encoder")
            processor.save_pretrained(str(folder / "feature_extractor"))
            index.update(image_encoder=["transformers", "SiglipVisionModel"],
                         feature_extractor=["transformers", "SiglipImageProcessor"])
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        save_dit(dit, folder / "transformer" / f"480p_{task}", "release")
        save_vae(vae, folder, "release")
        _save_hf(qwen, folder / "text_encoder" / "llm")
        qwen_tok.save_pretrained(str(folder / "text_encoder" / "llm"))
        byt5_dir = folder / "text_encoder" / "byt5-small"
        byt5.config.save_pretrained(str(byt5_dir))
        byt5_tok.save_pretrained(str(byt5_dir))
        glyph = folder / "text_encoder" / "Glyph-SDXL-v2"
        (glyph / "checkpoints").mkdir(parents=True, exist_ok=True)
        (glyph / "assets").mkdir(parents=True, exist_ok=True)
        # no extra colour / font tokens at toy size: the vocabulary stays ByT5's own
        (glyph / "assets" / "color_idx.json").write_text("{}")
        (glyph / "assets" / "multilingual_10-lang_idx.json").write_text("{}")
        stack = {k[len("encoder."):]: v.contiguous() for k, v in byt5.state_dict().items() if k.startswith("encoder.")}
        torch.save(stack, str(glyph / "checkpoints" / "byt5_model.pt"))
        if task == "i2v":
            base = folder / "vision_encoder" / "siglip"
            _save_hf(siglip, base / "image_encoder")
            processor.save_pretrained(str(base / "feature_extractor"))
    shutil.rmtree(tmp_tok, ignore_errors=True)
    return folder


def ensure_tiny_model(task: str = "t2v", root: Path | None = None) -> Path:
    """The tiny model of ``task`` in diffusers' layout under ``root`` (default: lightx2v's cache folder), written
    first if it is not there (atomically: written aside, then renamed; a copy written meanwhile by another process is
    kept), with its request defaults in ``lightx2v_defaults.json``."""
    from lightx2v.loading import cache_root

    folder = Path(root or cache_root()) / f"tiny-hunyuan_video_1.5-{task}-v{TINY_VERSION}"
    if (folder / "COMPLETE").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-hunyuan_video_1.5-", dir=folder.parent))
    try:
        write_tiny_model(tmp, task, "diffusers")
        (tmp / "lightx2v_defaults.json").write_text(json.dumps(TINY_DEFAULTS, indent=2) + "\n")
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
