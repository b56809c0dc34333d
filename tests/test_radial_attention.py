"""radial_attn (lightx2v/ops/attention/radial.py): Radial Attention's block mask as LightX2V builds it, run through
flex_attention.

CPU: the mask against a token-level construction written out here from the rules (per frame pair a full token
mask, placed at its offset, reduced block by block with explicit loops); the BlockMask's block structure; flex
attention against SDPA with the same dense mask (fp32, <= 1e-5) and against attention without the mask (far
apart). GPU (marked ``gpu``): the compiled flex kernel against the masked SDPA.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightx2v.errors import UserError
from lightx2v.ops.attention.radial import (RadialAttention, RadialSettings, TokenGrid, dense_token_mask,
                                           radial_attention_reference, radial_block_mask)

TINY_GRIDS = [
    TokenGrid(6, 10, 20),  # 200 tokens per frame: frames start inside blocks; 1200 tokens, a partial last block
    TokenGrid(8, 16, 16),  # 256 per frame: the diagonal split drops the pairs at distance 5 and 7
    TokenGrid(13, 9, 20),  # 180 per frame, 13 frames: every rule, offsets cycling through the blocks
]


def handwritten_block_mask(frames: int, tpf: int, bs: int = 128, decay: float = 0.2) -> torch.Tensor:
    """The rules of the pattern, token by token (LightX2V's Wan settings: frame 0 is a sink)."""
    n_tok = frames * tpf
    n = math.ceil(n_tok / bs)
    nbf = math.ceil(tpf / bs)
    out = torch.zeros(n, n, dtype=torch.bool)
    r = torch.arange(tpf)[:, None]
    c = torch.arange(tpf)[None, :]
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if j == 0:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                if d == 0:
                    w = tpf
                elif d == 1:
                    w = tpf // 2
                else:
                    w = max(2 ** tpf.bit_length() / 2 ** d.bit_length() * decay, bs)
                decay_len = 2 ** tpf.bit_length() / 2 ** d.bit_length()
                visited = decay_len >= 128 or d % int(128 / decay_len) == 0
                local = ((c - r).abs() <= w) & visited
            ro, co = (i * tpf) % bs, (j * tpf) % bs
            canvas = torch.zeros(nbf * bs + bs, nbf * bs + bs, dtype=torch.bool)
            canvas[ro:ro + tpf, co:co + tpf] = local
            canvas = canvas[:nbf * bs, :nbf * bs]  # the reduction covers ceil(tpf / bs) blocks from the offset
            for bi in range(nbf):
                for bj in range(nbf):
                    block = canvas[bi * bs:(bi + 1) * bs, bj * bs:(bj + 1) * bs]
                    density = [float(block[:, col].sum()) / bs for col in range(bs)]
                    nonzero = sum(x > 0 for x in density)
                    dense = sum(x > 1 / 3 for x in density)
                    if nonzero and dense / nonzero > 0.6:
                        out[(i * tpf) // bs + bi, (j * tpf) // bs + bj] = True
    border = n_tok // bs
    out[border:, :] = True
    out[:, border:] = True
    return out


@pytest.mark.parametrize("grid", TINY_GRIDS, ids=lambda g: f"{g.frames}x{g.height}x{g.width}")
def test_block_mask_matches_handwritten_rules(grid):
    ours = radial_block_mask(grid)
    ref = handwritten_block_mask(grid.frames, grid.tokens_per_frame)
    assert ours.shape == (math.ceil(grid.num_tokens / 128),) * 2
    assert torch.equal(ours, ref)
    assert not ours.all()  # the pattern is sparse somewhere even on these tiny grids


def test_block_mask_properties_and_wan_480p():
    grid = TokenGrid(8, 16, 16)
    m = radial_block_mask(grid)
    assert m.diagonal().all()  # every block sees itself
    assert m[:, :2].all()  # frame 0 (blocks 0, 1) is a sink for every query
    # distances 5 and 7 are dropped by the split, 4 and 6 are not (frame f = blocks 2f, 2f+1)
    assert not m[0, 10:12].any() and not m[0, 14:16].any() and m[0, 8:10].all() and m[0, 12:14].all()
    # without the sink, frame 0 (distance 7 from frame 7) is dropped for frame 7's queries
    no_sink = radial_block_mask(grid, RadialSettings(attention_sink=False))
    assert not no_sink[14, 0:2].any() and m[14, 0:2].all() and no_sink[14, 2:4].all()
    # Wan2.1 480P, 81 frames (21 x 30 x 52 tokens): LightX2V's mask keeps 21329 of 65536 blocks (checked against
    # its gen_log_mask_shrinked on this grid, and at 21 x 45 x 80: 85317 of 349281)
    wan = radial_block_mask(TokenGrid(21, 30, 52))
    assert wan.shape == (256, 256) and int(wan.sum()) == 21329


def test_block_mask_of_flex_equals_table():
    grid = TINY_GRIDS[0]
    ra = RadialAttention()
    table = ra.block_table(grid, "cpu")
    dense_blocks = ra.block_mask(grid, "cpu").to_dense()[0, 0].bool()
    assert torch.equal(dense_blocks, table) and torch.equal(table, radial_block_mask(grid))


@pytest.mark.parametrize("grid", TINY_GRIDS[:2], ids=lambda g: f"{g.frames}x{g.height}x{g.width}")
def test_flex_equals_masked_sdpa_and_differs_from_dense(grid):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, grid.num_tokens, 2, 16, generator=g) for _ in range(3))
    q = q * 2.0  # sharper softmax: masked keys matter more
    out = RadialAttention()(q, k, v, grid)
    ref = radial_attention_reference(q, k, v, grid)
    # the same reference by hand: scores, -inf outside the kept blocks, softmax (float64)
    mask = dense_token_mask(radial_block_mask(grid), grid.num_tokens, 128)
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(16)
    by_hand = torch.einsum("bhlm,bmhd->blhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v.double())
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out.double() - by_hand).abs().max().item() <= 1e-5
    assert (out - dense).abs().max().item() > 1e-2  # the mask changes the result


