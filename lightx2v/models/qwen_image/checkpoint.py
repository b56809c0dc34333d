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
             weights_file: str | Path | None = None, quant_scheme: str | None = None,
             copy_mapped: bool | None = None):
    """Build the MMDiT on the meta device and stream its tensors in (strict). ``weights_file``: take the tensors from
    that one safetensors file instead (e.g. a distilled DiT); the architecture still comes from
    ``transformer/config.json``. ``quant_scheme`` ("fp8" / "int8", LightX2V's ``dit_quant_scheme``): the Linear
    layers of the blocks (the hook plan's ``quantize_prefixes``) become ``QuantLinear``; float weights are quantized
    per output channel as they stream in (on ``device``), pre-quantized ones (LightX2V's layout: ``X.weight`` int8 /
    float8_e4m3fn + ``X.weight_scale`` float32 [out, 1]) are taken as they are. ``copy_mapped``: copy the tensors
    still memory-mapped from the file into fresh memory (:func:`_own_cpu_tensors`; default: when ``device`` is the
    CPU; a caller that puts the weights on the CPU only to stream them to a GPU passes False)."""
    from lightx2v.models.qwen_image.dit import QwenImageDiT

    cfg = read_dit_config(model_path)
    with torch.device("meta"):
        model = QwenImageDiT(cfg, attn)
    if weights_file is not None:
        tensors, what = single_file_dit_tensors(weights_file), f"DiT weights file {weights_file}"
    else:
        tensors, what = dit_tensors(model_path), f"DiT checkpoint in {model_root(model_path) / TRANSFORMER_DIR}"
    quantized: set[str] = set()
    if quant_scheme is not None:
        from lightx2v.ops.quant import apply_quantization, quantizable_linears

        quantized = set(quantizable_linears(model))
        apply_quantization(model, quant_scheme)
        tensors = quantize_stream(tensors, quantized, quant_scheme, device, what)

    def dtype_for(name: str):
        module, _, leaf = name.rpartition(".")
        return None if module in quantized and leaf in ("weight", "weight_scale") else dtype  # storage dtypes kept

    try:
        assign_strict(model, tensors, what=what, dtype_for=dtype_for, device=device)
    except CheckpointError as e:
        if quant_scheme is None and "weight_scale" in str(e):
            raise CheckpointError(f"{e}; this looks like a pre-quantized checkpoint: set dit_quant_scheme to fp8 or "
                                  "int8") from None
        raise
    if copy_mapped if copy_mapped is not None else torch.device(device).type == "cpu":
        _own_cpu_tensors(model)
    return model.eval().requires_grad_(False)


ALIGN = 64  # bytes: what a fresh CPU allocation gets


def _own_cpu_tensors(model: torch.nn.Module) -> None:
    """Copy the CPU tensors that are still views of the memory-mapped safetensors file into fresh allocations.

    Such a view sits at the file's byte offset (the header length decides it), and CPU GEMM kernels round
    differently on unaligned operands (~1e-6 on the tiny model): without the copy a CPU result would depend on how
    the file was written, and differ from the same weights held anywhere else (e.g. offload's aligned buffers).
    Off the CPU, or after a dtype conversion, the tensors are copies already."""
    with torch.no_grad():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None and t.device.type == "cpu" and t.data_ptr() % ALIGN:
                        if isinstance(t, torch.nn.Parameter):
                            t.data = t.data.clone()
                        else:
                            store[key] = t.clone()


def quantize_stream(tensors: Iterator[tuple[str, torch.Tensor]], quantized: set[str], scheme: str, device, what: str
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (name, tensor) pairs through, quantizing the float ``weight`` of each module in ``quantized`` (one at a
    time, on ``device``) and adding its ``weight_scale``; pre-quantized weights must already be in ``scheme``'s
    storage dtype."""
    from lightx2v.ops.quant import _STORAGE, quantize_weight

    for name, t in tensors:
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            if t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                q, scale = quantize_weight(t.to(device), scheme)
                yield name, q
                yield f"{module}.weight_scale", scale
                continue
            if t.dtype != _STORAGE[scheme]:
                raise CheckpointError(f"{what}: {name} is stored as {t.dtype}, which does not fit dit_quant_scheme "
                                      f"{scheme!r} ({_STORAGE[scheme]})")
        yield name, t
