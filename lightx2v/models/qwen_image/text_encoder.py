"""Qwen-Image's text encoder: Qwen2.5-VL run through transformers' ``Qwen2_5_VLModel`` (its vision tower for edits).

Numerics follow diffusers' Qwen-Image pipelines (0.42.1):

* the prompt is wrapped in a chat template (a system message describing the task, the user turn holding the
  prompt, the assistant turn opened), tokenized, and encoded; the embeddings are the last hidden state (after the
  final norm) of the prompt's tokens with the first ``drop_idx`` tokens removed: the template's system message and
  the user header (34 tokens for text-to-image, 64 for the edit template);
* text-to-image: at most ``1024 + drop_idx`` tokens (truncated), then at most 512 embeddings kept;
* edits: each image's slot ``<|vision_start|><|image_pad|><|vision_end|>`` (Edit-2509/2511: preceded by
  ``Picture i: ``) is put before the prompt; the image is resized as the pipelines do (see ``stages.py``), turned into
  patches by transformers' Qwen2-VL image processor, and its ``<|image_pad|>`` expanded to one token per merged
  2x2 patch group, exactly as transformers' ``Qwen2VLProcessor`` does (done here directly: that class cannot be built
  without torchvision in transformers 5, while the tokenizer and the image processor can). The image tokens stay in
  the embeddings (they follow the dropped header).

Checkpoint (the release's diffusers layout): ``text_encoder/`` (``config.json``, ``model*.safetensors``, saved from
``Qwen2_5_VLForConditionalGeneration``), ``tokenizer/``, and for edits ``processor/`` (tokenizer +
``preprocessor_config.json``). The language-model head ``lm_head.weight`` is not used and not read; the other
tensors load strictly (old ``model.* / visual.*`` and new ``model.language_model.* / model.visual.*`` names are both
read, through the declared table ``CHECKPOINT_RENAMES``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lightx2v.errors import CheckpointError, UserError
from lightx2v.loading import assign_strict, key_problems, open_safetensors, read_json, safetensors_files

T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
T2I_DROP_IDX = 34
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                 "objects, background), then explain how the user's text instruction should alter or modify the "
                 "image. Generate a new image that meets the user's requirements while maintaining consistency with "
                 "the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")
EDIT_DROP_IDX = 64
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
TOKENIZER_MAX_LENGTH = 1024  # prompt tokens after the dropped header (text-to-image)
T2I_MAX_SEQUENCE_LENGTH = 512  # embeddings kept (text-to-image; the pipelines' max_sequence_length default)

TEXT_ENCODER_DIR, TOKENIZER_DIR, PROCESSOR_DIR = "text_encoder", "tokenizer", "processor"

# checkpoint key -> Qwen2_5_VLModel key (first match wins); "" drops the key (declared unused, never read)
CHECKPOINT_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.visual\.", "visual."),
    (r"^model\.language_model\.", "language_model."),
    (r"^visual\.", "visual."),
    (r"^model\.", "language_model."),
    (r"^lm_head\.weight$", ""),
)
_RENAMES = tuple((re.compile(p), r) for p, r in CHECKPOINT_RENAMES)


def model_key(checkpoint_key: str) -> str | None:
    """The Qwen2_5_VLModel name of a checkpoint tensor; None for the unused LM head; the key itself if unknown."""
    for pattern, repl in _RENAMES:
        if pattern.match(checkpoint_key):
            return None if repl == "" else pattern.sub(repl, checkpoint_key, count=1)
    return checkpoint_key


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt (and its images) become the encoder's text: ``template.format(image slots + prompt)``.

    ``image_ids``: each slot is preceded by ``Picture i: `` (Edit-2509/2511); ``drop_idx``: tokens removed from the
    front of the embeddings; ``max_tokens`` / ``max_embeddings``: text-to-image limits (None for edits).
    LightX2V's keys: ``prompt_template_encode``, ``prompt_template_encode_start_idx``, ``USE_IMAGE_ID_IN_PROMPT``.
    """

    template: str
    drop_idx: int
    image_ids: bool = False
    max_tokens: int | None = None
    max_embeddings: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise UserError(f"prompt_template_encode must be a string with exactly one '{{}}' (where the prompt "
                            f"goes), got {self.template!r}")
        if isinstance(self.drop_idx, bool) or not isinstance(self.drop_idx, int) or self.drop_idx < 0:
            raise UserError(f"prompt_template_encode_start_idx must be an integer >= 0, got {self.drop_idx!r}")
        if not isinstance(self.image_ids, bool):
            raise UserError(f"USE_IMAGE_ID_IN_PROMPT must be true or false, got {self.image_ids!r}")

    @classmethod
    def for_variant(cls, variant: str, task: str) -> PromptFormat:
        """The reference pipeline's format: text-to-image (QwenImagePipeline), edit (QwenImageEditPipeline: no
        ``Picture i:``), edit_plus (QwenImageEditPlusPipeline)."""
        if task == "t2i":
            return cls(T2I_TEMPLATE, T2I_DROP_IDX, max_tokens=TOKENIZER_MAX_LENGTH + T2I_DROP_IDX,
                       max_embeddings=T2I_MAX_SEQUENCE_LENGTH)
        return cls(EDIT_TEMPLATE, EDIT_DROP_IDX, image_ids=variant == "edit_plus")

    def text(self, prompt: str, num_images: int = 0) -> str:
        slots = "".join(f"Picture {i + 1}: {IMAGE_SLOT}" if self.image_ids else IMAGE_SLOT for i in range(num_images))
        return self.template.format(slots + prompt)


