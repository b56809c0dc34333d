"""The Wan family (Wan2.1 T2V / I2V / FLF2V, Wan2.2 A14B and TI2V-5B): its model classes, defaults, config keys,
tiny models and stage builders, registered with the engine.

Each builder reads only what its stage needs: the encoder the text encoder, the CLIP image encoder (Wan2.1 image
tasks) and the VAE *encoder* (image tasks; the VAE's config otherwise), plus the DiT's ``config.json`` for its patch
size; the transformer the DiT shards (and no T5 / CLIP / VAE file); the decoder the VAE *decoder*. ``build_all``
adds the checks across components (text width, latent channels, image encoder) before anything is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lightx2v.engine.components import ComponentSlot, slot_policy
from lightx2v.engine.device import resolve_device_dtype
from lightx2v.engine.family import ModelFamily, StageSpec, register_family
from lightx2v.engine.guidance import BatchedCFG, SequentialCFG
from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.checkpoint import (EXPERT_FOLDERS, WAN_T5_FILE, WAN_TOKENIZER_DIR, detect_layout,
                                            dit_experts, dit_folder, read_dit_config, safetensors_files, vae_path)
from lightx2v.models.wan.stages import (Expert, WanDecoder, WanEncoder, WanTransformer, check_expert_settings,
                                        loras_per_expert)
from lightx2v.ops.attention import get_attention_backend

log = logging.getLogger("lightx2v")

WAN_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_TEMPORAL = 4

# --- model classes and their defaults -----------------------------------------------------------------------------
_DISTILL = {"denoising_step_list": [1000, 750, 500, 250], "enable_cfg": False, "sample_shift": 5.0}
# Wan2.2's defaults are the Wan2.2 release's: A14B T2V shift 12, guidance 4.0 (high-noise expert) / 3.0 (low),
# boundary 0.875; A14B I2V shift 5, guidance 3.5 / 3.5, boundary 0.9; TI2V-5B 1280x704, 121 frames at 24 fps.
_MOE_T2V = {"guidance_scale": [4.0, 3.0], "sample_shift": 12.0, "infer_steps": 40, "boundary": 0.875}
_MOE_I2V = {"guidance_scale": [3.5, 3.5], "sample_shift": 5.0, "infer_steps": 40, "boundary": 0.9}
_TI2V_5B = {"height": 704, "width": 1280, "num_frames": 121, "fps": 24, "guidance_scale": 5.0, "sample_shift": 5.0,
            "infer_steps": 50}
MODEL_CLASS_DEFAULTS = {
    "wan2.1": {"t2v": {}, "i2v": {}, "flf2v": {}},
    "wan2.1_distill": {"t2v": _DISTILL, "i2v": _DISTILL, "flf2v": _DISTILL},
    # A14B FLF2V: the I2V experts with a last frame too (LightX2V's wan_moe_flf2v / wan_distill_moe_flf2v)
    "wan2.2_moe": {"t2v": _MOE_T2V, "i2v": _MOE_I2V, "flf2v": _MOE_I2V},
    "wan2.2_moe_distill": {"t2v": {**_DISTILL, "boundary_step_index": 2},
                           "i2v": {**_DISTILL, "boundary_step_index": 2},
                           "flf2v": {**_DISTILL, "boundary_step_index": 2}},
    "wan2.2": {"t2v": _TI2V_5B, "i2v": _TI2V_5B},
}


@dataclass(frozen=True)
class WanConfig:
    """Config keys only the Wan family reads (checked against the checkpoint when the generator is built)."""

    use_image_encoder: bool | None = None  # CLIP image tokens: Wan2.1 I2V yes, Wan2.2 no
    vae_stride: tuple[int, int, int] | None = None  # [4, 8, 8] Wan2.1 VAE, [4, 16, 16] Wan2.2 VAE
    # lightweight autoencoders (LightX2V's keys): decode with the tiny autoencoder (TAEHV taew2_1 / taew2_2, or
    # LightX2V's lighttae), or use LightX2V's pruned Wan VAE (LightVAE) for encode and decode
    use_tae: bool = False
    tae_path: str | None = None  # default: taew2_1.pth / taew2_2.pth under the model folder (LightX2V's places)
    need_scaled: bool | None = None  # TAE: it works on raw latents (z * std + mean); None: from the file name
    use_lightvae: bool = False
    vae_path: str | None = None  # LightVAE file (default: lightvaew2_1.safetensors under the model folder)
    # what LightX2V configs repeat of the checkpoint (its config.json's sizes, the latent width): accepted when
    # they match it, named when they do not
    num_channels_latents: int | None = None  # the VAE's latent channels: 16 (Wan2.1 VAE) or 48 (Wan2.2 VAE)
    dim: int | None = None
    ffn_dim: int | None = None
    freq_dim: int | None = None
    in_dim: int | None = None
    out_dim: int | None = None
    num_heads: int | None = None
    num_layers: int | None = None
    eps: float | None = None
    model_type: str | None = None
    text_dim: int | None = None
    window_size: tuple | None = None  # [-1, -1]: global attention (every Wan release)
    qk_norm: bool | None = None  # true for every Wan release
    cross_attn_norm: bool | None = None  # true for every Wan release
    num_train_timesteps: int | None = None  # 1000 for Wan

    def __post_init__(self):
        from lightx2v.validate import check_bool

        check_bool("use_tae", self.use_tae)
        check_bool("use_lightvae", self.use_lightvae)
        if self.need_scaled is not None:
            check_bool("need_scaled", self.need_scaled)
        if self.use_tae and self.use_lightvae:
            raise UserError("use_tae and use_lightvae both set: choose one decoder (the tiny autoencoder or the "
                            "pruned VAE)")
        for flag, keys in (("use_tae", ("tae_path", "need_scaled")), ("use_lightvae", ("vae_path",))):
            given = [k for k in keys if getattr(self, k) is not None]
            if given and not getattr(self, flag):
                raise UserError(f"{', '.join(given)} set without {flag}: true")
        if self.use_image_encoder is not None and not isinstance(self.use_image_encoder, bool):
            raise UserError(f"use_image_encoder={self.use_image_encoder!r} must be true or false")
        for name in ("num_channels_latents", *DIT_ARCH_KEYS, "num_train_timesteps"):
            value = getattr(self, name)
            if value is None:
                continue
            if name == "eps":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            elif name == "model_type":
                ok = isinstance(value, str)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not ok:
                raise UserError(f"{name}={value!r} is not a valid value (it must match the checkpoint's)")
        for name, want in FIXED_ARCH.items():
            value = getattr(self, name)
            if value is not None and (list(value) if isinstance(value, (list, tuple)) else value) != want:
                raise UserError(f"{name}={value!r} is not supported: every Wan DiT has {name}={want!r}")
        if self.vae_stride is not None:
            if list(self.vae_stride) not in ([4, 8, 8], [4, 16, 16]):
                raise UserError(f"vae_stride={self.vae_stride!r} is not supported; allowed: [4, 8, 8] (Wan2.1 VAE), "
                                "[4, 16, 16] (Wan2.2 VAE)")
            object.__setattr__(self, "vae_stride", tuple(self.vae_stride))


# LightX2V keys whose value is fixed for Wan
FIXED_KEYS = {"text_len": 512, "patch_size": [1, 2, 2]}
# sizes of the DiT a config may repeat (checked against the checkpoint's config), and values fixed for every Wan DiT
DIT_ARCH_KEYS = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "eps", "model_type",
                 "text_dim")
FIXED_ARCH = {"window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "num_train_timesteps": 1000}
# Keys LightX2V's runner of a model class does not read (its WanRunner / Wan22MoeRunner samples with infer_steps
# and boundary; the step-distill runners with denoising_step_list and boundary_step_index).
_NOT_DISTILL = "model_cls {cls!r} samples with infer_steps (LightX2V's WanScheduler reads no step list)"
IGNORED_KEYS = {
    "wan2.1": {"denoising_step_list": _NOT_DISTILL.format(cls="wan2.1") + "; use model_cls 'wan2.1_distill' for the "
                                                                          "step-distilled sampler"},
    "wan2.2": {"denoising_step_list": _NOT_DISTILL.format(cls="wan2.2")},
    "wan2.2_moe": {"denoising_step_list": _NOT_DISTILL.format(cls="wan2.2_moe") + "; use model_cls "
                                                                                  "'wan2.2_moe_distill' for it",
                   "boundary_step_index": "model_cls 'wan2.2_moe' switches experts at boundary (LightX2V's "
                                          "Wan22MoeRunner reads no boundary_step_index)"},
    "wan2.2_moe_distill": {"boundary": "model_cls 'wan2.2_moe_distill' switches experts after boundary_step_index "
                                       "steps (LightX2V's step-distill runner reads no boundary)"},
}


# --- what a builder reads ----------------------------------------------------------------------------------------

def uses_clip(model_cls: str, task: str) -> bool:
    """Wan2.1's image tasks condition on CLIP image tokens; Wan2.2 (A14B I2V, TI2V-5B) does not."""
    return task in ("i2v", "flf2v") and model_cls.startswith("wan2.1")


