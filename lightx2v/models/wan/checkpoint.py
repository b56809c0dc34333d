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
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lightx2v.errors import CheckpointError, UserError
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
    if (root / "transformer").is_dir() or (root / "model_index.json").is_file():
        return "diffusers"
    if (root / "config.json").is_file() or any(root.glob(f"{WAN_DIT_WEIGHTS}*.safetensors")) \
            or (root / EXPERT_FOLDERS["wan"]["high"]).is_dir():
        return "wan"
    raise UserError(
        f"model path {str(root)!r} holds neither layout: expected the original Wan files (config.json, "
        f"{WAN_DIT_WEIGHTS}*.safetensors, {WAN_VAE_FILE}, {WAN_T5_FILE}) or diffusers folders "
        "(transformer/, vae/, text_encoder/, tokenizer/)"
    )


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"missing {what}: {path}")
    return path


# --- safetensors shards ---------------------------------------------------------------------------------------


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """The shard files of ``stem`` in ``folder``: from ``stem.safetensors.index.json`` or the single file."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [require_file(folder / n, f"shard listed in {index.name}") for n in names]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"missing weights: no {stem}.safetensors (or its .index.json) in {folder}")


def unreadable_safetensors(path: Path, error: Exception) -> CheckpointError:
    """The error for a ``.safetensors`` file that safetensors cannot parse (a download cut short, a file of
    another format renamed, or garbage): names the file and says so, with safetensors' own reason."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f"{path}: not a readable safetensors file, it is corrupt or incomplete ({reason}); "
                           "download or convert it again")


def open_safetensors(path: Path):
    """``safe_open(path)`` (memory-mapped, CPU) as a context manager; CheckpointError naming the file when it is
    missing, corrupt or incomplete (safetensors checks the header and that the data covers it at open)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing safetensors file: {path}")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise unreadable_safetensors(path, e) from None
    return handle


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names stored in one safetensors file (header only); CheckpointError for a corrupt file."""
    with open_safetensors(path) as sf:
        return list(sf.keys())


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file when it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def torch_load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict of tensors (memory-mapped where the file format allows), or CheckpointError."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read it as a torch state dict: {e}") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as a torch state dict: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return dict(sd)


def check_present(items) -> None:
    """items: (path, what) pairs; one CheckpointError naming every absent one."""
    absent = [f"{what} {path}" for path, what in items if not Path(path).exists()]
    if absent:
        raise CheckpointError("missing files: " + "; ".join(absent))


