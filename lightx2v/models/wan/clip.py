"""Wan2.1 CLIP image encoder (I2V / FLF2V): open-clip ViT-H/14 run through transformers' ``CLIPVisionModel``.

Numerics follow diffusers' ``WanImageToVideoPipeline.encode_image``: the images go through a ``CLIPImageProcessor``
(resize the shortest edge to 224 bicubic, center crop 224, rescale to [0, 1], normalize with OpenCLIP's mean/std) and
the result is the encoder's penultimate hidden state, ``hidden_states[-2]``: ``[N, 257, 1280]`` for ViT-H/14.

CLIP's ``post_layernorm`` only touches the pooled output, so ``hidden_states[-2]`` is exactly the ``last_hidden_state``
of the same model without its last transformer layer. :func:`load_image_encoder` drops that layer after the strict load
(unless ``keep_last_layer=True``, which :func:`save_image_encoder` needs to write a complete checkpoint).

Two public checkpoint layouts are read (and written, for ``lightx2v convert``):

* ``"diffusers"``: ``image_encoder/`` (``config.json`` + ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``) and ``image_processor/`` (``preprocessor_config.json``). Keys may carry the
  ``vision_model.`` prefix (released checkpoints, transformers 4.x, ``CLIPVisionModelWithProjection``) or not
  (``CLIPVisionModel`` saved by transformers 5.x); ``visual_projection.weight`` is ignored.
* ``"wan"`` (the original Wan2.1 release): ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, the state dict
  of Wan's ``XLMRobertaCLIP`` (``wan/modules/clip.py``). The visual tower ``visual.*`` is renamed through the declared
  table :data:`WAN_TO_HF_KEYS` (the fused ``attn.to_qkv`` is split into q/k/v); the keys listed in
  :data:`WAN_IGNORED_KEYS` (text tower ``textual.*``, ``log_scale``, the projection ``visual.head``) are skipped; any
  other key is an error. The ``CLIPVisionConfig`` is inferred from the tensor shapes (:func:`infer_clip_vision_config`)
  and the image processor is :func:`openclip_image_processor`.

Models are built on the meta device and filled with ``load_state_dict(strict=False, assign=True)`` after an own strict
check: any missing, unexpected or mis-shaped tensor, and any missing file, raises
:class:`~lightx2v.errors.CheckpointError` naming all of them.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.loading import check_present, key_problems, read_json, read_safetensors_dir, torch_load_state_dict

__all__ = [
    "DIFFUSERS_IGNORED_KEYS",
    "DIFFUSERS_IMAGE_ENCODER_DIR",
    "DIFFUSERS_IMAGE_PROCESSOR_DIR",
    "HF_TO_WAN_KEYS",
    "OPENCLIP_MEAN",
    "OPENCLIP_STD",
    "WAN_CLIP_CHECKPOINT",
    "WAN_CLIP_HEAD_DIM",
    "WAN_IGNORED_KEYS",
    "WAN_TO_HF_KEYS",
    "WanImageEncoder",
    "build_tiny_clip",
    "clip_state_dict_from_wan",
    "clip_state_dict_to_wan",
    "infer_clip_vision_config",
    "load_image_encoder",
    "openclip_image_processor",
    "save_image_encoder",
]

WAN_CLIP_CHECKPOINT = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
DIFFUSERS_IMAGE_ENCODER_DIR = "image_encoder"
DIFFUSERS_IMAGE_PROCESSOR_DIR = "image_processor"
LAYOUTS = ("wan", "diffusers")

#: OpenCLIP / OpenAI CLIP normalization (Wan's ``clip.py`` and the released diffusers ``image_processor``).
OPENCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENCLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the ``resample`` value of the released preprocessor_config.json

#: ViT-H/14's attention head size; a Wan checkpoint has no config, so num_heads = hidden // 80.
WAN_CLIP_HEAD_DIM = 80

# Settings of Wan's ``clip_xlm_roberta_vit_h_14`` visual tower that the shapes cannot tell: ``activation='gelu'`` is
# ``nn.GELU()`` (exact erf GELU, transformers' "gelu"), ``norm_eps=1e-5``, no dropout.
_WAN_VIT_FIXED = {
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
}
_WAN_DEFAULT_PROJECTION_DIM = 1024  # ``embed_dim`` of Wan's XLMRobertaCLIP; used only when ``visual.head`` is absent

# Names below are transformers' ``CLIPVisionModel`` names without the ``vision_model.`` prefix ("canonical" names).
_HF_PREFIX = "vision_model."
_HF_LAYER = r"encoder.layers.\1"
_QKV = ("q_proj", "k_proj", "v_proj")  # order of the three slices of Wan's fused ``to_qkv`` (view(b, s, 3, n, d))

#: Wan visual-tower key -> transformers CLIPVisionModel key (first full match wins). ``attn.to_qkv`` is not in this
#: table: it is split into ``self_attn.{q,k,v}_proj`` (see :func:`clip_state_dict_from_wan`).
WAN_TO_HF_KEYS: tuple[tuple[str, str], ...] = (
    (r"visual\.patch_embedding\.weight", "embeddings.patch_embedding.weight"),  # conv, bias=False (pre_norm=True)
    (r"visual\.cls_embedding", "embeddings.class_embedding"),  # [1, 1, D] -> [D]
    (r"visual\.pos_embedding", "embeddings.position_embedding.weight"),  # [1, P, D] -> [P, D]
    (r"visual\.pre_norm\.(weight|bias)", r"pre_layrnorm.\1"),
    (r"visual\.transformer\.(\d+)\.norm1\.(weight|bias)", _HF_LAYER + r".layer_norm1.\2"),
    (r"visual\.transformer\.(\d+)\.attn\.proj\.(weight|bias)", _HF_LAYER + r".self_attn.out_proj.\2"),
    (r"visual\.transformer\.(\d+)\.norm2\.(weight|bias)", _HF_LAYER + r".layer_norm2.\2"),
    (r"visual\.transformer\.(\d+)\.mlp\.0\.(weight|bias)", _HF_LAYER + r".mlp.fc1.\2"),
    (r"visual\.transformer\.(\d+)\.mlp\.2\.(weight|bias)", _HF_LAYER + r".mlp.fc2.\2"),
    (r"visual\.post_norm\.(weight|bias)", r"post_layernorm.\1"),
)
_WAN_QKV = re.compile(r"visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)")

#: Keys of Wan's XLMRobertaCLIP that the image encoder does not use (full match): the text tower, the logit scale,
#: and the visual projection head (``pool_type='token'``: a bare ``[D, embed_dim]`` parameter).
WAN_IGNORED_KEYS: tuple[str, ...] = (
    r"textual\..+",
    r"log_scale",
    r"visual\.head(\.(weight|bias))?",
)

_WAN_LAYER = r"visual.transformer.\1"

#: transformers CLIPVisionModel key (canonical, no ``vision_model.`` prefix) -> Wan key. q/k/v are fused separately.
HF_TO_WAN_KEYS: tuple[tuple[str, str], ...] = (
    (r"embeddings\.patch_embedding\.weight", "visual.patch_embedding.weight"),
    (r"embeddings\.class_embedding", "visual.cls_embedding"),
    (r"embeddings\.position_embedding\.weight", "visual.pos_embedding"),
    (r"pre_layrnorm\.(weight|bias)", r"visual.pre_norm.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", _WAN_LAYER + r".norm1.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", _WAN_LAYER + r".attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", _WAN_LAYER + r".norm2.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", _WAN_LAYER + r".mlp.0.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", _WAN_LAYER + r".mlp.2.\2"),
    (r"post_layernorm\.(weight|bias)", r"visual.post_norm.\1"),
)
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")

#: Keys of a diffusers ``image_encoder/`` that a CLIPVisionModel does not use (full match, after the prefix strip):
#: the projection of ``CLIPVisionModelWithProjection`` checkpoints, and the position ids that transformers < 4.31
#: stored as a persistent buffer (an ``arange``, rebuilt at load time).
DIFFUSERS_IGNORED_KEYS: tuple[str, ...] = (r"visual_projection\.weight", r"embeddings\.position_ids")

_WAN_TO_HF = tuple((re.compile(p), r) for p, r in WAN_TO_HF_KEYS)
_HF_TO_WAN = tuple((re.compile(p), r) for p, r in HF_TO_WAN_KEYS)
_WAN_IGNORED = tuple(re.compile(p) for p in WAN_IGNORED_KEYS)
_DIFFUSERS_IGNORED = tuple(re.compile(p) for p in DIFFUSERS_IGNORED_KEYS)

# reshapes between Wan's and transformers' embedding parameters
_CLASS_EMB = "embeddings.class_embedding"
_POS_EMB = "embeddings.position_embedding.weight"


# ----------------------------------------------------------------------------------------------------------------------
# the encoder


class WanImageEncoder:
    """A ``CLIPImageProcessor`` and a ``transformers.CLIPVisionModel`` that turn images into Wan's CLIP tokens.

    ``truncated`` says that the model's last transformer layer was dropped, so that its ``last_hidden_state`` is the
    penultimate hidden state of the full model; otherwise :meth:`encode` takes ``hidden_states[-2]``.
    """

    def __init__(self, processor, model, *, truncated: bool = False) -> None:
        self.processor = processor
        self.model = model
        self.truncated = truncated

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_tokens(self) -> int:
        """Tokens per image: patches + the class token (257 for ViT-H/14 at 224)."""
        return (self.model.config.image_size // self.model.config.patch_size) ** 2 + 1

    def to(self, device=None, dtype: torch.dtype | None = None) -> WanImageEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def drop_last_layer(self) -> WanImageEncoder:
        """Drop the last transformer layer in place (its output is never used); idempotent."""
        if not self.truncated:
            layers = self.model.encoder.layers
            if len(layers) < 1:
                raise UserError("the CLIP vision model has no transformer layer to drop")
            self.model.encoder.layers = layers[:-1]
            # keep the config in line with the module (it is not written: save_image_encoder refuses truncated ones)
            self.model.config.num_hidden_layers = len(self.model.encoder.layers)
            self.truncated = True
        return self

    def encode(self, images: Sequence, device=None) -> torch.Tensor:
        """Return ``[len(images), num_tokens, hidden]`` CLIP tokens of PIL images, in the encoder's dtype.

        Equal to diffusers' ``WanImageToVideoPipeline.encode_image(images)``. The encoder runs on the device of its
        weights; the result is moved to ``device`` when one is given.
        """
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        if not images:
            raise UserError("encode() needs at least one image, got an empty list")
        bad = [f"#{i}: {type(im).__name__}" for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if bad:
            raise UserError(f"encode() takes PIL images, got {', '.join(bad)}")

        with torch.inference_mode():
            model_device = self.device
            pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"].to(model_device)
            if self.truncated:
                hidden = self.model(pixel_values=pixel_values).last_hidden_state
            else:
                hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
            out_device = model_device if device is None else torch.device(device)
            return hidden.to(device=out_device, dtype=self.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# key mapping


def _canonical(key: str) -> str:
    return key.removeprefix(_HF_PREFIX)


def _canonical_state_dict(sd: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Strip the ``vision_model.`` prefix; a key present both with and without it is an error."""
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for key, value in sd.items():
        new = _canonical(key)
        if new in out:
            raise CheckpointError(f"{what}: keys {source_of[new]!r} and {key!r} are the same tensor")
        out[new] = value
        source_of[new] = key
    return out