def experts_for(root: Path, layout: str, model_cls: str) -> tuple[str | None, ...]:
    experts = dit_experts(root, layout)
    moe = model_cls.startswith("wan2.2_moe")
    if moe and len(experts) == 1:
        folders = " and ".join(f"{f}/" for f in EXPERT_FOLDERS[layout].values())
        raise UserError(f"model_cls {model_cls!r} needs a two-expert checkpoint ({folders}); {str(root)!r} has one "
                        "DiT")
    if not moe and len(experts) > 1:
        raise UserError(f"{str(root)!r} is a two-expert (Wan2.2 A14B) checkpoint: use model_cls 'wan2.2_moe' (or "
                        "'wan2.2_moe_distill')")
    return experts


def _dit_config(root: Path, layout: str, experts, weights: bool):
    """The first DiT's config; ``weights``: read the shards' headers to tell Wan2.1 from Wan2.2 I2V DiTs (only the
    transformer stage opens shards)."""
    from lightx2v.models.wan.arch import WanDiTConfig
    from lightx2v.loading import read_json

    if weights or layout == "diffusers":
        return read_dit_config(root, layout, experts[0])
    return WanDiTConfig.from_wan_config(read_json(dit_folder(root, layout, experts[0]) / "config.json", "DiT config"))


def check_task(task: str, dit_cfg, model_cls: str, root: Path) -> None:
    """Check that the DiT can do ``task``."""
    model_type = dit_cfg.model_type
    if dit_cfg.has_image_input:  # Wan2.1 I2V / FLF2V: CLIP tokens, and for FLF2V two images
        ok = task == model_type
    elif dit_cfg.concat_condition:  # Wan2.2 A14B I2V: conditioning latents on channels, no CLIP
        ok = task in ("i2v", "flf2v")
    elif model_type == "ti2v" or model_cls == "wan2.2":  # TI2V-5B: text or first image
        ok = task in ("t2v", "i2v")
    else:
        ok = task == "t2v"
    if not ok:
        kind = {"t2v": "a text-to-video", "i2v": "an image-to-video", "flf2v": "a first-last-frame",
                "ti2v": "a text/image-to-video"}[model_type]
        raise UserError(f"task {task!r} does not fit the checkpoint {str(root)!r}, which is {kind} model "
                        f"(model_type {model_type!r}, {dit_cfg.in_dim} input channels); use another task or "
                        "checkpoint")


