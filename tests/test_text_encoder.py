"""Wan2.1 text encoder: numerics against diffusers' WanPipeline, both checkpoint layouts, strict loading errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.encoders import (
    WAN_T5_CHECKPOINT,
    WanTextEncoder,
    build_tiny_tokenizer,
    infer_umt5_config,
    load_text_encoder,
    prompt_clean,
    save_text_encoder,
    t5_state_dict_from_wan,
    t5_state_dict_to_wan,
)

transformers = pytest.importorskip("transformers")
from transformers import UMT5Config, UMT5EncoderModel

PROMPTS = ["a cat", "a dog in the rain"]
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_BUCKETS = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny UMT5 encoder with fixed random weights saved in the diffusers layout, and its tokenizer."""
    root = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = build_tiny_tokenizer(root / "tok_src")
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        d_kv=8,
        relative_attention_num_buckets=NUM_BUCKETS,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    model = UMT5EncoderModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # make every norm distinct so a wrong key mapping shows
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    model.requires_grad_(False)
    diffusers_dir = root / "diffusers"
    model.save_pretrained(diffusers_dir / "text_encoder")
    tokenizer.save_pretrained(diffusers_dir / "tokenizer")
    return {"root": root, "model": model, "tokenizer": tokenizer, "diffusers_dir": diffusers_dir}


def _diffusers_embeds(tokenizer, model, prompts, max_length):
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, scheduler=None)
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_length, device=torch.device("cpu"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# prompt cleaning and the tiny tokenizer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  a   cat\n\tin  the rain  ", "a cat in the rain"),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("&amp;lt;b&amp;gt;bold", "<b>bold"),  # unescaped twice
        ("caf\u00c3\u00a9 au lait", "caf\u00e9 au lait"),  # ftfy fixes mojibake
        ("a\u00a0b\u3000c\r\nd", "a b c d"),
        ("", ""),
    ],
)
def test_prompt_clean_cases(text, expected):
    assert prompt_clean(text) == expected


def test_prompt_clean_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_prompt_clean

    texts = [
        "  A cat &amp;amp; a dog\n\n walking  ",
        "x\x1cy\x1fz",
        "\u2028line\u2029sep\x0bvt\x0cff",
        "&quot;quoted&quot; &#39;s &lt;tag&gt;",
        "\u00e2\u0080\u009cmojibake\u00e2\u0080\u009d",
        "\u732b\u5728\u96e8\u4e2d\u3000\u8d70",
    ]
    for t in texts:
        assert prompt_clean(t) == diffusers_prompt_clean(t), repr(t)


def test_prompt_clean_rejects_non_strings():
    with pytest.raises(UserError):
        prompt_clean(None)


def test_tiny_tokenizer(tmp_path, tiny):
    tok = tiny["tokenizer"]
    assert tok.pad_token_id == 0 and tok.pad_token == "<pad>"
    assert tok.eos_token_id == 1 and tok.eos_token == "</s>"
    assert tok.unk_token_id == 2 and tok.unk_token == "<unk>"
    assert 100 <= len(tok) <= 1000
    a, b = tok(PROMPTS).input_ids
    assert a[-1] == 1 and b[-1] == 1 and a != b
    assert tok("\u732b").input_ids[-2] == 2  # unknown character
    assert 0 not in tok("the quick brown fox, 42!").input_ids
    # deterministic: a second build writes identical files
    build_tiny_tokenizer(tmp_path / "again")
    src = tiny["root"] / "tok_src"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (src / name).read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# numerics


def test_encode_matches_diffusers(tiny):
    enc = load_text_encoder(tiny["diffusers_dir"], "diffusers")
    assert isinstance(enc, WanTextEncoder)
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight
    assert not enc.model.training
    out = enc.encode(PROMPTS)
    ref = _diffusers_embeds(tiny["tokenizer"], tiny["model"], PROMPTS, 512)
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-5

    short = enc.encode(PROMPTS, max_length=7)  # truncation of the longer prompt
    ref_short = _diffusers_embeds(tiny["tokenizer"], tiny["model"], PROMPTS, 7)
    assert (short - ref_short).abs().max().item() <= 1e-5


