"""Wan2.1 text encoder: umt5-xxl run through transformers' ``UMT5EncoderModel``.

Numerics follow diffusers' ``WanPipeline._get_t5_prompt_embeds``: prompts are cleaned (:func:`prompt_clean`),
tokenized to exactly ``max_length`` tokens (padding, truncation, ``</s>`` appended), encoded with the attention mask,
and every position past a prompt's own token count is set to zero.

Two public checkpoint layouts are read (and written, for ``lightx2v convert``):

* ``"diffusers"``: ``text_encoder/`` (``config.json`` + ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``) and ``tokenizer/``.
* ``"wan"`` (the original Wan2.1 release): ``models_t5_umt5-xxl-enc-bf16.pth``, a torch state dict in Wan's own T5
  key names (see ``wan/modules/t5.py``: ``T5Encoder`` built with ``shared_pos=False``), and the tokenizer folder
  ``google/umt5-xxl/``. Keys are renamed through the declared tables :data:`WAN_TO_HF_KEYS` /
  :data:`HF_TO_WAN_KEYS` and the ``UMT5Config`` is inferred from the tensor shapes.

Models are built on the meta device and filled with ``load_state_dict(strict=False, assign=True)`` after an own strict
check: any missing, unexpected or mis-shaped tensor, and any missing file, raises
:class:`~lightx2v.errors.CheckpointError` naming all of them.
"""

from __future__ import annotations

import copy
import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

try:  # diffusers cleans with the third-party ``regex`` module; its ``\s`` differs from ``re`` on U+001C..U+001F
    import regex as _ws_re
except ImportError:  # pragma: no cover - regex is a dependency of transformers
    _ws_re = re

try:  # diffusers runs ftfy only when it is installed; it is a dependency of lightx2v
    import ftfy as _ftfy
except ImportError:  # pragma: no cover
    _ftfy = None

from lightx2v.errors import CheckpointError, UserError
from lightx2v.loading import (check_present, key_problems, read_json, read_safetensors_dir, rename_state_dict,
                              torch_load_state_dict)

__all__ = [
    "DIFFUSERS_TEXT_ENCODER_DIR",
    "DIFFUSERS_TOKENIZER_DIR",
    "HF_TO_WAN_KEYS",
    "WAN_T5_CHECKPOINT",
    "WAN_T5_TOKENIZER_DIR",
    "WAN_TO_HF_KEYS",
    "WanTextEncoder",
    "build_tiny_tokenizer",
    "infer_umt5_config",
    "load_text_encoder",
    "prompt_clean",
    "save_text_encoder",
    "t5_state_dict_from_wan",
    "t5_state_dict_to_wan",
]

WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_T5_TOKENIZER_DIR = "google/umt5-xxl"
DIFFUSERS_TEXT_ENCODER_DIR = "text_encoder"
DIFFUSERS_TOKENIZER_DIR = "tokenizer"
LAYOUTS = ("wan", "diffusers")

# transformers ties ``encoder.embed_tokens.weight`` to ``shared.weight``; checkpoints carry one or both.
_SHARED_KEY = "shared.weight"
_TIED_KEY = "encoder.embed_tokens.weight"

_HF_BLOCK = r"encoder.block.\1.layer"

