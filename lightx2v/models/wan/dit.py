"""The Wan2.1 diffusion transformer, as plain PyTorch math.

Parameter names follow the original Wan release (``blocks.0.self_attn.q.weight``, ``head.modulation`` ...), so
its checkpoints load without renaming; diffusers' names are mapped in ``checkpoint.py``.

Precision: the linear layers run in the model's dtype (bf16 on GPU); the time embedding, the adaLN modulation,
the LayerNorm statistics and the residual updates are computed in float32, as the reference does.
Attention goes only through ``lightx2v.ops.attention`` (resolved once, at build time).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.models.block_stack import BlockStack
from lightx2v.models.plan import HookPlan
from lightx2v.models.wan.arch import WanDiTConfig
from lightx2v.models.wan.checkpoint import dit_key_to_diffusers, wan_key_from_diffusers
from lightx2v.ops import triton as fused
from lightx2v.ops.attention import AttentionBackend


def use_fused(x: torch.Tensor) -> bool:
    """The fused Triton kernels of lightx2v.ops.triton (one memory pass, same math) run on CUDA tensors; under
    torch.compile the compiler fuses the eager ops itself."""
    return x.is_cuda and fused.available() and not torch.compiler.is_compiling()


# --- small pieces ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMS norm over the last dim (PyTorch's fused kernel; it accumulates in float32 for bf16 inputs)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            return fused.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def layer_norm_f32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in float32 (returns float32)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):  # LayerNorm(x) * w + b == the adaLN kernel with scale = w - 1, shift = b (float32 math)
            return fused.norm_modulate(x, self.bias.float(), self.weight.float() - 1, self.eps)
        return layer_norm_f32(x, self.eps, self.weight, self.bias).to(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: [B] (float timesteps in [0, 1000]) -> [B, dim] float32, cos half first (Wan / diffusers convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(head_dim: int, grid: tuple[int, int, int], device, theta: float = 10000.0) -> torch.Tensor:
    """3D RoPE for a (frames, height, width) token grid.

    The head dim is split into a time part and two equal spatial parts (``2*(d//6)`` each), each rotated by its own
    coordinate. Returns unit complex rotations [L, head_dim // 2] (complex64), one per channel pair; the angles
    are computed in float64.
    """
    f, h, w = grid
    hw_dim = 2 * (head_dim // 6)
    t_dim = head_dim - 2 * hw_dim
    angles = []
    for n, d in ((f, t_dim), (h, hw_dim), (w, hw_dim)):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # [d/2]
        angles.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv))  # [n, d/2]
    a_t = angles[0][:, None, None, :].expand(f, h, w, -1)
    a_h = angles[1][None, :, None, :].expand(f, h, w, -1)
    a_w = angles[2][None, None, :, :].expand(f, h, w, -1)
    a = torch.cat([a_t, a_h, a_w], dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.polar(torch.ones_like(a), a).to(torch.complex64)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: [B, L, H, D]; channel pair (2i, 2i+1) is rotated by rot[:, i] (complex multiply in float32)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, D/2]
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).to(x.dtype)


# --- token chunking -------------------------------------------------------------------------------------------
# The float32 temporaries of the norms, RoPE and residual updates, and the FFN's hidden activation, are several
# times the size of the bf16 token tensor. Every one of these operations is independent per token, so computing
# them over chunks of tokens gives the same values while keeping the temporaries small.

def token_chunks(length: int, chunk: int | None) -> list[slice]:
    if not chunk or length <= chunk:
        return [slice(None)]
    return [slice(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def modulate(x: torch.Tensor, shift, scale, eps: float, chunk: int | None) -> torch.Tensor:
    """adaLN: LayerNorm(x) * (1 + scale) + shift, statistics in float32, result in x's dtype."""
    if use_fused(x):
        return fused.norm_modulate(x, shift, scale, eps)
    chunks = token_chunks(x.shape[1], chunk)
    if len(chunks) == 1:
        return (layer_norm_f32(x, eps) * (1 + scale) + shift).to(x.dtype)
    out = torch.empty_like(x)
    for sl in chunks:
        out[:, sl] = layer_norm_f32(x[:, sl], eps) * (1 + scale) + shift
    return out


def gated_add(x: torch.Tensor, y: torch.Tensor, gate, chunk: int | None, out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """x + y * gate in float32, result in x's dtype (into ``out``; ``out=x`` updates x in place)."""
    if use_fused(x):
        return fused.gated_residual(x, y, gate, out=out)
    chunks = token_chunks(x.shape[1], chunk)
    if len(chunks) == 1:
        result = (x.float() + y.float() * gate).to(x.dtype)
        return result if out is None else out.copy_(result)
    out = torch.empty_like(x) if out is None else out
    for sl in chunks:
        out[:, sl] = x[:, sl].float() + y[:, sl].float() * gate
    return out


class Rope(NamedTuple):
    """The RoPE table of one token grid: complex rotations [L, D/2] and their cos / sin (float32)."""

    rot: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class TokenRuns(NamedTuple):
    """Timestep conditioning that differs along the sequence (Wan2.2 TI2V: the conditioning frame at t = 0).

    Tokens are frame-major, so frames that share a timestep are one contiguous run of tokens; run r covers tokens
    ``bounds[r]:bounds[r + 1]``. ``e``: [B, R, 6, C] float32 time projection per run; ``temb``: [B, R, C].
    """

    e: torch.Tensor
    temb: torch.Tensor
    bounds: tuple[int, ...]

    def slices(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self.bounds, self.bounds[1:])]


def modulation_runs(table: torch.Tensor, e) -> list[tuple[slice, tuple[torch.Tensor, ...]]]:
    """(token slice, (shift, scale, ...)) per run of equal timesteps: ``table`` [1, k, C] float32 + the time
    projection, split into k rows of [B, 1, C]. One run over all tokens (``slice(None)``) when ``e`` is a tensor."""
    if isinstance(e, TokenRuns):
        return [(sl, (table.float() + e.e[:, r]).chunk(table.shape[1], dim=1)) for r, sl in enumerate(e.slices())]
    return [(slice(None), (table.float() + e).chunk(table.shape[1], dim=1))]


def modulate_runs(x: torch.Tensor, runs, i_shift: int, i_scale: int, eps: float, chunk: int | None) -> torch.Tensor:
    """:func:`modulate` with the shift/scale of each run of tokens."""
    if len(runs) == 1:
        _, m = runs[0]
        return modulate(x, m[i_shift], m[i_scale], eps, chunk)
    out = torch.empty_like(x)
    for sl, m in runs:
        if use_fused(x):
            fused.norm_modulate(x[:, sl], m[i_shift], m[i_scale], eps, out=out[:, sl])
        else:
            out[:, sl] = modulate(x[:, sl], m[i_shift], m[i_scale], eps, chunk)
    return out


def gated_add_runs(x: torch.Tensor, y: torch.Tensor, runs, i_gate: int, chunk: int | None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gated_add` with the gate of each run of tokens."""
    if len(runs) == 1:
        return gated_add(x, y, runs[0][1][i_gate], chunk, out)
    out = torch.empty_like(x) if out is None else out
    for sl, m in runs:
        gated_add(x[:, sl], y[:, sl], m[i_gate], chunk, out[:, sl])
    return out


# --- attention ------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    chunk_tokens: int | None = None  # RoPE over token chunks; with head_group, v over token chunks (set by WanDiT)
    head_group: int | None = None  # attention over groups of heads, outputs over q (WanDiT.set_attention_chunks)

    def __init__(self, dim: int, num_heads: int, eps: float, attn: AttentionBackend):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.attn = attn

    def forward(self, x: torch.Tensor, rope: "Rope", premodulate=None) -> torch.Tensor:
        """x: [B, L, C] -> [B, L, C]. ``premodulate(x)`` (the block's adaLN) is applied here, so that the modulated
        input can be dropped as soon as q, k and v exist (it is as large as x); q, k and v are dropped before the
        output projection. Peak activation memory: x, the modulated input y, q, k and v; then x, q, k, v and the
        attention output.

        With ``head_group`` set (and ``chunk_tokens``), two of these [L, C] tensors never exist: v is computed over
        token chunks into y's own storage (row block i of v reads only row block i of y, and q and k are done with
        y), and attention runs over groups of ``head_group`` heads, each group's output written over that group's q
        (nothing reads it again). Peak: x, q, k, v plus a chunk. Costs two [L, C] copies.
        """
        y = x if premodulate is None else premodulate(x)
        heads = self.num_heads
        # Writes into y and q only outside autograd, and into y only when it is a fresh tensor of our own.
        lean = self.head_group is not None and y is not x and y.is_contiguous() and not torch.is_grad_enabled()
        if use_fused(y):  # q/k: RMSNorm and RoPE in one pass, in place
            q = fused.rms_norm_rope_(self.q(y).unflatten(-1, (heads, -1)), self.norm_q.weight, self.norm_q.eps,
                                     rope.cos, rope.sin)
            k = fused.rms_norm_rope_(self.k(y).unflatten(-1, (heads, -1)), self.norm_k.weight, self.norm_k.eps,
                                     rope.cos, rope.sin)
        else:
            q = self.norm_q(self.q(y)).unflatten(-1, (heads, -1))  # [B, L, H, D]
            k = self.norm_k(self.k(y)).unflatten(-1, (heads, -1))
            chunks = token_chunks(q.shape[1], self.chunk_tokens)
            if len(chunks) == 1:
                q, k = apply_rope(q, rope.rot), apply_rope(k, rope.rot)
            else:  # q and k are fresh tensors here: rotate them in place, chunk by chunk
                for sl in chunks:
                    q[:, sl] = apply_rope(q[:, sl], rope.rot[sl])
                    k[:, sl] = apply_rope(k[:, sl], rope.rot[sl])
        v = (self._v_over(y) if lean else self.v(y)).unflatten(-1, (heads, -1))
        del y
        out = self._attention_over_q(q, k, v) if lean else self.attn(q, k, v)
        del q, k, v
        return self.o(out.flatten(2))

    def _v_over(self, y: torch.Tensor) -> torch.Tensor:
        """v = self.v(y), written over y chunk by chunk of tokens (one chunk: a fresh tensor, nothing to save)."""
        chunks = token_chunks(y.shape[1], self.chunk_tokens)
        if len(chunks) == 1:
            return self.v(y)
        for sl in chunks:
            y[:, sl] = self.v(y[:, sl])
        return y

    def _attention_over_q(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention per group of heads (heads are independent), each group's output copied over its q."""
        heads, group = q.shape[2], self.head_group
        if group >= heads:
            return self.attn(q, k, v)
        for h in range(0, heads, group):
            hs = slice(h, min(h + group, heads))
            q[:, :, hs] = self.attn(q[:, :, hs], k[:, :, hs], v[:, :, hs])
        return q


class CrossAttention(nn.Module):
    """Attention from the video tokens to the text tokens; for I2V also to the CLIP image tokens."""

    chunk_tokens: int | None = 8192  # I2V: queries over token chunks (WanDiT.set_attention_chunks)

    def __init__(self, dim: int, num_heads: int, eps: float, attn: AttentionBackend, image_input: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.image_input = image_input
        if image_input:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)
        self.attn = attn

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None) -> torch.Tensor:
        """x: [B, L, C]; context: [B, Lt, C] text tokens; context_img: [B, Li, C] image tokens (I2V) or None.

        I2V: each query's output depends only on that query, and a chunk of q is read only by its own chunk's two
        attentions, so their sum is written over q chunk by chunk (``chunk_tokens``): besides x only q is ever
        [L, C] (not q, the text output, the image output and their sum). q is dropped before the projection.
        """
        heads = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (heads, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (heads, -1))
        v = self.v(context).unflatten(-1, (heads, -1))
        if not self.image_input:
            out = self.attn(q, k, v)
        else:
            k_img = self.norm_k_img(self.k_img(context_img)).unflatten(-1, (heads, -1))
            v_img = self.v_img(context_img).unflatten(-1, (heads, -1))
            if torch.is_grad_enabled():  # autograd keeps q for the backward pass: no writes into it
                out = self.attn(q, k, v) + self.attn(q, k_img, v_img)
            else:
                for sl in token_chunks(q.shape[1], self.chunk_tokens):
                    qs = q[:, sl]
                    torch.add(self.attn(qs, k, v), self.attn(qs, k_img, v_img), out=qs)
                out = q
        del q
        return self.o(out.flatten(2))


# --- the block ------------------------------------------------------------------------------------------------

class WanBlock(nn.Module):
    chunk_tokens: int | None = None  # elementwise work and the FFN over token chunks (set by WanDiT)

    def __init__(self, cfg: WanDiTConfig, attn: AttentionBackend):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.eps = eps
        self.self_attn = SelfAttention(dim, cfg.num_heads, eps, attn)
        self.norm3 = AffineLayerNorm(dim, eps)  # before cross-attention (name from the Wan release)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, eps, attn, cfg.has_image_input)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))  # float32: adaLN shift/scale/gate offsets

    def forward(self, x, e, context, context_img, rope):
        """x: [B, L, C]; e: [B, 6, C] float32 time projection (or :class:`TokenRuns`); context(_img): [B, Lt(/Li), C].
        """
        # adaLN rows per run of tokens: shift, scale, gate (self-attention), c_shift, c_scale, c_gate (FFN)
        runs = modulation_runs(self.modulation, e)
        n, eps = self.chunk_tokens, self.eps
        # Without autograd the residual stream x is updated in place (the same values as out of place): the
        # block's input is not kept beside its output, so the caller's reference to it costs no memory. Callers
        # that need the input afterwards (feature caching) keep a copy.
        inplace = not torch.is_grad_enabled()
        y = self.self_attn(x, rope, lambda t: modulate_runs(t, runs, 0, 1, eps, n))
        x = gated_add_runs(x, y, runs, 2, n, out=x if inplace else None)
        del y
        c = self.cross_attn(self.norm3(x), context, context_img)
        x = x.add_(c) if inplace else x + c
        del c
        out = x if inplace else torch.empty_like(x)
        for sl, m in [(sl, m) for run, m in runs for sl in _run_chunks(run, x.shape[1], n)]:
            # the FFN's hidden activation ([L, ffn_dim]) is the largest: never whole
            xs = x if sl == slice(None) else x[:, sl]
            gated_add(xs, self.ffn(modulate(xs, m[3], m[4], eps, None)), m[5], None,
                      out=out if sl == slice(None) else out[:, sl])
        return out


def _run_chunks(run: slice, length: int, chunk: int | None) -> list[slice]:
    """The token chunks of one run (``slice(None)``: the whole sequence)."""
    if run == slice(None):
        return token_chunks(length, chunk)
    if not chunk or run.stop - run.start <= chunk:
        return [run]
    return [slice(s, min(s + chunk, run.stop)) for s in range(run.start, run.stop, chunk)]


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, temb) -> torch.Tensor:
        """x: [B, L, C]; temb: [B, C] float32 (or :class:`TokenRuns`) -> [B, L, out_dim * prod(patch)]."""
        if isinstance(temb, TokenRuns):
            y = torch.empty_like(x)
            for r, sl in enumerate(temb.slices()):
                shift, scale = (self.modulation.float() + temb.temb[:, r, None]).chunk(2, dim=1)
                y[:, sl] = layer_norm_f32(x[:, sl], self.eps) * (1 + scale) + shift
            return self.head(y)
        shift, scale = (self.modulation.float() + temb[:, None]).chunk(2, dim=1)
        return self.head((layer_norm_f32(x, self.eps) * (1 + scale) + shift).to(x.dtype))


class ImageProjection(nn.Module):
    """CLIP image tokens [B, T, image_dim] -> [B, T, dim]: T = 257 for ViT-H/14 I2V; FLF2V: the first and the last
    image's tokens together, T = ``cfg.image_pos_len`` (2 x 257 in the release), each position with its own
    learned embedding ``emb_pos`` [1, T, image_dim]."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        d_in = cfg.image_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(d_in), nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, cfg.dim), nn.LayerNorm(cfg.dim)
        )
        if cfg.model_type == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.image_pos_len, d_in))
        else:
            self.emb_pos = None

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        if self.emb_pos is not None:  # [B, image_pos_len, image_dim]: first and last frame tokens
            n = self.emb_pos.shape[1]
            if clip_tokens.shape[-2] * (clip_tokens.shape[0] if clip_tokens.ndim == 3 else 1) % n:
                raise ValueError(f"FLF2V DiT takes {n} CLIP tokens per sample ({n // 2} per image), got "
                                 f"{tuple(clip_tokens.shape)}: the image encoder does not fit this DiT")
            clip_tokens = clip_tokens.reshape(-1, n, clip_tokens.shape[-1]) + self.emb_pos
        norm0, fc1, act, fc2, norm1 = self.proj
        dtype = fc1.weight.dtype
        y = layer_norm_f32(clip_tokens, norm0.eps, norm0.weight, norm0.bias).to(dtype)
        y = fc2(act(fc1(y)))
        return layer_norm_f32(y, norm1.eps, norm1.weight, norm1.bias).to(dtype)


# --- the model ------------------------------------------------------------------------------------------------

class WanStackArgs(NamedTuple):
    """Per-forward inputs of every block (what block-stack hooks receive as ``args``)."""

    modulation: "torch.Tensor | TokenRuns"  # e: [B, 6, C] float32 time projection (or per-run, Wan2.2 TI2V)
    context: torch.Tensor  # [B, Lt, C] embedded text tokens
    context_img: torch.Tensor | None  # [B, Li, C] embedded CLIP tokens (Wan2.1 I2V / FLF2V)
    rope: Rope
    temb: torch.Tensor  # [B, C] (or [B * R, C] per run) float32 time embedding, before the 6-way projection


def _call_block(block: "WanBlock", tokens: torch.Tensor, a: WanStackArgs) -> torch.Tensor:
    return block(tokens, a.modulation, a.context, a.context_img, a.rope)


def _diffusers_to_wan(key: str) -> str | None:
    return wan_key_from_diffusers(key)


def _wan_to_diffusers(key: str) -> str | None:
    try:
        return dit_key_to_diffusers(key)
    except ValueError:
        return None


# Phases of a block (offload_granularity "phase"): the block's ``modulation`` is read before self_attn runs and stays
# resident; norm3 belongs with the cross-attention it feeds.
WAN_PHASES = (("self_attn", ("self_attn",)), ("cross_attn", ("norm3", "cross_attn")), ("ffn", ("ffn",)))
# Used only before block 0 (the head runs after the blocks).
WAN_EMBEDDINGS = ("patch_embedding", "time_embedding", "time_projection", "text_embedding", "img_emb")


class WanDiT(nn.Module):
    """Wan2.1 DiT. ``forward(x, t, context, clip_tokens=None) -> velocity`` with x: [B, in_dim, F, H, W]."""

    hook_plan = HookPlan(blocks="blocks", phases=WAN_PHASES, embeddings=WAN_EMBEDDINGS, quantize_prefixes=("blocks.",),
                         foreign_to_ours=_diffusers_to_wan, ours_to_foreign=_wan_to_diffusers)

    # Parameters kept in float32 whatever the model dtype (small; they carry the reference's float32 math).
    # time_projection ([6C, C], 0.6 GB for 14B in float32) is stored in the model dtype but computed in float32.
    FLOAT32_PARAMS = ("time_embedding.", "modulation", "norm3.", "img_emb.proj.0.", "img_emb.proj.4.",
                      "img_emb.emb_pos")

    def __init__(self, cfg: WanDiTConfig, attn: AttentionBackend, chunk_tokens: int | None = 8192):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([WanBlock(cfg, attn) for _ in range(cfg.num_layers)])
        self.block_stack = BlockStack(self.blocks, _call_block)  # the hook point of caching / sequence parallel
        self.head = Head(cfg)
        self.img_emb = ImageProjection(cfg) if cfg.has_image_input else None
        self._rope_cache: dict = {}
        self.set_chunk_tokens(chunk_tokens)

    def set_chunk_tokens(self, chunk_tokens: int | None) -> None:
        """Token chunk size for the per-token work inside the blocks (None: whole sequences). The values do not
        depend on it except through the FFN's matrix products, whose row blocks a GEMM may round differently."""
        for block in self.blocks:
            block.chunk_tokens = block.self_attn.chunk_tokens = chunk_tokens

    def set_attention_chunks(self, query_tokens: int | None = 8192, head_group: int | None = None) -> None:
        """Activation memory of the attention layers (the defaults are what a new model has).

        ``query_tokens``: the I2V cross-attention runs over chunks of this many queries and writes its output over
        q (None: whole sequences); 2 fewer [L, C] tensors at the cross-attention peak, no extra memory traffic.
        ``head_group``: lean self-attention (None: off): attention over groups of this many heads, each group's
        output written over its q, and v computed over token chunks (``set_chunk_tokens``) into the modulated
        input's storage; 1 fewer [L, C] tensor at the self-attention peak, for two [L, C] copies per block.
        The values differ from the plain paths only in how kernels block rows (GEMM rows of v, attention queries).
        """
        for name, n in (("query_tokens", query_tokens), ("head_group", head_group)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{name}={n!r} must be a positive integer or None")
        for block in self.blocks:
            block.cross_attn.chunk_tokens = query_tokens
            block.self_attn.head_group = head_group

    @staticmethod
    def is_float32_param(name: str) -> bool:
        return any(p in name for p in WanDiT.FLOAT32_PARAMS)

    def to_inference_dtype(self, dtype: torch.dtype) -> "WanDiT":
        """Cast the bulk of the weights to ``dtype`` and keep the float32 islands in float32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if self.is_float32_param(name) else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def rope(self, grid: tuple[int, int, int], device) -> "Rope":
        key = (grid, str(device))
        if key not in self._rope_cache:
            rot = rope_tables(self.cfg.head_dim, grid, device)
            self._rope_cache = {key: Rope(rot, rot.real.contiguous(), rot.imag.contiguous())}
        return self._rope_cache[key]

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B] -> temb [B, C] and its 6-way projection [B, 6, C], both float32."""
        emb = sinusoidal_embedding(t, self.cfg.freq_dim)
        lin1, act, lin2 = self.time_embedding
        temb = lin2(act(lin1(emb.to(lin1.weight.dtype)))).float()
        proj = self.time_projection[1]
        h, c = F.silu(temb), self.cfg.dim
        # float32 math on the (model-dtype) weight, one sixth at a time: no full float32 copy of it
        e = torch.cat([F.linear(h, proj.weight[i:i + c].float(), proj.bias[i:i + c].float())
                       for i in range(0, proj.out_features, c)], dim=1)
        return temb, e.unflatten(1, (6, -1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """
        x:           [B, in_dim, F, H, W] latents (I2V: noise latents concatenated with the 20 conditioning channels)
        t:           [B] timesteps (0..1000, float); or [B, F] one per latent frame, or [B, L] one per token
                     (constant within a frame), for Wan2.2 TI2V whose conditioning frame is at t = 0
        context:     [B, text_len, text_dim] text embeddings (zero-padded past the prompt)
        clip_tokens: [B, 257, 1280] CLIP image tokens (I2V) / [B, 514, 1280] (FLF2V)
        returns      [B, out_dim, F, H, W] float32 velocity
        """
        cfg = self.cfg
        if cfg.has_image_input and clip_tokens is None:
            raise ValueError(f"this {cfg.model_type} DiT needs clip_tokens")
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        dtype = self.dtype

        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # [B, L, C]
        temb, e = self.embed_timesteps(t, b, grid)
        ctx = self.text_embedding(context.to(dtype))
        ctx_img = self.img_emb(clip_tokens.to(dtype)) if self.img_emb is not None else None
        tokens = self.block_stack(tokens, WanStackArgs(e, ctx, ctx_img, self.rope(grid, x.device), temb))
        return self.unpatchify(self.head(tokens, e if isinstance(e, TokenRuns) else temb), grid)

    def embed_timesteps(self, t: torch.Tensor, b: int, grid: tuple[int, int, int]):
        """(temb [B, C], e [B, 6, C]) for one timestep per sample; for timesteps per frame or token (Wan2.2 TI2V),
        the runs of frames sharing a timestep, as :class:`TokenRuns` in place of e (one run: the plain form)."""
        if t.dim() <= 1:
            return self.embed_time(t.expand(b) if t.numel() == 1 else t)
        f, per_frame = grid[0], grid[1] * grid[2]
        if t.shape == (b, f * per_frame) and per_frame > 1:  # per token: must be constant within each frame
            frames = t.reshape(b, f, per_frame)
            if not torch.equal(frames, frames[:, :, :1].expand_as(frames)):
                raise ValueError("per-token timesteps must be constant within each latent frame")
            t = frames[:, :, 0]
        if t.shape != (b, f):
            raise ValueError(f"timesteps of shape {tuple(t.shape)}: expected [{b}], [{b}, {f}] (per latent frame) "
                             f"or [{b}, {f * per_frame}] (per token)")
        # frames where the timestep changes (for any sample): one device->host transfer, not one per frame
        change = [0] + (t[:, 1:] != t[:, :-1]).any(dim=0).nonzero().flatten().add(1).tolist() + [f]
        if len(change) == 2:
            return self.embed_time(t[:, 0])
        starts = torch.tensor(change[:-1], device=t.device)
        temb, e = self.embed_time(t[:, starts].reshape(-1))  # [B * R, C], [B * R, 6, C]
        r = len(change) - 1
        return temb, TokenRuns(e.unflatten(0, (b, r)), temb.unflatten(0, (b, r)),
                               tuple(i * per_frame for i in change))

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, out_dim * pt * ph * pw] -> [B, out_dim, F, H, W] float32."""
        b = out.shape[0]
        pt, ph, pw = self.cfg.patch_size
        out = out.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, grid[0] * pt, grid[1] * ph, grid[2] * pw).float()
