"""Z-Image's text encoder: Qwen3 (transformers' ``Qwen3Model``) and its tokenizer, as ``ZImagePipeline`` uses them.

Per prompt (diffusers 0.42.1, ``ZImagePipeline._encode_prompt``):

1. the prompt becomes one user turn of the tokenizer's chat template, with the generation prompt and
   ``enable_thinking=True`` (Qwen3's template then gives
   ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``);
2. it is tokenized padded to ``max_sequence_length`` (512) tokens, truncating longer ones, with the attention mask;
3. the features are the hidden states entering the LAST decoder layer (``hidden_states[-2]``: after
   ``num_hidden_layers - 1`` layers, without the final norm), kept only at the prompt's own (unmasked) tokens:
   a ``[L, hidden_size]`` tensor, L the templated prompt's token count.

Since nothing after that point is used, we build the model with ``num_hidden_layers - 1`` layers and no final norm:
the same numbers at 1/num_hidden_layers less compute and memory. The checkpoint's last layer and final norm (and
``lm_head`` of a ``Qwen3ForCausalLM`` save) are checked like every other tensor (names and shapes) and then not read.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from lightx2v.errors import CheckpointError, UserError

DEFAULT_MAX_SEQUENCE_LENGTH = 512


class ZImageTextEncoder:
    """A tokenizer (with a chat template) and a ``Qwen3Model`` cut after its second-to-last layer."""

    def __init__(self, tokenizer, model, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise CheckpointError("the Z-Image tokenizer has no chat template (ZImagePipeline formats every prompt "
                                  "with it)")
        self.tokenizer = tokenizer
        self.model = model
        self.max_sequence_length = max_sequence_length

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def template(self, prompt: str) -> str:
        """The prompt as one user turn of the chat template, ready for the assistant's answer."""
        if not isinstance(prompt, str):
            raise UserError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)

    def tokenize(self, prompt: str, max_sequence_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids [1, T], mask [1, T] bool), T = max_sequence_length (default: the encoder's), of the
        templated prompt: padded to T tokens, or truncated to them."""
        n = self.max_sequence_length if max_sequence_length is None else max_sequence_length
        batch = self.tokenizer([self.template(prompt)], padding="max_length", max_length=n, truncation=True,
                               return_tensors="pt")
        return batch.input_ids, batch.attention_mask.bool()

    @torch.inference_mode()
    def encode(self, prompt: str, max_sequence_length: int | None = None) -> torch.Tensor:
        """-> [L, hidden_size] features of the prompt's tokens (L <= max_sequence_length), in the model's dtype, on
        the model's device."""
        ids, mask = self.tokenize(prompt, max_sequence_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [1, T, hidden]
        return hidden[0][mask[0]]


# ----------------------------------------------------------------------------------------------------------------------
# building and strict loading


def read_qwen3_config(path: Path):
    """transformers' ``Qwen3Config`` from ``text_encoder/config.json`` (CheckpointError if it is not a Qwen3 one)."""
    from transformers import Qwen3Config

    from lightx2v.loading import read_json

    raw = read_json(path, "text encoder config")
    if raw.get("model_type") != "qwen3":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen3'")
    try:
        cfg = Qwen3Config.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid Qwen3 config: {e}") from e
    if cfg.num_hidden_layers < 2:
        raise CheckpointError(f"{path}: num_hidden_layers is {cfg.num_hidden_layers}; Z-Image reads the hidden "
                              "states before the last layer, so it needs at least 2")
    return cfg


def truncated_config(cfg):
    """The config of the model we run: one layer fewer (the last layer's output is never used)."""
    cut = copy.deepcopy(cfg)
    cut.num_hidden_layers = cfg.num_hidden_layers - 1
    cut.layer_types = list(cfg.layer_types)[: cut.num_hidden_layers]
    return cut


def checkpoint_key_map(keys, what: str) -> tuple[dict[str, str], str]:
    """Map the checkpoint's keys to ``Qwen3Model`` names.

    Two layouts: ``Qwen3Model``'s own names (``layers.0.mlp.up_proj.weight``), or a ``Qwen3ForCausalLM`` save
    (``model.`` prefix, plus an optional ``lm_head.weight``, which is never read: Z-Image uses hidden states).
    Returns ``{model_key: checkpoint_key}`` and the prefix (``""`` or ``"model."``).
    """
    keys = list(keys)
    prefix = "model." if any(k.startswith("model.") for k in keys) else ""
    if not prefix:
        return {k: k for k in keys}, prefix
    stray = sorted(k for k in keys if not k.startswith(prefix) and k != "lm_head.weight")
    if stray:
        raise CheckpointError(f"{what}: keys outside the 'model.' prefix of a Qwen3ForCausalLM checkpoint: "
                              f"{', '.join(stray)}")
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}, prefix


def dropped_keys(cfg, names) -> set[str]:
    """The ``Qwen3Model`` names among ``names`` that the cut model does not have: the last layer and the final
    norm."""
    last = f"layers.{cfg.num_hidden_layers - 1}."
    return {n for n in names if n.startswith(last) or n == "norm.weight"}


def build_text_model(cfg, device, dtype: torch.dtype, tensors) -> nn.Module:
    """A ``Qwen3Model`` of ``truncated_config(cfg)`` filled from ``tensors`` ({Qwen3Model name: tensor} of the kept
    keys, already checked), with its final norm replaced by identity and its RoPE buffers rebuilt on ``device``."""
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from lightx2v.loading import assign_strict

    cut = truncated_config(cfg)
    with torch.device("meta"):
        model = Qwen3Model(cut)
    model.norm = nn.Identity()
    assign_strict(model, tensors, what="Z-Image text encoder", dtype_for=lambda _n: dtype, device=device)
    model.rotary_emb = Qwen3RotaryEmbedding(config=cut).to(device)  # non-persistent buffers: not in the checkpoint
    return model.eval().requires_grad_(False)


def load_tokenizer(tok_dir: Path, vocab_size: int):
    from transformers import AutoTokenizer

    if not tok_dir.is_dir():
        raise CheckpointError(f"missing tokenizer folder: {tok_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {tok_dir}: {e}") from e
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"tokenizer in {tok_dir} has {len(tokenizer)} tokens but the text encoder's "
                              f"vocabulary has {vocab_size}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise CheckpointError(f"tokenizer in {tok_dir} has no chat template (ZImagePipeline formats every prompt "
                              "with it)")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# a small self-made Qwen-style tokenizer for the built-in tiny model and the tests

# Qwen3's chat template reduced to what Z-Image uses (plain text turns, the generation prompt, the thinking switch);
# it renders one user turn exactly as Qwen3's does.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_TINY_WORDS = ("the", "and", "with", "coffee", "shop", "sign", "light", "neon", "poster", "cinematic", "image",
               "cat", "dog", "red", "blue", "woman", "man", "city", "night", "ultra")


def _tiny_merges() -> list[tuple[str, str]]:
    """BPE merges that build a few common English words letter by letter (with and without the leading-space byte
    'Ġ'), so the tiny tokenizer makes multi-byte tokens as a real one does."""
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in _TINY_WORDS:
        for symbols in (["Ġ", *word], list(word)):
            piece = symbols[0]
            for ch in symbols[1:]:
                if (piece, ch) not in seen:
                    seen.add((piece, ch))
                    merges.append((piece, ch))
                piece += ch
    return merges


def build_tiny_tokenizer(out_dir: Path):
    """Write a small deterministic Qwen2-style tokenizer to ``out_dir`` and return it as ``AutoTokenizer`` loads it.

    Byte-level BPE like Qwen's (every UTF-8 byte is a token, so emoji and Chinese text always tokenize; Qwen2's
    pre-tokenizer regex), a few hundred merges of common words, the special tokens ``<|endoftext|>`` (also padding),
    ``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``, and :data:`TINY_CHAT_TEMPLATE`.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer, Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = _tiny_merges()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(_TINY_SPECIALS[1:]),
                         model_max_length=131072)
    tok.chat_template = TINY_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
