"""Sizes of the Qwen-Image components as frozen dataclasses, read from the release's (diffusers') config files.

* :class:`QwenImageDiTConfig`: ``transformer/config.json`` (diffusers' ``QwenImageTransformer2DModel``).
* :class:`QwenImageVAEConfig`: ``vae/config.json`` (diffusers' ``AutoencoderKLQwenImage``).
* ``ASPECT_RATIOS``: LightX2V's ``aspect_ratio`` names and the output sizes the release recommends for them.
* ``PIPELINE_VARIANTS``: the ``_class_name`` of ``model_index.json`` -> what the checkpoint does (t2i, edit with
  one image, edit with several).

Qwen-Image-Layered (``use_additional_t_cond``, ``use_layer3d_rope``, an RGBA VAE) and guidance-distilled DiTs
(``guidance_embeds``) are rejected with a :class:`~lightx2v.errors.CheckpointError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from lightx2v.errors import CheckpointError

# LightX2V's aspect-ratio names -> (width, height) in pixels: the sizes of the Qwen-Image release (its model card and
# LightX2V's qwen_image runner); each has ~1.4-1.8 MP and is a multiple of 16.
ASPECT_RATIOS: Mapping[str, tuple[int, int]] = {
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "1:1": (1328, 1328),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}
DEFAULT_ASPECT_RATIO = "16:9"  # what LightX2V's shipped qwen_image t2i configs ask for

# model_index.json "_class_name" -> variant. "edit" takes exactly one image (Qwen-Image-Edit), "edit_plus" one or
# more (Qwen-Image-Edit-2509 / -2511).
PIPELINE_VARIANTS: Mapping[str, str] = {
    "QwenImagePipeline": "t2i",
    "QwenImageEditPipeline": "edit",
    "QwenImageEditPlusPipeline": "edit_plus",
}
VARIANTS = ("t2i", "edit", "edit_plus")

PACK = 2  # the pipelines fold 2x2 latent pixels into one token (the DiT's patch_size)
IMAGE_CHANNELS = 3


def _ignored_key(key: str) -> bool:
    return key.startswith("_")  # _class_name, _diffusers_version, _name_or_path, _use_default_values


@dataclass(frozen=True)
class QwenImageDiTConfig:
    """The MMDiT's sizes; field names are diffusers' ``QwenImageTransformer2DModel`` arguments.

    Tokens carry ``in_channels = out_channels * patch_size**2`` values (a 2x2 patch of 16-channel latents: 64).
    ``zero_cond_t`` (Qwen-Image-Edit-2511): the condition images' tokens are modulated with the embedding of
    timestep 0, the generated image's with the current timestep.
    """

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False
    eps: float = 1e-6
    rope_theta: float = 10000.0
    freq_dim: int = 256  # sinusoidal timestep features

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        problems = []
        for name in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name}={v!r} must be an integer >= 1")
        if not problems:
            if self.patch_size != PACK:
                problems.append(f"patch_size={self.patch_size}: the Qwen-Image pipelines pack 2x2 latent patches")
            if self.in_channels != self.out_channels * self.patch_size**2:
                problems.append(f"in_channels={self.in_channels} must be out_channels * patch_size**2 = "
                                f"{self.out_channels * self.patch_size ** 2}")
            if len(self.axes_dims_rope) != 3 or any(a < 2 or a % 2 for a in self.axes_dims_rope):
                problems.append(f"axes_dims_rope={list(self.axes_dims_rope)} must be three even numbers")
            elif sum(self.axes_dims_rope) != self.attention_head_dim:
                problems.append(f"axes_dims_rope={list(self.axes_dims_rope)} must add up to attention_head_dim="
                                f"{self.attention_head_dim}")
        if not isinstance(self.zero_cond_t, bool):
            problems.append(f"zero_cond_t={self.zero_cond_t!r} must be true or false")
        if problems:
            raise CheckpointError("invalid Qwen-Image transformer config: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    # keys that must hold one value: the features they switch on are not implemented
    _UNSUPPORTED: ClassVar[Any] = (("guidance_embeds", False, "guidance-distilled DiTs"),
                         ("use_additional_t_cond", False, "Qwen-Image-Layered"),
                         ("use_layer3d_rope", False, "Qwen-Image-Layered"))

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> QwenImageDiTConfig:
        """Read ``transformer/config.json``; CheckpointError naming every key we do not understand or support."""
        names = {f.name for f in fields(cls)} - {"eps", "rope_theta", "freq_dim"}
        unsupported = {k: (want, why) for k, want, why in cls._UNSUPPORTED}
        kwargs, bad = {}, []
        for key, value in d.items():
            if _ignored_key(key):
                continue
            if key in unsupported:
                want, why = unsupported[key]
                if value not in (want, None):
                    bad.append(f"{key}={value!r} ({why}: not supported)")
            elif key in names:
                kwargs[key] = value
            else:
                bad.append(f"{key}={value!r} (unknown key)")
        if kwargs.get("out_channels") is None:  # diffusers: None means in_channels (never in the releases)
            kwargs.pop("out_channels", None)
        if bad:
            raise CheckpointError("unsupported Qwen-Image transformer config: " + ", ".join(bad))
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise CheckpointError(f"invalid Qwen-Image transformer config {dict(kwargs)}: {e}") from e

    def to_diffusers_config(self) -> dict[str, Any]:
        return {"_class_name": "QwenImageTransformer2DModel", "patch_size": self.patch_size,
                "in_channels": self.in_channels, "out_channels": self.out_channels, "num_layers": self.num_layers,
                "attention_head_dim": self.attention_head_dim, "num_attention_heads": self.num_attention_heads,
                "joint_attention_dim": self.joint_attention_dim, "guidance_embeds": False,
                "axes_dims_rope": list(self.axes_dims_rope), "zero_cond_t": self.zero_cond_t,
                "use_additional_t_cond": False, "use_layer3d_rope": False}


# The Qwen-Image VAE's latent statistics (vae/config.json of the release; equal to Wan2.1's).
QWEN_IMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWEN_IMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class QwenImageVAEConfig:
    """diffusers' ``AutoencoderKLQwenImage`` arguments (the release's ``vae/config.json``).

    The architecture is the Wan2.1 VAE's (see :mod:`lightx2v.models.qwen_image.vae`); :meth:`to_wan` gives the
    equivalent :class:`~lightx2v.models.wan.vae.WanVAEConfig`, which validates the sizes.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = QWEN_IMAGE_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_IMAGE_LATENTS_STD
    input_channels: int = IMAGE_CHANNELS

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            set_(self, name, tuple(getattr(self, name)))
        if self.input_channels != IMAGE_CHANNELS:
            raise CheckpointError(f"Qwen-Image VAE input_channels={self.input_channels!r}: only RGB (3) is supported "
                                  "(the RGBA VAE of Qwen-Image-Layered is not)")
        try:
            self.to_wan()
        except Exception as e:  # UserError from WanVAEConfig's checks
            raise CheckpointError(f"invalid Qwen-Image VAE config: {e}") from None

    def to_wan(self):
        from lightx2v.models.wan.vae import WanVAEConfig

        return WanVAEConfig(base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=self.dim_mult,
                            num_res_blocks=self.num_res_blocks, attn_scales=self.attn_scales,
                            temperal_downsample=self.temperal_downsample, latents_mean=self.latents_mean,
                            latents_std=self.latents_std)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W (8)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> QwenImageVAEConfig:
        names = {f.name for f in fields(cls)}
        kwargs, bad = {}, []
        for key, value in d.items():
            if _ignored_key(key) or key == "dropout":  # dropout: training only
                continue
            if key in names:
                kwargs[key] = value
            else:
                bad.append(f"{key}={value!r} (unknown key)")
        if bad:
            raise CheckpointError("unsupported Qwen-Image VAE config: " + ", ".join(bad))
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise CheckpointError(f"invalid Qwen-Image VAE config {dict(kwargs)}: {e}") from e

    def to_diffusers_config(self) -> dict[str, Any]:
        return {"_class_name": "AutoencoderKLQwenImage", "base_dim": self.base_dim, "z_dim": self.z_dim,
                "dim_mult": list(self.dim_mult), "num_res_blocks": self.num_res_blocks,
                "attn_scales": list(self.attn_scales), "temperal_downsample": list(self.temperal_downsample),
                "dropout": 0.0, "input_channels": self.input_channels, "latents_mean": list(self.latents_mean),
                "latents_std": list(self.latents_std)}


@dataclass(frozen=True)
class QwenImagePreset:
    dit: QwenImageDiTConfig
    vae: QwenImageVAEConfig = field(default_factory=QwenImageVAEConfig)


# The releases' sizes (bench/ builds random-weight models of them). The VAE is the same in every release;
# Qwen-Image-Edit-2511 turns on zero_cond_t.
PRESETS: Mapping[str, QwenImagePreset] = {
    "qwen-image": QwenImagePreset(QwenImageDiTConfig()),
    "qwen-image-edit-2511": QwenImagePreset(QwenImageDiTConfig(zero_cond_t=True)),
}