def _vae_config(spec: StageSpec, layout: str):
    from lightx2v.models.wan.vae import read_vae_config

    file = vae_path(spec.model_path, layout, wan22=spec.model_cls == "wan2.2")
    cfg = read_vae_config(file)
    if cfg.z_dim == 48 and spec.model_cls != "wan2.2":
        raise UserError(f"{str(spec.model_path)!r} has the Wan2.2 VAE (48 latent channels): use model_cls 'wan2.2'")
    wan = spec.config.family
    stride = (VAE_TEMPORAL, cfg.spatial_factor, cfg.spatial_factor)
    if wan is not None and wan.vae_stride is not None and wan.vae_stride != stride:
        raise UserError(f"vae_stride={list(wan.vae_stride)} does not fit this checkpoint's VAE ({list(stride)})")
    return file, cfg


def _tiling(cfg):
    from lightx2v.models.wan.vae import TilingConfig

    return TilingConfig() if cfg.runtime.use_tiling_vae else None


def text_width(root: Path, layout: str) -> int:
    """d_model of the text encoder, read without loading it (diffusers config, or the Wan file's embedding)."""
    import json

    if layout == "diffusers":
        return json.loads((root / "text_encoder" / "config.json").read_text())["d_model"]
    sd = torch.load(root / WAN_T5_FILE, map_location="cpu", weights_only=True, mmap=True)
    return sd["token_embedding.weight"].shape[1]


