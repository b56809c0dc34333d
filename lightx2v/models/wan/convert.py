"""``lightx2v convert SRC DST --layout wan|diffusers``: rewrite a Wan2.1 checkpoint in the other public layout.

The DiT is converted shard by shard (host memory stays at about one shard); the VAE and the text encoder are
loaded and written again. Tensors keep their dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from lightx2v.errors import UserError
from lightx2v.loading import iter_safetensors, read_json
from lightx2v.models.wan.checkpoint import (WAN_DIT_WEIGHTS, detect_layout, dit_experts, dit_folder,
                                            dit_key_from_diffusers, dit_key_to_diffusers, read_dit_config,
                                            safetensors_files, vae_path)

LAYOUTS = ("wan", "diffusers")


def convert_checkpoint(src: str | Path, dst: str | Path, *, layout: str, quantize: str | None = None) -> Path:
    """Write the checkpoint at ``src`` in ``layout`` under ``dst``; ``quantize`` ("fp8" / "int8") stores the DiT's
    block linears quantized (LightX2V's ``X.weight`` + ``X.weight_scale``), for ``dit_quant_scheme``."""
    from lightx2v.ops.quant import resolve_scheme

    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    scheme = resolve_scheme(quantize)
    src, dst = Path(src), Path(dst)
    src_layout = detect_layout(src)
    experts = dit_experts(src, src_layout)
    dit_cfg = read_dit_config(src, src_layout, experts[0])
    image_input = dit_cfg.has_image_input
    vae_src = vae_path(src, src_layout, wan22=dit_cfg.out_dim == 48)
    from lightx2v.models.wan.family import check_model_files

    check_model_files(src, src_layout, image_input, experts, vae_src)
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"destination {str(dst)!r} exists and is not empty")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create destination folder {str(dst)!r}: {e.strerror or e}") from None
    for expert in experts:
        convert_dit(src, src_layout, dst, layout, scheme, expert)
    z_dim = convert_vae(vae_src, dst, layout)
    convert_text_encoder(src, src_layout, dst, layout)
    if image_input:
        convert_image_encoder(src, src_layout, dst, layout)
    if layout == "diffusers":
        pipeline = "WanImageToVideoPipeline" if image_input or dit_cfg.concat_condition else "WanPipeline"
        extras = {}
        if len(experts) > 1:  # Wan2.2 A14B: diffusers switches experts at boundary_ratio
            extras["boundary_ratio"] = _boundary_ratio(src, src_layout, dit_cfg)
        if z_dim == 48:  # Wan2.2 TI2V-5B: a timestep per token
            extras["expand_timesteps"] = True
        write_diffusers_extras(dst, image_input, pipeline=pipeline, two_experts=len(experts) > 1, **extras)
    return dst


def _boundary_ratio(src: Path, layout: str, dit_cfg) -> float:
    """The source's own boundary (diffusers' model_index.json), else the Wan2.2 release's: 0.9 I2V, 0.875 T2V."""
    if layout == "diffusers" and (src / "model_index.json").is_file():
        ratio = read_json(src / "model_index.json", "model_index.json").get("boundary_ratio")
        if ratio is not None:
            return ratio
    from lightx2v.models.wan.family import MODEL_CLASS_DEFAULTS

    return MODEL_CLASS_DEFAULTS["wan2.2_moe"]["i2v" if dit_cfg.concat_condition else "t2v"]["boundary"]


def _quantizable_weight_names(cfg) -> set[str]:
    import torch

    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.ops.attention import get_attention_backend
    from lightx2v.ops.quant import quantizable_linears

    attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=cfg.head_dim, device=torch.device("cpu"))
    with torch.device("meta"):
        model = WanDiT(cfg, attn)
    return {f"{name}.weight" for name in quantizable_linears(model)}


