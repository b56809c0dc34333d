"""Checkpoint layouts of HunyuanVideo-1.5 and strict loaders for each component (each opens only its own files).

Two layouts are detected from the files on disk:

* ``"diffusers"`` (``hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v`` etc.): ``model_index.json``,
  ``transformer/ vae/ text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/ scheduler/ guider/`` and, for I2V,
  ``image_encoder/ feature_extractor/``. Our modules use these parameter names.
* ``"release"`` (``tencent/HunyuanVideo-1.5``, the folder LightX2V's ``hunyuan_video_1.5`` runner reads):
  ``transformer/<transformer_model_name>/`` (``config.json`` + ``*.safetensors`` in the release's names:
  ``double_blocks.N.img_attn_q``, ``txt_in.individual_token_refiner``, ``byt5_in``, ``vision_in``, ``final_layer``...),
  ``vae/`` (``encoder.down.N.block.M``...), ``text_encoder/llm/`` (the full Qwen2.5-VL-7B-Instruct folder),
  ``text_encoder/byt5-small/`` + ``text_encoder/Glyph-SDXL-v2/{checkpoints/byt5_model.pt, assets/*.json}`` and
  ``vision_encoder/siglip/{image_encoder,feature_extractor}/``.

The release's key names are mapped by the declared tables below. They were established from LightX2V's weight
classes (``lightx2v/models/networks/hunyuan_video/weights/*.py``, its ByT5/SigLIP/Qwen/VAE loaders) and agree with
diffusers' ``scripts/convert_hunyuan_video1_5_to_diffusers.py``; two tensors are not plain renames: the token refiner's
fused ``self_attn_qkv`` (split into ``to_q/to_k/to_v``) and ``final_layer.adaLN_modulation.1`` (shift, scale halves;
diffusers' ``norm_out.linear`` is scale, shift).

Every loader builds its module on the meta device, streams or reads the tensors, and reports every missing, unexpected
and mis-shaped tensor at once in a :class:`~lightx2v.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.hunyuan_video_15.arch import (HunyuanVideo15DiTConfig, HunyuanVideo15VAEConfig,
                                                    parse_transformer_model_name)
from lightx2v.loading import (assign_strict, check_present, iter_safetensors, key_problems, read_json,
                              read_safetensors_dir, require_file, safetensors_files)

__all__ = ["assign_strict", "detect_layout", "load_dit", "load_vae", "load_qwen_text_encoder", "load_glyph_encoder",
           "load_image_encoder", "sampling_defaults", "save_dit", "save_vae", "dit_tensors_from_release",
           "dit_state_dict_to_release", "vae_key_from_release", "vae_key_to_release"]

LAYOUTS = ("diffusers", "release")
DIT_WEIGHTS = "diffusion_pytorch_model"

# --- layout detection -------------------------------------------------------------------------------------------------


def detect_layout(model_path) -> str:
    """ "diffusers" or "release" for a model folder, or UserError naming what was expected."""
    root = Path(model_path)
    if not root.is_dir():
        raise UserError(f"model path {str(root)!r} does not exist or is not a directory")
    if (root / "model_index.json").is_file():
        return "diffusers"
    tdir = root / "transformer"
    if tdir.is_dir() and not (tdir / "config.json").is_file() and any(
            (d / "config.json").is_file() for d in tdir.iterdir() if d.is_dir()):
        return "release"
    if tdir.is_dir() and (tdir / "config.json").is_file():
        return "diffusers"
    raise UserError(f"model path {str(root)!r} holds neither HunyuanVideo-1.5 layout: expected diffusers' "
                    "model_index.json + transformer/ vae/ text_encoder/ ..., or the release's transformer/<name>/ "
                    "(e.g. transformer/480p_t2v/) + vae/ text_encoder/llm/ ...")


def release_transformer_names(model_path) -> list[str]:
    tdir = Path(model_path) / "transformer"
    return sorted(d.name for d in tdir.iterdir() if d.is_dir() and (d / "config.json").is_file())


def dit_folder(model_path, layout: str, transformer_model_name: str | None = None) -> Path:
    """The DiT's folder. In the release layout ``transformer_model_name`` picks ``transformer/<name>/`` (it may be
    omitted when there is only one)."""
    root = Path(model_path)
    if layout == "diffusers":
        return root / "transformer"
    names = release_transformer_names(root)
    if transformer_model_name is None:
        if len(names) != 1:
            raise UserError(f"{root}/transformer holds {', '.join(names) or 'no model'}; set transformer_model_name "
                            "to one of them")
        transformer_model_name = names[0]
    parse_transformer_model_name(transformer_model_name)
    if transformer_model_name not in names:
        raise UserError(f"transformer_model_name {transformer_model_name!r} is not in {root}/transformer; "
                        f"available: {', '.join(names) or 'none'}")
    return root / "transformer" / transformer_model_name


# --- DiT key names: the release <-> diffusers (ours) ------------------------------------------------------------------
# (release pattern, our replacement); applied to full key names, first match wins. The reverse table is derived by
# swapping the groups, so the two directions cannot disagree.

_B = r"double_blocks\.(\d+)\."
_R = r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."
_DIT_TABLE: tuple[tuple[str, str, str, str], ...] = (
    # (release regex, ours, ours regex, release)
    (r"img_in\.proj\.", "x_embedder.proj.", r"x_embedder\.proj\.", "img_in.proj."),
    (r"time_in\.mlp\.0\.", "time_embed.timestep_embedder.linear_1.",
     r"time_embed\.timestep_embedder\.linear_1\.", "time_in.mlp.0."),
    (r"time_in\.mlp\.2\.", "time_embed.timestep_embedder.linear_2.",
     r"time_embed\.timestep_embedder\.linear_2\.", "time_in.mlp.2."),
    (r"time_r_in\.mlp\.0\.", "time_embed.timestep_embedder_r.linear_1.",
     r"time_embed\.timestep_embedder_r\.linear_1\.", "time_r_in.mlp.0."),
    (r"time_r_in\.mlp\.2\.", "time_embed.timestep_embedder_r.linear_2.",
     r"time_embed\.timestep_embedder_r\.linear_2\.", "time_r_in.mlp.2."),
    (r"txt_in\.t_embedder\.mlp\.0\.", "context_embedder.time_text_embed.timestep_embedder.linear_1.",
     r"context_embedder\.time_text_embed\.timestep_embedder\.linear_1\.", "txt_in.t_embedder.mlp.0."),
    (r"txt_in\.t_embedder\.mlp\.2\.", "context_embedder.time_text_embed.timestep_embedder.linear_2.",
     r"context_embedder\.time_text_embed\.timestep_embedder\.linear_2\.", "txt_in.t_embedder.mlp.2."),
    (r"txt_in\.c_embedder\.linear_(1|2)\.", r"context_embedder.time_text_embed.text_embedder.linear_\1.",
     r"context_embedder\.time_text_embed\.text_embedder\.linear_(1|2)\.", r"txt_in.c_embedder.linear_\1."),
    (r"txt_in\.input_embedder\.", "context_embedder.proj_in.", r"context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (_R + r"norm(1|2)\.", r"context_embedder.token_refiner.refiner_blocks.\1.norm\2.",
     r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm(1|2)\.",
     r"txt_in.individual_token_refiner.blocks.\1.norm\2."),
    (_R + r"self_attn_proj\.", r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_out.0.",
     r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0\.",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_proj."),
    (_R + r"mlp\.fc1\.", r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.0.proj.",
     r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0\.proj\.",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc1."),
    (_R + r"mlp\.fc2\.", r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.2.",
     r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2\.",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc2."),
    (_R + r"adaLN_modulation\.1\.", r"context_embedder.token_refiner.refiner_blocks.\1.norm_out.linear.",
     r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear\.",
     r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1."),
    (r"byt5_in\.layernorm\.", "context_embedder_2.norm.", r"context_embedder_2\.norm\.", "byt5_in.layernorm."),
    (r"byt5_in\.fc(1|2|3)\.", r"context_embedder_2.linear_\1.", r"context_embedder_2\.linear_(1|2|3)\.",
     r"byt5_in.fc\1."),
    (r"vision_in\.proj\.0\.", "image_embedder.norm_in.", r"image_embedder\.norm_in\.", "vision_in.proj.0."),
    (r"vision_in\.proj\.1\.", "image_embedder.linear_1.", r"image_embedder\.linear_1\.", "vision_in.proj.1."),
    (r"vision_in\.proj\.3\.", "image_embedder.linear_2.", r"image_embedder\.linear_2\.", "vision_in.proj.3."),
    (r"vision_in\.proj\.4\.", "image_embedder.norm_out.", r"image_embedder\.norm_out\.", "vision_in.proj.4."),
    (r"cond_type_embedding\.", "cond_type_embed.", r"cond_type_embed\.", "cond_type_embedding."),
    (_B + r"img_mod\.linear\.", r"transformer_blocks.\1.norm1.linear.",
     r"transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.linear."),
    (_B + r"txt_mod\.linear\.", r"transformer_blocks.\1.norm1_context.linear.",
     r"transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.linear."),
    (_B + r"img_attn_(q|k|v)\.", r"transformer_blocks.\1.attn.to_\2.",
     r"transformer_blocks\.(\d+)\.attn\.to_(q|k|v)\.", r"double_blocks.\1.img_attn_\2."),
    (_B + r"img_attn_(q|k)_norm\.", r"transformer_blocks.\1.attn.norm_\2.",
     r"transformer_blocks\.(\d+)\.attn\.norm_(q|k)\.", r"double_blocks.\1.img_attn_\2_norm."),
    (_B + r"img_attn_proj\.", r"transformer_blocks.\1.attn.to_out.0.",
     r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn_proj."),
    (_B + r"txt_attn_(q|k|v)\.", r"transformer_blocks.\1.attn.add_\2_proj.",
     r"transformer_blocks\.(\d+)\.attn\.add_(q|k|v)_proj\.", r"double_blocks.\1.txt_attn_\2."),
    (_B + r"txt_attn_(q|k)_norm\.", r"transformer_blocks.\1.attn.norm_added_\2.",
     r"transformer_blocks\.(\d+)\.attn\.norm_added_(q|k)\.", r"double_blocks.\1.txt_attn_\2_norm."),
    (_B + r"txt_attn_proj\.", r"transformer_blocks.\1.attn.to_add_out.",
     r"transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn_proj."),
    (_B + r"img_mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj.",
     r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.fc1."),
    (_B + r"img_mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2.",
     r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.fc2."),
    (_B + r"txt_mlp\.fc1\.", r"transformer_blocks.\1.ff_context.net.0.proj.",
     r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.fc1."),
    (_B + r"txt_mlp\.fc2\.", r"transformer_blocks.\1.ff_context.net.2.",
     r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.fc2."),
    (r"final_layer\.adaLN_modulation\.1\.", "norm_out.linear.", r"norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"final_layer\.linear\.", "proj_out.", r"proj_out\.", "final_layer.linear."),
)
_FROM_RELEASE = [(re.compile("^" + p), r) for p, r, _, _ in _DIT_TABLE]
_TO_RELEASE = [(re.compile("^" + p), r) for _, _, p, r in _DIT_TABLE]
_QKV = re.compile(r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_qkv\.(weight|bias)$")
_OUR_QKV = re.compile(r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_(q|k|v)\.(weight|bias)$")
_FINAL_MOD = ("norm_out.linear.weight", "norm_out.linear.bias")


def _rename(key: str, table) -> str | None:
    for pattern, repl in table:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return None


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def dit_tensors_from_release(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(release key, tensor) -> (our key, tensor): renames, the refiner's fused qkv split in three, the final
    modulation's halves swapped. A key without a mapping comes back tagged so that strict loading reports it."""
    for key, t in tensors:
        m = _QKV.match(key)
        if m:
            if t.shape[0] % 3:
                yield f"{key} (fused qkv whose first dim {t.shape[0]} is not divisible by 3)", t
                continue
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                yield f"context_embedder.token_refiner.refiner_blocks.{m.group(1)}.attn.to_{name}.{m.group(2)}", part
            continue
        new = _rename(key, _FROM_RELEASE)
        if new is None:
            yield f"{key} (release name with no mapping)", t
        elif new in _FINAL_MOD:
            yield new, _swap_halves(t)
        else:
            yield new, t


