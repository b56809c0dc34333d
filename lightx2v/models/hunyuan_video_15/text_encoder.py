"""HunyuanVideo-1.5's two text encoders, as the reference pipelines combine them.

* Qwen2.5-VL-7B's language model (transformers' ``Qwen2_5_VLTextModel``) reads the prompt inside a chat template with
  a fixed system message; the hidden states of the third-to-last entry of ``hidden_states`` are kept, the first 108
  positions (the template up to the user's text, as tokenized by the Qwen2.5-VL tokenizer) are dropped, and at most
  1000 prompt tokens remain (diffusers' ``_get_mllm_prompt_embeds``).
* ByT5 (``T5EncoderModel``, the Glyph-SDXL-v2 weights) reads only the text in quotes (``"..."`` or ``“...”``),
  formatted as ``Text "a". Text "b". `` and padded to 256 bytes; a prompt without quotes has no glyph tokens
  (diffusers' ``_get_byt5_prompt_embeds`` / ``extract_glyph_texts``).

Both return only the valid tokens (``[1, L, D]``; ``L`` may be 0 for the glyph encoder), which is what our DiT takes.
``encode_padded`` gives the reference's padded tensors and masks as well (for parity tests).
"""

from __future__ import annotations

import re

import torch

from lightx2v.errors import UserError

# The system message of the reference pipelines, character for character (its line continuations keep 8 spaces).
_ASPECTS = ("1. The main content and theme of the video.",
            "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
            "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
            "4. background environment, light, style and atmosphere.",
            "5. camera angles, movements, and transitions used in the video.")
SYSTEM_MESSAGE = ("You are a helpful assistant. Describe the video by detailing the following aspects: "
                  + " ".join(" " * 8 + a for a in _ASPECTS))
TEMPLATE_PREFIX_TOKENS = 108  # tokens of the chat template before the user's text (Qwen2.5-VL tokenizer)
MAX_PROMPT_TOKENS = 1000
SKIP_LAST_LAYERS = 2  # hidden_states[-(2 + 1)]
GLYPH_MAX_TOKENS = 256

_GLYPH_PATTERN = re.compile(r"\"(.*?)\"|“(.*?)”")


def chat_messages(prompt: str) -> list[dict]:
    """The chat the Qwen tokenizer's template turns into tokens (an empty prompt becomes one space)."""
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt if prompt else " "}]


def glyph_text(prompt: str) -> str | None:
    """The quoted parts of ``prompt`` as the ByT5 input ``'Text "a". Text "b". '`` (duplicates dropped when there are
    several), or None when nothing is quoted."""
    found = [a or b for a, b in _GLYPH_PATTERN.findall(prompt)]
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    if not found:
        return None
    return ". ".join(f'Text "{t}"' for t in found) + ". "


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise UserError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    return prompt


class QwenTextEncoder:
    """A Qwen2.5-VL tokenizer (with its chat template) and ``Qwen2_5_VLTextModel``."""

    def __init__(self, tokenizer, model, crop_start: int = TEMPLATE_PREFIX_TOKENS,
                 max_tokens: int = MAX_PROMPT_TOKENS):
        self.tokenizer = tokenizer
        self.model = model
        self.crop_start = crop_start
        self.max_tokens = max_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device):
        """Move the model (the tokenizer has no tensors); returns self."""
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode_padded(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (``[1, 1000, D]`` hidden states, ``[1, 1000]`` mask) exactly as the reference computes them."""
        prompt = _check_prompt(prompt)
        batch = self.tokenizer.apply_chat_template(
            [chat_messages(prompt)], add_generation_prompt=True, tokenize=True, return_dict=True,
            padding="max_length", max_length=self.max_tokens + self.crop_start, truncation=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-(SKIP_LAST_LAYERS + 1)]
        return hidden[:, self.crop_start:], mask[:, self.crop_start:]

    def encode(self, prompt: str) -> torch.Tensor:
        """-> ``[1, L, D]``: the hidden states of the prompt's valid tokens (after the template prefix)."""
        hidden, mask = self.encode_padded(prompt)
        return hidden[mask.bool()][None]


class GlyphTextEncoder:
    """A ByT5 tokenizer and ``T5EncoderModel`` for the quoted text of a prompt."""

    def __init__(self, tokenizer, model, max_tokens: int = GLYPH_MAX_TOKENS):
        self.tokenizer = tokenizer
        self.model = model
        self.max_tokens = max_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device):
        """Move the model (the tokenizer has no tensors); returns self."""
        self.model.to(device)
        return self

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.inference_mode()
    def encode_padded(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (``[1, 256, D]``, ``[1, 256]`` mask); zeros and an empty mask when nothing is quoted (as the
        reference)."""
        text = glyph_text(_check_prompt(prompt))
        dtype = next(self.model.parameters()).dtype
        if text is None:
            return (torch.zeros(1, self.max_tokens, self.dim, device=self.device, dtype=dtype),
                    torch.zeros(1, self.max_tokens, dtype=torch.int64, device=self.device))
        tok = self.tokenizer(text, padding="max_length", max_length=self.max_tokens, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        return self.model(input_ids=ids, attention_mask=mask.float())[0], mask

    def encode(self, prompt: str) -> torch.Tensor:
        """-> ``[1, L, D]`` states of the glyph tokens (``L = 0`` when the prompt quotes nothing)."""
        hidden, mask = self.encode_padded(prompt)
        return hidden[mask.bool()][None]