def convert_dit(src: Path, src_layout: str, dst: Path, layout: str, scheme: str | None = None,
                expert: str | None = None) -> None:
    from lightx2v.ops.quant import quantize_weight

    cfg = read_dit_config(src, src_layout, expert)
    to_quantize = _quantizable_weight_names(cfg) if scheme else set()
    out = dit_folder(dst, layout, expert)
    out.mkdir(parents=True, exist_ok=True)
    shards = safetensors_files(dit_folder(src, src_layout, expert), WAN_DIT_WEIGHTS)
    weight_map = {}
    for i, shard in enumerate(shards):
        sd = {}
        for key, tensor in iter_safetensors([shard]):
            wan_key = dit_key_from_diffusers(key) if src_layout == "diffusers" else key
            out_tensors = {wan_key: tensor}
            if wan_key in to_quantize and tensor.is_floating_point():
                q, scale = quantize_weight(tensor, scheme)
                out_tensors = {wan_key: q, f"{wan_key}_scale": scale}
            for k, t in out_tensors.items():
                sd[dit_key_to_diffusers(k) if layout == "diffusers" else k] = t.contiguous()
        name = (f"{WAN_DIT_WEIGHTS}.safetensors" if len(shards) == 1
                else f"{WAN_DIT_WEIGHTS}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file(sd, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / f"{WAN_DIT_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = cfg.to_diffusers_config() if layout == "diffusers" else cfg.to_wan_config()
    (out / "config.json").write_text(json.dumps(config, indent=2))


def convert_vae(path: Path, dst: Path, layout: str) -> int:
    """Rewrite the VAE at ``path`` (a .pth file or a diffusers vae/ folder); returns its latent width."""
    import torch

    from lightx2v.models.wan.vae import load_wan_vae, save_wan_vae

    dtype = _stored_dtype(path)
    vae = load_wan_vae(path, dtype=dtype or torch.float32)
    z_dim = vae.config.z_dim
    save_wan_vae(vae, dst / vae.config.checkpoint_file if layout == "wan" else dst / "vae", layout=layout)
    return z_dim


def _stored_dtype(path: Path):
    """dtype of the first floating tensor of a VAE checkpoint (file or diffusers folder)."""
    import torch

    if path.is_dir():
        tensors = iter_safetensors(safetensors_files(path, WAN_DIT_WEIGHTS))
    else:
        tensors = iter(torch.load(path, map_location="cpu", weights_only=True, mmap=True).items())
    for _, t in tensors:
        if t.is_floating_point():
            return t.dtype
    return None


def convert_text_encoder(src: Path, src_layout: str, dst: Path, layout: str) -> None:
    from lightx2v.models.wan.encoders import load_text_encoder, save_text_encoder

    enc = load_text_encoder(src, src_layout, dtype=None)
    save_text_encoder(enc, dst, layout)


def convert_image_encoder(src: Path, src_layout: str, dst: Path, layout: str) -> None:
    from lightx2v.models.wan.clip import load_image_encoder, save_image_encoder

    save_image_encoder(load_image_encoder(src, src_layout, dtype=None, keep_last_layer=True), dst, layout)


def write_diffusers_extras(dst: Path, image_input: bool = False, *, pipeline: str | None = None,
                           two_experts: bool = False, **pipeline_config) -> None:
    """model_index.json and the scheduler config, so that diffusers' WanPipeline.from_pretrained(dst) works."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dst / "tokenizer"), local_files_only=True)
    index = {
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", type(tok).__name__],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if image_input:
        index.update(_class_name="WanImageToVideoPipeline", image_encoder=["transformers", "CLIPVisionModel"],
                     image_processor=["transformers", "CLIPImageProcessor"])
    if pipeline is not None:
        index["_class_name"] = pipeline
    if pipeline == "WanImageToVideoPipeline" and not image_input:
        index.update(image_encoder=[None, None], image_processor=[None, None])
    if two_experts:
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    index.update(pipeline_config)
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    (dst / "scheduler").mkdir(exist_ok=True)
    sched = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
             "use_flow_sigmas": True, "flow_shift": 5.0, "solver_order": 2, "predict_x0": True,
             "solver_type": "bh2", "lower_order_final": True}
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