def check_model_files(root: Path, layout: str, image_input: bool, experts, vae_file: Path,
                      external: tuple = ()) -> None:
    """Fail early, naming the first missing file or folder of the checkpoint. ``image_input``: CLIP files too.
    ``external``: experts whose weights come from outside the folder (their shards are not required there)."""
    dit_configs = [str(dit_folder(root, layout, e).relative_to(root) / "config.json") for e in experts]
    if layout == "wan":
        names = dit_configs + [str(vae_file.relative_to(root)), WAN_T5_FILE, WAN_TOKENIZER_DIR]
        names += [WAN_CLIP_FILE] if image_input else []
    else:
        names = dit_configs + ["vae/config.json", "text_encoder/config.json", "tokenizer"]
        names += ["image_encoder/config.json", "image_processor"] if image_input else []
    _require(root, names, layout)
    for e in experts:
        if e not in external:
            safetensors_files(dit_folder(root, layout, e), "diffusion_pytorch_model")


def _require(root: Path, names: list[str], layout: str) -> None:
    for name in names:
        if not (root / name).exists():
            raise CheckpointError(f"missing {name} in the {layout} checkpoint folder {root}")


# --- the builders ------------------------------------------------------------------------------------------------

def build_encoder(spec: StageSpec) -> WanEncoder:
    from lightx2v.models.wan.encoders import load_text_encoder

    root, cfg = Path(spec.model_path), spec.config
    layout = detect_layout(root)
    experts = experts_for(root, layout, spec.model_cls)
    dit_cfg = _dit_config(root, layout, experts, weights=False)
    clip = uses_clip(spec.model_cls, spec.task)
    image_input = spec.task in ("i2v", "flf2v")
    vae_file, vae_cfg = _vae_config(spec, layout)
    if layout == "wan":
        names = [str(vae_file.relative_to(root)), WAN_T5_FILE, WAN_TOKENIZER_DIR] + ([WAN_CLIP_FILE] if clip else [])
    else:
        names = ["vae/config.json", "text_encoder/config.json", "tokenizer"]
        names += ["image_encoder/config.json", "image_processor"] if clip else []
    _require(root, names, layout)
    dev, dt = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)
    rt = cfg.runtime
    text_slot = ComponentSlot(lambda d: load_text_encoder(root, layout, device=d, dtype=dt), dev,
                              slot_policy(rt.t5_cpu_offload, rt.unload_modules))
    image_slot = vae_slot = None
    if clip:
        from lightx2v.models.wan.clip import load_image_encoder

        image_slot = ComponentSlot(lambda d: load_image_encoder(root, layout, device=d, dtype=dt), dev,
                                   slot_policy(rt.clip_cpu_offload, rt.unload_modules))
    tasks = ("t2v", "i2v") if spec.model_cls == "wan2.2" else (spec.task,)
    if image_input or spec.model_cls == "wan2.2":  # TI2V-5B: one model for both tasks; images per request
        load_vae, _ = _autoencoder(spec, layout, "encoder")
        vae_slot = ComponentSlot(load_vae, dev, slot_policy(rt.vae_cpu_offload, rt.unload_modules))
    return WanEncoder(text_slot, dev, z_dim=vae_cfg.z_dim, vae_spatial=vae_cfg.spatial_factor,
                      size_multiple=vae_cfg.spatial_factor * dit_cfg.patch_size[1], tasks=tasks,
                      image_encoder=image_slot, vae=vae_slot, tiling=_tiling(cfg),
                      first_frame_images=spec.model_cls == "wan2.2")


