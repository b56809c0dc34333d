"""Our Wan DiT against diffusers' WanTransformer3DModel, tiny random weights, CPU float32."""

import json

import pytest
import torch

from lightx2v.errors import CheckpointError
from lightx2v.models.wan.checkpoint import dit_key_from_diffusers, dit_key_to_diffusers, load_dit, save_dit
from lightx2v.ops.attention import get_attention_backend

diffusers = pytest.importorskip("diffusers")

SDPA = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=8, device=torch.device("cpu"))


def tiny_diffusers_dit(image: bool = False, flf: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=36 if image else 16,
              out_channels=16, text_dim=32, freq_dim=64, ffn_dim=96, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    if image:
        kw.update(image_dim=40, added_kv_proj_dim=48, pos_embed_seq_len=2 * 257 if flf else None)
    model = diffusers.WanTransformer3DModel(**kw).eval()
    with torch.no_grad():  # randomise everything, norms and modulation tables included
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if "norm" in name and "weight" in name else 0))
        # Among 512 mostly zero-padded text tokens a random model barely hears the prompt: make cross-attention
        # keys on real tokens large so that the prompt matters (and the prompt-sensitivity check means something).
        for block in model.blocks:
            block.attn2.norm_k.weight.mul_(4.0)
            block.attn2.to_out[0].weight.mul_(4.0)
    return model


def _inputs(image=False, flf=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36 if image else 16, 3, 8, 12, generator=g)
    t = torch.tensor([637.25])
    ctx = torch.randn(1, 512, 32, generator=g)
    ctx[:, 7:] = 0  # zero-padded past the prompt, as the text encoder gives it
    clip = torch.randn(1, 514 if flf else 257, 40, generator=g) if image else None
    return x, t, ctx, clip


def _ours_from(model, tmp_path, layout="diffusers"):
    if layout == "diffusers":
        model.save_pretrained(tmp_path / "transformer")
    return load_dit(tmp_path, layout, attn=SDPA)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", ["t2v", "i2v", "flf2v"])
def test_dit_matches_diffusers(tmp_path, variant):
    image, flf = variant != "t2v", variant == "flf2v"
    ref = tiny_diffusers_dit(image, flf)
    ours = _ours_from(ref, tmp_path)
    assert ours.cfg.model_type == variant
    x, t, ctx, clip = _inputs(image, flf)
    with torch.no_grad():
        ref_clip = clip.reshape(-1, 257, clip.shape[-1]) if flf else clip  # diffusers: first and last as a batch
        want = ref(x, t, ctx, encoder_hidden_states_image=ref_clip, return_dict=False)[0]
        got = ours(x, t, ctx, clip)
    assert _rel(got, want) <= 1e-4
    # The test can fail: another timestep or another prompt moves the output far beyond the tolerance.
    with torch.no_grad():
        other_t = ours(x, torch.tensor([100.0]), ctx, clip)
        ctx2 = ctx.clone()
        ctx2[:, :7] = torch.randn(1, 7, 32)
        other_ctx = ours(x, t, ctx2, clip)
    assert _rel(other_t, want) > 1e-2
    assert _rel(other_ctx, want) > 1e-2


def test_dit_roundtrip_wan_layout(tmp_path):
    ref = tiny_diffusers_dit(image=True)
    ours = _ours_from(ref, tmp_path / "d")
    save_dit(ours.state_dict(), ours.cfg, tmp_path / "w", "wan")
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["model_type"] == "i2v" and cfg["in_dim"] == 36
    again = load_dit(tmp_path / "w", "wan", attn=SDPA)
    x, t, ctx, clip = _inputs(image=True)
    with torch.no_grad():
        # same weights bit for bit; CPU GEMMs may sum in another order for other buffer alignments
        assert _rel(again(x, t, ctx, clip), ours(x, t, ctx, clip)) <= 1e-5
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # wan -> diffusers -> wan key names are a bijection on the real key set
    for k in ours.state_dict():
        assert dit_key_from_diffusers(dit_key_to_diffusers(k)) == k
    assert set(map(dit_key_to_diffusers, ours.state_dict())) == set(ref.state_dict())


def test_dit_strict_loading_names_bad_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = tiny_diffusers_dit()
    ref.save_pretrained(tmp_path / "transformer")
    f = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd.pop("blocks.1.attn1.to_q.weight")
    sd["blocks.0.attn1.extra.weight"] = torch.zeros(2)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError) as e:
        load_dit(tmp_path, "diffusers", attn=SDPA)
    assert "blocks.1.self_attn.q.weight" in str(e.value)  # missing, by our name
    sd.pop("blocks.0.attn1.extra.weight")
    sd["blocks.1.attn1.to_q.weight"] = torch.zeros(3, 3)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="shape mismatches.*blocks.1.self_attn.q.weight"):
        load_dit(tmp_path, "diffusers", attn=SDPA)


def test_dit_bf16_keeps_float32_islands(tmp_path):
    ours = _ours_from(tiny_diffusers_dit(), tmp_path)
    ours.to_inference_dtype(torch.bfloat16)
    assert ours.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert ours.blocks[0].modulation.dtype == torch.float32
    assert ours.time_embedding[0].weight.dtype == torch.float32
    x, t, ctx, _ = _inputs()
    with torch.no_grad():
        out = ours(x, t, ctx)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_token_chunking_gives_the_same_values(tmp_path):
    ours = _ours_from(tiny_diffusers_dit(image=True), tmp_path)
    x, t, ctx, clip = _inputs(image=True)  # 3 x 4 x 6 = 72 tokens
    with torch.no_grad():
        ours.set_chunk_tokens(None)
        whole = ours(x, t, ctx, clip)
        ours.set_chunk_tokens(10)  # 8 chunks, the last one ragged
        chunked = ours(x, t, ctx, clip)
    assert _rel(chunked, whole) <= 1e-6
