"""Z-Image's single-stream diffusion transformer (S3-DiT), as plain PyTorch math.

The numerics are those of diffusers' ``ZImageTransformer2DModel`` (0.42.1) for one image per prompt; parameter names
are the release's (diffusers layout), so its checkpoints load without renaming.

Data flow of one forward (B images of one size, captions of one length)::

    latents [B, C, H, W] --patchify--> [B, N, p*p*C] --x_embedder--> [B, N, dim] (+ x_pad_token up to a multiple of 32)
        --noise_refiner (n_refiner_layers blocks, adaLN on t)--> image tokens
    caption [B, Lc, cap_feat_dim] --RMSNorm+Linear--> [B, Lc, dim] (+ cap_pad_token up to a multiple of 32)
        --context_refiner (n_refiner_layers blocks, no adaLN)--> caption tokens
    [image tokens, caption tokens] (ONE sequence) --layers (n_layers blocks, adaLN on t)--> final layer
        --> first N tokens --unpatchify--> [B, C, H, W]

Every block is self-attention over its whole sequence (no mask: one item's tokens, pad tokens included, as the
reference computes a batch of one) plus a SwiGLU feed-forward, each sandwiched between RMSNorms. RoPE is 3-axis:
caption token i sits at (1 + i, 0, 0); image token (h, w) at (Lc_pad + 1, h, w); image pad tokens at (0, 0, 0).

Precision follows the reference: everything runs in the weights' dtype except the RoPE rotation (float32), the RMS
statistics (float32) and the sinusoidal timestep features (float32). Attention goes only through
``lightx2v.ops.attention``; all linears are plain ``nn.Linear`` (the main blocks are the ``nn.ModuleList`` ``layers``)
so quantization, LoRA and offload hooks can reach them from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import UserError
from lightx2v.models.z_image.arch import SEQ_MULTIPLE, TIMESTEP_FREQ_DIM, TIMESTEP_MLP_DIM, ZImageDiTConfig
from lightx2v.ops.attention import AttentionBackend


class RMSNorm(nn.Module):
    """RMS norm over the last dim as diffusers computes it: statistics and scaling in float32, then (for half
    weights) a cast to the weight's dtype before the elementwise weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """t: [B] (already multiplied by t_scale) -> [B, dim] float32 sinusoids, cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope_rotations(pos: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """pos: [L, 3] integer positions -> [L, sum(axes_dims) // 2] complex64 unit rotations.

    Axis ``a`` owns ``axes_dims[a] // 2`` channel pairs with frequencies ``theta ** (-2j / axes_dims[a])``; the angles
    are formed in float64 and rounded to float32 once, as the reference's precomputed tables are.
    """
    parts = []
    for a, d in enumerate(axes_dims):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)  # [d/2]
        angles = (pos[:, a].to(torch.float64)[:, None] * inv[None]).float()  # [L, d/2]
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: [B, L, H, D]; channel pair (2i, 2i+1) is rotated by rot[:, i] ([L, D/2] complex), in float32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, D/2]
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with per-head RMS q/k norms and RoPE (diffusers' names: to_q ... to_out.0)."""

    def __init__(self, dim: int, n_heads: int, qk_norm: bool, attn: AttentionBackend):
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        # the reference builds these with eps 1e-5 whatever norm_eps is
        self.norm_q = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.attn = attn

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim], rot: [L, head_dim/2] complex -> [B, L, dim]."""
        q = self.to_q(x).unflatten(-1, (self.n_heads, -1))  # [B, L, H, D]
        k = self.to_k(x).unflatten(-1, (self.n_heads, -1))
        v = self.to_v(x).unflatten(-1, (self.n_heads, -1))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        out = self.attn(q, k, v)  # [B, L, H, D]
        return self.to_out[0](out.flatten(2).to(q.dtype))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Module):
    """One transformer block. With ``modulation`` (noise refiner, main layers) a linear map of the timestep embedding
    gives per-channel input scales (1 + s) and tanh output gates for the attention and the feed-forward."""

    def __init__(self, cfg: ZImageDiTConfig, attn: AttentionBackend, modulation: bool):
        super().__init__()
        dim = cfg.dim
        self.attention = Attention(dim, cfg.n_heads, cfg.qk_norm, attn)
        self.feed_forward = FeedForward(dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * dim, bias=True))

    def forward(self, x: torch.Tensor, rot: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, dim]; rot: [L, head_dim/2]; temb: [B, adaln_dim] (modulated blocks only) -> [B, L, dim]."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rot))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(temb)[:, None].chunk(4, dim=-1)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        x = x + gate_msa * self.attention_norm2(self.attention(self.attention_norm1(x) * scale_msa, rot))
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by 1 + Linear(silu(temb)), then the projection back to patch values."""

    def __init__(self, dim: int, out_dim: int, adaln_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim, bias=True))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(temb)[:, None]  # [B, 1, dim]
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, TIMESTEP_MLP_DIM, bias=True), nn.SiLU(),
                                 nn.Linear(TIMESTEP_MLP_DIM, out_dim, bias=True))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: [B] scaled timesteps -> [B, out_dim] in the weights' dtype."""
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


def _pad_len(n: int) -> int:
    return (-n) % SEQ_MULTIPLE