def dit_state_dict_to_release(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (diffusers) DiT state dict -> the release's names (the inverse of :func:`dit_tensors_from_release`)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _OUR_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        new = _rename(key, _TO_RELEASE)
        if new is None:
            raise CheckpointError(f"DiT key {key!r} has no release name")
        out[new] = _swap_halves(t) if key in _FINAL_MOD else t
    for (i, kind), parts in qkv.items():
        out[f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _is_release_dit_key(key: str) -> bool:
    return key.startswith(("double_blocks.", "txt_in.", "img_in.", "final_layer.", "time_in."))


# --- DiT loading --------------------------------------------------------------------------------------------------------


def dit_weight_files(folder: Path, layout: str) -> list[Path]:
    if layout == "diffusers":
        return safetensors_files(folder, DIT_WEIGHTS)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"missing DiT weights: no *.safetensors in {folder}")
    return files


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (no tensor is read)."""
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def read_dit_config(model_path, layout: str, transformer_model_name: str | None = None,
                    with_shapes: bool = True) -> HunyuanVideo15DiTConfig:
    """The DiT's sizes; for the release also from its tensor shapes (refiner depth, ByT5 width: not in its config;
    ``with_shapes=False`` reads config.json alone, for stages that need only the output-size settings)."""
    folder = dit_folder(model_path, layout, transformer_model_name)
    d = read_json(folder / "config.json", "DiT config")
    if layout == "diffusers":
        return HunyuanVideo15DiTConfig.from_diffusers_config(d)
    shapes = weight_shapes(dit_weight_files(folder, layout)) if with_shapes else None
    return HunyuanVideo15DiTConfig.from_release_config(d, shapes)


def _file_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(our key, tensor) from safetensors files in either naming (decided by the first file's keys)."""
    with safe_open(str(files[0]), framework="pt", device="cpu") as sf:
        release = any(_is_release_dit_key(k) for k in sf.keys())
    stream = iter_safetensors(files)
    return dit_tensors_from_release(stream) if release else stream