def _fullmatch_any(patterns, key: str) -> bool:
    return any(p.fullmatch(key) for p in patterns)


def clip_state_dict_from_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the visual tower of a Wan ``XLMRobertaCLIP`` state dict to transformers' ``CLIPVisionModel`` names.

    ``attn.to_qkv`` is split into ``self_attn.{q,k,v}_proj``, ``cls_embedding`` ``[1, 1, D]`` becomes ``[D]`` and
    ``pos_embedding`` ``[1, P, D]`` becomes ``[P, D]``. Keys in :data:`WAN_IGNORED_KEYS` are dropped; any other key
    without a mapping raises :class:`CheckpointError` naming all of them. The result has no ``vision_model.`` prefix.
    """
    what = "Wan CLIP state dict"
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unmapped: list[str] = []
    bad_shapes: list[str] = []

    def put(new: str, value: torch.Tensor, key: str) -> None:
        if new in out:
            raise CheckpointError(f"{what}: keys {source_of[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        source_of[new] = key

    for key, value in sd.items():
        if m := _WAN_QKV.fullmatch(key):
            if value.shape[0] % 3:
                bad_shapes.append(f"{key} {tuple(value.shape)} (first dimension not a multiple of 3)")
                continue
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                put(f"encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}", part, key)
            continue
        for pattern, repl in _WAN_TO_HF:
            if pattern.fullmatch(key):
                new = pattern.sub(repl, key)
                if new == _CLASS_EMB:
                    if value.ndim != 3 or value.shape[:2] != (1, 1):
                        bad_shapes.append(f"{key} {tuple(value.shape)} (expected [1, 1, D])")
                        break
                    value = value.reshape(value.shape[-1])
                elif new == _POS_EMB:
                    if value.ndim != 3 or value.shape[0] != 1:
                        bad_shapes.append(f"{key} {tuple(value.shape)} (expected [1, P, D])")
                        break
                    value = value.reshape(value.shape[1:])
                put(new, value, key)
                break
        else:
            if not _fullmatch_any(_WAN_IGNORED, key):
                unmapped.append(key)
    problems = []
    if unmapped:
        problems.append("unexpected keys (no mapping): " + ", ".join(sorted(unmapped)))
    if bad_shapes:
        problems.append("bad shapes: " + ", ".join(sorted(bad_shapes)))
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    return out


def clip_state_dict_to_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPVisionModel`` state dict (with or without ``vision_model.``) to Wan's ``visual.*`` names.

    The inverse of :func:`clip_state_dict_from_wan`: q/k/v are fused into ``attn.to_qkv`` (q, k, v order), the class
    and position embeddings get their leading unit dimensions back. ``visual_projection.weight`` is dropped; a layer
    with only some of q/k/v, or any other unknown key, raises :class:`CheckpointError`.
    """
    what = "CLIP vision state dict"
    sd = _canonical_state_dict(sd, what)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        if m := _HF_QKV.fullmatch(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _HF_TO_WAN:
            if pattern.fullmatch(key):
                if key == _CLASS_EMB:
                    value = value.reshape(1, 1, -1)
                elif key == _POS_EMB:
                    value = value.reshape(1, *value.shape)
                out[pattern.sub(repl, key)] = value
                break
        else:
            if not _fullmatch_any(_DIFFUSERS_IGNORED, key):
                unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{what}: unexpected keys (no mapping): {', '.join(sorted(unmapped))}")
    incomplete = []
    for (layer, kind), parts in sorted(qkv.items(), key=lambda item: (int(item[0][0]), item[0][1])):
        if set(parts) != set(_QKV):
            absent = [f"encoder.layers.{layer}.self_attn.{n}.{kind}" for n in _QKV if n not in parts]
            incomplete.extend(absent)
            continue
        shapes = {tuple(parts[n].shape) for n in _QKV}
        if len(shapes) != 1:
            raise CheckpointError(f"{what}: q/k/v {kind} of layer {layer} differ in shape: {sorted(shapes)}")
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts[n] for n in _QKV], dim=0)
    if incomplete:
        raise CheckpointError(f"{what}: cannot fuse q/k/v, missing keys: {', '.join(incomplete)}")
    return out


