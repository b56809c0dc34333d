"""``radial_attn``: the block-sparse pattern of Radial Attention (Li et al., 2025), as LightX2V configures it.

Video tokens attend densely within their own frame, and to other frames through a band whose width shrinks
(exponentially) with the frame distance; the pattern is decided per 128 x 128 block of the attention matrix
and is the same for every head, batch element, layer and step. LightX2V (``radial_attn`` in
``lightx2v/common/ops/attn/radial_attn.py``, Wan settings) builds it from the token grid like this, and so do we:

* ``tpf`` tokens per frame, ``F`` frames (LightX2V: ``F = ((target_video_length - 1) // vae_stride[0] + 1) //
  patch_size[0]``, ``tpf = seq_len // F``; here both come from the :class:`TokenGrid` of the patchified latent).
* For query frame ``i`` and key frame ``j`` (distance ``d = |i - j|``) a token-level mask over the two frames'
  local token indices ``r, c``:

  - ``j == 0``: all ones (the first frame is an attention sink for every query; LightX2V's ``model_type="wan"``);
  - else ``|c - r| <= w(d)`` with ``w(0) = tpf``, ``w(1) = tpf // 2``, and for ``d >= 2``
    ``w = max(2**bitlen(tpf) / 2**bitlen(d) * decay_factor, 128)`` (``decay_factor = 0.2``);
  - and, for ``d >= 1``, the whole pair is dropped unless ``d % s == 0`` where ``s = 128 / (2**bitlen(tpf) /
    2**bitlen(d))`` once that decay length falls under 128 (a diagonal "split": far frames are visited sparsely).

* Each pair's mask is placed at the frames' offset modulo 128 and reduced to 128 x 128 blocks ("shrink"): a block
  is kept when more than 60 % of its non-empty columns have a density above 1/3. Blocks of all pairs are OR-ed.
* The partial last block row and column (``seq_len % 128 != 0``) are dense.

A query token then attends to exactly the keys in its kept blocks (``kept[q // 128, k // 128]``). LightX2V has no
dense first layers or steps for ``radial_attn`` (every self-attention of every step uses the mask), and no
config key beyond ``self_attn_1_type: "radial_attn"``; the block size (128) and decay factor (0.2) are fixed in
its code. We run the mask through PyTorch's ``flex_attention`` with a :class:`BlockMask` of whole blocks
(compiled on CUDA; eager, i.e. materialised scores, on the CPU), and keep :func:`radial_attention_reference`
(SDPA with the dense boolean mask) as the plain reference.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenGrid:
    """Layout of a video's tokens after patchify: ``frames x height x width``, token index
    ``(f * height + y) * width + x`` (the order of the DiT's flatten). Self-attention over such a sequence has
    ``num_tokens`` queries and keys."""

    frames: int
    height: int
    width: int

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"TokenGrid.{name} must be a positive integer, got {n!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.tokens_per_frame


@dataclass(frozen=True)
class RadialSettings:
    """LightX2V's fixed Wan settings (not exposed as config keys there)."""

    block_size: int = 128  # also the floor of the band width and the split threshold (hard-coded 128 there)
    decay_factor: float = 0.2
    attention_sink: bool = True  # every query attends to all of frame 0

    def __post_init__(self):
        if self.block_size < 1 or self.decay_factor <= 0:
            raise ValueError(f"bad RadialSettings {self}")


# --- the mask ----------------------------------------------------------------------------------------------------

def band_width(dist: int, tokens_per_frame: int, s: RadialSettings) -> float:
    """Half-width of the token band between two frames ``dist`` apart (before flooring)."""
    if dist == 0:
        return float(tokens_per_frame)
    if dist == 1:
        return float(tokens_per_frame // 2)
    decay = 2 ** tokens_per_frame.bit_length() / 2 ** dist.bit_length() * s.decay_factor
    return max(decay, float(s.block_size))


def pair_kept(dist: int, tokens_per_frame: int, s: RadialSettings) -> bool:
    """The diagonal split: is the frame pair at this distance visited at all (sink aside)?"""
    decay = 2 ** tokens_per_frame.bit_length() / 2 ** dist.bit_length()
    if decay >= s.block_size:
        return True
    return dist % int(s.block_size / decay) == 0


def _pair_blocks(width: int | None, rem_r: int, rem_c: int, tpf: int, bs: int) -> torch.Tensor:
    """Block mask [nb, nb] of one frame pair whose token mask is ``|c - r| <= width`` (``width=None``: all ones),
    placed at row/column offsets ``rem_r``/``rem_c`` inside its first block and cut at ``nb * bs`` (nb =
    ceil(tpf / bs)). Column counts come from interval arithmetic instead of a [tpf, tpf] mask."""
    nb = -(-tpf // bs)
    cl = torch.arange(nb * bs) - rem_c  # local key index of each padded column
    col_ok = (cl >= 0) & (cl < tpf)
    bi = torch.arange(nb)
    r_lo = (bi * bs - rem_r).clamp(min=0)[:, None]  # local query rows of block row bi: [r_lo, r_hi]
    r_hi = ((bi + 1) * bs - 1 - rem_r).clamp(max=tpf - 1)[:, None]
    if width is None:
        lo, hi = r_lo, r_hi
    else:
        lo = torch.maximum(r_lo, cl[None, :] - width)
        hi = torch.minimum(r_hi, cl[None, :] + width)
    count = ((hi - lo + 1).clamp(min=0) * col_ok[None, :]).view(nb, nb, bs)  # rows kept per column
    nonzero = (count > 0).sum(-1)
    dense = (3 * count > bs).sum(-1)  # column density > 1/3
    return 5 * dense > 3 * nonzero  # more than 60 % of the non-empty columns are dense


def radial_block_mask(grid: TokenGrid, settings: RadialSettings = RadialSettings()) -> torch.Tensor:
    """Kept blocks, bool [n, n] with n = ceil(num_tokens / block_size) (CPU)."""
    bs = settings.block_size
    n_tok, frames, tpf = grid.num_tokens, grid.frames, grid.tokens_per_frame
    n = -(-n_tok // bs)
    nb = -(-tpf // bs)
    mask = torch.zeros(n, n, dtype=torch.bool)
    cache: dict = {}
    for i in range(frames):
        for j in range(frames):
            if j == 0 and settings.attention_sink:
                width = None
            else:
                dist = abs(i - j)
                if not pair_kept(dist, tpf, settings):
                    continue
                width = math.floor(band_width(dist, tpf, settings))
                if width >= tpf - 1:
                    width = None  # the band covers the pair
            rem_r, rem_c = (i * tpf) % bs, (j * tpf) % bs
            key = (width, rem_r, rem_c)
            blocks = cache.get(key)
            if blocks is None:
                blocks = cache[key] = _pair_blocks(width, rem_r, rem_c, tpf, bs)
            r0, c0 = (i * tpf) // bs, (j * tpf) // bs
            mask[r0:r0 + nb, c0:c0 + nb] |= blocks
    border = n_tok // bs  # the partial last block row / column is dense
    mask[border:, :] = True
    mask[:, border:] = True
    return mask


def dense_token_mask(block_mask: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """bool [num_tokens, num_tokens]: query i may attend to key j."""
    return block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:num_tokens, :num_tokens]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid) -> None:
    if not isinstance(grid, TokenGrid):
        raise TypeError(f"radial_attn needs the token grid (a TokenGrid), got {type(grid).__name__}")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"radial_attn is self-attention over [B, L, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] != grid.num_tokens:
        raise ValueError(f"radial_attn: {q.shape[1]} tokens but the grid {grid.frames}x{grid.height}x{grid.width} "
                         f"has {grid.num_tokens}")


def radial_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid,
                               settings: RadialSettings = RadialSettings()) -> torch.Tensor:
    """SDPA with the dense boolean mask (memory: num_tokens^2 bytes). [B, L, H, D] -> [B, L, H, D]."""
    _check(q, k, v, grid)
    m = dense_token_mask(radial_block_mask(grid, settings), grid.num_tokens, settings.block_size).to(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m)
    return out.transpose(1, 2)


# --- the backend -------------------------------------------------------------------------------------------------

class RadialAttention:
    """Callable ``(q, k, v, grid) -> out`` for q/k/v ``[B, L, H, D]`` (self-attention, L = grid.num_tokens).

    Keeps the block masks it has built (one per grid and device) and, on CUDA, one compiled ``flex_attention``.
    """

    def __init__(self, settings: RadialSettings = RadialSettings()):
        self.settings = settings
        self._masks: dict = {}
        self._compiled = None
        self._lock = threading.Lock()

    def block_table(self, grid: TokenGrid, device: torch.device) -> torch.Tensor:
        return self._entry(grid, torch.device(device))[0]

    def block_mask(self, grid: TokenGrid, device: torch.device):
        """The flex_attention BlockMask (every kept block a full block; mask_mod = the same table)."""
        return self._entry(grid, torch.device(device))[1]

    def _entry(self, grid: TokenGrid, device: torch.device):
        key = (grid, str(device))
        entry = self._masks.get(key)
        if entry is None:
            from torch.nn.attention.flex_attention import BlockMask

            bs = self.settings.block_size
            table = radial_block_mask(grid, self.settings).to(device)
            counts = table.sum(-1, dtype=torch.int32)
            order = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # kept first

            def mask_mod(b, h, q_idx, kv_idx):
                return table[q_idx // bs, kv_idx // bs]

            bm = BlockMask.from_kv_blocks(torch.zeros_like(counts)[None, None], order[None, None],
                                          counts[None, None], order[None, None], BLOCK_SIZE=bs,
                                          mask_mod=mask_mod, seq_lengths=(grid.num_tokens, grid.num_tokens))
            entry = self._masks[key] = (table, bm)
        return entry

    def _flex(self, device: torch.device):
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda":
            return flex_attention
        with self._lock:
            if self._compiled is None:
                self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        from lightx2v.ops.attention._opaque import opaque

        # mask caching is Python; flex_attention is compiled on its own: inside a compiled block, one opaque call
        return opaque(self._forward, q, k, v, grid)

    def _forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        _check(q, k, v, grid)
        bm = self.block_mask(grid, q.device)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        fn = self._flex(q.device)
        if q.device.type == "cuda":
            out = fn(qt, kt, vt, block_mask=bm)
        else:
            with warnings.catch_warnings():  # eager flex on the CPU says it is unfused: we know
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                out = fn(qt, kt, vt, block_mask=bm)
        return out.transpose(1, 2)

    def sparsity(self, grid: TokenGrid) -> float:
        """Fraction of the attention matrix's blocks that are skipped."""
        t = radial_block_mask(grid, self.settings)
        return 1.0 - t.float().mean().item()