def load_dit(model_path, layout: str, *, attn, device="cpu", dtype=torch.float32,
             transformer_model_name: str | None = None, weights_file=None, quant_scheme: str | None = None):
    """Build the DiT on the meta device and stream its weights in (strict). ``weights_file``: one safetensors file in
    either naming to take the weights from instead of the folder's (LightX2V's ``dit_original_ckpt``, e.g. a
    step-distilled DiT); the architecture still comes from the folder's config. ``quant_scheme`` ("fp8" / "int8"):
    the Linear layers of the blocks (the hook plan's ``quantize_prefixes``) become ``QuantLinear`` and their float
    weights are quantized per output channel as they stream in (on ``device``)."""
    from lightx2v.models.hunyuan_video_15.dit import HunyuanVideo15DiT

    cfg = read_dit_config(model_path, layout, transformer_model_name)
    with torch.device("meta"):
        model = HunyuanVideo15DiT(cfg, attn)
    if weights_file is not None:
        files, what = [require_file(Path(weights_file), "DiT weights file (dit_original_ckpt)")], \
            f"DiT weights file {weights_file}"
    else:
        folder = dit_folder(model_path, layout, transformer_model_name)
        files, what = dit_weight_files(folder, layout), f"DiT checkpoint in {folder}"
    tensors = _file_tensors(files)
    quantized: set[str] = set()
    if quant_scheme is not None:
        from lightx2v.ops.quant import apply_quantization, quantizable_linears

        quantized = set(quantizable_linears(model))
        apply_quantization(model, quant_scheme)
        tensors = _quantize_stream(tensors, quantized, quant_scheme, device, what)

    def dtype_for(name: str):
        module, _, leaf = name.rpartition(".")
        return None if module in quantized and leaf in ("weight", "weight_scale") else dtype

    assign_strict(model, tensors, what=what, dtype_for=dtype_for, device=device)
    return model.eval().requires_grad_(False)


