"""The Qwen-Image checkpoint layout (the release's: diffusers) and the strict loaders of the DiT and the scheduler.

A model folder holds ``model_index.json`` (whose ``_class_name`` says what the checkpoint does: text-to-image,
edit with one image, edit with several; ``arch.PIPELINE_VARIANTS``), ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/`` and, for the edit releases, ``processor/``. Each component's loader opens only its own
folder; the VAE and text encoder loaders live beside their modules (``vae.py``, ``text_encoder.py``).

The DiT's parameter names are the release's, so its tensors are streamed from the safetensors shards and assigned
as they are (built on the meta device; every missing, unexpected or mis-shaped tensor reported at once).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.qwen_image.arch import PIPELINE_VARIANTS, VARIANTS, QwenImageDiTConfig
from lightx2v.models.qwen_image.scheduler import FlowMatchConfig
from lightx2v.loading import assign_strict, iter_safetensors, read_json, require_file, safetensors_files

MODEL_INDEX = "model_index.json"
TRANSFORMER_DIR, VAE_DIR, SCHEDULER_DIR = "transformer", "vae", "scheduler"
DIT_WEIGHTS = "diffusion_pytorch_model"
SCHEDULER_CONFIG = "scheduler_config.json"
COMFY_PREFIX = "model.diffusion_model."  # single-file DiTs re-uploaded for ComfyUI carry this prefix


def model_root(model_path: str | Path) -> Path:
    root = Path(model_path)
    if not root.is_dir():
        raise UserError(f"model path {str(root)!r} is not a directory" if root.exists()
                        else f"model path {str(root)!r} does not exist")
    return root


def detect_variant(model_path: str | Path) -> str:
    """"t2i", "edit" or "edit_plus", from ``model_index.json``'s ``_class_name``."""
    index = read_json(model_root(model_path) / MODEL_INDEX, "model_index.json (the diffusers layout of Qwen-Image)")
    name = index.get("_class_name")
    if name not in PIPELINE_VARIANTS:
        raise CheckpointError(f"{Path(model_path) / MODEL_INDEX}: _class_name {name!r} is not a Qwen-Image pipeline; "
                              f"expected one of {', '.join(PIPELINE_VARIANTS)}")
    return PIPELINE_VARIANTS[name]


def resolve_variant(model_path: str | Path, variant: str | None = None) -> str:
    """The checkpoint's variant, or ``variant`` when given (checked)."""
    if variant is None:
        return detect_variant(model_path)
    if variant not in VARIANTS:
        raise UserError(f"variant={variant!r}: allowed {', '.join(VARIANTS)}")
    return variant


def read_dit_config(model_path: str | Path) -> QwenImageDiTConfig:
    folder = model_root(model_path) / TRANSFORMER_DIR
    return QwenImageDiTConfig.from_diffusers_config(read_json(folder / "config.json", "transformer config"))


def read_scheduler_config(model_path: str | Path) -> FlowMatchConfig:
    folder = model_root(model_path) / SCHEDULER_DIR
    return FlowMatchConfig.from_diffusers_config(read_json(folder / SCHEDULER_CONFIG, "scheduler config"))


def dit_tensors(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs streamed from ``transformer/diffusion_pytorch_model*.safetensors``."""
    yield from iter_safetensors(safetensors_files(model_root(model_path) / TRANSFORMER_DIR, DIT_WEIGHTS))


def single_file_dit_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one safetensors file in the release's names (LightX2V's ``dit_original_ckpt``;
    ComfyUI's ``model.diffusion_model.`` prefix is removed)."""
    f = require_file(Path(path), "DiT weights file")
    for key, t in iter_safetensors([f]):
        yield (key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key), t


def load_dit(model_path: str | Path, *, attn, device="cpu", dtype: torch.dtype = torch.float32,
             weights_file: str | Path | None = None):
    """Build the MMDiT on the meta device and stream its tensors in (strict). ``weights_file``: take the tensors from
    that one safetensors file instead (e.g. a distilled DiT); the architecture still comes from
    ``transformer/config.json``."""
    from lightx2v.models.qwen_image.dit import QwenImageDiT

    cfg = read_dit_config(model_path)
    with torch.device("meta"):
        model = QwenImageDiT(cfg, attn)
    if weights_file is not None:
        tensors, what = single_file_dit_tensors(weights_file), f"DiT weights file {weights_file}"
    else:
        tensors, what = dit_tensors(model_path), f"DiT checkpoint in {model_root(model_path) / TRANSFORMER_DIR}"
    assign_strict(model, tensors, what=what, dtype_for=lambda name: dtype, device=device)
    return model.eval().requires_grad_(False)