def test_backend_through_the_entry_point_needs_the_grid():
    from lightx2v.ops.attention import get_attention_backend

    attn = get_attention_backend("radial_attn", dtype=torch.float32, head_dim=16, device="cpu")
    assert attn.name == "radial_attn" and attn.needs_grid and attn.kind == "sparse"
    grid = TokenGrid(6, 10, 20)
    q, k, v = (torch.randn(1, grid.num_tokens, 1, 16) for _ in range(3))
    with pytest.raises(ValueError, match="needs the token grid"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="1200 tokens but the grid 6x10x21"):
        attn(q, k, v, grid=TokenGrid(6, 10, 21))
    with pytest.raises(ValueError, match="self-attention"):
        attn(q, k[:, :600], v[:, :600], grid=grid)
    torch.testing.assert_close(attn(q, k, v, grid=grid), radial_attention_reference(q, k, v, grid), rtol=0, atol=1e-5)


def test_token_grid_checks():
    with pytest.raises(ValueError, match="frames"):
        TokenGrid(0, 2, 2)
    with pytest.raises(ValueError, match="width"):
        TokenGrid(2, 2, 2.0)
    assert TokenGrid(21, 30, 52).num_tokens == 32760 and TokenGrid(21, 30, 52).tokens_per_frame == 1560


def test_radial_on_cuda_needs_head_dim_16():
    from lightx2v.ops.attention import get_attention_backend

    with pytest.raises(UserError, match="head_dim >= 16"):
        get_attention_backend("radial_attn", dtype=torch.bfloat16, head_dim=8, device="cuda")


# --- GPU ----------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled flex_attention)")
@pytest.mark.parametrize("grid,dtype", [(TokenGrid(8, 16, 20), torch.bfloat16), (TokenGrid(6, 10, 20), torch.float32)])
def test_gpu_compiled_flex_matches_masked_sdpa(grid, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, grid.num_tokens, 4, 64, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    out = RadialAttention()(q, k, v, grid)
    ref = radial_attention_reference(q.float(), k.float(), v.float(), grid)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    dense = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    print(f"\nradial flex {grid} {dtype}: rel-L2 vs masked SDPA {err:.2e}, vs unmasked "
          f"{((out.float() - dense).norm() / dense.norm()).item():.2e}")
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert ((out.float() - dense).norm() / dense.norm()).item() > 10 * err
