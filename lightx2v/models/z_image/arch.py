"""Sizes of Z-Image's components, as frozen dataclasses read from the release's (diffusers) config files.

A Z-Image checkpoint (e.g. ``Tongyi-MAI/Z-Image-Turbo``) is a diffusers folder:

* ``transformer/config.json``  -> :class:`ZImageDiTConfig` (diffusers' ``ZImageTransformer2DModel`` keys);
* ``vae/config.json``          -> :class:`ZImageVAEConfig` (diffusers' ``AutoencoderKL`` keys, the FLUX VAE);
* ``scheduler/scheduler_config.json`` -> :class:`ZImageSchedulerConfig` (``FlowMatchEulerDiscreteScheduler``);
* ``text_encoder/config.json`` is transformers' ``Qwen3Config`` (read in ``text_encoder.py``).

Each ``from_diffusers_config`` accepts exactly the keys diffusers writes for that class and rejects options this
implementation does not reproduce (one :class:`~lightx2v.errors.CheckpointError` naming them), so a checkpoint that
would run differently here never loads silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from lightx2v.errors import CheckpointError

# Fixed by the architecture (diffusers' transformer_z_image.py), not by the config: the width of the timestep
# embedding that drives adaLN (``min(dim, 256)``), the hidden width of the timestep MLP and its sinusoid width.
ADALN_EMBED_DIM = 256
TIMESTEP_MLP_DIM = 1024
TIMESTEP_FREQ_DIM = 256
# Image and caption token runs are padded to a multiple of this many tokens (with learned pad tokens).
SEQ_MULTIPLE = 32

_DIFFUSERS_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _check_keys(d: dict, known: tuple[str, ...], what: str, class_name: str) -> None:
    if not isinstance(d, dict):
        raise CheckpointError(f"{what}: expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(known) - set(_DIFFUSERS_META))
    if unknown:
        raise CheckpointError(f"{what}: unknown keys {unknown} (known: {', '.join(known)})")
    if d.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"{what}: _class_name is {d['_class_name']!r}, expected {class_name!r}")


@dataclass(frozen=True)
class ZImageDiTConfig:
    """diffusers' ``ZImageTransformer2DModel`` config (the same key names)."""

    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    # Read for compatibility; like diffusers' model, keys and values have n_heads heads (no grouped-query attention).
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)

    def __post_init__(self):
        for name in ("in_channels", "dim", "n_layers", "n_heads", "cap_feat_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CheckpointError(f"Z-Image DiT config: {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.n_refiner_layers, bool) or not isinstance(self.n_refiner_layers, int) \
                or self.n_refiner_layers < 0:
            raise CheckpointError(f"Z-Image DiT config: n_refiner_layers must be an integer >= 0, "
                                  f"got {self.n_refiner_layers!r}")
        if self.dim % self.n_heads:
            raise CheckpointError(f"Z-Image DiT config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise CheckpointError(f"Z-Image DiT config: axes_dims {list(self.axes_dims)} and axes_lens "
                                  f"{list(self.axes_lens)} must have 3 entries (caption/frame, height, width)")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 or d < 2 for d in self.axes_dims):
            raise CheckpointError(f"Z-Image DiT config: axes_dims {list(self.axes_dims)} must be even and sum to "
                                  f"the head dim {self.head_dim}")
        if not self.all_patch_size or len(self.all_patch_size) != len(self.all_f_patch_size):
            raise CheckpointError(f"Z-Image DiT config: all_patch_size {list(self.all_patch_size)} and "
                                  f"all_f_patch_size {list(self.all_f_patch_size)} must be non-empty, of one length")
        if self.f_patch_size != 1:
            raise CheckpointError(f"Z-Image DiT config: the first f_patch_size is {self.f_patch_size}; images "
                                  "(one frame) need 1")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0 and self.rope_theta > 0 and self.t_scale > 0):
            raise CheckpointError("Z-Image DiT config: norm_eps, rope_theta and t_scale must be > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: diffusers' ``int(dim / 3 * 8)`` (10240 for dim 3840)."""
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_size(self) -> int:
        """The spatial patch the model runs with (diffusers' default: the first of ``all_patch_size``)."""
        return self.all_patch_size[0]

    @property
    def f_patch_size(self) -> int:
        return self.all_f_patch_size[0]

    @property
    def patch_key(self) -> str:
        """Key of the active patch size in ``all_x_embedder`` / ``all_final_layer`` (diffusers: ``"2-1"``)."""
        return f"{self.patch_size}-{self.f_patch_size}"

    _KEYS = ("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "norm_eps", "qk_norm",
             "cap_feat_dim", "rope_theta", "t_scale", "axes_dims", "axes_lens", "all_patch_size", "all_f_patch_size",
             "siglip_feat_dim")

    @classmethod
    def from_diffusers_config(cls, d: dict, what: str = "transformer/config.json") -> ZImageDiTConfig:
        _check_keys(d, cls._KEYS, what, "ZImageTransformer2DModel")
        if d.get("siglip_feat_dim") is not None:
            raise CheckpointError(f"{what}: siglip_feat_dim={d['siglip_feat_dim']} is Z-Image-Omni's SigLIP "
                                  "conditioning, which this version does not implement (text-to-image only)")
        kw = {k: d[k] for k in cls._KEYS if k in d and k != "siglip_feat_dim"}
        for k in ("axes_dims", "axes_lens", "all_patch_size", "all_f_patch_size"):
            if k in kw:
                if not isinstance(kw[k], (list, tuple)):
                    raise CheckpointError(f"{what}: {k} must be a list, got {kw[k]!r}")
                kw[k] = tuple(kw[k])
        try:
            return cls(**kw)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None

    def to_diffusers_config(self) -> dict:
        d = asdict(self)
        for k in ("axes_dims", "axes_lens", "all_patch_size", "all_f_patch_size"):
            d[k] = list(d[k])
        return {"_class_name": "ZImageTransformer2DModel", **d}


@dataclass(frozen=True)
class ZImageVAEConfig:
    """diffusers' ``AutoencoderKL`` config as Z-Image ships it (the 16-channel FLUX autoencoder)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise CheckpointError(f"Z-Image VAE config: block_out_channels {list(self.block_out_channels)} must be "
                                  f"non-empty multiples of norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise CheckpointError("Z-Image VAE config: layers_per_block and latent_channels must be >= 1")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0 and math.isfinite(self.shift_factor)):
            raise CheckpointError(f"Z-Image VAE config: scaling_factor {self.scaling_factor} must be > 0 and "
                                  f"shift_factor {self.shift_factor} finite")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for four blocks)."""
        return 2 ** (len(self.block_out_channels) - 1)

    _KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
             "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
             "mid_block_add_attention")

    @classmethod
    def from_diffusers_config(cls, d: dict, what: str = "vae/config.json") -> ZImageVAEConfig:
        _check_keys(d, cls._KEYS, what, "AutoencoderKL")
        # diffusers' AutoencoderKL defaults where the file leaves a key out
        n = len(d.get("block_out_channels", (64,)))
        down = d.get("down_block_types", ["DownEncoderBlock2D"])
        up = d.get("up_block_types", ["UpDecoderBlock2D"])
        problems = []
        if list(down) != ["DownEncoderBlock2D"] * n:
            problems.append(f"down_block_types {down} (supported: {n} x DownEncoderBlock2D)")
        if list(up) != ["UpDecoderBlock2D"] * n:
            problems.append(f"up_block_types {up} (supported: {n} x UpDecoderBlock2D)")
        if d.get("act_fn", "silu") != "silu":
            problems.append(f"act_fn {d['act_fn']!r} (supported: 'silu')")
        if d.get("latents_mean") is not None or d.get("latents_std") is not None:
            problems.append("latents_mean / latents_std (Z-Image normalises with scaling_factor and shift_factor)")
        if d.get("shift_factor") is None:
            problems.append("shift_factor is missing or null (ZImagePipeline needs it)")
        if problems:
            raise CheckpointError(f"{what}: unsupported VAE settings: " + "; ".join(problems))
        kw = {k: d[k] for k in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                                "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv",
                                "use_post_quant_conv", "mid_block_add_attention") if k in d}
        # AutoencoderKL's own defaults differ from Z-Image's for these two
        kw.setdefault("use_quant_conv", True)
        kw.setdefault("use_post_quant_conv", True)
        kw.setdefault("scaling_factor", 0.18215)
        kw["block_out_channels"] = tuple(d.get("block_out_channels", (64,)))
        kw.setdefault("layers_per_block", 1)
        kw.setdefault("latent_channels", 4)
        try:
            return cls(**kw)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None

    def to_diffusers_config(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
            "sample_size": 1024, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
            "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv, "mid_block_add_attention": self.mid_block_add_attention,
        }


