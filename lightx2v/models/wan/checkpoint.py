"""Checkpoint layouts of Wan2.1, detected from the files on disk, and strict loading of the DiT.

Two public layouts:

* original Wan release: ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (+ ``.index.json``),
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, tokenizer folder ``google/umt5-xxl/``;
* diffusers: ``transformer/ vae/ text_encoder/ tokenizer/ scheduler/`` each with its config.

Our DiT uses the original Wan parameter names; diffusers' names are mapped by the declared table below.
Loading builds the model on the meta device, streams tensors from safetensors shards and assigns them; every
missing, unexpected or mis-shaped tensor is reported in one :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from lightx2v.errors import CheckpointError, UserError
from lightx2v.loading import (LazyTensors, assign_strict, iter_safetensors, open_safetensors, read_json, rename_key,
                              require_file, safetensors_files, safetensors_keys)
from lightx2v.models.wan.arch import WanDiTConfig

WAN_DIT_WEIGHTS = "diffusion_pytorch_model"
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN22_VAE_FILE = "Wan2.2_VAE.pth"  # Wan2.2 TI2V-5B (48 latent channels, 16x); A14B uses Wan2.1's
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"

# --- layout detection -----------------------------------------------------------------------------------------


def detect_layout(model_path: str | Path) -> str:
    """Return "wan" or "diffusers" for a model folder, or raise UserError naming what is missing."""
    root = Path(model_path)
    if not root.exists():
        raise UserError(f"model path {str(root)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"model path {str(root)!r} is not a directory")
    # A host of one stage may hold only that stage's files (the decoder's: the VAE alone).
    if any((root / name).exists() for name in ("transformer", "model_index.json", "vae", "text_encoder")):
        return "diffusers"
    if (root / "config.json").is_file() or any(root.glob(f"{WAN_DIT_WEIGHTS}*.safetensors")) \
            or (root / EXPERT_FOLDERS["wan"]["high"]).is_dir() \
            or any((root / f).is_file() for f in (WAN_VAE_FILE, WAN22_VAE_FILE, WAN_T5_FILE)):
        return "wan"
    raise UserError(
        f"model path {str(root)!r} holds neither layout: expected the original Wan files (config.json, "
        f"{WAN_DIT_WEIGHTS}*.safetensors, {WAN_VAE_FILE}, {WAN_T5_FILE}) or diffusers folders "
        "(transformer/, vae/, text_encoder/, tokenizer/)"
    )


# --- DiT key names: diffusers <-> original Wan ----------------------------------------------------------------
# One (diffusers regex, Wan replacement) per parameter family; the reverse direction is declared beside it.
# The Wan release calls the cross-attention LayerNorm "norm3"; diffusers calls it "norm2".

_DIT_RENAMES: list[tuple[str, str, str, str]] = [
    # (diffusers pattern, wan replacement, wan pattern, diffusers replacement)
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0.",
     r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2.",
     r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1.",
     r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0.",
     r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2.",
     r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0.",
     r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1.",
     r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3.",
     r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4.",
     r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos",
     r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"^patch_embedding\.", "patch_embedding.", r"^patch_embedding\.", "patch_embedding."),
    (r"^proj_out\.", "head.head.", r"^head\.head\.", "proj_out."),
    (r"^scale_shift_table$", "head.modulation", r"^head\.modulation$", "scale_shift_table"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation",
     r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)\.", r"blocks.\1.self_attn.\2.",
     r"^blocks\.(\d+)\.self_attn\.(q|k|v)\.", r"blocks.\1.attn1.to_\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o.",
     r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.attn1\.norm_(q|k)\.", r"blocks.\1.self_attn.norm_\2.",
     r"^blocks\.(\d+)\.self_attn\.norm_(q|k)\.", r"blocks.\1.attn1.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_(q|k|v)\.", r"blocks.\1.cross_attn.\2.",
     r"^blocks\.(\d+)\.cross_attn\.(q|k|v)\.", r"blocks.\1.attn2.to_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o.",
     r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.attn2\.norm_(q|k)\.", r"blocks.\1.cross_attn.norm_\2.",
     r"^blocks\.(\d+)\.cross_attn\.norm_(q|k)\.", r"blocks.\1.attn2.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.add_(k|v)_proj\.", r"blocks.\1.cross_attn.\2_img.",
     r"^blocks\.(\d+)\.cross_attn\.(k|v)_img\.", r"blocks.\1.attn2.add_\2_proj."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img.",
     r"^blocks\.(\d+)\.cross_attn\.norm_k_img\.", r"blocks.\1.attn2.norm_added_k."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3.", r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0.",
     r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2.", r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
]
_FROM_DIFFUSERS = [(re.compile(p), r) for p, r, _, _ in _DIT_RENAMES]
_TO_DIFFUSERS = [(re.compile(p), r) for _, _, p, r in _DIT_RENAMES]


def wan_key_from_diffusers(key: str) -> str | None:
    """diffusers name -> Wan name, or None when the table has no mapping."""
    return rename_key(key, _FROM_DIFFUSERS)


def dit_key_from_diffusers(key: str) -> str:
    """diffusers name -> Wan name; a key with no mapping comes back tagged, so strict loading reports it."""
    return wan_key_from_diffusers(key) or f"{key} (diffusers name with no Wan mapping)"


def dit_key_to_diffusers(key: str) -> str:
    new = rename_key(key, _TO_DIFFUSERS)
    if new is None:
        raise CheckpointError(f"DiT key {key!r} has no diffusers name")
    return new


# --- DiT loading / saving -------------------------------------------------------------------------------------


def _strip_wan_prefix(key: str) -> str:
    # Some community re-uploads of Wan checkpoints carry ComfyUI's "model.diffusion_model." prefix.
    return key[len("model.diffusion_model."):] if key.startswith("model.diffusion_model.") else key


# Wan2.2 A14B: two expert DiTs, "high" (timesteps >= boundary) and "low" noise, each in its own folder.
EXPERT_FOLDERS = {"wan": {"high": "high_noise_model", "low": "low_noise_model"},
                  "diffusers": {"high": "transformer", "low": "transformer_2"}}
EXPERTS = ("high", "low")


def dit_experts(model_dir: Path, layout: str) -> tuple[str | None, ...]:
    """("high", "low") for a two-expert (Wan2.2 A14B) checkpoint, else (None,): one DiT."""
    root = Path(model_dir)
    folders = EXPERT_FOLDERS[layout]
    if layout == "wan" and ((root / folders["high"]).is_dir() or (root / folders["low"]).is_dir()):
        absent = [folders[e] for e in EXPERTS if not (root / folders[e]).is_dir()]
        if absent:
            raise CheckpointError(f"two-expert checkpoint {root} lacks the folder {absent[0]}/")
        return EXPERTS
    if layout == "diffusers" and (root / folders["low"]).is_dir():
        return EXPERTS
    return (None,)


def dit_folder(model_dir: Path, layout: str, expert: str | None = None) -> Path:
    """The DiT's folder; ``expert`` ("high" / "low") picks one of the two Wan2.2 A14B experts."""
    if expert is not None:
        return Path(model_dir) / EXPERT_FOLDERS[layout][expert]
    return Path(model_dir) / "transformer" if layout == "diffusers" else Path(model_dir)