def _quantize_stream(tensors, quantized: set[str], scheme: str, device, what: str
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Float weights of the ``quantized`` Linear layers -> (int8 / fp8 weight, float32 ``weight_scale``); weights
    already stored in the scheme's format pass through (with their ``weight_scale``), the rest as they come. (The
    rule of Wan's loader; a generic helper for ``lightx2v.loading``.)"""
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


def save_dit(model, folder, layout: str = "diffusers") -> None:
    """Write a DiT in ``layout`` (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        cfg = model.cfg.to_diffusers_config()
    else:
        cfg, sd = model.cfg.to_release_config(), dit_state_dict_to_release(sd)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(sd, str(folder / f"{DIT_WEIGHTS}.safetensors"), metadata={"format": "pt"})


# --- VAE ------------------------------------------------------------------------------------------------------------------
# release (LightX2V's AutoencoderKLConv3D) -> diffusers' AutoencoderKLHunyuanVideo15 names

_VAE_TABLE: tuple[tuple[str, str, str, str], ...] = (
    (r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.nin_shortcut\.", r"\1.\2_blocks.\3.resnets.\4.conv_shortcut.",
     r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.", r"\1.\2.\3.block.\4.nin_shortcut."),
    (r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.", r"\1.\2_blocks.\3.resnets.\4.",
     r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.\2.\3.block.\4."),
    (r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.",
     r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0.",
     r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample."),
    (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.",
     r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.",
     r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2.",
     r"(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.",
     r"(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.", r"\1.\2.",
     r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.", r"\1.\2."),
)
_VAE_FROM_RELEASE = [(re.compile("^" + p), r) for p, r, _, _ in _VAE_TABLE]
_VAE_TO_RELEASE = [(re.compile("^" + p), r) for _, _, p, r in _VAE_TABLE]


def vae_key_from_release(key: str) -> str:
    return _rename(key, _VAE_FROM_RELEASE) or f"{key} (release VAE name with no mapping)"


def vae_key_to_release(key: str) -> str:
    new = _rename(key, _VAE_TO_RELEASE)
    if new is None:
        raise CheckpointError(f"VAE key {key!r} has no release name")
    return new


def read_vae_config(model_path, layout: str) -> HunyuanVideo15VAEConfig:
    d = read_json(Path(model_path) / "vae" / "config.json", "VAE config")
    if layout == "diffusers":
        return HunyuanVideo15VAEConfig.from_diffusers_config(d)
    return HunyuanVideo15VAEConfig.from_release_config(d)


def load_vae(model_path, layout: str, *, device="cpu", dtype=torch.float32, parts=("encoder", "decoder")):
    """The VAE, strictly loaded. ``parts`` limits it to the encoder or the decoder (the other half is dropped and its
    tensors are skipped unread, so the decode stage never holds the encoder)."""
    from lightx2v.models.hunyuan_video_15.vae import HunyuanVideo15VAE

    folder = Path(model_path) / "vae"
    cfg = read_vae_config(model_path, layout)
    with torch.device("meta"):
        vae = HunyuanVideo15VAE(cfg)
    for side in ("encoder", "decoder"):
        if side not in parts:
            setattr(vae, side, None)
    files = dit_weight_files(folder, "diffusers") if layout == "diffusers" else dit_weight_files(folder, "release")
    with safe_open(str(files[0]), framework="pt", device="cpu") as sf:
        release_names = any(".down." in k or ".up." in k or ".mid." in k for k in sf.keys())

    def tensors():
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    ours = vae_key_from_release(key) if release_names else key
                    if ours.split(".", 1)[0] in parts or ours.split(".", 1)[0] not in ("encoder", "decoder"):
                        yield ours, sf.get_tensor(key)

    assign_strict(vae, tensors(), what=f"VAE checkpoint in {folder}", dtype_for=lambda n: dtype, device=device)
    return vae.eval().requires_grad_(False)


def save_vae(vae, model_path, layout: str = "diffusers") -> None:
    folder = Path(model_path) / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    if layout == "diffusers":
        cfg = vae.cfg.to_diffusers_config()
    else:
        cfg, sd = vae.cfg.to_release_config(), {vae_key_to_release(k): v for k, v in sd.items()}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(sd, str(folder / f"{DIT_WEIGHTS}.safetensors"), metadata={"format": "pt"})


# --- transformers models (Qwen2.5-VL text, ByT5, SigLIP) ---------------------------------------------------------------


def _load_hf_model(model_cls, config, sd: dict[str, torch.Tensor], *, device, dtype, what: str,
                   tied: dict[str, str] | None = None, show_key: Callable[[str], str] | None = None, fix_buffers=None):
    """Build ``model_cls(config)`` on the meta device and assign ``sd`` strictly. ``tied``: alias -> owner of weights
    the model ties (the alias may be absent from ``sd``). ``fix_buffers(model, device)`` recreates non-persistent
    buffers (left on the meta device by the meta build)."""
    tied = tied or {}
    with torch.device("meta"):
        model = model_cls(config)
    sd = dict(sd)
    for alias, owner in tied.items():
        if alias in sd:
            t = sd.pop(alias)
            if owner not in sd:
                sd[owner] = t
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    problems = key_problems(expected, sd, show_key, mismatch="{key} checkpoint {got} vs model {want}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    tensors = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    for alias, owner in tied.items():
        owner_mod, _, owner_leaf = owner.rpartition(".")
        alias_mod, _, alias_leaf = alias.rpartition(".")
        setattr(model.get_submodule(alias_mod), alias_leaf, getattr(model.get_submodule(owner_mod), owner_leaf))
    if fix_buffers is not None:
        fix_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors never loaded: {', '.join(left)}")
    return model.eval().requires_grad_(False)


def _load_tokenizer(folder: Path, vocab_size: int, what: str, **kwargs):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise CheckpointError(f"missing {what} folder: {folder}")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the {what} in {folder}: {e}") from e
    if len(tok) > vocab_size:
        raise CheckpointError(f"{what} in {folder} has {len(tok)} tokens but its encoder's vocabulary has {vocab_size}")
    return tok


def _qwen_rotary(model, device) -> None:
    with torch.device(device):
        model.rotary_emb = type(model.rotary_emb)(config=model.config)


# Keys of the full Qwen2.5-VL checkpoint (release layout): the language model under one of these prefixes; the vision
# tower and the LM head are not used for text encoding.
_QWEN_LM_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_QWEN_UNUSED_PREFIXES = ("visual.", "model.visual.", "lm_head.", "language_model.lm_head.")


def _qwen_lm_state_dict(sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        if key.startswith(_QWEN_UNUSED_PREFIXES):
            continue
        for p in _QWEN_LM_PREFIXES:
            if key.startswith(p):
                out[key[len(p):]] = t
                break
        else:
            out[key] = t  # an unknown name: left as it is, so that the strict check reports it
    return out


def load_qwen_text_encoder(model_path, layout: str, *, device="cpu", dtype=torch.float32):
    """Qwen2.5-VL's language model + tokenizer: diffusers' ``text_encoder/`` (a ``Qwen2_5_VLTextModel``) and
    ``tokenizer/``, or the release's ``text_encoder/llm/`` (the whole Qwen2.5-VL-7B-Instruct folder, tokenizer
    included; the vision tower and LM head are skipped)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from lightx2v.models.hunyuan_video_15.text_encoder import QwenTextEncoder

    root = Path(model_path)
    te_dir = root / "text_encoder" if layout == "diffusers" else root / "text_encoder" / "llm"
    tok_dir = root / "tokenizer" if layout == "diffusers" else te_dir
    check_present([(te_dir / "config.json", "Qwen2.5-VL text encoder config"), (tok_dir, "Qwen tokenizer folder")])
    raw = read_json(te_dir / "config.json", "Qwen2.5-VL config")
    kind = raw.get("model_type")
    try:
        if kind == "qwen2_5_vl_text":
            config = Qwen2_5_VLTextConfig.from_dict(raw)
        elif kind == "qwen2_5_vl":
            config = Qwen2_5_VLConfig.from_dict(raw).text_config
        else:
            raise CheckpointError(f"{te_dir}/config.json: model_type {kind!r}; expected 'qwen2_5_vl_text' or "
                                  "'qwen2_5_vl'")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{te_dir}/config.json: not a Qwen2.5-VL config: {e}") from e
    sd = _qwen_lm_state_dict(read_safetensors_dir(te_dir, "Qwen2.5-VL text encoder"), str(te_dir))
    model = _load_hf_model(Qwen2_5_VLTextModel, config, sd, device=device, dtype=dtype, what=str(te_dir),
                           fix_buffers=_qwen_rotary)
    tokenizer = _load_tokenizer(tok_dir, config.vocab_size, "Qwen tokenizer", padding_side="right")
    return QwenTextEncoder(tokenizer, model)