#: Wan T5 key -> transformers UMT5EncoderModel key (first full match wins).
WAN_TO_HF_KEYS: tuple[tuple[str, str], ...] = (
    (r"token_embedding\.weight", "shared.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", _HF_BLOCK + r".0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k|v|o)\.weight", _HF_BLOCK + r".0.SelfAttention.\2.weight"),
    (
        r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
        _HF_BLOCK + r".0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"blocks\.(\d+)\.norm2\.weight", _HF_BLOCK + r".1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", _HF_BLOCK + r".1.DenseReluDense.wi_0.weight"),  # GELU branch
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", _HF_BLOCK + r".1.DenseReluDense.wi_1.weight"),  # linear branch
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", _HF_BLOCK + r".1.DenseReluDense.wo.weight"),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
)

_WAN_BLOCK = r"blocks.\1"

#: transformers UMT5EncoderModel key -> Wan T5 key (``encoder.embed_tokens.weight`` is folded into ``shared.weight``
#: before this table is applied).
HF_TO_WAN_KEYS: tuple[tuple[str, str], ...] = (
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", _WAN_BLOCK + ".norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight", _WAN_BLOCK + r".attn.\2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        _WAN_BLOCK + ".pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", _WAN_BLOCK + ".norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", _WAN_BLOCK + ".ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", _WAN_BLOCK + ".ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", _WAN_BLOCK + ".ffn.fc2.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
)

_WAN_TO_HF = tuple((re.compile(p), r) for p, r in WAN_TO_HF_KEYS)
_HF_TO_WAN = tuple((re.compile(p), r) for p, r in HF_TO_WAN_KEYS)

# umt5-xxl settings that a Wan checkpoint's shapes cannot tell.
_UMT5_XXL_FIXED = {
    "feed_forward_proj": "gated-gelu",  # UMT5Config turns this into dense_act_fn="gelu_new" (Wan's tanh GELU)
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

_DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


# ----------------------------------------------------------------------------------------------------------------------
# prompt cleaning


def prompt_clean(text: str) -> str:
    """Clean a prompt exactly like diffusers' Wan pipeline: ftfy ``fix_text``, ``html.unescape`` twice, strip,
    collapse every whitespace run to one space, strip."""
    if not isinstance(text, str):
        raise UserError(f"a prompt must be a string, got {type(text).__name__}: {text!r}")
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _ws_re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------------------------
# the encoder


class WanTextEncoder:
    """A tokenizer and a ``transformers.UMT5EncoderModel`` that turn prompts into Wan's text context."""

    def __init__(self, tokenizer, model) -> None:
        self.tokenizer = tokenizer
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device=None, dtype: torch.dtype | None = None) -> WanTextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def encode(self, prompts: Sequence[str], max_length: int = 512, device=None) -> torch.Tensor:
        """Return ``[len(prompts), max_length, d_model]`` embeddings in the encoder's dtype.

        Each row holds the encoder output for the prompt's tokens (``</s>`` included) and exact zeros after them. The
        encoder runs on the device of its weights; the result is moved to ``device`` when one is given.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise UserError("encode() needs at least one prompt, got an empty list")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise UserError(f"max_length must be an integer >= 1, got {max_length!r}")
        texts = [prompt_clean(p) for p in prompts]

        with torch.inference_mode():
            batch = self.tokenizer(
                texts,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            ids, mask = batch.input_ids, batch.attention_mask
            seq_lens = mask.gt(0).sum(dim=1).long()
            model_device = self.device
            hidden = self.model(ids.to(model_device), mask.to(model_device)).last_hidden_state
            out_device = model_device if device is None else torch.device(device)
            hidden = hidden.to(dtype=self.dtype, device=out_device)
            # keep the first seq_len positions of each row, exact zeros after them (diffusers: u[:v] + new_zeros)
            keep = torch.arange(hidden.shape[1], device=out_device)[None, :] < seq_lens.to(out_device)[:, None]
            return hidden.masked_fill(~keep[:, :, None], 0)


# ----------------------------------------------------------------------------------------------------------------------
# key mapping


def _rename(sd: Mapping[str, torch.Tensor], table, what: str) -> dict[str, torch.Tensor]:
    """Rename by a table of (regex, replacement) that must match whole keys."""
    def mapping(key: str) -> str | None:
        for pattern, repl in table:
            if pattern.fullmatch(key):
                return pattern.sub(repl, key)
        return None

    return rename_state_dict(sd, mapping, what)


def _fold_tied_embedding(sd: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Return ``sd`` with ``encoder.embed_tokens.weight`` folded into ``shared.weight`` (they are one tied tensor)."""
    sd = dict(sd)
    if _TIED_KEY in sd:
        tied = sd.pop(_TIED_KEY)
        if _SHARED_KEY not in sd:
            sd[_SHARED_KEY] = tied
        else:
            shared = sd[_SHARED_KEY]
            same = tied is shared or (
                tied.shape == shared.shape
                and tied.dtype == shared.dtype
                and tied.device == shared.device
                and tied.stride() == shared.stride()
                and tied.data_ptr() == shared.data_ptr()
            )
            if not same and (tied.shape != shared.shape or not torch.equal(tied, shared.to(tied.dtype))):
                raise CheckpointError(
                    f"{what}: {_TIED_KEY} {tuple(tied.shape)} differs from {_SHARED_KEY} {tuple(shared.shape)}, "
                    "but UMT5 ties them"
                )
    return sd


def t5_state_dict_from_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan T5 encoder state dict to transformers' UMT5EncoderModel names (``shared.weight`` carries the
    tied embedding; ``encoder.embed_tokens.weight`` is not added). Unknown keys raise :class:`CheckpointError`."""
    return _rename(sd, _WAN_TO_HF, "Wan T5 state dict")


def t5_state_dict_to_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a UMT5EncoderModel state dict to Wan's T5 key names (inverse of :func:`t5_state_dict_from_wan`)."""
    return _rename(_fold_tied_embedding(sd, "UMT5 state dict"), _HF_TO_WAN, "UMT5 state dict")