def vae_path(model_dir: Path, layout: str, wan22: bool = False) -> Path:
    """The VAE of a model folder: diffusers' ``vae/``; in the original layout ``Wan2.2_VAE.pth`` (``wan22``) or
    ``Wan2.1_VAE.pth``, or the other file when only that one is there (so that a wrong model class is reported by
    what the VAE is, not as a missing file)."""
    root = Path(model_dir)
    if layout == "diffusers":
        return root / "vae"
    want, other = (WAN22_VAE_FILE, WAN_VAE_FILE) if wan22 else (WAN_VAE_FILE, WAN22_VAE_FILE)
    return root / other if not (root / want).is_file() and (root / other).is_file() else root / want


def dit_weight_names(model_dir: Path, layout: str, expert: str | None = None) -> list[str]:
    """The tensor names stored in the DiT's safetensors files (headers only; nothing is read)."""
    names = []
    for f in safetensors_files(dit_folder(model_dir, layout, expert), WAN_DIT_WEIGHTS):
        names.extend(safetensors_keys(f))
    return names


def dit_weight_shapes(model_dir: Path, layout: str, expert: str | None = None) -> dict[str, tuple[int, ...]]:
    """Stored name -> shape of every DiT tensor (safetensors headers only; nothing is read)."""
    shapes = {}
    for f in safetensors_files(dit_folder(model_dir, layout, expert), WAN_DIT_WEIGHTS):
        with open_safetensors(f) as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def read_dit_config(model_dir: Path, layout: str, expert: str | None = None) -> WanDiTConfig:
    folder = dit_folder(model_dir, layout, expert)
    d = read_json(folder / "config.json", "DiT config")
    if layout == "diffusers":
        return WanDiTConfig.from_diffusers_config(d)  # FLF2V: pos_embed_seq_len gives the emb_pos length
    cfg = WanDiTConfig.from_wan_config(d)
    if cfg.model_type == "flf2v" or (cfg.has_image_input and "clip_input" not in d):
        shapes = {_strip_wan_prefix(k): v for k, v in dit_weight_shapes(model_dir, layout, expert).items()}
        if cfg.has_image_input and "clip_input" not in d and not any(k.startswith("img_emb.") for k in shapes):
            # Wan2.1 and Wan2.2 I2V DiTs share model_type "i2v"; only Wan2.1's carry the CLIP projection img_emb.
            cfg = replace(cfg, clip_input=False)
        pos = shapes.get("img_emb.emb_pos")
        if cfg.model_type == "flf2v" and pos is not None:
            # The Wan release's config.json does not say how many CLIP tokens the FLF2V DiT takes: its stored
            # position embedding [1, 2 x tokens per image, image_dim] does.
            if len(pos) != 3 or pos[0] != 1:
                raise CheckpointError(f"DiT checkpoint in {folder}: img_emb.emb_pos has shape {pos}, expected "
                                      "[1, 2 x CLIP tokens per image, image_dim]")
            if d.get("pos_embed_seq_len") is not None and d["pos_embed_seq_len"] != pos[1]:
                raise CheckpointError(f"{folder / 'config.json'}: pos_embed_seq_len {d['pos_embed_seq_len']} "
                                      f"disagrees with the stored img_emb.emb_pos {pos}")
            cfg = replace(cfg, image_pos_len=pos[1])
    return cfg