def build_transformer(spec: StageSpec) -> WanTransformer:
    from lightx2v.hooks.lora import LoRAConfig

    root, cfg = Path(spec.model_path), spec.config
    layout = detect_layout(root)
    experts = experts_for(root, layout, spec.model_cls)
    dit_cfgs = [read_dit_config(root, layout, e) for e in experts]
    dit_cfg = dit_cfgs[0]
    if spec.model_cls != "wan2.2" and dit_cfg.model_type == "ti2v":
        raise UserError(f"{str(root)!r} is a Wan2.2 TI2V-5B checkpoint: use model_cls 'wan2.2'")
    if len({(c.in_dim, c.out_dim, c.has_image_input, c.text_dim) for c in dit_cfgs}) > 1:
        raise CheckpointError(f"the two experts of {root} differ in their inputs: {dit_cfgs}")
    check_task(spec.task, dit_cfg, spec.model_cls, root)
    _require(root, [str(dit_folder(root, layout, e).relative_to(root) / "config.json") for e in experts], layout)
    weights = _weights_files(cfg.checkpoint, experts)
    for e, w in zip(experts, weights):
        if w is None:
            safetensors_files(dit_folder(root, layout, e), "diffusion_pytorch_model")
    dev, dt = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)
    if cfg.offload.cpu_offload and dev.type == "cpu":
        log.info("cpu_offload: the DiT runs on the CPU, where its weights already are; offloading only adds "
                 "copies here%s", " (lazy_load still bounds the host memory)" if cfg.offload.lazy_load else "")
    a = cfg.attention
    attn = tuple(get_attention_backend(name, dtype=dt, head_dim=dit_cfg.head_dim, device=dev)
                 for name in (a.self_attn_1_type, a.cross_attn_1_type, a.cross_attn_2_type))
    off, rt = cfg.offload, cfg.runtime
    if len(experts) > 1 and cfg.cache.method != "NoCaching":
        raise UserError("feature_caching is not supported yet for two-expert (Wan2.2 A14B) models")
    names = [EXPERT_FOLDERS["wan"][e] if e else None for e in experts]
    lora_cfg = cfg.lora
    if lora_cfg.loras:
        lora_cfg = LoRAConfig.from_lightx2v([_entry(s) for s in lora_cfg.loras], mode=lora_cfg.mode,
                                            names=tuple(n for n in names if n))
    loras = loras_per_expert(lora_cfg, [Expert(None, name=n) for n in names])
    stage_experts = []
    for index, (expert, weights_file) in enumerate(zip(experts, weights)):
        dit, scheme = _load_dit(root, layout, cfg, expert, weights_file, attn, dev, dt)
        lora = None
        if loras[index] is not None:  # runtime features, attached from outside the model
            from lightx2v.hooks.lora import apply_lora

            lora = apply_lora(dit, loras[index])
        cache = None
        if cfg.cache.method != "NoCaching":
            from lightx2v.hooks.caching import apply_feature_caching

            cache = apply_feature_caching(dit, cfg.cache)
        offload = None
        if off.cpu_offload:  # after LoRA merging (offloaded weights are read-only)
            from lightx2v.hooks.offload import apply_offload
            from lightx2v.models.wan.checkpoint import dit_lazy_tensors

            source = dit_lazy_tensors(root, layout, expert=expert, weights_file=weights_file) \
                if off.lazy_load else None
            offload = apply_offload(dit, off, dev, weights_source=source)
            offload.offload()  # nothing on the GPU until the denoising loop
        if rt.use_compile:
            from lightx2v.hooks.compile import apply_compile

            apply_compile(dit, mode=rt.compile_mode)
        stage_experts.append(Expert(dit, offload, cache, index, lora, names[index]))
    cfg_batch = rt.cfg_batch if isinstance(rt.cfg_batch, bool) else dev.type == "cuda"
    # one batch of two needs both branches in one forward: not with per-branch caches or streamed weights
    batched = cfg_batch and not off.cpu_offload and all(e.cache is None for e in stage_experts)
    return WanTransformer(stage_experts, dev, BatchedCFG() if batched else SequentialCFG(), cfg.cache.method)