@dataclass(frozen=True)
class ZImageSchedulerConfig:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` config, the options Z-Image's pipeline can meet."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise CheckpointError(f"scheduler config: time_shift_type {self.time_shift_type!r} is not "
                                  "'exponential' or 'linear'")
        if not (self.shift > 0 and self.num_train_timesteps >= 1):
            raise CheckpointError("scheduler config: shift must be > 0 and num_train_timesteps >= 1")
        if self.use_dynamic_shifting and self.max_image_seq_len == self.base_image_seq_len:
            raise CheckpointError("scheduler config: max_image_seq_len equals base_image_seq_len")

    _KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
             "max_image_seq_len", "time_shift_type", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
             "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
    # options whose non-default value changes the sampler in a way this implementation does not reproduce
    _OFF = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
            "stochastic_sampling")

    @classmethod
    def from_diffusers_config(cls, d: dict, what: str = "scheduler/scheduler_config.json") -> ZImageSchedulerConfig:
        _check_keys(d, cls._KEYS, what, "FlowMatchEulerDiscreteScheduler")
        on = [f"{k}={d[k]!r}" for k in cls._OFF if d.get(k)]  # every "off" value is falsy, as diffusers tests them
        if on:
            raise CheckpointError(f"{what}: unsupported scheduler options: {', '.join(on)}")
        kw = {k: d[k] for k in ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                                "base_image_seq_len", "max_image_seq_len", "time_shift_type") if k in d}
        kw.setdefault("shift", 1.0)  # FlowMatchEulerDiscreteScheduler's default
        # diffusers reads missing (or null) base/max values with these fallbacks in calculate_shift's call
        for k, v in (("base_shift", 0.5), ("max_shift", 1.15)):
            if kw.get(k) is None:
                kw[k] = v
        try:
            return cls(**kw)
        except (CheckpointError, TypeError) as e:
            raise CheckpointError(f"{what}: {e}") from None

    def to_diffusers_config(self) -> dict:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **asdict(self)}


# The release's sizes (Tongyi-MAI/Z-Image-Turbo), for the benchmark; tests and the tiny model build their own.
Z_IMAGE_TURBO_DIT = ZImageDiTConfig()
Z_IMAGE_TURBO_VAE = ZImageVAEConfig()
Z_IMAGE_TURBO_SCHEDULER = ZImageSchedulerConfig(shift=3.0)
# transformers Qwen3Config values of the release's text encoder (Qwen3-4B)
Z_IMAGE_TURBO_TEXT_ENCODER = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                                  rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True)


def dit_preset(**overrides) -> ZImageDiTConfig:
    return replace(Z_IMAGE_TURBO_DIT, **overrides)