def dit_tensors(model_dir: Path, layout: str, expert: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(wan key, tensor) pairs streamed from the checkpoint, in either layout."""
    files = safetensors_files(dit_folder(model_dir, layout, expert), WAN_DIT_WEIGHTS)
    for key, t in iter_safetensors(files):
        yield (dit_key_from_diffusers(key) if layout == "diffusers" else _strip_wan_prefix(key)), t


def _has_diffusers_names(path: Path) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in safetensors_keys(path))


def dit_weight_files(path: Path) -> list[Path]:
    """The safetensors files of DiT weights named by a config key (``dit_original_ckpt``, ``dit_quantized_ckpt``,
    the experts' ``*_noise_*_ckpt``): one ``.safetensors`` file, or a folder: a model's DiT (its
    ``diffusion_pytorch_model`` shards), else every ``*.safetensors`` in it (LightX2V's converter writes
    ``block_N.safetensors`` + ``non_block.safetensors``, or numbered parts)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        if any(folder.glob(f"{WAN_DIT_WEIGHTS}*.safetensors*")):
            return safetensors_files(folder, WAN_DIT_WEIGHTS)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"DiT weights folder {path} holds no .safetensors file")
        return files
    return [require_file(path, "DiT weights file")]


def _renamer(files: list[Path]):
    """Diffusers' names -> ours when the files use them, else strip ComfyUI's prefix."""
    return dit_key_from_diffusers if _has_diffusers_names(files[0]) else _strip_wan_prefix


def single_file_dit_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(wan key, tensor) pairs from DiT weights outside the model folder (a file or a folder, see
    :func:`dit_weight_files`) in either naming (e.g. a distilled or a pre-quantized DiT)."""
    files = dit_weight_files(path)
    rename = _renamer(files)
    for key, t in iter_safetensors(files):
        yield rename(key), t


_QUANT_DTYPES = {"I8": "int8", "F8_E4M3": "fp8"}


def stored_quant_scheme(files: list[Path]) -> str | None:
    """"int8" / "fp8" when the files hold pre-quantized linears (``X.weight`` int8 / float8_e4m3fn beside
    ``X.weight_scale``, LightX2V's layout and ``lightx2v convert --quantize``'s), else None. Headers only."""
    found = set()
    for f in files:
        with open_safetensors(f) as sf:
            keys = set(sf.keys())
            for k in keys:
                if k.endswith(".weight_scale") and k[: -len("_scale")] in keys:
                    dtype = sf.get_slice(k[: -len("_scale")]).get_dtype()
                    if dtype not in _QUANT_DTYPES:
                        raise CheckpointError(f"{f}: {k[: -len('_scale')]} is stored as {dtype} beside a "
                                              "weight_scale; pre-quantized weights are int8 or float8_e4m3fn")
                    found.add(_QUANT_DTYPES[dtype])
    if len(found) > 1:
        raise CheckpointError(f"DiT weights {files[0].parent} mix int8 and fp8 linears")
    return found.pop() if found else None


def dit_source_files(model_dir: Path, layout: str, expert: str | None = None,
                     weights_path: Path | None = None) -> list[Path]:
    """The DiT's safetensors files: ``weights_path`` (a config key's file or folder) or the model folder's."""
    if weights_path is not None:
        return dit_weight_files(weights_path)
    return safetensors_files(dit_folder(Path(model_dir), layout, expert), WAN_DIT_WEIGHTS)