def _autoencoder(spec: StageSpec, layout: str, part: str):
    """(loader(device) of the autoencoder half ``part``, its latent channels): the Wan VAE, or what WanConfig's
    use_tae / use_lightvae name (their files are found as LightX2V finds them; the VAE's own config still fixes the
    latent size the file must fit)."""
    from lightx2v.models.wan.autoencoders import default_tae_file, find_weight_file, load_latent_autoencoder
    from lightx2v.models.wan.lightvae import LIGHTVAE_FILE

    root, cfg = Path(spec.model_path), spec.config
    dt = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)[1]
    wan = cfg.family
    if wan is not None and wan.use_tae and part == "decoder":  # the TAE decodes; encoding keeps the full VAE
        z_dim = 48 if spec.model_cls == "wan2.2" else 16
        path = find_weight_file(root, wan.tae_path, default_tae_file(z_dim), "tae_path")
        return (lambda d: load_latent_autoencoder("tae", path, device=d, dtype=dt, z_dim=z_dim,
                                                  need_scaled=wan.need_scaled, part=part)), z_dim
    if wan is not None and wan.use_lightvae:
        z_dim = 48 if spec.model_cls == "wan2.2" else 16
        path = find_weight_file(root, wan.vae_path, LIGHTVAE_FILE, "vae_path")
        return (lambda d: load_latent_autoencoder("lightvae", path, device=d, dtype=dt, z_dim=z_dim,
                                                  part=part)), z_dim
    from lightx2v.models.wan.vae import load_wan_vae

    vae_file, vae_cfg = _vae_config(spec, layout)
    _require(root, [str(vae_file.relative_to(root)) if layout == "wan" else "vae/config.json"], layout)
    return (lambda d: load_wan_vae(vae_file, device=d, dtype=dt, part=part)), vae_cfg.z_dim


def build_decoder(spec: StageSpec) -> WanDecoder:
    root, cfg = Path(spec.model_path), spec.config
    layout = detect_layout(root)
    load, z_dim = _autoencoder(spec, layout, "decoder")
    dev = resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)[0]
    rt = cfg.runtime
    slot = ComponentSlot(load, dev, slot_policy(rt.vae_cpu_offload, rt.unload_modules))
    return WanDecoder(slot, dev, _tiling(cfg), z_dim=z_dim)


def build_all(spec: StageSpec):
    """The three stages of one process, after the checks across components (before any weight is read)."""
    check_checkpoint(spec)
    return build_encoder(spec), build_transformer(spec), build_decoder(spec)


def check_checkpoint(spec: StageSpec) -> None:
    """Everything that can be told from the configs and file headers, in the order a user meets it."""
    root, cfg, model_cls, task = Path(spec.model_path), spec.config, spec.model_cls, spec.task
    layout = detect_layout(root)
    experts = experts_for(root, layout, model_cls)
    dit_cfgs = [read_dit_config(root, layout, e) for e in experts]
    dit_cfg = dit_cfgs[0]
    if model_cls != "wan2.2" and dit_cfg.model_type == "ti2v":
        raise UserError(f"{str(root)!r} is a Wan2.2 TI2V-5B checkpoint: use model_cls 'wan2.2'")
    if len({(c.in_dim, c.out_dim, c.has_image_input, c.text_dim) for c in dit_cfgs}) > 1:
        raise CheckpointError(f"the two experts of {root} differ in their inputs: {dit_cfgs}")
    check_task(task, dit_cfg, model_cls, root)
    clip = task in ("i2v", "flf2v") and dit_cfg.has_image_input
    if clip != uses_clip(model_cls, task):
        raise UserError(f"{str(root)!r}: its DiT {'takes' if dit_cfg.has_image_input else 'takes no'} CLIP image "
                        f"tokens, which model_cls {model_cls!r} does not expect")
    vae_file = vae_path(root, layout, wan22=model_cls == "wan2.2")
    weights = _weights_files(cfg.checkpoint, experts)
    check_model_files(root, layout, clip, experts, vae_file,
                      external=tuple(e for e, w in zip(experts, weights) if w is not None))
    resolve_device_dtype(cfg.runtime.device, cfg.runtime.dtype)
    wan = cfg.family
    if wan is not None and wan.use_image_encoder is not None and wan.use_image_encoder != dit_cfg.has_image_input:
        raise UserError(f"use_image_encoder={str(wan.use_image_encoder).lower()} does not fit this DiT, which "
                        f"{'takes' if dit_cfg.has_image_input else 'takes no'} CLIP image tokens")
    _, vae_cfg = _vae_config(spec, layout)
    if wan is not None:
        check_arch_keys(wan, dit_cfg, vae_cfg.z_dim, root)
    if vae_cfg.z_dim != dit_cfg.out_dim:
        raise CheckpointError(f"the VAE's {vae_cfg.z_dim} latent channels ({vae_file.name}) do not fit the DiT's "
                              f"{dit_cfg.out_dim} output channels")
    multiple = vae_cfg.spatial_factor * dit_cfg.patch_size[1]
    for name in ("height", "width"):
        value = getattr(cfg.sampling, name)
        if value % multiple:
            raise UserError(f"{name}={value} is not divisible by {multiple} (this model's VAE and patch size); "
                            f"use e.g. {max(multiple, value // multiple * multiple)}")
    width = text_width(root, layout)
    if width != dit_cfg.text_dim:
        raise CheckpointError(f"text encoder width {width} does not match the DiT's text_dim {dit_cfg.text_dim}")
    if len(experts) > 1 and cfg.cache.method != "NoCaching":
        raise UserError("feature_caching is not supported yet for two-expert (Wan2.2 A14B) models")
    check_expert_settings(cfg.sampling, len(experts))