def _hf_key_to_wan(key: str) -> str:
    """Wan name of a canonical transformers key, for error messages (q/k/v show as their fused ``to_qkv``)."""
    if m := _HF_QKV.fullmatch(key):
        return f"visual.transformer.{m.group(1)}.attn.to_qkv.{m.group(3)}"
    for pattern, repl in _HF_TO_WAN:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return key


# ----------------------------------------------------------------------------------------------------------------------
# config and processor


def infer_clip_vision_config(wan_sd: Mapping[str, torch.Tensor]):
    """Infer the ``CLIPVisionConfig`` of a Wan CLIP state dict's visual tower from its tensor shapes.

    hidden from ``visual.cls_embedding``, layers from the largest ``visual.transformer.{i}`` index, intermediate from
    ``mlp.0``, patch size and channels from the patch conv, image size from the number of position embeddings, heads
    = hidden // :data:`WAN_CLIP_HEAD_DIM`; exact GELU and layer-norm eps 1e-5 as Wan's ViT-H/14.
    """
    from transformers import CLIPVisionConfig

    what = "Wan CLIP state dict"
    needed = (
        "visual.cls_embedding",
        "visual.pos_embedding",
        "visual.patch_embedding.weight",
        "visual.transformer.0.mlp.0.weight",
    )
    missing = [k for k in needed if k not in wan_sd]
    if missing:
        raise CheckpointError(f"{what}: missing keys needed to infer the model config: {', '.join(missing)}")
    shapes = {k: tuple(wan_sd[k].shape) for k in needed}
    cls_shape, pos_shape = shapes["visual.cls_embedding"], shapes["visual.pos_embedding"]
    conv_shape, fc1_shape = shapes["visual.patch_embedding.weight"], shapes["visual.transformer.0.mlp.0.weight"]
    ok = (
        len(cls_shape) == 3
        and len(pos_shape) == 3
        and len(conv_shape) == 4
        and len(fc1_shape) == 2
        and cls_shape[:2] == (1, 1)
        and pos_shape[0] == 1
        and pos_shape[2] == cls_shape[2]
        and conv_shape[0] == cls_shape[2]
        and conv_shape[2] == conv_shape[3]
        and fc1_shape[1] == cls_shape[2]
    )
    if not ok:
        raise CheckpointError(f"{what}: inconsistent shapes: " + ", ".join(f"{k} {s}" for k, s in shapes.items()))
    hidden = cls_shape[2]
    num_patches = pos_shape[1] - 1
    grid = math.isqrt(max(num_patches, 0))
    if num_patches < 1 or grid * grid != num_patches:
        raise CheckpointError(
            f"{what}: visual.pos_embedding {pos_shape} holds {pos_shape[1]} positions, not a square grid plus the "
            "class token"
        )
    if hidden % WAN_CLIP_HEAD_DIM:
        raise CheckpointError(
            f"{what}: hidden size {hidden} (visual.cls_embedding) is not a multiple of the ViT-H/14 head size "
            f"{WAN_CLIP_HEAD_DIM}, cannot infer the number of attention heads"
        )
    indices = {int(m.group(1)) for k in wan_sd if (m := re.match(r"visual\.transformer\.(\d+)\.", k))}
    head = wan_sd.get("visual.head")
    projection_dim = head.shape[-1] if head is not None and head.ndim == 2 else _WAN_DEFAULT_PROJECTION_DIM
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=fc1_shape[0],
        num_hidden_layers=max(indices) + 1,  # gaps show up as missing keys in the strict check
        num_attention_heads=hidden // WAN_CLIP_HEAD_DIM,
        num_channels=conv_shape[1],
        image_size=grid * conv_shape[2],
        patch_size=conv_shape[2],
        projection_dim=projection_dim,
        architectures=["CLIPVisionModel"],
        **_WAN_VIT_FIXED,
    )