def test_encode_zero_tail_and_distinct_prompts(tiny):
    enc = load_text_encoder(tiny["diffusers_dir"], "diffusers")
    out = enc.encode(PROMPTS, max_length=64)
    lens = [len(tiny["tokenizer"](prompt_clean(p)).input_ids) for p in PROMPTS]
    for row, n in zip(out, lens):
        assert torch.all(row[n:] == 0)
        assert torch.all(row[:n].abs().sum(-1) > 0)
    n = min(lens)
    assert (out[0, :n] - out[1, :n]).abs().max().item() > 1e-2
    assert out.is_inference() and not out.requires_grad
    with pytest.raises(UserError):
        enc.encode([])
    with pytest.raises(UserError):
        enc.encode(PROMPTS, max_length=0)


def _wan_t5_forward(wan_sd, ids, mask, num_heads, num_buckets, max_dist=128, eps=1e-6):
    """Independent float32 forward of Wan's T5 encoder (wan/modules/t5.py semantics) on Wan key names."""

    def rms_norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    def bucket(rel):  # bidirectional buckets: half for each direction, half of those exact, the rest log-spaced
        half = num_buckets // 2
        exact = half // 2
        dist = rel.abs()
        far = (
            exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_dist / exact) * (half - exact)).long()
        )
        return (rel > 0).long() * half + torch.where(dist < exact, dist, far.clamp(max=half - 1))

    batch, length = ids.shape
    x = wan_sd["token_embedding.weight"][ids]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    buckets = bucket(rel)
    layers = 1 + max(int(k.split(".")[1]) for k in wan_sd if k.startswith("blocks."))
    for i in range(layers):
        w = {k[len(f"blocks.{i}.") :]: v for k, v in wan_sd.items() if k.startswith(f"blocks.{i}.")}
        h = rms_norm(x, w["norm1.weight"])
        q, k, v = ((h @ w[f"attn.{n}.weight"].T).view(batch, length, num_heads, -1) for n in ("q", "k", "v"))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)  # no 1/sqrt(d) scaling in T5
        scores = scores + w["pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, -1)
        x = x + attn @ w["attn.o.weight"].T
        h = rms_norm(x, w["norm2.weight"])
        x = x + ((h @ w["ffn.fc1.weight"].T) * gelu_tanh(h @ w["ffn.gate.0.weight"].T)) @ w["ffn.fc2.weight"].T
    return rms_norm(x, wan_sd["norm.weight"])


def test_wan_key_mapping_matches_wan_semantics(tiny):
    model, tok = tiny["model"], tiny["tokenizer"]
    wan_sd = t5_state_dict_to_wan(model.state_dict())
    expected = {"token_embedding.weight", "norm.weight"}
    for i in range(NUM_LAYERS):
        expected |= {
            f"blocks.{i}.{n}.weight"
            for n in (
                "norm1",
                "attn.q",
                "attn.k",
                "attn.v",
                "attn.o",
                "norm2",
                "ffn.gate.0",
                "ffn.fc1",
                "ffn.fc2",
                "pos_embedding.embedding",
            )
        }
    assert set(wan_sd) == expected
    batch = tok(
        [prompt_clean(p) for p in PROMPTS + ["the old man walks slowly along the beach at night, cinematic"]],
        padding="max_length",
        max_length=200,  # relative distances well past max_distance=128
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        ours = model(batch.input_ids, batch.attention_mask).last_hidden_state
    ref = _wan_t5_forward(wan_sd, batch.input_ids, batch.attention_mask, NUM_HEADS, NUM_BUCKETS)
    assert (ours - ref).abs().max().item() <= 1e-5

    back = t5_state_dict_from_wan(wan_sd)
    sd = model.state_dict()
    assert set(back) == set(sd) - {"encoder.embed_tokens.weight"}
    assert all(torch.equal(back[k], sd[k]) for k in back)

    cfg = infer_umt5_config(wan_sd)
    for name in ("vocab_size", "d_model", "d_ff", "d_kv", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(cfg, name) == getattr(model.config, name), name
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    assert cfg.relative_attention_max_distance == 128 and cfg.layer_norm_epsilon == 1e-6


def test_layout_round_trips(tiny, tmp_path):
    enc = load_text_encoder(tiny["diffusers_dir"], "diffusers")
    ref = enc.encode(PROMPTS)

    save_text_encoder(enc, tmp_path / "wan", "wan")
    assert (tmp_path / "wan" / WAN_T5_CHECKPOINT).is_file()
    assert (tmp_path / "wan" / "google" / "umt5-xxl" / "tokenizer.json").is_file()
    wan = load_text_encoder(tmp_path / "wan", "wan")
    assert wan.model.shared.weight is wan.model.encoder.embed_tokens.weight
    assert torch.equal(wan.encode(PROMPTS), ref)

    save_text_encoder(wan, tmp_path / "sharded", "diffusers", max_shard_bytes=8 * 1024)
    te = tmp_path / "sharded" / "text_encoder"
    assert (te / "model.safetensors.index.json").is_file() and len(list(te.glob("model-*-of-*.safetensors"))) > 1
    back = load_text_encoder(tmp_path / "sharded", "diffusers")
    assert torch.equal(back.encode(PROMPTS), ref)

    save_text_encoder(back, tmp_path / "single", "diffusers")
    assert (tmp_path / "single" / "text_encoder" / "model.safetensors").is_file()
    assert torch.equal(load_text_encoder(tmp_path / "single", "diffusers").encode(PROMPTS), ref)


def test_low_precision_dtypes_follow_transformers(tiny):
    for dtype in (torch.bfloat16, torch.float16):
        enc = load_text_encoder(tiny["diffusers_dir"], "diffusers", dtype=dtype)
        hf = UMT5EncoderModel.from_pretrained(tiny["diffusers_dir"] / "text_encoder", dtype=dtype).eval()
        ours = {k: v.dtype for k, v in enc.model.state_dict().items()}
        theirs = {k: v.dtype for k, v in hf.state_dict().items()}
        assert ours == theirs, dtype
        out = enc.encode(PROMPTS, max_length=16)
        assert out.dtype == dtype
        ref = _diffusers_embeds(tiny["tokenizer"], hf, PROMPTS, 16)
        assert torch.equal(out, ref), dtype


def test_dtype_none_keeps_stored_dtype(tiny, tmp_path):
    enc = load_text_encoder(tiny["diffusers_dir"], "diffusers", dtype=torch.bfloat16)
    save_text_encoder(enc, tmp_path / "wan", "wan")
    assert all(v.dtype == torch.bfloat16 for v in torch.load(tmp_path / "wan" / WAN_T5_CHECKPOINT).values())
    kept = load_text_encoder(tmp_path / "wan", "wan", dtype=None)
    assert all(p.dtype == torch.bfloat16 for p in kept.model.parameters())
    save_text_encoder(kept, tmp_path / "diffusers", "diffusers")
    back = load_text_encoder(tmp_path / "diffusers", "diffusers", dtype=None)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.encode(PROMPTS, max_length=16), enc.encode(PROMPTS, max_length=16))


# ----------------------------------------------------------------------------------------------------------------------
# strict loading errors


@pytest.fixture()
def wan_dir(tiny, tmp_path):
    enc = load_text_encoder(tiny["diffusers_dir"], "diffusers")
    save_text_encoder(enc, tmp_path / "wan", "wan")
    return tmp_path / "wan"


def _edit_pth(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def test_wan_missing_and_extra_keys(wan_dir):
    pth = wan_dir / WAN_T5_CHECKPOINT
    _edit_pth(pth, lambda sd: (sd.pop("blocks.1.ffn.fc2.weight"), sd.pop("norm.weight")))
    with pytest.raises(CheckpointError, match=r"missing keys: .*blocks\.1\.ffn\.fc2\.weight") as e:
        load_text_encoder(wan_dir, "wan")
    assert "norm.weight" in str(e.value)

    _edit_pth(pth, lambda sd: sd.update({"blocks.0.extra.weight": torch.zeros(2), "lm_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.extra\.weight") as e:
        load_text_encoder(wan_dir, "wan")
    assert "lm_head.weight" in str(e.value)


def test_wan_shape_mismatch_and_missing_block(wan_dir):
    pth = wan_dir / WAN_T5_CHECKPOINT

    def edit(sd):
        sd["blocks.1.attn.k.weight"] = torch.zeros(16, 32)
        sd["blocks.3.norm1.weight"] = torch.ones(32)  # implies 4 layers: blocks 2 and 3 are then incomplete

    _edit_pth(pth, edit)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(wan_dir, "wan")
    msg = str(e.value)
    assert "blocks.1.attn.k.weight checkpoint (16, 32) vs model (32, 32)" in msg
    assert "blocks.2.attn.q.weight" in msg and "blocks.3.ffn.fc1.weight" in msg


def test_wan_missing_files(wan_dir):
    shutil.rmtree(wan_dir / "google")
    with pytest.raises(CheckpointError, match="umt5-xxl"):
        load_text_encoder(wan_dir, "wan")
    (wan_dir / WAN_T5_CHECKPOINT).unlink()
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(wan_dir, "wan")
    assert str(wan_dir / WAN_T5_CHECKPOINT) in str(e.value) and str(wan_dir / "google" / "umt5-xxl") in str(e.value)


def test_diffusers_missing_extra_and_mismatched_keys(tiny, tmp_path):
    d = _copy(tiny["diffusers_dir"], tmp_path / "d")
    st = d / "text_encoder" / "model.safetensors"
    sd = load_file(st)
    key_missing = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    sd.pop(key_missing)
    sd["encoder.block.0.layer.9.bogus.weight"] = torch.zeros(3)
    sd["encoder.final_layer_norm.weight"] = torch.ones(31)
    save_file(sd, st)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(d, "diffusers")
    msg = str(e.value)
    assert "missing keys: " + key_missing in msg
    assert "unexpected keys: encoder.block.0.layer.9.bogus.weight" in msg
    assert "encoder.final_layer_norm.weight checkpoint (31,) vs model (32,)" in msg


def test_diffusers_tied_embedding_variants(tiny, tmp_path):
    d = _copy(tiny["diffusers_dir"], tmp_path / "d")
    st = d / "text_encoder" / "model.safetensors"
    sd = load_file(st)
    shared = sd.pop("shared.weight")
    save_file({**sd, "encoder.embed_tokens.weight": shared}, st)  # only the tied name
    ref = load_text_encoder(tiny["diffusers_dir"], "diffusers").encode(PROMPTS)
    assert torch.equal(load_text_encoder(d, "diffusers").encode(PROMPTS), ref)
    save_file({**sd, "shared.weight": shared, "encoder.embed_tokens.weight": shared.clone()}, st)  # both, equal
    assert torch.equal(load_text_encoder(d, "diffusers").encode(PROMPTS), ref)
    save_file({**sd, "shared.weight": shared, "encoder.embed_tokens.weight": shared + 1}, st)  # both, different
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight"):
        load_text_encoder(d, "diffusers")


def test_diffusers_missing_files(tiny, tmp_path):
    d = _copy(tiny["diffusers_dir"], tmp_path / "d")
    shutil.rmtree(d / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_text_encoder(d, "diffusers")
    (d / "text_encoder" / "config.json").unlink()
    (d / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(d, "diffusers")
    for name in ("tokenizer", "text_encoder/config.json", "text_encoder/model.safetensors"):
        assert str(d / name) in str(e.value), name
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_encoder(tmp_path / "nowhere", "diffusers")
    with pytest.raises(UserError, match="layout"):
        load_text_encoder(d, "original")


def test_unreadable_files(wan_dir, tiny, tmp_path):
    (wan_dir / WAN_T5_CHECKPOINT).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_text_encoder(wan_dir, "wan")
    d = _copy(tiny["diffusers_dir"], tmp_path / "d")
    (d / "text_encoder" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file, it is corrupt "
                                              "or incomplete"):
        load_text_encoder(d, "diffusers")


def test_diffusers_missing_shard(tiny, tmp_path):
    enc = load_text_encoder(tiny["diffusers_dir"], "diffusers")
    save_text_encoder(enc, tmp_path / "s", "diffusers", max_shard_bytes=8 * 1024)
    te = tmp_path / "s" / "text_encoder"
    index = json.loads((te / "model.safetensors.index.json").read_text())
    victim = max(index["weight_map"].values())
    (te / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_text_encoder(tmp_path / "s", "diffusers")