_T5_TIED = {"encoder.embed_tokens.weight": "shared.weight"}
GLYPH_DIR = "Glyph-SDXL-v2"


def _glyph_special_tokens(assets: Path) -> list[str]:
    """The colour and (multilingual) font tokens Glyph-SDXL-v2 adds to ByT5's vocabulary, in its order."""
    colors = read_json(assets / "color_idx.json", "Glyph-SDXL-v2 colour list")
    fonts = read_json(assets / "multilingual_10-lang_idx.json", "Glyph-SDXL-v2 font list")
    return [f"<color-{i}>" for i in range(len(colors))] + [f"<{code[:2]}-font-{fonts[code]}>" for code in fonts]


def load_glyph_encoder(model_path, layout: str, *, device="cpu", dtype=torch.float32):
    """ByT5 (Glyph-SDXL-v2) + tokenizer: diffusers' ``text_encoder_2/`` (``T5EncoderModel``) and ``tokenizer_2/``, or
    the release's ``text_encoder/byt5-small/`` (config and base tokenizer) + ``text_encoder/Glyph-SDXL-v2/`` (the
    encoder weights ``checkpoints/byt5_model.pt`` and the colour/font tokens ``assets/*.json`` added to the
    tokenizer, as LightX2V's ``ByT5TextEncoder`` does)."""
    from transformers import T5Config, T5EncoderModel

    from lightx2v.models.hunyuan_video_15.text_encoder import GlyphTextEncoder

    root = Path(model_path)
    if layout == "diffusers":
        te_dir, tok_dir = root / "text_encoder_2", root / "tokenizer_2"
        check_present([(te_dir / "config.json", "ByT5 config"), (tok_dir, "ByT5 tokenizer folder")])
        config = T5Config.from_dict(read_json(te_dir / "config.json", "ByT5 config"))
        sd = read_safetensors_dir(te_dir, "ByT5 text encoder")
        what, extra_tokens = str(te_dir), []
    else:
        base, glyph = root / "text_encoder" / "byt5-small", root / "text_encoder" / GLYPH_DIR
        pt = glyph / "checkpoints" / "byt5_model.pt"
        check_present([(base / "config.json", "byt5-small config"), (pt, "Glyph-SDXL-v2 ByT5 weights"),
                       (glyph / "assets", "Glyph-SDXL-v2 assets folder")])
        config = T5Config.from_dict(read_json(base / "config.json", "byt5-small config"))
        raw = torch.load(str(pt), map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and "state_dict" in raw:
            raw = {k[len("module.text_tower.encoder."):]: v for k, v in raw["state_dict"].items()
                   if k.startswith("module.text_tower.encoder.")}
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise CheckpointError(f"{pt}: expected a state dict of tensors")
        sd = {f"encoder.{k}": v for k, v in raw.items()}  # T5Stack names -> T5EncoderModel names
        if "encoder.embed_tokens.weight" in sd:
            config.vocab_size = sd["encoder.embed_tokens.weight"].shape[0]  # resized for the glyph tokens
        what, tok_dir, extra_tokens = str(pt), base, _glyph_special_tokens(glyph / "assets")
    config.is_encoder_decoder = False
    model = _load_hf_model(T5EncoderModel, config, sd, device=device, dtype=dtype, what=what, tied=_T5_TIED)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the ByT5 tokenizer in {tok_dir}: {e}") from e
    if extra_tokens:
        tokenizer.add_tokens(extra_tokens, special_tokens=True)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"ByT5 tokenizer in {tok_dir} has {len(tokenizer)} tokens but the encoder's "
                              f"vocabulary has {config.vocab_size}")
    return GlyphTextEncoder(tokenizer, model)