def openclip_image_processor(image_size: int = 224):
    """The ``CLIPImageProcessor`` of Wan2.1's diffusers release: resize the shortest edge to ``image_size`` (bicubic),
    center crop ``image_size`` x ``image_size``, rescale by 1/255, normalize with OpenCLIP's mean/std, convert to RGB.
    """
    return _processor_class()(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=_BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENCLIP_MEAN),
        image_std=list(OPENCLIP_STD),
        do_convert_rgb=True,
    )


def _processor_output_size(processor) -> tuple[int, int] | None:
    def hw(size) -> tuple[int, int] | None:
        if isinstance(size, int):
            return size, size
        if isinstance(size, Mapping) or hasattr(size, "height"):
            get = size.get if isinstance(size, Mapping) else lambda k: getattr(size, k, None)
            if get("height") is not None and get("width") is not None:
                return int(get("height")), int(get("width"))
        return None

    if getattr(processor, "do_center_crop", False):
        return hw(getattr(processor, "crop_size", None))
    return hw(getattr(processor, "size", None))


def _check_processor(processor, image_size: int, where) -> None:
    size = _processor_output_size(processor)
    if size != (image_size, image_size):
        raise CheckpointError(
            f"{where}: the image processor makes images of {size if size else 'unknown/variable'} pixels (height, "
            f"width), but the image encoder takes {image_size} x {image_size}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# building and strict loading


def _build_and_load(
    config,
    sd: Mapping[str, torch.Tensor],
    *,
    device,
    dtype: torch.dtype | None,
    what: str,
    show_key: Callable[[str], str] = lambda k: k,
):
    """Build a ``CLIPVisionModel`` on the meta device and fill it from ``sd`` (canonical names) after a strict check."""
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(config)
    actual = {_canonical(k): k for k in model.state_dict()}
    expected = {k: model.state_dict()[a] for k, a in actual.items()}

    problems = key_problems({k: v.shape for k, v in expected.items()}, sd, show_key,
                            mismatch="{key} checkpoint {got} vs model {want}")
    non_float = sorted(k for k in set(expected) & set(sd) if not sd[k].is_floating_point())
    if non_float:
        problems.append("non-float tensors: " + ", ".join(f"{show_key(k)} {sd[k].dtype}" for k in non_float))
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))

    tensors = {actual[k]: v.to(device=device, dtype=v.dtype if dtype is None else dtype) for k, v in sd.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - checked above
        raise CheckpointError(f"{what}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    # the non-persistent position ids are not in any checkpoint: rebuild them off the meta device
    emb = model.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # pragma: no cover - every tensor is checked above
        raise CheckpointError(f"{what}: tensors never loaded: {', '.join(left_on_meta)}")
    model.eval().requires_grad_(False)
    return model


def _read_config(enc_dir: Path):
    from transformers import CLIPVisionConfig

    path = enc_dir / "config.json"
    raw = read_json(path, "image encoder config")
    model_type = raw.get("model_type", "clip_vision_model")
    if model_type == "clip" and isinstance(raw.get("vision_config"), dict):  # a full CLIPConfig: take its vision part
        raw = raw["vision_config"]
    elif model_type != "clip_vision_model":
        raise CheckpointError(f"{path}: model_type is {model_type!r}, expected 'clip_vision_model'")
    try:
        return CLIPVisionConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid CLIP vision config: {e}") from e


def _processor_class():
    """transformers' PIL-backed ``CLIPImageProcessorPil`` where it exists (transformers 5: the plain class would
    look for torchvision and warn on every load when it is absent), else ``CLIPImageProcessor`` (the same PIL
    processing in transformers 4). One backend whether or not torchvision is installed: the same pixels."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _load_processor(proc_dir: Path, image_size: int):
    if not proc_dir.is_dir():
        raise CheckpointError(f"missing image processor folder: {proc_dir}")
    try:
        processor = _processor_class().from_pretrained(str(proc_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the image processor in {proc_dir}: {e}") from e
    _check_processor(processor, image_size, proc_dir)
    return processor


def load_image_encoder(
    model_dir: Path,
    layout: str,
    *,
    device="cpu",
    dtype: torch.dtype | None = torch.float32,
    keep_last_layer: bool = False,
) -> WanImageEncoder:
    """Load the CLIP image encoder of a Wan2.1 I2V/FLF2V checkpoint in ``layout`` ``"wan"`` or ``"diffusers"``.

    Weights are cast to ``dtype``; ``dtype=None`` keeps every tensor's stored dtype (used by ``lightx2v convert``).
    The last transformer layer is dropped after the strict load (its output is never used) unless
    ``keep_last_layer`` is true, which :func:`save_image_encoder` requires.
    """
    model_dir = Path(model_dir)
    if layout not in LAYOUTS:
        raise UserError(f"image encoder layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder does not exist: {model_dir}")
    if layout == "wan":
        path = model_dir / WAN_CLIP_CHECKPOINT
        check_present([(path, "Wan CLIP checkpoint")])
        wan_sd = torch_load_state_dict(path)
        config = infer_clip_vision_config(wan_sd)
        try:
            sd = clip_state_dict_from_wan(wan_sd)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        model = _build_and_load(config, sd, device=device, dtype=dtype, what=str(path), show_key=_hf_key_to_wan)
        processor = openclip_image_processor(config.image_size)
    else:
        enc_dir = model_dir / DIFFUSERS_IMAGE_ENCODER_DIR
        proc_dir = model_dir / DIFFUSERS_IMAGE_PROCESSOR_DIR
        weights, weights_what = enc_dir / "model.safetensors", "image encoder weights (or model.safetensors.index.json)"
        if not weights.is_file() and (enc_dir / "model.safetensors.index.json").is_file():
            weights, weights_what = enc_dir / "model.safetensors.index.json", "image encoder weight index"
        check_present(
            [
                (enc_dir / "config.json", "image encoder config"),
                (weights, weights_what),
                (proc_dir, "image processor folder"),
            ]
        )
        config = _read_config(enc_dir)
        raw = _canonical_state_dict(read_safetensors_dir(enc_dir, "image encoder"), str(enc_dir))
        sd = {k: v for k, v in raw.items() if not _fullmatch_any(_DIFFUSERS_IGNORED, k)}
        model = _build_and_load(config, sd, device=device, dtype=dtype, what=str(enc_dir))
        processor = _load_processor(proc_dir, config.image_size)
    enc = WanImageEncoder(processor, model)
    return enc if keep_last_layer else enc.drop_last_layer()


# ----------------------------------------------------------------------------------------------------------------------
# saving


def save_image_encoder(enc: WanImageEncoder, model_dir: Path, layout: str) -> None:
    """Write ``enc`` under ``model_dir`` in ``layout`` ``"wan"`` or ``"diffusers"``; weights keep their dtype.

    wan: ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` with the visual tower only (``visual.*``, q/k/v
    fused into ``attn.to_qkv``). The text tower ``textual.*``, ``log_scale`` and the projection ``visual.head`` are
    not written since we never had them: :func:`load_image_encoder` reads such a file, Wan's own ``CLIPModel`` (strict
    ``load_state_dict`` of the whole XLMRobertaCLIP) does not. No image processor is written (Wan's is fixed).
    diffusers: ``image_encoder/config.json`` + ``model.safetensors`` (keys with the ``vision_model.`` prefix, which
    transformers 4.x and 5.x ``CLIPVisionModel.from_pretrained`` both read) + ``image_processor/``.

    The encoder must hold all its layers: load it with ``keep_last_layer=True``.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    if layout not in LAYOUTS:
        raise UserError(f"image encoder layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if enc.truncated:
        raise UserError(
            "cannot save an image encoder whose last layer was dropped; load it with keep_last_layer=True to convert it"
        )
    sd = {_canonical(k): v.detach().to("cpu").contiguous() for k, v in enc.model.state_dict().items()}
    if layout == "wan":
        cfg = enc.model.config
        if cfg.hidden_act != "gelu" or cfg.layer_norm_eps != 1e-5 or cfg.hidden_size % 80:
            raise UserError(f"this image encoder (hidden_act={cfg.hidden_act!r}, layer_norm_eps={cfg.layer_norm_eps}, "
                            f"hidden_size={cfg.hidden_size}) cannot be written in the Wan layout, whose file fixes "
                            "exact GELU, eps 1e-5 and 80-wide heads; keep the diffusers layout")
        model_dir.mkdir(parents=True, exist_ok=True)
        wan_sd = {k: v.contiguous() for k, v in clip_state_dict_to_wan(sd).items()}
        torch.save(wan_sd, str(model_dir / WAN_CLIP_CHECKPOINT))
        return

    enc_dir = model_dir / DIFFUSERS_IMAGE_ENCODER_DIR
    enc_dir.mkdir(parents=True, exist_ok=True)
    for stale in [enc_dir / "model.safetensors", enc_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    for stale in enc_dir.glob("model-*-of-*.safetensors"):
        stale.unlink()
    config = copy.deepcopy(enc.model.config)
    config.architectures = ["CLIPVisionModel"]
    config.dtype = enc.model.dtype
    config.save_pretrained(str(enc_dir))
    save_file({_HF_PREFIX + k: v for k, v in sd.items()}, str(enc_dir / "model.safetensors"), metadata={"format": "pt"})
    enc.processor.save_pretrained(str(model_dir / DIFFUSERS_IMAGE_PROCESSOR_DIR))


# ----------------------------------------------------------------------------------------------------------------------
# a tiny random-weight encoder for the built-in tiny model and the tests


def build_tiny_clip(seed: int) -> WanImageEncoder:
    """A tiny CLIP ViT with fixed random weights: hidden 160 (2 heads of 80, so the Wan head rule holds), 3 layers,
    MLP 320, patch 14 at 224 pixels (257 tokens like ViT-H/14), exact GELU, and :func:`openclip_image_processor`.

    Weights come from ``torch.Generator().manual_seed(seed)`` (the global RNG is untouched): matrices
    ``randn / sqrt(fan_in)``, layer-norm weights ``1 + 0.1 randn``, other vectors ``0.1 randn``. The encoder holds all
    its layers (so it can be saved); call :meth:`WanImageEncoder.drop_last_layer` to run it lighter.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=160,
        intermediate_size=320,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_channels=3,
        image_size=224,
        patch_size=14,
        projection_dim=32,
        architectures=["CLIPVisionModel"],
        **_WAN_VIT_FIXED,
    )
    with torch.device("meta"):
        shapes = {
            _canonical(k): (v.shape, "norm" in k and k.endswith("weight"))
            for k, v in CLIPVisionModel(config).state_dict().items()
        }
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, is_norm_weight) in shapes.items():
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / fan_in**0.5
        elif is_norm_weight:
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    model = _build_and_load(config, sd, device="cpu", dtype=torch.float32, what="tiny CLIP")
    return WanImageEncoder(openclip_image_processor(config.image_size), model)
