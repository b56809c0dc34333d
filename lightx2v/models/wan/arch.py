"""Sizes of the Wan2.1 DiT, as frozen dataclasses, and the published presets.

The original Wan release describes a DiT in ``config.json`` with keys ``dim, ffn_dim, freq_dim, in_dim, out_dim,
num_heads, num_layers, text_len, eps, model_type``; diffusers' ``transformer/config.json`` uses
``num_attention_heads * attention_head_dim, ffn_dim, in_channels, ...``. Both map onto :class:`WanDiTConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from lightx2v.errors import CheckpointError

IMAGE_EMBED_DIM = 1280  # CLIP ViT-H/14 penultimate-layer width, used by the I2V image projection
CLIP_TOKENS = 257  # CLIP ViT-H/14 tokens per image at 224 px (256 patches + class token): the release's default


@dataclass(frozen=True)
class WanDiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_type: str = "t2v"  # "t2v" | "i2v" | "flf2v" | "ti2v" (Wan2.2 5B)
    image_dim: int = IMAGE_EMBED_DIM
    # CLIP image tokens through img_emb and the cross-attention's k_img/v_img: Wan2.1 I2V/FLF2V. Wan2.2's I2V DiTs
    # (same model_type "i2v") have none; None: decided by model_type (the loader corrects it from the weights).
    clip_input: bool | None = None
    # FLF2V: rows of the image position embedding img_emb.emb_pos, i.e. CLIP tokens of the first and the last
    # image together (diffusers' pos_embed_seq_len). None: 2 x 257 (ViT-H/14 at 224 px) for flf2v; the loader
    # reads it from the checkpoint (diffusers' config, or the Wan layout's stored emb_pos shape).
    image_pos_len: int | None = None

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise CheckpointError(f"DiT dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.model_type not in ("t2v", "i2v", "flf2v", "ti2v"):
            raise CheckpointError(f"DiT model_type {self.model_type!r} is not one of t2v, i2v, flf2v, ti2v")
        if self.clip_input is None:
            object.__setattr__(self, "clip_input", self.model_type in ("i2v", "flf2v"))
        if self.head_dim % 2 or self.head_dim < 6:
            raise CheckpointError(f"DiT head_dim {self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.model_type == "flf2v":
            if self.image_pos_len is None:
                object.__setattr__(self, "image_pos_len", 2 * CLIP_TOKENS)
            n = self.image_pos_len
            if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
                raise CheckpointError(f"FLF2V image position embedding length {n!r} must be an even integer >= 2 "
                                      "(CLIP tokens of the first and the last image)")
        elif self.image_pos_len is not None:
            raise CheckpointError(f"image position embedding length {self.image_pos_len} is only for FLF2V DiTs, "
                                  f"not model_type {self.model_type!r}")

    @property
    def clip_tokens_per_image(self) -> int | None:
        """FLF2V: CLIP tokens each of the two images contributes (image_pos_len / 2); None for other DiTs."""
        return None if self.image_pos_len is None else self.image_pos_len // 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """Takes CLIP image tokens (Wan2.1 I2V / FLF2V)."""
        return bool(self.clip_input)

    @property
    def concat_condition(self) -> bool:
        """Takes the I2V conditioning (frame mask + VAE latents) concatenated to the noise latents on channels."""
        return self.in_dim > self.out_dim

    # -- original Wan layout -------------------------------------------------------------------------------
    _WAN_KEYS = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "text_len", "eps",
                 "model_type")
    # Not in the Wan release's config.json (its values are fixed there); we read and write them for other sizes.
    _WAN_EXTRA = ("patch_size", "text_dim", "image_dim", "clip_input", "pos_embed_seq_len")
    _WAN_IGNORED = ("_class_name", "_diffusers_version", "window_size", "qk_norm", "cross_attn_norm") + _WAN_EXTRA

    @classmethod
    def from_wan_config(cls, d: dict) -> "WanDiTConfig":
        unknown = sorted(set(d) - set(cls._WAN_KEYS) - set(cls._WAN_IGNORED))
        if unknown:
            raise CheckpointError(f"unknown keys in the Wan DiT config.json: {unknown}")
        if d.get("qk_norm", True) is not True or d.get("cross_attn_norm", True) is not True:
            raise CheckpointError("only Wan DiTs with qk_norm=true and cross_attn_norm=true are supported")
        if tuple(d.get("window_size", (-1, -1))) != (-1, -1):
            raise CheckpointError(f"windowed attention (window_size={d['window_size']}) is not supported")
        kw = {k: d[k] for k in cls._WAN_KEYS if k in d}
        kw["patch_size"] = tuple(d.get("patch_size", (1, 2, 2)))
        kw["text_dim"] = d.get("text_dim", 4096)
        kw["image_dim"] = d.get("image_dim", IMAGE_EMBED_DIM)
        kw["clip_input"] = d.get("clip_input")
        if d.get("model_type") == "flf2v" and d.get("pos_embed_seq_len") is not None:
            kw["image_pos_len"] = d["pos_embed_seq_len"]
        return cls(**kw)

    def to_wan_config(self) -> dict:
        d = {k: getattr(self, k) for k in self._WAN_KEYS}
        d.update(_class_name="WanModel", patch_size=list(self.patch_size), text_dim=self.text_dim,
                 window_size=[-1, -1], qk_norm=True, cross_attn_norm=True)
        if self.has_image_input:
            d["image_dim"] = self.image_dim
        elif self.model_type in ("i2v", "flf2v"):
            d["clip_input"] = False  # a Wan2.2 I2V DiT (the Wan2.2 release tells it apart by its weights only)
        if self.image_pos_len is not None and self.image_pos_len != 2 * CLIP_TOKENS:
            d["pos_embed_seq_len"] = self.image_pos_len  # not in the release's config.json (it uses 2 x 257)
        return d

    # -- diffusers layout -----------------------------------------------------------------------------------
    _DIFFUSERS_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "rope_max_seq_len", "qk_norm",
                          "cross_attn_norm", "eps")

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "WanDiTConfig":
        known = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                 "text_dim", "freq_dim", "ffn_dim", "num_layers", "image_dim", "added_kv_proj_dim",
                 "pos_embed_seq_len"}
        unknown = sorted(set(d) - known - set(cls._DIFFUSERS_IGNORED))
        if unknown:
            raise CheckpointError(f"unsupported keys in the diffusers transformer config.json: {unknown}")
        if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or not d.get("cross_attn_norm", True):
            raise CheckpointError("only Wan DiTs with rms_norm_across_heads qk_norm and cross_attn_norm are supported")
        heads, head_dim = d.get("num_attention_heads", 40), d.get("attention_head_dim", 128)
        image_dim = d.get("image_dim")
        model_type = "t2v"
        if image_dim is not None:
            model_type = "flf2v" if d.get("pos_embed_seq_len") else "i2v"
        elif d.get("in_channels", 16) > (d.get("out_channels") or d.get("in_channels", 16)):
            model_type = "i2v"  # Wan2.2 I2V: conditioning latents on channels, no CLIP tokens
        return cls(
            dim=heads * head_dim, ffn_dim=d.get("ffn_dim", 13824), num_heads=heads,
            num_layers=d.get("num_layers", 40), in_dim=d.get("in_channels", 16),
            out_dim=d.get("out_channels") or d.get("in_channels", 16), freq_dim=d.get("freq_dim", 256),
            text_dim=d.get("text_dim", 4096), eps=d.get("eps", 1e-6), patch_size=tuple(d.get("patch_size", (1, 2, 2))),
            model_type=model_type, image_dim=image_dim or IMAGE_EMBED_DIM, clip_input=image_dim is not None,
            image_pos_len=d.get("pos_embed_seq_len") if model_type == "flf2v" else None,
        )

    def to_diffusers_config(self) -> dict:
        d = dict(
            _class_name="WanTransformer3DModel", patch_size=list(self.patch_size), num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim, in_channels=self.in_dim, out_channels=self.out_dim,
            text_dim=self.text_dim, freq_dim=self.freq_dim, ffn_dim=self.ffn_dim, num_layers=self.num_layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=self.eps, image_dim=None,
            added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None,
        )
        if self.has_image_input:
            d.update(image_dim=self.image_dim, added_kv_proj_dim=self.dim)
        if self.model_type == "flf2v":
            d["pos_embed_seq_len"] = self.image_pos_len
        return d

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, WanDiTConfig] = {
    "wan2.1-t2v-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1-i2v-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36,
                                   model_type="i2v"),
    "wan2.1-flf2v-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36,
                                     model_type="flf2v"),
    "wan2.2-a14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),  # per expert (T2V)
    "wan2.2-i2v-a14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36,
                                    model_type="i2v", clip_input=False),
    "wan2.2-ti2v-5b": WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48,
                                   model_type="ti2v"),
    # The built-in tiny model: Wan's architecture at toy sizes (random weights; its output is noise).
    "tiny": WanDiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32),
}


def preset(name: str, **overrides) -> WanDiTConfig:
    return replace(PRESETS[name], **overrides)
