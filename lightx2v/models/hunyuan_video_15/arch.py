"""Sizes of HunyuanVideo-1.5's DiT and VAE as frozen dataclasses, and the output-size buckets.

Two public descriptions of the same networks:

* diffusers (``hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-*``): ``transformer/config.json`` with the
  arguments of ``HunyuanVideo15Transformer3DModel`` and ``vae/config.json`` with those of
  ``AutoencoderKLHunyuanVideo15``;
* the Tencent release (``tencent/HunyuanVideo-1.5``, the layout LightX2V reads): ``transformer/<name>/config.json``
  with ``hidden_size, heads_num, mm_double_blocks_depth, rope_dim_list, ideal_resolution, ...`` and ``vae/config.json``
  with ``ffactor_spatial, ffactor_temporal, ...``.

Both map onto :class:`HunyuanVideo15DiTConfig` / :class:`HunyuanVideo15VAEConfig`.

The output size of a request without an explicit height/width comes from a bucket list (HunyuanVideo-1.5's
``generate_crop_size_list``): every (h, w) in multiples of 16 with about ``(base / 16) ** 2`` patches, the one whose
aspect ratio is closest to the wanted one chosen as diffusers' ``get_closest_ratio`` does. The base size is the DiT's
``target_size`` (640 for the 480p models, 960 for 720p).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import numpy as np

from lightx2v.errors import CheckpointError, UserError

# The release's resolution names and their bucket base sizes (LightX2V's ``target_size_config``; diffusers writes the
# base into the DiT config as ``target_size``).
TARGET_SIZES = {"360p": 480, "480p": 640, "720p": 960, "1080p": 1440}
GLYPH_PROJ_DIM = 2048  # hidden width of the ByT5 projection (fixed in the reference, not in its config)


@dataclass(frozen=True)
class HunyuanVideo15DiTConfig:
    """The DiT's sizes (diffusers' argument names). ``in_channels`` is the patch embedding's input width: noise
    latents + the I2V condition latents + a one-channel frame mask (2 * 32 + 1 = 65 for the released models)."""

    in_channels: int = 65
    out_channels: int = 32
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 54
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 1
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    text_embed_2_dim: int = 1472  # ByT5-small d_model
    image_embed_dim: int = 1152  # SigLIP so400m hidden size
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    target_size: int = 640
    task_type: str = "i2v"
    use_meanflow: bool = False

    def __post_init__(self):
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        if self.qk_norm != "rms_norm":
            raise CheckpointError(f"DiT qk_norm {self.qk_norm!r} is not supported (only 'rms_norm')")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise CheckpointError(f"DiT rope_axes_dim {self.rope_axes_dim} must be 3 sizes summing to "
                                  f"attention_head_dim {self.attention_head_dim}")
        if any(d % 2 for d in self.rope_axes_dim):
            raise CheckpointError(f"DiT rope_axes_dim {self.rope_axes_dim} must be even")
        if self.in_channels != 2 * self.out_channels + 1:
            raise CheckpointError(f"DiT in_channels {self.in_channels} must be 2 * out_channels + 1 "
                                  f"({2 * self.out_channels + 1}): noise, condition latents and the frame mask")
        if self.task_type not in ("t2v", "i2v"):
            raise CheckpointError(f"DiT task_type {self.task_type!r} is not one of 't2v', 'i2v'")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    # -- diffusers -----------------------------------------------------------------------------------------------
    @classmethod
    def from_diffusers_config(cls, d: dict) -> "HunyuanVideo15DiTConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise CheckpointError(f"unsupported keys in the diffusers transformer config.json: {unknown}")
        try:
            return cls(**{k: d[k] for k in names if k in d})
        except TypeError as e:
            raise CheckpointError(f"bad diffusers transformer config: {e}") from e

    def to_diffusers_config(self) -> dict:
        d = asdict(self)
        d["rope_axes_dim"] = list(self.rope_axes_dim)
        return {"_class_name": "HunyuanVideo15Transformer3DModel", **d}

    # -- the Tencent release -------------------------------------------------------------------------------------
    # keys whose value must be the one below (features of the DiT class that the released models do not use)
    _RELEASE_FIXED = {"concat_condition": True, "glyph_byT5_v2": True, "guidance_embed": False,
                      "mm_single_blocks_depth": 0, "mlp_act_type": "gelu_tanh", "qk_norm": True,
                      "qk_norm_type": "rms", "qkv_bias": True, "text_projection": "single_refiner",
                      "use_attention_mask": True, "use_cond_type_embedding": True, "vision_projection": "linear",
                      "is_reshape_temporal_channels": False, "text_states_dim_2": None, "text_pool_type": None}
    _RELEASE_IGNORED = ("_class_name", "_diffusers_version", "attn_mode", "attn_param")
    # "target_size" is not a release key: lightx2v writes it (instead of ideal_resolution) for sizes the release has
    # no name for, i.e. its built-in tiny model
    _RELEASE_SIZES = ("hidden_size", "heads_num", "mm_double_blocks_depth", "in_channels", "out_channels",
                      "patch_size", "rope_dim_list", "rope_theta", "mlp_width_ratio", "text_states_dim",
                      "vision_states_dim", "ideal_resolution", "ideal_task", "use_meanflow", "target_size")

    @classmethod
    def from_release_config(cls, d: dict, shapes: dict | None = None) -> "HunyuanVideo15DiTConfig":
        """The release's ``transformer/<name>/config.json`` (keys as in ``HunyuanVideo_1_5_DiffusionTransformer``).
        The token refiner depth and the ByT5 width are not in it: they are read from ``shapes`` (tensor name ->
        shape of the checkpoint, e.g. from the safetensors headers), else the release's values (2, 1472)."""
        unknown = sorted(set(d) - set(cls._RELEASE_FIXED) - set(cls._RELEASE_IGNORED) - set(cls._RELEASE_SIZES))
        if unknown:
            raise CheckpointError(f"unknown keys in the HunyuanVideo-1.5 transformer config.json: {unknown}")
        for k, want in cls._RELEASE_FIXED.items():
            if k in d and d[k] != want:
                raise CheckpointError(f"HunyuanVideo-1.5 transformer config.json: {k}={d[k]!r} is not supported "
                                      f"(only {want!r})")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["heads_num"])
            latent = int(d["out_channels"])
            if int(d["in_channels"]) != latent:
                raise CheckpointError(f"transformer config.json: in_channels {d['in_channels']} differs from "
                                      f"out_channels {latent} (the release concatenates the condition itself)")
            patch = [int(p) for p in d.get("patch_size", [1, 1, 1])]
            if len(patch) != 3 or patch[1] != patch[2]:
                raise CheckpointError(f"transformer config.json: patch_size {patch} must be [t, p, p]")
            resolution = d.get("ideal_resolution", "480p")
            if resolution not in TARGET_SIZES:
                raise CheckpointError(f"transformer config.json: ideal_resolution {resolution!r} is not one of "
                                      f"{', '.join(TARGET_SIZES)}")
            target_size = int(d.get("target_size", TARGET_SIZES[resolution]))
            shapes = shapes or {}
            refiner = {int(m.group(1)) for k in shapes
                       if (m := re.match(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.", k))}
            byt5 = shapes.get("byt5_in.layernorm.weight")
            return cls(in_channels=2 * latent + 1, out_channels=latent, num_attention_heads=heads,
                       attention_head_dim=hidden // heads, num_layers=int(d["mm_double_blocks_depth"]),
                       num_refiner_layers=max(refiner) + 1 if refiner else 2,
                       mlp_ratio=float(d.get("mlp_width_ratio", 4.0)), patch_size=patch[1],
                       patch_size_t=patch[0], text_embed_dim=int(d.get("text_states_dim", 3584)),
                       text_embed_2_dim=int(byt5[0]) if byt5 else 1472,
                       image_embed_dim=int(d.get("vision_states_dim", 1152)),
                       rope_theta=float(d.get("rope_theta", 256)),
                       rope_axes_dim=tuple(d.get("rope_dim_list", (16, 56, 56))),
                       target_size=target_size, task_type=d.get("ideal_task", "t2v"),
                       use_meanflow=bool(d.get("use_meanflow", False)))
        except KeyError as e:
            raise CheckpointError(f"HunyuanVideo-1.5 transformer config.json lacks the key {e.args[0]!r}") from None

    def to_release_config(self) -> dict:
        resolution = {v: k for k, v in TARGET_SIZES.items()}.get(self.target_size)
        size = {"ideal_resolution": resolution} if resolution else {"target_size": self.target_size}
        return {"_class_name": "HunyuanVideo_1_5_DiffusionTransformer", **self._RELEASE_FIXED,
                "hidden_size": self.inner_dim, "heads_num": self.num_attention_heads,
                "mm_double_blocks_depth": self.num_layers, "in_channels": self.out_channels,
                "out_channels": self.out_channels, "patch_size": [self.patch_size_t, self.patch_size, self.patch_size],
                "rope_dim_list": list(self.rope_axes_dim), "rope_theta": self.rope_theta,
                "mlp_width_ratio": self.mlp_ratio, "text_states_dim": self.text_embed_dim,
                "vision_states_dim": self.image_embed_dim, **size, "ideal_task": self.task_type,
                "use_meanflow": self.use_meanflow}


@dataclass(frozen=True)
class HunyuanVideo15VAEConfig:
    """``AutoencoderKLHunyuanVideo15``'s sizes: 16x spatial and 4x temporal compression to 32 channels."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)
    layers_per_block: int = 2
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 4
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True
    scaling_factor: float = 1.03682

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        s, t = self.spatial_compression_ratio, self.temporal_compression_ratio
        levels = len(self.block_out_channels)
        if s < 1 or s & (s - 1) or t < 1 or t & (t - 1) or t > s or int(np.log2(s)) > levels - 1:
            raise CheckpointError(f"VAE compression {s}x spatial / {t}x temporal does not fit "
                                  f"{levels} levels (powers of two, temporal <= spatial, one level per 2x)")
        if self.block_out_channels[-1] % (2 * self.latent_channels):
            raise CheckpointError(f"VAE block_out_channels[-1] {self.block_out_channels[-1]} must be a multiple of "
                                  f"2 * latent_channels ({2 * self.latent_channels})")
        if not (self.downsample_match_channel and self.upsample_match_channel):
            raise CheckpointError("only VAEs with downsample_match_channel and upsample_match_channel are supported")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "HunyuanVideo15VAEConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise CheckpointError(f"unsupported keys in the diffusers vae config.json: {unknown}")
        return cls(**{k: d[k] for k in names if k in d})

    def to_diffusers_config(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return {"_class_name": "AutoencoderKLHunyuanVideo15", **d}

    # the release's vae/config.json (``AutoencoderKLConv3D`` in HunyuanVideo-1.5 and LightX2V)
    _RELEASE_NAMES = {"in_channels": "in_channels", "out_channels": "out_channels",
                      "latent_channels": "latent_channels", "block_out_channels": "block_out_channels",
                      "layers_per_block": "layers_per_block", "ffactor_spatial": "spatial_compression_ratio",
                      "ffactor_temporal": "temporal_compression_ratio", "scaling_factor": "scaling_factor",
                      "downsample_match_channel": "downsample_match_channel",
                      "upsample_match_channel": "upsample_match_channel"}
    # tile sizes of the release's own tiling and duplicates of the factors: not used (we tile as diffusers does)
    _RELEASE_IGNORED = ("_class_name", "_diffusers_version", "sample_size", "sample_tsize", "spatial_compression_ratio",
                        "time_compression_ratio", "shift_factor")

    @classmethod
    def from_release_config(cls, d: dict) -> "HunyuanVideo15VAEConfig":
        unknown = sorted(set(d) - set(cls._RELEASE_NAMES) - set(cls._RELEASE_IGNORED))
        if unknown:
            raise CheckpointError(f"unknown keys in the HunyuanVideo-1.5 vae config.json: {unknown}")
        if d.get("shift_factor") not in (None, 0, 0.0):
            raise CheckpointError(f"vae config.json: shift_factor {d['shift_factor']!r} is not supported")
        return cls(**{ours: d[theirs] for theirs, ours in cls._RELEASE_NAMES.items() if theirs in d})

    def to_release_config(self) -> dict:
        d = asdict(self)
        out = {theirs: d[ours] for theirs, ours in self._RELEASE_NAMES.items()}
        out["block_out_channels"] = list(self.block_out_channels)
        return {"_class_name": "AutoencoderKLConv3D", **out}


# --- transformer model names (LightX2V's ``transformer_model_name``) ------------------------------------------------

_MODEL_NAME = re.compile(r"^(360p|480p|720p|1080p)_(t2v|i2v)(?:_(distilled|step_distilled|cfg_distilled))?$")


def parse_transformer_model_name(name: str) -> tuple[str, str, str | None]:
    """``"720p_i2v_distilled"`` -> ``("720p", "i2v", "distilled")``; UserError for anything else."""
    m = _MODEL_NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise UserError(f"transformer_model_name {name!r} is not of the form <480p|720p>_<t2v|i2v>[_distilled] "
                        "(e.g. '480p_t2v', '720p_i2v_distilled')")
    return m.group(1), m.group(2), m.group(3)


# --- output size buckets --------------------------------------------------------------------------------------------


def crop_size_buckets(base_size: int, patch: int = 16, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """All (h, w) in multiples of ``patch`` with the largest ``w`` per ``h`` such that ``h/16 * w/16`` stays within
    ``round((base/patch)**2)`` patches and neither side is more than ``max_ratio`` times the other (the release's
    ``generate_crop_size_list``, whose pairs diffusers reads as (height, width))."""
    budget = round((base_size / patch) ** 2)
    out = []
    a, b = budget, 1
    while a > 0:
        if max(a, b) / min(a, b) <= max_ratio:
            out.append((a * patch, b * patch))
        if (b + 1) * a <= budget:
            b += 1
        else:
            a -= 1
    return out


def closest_bucket(height: float, width: float, base_size: int, patch: int = 16) -> tuple[int, int]:
    """(height, width) of the bucket whose aspect ratio is closest to ``height / width`` among those not flatter
    (portrait or square requests: ratio <= the request's) or not taller (landscape: ratio >= it), as diffusers'
    ``HunyuanVideo15ImageProcessor.calculate_default_height_width`` picks it.

    LightX2V's runner excludes an exact match for landscape requests (``> 0``), so at 720p a 16:9 request gives
    720x1264 there and 720x1280 here (and in diffusers); every other common ratio agrees."""
    buckets = crop_size_buckets(base_size, patch)
    ratios = np.array([round(float(h) / float(w), 5) for h, w in buckets])
    want = float(height) / float(width)
    diff = ratios - want
    if want >= 1:
        candidates = [(i, x) for i, x in enumerate(diff) if x <= 0]
    else:
        candidates = [(i, x) for i, x in enumerate(diff) if x >= 0]
    if not candidates:
        raise UserError(f"aspect ratio {width}:{height} is more extreme than 1:4 or 4:1")
    best = min(candidates, key=lambda p: abs(p[1]))[0]
    return buckets[best]


def parse_aspect_ratio(value: str) -> tuple[float, float]:
    """LightX2V's ``aspect_ratio`` ``"W:H"`` (e.g. ``"16:9"``) -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", value) if isinstance(value, str) else None
    if m is None or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise UserError(f"aspect_ratio {value!r} must be 'W:H' with positive numbers, e.g. '16:9', '9:16', '1:1'")
    w, h = float(m.group(1)), float(m.group(2))
    if max(w / h, h / w) > 4.0:
        raise UserError(f"aspect_ratio {value!r} is more extreme than 1:4 or 4:1")
    return w, h