def expand_image_tokens(text: str, image_grid_thw: torch.Tensor, merge_size: int) -> str:
    """Replace the i-th ``<|image_pad|>`` by one per merged patch group of image i (grid t*h*w / merge_size**2)."""
    parts = text.split(IMAGE_TOKEN)
    if len(parts) - 1 != len(image_grid_thw):
        raise UserError(f"{len(parts) - 1} image slots in the prompt text for {len(image_grid_thw)} images")
    out = [parts[0]]
    for grid, rest in zip(image_grid_thw.tolist(), parts[1:]):
        out.append(IMAGE_TOKEN * (grid[0] * grid[1] * grid[2] // merge_size**2) + rest)
    return "".join(out)


class QwenImageTextEncoder:
    """Tokenizer (+ image processor) and ``Qwen2_5_VLModel``: prompt (+ images) -> embeddings [1, L, hidden]."""

    def __init__(self, model, tokenizer, image_processor=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def inputs(self, prompt: str, fmt: PromptFormat, images: Sequence = ()) -> dict[str, torch.Tensor]:
        """The model inputs for one prompt: input_ids, attention_mask [1, T] (+ pixel_values, image_grid_thw)."""
        if not isinstance(prompt, str):
            raise UserError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
        text = fmt.text(prompt, len(images))
        pixels = {}
        if images:
            if self.image_processor is None:
                raise UserError("this text encoder was loaded without an image processor (processor/): it cannot "
                                "take images")
            pixels = dict(self.image_processor(images=list(images), return_tensors="pt"))
            text = expand_image_tokens(text, pixels["image_grid_thw"], self.image_processor.merge_size)
        kw = {"max_length": fmt.max_tokens, "truncation": True} if fmt.max_tokens else {}
        tokens = self.tokenizer([text], padding=True, return_tensors="pt", **kw)
        out = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        if images:
            out.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        return out

    @torch.no_grad()
    def encode(self, prompt: str, fmt: PromptFormat, images: Sequence = ()) -> torch.Tensor:
        """prompt (+ PIL images, already resized as the pipeline does) -> [1, L, hidden] in the model dtype."""
        inputs = {k: v.to(self.device) for k, v in self.inputs(prompt, fmt, images).items()}
        hidden = self.model(**inputs).last_hidden_state  # [1, T, hidden]: the reference's hidden_states[-1]
        keep = inputs["attention_mask"][0].bool()
        emb = hidden[0][keep][fmt.drop_idx:]
        if fmt.max_embeddings is not None:
            emb = emb[: fmt.max_embeddings]
        if emb.shape[0] == 0:
            raise UserError(f"the prompt has no tokens after the {fmt.drop_idx} dropped template tokens; check "
                            "prompt_template_encode_start_idx")
        return emb[None].to(self.dtype)


# --- loading --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no init) but their buffers real: the
    rotary frequencies are non-persistent buffers, computed at construction and absent from checkpoints."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise CheckpointError(f"missing tokenizer folder: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from e


def _load_image_processor(folder: Path):
    from transformers import AutoImageProcessor

    if not (folder / "preprocessor_config.json").is_file():
        raise CheckpointError(f"missing image processor: {folder / 'preprocessor_config.json'} (edits need the "
                              "processor/ folder of an edit release)")
    try:
        return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the image processor in {folder}: {e}") from e


def read_text_hidden_size(model_dir: str | Path) -> int:
    """The width of the text encoder's embeddings (what the DiT's ``joint_attention_dim`` must be), read from
    ``text_encoder/config.json`` without loading it (transformers 5 nests it in ``text_config``)."""
    path = Path(model_dir) / TEXT_ENCODER_DIR / "config.json"
    raw = read_json(path, "text encoder config")
    size = (raw.get("text_config") or {}).get("hidden_size", raw.get("hidden_size"))
    if isinstance(size, bool) or not isinstance(size, int):
        raise CheckpointError(f"{path}: no hidden_size (text_config.hidden_size) in the text encoder config")
    return size


def load_text_encoder(model_dir: str | Path, *, with_images: bool = False, device="cpu",
                      dtype: torch.dtype = torch.float32) -> QwenImageTextEncoder:
    """Qwen2.5-VL from ``text_encoder/`` (strict: every tensor but the unused ``lm_head.weight`` is checked and
    assigned), the tokenizer from ``tokenizer/`` (with images: from ``processor/``, and its image processor)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    root = Path(model_dir)
    te_dir = root / TEXT_ENCODER_DIR
    raw = read_json(te_dir / "config.json", "text encoder config")
    if raw.get("model_type") != "qwen2_5_vl":
        raise CheckpointError(f"{te_dir / 'config.json'}: model_type {raw.get('model_type')!r}, expected "
                              "'qwen2_5_vl' (Qwen2.5-VL)")
    config = Qwen2_5_VLConfig.from_pretrained(str(te_dir), local_files_only=True)
    with _parameters_on_meta():
        model = Qwen2_5_VLModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}

    files = safetensors_files(te_dir, "model")
    shapes, original = {}, {}  # model name -> meta tensor / checkpoint name, from the headers (nothing read)
    for f in files:
        with open_safetensors(f) as st:
            for key in st.keys():
                name = model_key(key)
                if name is None:
                    continue  # the LM head: not part of the encoder
                if name in shapes:
                    raise CheckpointError(f"{te_dir}: {key} and {original[name]} are the same tensor {name}")
                shapes[name] = torch.empty(st.get_slice(key).get_shape(), device="meta")
                original[name] = key
    problems = key_problems(expected, shapes, show_key=lambda k: original.get(k, k))
    if problems:
        raise CheckpointError(f"text encoder checkpoint in {te_dir}: " + "; ".join(problems))

    def stream():
        for f in files:
            with open_safetensors(f) as st:
                for key in st.keys():
                    name = model_key(key)
                    if name is not None:
                        yield name, st.get_tensor(key)

    assign_strict(model, stream(), what=f"text encoder checkpoint in {te_dir}", dtype_for=lambda n: dtype,
                  device=device)
    model.to(device).eval().requires_grad_(False)  # the buffers (rotary frequencies, float32) join the weights

    if with_images:
        tokenizer = _load_tokenizer(root / PROCESSOR_DIR)
        image_processor = _load_image_processor(root / PROCESSOR_DIR)
    else:
        tokenizer, image_processor = _load_tokenizer(root / TOKENIZER_DIR), None
    if IMAGE_TOKEN not in tokenizer.get_vocab() and with_images:
        raise CheckpointError(f"the tokenizer in {root / PROCESSOR_DIR} has no {IMAGE_TOKEN} token")
    return QwenImageTextEncoder(model, tokenizer, image_processor)