def dit_lazy_tensors(model_dir: Path | None = None, layout: str = "wan", *, expert: str | None = None,
                     weights_file: Path | None = None) -> LazyTensors:
    """The DiT's tensors in Wan names, read one at a time when asked (``lazy_load``): from a model folder in either
    layout, or from weights outside it (a file or a folder, either naming: LightX2V's ``dit_original_ckpt`` /
    ``dit_quantized_ckpt``)."""
    if weights_file is not None:
        files = dit_weight_files(Path(weights_file))
        rename = _renamer(files)
    else:
        files = safetensors_files(dit_folder(Path(model_dir), layout, expert), WAN_DIT_WEIGHTS)
        rename = dit_key_from_diffusers if layout == "diffusers" else _strip_wan_prefix
    return LazyTensors(files, rename, what="DiT checkpoint")


def load_dit_without_blocks(model_dir: str | Path, layout: str, *, attn, cross_attn=None, image_attn=None,
                            device="cpu", dtype: torch.dtype = torch.float32, expert: str | None = None,
                            weights_file: Path | None = None, quant_scheme: str | None = None):
    """Build a WanDiT on the meta device and load only its non-block weights (strictly) onto ``device``; the block
    weights stay on the meta device with their dtypes set, for ``apply_offload(..., lazy_load=True)``.
    ``weights_file``: the weights outside the model folder (file or folder); ``quant_scheme``: the block linears are
    QuantLinear (the checkpoint must hold them pre-quantized: they are read from disk as stored)."""
    import torch.nn as nn

    from lightx2v.models.wan.dit import WanDiT

    cfg = read_dit_config(Path(model_dir), layout, expert)
    with torch.device("meta"):
        model = WanDiT(cfg, attn, cross_attn=cross_attn, image_attn=image_attn)
    if quant_scheme is not None:
        from lightx2v.ops.quant import apply_quantization

        apply_quantization(model, quant_scheme)  # meta QuantLinear: int8 / float8 weights + float32 scales
    holder = nn.Module()  # the non-block submodules under their own names, so strict loading accounts for each key
    for name, child in model.named_children():
        if name != "blocks" and child is not None:
            holder.add_module(name, child)
    source = dit_lazy_tensors(Path(model_dir), layout, expert=expert, weights_file=weights_file)
    tensors = ((k, source.get(k)) for k in list(source.keys()) if not k.startswith("blocks."))
    dtype_for = lambda name: torch.float32 if WanDiT.is_float32_param(name) else dtype  # noqa: E731
    where = weights_file or dit_folder(Path(model_dir), layout, expert)
    assign_strict(holder, tensors, what=f"DiT checkpoint in {where}", dtype_for=dtype_for, device=device)
    source.close()
    model.to_inference_dtype(dtype)  # block tensors: meta, now with the dtypes the slots will use
    return model.eval().requires_grad_(False)