def check_arch_keys(wan: WanConfig, dit_cfg, z_dim: int, root: Path) -> None:
    """The sizes a config repeats must be the checkpoint's (LightX2V merges them over the checkpoint's config)."""
    if wan.num_channels_latents is not None and wan.num_channels_latents != z_dim:
        raise UserError(f"num_channels_latents={wan.num_channels_latents} does not fit {str(root)!r}, whose VAE has "
                        f"{z_dim} latent channels ({'Wan2.2' if z_dim == 48 else 'Wan2.1'} VAE)")
    for name in DIT_ARCH_KEYS:
        value = getattr(wan, name)
        have = getattr(dit_cfg, name)
        if value is None:
            continue
        same = abs(value - have) <= 1e-12 * max(1.0, abs(have)) if name == "eps" else value == have
        if not same:
            raise UserError(f"{name}={value!r} does not fit the DiT of {str(root)!r}, which has {name}={have!r}")


def _load_dit(root: Path, layout: str, cfg, expert: str | None, weights_file: str | None, attn, dev, dt):
    """One DiT with its weights -> (model, the quantization format of its block linears or None).

    The format: ``dit_quant_scheme`` when given, else what the weights hold (a pre-quantized checkpoint, ours or
    LightX2V's, is recognised from its ``weight_scale`` tensors). Float weights are quantized while loading; with
    ``lazy_load`` the blocks are read from disk as stored, so a quantized DiT needs pre-quantized weights."""
    from lightx2v.models.wan.checkpoint import (dit_source_files, load_dit, load_dit_without_blocks,
                                                stored_quant_scheme)
    from lightx2v.ops.quant import resolve_scheme

    off, ck = cfg.offload, cfg.checkpoint
    self_attn, cross_attn, image_attn = attn
    backends = dict(attn=self_attn, cross_attn=cross_attn, image_attn=image_attn)
    path = Path(weights_file) if weights_file else None
    where = str(path) if path is not None else str(dit_folder(root, layout, expert))
    stored = stored_quant_scheme(dit_source_files(root, layout, expert, path))
    scheme = resolve_scheme(ck.dit_quant_scheme)
    if stored is not None and scheme is not None and stored != scheme:
        raise CheckpointError(f"{where} holds {stored} weights, but dit_quant_scheme={ck.dit_quant_scheme!r} asks for "
                              f"{scheme}; set dit_quant_scheme to {stored} (or leave it out)")
    if stored is not None:
        if scheme is None:
            log.info("%s holds pre-quantized %s linears (X.weight + X.weight_scale): loading them as %s", where,
                     stored, stored)
        scheme = stored
    elif scheme is not None and ck.dit_quantized:
        log.info("dit_quantized: %s holds float weights; quantizing the block linears to %s while loading", where,
                 scheme)
    if off.lazy_load:  # block weights stay on disk; only the rest is loaded
        if scheme is not None and stored is None:
            raise UserError(f"lazy_load reads the block weights from disk as they are stored, and {where} holds "
                            f"float weights: for dit_quant_scheme {scheme!r} write a pre-quantized checkpoint first "
                            f"(`lightx2v convert SRC DST --layout wan --quantize {scheme}`), or leave out lazy_load")
        return load_dit_without_blocks(root, layout, device=dev, dtype=dt, expert=expert, weights_file=path,
                                       quant_scheme=scheme, **backends), scheme
    return load_dit(root, layout, device="cpu" if off.cpu_offload else dev, dtype=dt, weights_file=path,
                    quant_scheme=scheme, expert=expert, **backends), scheme