def _hf_key_to_wan(key: str) -> str:
    if key == _TIED_KEY:
        key = _SHARED_KEY
    for pattern, repl in _HF_TO_WAN:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return key


# ----------------------------------------------------------------------------------------------------------------------
# building and strict loading


def infer_umt5_config(wan_sd: Mapping[str, torch.Tensor]):
    """Infer the ``UMT5Config`` of a Wan T5 encoder state dict from its tensor shapes (umt5-xxl fixed settings)."""
    from transformers import UMT5Config

    what = "Wan T5 state dict"
    needed = (
        "token_embedding.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.pos_embedding.embedding.weight",
        "blocks.0.ffn.fc1.weight",
    )
    missing = [k for k in needed if k not in wan_sd]
    if missing:
        raise CheckpointError(f"{what}: missing keys needed to infer the model config: {', '.join(missing)}")
    shapes = {k: tuple(wan_sd[k].shape) for k in needed}
    bad = [f"{k} {s}" for k, s in shapes.items() if len(s) != 2]
    if bad:
        raise CheckpointError(f"{what}: expected 2-D tensors, got {', '.join(bad)}")
    vocab_size, d_model = shapes["token_embedding.weight"]
    inner_dim, q_in = shapes["blocks.0.attn.q.weight"]
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    d_ff, ff_in = shapes["blocks.0.ffn.fc1.weight"]
    if q_in != d_model or ff_in != d_model or num_heads < 1 or inner_dim % num_heads:
        raise CheckpointError(
            f"{what}: inconsistent shapes: token_embedding.weight {shapes['token_embedding.weight']}, "
            f"blocks.0.attn.q.weight {shapes['blocks.0.attn.q.weight']}, blocks.0.pos_embedding.embedding.weight "
            f"{shapes['blocks.0.pos_embedding.embedding.weight']}, blocks.0.ffn.fc1.weight "
            f"{shapes['blocks.0.ffn.fc1.weight']}"
        )
    indices = {int(m.group(1)) for k in wan_sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_layers = max(indices) + 1  # gaps show up as missing keys in the strict check
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        architectures=["UMT5EncoderModel"],
        **_UMT5_XXL_FIXED,
    )