def load_dit(model_dir: Path, layout: str, *, attn, device="cpu", dtype=torch.float32,
             weights_file: Path | None = None, quant_scheme: str | None = None, expert: str | None = None,
             cross_attn=None, image_attn=None):
    """Build a WanDiT on the meta device and stream its weights in (strict). ``weights_file``: a safetensors file
    or a folder of them to take the weights from instead of the model folder's (LightX2V's ``dit_original_ckpt``,
    ``dit_quantized_ckpt``; :func:`dit_weight_files`). ``quant_scheme``
    ("fp8" / "int8"): the block linears become QuantLinear; float weights are quantized as they stream in (on
    ``device``), pre-quantized ones (``X.weight`` + ``X.weight_scale``) are taken as they are. ``expert``: which
    DiT of a two-expert checkpoint ("high" / "low")."""
    from lightx2v.models.wan.dit import WanDiT

    cfg = read_dit_config(model_dir, layout, expert)
    with torch.device("meta"):
        model = WanDiT(cfg, attn, cross_attn=cross_attn, image_attn=image_attn)
    if weights_file is not None:
        tensors, what = single_file_dit_tensors(weights_file), f"DiT weights {weights_file}"
    else:
        tensors = dit_tensors(model_dir, layout, expert)
        what = f"DiT checkpoint in {dit_folder(model_dir, layout, expert)}"
    quantized: set[str] = set()
    if quant_scheme is not None:
        from lightx2v.ops.quant import apply_quantization, quantizable_linears, quantize_stream

        quantized = set(quantizable_linears(model))
        apply_quantization(model, quant_scheme)
        tensors = quantize_stream(tensors, quantized, quant_scheme, device, what)

    def dtype_for(name: str):
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf in ("weight", "weight_scale"):
            return None  # already in their storage format
        return torch.float32 if WanDiT.is_float32_param(name) else dtype

    try:
        assign_strict(model, tensors, what=what, dtype_for=dtype_for, device=device)
    except CheckpointError as e:
        if quant_scheme is None and "weight_scale" in str(e):
            raise CheckpointError(f"{e}; this looks like a pre-quantized checkpoint: set dit_quant_scheme to "
                                  "fp8 or int8") from None
        raise
    return model.eval().requires_grad_(False)


def save_dit(state_dict: dict[str, torch.Tensor], cfg: WanDiTConfig, out_dir: Path, layout: str,
             expert: str | None = None) -> None:
    """Write a DiT state dict (wan key names) in ``layout`` under ``out_dir`` (a model root)."""
    folder = dit_folder(out_dir, layout, expert)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        sd = {dit_key_to_diffusers(k): v.contiguous() for k, v in state_dict.items()}
        config = cfg.to_diffusers_config()
    else:
        sd = {k: v.contiguous() for k, v in state_dict.items()}
        config = cfg.to_wan_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(sd, str(folder / f"{WAN_DIT_WEIGHTS}.safetensors"))