def read_safetensors_dir(folder: Path, what: str, stem: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of ``stem.safetensors`` in ``folder``, or of the shards its ``.index.json`` lists (transformers'
    layout), checking that every listed shard and key is there and that no key is stored twice."""
    from safetensors.torch import load_file

    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"

    def read(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise unreadable_safetensors(path, e) from None

    if single.is_file():
        return read(single)
    if not index.is_file():
        raise CheckpointError(f"missing {what} weights: neither {single} nor {index} exists")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map': {e}") from e
    absent = [str(folder / f) for f in files if not (folder / f).is_file()]
    if absent:
        raise CheckpointError(f"missing {what} shard files listed in {index}: {', '.join(absent)}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = read(folder / f)
        listed = [k for k, v in weight_map.items() if v == f and k not in part]
        if listed:
            raise CheckpointError(f"{folder / f}: keys listed in {index.name} are missing: {', '.join(listed)}")
        dup = sorted(set(part) & set(sd))
        if dup:
            raise CheckpointError(f"{folder / f}: keys also stored in another shard: {', '.join(dup)}")
        sd.update(part)
    return sd


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the files, one at a time; CheckpointError naming a corrupt file."""
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                try:
                    t = sf.get_tensor(key)
                except SafetensorError as e:
                    raise unreadable_safetensors(Path(f), e) from None
                yield key, t


# --- strict assignment into a meta-built module ---------------------------------------------------------------


def key_problems(expected: dict, sd, show_key=None,
                 mismatch: str = "{key} (checkpoint {got}, model {want})") -> list[str]:
    """What keeps ``sd`` from loading strictly into a module whose state dict has ``expected`` (name -> shape):
    missing, unexpected and mis-shaped keys, each as one line (empty when it fits). ``show_key`` renames keys for
    the message (e.g. to the checkpoint's own naming); ``mismatch`` formats one shape mismatch."""
    show = show_key or (lambda k: k)
    mismatched = []
    for k in sorted(expected.keys() & sd.keys()):
        v = sd[k]
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        if got != tuple(expected[k]):
            mismatched.append(mismatch.format(key=show(k), got=got, want=tuple(expected[k])))
    groups = (("missing keys", [show(k) for k in sorted(expected.keys() - sd.keys())]),
              ("unexpected keys", [show(k) for k in sorted(sd.keys() - expected.keys())]),
              ("shape mismatches", mismatched))
    return [f"{label}: {', '.join(dict.fromkeys(keys))}" for label, keys in groups if keys]



def assign_strict(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, what: str,
                  dtype_for=None, device="cpu") -> None:
    """Assign every tensor to the parameter/buffer of the same name; report all problems at once.

    ``dtype_for(name)`` gives the dtype each tensor is stored in (None: keep the checkpoint's).
    """
    expected = dict(module.state_dict(keep_vars=True))
    seen, unexpected, mismatched = set(), [], []
    for name, tensor in tensors:
        target = expected.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        dt = dtype_for(name) if dtype_for else None
        tensor = tensor.to(device=device, dtype=dt or tensor.dtype)
        _set_tensor(module, name, tensor)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches {_short(mismatched)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def _short(items: list[str], n: int = 20) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


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


def _rename(key: str, table) -> str | None:
    for pattern, repl in table:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return None


def dit_key_from_diffusers(key: str) -> str:
    """diffusers name -> Wan name; a key with no mapping comes back tagged, so strict loading reports it."""
    return _rename(key, _FROM_DIFFUSERS) or f"{key} (diffusers name with no Wan mapping)"


def dit_key_to_diffusers(key: str) -> str:
    new = _rename(key, _TO_DIFFUSERS)
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


def single_file_dit_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(wan key, tensor) pairs from one safetensors file in either naming (e.g. a distilled DiT)."""
    files = [require_file(Path(path), "DiT weights file")]
    diffusers_names = any(k.startswith("condition_embedder.") or ".attn1." in k for k in safetensors_keys(files[0]))
    for key, t in iter_safetensors(files):
        yield (dit_key_from_diffusers(key) if diffusers_names else _strip_wan_prefix(key)), t


def load_dit(model_dir: Path, layout: str, *, attn, device="cpu", dtype=torch.float32,
             weights_file: Path | None = None, quant_scheme: str | None = None, expert: str | None = None):
    """Build a WanDiT on the meta device and stream its weights in (strict). ``weights_file``: one safetensors
    file to take the weights from instead of the folder's (LightX2V's ``dit_original_ckpt``). ``quant_scheme``
    ("fp8" / "int8"): the block linears become QuantLinear; float weights are quantized as they stream in (on
    ``device``), pre-quantized ones (``X.weight`` + ``X.weight_scale``) are taken as they are. ``expert``: which
    DiT of a two-expert checkpoint ("high" / "low")."""
    from lightx2v.models.wan.dit import WanDiT

    cfg = read_dit_config(model_dir, layout, expert)
    with torch.device("meta"):
        model = WanDiT(cfg, attn)
    if weights_file is not None:
        tensors, what = single_file_dit_tensors(weights_file), f"DiT weights file {weights_file}"
    else:
        tensors = dit_tensors(model_dir, layout, expert)
        what = f"DiT checkpoint in {dit_folder(model_dir, layout, expert)}"
    quantized: set[str] = set()
    if quant_scheme is not None:
        from lightx2v.ops.quant import apply_quantization, quantizable_linears

        quantized = set(quantizable_linears(model))
        apply_quantization(model, quant_scheme)
        tensors = _quantize_stream(tensors, quantized, quant_scheme, device, what)

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


def _quantize_stream(tensors, quantized: set[str], scheme: str, device, what: str):
    """Quantize float weights of the quantized modules on the fly; pass pre-quantized ones through."""
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
                raise CheckpointError(f"{what}: {name} is stored as {t.dtype}, which does not fit "
                                      f"dit_quant_scheme {scheme!r} ({_STORAGE[scheme]})")
        yield name, t


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
