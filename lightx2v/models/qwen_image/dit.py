"""The Qwen-Image MMDiT (20B in the release), as plain PyTorch math.

Parameter names are those of the release (diffusers' ``QwenImageTransformer2DModel``), so its checkpoints load
without renaming: ``img_in``, ``txt_norm``, ``txt_in``, ``time_text_embed.timestep_embedder.linear_{1,2}``,
``transformer_blocks.N.{img_mod.1, txt_mod.1, attn.*, img_mlp.net.{0.proj,2}, txt_mlp.*}``, ``norm_out.linear``,
``proj_out``. Every linear of a block is a plain ``nn.Linear`` (LoRA / quantization / offload hooks reach them).

One block (double-stream: image tokens x [B, N, C], text tokens c [B, L, C]; C = heads * head_dim)::

    (shift, scale, gate) x 2 = img_mod(temb), txt_mod(temb)              # adaLN-Zero, one set per stream
    x_m = LN(x) * (1 + scale1) + shift1;  c_m = LN(c) * (1 + scale1') + shift1'
    q, k, v = [add_q/k/v_proj(c_m) ; to_q/k/v(x_m)]   (RMSNorm on q and k per head, then RoPE)
    o = attention(q, k, v) over the L + N joint tokens, text first
    x += gate1 * to_out.0(o_img);  c += gate1' * to_add_out(o_txt)
    x += gate2 * img_mlp(LN(x) * (1 + scale2) + shift2);  c likewise with txt_mlp

RoPE ("MSRoPE", :func:`rope_tables`): the head dim is split into (frame, row, column) parts (``axes_dims_rope``,
16/56/56). The image tokens of the i-th image in the sequence (0: the image being generated, 1..: the condition
images of an edit) get frame position i and row/column positions centred on the image (-h/2 .. h/2 - 1); text token
j gets position m + j on all three axes, m = the largest half-height/half-width of the images, so text sits on the
diagonal past the images.

Precision: linears run in the model dtype; the adaLN modulation, the LayerNorm statistics, the gated residual
updates and RoPE run in float32 (diffusers runs the first three in the model dtype: in bf16 we round less, in
float32 the two are the same math). On CUDA the elementwise steps use lightx2v.ops.triton's fused kernels (the ones
the Wan DiT uses). Attention goes only through ``lightx2v.ops.attention`` (resolved once, at build time). No
attention mask: one prompt at a time, every text token is valid (diffusers passes no mask either in that case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.models.plan import HookPlan
from lightx2v.models.qwen_image.arch import QwenImageDiTConfig
from lightx2v.models.wan.dit import RMSNorm, apply_rope, gated_add, modulate, use_fused
from lightx2v.ops import triton as fused
from lightx2v.ops.attention import AttentionBackend

ImageShape = tuple[int, int, int]  # (frames, token rows, token columns) of one image: (1, H/16, W/16)


# --- RoPE -----------------------------------------------------------------------------------------------------


class RopeTables(NamedTuple):
    """Rotations of the image tokens ([N, D/2]) and the text tokens ([L, D/2]): complex64 and its float32 cos/sin."""

    img_rot: torch.Tensor
    img_cos: torch.Tensor
    img_sin: torch.Tensor
    txt_rot: torch.Tensor
    txt_cos: torch.Tensor
    txt_sin: torch.Tensor


def _inv_freqs(dim: int, theta: float, device) -> torch.Tensor:
    """[dim/2] float32: theta ** (-2i / dim), computed as the reference does (float32 pow)."""
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=device).to(torch.float32).div(dim))


def _centred(n: int, device) -> torch.Tensor:
    """Positions -(n - n//2) .. n//2 - 1 (the reference's ``scale_rope``: the image centred on 0)."""
    return torch.arange(-(n - n // 2), n // 2, device=device)


def rope_tables(cfg: QwenImageDiTConfig, image_shapes: Sequence[ImageShape], txt_len: int,
                device: torch.device | str = "cpu") -> RopeTables:
    """The RoPE rotations for the images ``image_shapes`` (in token order) followed by ``txt_len`` text tokens.

    Angles are position * inv_freq in float32 (as the reference's ``QwenEmbedRope``); the frame axis of image i
    starts at i. Returns :class:`RopeTables` with ``img_*`` [sum f*h*w, D/2] and ``txt_*`` [txt_len, D/2].
    """
    d_f, d_h, d_w = cfg.axes_dims_rope
    inv = [_inv_freqs(d, cfg.rope_theta, device) for d in (d_f, d_h, d_w)]
    parts, max_index = [], 0
    for idx, (f, h, w) in enumerate(image_shapes):
        a_f = torch.outer(torch.arange(idx, idx + f, device=device), inv[0])  # [f, d_f/2]
        a_h = torch.outer(_centred(h, device), inv[1])  # [h, d_h/2]
        a_w = torch.outer(_centred(w, device), inv[2])  # [w, d_w/2]
        a = torch.cat([a_f[:, None, None].expand(f, h, w, -1), a_h[None, :, None].expand(f, h, w, -1),
                       a_w[None, None, :].expand(f, h, w, -1)], dim=-1)
        parts.append(a.reshape(f * h * w, -1))
        max_index = max(max_index, h // 2, w // 2)
    img = torch.cat(parts, dim=0)
    pos = torch.arange(max_index, max_index + txt_len, device=device)
    txt = torch.cat([torch.outer(pos, inv_i) for inv_i in inv], dim=-1)  # the same position on every axis

    def rot(angles: torch.Tensor):
        r = torch.polar(torch.ones_like(angles), angles)
        return r, r.real.contiguous(), r.imag.contiguous()

    return RopeTables(*rot(img), *rot(txt))


# --- embeddings -----------------------------------------------------------------------------------------------


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: [B] (sigma in [0, 1]) -> [B, dim] float32 sinusoidal features, cos half first.

    diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``: frequencies
    exp(-ln(10000) * i / (dim/2)) in float32, argument 1000 * (t * freq); t itself arrives rounded to the model dtype
    (as the reference rounds it).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * (t[:, None].float() * freqs[None, :])
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> linear_1 -> SiLU -> linear_2 (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class TimeTextEmbed(nn.Module):
    """Holds ``timestep_embedder`` (the release's ``time_text_embed`` module; no text part in Qwen-Image)."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_embedder = TimestepEmbedder(freq_dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t: [B] float -> temb [B, C] in ``dtype``. t is rounded to ``dtype`` first, as the reference does."""
        features = timestep_features(t.to(dtype), self.freq_dim)
        return self.timestep_embedder(features.to(dtype))


class OutNorm(nn.Module):
    """diffusers' ``AdaLayerNormContinuous`` without affine: LN(x) * (1 + scale) + shift, (scale, shift) =
    linear(SiLU(temb))."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).float().unsqueeze(1).chunk(2, dim=-1)  # [B, 1, C] each
        return modulate(x, shift, scale, self.eps, None)


# --- the block ------------------------------------------------------------------------------------------------


class GeluTanhProj(nn.Module):
    """Linear then tanh-approximate GELU (diffusers' ``GELU(approximate="tanh")``, weights under ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net`` = [GELU-tanh projection C -> 4C, (dropout: identity), linear 4C -> C] (diffusers' names)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GeluTanhProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class JointAttention(nn.Module):
    """Attention over [text tokens; image tokens] with per-stream projections and per-head RMSNorm on q and k.

    ``to_out`` is a ModuleList holding the image output projection (the release's ``to_out.0``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, attn: AttentionBackend):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)
        self.attn = attn

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, C] image tokens, c: [B, L, C] text tokens (both modulated) -> their attention outputs."""
        h, n_txt = self.heads, c.shape[1]
        q = torch.cat([self.norm_added_q(self.add_q_proj(c).unflatten(-1, (h, -1))),
                       self.norm_q(self.to_q(x).unflatten(-1, (h, -1)))], dim=1)  # [B, L + N, H, D]
        k = torch.cat([self.norm_added_k(self.add_k_proj(c).unflatten(-1, (h, -1))),
                       self.norm_k(self.to_k(x).unflatten(-1, (h, -1)))], dim=1)
        v = torch.cat([self.add_v_proj(c), self.to_v(x)], dim=1).unflatten(-1, (h, -1))
        for t in (q, k):  # RoPE per stream, on views of the joint tensor
            _rope_into(t[:, :n_txt], rope.txt_rot, rope.txt_cos, rope.txt_sin)
            _rope_into(t[:, n_txt:], rope.img_rot, rope.img_cos, rope.img_sin)
        out = self.attn(q, k, v).flatten(2)  # [B, L + N, H * D]
        del q, k, v
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


def _rope_into(view: torch.Tensor, rot, cos, sin) -> None:
    """Rotate a [B, l, H, D] view of a larger tensor in place."""
    if use_fused(view):
        fused.rope_(view, cos, sin)
    else:
        view.copy_(apply_rope(view, rot))


class Modulation(NamedTuple):
    """adaLN parameters of one stream, float32 [B, 1, C] each: (shift, scale, gate) for attention and MLP."""

    shift1: torch.Tensor
    scale1: torch.Tensor
    gate1: torch.Tensor
    shift2: torch.Tensor
    scale2: torch.Tensor
    gate2: torch.Tensor


def _modulation(mod: nn.Module, temb: torch.Tensor) -> Modulation:
    return Modulation(*mod(temb).float().unsqueeze(1).chunk(6, dim=-1))


class QwenImageBlock(nn.Module):
    """One double-stream block (see the module docstring)."""

    def __init__(self, cfg: QwenImageDiTConfig, attn: AttentionBackend):
        super().__init__()
        dim, eps = cfg.inner_dim, cfg.eps
        self.eps = eps
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, eps, attn)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, rope: RopeTables,
                n_first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, C] image tokens, c: [B, L, C] text tokens, temb: [B, C] (``n_first`` set: [2B, C], the
        current timestep's then timestep 0's; the first ``n_first`` image tokens take the first, the rest the
        second: ``zero_cond_t``). Returns the updated (x, c)."""
        b = c.shape[0]
        img = [_modulation(self.img_mod, temb[:b])]
        runs = [slice(None)]
        if n_first is not None:
            img.append(_modulation(self.img_mod, temb[b:]))
            runs = [slice(0, n_first), slice(n_first, None)]
        txt = _modulation(self.txt_mod, temb[:b])

        x_m = _modulate_runs(x, img, runs, "shift1", "scale1", self.eps)
        c_m = modulate(c, txt.shift1, txt.scale1, self.eps, None)
        x_attn, c_attn = self.attn(x_m, c_m, rope)
        del x_m, c_m
        x = _gated_runs(x, x_attn, img, runs, "gate1")
        c = gated_add(c, c_attn, txt.gate1, None)
        del x_attn, c_attn

        x = _gated_runs(x, self.img_mlp(_modulate_runs(x, img, runs, "shift2", "scale2", self.eps)), img, runs,
                        "gate2")
        c = gated_add(c, self.txt_mlp(modulate(c, txt.shift2, txt.scale2, self.eps, None)), txt.gate2, None)
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            x, c = x.clip(-65504, 65504), c.clip(-65504, 65504)
        return x, c


def _modulate_runs(x, mods: list[Modulation], runs: list[slice], shift: str, scale: str, eps: float):
    if len(runs) == 1:
        return modulate(x, getattr(mods[0], shift), getattr(mods[0], scale), eps, None)
    out = torch.empty_like(x)
    for m, sl in zip(mods, runs):
        out[:, sl] = modulate(x[:, sl], getattr(m, shift), getattr(m, scale), eps, None)
    return out


def _gated_runs(x, y, mods: list[Modulation], runs: list[slice], gate: str):
    if len(runs) == 1:
        return gated_add(x, y, getattr(mods[0], gate), None)
    out = torch.empty_like(x)
    for m, sl in zip(mods, runs):
        gated_add(x[:, sl], y[:, sl], getattr(m, gate), None, out=out[:, sl])
    return out


# --- the model ------------------------------------------------------------------------------------------------

# Phases of a block (offload_granularity "phase"), in the order the block uses them: both streams' adaLN projections
# (img_mod is called first, then txt_mod), the joint attention (every projection, the q/k norms, both outputs), the
# two feed-forwards.
QWEN_PHASES = (("modulation", ("img_mod", "txt_mod")), ("attention", ("attn",)), ("mlp", ("img_mlp", "txt_mlp")))
# Used only before block 0 (norm_out and proj_out, the head, run after the blocks and stay on the device).
QWEN_EMBEDDINGS = ("time_text_embed", "txt_norm", "img_in", "txt_in")


class QwenImageDiT(nn.Module):
    """The Qwen-Image MMDiT. ``attn``: an attention backend from ``lightx2v.ops.attention``.

    Hooks (``hook_plan``): offload streams ``transformer_blocks`` (per block or per phase) and the embeddings;
    fp8/int8 quantization replaces every Linear of the blocks (the adaLN projections included, as LightX2V's
    quantized Qwen-Image checkpoints hold them); LoRA files name the release's parameters, which are ours.
    """

    hook_plan = HookPlan(blocks="transformer_blocks", phases=QWEN_PHASES, embeddings=QWEN_EMBEDDINGS,
                         quantize_prefixes=("transformer_blocks.",))

    def __init__(self, cfg: QwenImageDiTConfig, attn: AttentionBackend):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.time_text_embed = TimeTextEmbed(cfg.freq_dim, dim)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, cfg.eps)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([QwenImageBlock(cfg, attn) for _ in range(cfg.num_layers)])
        self.norm_out = OutNorm(dim, cfg.eps)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the model computes: the head's device (block/phase offload keeps the head there while it streams
        the embeddings and blocks from host memory)."""
        return self.proj_out.weight.device

    def rope(self, image_shapes: Sequence[ImageShape], txt_len: int) -> RopeTables:
        """The RoPE tables for these images and this many text tokens (reuse them across the steps)."""
        return rope_tables(self.config, image_shapes, txt_len, self.device)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                image_shapes: Sequence[ImageShape], rope: RopeTables | None = None) -> torch.Tensor:
        """The velocity of every image token.

        hidden_states: [B, N, in_channels] packed latents of the image being generated followed by those of the
        condition images (edit), N = sum f*h*w of ``image_shapes`` (the generated image first).
        encoder_hidden_states: [B, L, joint_attention_dim] prompt embeddings. timestep: [B] sigma in [0, 1] (the
        pipelines' ``t / 1000``). rope: from :meth:`rope` (computed here when None).
        Returns [B, N, patch_size**2 * out_channels] in the model dtype (the caller keeps the first image's tokens).
        """
        cfg = self.config
        n = sum(f * h * w for f, h, w in image_shapes)
        if hidden_states.ndim != 3 or hidden_states.shape[1:] != (n, cfg.in_channels):
            raise ValueError(f"hidden_states must be [B, {n}, {cfg.in_channels}] for image_shapes "
                             f"{list(image_shapes)}, got {list(hidden_states.shape)}")
        dtype = self.dtype
        if rope is None:
            rope = self.rope(image_shapes, encoder_hidden_states.shape[1])
        x = self.img_in(hidden_states.to(dtype))
        c = self.txt_in(self.txt_norm(encoder_hidden_states.to(dtype)))
        t = timestep.to(x.device).float()
        n_first = None
        if cfg.zero_cond_t:  # condition images at timestep 0
            t = torch.cat([t, torch.zeros_like(t)])
            f, h, w = image_shapes[0]
            n_first = f * h * w
        temb = self.time_text_embed(t, dtype)  # [B or 2B, C]
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope, n_first)
        x = self.norm_out(x, temb[: c.shape[0]])
        return self.proj_out(x)