def _siglip_positions(model, device) -> None:
    emb = model.vision_model.embeddings if hasattr(model, "vision_model") else model.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))


def image_encoder_folders(model_path, layout: str) -> tuple[Path, Path]:
    root = Path(model_path)
    if layout == "diffusers":
        return root / "image_encoder", root / "feature_extractor"
    base = root / "vision_encoder" / "siglip"
    return base / "image_encoder", base / "feature_extractor"


def load_image_encoder(model_path, layout: str, *, device="cpu", dtype=torch.float32):
    """SigLIP (``SiglipVisionModel`` + ``SiglipImageProcessor``): diffusers' ``image_encoder/`` +
    ``feature_extractor/``, or the release's ``vision_encoder/siglip/{image_encoder,feature_extractor}/``."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from lightx2v.models.hunyuan_video_15.image_encoder import SiglipImageEncoder

    enc_dir, proc_dir = image_encoder_folders(model_path, layout)
    check_present([(enc_dir / "config.json", "SigLIP image encoder config"),
                   (proc_dir / "preprocessor_config.json", "SigLIP image processor config")])
    raw = read_json(enc_dir / "config.json", "SigLIP config")
    config = SiglipVisionConfig.from_dict(raw.get("vision_config", raw) if raw.get("model_type") == "siglip" else raw)
    sd = read_safetensors_dir(enc_dir, "SigLIP image encoder")
    model = _load_hf_model(SiglipVisionModel, config, sd, device=device, dtype=dtype, what=str(enc_dir),
                           fix_buffers=_siglip_positions)
    try:
        processor = SiglipImageProcessor.from_pretrained(str(proc_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the SigLIP image processor in {proc_dir}: {e}") from e
    return SiglipImageEncoder(processor, model)


# --- sampling defaults the checkpoint carries ---------------------------------------------------------------------------

# The release carries no scheduler/guider config: the values diffusers' conversion script writes per model
# (LightX2V's configs give sample_shift explicitly; its 720p_i2v_distilled config uses 9.0 where diffusers has 7.0).
RELEASE_SHIFT = {("480p", "t2v"): 5.0, ("480p", "i2v"): 5.0, ("720p", "t2v"): 9.0, ("720p", "i2v"): 7.0}


def sampling_defaults(model_path, layout: str, transformer_model_name: str | None = None) -> dict:
    """``{"sample_shift": float, "guidance_scale": float}`` of a checkpoint: diffusers' ``scheduler/`` and ``guider/``
    configs, or (release) the published values for the model name (CFG-distilled models: guidance 1, no CFG)."""
    root = Path(model_path)
    if layout == "diffusers":
        sched = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
        if sched.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            raise CheckpointError(f"{root}/scheduler: {sched.get('_class_name')} is not supported "
                                  "(FlowMatchEulerDiscreteScheduler expected)")
        odd = {k: sched[k] for k in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
                                     "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")
               if sched.get(k)}
        if odd or sched.get("shift_terminal"):
            raise CheckpointError(f"{root}/scheduler: options {odd or {'shift_terminal': sched['shift_terminal']}} "
                                  "are not supported")
        guider_path = root / "guider" / "guider_config.json"
        guider = read_json(guider_path, "guider config") if guider_path.is_file() else {}
        if guider.get("guidance_rescale", 0.0) or guider.get("use_original_formulation", False):
            raise CheckpointError(f"{guider_path}: guidance_rescale / use_original_formulation are not supported")
        enabled = guider.get("enabled", True)
        return {"sample_shift": float(sched.get("shift", 1.0)),
                "guidance_scale": float(guider.get("guidance_scale", 7.5)) if enabled else 1.0}
    name = dit_folder(root, layout, transformer_model_name).name
    resolution, task, distilled = parse_transformer_model_name(name)
    return {"sample_shift": RELEASE_SHIFT.get((resolution, task), 5.0),
            "guidance_scale": 1.0 if distilled else 6.0}


def folders_read_by(component: str, model_path, layout: str, transformer_model_name: str | None = None) -> list[Path]:
    """The folders a component's loader reads (for the stage-isolation test and for error messages)."""
    root = Path(model_path)
    if component == "dit":
        return [dit_folder(root, layout, transformer_model_name)]
    if component == "vae":
        return [root / "vae"]
    if component == "text":
        if layout == "diffusers":
            return [root / "text_encoder", root / "tokenizer", root / "text_encoder_2", root / "tokenizer_2"]
        return [root / "text_encoder"]
    if component == "image":
        return list(image_encoder_folders(root, layout))
    raise ValueError(component)