def _weights_files(ck, experts) -> list[str | None]:
    """Per expert, the weights to read instead of the model folder's (CheckpointConfig.weights_path): one DiT
    takes the ``dit_*`` keys, two experts the ``high_noise_*`` / ``low_noise_*`` ones."""
    one = {"dit_original_ckpt": ck.dit_original_ckpt, "dit_quantized_ckpt": ck.dit_quantized_ckpt}
    two = {k: getattr(ck, k) for k in ("high_noise_original_ckpt", "low_noise_original_ckpt",
                                       "high_noise_quantized_ckpt", "low_noise_quantized_ckpt")}
    if len(experts) == 1:
        given = [k for k, v in two.items() if v]
        if given:
            raise UserError(f"{', '.join(given)}: for two-expert (Wan2.2 A14B) models; this model has one DiT: use "
                            "dit_original_ckpt / dit_quantized_ckpt")
        if ck.dit_quantized_ckpt and not ck.dit_quantized:
            log.info("dit_quantized_ckpt is read only with dit_quantized: true (as in LightX2V); ignored")
        return [ck.weights_path(None)]
    given = [k for k, v in one.items() if v]
    if given:
        raise UserError(f"{', '.join(given)}: a two-expert model takes high_noise_* and low_noise_* weights "
                        "(high_noise_original_ckpt / low_noise_original_ckpt, or the *_quantized_ckpt keys)")
    return [ck.weights_path(e) for e in experts]


def _entry(spec) -> dict:
    return {"path": spec.path, "strength": spec.strength, **({"name": spec.name} if spec.name else {})}


# --- tiny models ---------------------------------------------------------------------------------------------------

def _recognizes(path: Path) -> bool:
    try:
        detect_layout(path)
    except UserError:
        return False
    return True


def _convert(src: Path, dst: Path, layout: str, quantize: str | None) -> Path:
    from lightx2v.models.wan.convert import convert_checkpoint

    return convert_checkpoint(src, dst, layout=layout, quantize=quantize)


def _tiny_model(task: str, model_cls: str) -> Path:
    from lightx2v.models.wan.tiny import ensure_tiny_model

    return ensure_tiny_model(task, model_cls)


def _tiny_defaults(task: str, model_cls: str) -> dict:
    from lightx2v.models.wan.tiny import tiny_defaults

    return tiny_defaults(task, model_cls)


FAMILY = WAN = register_family(ModelFamily(
    name="wan",
    model_classes=MODEL_CLASS_DEFAULTS,
    build_encoder=build_encoder,
    build_transformer=build_transformer,
    build_decoder=build_decoder,
    build_all=build_all,
    check=check_checkpoint,
    config_section=WanConfig,
    fixed_keys=FIXED_KEYS,
    lora_names=tuple(EXPERT_FOLDERS["wan"].values()),
    tiny_model=_tiny_model,
    tiny_defaults=_tiny_defaults,
    recognizes=_recognizes,
    convert=_convert,
    layouts=("wan", "diffusers"),
    ignored_keys=IGNORED_KEYS,
))

__all__ = ["FAMILY", "WAN", "WanConfig", "build_all", "build_decoder", "build_encoder", "build_transformer",
           "check_checkpoint"]
