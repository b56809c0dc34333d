"""HunyuanVideo-1.5's DiT (diffusers' ``HunyuanVideo15Transformer3DModel``) as a plain nn.Module.

Parameter names are diffusers' (the layout of ``hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-*``), so a diffusers
checkpoint loads without renames; the Tencent release's names are mapped in ``checkpoint.py``.

Data flow of one forward (B = batch, Lv = F * H * W video tokens after the 1x1x1 patch embedding, C = inner dim):

* video latents ``[B, 2 * 32 + 1, F, H, W]`` (noise, condition latents, frame mask) -> ``x_embedder`` -> ``[B, Lv, C]``
* timestep -> sinusoid (256) -> MLP -> ``temb [B, C]`` (+ a second MLP of ``timestep_r`` for MeanFlow models)
* Qwen2.5-VL hidden states ``[B, Lt, 3584]`` -> token refiner (a small transformer conditioned on the timestep and the
  mean text embedding) -> ``[B, Lt, C]``; ByT5 glyph states ``[B, Lg, 1472]`` -> MLP -> ``[B, Lg, C]``; SigLIP image
  states ``[B, Li, 1152]`` -> MLP -> ``[B, Li, C]``. Each gets a learned type embedding (0 text, 1 glyph, 2 image) and
  they are joined as ``[image, glyph, text]``.
* ``num_layers`` dual-stream blocks: video and condition tokens have their own adaLN modulation, projections and MLPs
  and meet in one joint attention over ``[video, condition]`` (3D RoPE on the video tokens only).
* adaLN-modulated LayerNorm -> linear -> unpatchify -> ``[B, 32, F, H, W]`` (the flow velocity).

The blocks run through one :class:`lightx2v.models.block_stack.BlockStack` (``self.block_stack``), the hook point of
feature caching: its token stream is the two streams joined, ``[video, condition]`` (``[B, Lv + Lc, C]``), each
block splitting it at ``Lv`` and joining its two outputs again (exact: the same values as two separate streams), so a
cached residual covers both streams as LightX2V's caches do. The hook plan (``HUNYUAN_PLAN``) names the blocks
(``transformer_blocks``: offload and compile units, and what fp8/int8 quantization replaces), their two phases and the
embeddings used only before block 0.

The reference pads the Qwen tokens to 1000 and the ByT5 tokens to 256 and masks the padding out of every attention
(a padded query attends to nothing, a padded key is seen by nobody). Here the condition streams carry only their valid
tokens, which gives the same video-token outputs with no mask, so attention goes through the mask-free backend of
``lightx2v.ops.attention``. Sequences of one batch must have equal lengths; the pipeline runs the conditional and the
unconditional branch as two batch-1 forwards, as the reference does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.models.block_stack import BlockStack
from lightx2v.models.hunyuan_video_15.arch import GLYPH_PROJ_DIM, HunyuanVideo15DiTConfig
from lightx2v.models.plan import HookPlan

TIME_FREQ_DIM = 256


def timestep_sinusoid(t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """``t [B]`` -> ``[B, dim]`` float32 ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period ** (-i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    """linear -> SiLU -> linear on the 256-wide sinusoid (diffusers' ``TimestepEmbedding`` names)."""

    def __init__(self, dim: int, in_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    """``temb = MLP(sinusoid(t))`` (+ ``MLP_r(sinusoid(t_r))`` for MeanFlow models, which also get the next time)."""

    def __init__(self, dim: int, use_meanflow: bool):
        super().__init__()
        self.timestep_embedder = TimestepMLP(dim)
        self.timestep_embedder_r = TimestepMLP(dim) if use_meanflow else None

    def forward(self, t: torch.Tensor, t_r: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype
        emb = self.timestep_embedder(timestep_sinusoid(t).to(dtype))
        if t_r is not None:
            if self.timestep_embedder_r is None:
                raise ValueError("timestep_r given to a DiT without MeanFlow time embedding")
            emb = emb + self.timestep_embedder_r(timestep_sinusoid(t_r).to(dtype))
        return emb


class RMSNorm(nn.Module):
    """RMS norm over the last dim (per attention head here), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype) * self.weight


class _Proj(nn.Module):
    """A linear followed by an activation; the ``net.0.proj`` of diffusers' FeedForward."""

    def __init__(self, dim_in: int, dim_out: int, act):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


class FeedForward(nn.Module):
    """``net.0.proj`` (linear + activation) -> ``net.2`` (linear); ``net.1`` is the reference's (inactive) dropout."""

    def __init__(self, dim: int, mult: float, act):
        super().__init__()
        hidden = int(dim * mult)
        self.net = nn.ModuleList([_Proj(dim, hidden, act), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# --- the text token refiner ------------------------------------------------------------------------------------------


class RefinerSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attn):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x).unflatten(2, (self.heads, -1))  # [B, L, H, D]
        k = self.to_k(x).unflatten(2, (self.heads, -1))
        v = self.to_v(x).unflatten(2, (self.heads, -1))
        return self.to_out[0](self.attn(q, k, v).flatten(2))


class GateModulation(nn.Module):
    """SiLU -> linear -> (gate_msa, gate_mlp), each ``[B, 1, C]`` (diffusers' ``HunyuanVideo15AdaNorm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_msa, gate_mlp = self.linear(F.silu(temb)).chunk(2, dim=1)
        return gate_msa[:, None], gate_mlp[:, None]


class RefinerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerSelfAttention(dim, heads, attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, mlp_ratio, F.silu)
        self.norm_out = GateModulation(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gate_msa, gate_mlp = self.norm_out(temb)
        x = x + self.attn(self.norm1(x)) * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class _Refiner(nn.Module):
    def __init__(self, dim: int, heads: int, num_layers: int, mlp_ratio: float, attn):
        super().__init__()
        self.refiner_blocks = nn.ModuleList([RefinerBlock(dim, heads, mlp_ratio, attn) for _ in range(num_layers)])


class _TimeTextEmbedding(nn.Module):
    def __init__(self, dim: int, text_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(dim)
        self.text_embedder = TimestepMLP(dim, in_dim=text_dim)  # linear -> SiLU -> linear on the mean text vector


class TokenRefiner(nn.Module):
    """Qwen hidden states ``[B, Lt, Dt]`` (valid tokens only) -> ``[B, Lt, C]``: a projection and ``num_refiner_layers``
    self-attention blocks gated by ``MLP(sinusoid(t)) + MLP(mean over tokens)``."""

    def __init__(self, cfg: HunyuanVideo15DiTConfig, attn):
        super().__init__()
        dim = cfg.inner_dim
        self.time_text_embed = _TimeTextEmbedding(dim, cfg.text_embed_dim)
        self.proj_in = nn.Linear(cfg.text_embed_dim, dim)
        self.token_refiner = _Refiner(dim, cfg.num_attention_heads, cfg.num_refiner_layers, 4.0, attn)

    def forward(self, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tte = self.time_text_embed
        dtype = tte.timestep_embedder.linear_1.weight.dtype
        pooled = text.float().mean(dim=1).to(text.dtype)
        temb = tte.timestep_embedder(timestep_sinusoid(t).to(dtype)) + tte.text_embedder(pooled)
        x = self.proj_in(text)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb)
        return x


class GlyphProjection(nn.Module):
    """ByT5 states ``[B, Lg, 1472]`` -> LayerNorm -> linear -> GELU -> linear -> GELU -> linear -> ``[B, Lg, C]``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = GLYPH_PROJ_DIM):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)
        self.linear_3 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_3(F.gelu(self.linear_2(F.gelu(self.linear_1(self.norm(x))))))


class ImageProjection(nn.Module):
    """SigLIP states ``[B, Li, 1152]`` -> LayerNorm -> linear -> GELU -> linear -> LayerNorm -> ``[B, Li, C]``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, in_dim)
        self.linear_2 = nn.Linear(in_dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.linear_2(F.gelu(self.linear_1(self.norm_in(x)))))


class PatchEmbed(nn.Module):
    def __init__(self, patch: tuple[int, int, int], in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, F, H, W] -> [B, F*H*W, C]


# --- RoPE -------------------------------------------------------------------------------------------------------------


def rope_cos_sin(grid: tuple[int, int, int], axes_dim: tuple[int, ...], theta: float,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables for a ``(T, H, W)`` token grid: ``cos, sin`` of shape ``[T*H*W, sum(axes_dim)]`` (float32),
    each axis' angles ``pos / theta ** (2i / d)`` repeated twice for the interleaved (even, odd) channel pairs."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    mesh = torch.meshgrid(*axes, indexing="ij")
    cos, sin = [], []
    for pos, dim in zip(mesh, axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        angles = torch.outer(pos.reshape(-1), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, L, H, D]``; pairs (2i, 2i+1) are rotated by the angle of pair i (computed in float32)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return (x.float() * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)


# --- the dual-stream block --------------------------------------------------------------------------------------------


class Modulation6(nn.Module):
    """SiLU -> linear -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each ``[B, 1, C]``
    (diffusers' ``AdaLayerNormZero``; its LayerNorm is applied in the block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, temb: torch.Tensor) -> list[torch.Tensor]:
        return [m[:, None] for m in self.linear(F.silu(temb)).chunk(6, dim=1)]


class JointAttention(nn.Module):
    """Projections of both streams, per-head RMS norm of q/k, RoPE on the video tokens, one attention over
    ``[video, condition]``, and each stream's output projection."""

    def __init__(self, dim: int, heads: int, attn):
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.attn = attn

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x ``[B, Lv, C]`` video, c ``[B, Lc, C]`` condition -> (``[B, Lv, C]``, ``[B, Lc, C]``)."""
        h = self.heads
        q = apply_rope(self.norm_q(self.to_q(x).unflatten(2, (h, -1))), cos, sin)
        k = apply_rope(self.norm_k(self.to_k(x).unflatten(2, (h, -1))), cos, sin)
        v = self.to_v(x).unflatten(2, (h, -1))
        cq = self.norm_added_q(self.add_q_proj(c).unflatten(2, (h, -1)))
        ck = self.norm_added_k(self.add_k_proj(c).unflatten(2, (h, -1)))
        cv = self.add_v_proj(c).unflatten(2, (h, -1))
        out = self.attn(torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)).flatten(2)
        lv = x.shape[1]
        return self.to_out[0](out[:, :lv]), self.to_add_out(out[:, lv:])


class DualStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn):
        super().__init__()
        self.norm1 = Modulation6(dim)
        self.norm1_context = Modulation6(dim)
        self.attn = JointAttention(dim, heads, attn)
        self.ff = FeedForward(dim, mlp_ratio, _gelu_tanh)
        self.ff_context = FeedForward(dim, mlp_ratio, _gelu_tanh)

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        dim = x.shape[-1]
        norm_x = F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale_msa) + shift_msa
        norm_c = F.layer_norm(c, (dim,), eps=1e-6) * (1 + c_scale_msa) + c_shift_msa
        attn_x, attn_c = self.attn(norm_x, norm_c, cos, sin)
        x = x + attn_x * gate_msa
        c = c + attn_c * c_gate_msa
        x = x + gate_mlp * self.ff(F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale_mlp) + shift_mlp)
        c = c + c_gate_mlp * self.ff_context(F.layer_norm(c, (dim,), eps=1e-6) * (1 + c_scale_mlp) + c_shift_mlp)
        return x, c


class OutputNorm(nn.Module):
    """LayerNorm (no affine) modulated by ``(scale, shift) = linear(SiLU(temb))`` (diffusers'
    ``AdaLayerNormContinuous``; note the order scale, shift)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class HunyuanStackArgs(NamedTuple):
    """Per-forward inputs of every block (what block-stack hooks receive as ``args``)."""

    temb: torch.Tensor  # [B, C] time embedding: every block's modulation reads it (what TeaCache measures)
    cos: torch.Tensor  # [Lv, head_dim] RoPE tables of the video tokens
    sin: torch.Tensor
    video_tokens: int  # Lv: the block stack's tokens are [video (Lv), condition]

    @property
    def modulation(self) -> torch.Tensor:
        """What the blocks' modulation layers read (TeaCache with ``use_ret_steps``): the time embedding."""
        return self.temb


def _call_block(block: "DualStreamBlock", tokens: torch.Tensor, a: HunyuanStackArgs) -> torch.Tensor:
    lv = a.video_tokens
    x, c = block(tokens[:, :lv], tokens[:, lv:], a.temb, a.cos, a.sin)
    return torch.cat([x, c], dim=1)


# Phases of a block (offload_granularity "phase"): the joint attention with both streams' modulation, then both MLPs.
HUNYUAN_PHASES = (("attn", ("norm1", "norm1_context", "attn")), ("ffn", ("ff", "ff_context")))
# Used only before block 0 (norm_out / proj_out run after the blocks and stay on the device).
HUNYUAN_EMBEDDINGS = ("x_embedder", "image_embedder", "context_embedder", "context_embedder_2", "time_embed",
                      "cond_type_embed")
HUNYUAN_PLAN = HookPlan(blocks="transformer_blocks", phases=HUNYUAN_PHASES, embeddings=HUNYUAN_EMBEDDINGS,
                        quantize_prefixes=("transformer_blocks.",))


class HunyuanVideo15DiT(nn.Module):
    """See the module docstring. ``attn``: a backend from ``lightx2v.ops.attention.get_attention_backend``."""

    hook_plan = HUNYUAN_PLAN

    def __init__(self, cfg: HunyuanVideo15DiTConfig, attn):
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        self.x_embedder = PatchEmbed((cfg.patch_size_t, cfg.patch_size, cfg.patch_size), cfg.in_channels, dim)
        self.image_embedder = ImageProjection(cfg.image_embed_dim, dim)
        self.context_embedder = TokenRefiner(cfg, attn)
        self.context_embedder_2 = GlyphProjection(cfg.text_embed_2_dim, dim)
        self.time_embed = TimeEmbedding(dim, cfg.use_meanflow)
        self.cond_type_embed = nn.Embedding(3, dim)  # 0: Qwen text, 1: ByT5 glyphs, 2: SigLIP image
        self.transformer_blocks = nn.ModuleList(
            [DualStreamBlock(dim, cfg.num_attention_heads, cfg.mlp_ratio, attn) for _ in range(cfg.num_layers)])
        self.block_stack = BlockStack(self.transformer_blocks, _call_block)  # the hook point of feature caching
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size_t * cfg.patch_size * cfg.patch_size * cfg.out_channels)

    def condition_tokens(self, t: torch.Tensor, text: torch.Tensor, glyph: torch.Tensor | None,
                         image: torch.Tensor | None) -> torch.Tensor:
        """The joint condition stream ``[B, Li + Lg + Lt, C]``: ``[image, glyph, text]`` tokens, each plus its type
        embedding. ``glyph`` / ``image`` may be None or hold zero tokens (no quoted text; text-to-video)."""
        parts = []
        if image is not None and image.shape[1]:
            parts.append(self.image_embedder(image) + self.cond_type_embed.weight[2])
        if glyph is not None and glyph.shape[1]:
            parts.append(self.context_embedder_2(glyph) + self.cond_type_embed.weight[1])
        parts.append(self.context_embedder(text, t) + self.cond_type_embed.weight[0])
        return torch.cat(parts, dim=1)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, glyph: torch.Tensor | None = None,
                image: torch.Tensor | None = None, t_r: torch.Tensor | None = None) -> torch.Tensor:
        """latents ``[B, in_channels, F, H, W]``, t ``[B]`` (0..1000), text ``[B, Lt, text_embed_dim]``, glyph
        ``[B, Lg, text_embed_2_dim]`` or None, image ``[B, Li, image_embed_dim]`` or None (valid tokens only; see the
        module docstring), t_r ``[B]`` (MeanFlow models) -> velocity ``[B, out_channels, F, H, W]``."""
        cfg = self.cfg
        b, _, f, h, w = latents.shape
        pt, p = cfg.patch_size_t, cfg.patch_size
        grid = (f // pt, h // p, w // p)
        cos, sin = rope_cos_sin(grid, cfg.rope_axes_dim, cfg.rope_theta, device=latents.device)
        temb = self.time_embed(t, t_r)
        x = self.x_embedder(latents.to(self.x_embedder.proj.weight.dtype))
        c = self.condition_tokens(t, text, glyph, image)
        lv = x.shape[1]
        tokens = self.block_stack(torch.cat([x, c], dim=1), HunyuanStackArgs(temb, cos, sin, lv))
        x = self.proj_out(self.norm_out(tokens[:, :lv], temb))
        # [B, T*H*W, C*pt*p*p] -> [B, C, T*pt, H*p, W*p]
        x = x.reshape(b, *grid, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, cfg.out_channels, grid[0] * pt, grid[1] * p, grid[2] * p)


def valid_tokens(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the tokens where ``mask`` (``[B, L]``) is set: ``[B, L, D]`` -> ``[B, L', D]``. Every row must have the
    same number of valid tokens (one prompt per forward)."""
    keep = mask.bool()
    counts = keep.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"rows have different numbers of valid tokens ({counts.tolist()}); run them one at a time")
    return states[keep].reshape(states.shape[0], -1, states.shape[-1])