class ZImageDiT(nn.Module):
    """The Z-Image transformer. ``forward(latents [B, C, H, W], t [B], caption [B, Lc, cap_feat_dim])`` returns the
    model output [B, C, H, W] (the pipeline negates it into the flow velocity)."""

    def __init__(self, cfg: ZImageDiTConfig, attn: AttentionBackend):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.all_x_embedder = nn.ModuleDict({
            f"{p}-{f}": nn.Linear(f * p * p * cfg.in_channels, dim, bias=True)
            for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size)})
        self.all_final_layer = nn.ModuleDict({
            f"{p}-{f}": FinalLayer(dim, p * p * f * cfg.in_channels, cfg.adaln_dim)
            for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size)})
        self.noise_refiner = nn.ModuleList([ZImageBlock(cfg, attn, modulation=True)
                                            for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([ZImageBlock(cfg, attn, modulation=False)
                                              for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps),
                                          nn.Linear(cfg.cap_feat_dim, dim, bias=True))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList([ZImageBlock(cfg, attn, modulation=True) for _ in range(cfg.n_layers)])

    # -- token bookkeeping -------------------------------------------------------------------------------------

    def check_sizes(self, latent_h: int, latent_w: int, caption_len: int) -> None:
        """UserError unless a latent of latent_h x latent_w and a caption of caption_len tokens fit the model's
        patch size and RoPE tables (``axes_lens``: the reference indexes precomputed tables of that length)."""
        p, (len_c, len_h, len_w) = self.cfg.patch_size, self.cfg.axes_lens
        if latent_h % p or latent_w % p:
            raise UserError(f"latent size {latent_h}x{latent_w} is not a multiple of the patch size {p}")
        cap_pad = caption_len + _pad_len(caption_len)
        if caption_len < 1:
            raise UserError("the caption has no tokens")
        if cap_pad + 1 >= len_c or latent_h // p > len_h or latent_w // p > len_w:
            raise UserError(
                f"{latent_h // p}x{latent_w // p} image tokens with a {caption_len}-token caption exceed the model's "
                f"RoPE range (axes_lens {list(self.cfg.axes_lens)}): use a smaller size or a shorter prompt")

    def positions(self, tokens_h: int, tokens_w: int, caption_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions [N_pad, 3] of the image tokens and [Lc_pad, 3] of the caption tokens (pads included)."""
        cap_pad_len = caption_len + _pad_len(caption_len)
        n = tokens_h * tokens_w
        cap_pos = torch.zeros(cap_pad_len, 3, dtype=torch.int64, device=device)
        cap_pos[:, 0] = torch.arange(1, cap_pad_len + 1, device=device)
        hh, ww = torch.meshgrid(torch.arange(tokens_h, device=device), torch.arange(tokens_w, device=device),
                                indexing="ij")
        img_pos = torch.zeros(n + _pad_len(n), 3, dtype=torch.int64, device=device)
        img_pos[:n, 0] = cap_pad_len + 1
        img_pos[:n, 1] = hh.flatten()
        img_pos[:n, 2] = ww.flatten()
        return img_pos, cap_pos

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], patch values ordered (ph, pw, c) as the reference's."""
        b, c, h, w = latents.shape
        p = self.cfg.patch_size
        x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, (H/p)*(W/p), p*p*C] -> [B, C, H, W]."""
        b, p, c = tokens.shape[0], self.cfg.patch_size, self.cfg.in_channels
        x = tokens.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, t: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """latents: [B, C, H, W] (model dtype); t: [B] in [0, 1] (1 = clean, the reference's ``(1000 - t) / 1000``);
        caption: [B, Lc, cap_feat_dim] text-encoder features -> [B, C, H, W] in the model dtype."""
        b, _, h, w = latents.shape
        lc = caption.shape[1]
        self.check_sizes(h, w, lc)
        p = self.cfg.patch_size
        dev = latents.device
        temb = self.t_embedder(t * self.cfg.t_scale).to(latents.dtype)  # [B, adaln_dim]

        x = self.all_x_embedder[self.cfg.patch_key](self.patchify(latents))  # [B, N, dim]
        n = x.shape[1]
        if _pad_len(n):
            x = torch.cat([x, self.x_pad_token.to(x.dtype).expand(b, _pad_len(n), -1)], dim=1)
        c = self.cap_embedder(caption)  # [B, Lc, dim]
        if _pad_len(lc):
            c = torch.cat([c, self.cap_pad_token.to(c.dtype).expand(b, _pad_len(lc), -1)], dim=1)

        img_pos, cap_pos = self.positions(h // p, w // p, lc, dev)
        rot_x = rope_rotations(img_pos, self.cfg.axes_dims, self.cfg.rope_theta)  # [N_pad, D/2]
        rot_c = rope_rotations(cap_pos, self.cfg.axes_dims, self.cfg.rope_theta)  # [Lc_pad, D/2]

        for block in self.noise_refiner:
            x = block(x, rot_x, temb)
        for block in self.context_refiner:
            c = block(c, rot_c)

        u = torch.cat([x, c], dim=1)  # the single stream: image tokens, then caption tokens
        rot_u = torch.cat([rot_x, rot_c], dim=0)
        for block in self.layers:
            u = block(u, rot_u, temb)
        u = self.all_final_layer[self.cfg.patch_key](u, temb)
        return self.unpatchify(u[:, :n], h, w)