def _build_and_load(
    config,
    sd: Mapping[str, torch.Tensor],
    *,
    device,
    dtype: torch.dtype | None,
    what: str,
    show_key: Callable[[str], str] = lambda k: k,
):
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: v for k, v in model.state_dict().items() if k != _TIED_KEY}
    sd = _fold_tied_embedding(sd, what)

    problems = key_problems({k: v.shape for k, v in expected.items()}, sd, show_key,
                            mismatch="{key} checkpoint {got} vs model {want}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))

    # transformers keeps modules named ``wo`` in float32 when loading in float16 (UMT5 ``_keep_in_fp32_modules``)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    tensors = {}
    for key, value in sd.items():
        target = value.dtype if dtype is None else dtype
        if keep_fp32 and set(key.split(".")) & keep_fp32:
            target = torch.float32
        if not value.is_floating_point():
            raise CheckpointError(f"{what}: {show_key(key)} has non-float dtype {value.dtype}")
        tensors[key] = value.to(device=device, dtype=target)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if set(result.missing_keys) - {_TIED_KEY} or result.unexpected_keys:  # pragma: no cover - checked above
        raise CheckpointError(f"{what}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie after assign
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # pragma: no cover - every parameter is checked above
        raise CheckpointError(f"{what}: tensors never loaded: {', '.join(left_on_meta)}")
    model.eval().requires_grad_(False)
    return model


def _load_tokenizer(tok_dir: Path, vocab_size: int):
    from transformers import AutoTokenizer

    if not tok_dir.is_dir():
        raise CheckpointError(f"missing tokenizer folder: {tok_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {tok_dir}: {e}") from e
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"tokenizer in {tok_dir} has {len(tokenizer)} tokens but the text encoder's vocabulary has {vocab_size}"
        )
    return tokenizer


def _read_config(te_dir: Path):
    from transformers import UMT5Config

    path = te_dir / "config.json"
    raw = read_json(path, "text encoder config")
    if raw.get("model_type", "umt5") != "umt5":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'umt5'")
    try:
        return UMT5Config.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid UMT5 config: {e}") from e


def load_text_encoder(
    model_dir: Path, layout: str, *, device="cpu", dtype: torch.dtype | None = torch.float32
) -> WanTextEncoder:
    """Load the text encoder of a Wan2.1 checkpoint in ``layout`` ``"wan"`` or ``"diffusers"`` (see module doc).

    Weights are cast to ``dtype`` (in float16, modules named ``wo`` stay float32 as transformers does);
    ``dtype=None`` keeps every tensor's stored dtype (used by ``lightx2v convert``).
    """
    model_dir = Path(model_dir)
    if layout not in LAYOUTS:
        raise UserError(f"text encoder layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder does not exist: {model_dir}")
    if layout == "wan":
        path = model_dir / WAN_T5_CHECKPOINT
        tok_dir = model_dir / WAN_T5_TOKENIZER_DIR
        check_present([(path, "Wan text encoder checkpoint"), (tok_dir, "tokenizer folder")])
        wan_sd = torch_load_state_dict(path)
        config = infer_umt5_config(wan_sd)
        sd = _rename(wan_sd, _WAN_TO_HF, str(path))
        model = _build_and_load(config, sd, device=device, dtype=dtype, what=str(path), show_key=_hf_key_to_wan)
    else:
        te_dir = model_dir / DIFFUSERS_TEXT_ENCODER_DIR
        tok_dir = model_dir / DIFFUSERS_TOKENIZER_DIR
        weights, weights_what = te_dir / "model.safetensors", "text encoder weights (or model.safetensors.index.json)"
        if not weights.is_file() and (te_dir / "model.safetensors.index.json").is_file():
            weights, weights_what = te_dir / "model.safetensors.index.json", "text encoder weight index"
        check_present(
            [(te_dir / "config.json", "text encoder config"), (weights, weights_what), (tok_dir, "tokenizer folder")]
        )
        config = _read_config(te_dir)
        sd = read_safetensors_dir(te_dir, "text encoder")
        model = _build_and_load(config, sd, device=device, dtype=dtype, what=str(te_dir))
    tokenizer = _load_tokenizer(tok_dir, model.config.vocab_size)
    return WanTextEncoder(tokenizer, model)


# ----------------------------------------------------------------------------------------------------------------------
# saving


def _cpu_state_dict(model) -> dict[str, torch.Tensor]:
    sd = _fold_tied_embedding(model.state_dict(), "UMT5 model")
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_text_encoder(
    enc: WanTextEncoder, model_dir: Path, layout: str, *, max_shard_bytes: int = _DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Write ``enc`` under ``model_dir`` in ``layout`` ``"wan"`` or ``"diffusers"``; weights keep their dtype.

    wan: ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan key names) + ``google/umt5-xxl/`` tokenizer.
    diffusers: ``text_encoder/config.json`` + ``model.safetensors`` (or shards of at most ``max_shard_bytes`` and
    ``model.safetensors.index.json``; stale weight files there are removed) + ``tokenizer/``.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    if layout not in LAYOUTS:
        raise UserError(f"text encoder layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    sd = _cpu_state_dict(enc.model)
    if layout == "wan":
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.save(t5_state_dict_to_wan(sd), str(model_dir / WAN_T5_CHECKPOINT))
        enc.tokenizer.save_pretrained(str(model_dir / WAN_T5_TOKENIZER_DIR))
        return

    te_dir = model_dir / DIFFUSERS_TEXT_ENCODER_DIR
    te_dir.mkdir(parents=True, exist_ok=True)
    for stale in [te_dir / "model.safetensors", te_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    for stale in te_dir.glob("model-*-of-*.safetensors"):
        stale.unlink()

    config = copy.deepcopy(enc.model.config)
    config.architectures = ["UMT5EncoderModel"]
    config.dtype = enc.model.dtype
    config.save_pretrained(str(te_dir))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in sd.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(te_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(te_dir / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (te_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    enc.tokenizer.save_pretrained(str(model_dir / DIFFUSERS_TOKENIZER_DIR))


# ----------------------------------------------------------------------------------------------------------------------
# a small self-made tokenizer for the built-in tiny model and the tests

_TINY_WORDS = """
a an the and or of in on at with to is are was from by for into over under near through while as his her their its
this that it he she they one two three some many very not no up down out off back front behind
cat cats dog dogs man men woman women person people child children girl boy baby bird birds fish horse horses car cars
city street forest tree trees river lake sea ocean beach wave waves mountain mountains sky cloud clouds sun moon star
stars night day morning evening light rain snow wind water fire road house room kitchen garden field flower flowers
grass table chair window door book food cake ball hat dress shirt hair face eyes hand hands
red blue green yellow white black orange purple pink brown gray golden dark bright small large big tall little old
young new beautiful happy slow fast slowly quickly gentle soft warm cold
walks walking runs running flies flying sits sitting stands standing plays playing dances dancing swims swimming
jumps jumping looks looking eats eating holds holding wears wearing rides riding drives driving smiles smiling moves
moving falls falling
camera shot view close wide scene video style realistic cinematic motion background foreground detailed high quality
low worst blurred static still picture frame frames
""".split()
_TINY_SUFFIXES = ["s", "es", "ed", "er", "ing", "ly", "tion", "est"]
_TINY_PUNCT = list(".,!?;:'\"-()[]{}/\\&@#$%*+=<>_~`^|")


def _tiny_vocab() -> list[tuple[str, float]]:
    """Fixed Unigram vocabulary (piece, log-score): whole words beat suffixes beat single characters."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -4.0) for w in dict.fromkeys(_TINY_WORDS)]
    vocab += [("\u2581", -6.0)]
    vocab += [("\u2581" + c, -7.0) for c in letters]
    vocab += [(s, -8.0) for s in _TINY_SUFFIXES if len(s) > 1]
    vocab += [(c, -10.0) for c in letters + letters.upper() + "0123456789"]
    vocab += [(c, -10.0) for c in _TINY_PUNCT]
    scores: dict[str, float] = {}
    for piece, score in vocab:  # "▁a" is both a word and a letter piece: keep the first (better) score
        scores.setdefault(piece, score)
    return list(scores.items())


def build_tiny_tokenizer(out_dir: Path):
    """Write a small deterministic T5-like tokenizer to ``out_dir`` and return it as loaded by ``AutoTokenizer``.

    A ``tokenizers`` Unigram model over a fixed vocabulary of a few hundred pieces (``<pad>`` = 0, ``</s>`` = 1,
    ``<unk>`` = 2, common English words with the sentencepiece ``▁`` word marker, suffixes, single letters, digits,
    punctuation), NFKC normalization, Metaspace pre-tokenization like sentencepiece, and ``</s>`` appended to every
    sequence. ``len(tokenizer)`` is its vocabulary size.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.Unigram(_tiny_vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
        truncation_side="right",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
