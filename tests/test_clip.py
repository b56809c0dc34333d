"""Wan2.1 CLIP image encoder: numerics against diffusers' WanImageToVideoPipeline.encode_image, both checkpoint
layouts (with an own re-implementation of Wan's VisionTransformer as a check of the key mapping), strict loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.wan.clip import (
    OPENCLIP_MEAN,
    OPENCLIP_STD,
    WAN_CLIP_CHECKPOINT,
    WanImageEncoder,
    build_tiny_clip,
    clip_state_dict_from_wan,
    clip_state_dict_to_wan,
    infer_clip_vision_config,
    load_image_encoder,
    openclip_image_processor,
    save_image_encoder,
)

transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

HIDDEN, HEADS, LAYERS, MLP, PATCH, SIZE = 160, 2, 3, 320, 14, 224
TOKENS = (SIZE // PATCH) ** 2 + 1
TOL = 1e-5

# What the released Wan2.1-I2V diffusers image_processor/preprocessor_config.json holds (laion/CLIP-ViT-H-14's, old
# feature-extractor style with integer sizes).
PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENCLIP_MEAN),
    "image_std": list(OPENCLIP_STD),
    "resample": 3,
    "size": 224,
}


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, size=(180, 320, 3), dtype=np.uint8))  # non-square, landscape
    y, x = np.mgrid[0:250, 0:210]
    grad = np.stack([x * 255 / 209, y * 255 / 249, (x + y) * 255 / 458], axis=-1).astype(np.uint8)
    return [noise, Image.fromarray(grad, mode="RGB")]  # second: portrait RGB gradient


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIPVisionModel with fixed random weights and the Wan processor, saved in the diffusers layout."""
    root = tmp_path_factory.mktemp("tiny_clip")
    config = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=SIZE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
    )
    model = CLIPVisionModel(config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):  # distinct norms so a wrong mapping shows
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.requires_grad_(False)
    model_dir = root / "diffusers"
    model.save_pretrained(model_dir / "image_encoder")
    (model_dir / "image_processor").mkdir(parents=True)
    (model_dir / "image_processor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    return {"root": root, "model_dir": model_dir}


def _diffusers_encode(model_dir, images):
    """diffusers' WanImageToVideoPipeline.encode_image with the encoder and processor loaded as diffusers does."""
    from diffusers import WanImageToVideoPipeline

    encoder = CLIPVisionModel.from_pretrained(model_dir / "image_encoder", torch_dtype=torch.float32).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir / "image_processor")
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                   image_processor=processor, image_encoder=encoder)
    with torch.no_grad():
        return pipe.encode_image(images, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(tiny):
    return _diffusers_encode(tiny["model_dir"], _images())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# numerics


def test_encode_matches_diffusers(tiny, reference):
    enc = load_image_encoder(tiny["model_dir"], "diffusers")
    assert isinstance(enc, WanImageEncoder) and enc.truncated
    assert len(enc.model.encoder.layers) == LAYERS - 1
    out = enc.encode(_images())
    assert out.shape == (2, TOKENS, HIDDEN) == reference.shape
    assert out.dtype == torch.float32 and not out.requires_grad
    diff = (out - reference).abs().max().item()
    assert diff <= TOL, diff
    assert torch.equal(out, reference)  # same ops in the same order on CPU
    full = load_image_encoder(tiny["model_dir"], "diffusers", keep_last_layer=True)
    assert not full.truncated and len(full.model.encoder.layers) == LAYERS
    assert torch.equal(full.encode(_images()), reference)


def test_penultimate_hidden_state_is_truncated_last_hidden_state(tiny):
    """CLIP's post_layernorm only touches the pooled output: hidden_states[-2] == last_hidden_state without the last
    layer, exactly."""
    model = CLIPVisionModel.from_pretrained(tiny["model_dir"] / "image_encoder").eval()
    pixels = openclip_image_processor()(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        assert len(out.hidden_states) == LAYERS + 1
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
        model.encoder.layers = model.encoder.layers[:-1]
        truncated = model(pixel_values=pixels).last_hidden_state
    assert torch.equal(truncated, out.hidden_states[-2])
    assert (out.hidden_states[-1] - out.hidden_states[-2]).abs().max() > 0.1  # the last layer does change things


def test_different_images_give_different_tokens(tiny, reference):
    enc = load_image_encoder(tiny["model_dir"], "diffusers")
    a, b = enc.encode(_images())
    assert (a - b).abs().mean() > 1e4 * TOL
    single = enc.encode(_images()[1])  # a lone image is accepted too
    assert single.shape == (1, TOKENS, HIDDEN)
    assert (single[0] - reference[1]).abs().max() <= TOL


def test_processor_of_wan_layout_equals_released_diffusers_one(tiny):
    released = CLIPImageProcessor.from_pretrained(tiny["model_dir"] / "image_processor")
    ours = openclip_image_processor(SIZE)
    for image in [*_images(), _images()[1].convert("L"), _images()[0].convert("RGBA")]:
        a = released(images=[image], return_tensors="pt")["pixel_values"]
        b = ours(images=[image], return_tensors="pt")["pixel_values"]
        assert a.shape == (1, 3, SIZE, SIZE)
        assert torch.equal(a, b)


def test_dtype_device_and_to(tiny, reference):
    enc = load_image_encoder(tiny["model_dir"], "diffusers", dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.device == torch.device("cpu")
    out = enc.encode(_images(), device="cpu")
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.1
    enc.to("cpu", torch.float32)
    assert enc.dtype == torch.float32
    assert (enc.encode(_images()) - reference).abs().max() < 0.1  # weights were rounded to bf16 once


def test_encode_rejects_bad_input(tiny):
    enc = load_image_encoder(tiny["model_dir"], "diffusers")
    with pytest.raises(UserError, match="at least one image"):
        enc.encode([])
    with pytest.raises(UserError, match=r"#1: ndarray"):
        enc.encode([_images()[0], np.zeros((4, 4, 3), np.uint8)])


# ----------------------------------------------------------------------------------------------------------------------
# the Wan layout


def _wan_visual_forward(wan_sd, pixels, num_heads, eps=1e-5):
    """Wan's VisionTransformer (pool 'token', pre_norm, exact GELU) run with ``use_31_block=True``, from Wan's keys.

    Written from Wan's module structure: conv patch embedding without bias, class token, position embedding, pre_norm,
    blocks x + attn(norm1(x)) with a fused to_qkv viewed as (3, heads, head_dim), x + mlp(norm2(x)) with mlp.0 / mlp.2,
    all blocks but the last.
    """

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], wan_sd[f"{name}.weight"], wan_sd[f"{name}.bias"], eps)

    def linear(x, name):
        return F.linear(x, wan_sd[f"{name}.weight"], wan_sd[f"{name}.bias"])

    w = wan_sd["visual.patch_embedding.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([wan_sd["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1)
    x = ln(x + wan_sd["visual.pos_embedding"], "visual.pre_norm")
    layers = 1 + max(int(k.split(".")[2]) for k in wan_sd if k.startswith("visual.transformer."))
    for i in range(layers - 1):
        p = f"visual.transformer.{i}"
        b, s, c = x.shape
        q, k, v = linear(ln(x, f"{p}.norm1"), f"{p}.attn.to_qkv").view(b, s, 3, num_heads, -1).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + linear(a.transpose(1, 2).reshape(b, s, c), f"{p}.attn.proj")
        x = x + linear(F.gelu(linear(ln(x, f"{p}.norm2"), f"{p}.mlp.0")), f"{p}.mlp.2")
    return x


def _synthetic_wan_file(tiny, name="wan_full"):
    """The tiny encoder as a full Wan XLMRobertaCLIP file: visual tower + text tower keys, log_scale, visual.head."""
    model = CLIPVisionModel.from_pretrained(tiny["model_dir"] / "image_encoder")
    wan_sd = clip_state_dict_to_wan(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    extras = {
        "visual.head": torch.randn(HIDDEN, 32, generator=gen),
        "textual.token_embedding.weight": torch.randn(50, 16, generator=gen),
        "textual.blocks.0.attn.q.weight": torch.randn(16, 16, generator=gen),
        "textual.head.0.weight": torch.randn(24, 16, generator=gen),
        "log_scale": torch.tensor(4.6052),
    }
    folder = tiny["root"] / name
    folder.mkdir(exist_ok=True)
    torch.save({**wan_sd, **extras}, folder / WAN_CLIP_CHECKPOINT)
    return folder, wan_sd


def test_wan_key_names(tiny):
    """The converted names are Wan's (spelled out here independently of the module's tables)."""
    model = CLIPVisionModel.from_pretrained(tiny["model_dir"] / "image_encoder")
    hf = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    wan = clip_state_dict_to_wan(model.state_dict())
    expected = {"visual.patch_embedding.weight", "visual.cls_embedding", "visual.pos_embedding"}
    expected |= {f"visual.{n}.{t}" for n in ("pre_norm", "post_norm") for t in ("weight", "bias")}
    for i in range(LAYERS):
        for n in ("norm1", "attn.to_qkv", "attn.proj", "norm2", "mlp.0", "mlp.2"):
            expected |= {f"visual.transformer.{i}.{n}.weight", f"visual.transformer.{i}.{n}.bias"}
    assert set(wan) == expected
    assert wan["visual.cls_embedding"].shape == (1, 1, HIDDEN)
    assert wan["visual.pos_embedding"].shape == (1, TOKENS, HIDDEN)
    assert "visual.patch_embedding.bias" not in wan
    qkv = wan["visual.transformer.1.attn.to_qkv.weight"]
    assert qkv.shape == (3 * HIDDEN, HIDDEN)
    for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(qkv[j * HIDDEN : (j + 1) * HIDDEN], hf[f"encoder.layers.1.self_attn.{n}.weight"])
        assert torch.equal(wan["visual.transformer.1.attn.to_qkv.bias"][j * HIDDEN : (j + 1) * HIDDEN],
                           hf[f"encoder.layers.1.self_attn.{n}.bias"])
    assert torch.equal(wan["visual.transformer.2.mlp.0.weight"], hf["encoder.layers.2.mlp.fc1.weight"])
    assert torch.equal(wan["visual.post_norm.bias"], hf["post_layernorm.bias"])
    back = clip_state_dict_from_wan(wan)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_wan_layout_runs_like_wans_vision_transformer(tiny, reference):
    folder, wan_sd = _synthetic_wan_file(tiny)
    enc = load_image_encoder(folder, "wan")
    pixels = openclip_image_processor()(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        wan_out = _wan_visual_forward(wan_sd, pixels, num_heads=HIDDEN // 80)
    out = enc.encode(_images())
    assert (out - wan_out).abs().max() <= TOL
    assert torch.equal(out, reference)


def test_infer_config_from_wan_shapes(tiny):
    _, wan_sd = _synthetic_wan_file(tiny)
    cfg = infer_clip_vision_config(wan_sd)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (
        HIDDEN, MLP, LAYERS, HIDDEN // 80)
    assert (cfg.patch_size, cfg.image_size, cfg.num_channels) == (PATCH, SIZE, 3)
    assert cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-5
    bad = dict(wan_sd)
    bad["visual.cls_embedding"] = torch.zeros(1, 1, 96)
    bad["visual.pos_embedding"] = torch.zeros(1, TOKENS, 96)
    bad["visual.patch_embedding.weight"] = torch.zeros(96, 3, PATCH, PATCH)
    bad["visual.transformer.0.mlp.0.weight"] = torch.zeros(MLP, 96)
    with pytest.raises(CheckpointError, match="not a multiple of the ViT-H/14 head size 80"):
        infer_clip_vision_config(bad)
    bad = dict(wan_sd)
    bad["visual.pos_embedding"] = torch.zeros(1, 200, HIDDEN)
    with pytest.raises(CheckpointError, match="not a square grid"):
        infer_clip_vision_config(bad)


def test_convert_diffusers_wan_diffusers_identical(tiny, reference, tmp_path):
    enc = load_image_encoder(tiny["model_dir"], "diffusers", dtype=None, keep_last_layer=True)
    with pytest.raises(UserError, match="keep_last_layer=True"):
        save_image_encoder(load_image_encoder(tiny["model_dir"], "diffusers"), tmp_path / "x", "wan")
    save_image_encoder(enc, tmp_path / "wan", "wan")
    stored = torch.load(tmp_path / "wan" / WAN_CLIP_CHECKPOINT, weights_only=True)
    assert all(k.startswith("visual.") for k in stored)  # the visual tower only
    assert "visual.transformer.0.attn.to_qkv.weight" in stored
    wan_enc = load_image_encoder(tmp_path / "wan", "wan", dtype=None, keep_last_layer=True)
    assert torch.equal(wan_enc.encode(_images()), reference)
    save_image_encoder(wan_enc, tmp_path / "back", "diffusers")
    files = load_file(tmp_path / "back" / "image_encoder" / "model.safetensors")
    assert all(k.startswith("vision_model.") for k in files)
    back = load_image_encoder(tmp_path / "back", "diffusers")
    assert torch.equal(back.encode(_images()), reference)
    # what we write is what diffusers / transformers read
    assert torch.equal(_diffusers_encode(tmp_path / "back", _images()), reference)
    original = load_file(tiny["model_dir"] / "image_encoder" / "model.safetensors")
    assert {k.removeprefix("vision_model."): v for k, v in files.items()}.keys() == original.keys()
    assert all(torch.equal(files["vision_model." + k], v) for k, v in original.items())


def test_wan_ignored_keys_and_unknown_key(tiny):
    folder, _ = _synthetic_wan_file(tiny, "wan_unknown")
    enc = load_image_encoder(folder, "wan")  # textual.*, log_scale and visual.head are ignored
    assert enc.encode(_images()[:1]).shape == (1, TOKENS, HIDDEN)
    sd = torch.load(folder / WAN_CLIP_CHECKPOINT, weights_only=True)
    sd["visual.foo"] = torch.zeros(3)
    sd["visual.transformer.0.attn.to_q.weight"] = torch.zeros(HIDDEN, HIDDEN)
    torch.save(sd, folder / WAN_CLIP_CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"visual\.foo") as err:
        load_image_encoder(folder, "wan")
    assert "visual.transformer.0.attn.to_q.weight" in str(err.value)
    assert "textual" not in str(err.value) and "log_scale" not in str(err.value)
    with pytest.raises(CheckpointError, match="visual.foo"):
        clip_state_dict_from_wan(sd)


def test_wan_missing_and_misshaped_keys(tiny):
    folder, wan_sd = _synthetic_wan_file(tiny, "wan_missing")
    sd = dict(wan_sd)
    del sd["visual.transformer.1.norm2.bias"]
    del sd["visual.transformer.2.attn.to_qkv.weight"]
    sd["visual.transformer.0.mlp.2.bias"] = torch.zeros(HIDDEN + 1)
    torch.save(sd, folder / WAN_CLIP_CHECKPOINT)
    with pytest.raises(CheckpointError) as err:
        load_image_encoder(folder, "wan")
    msg = str(err.value)
    assert "visual.transformer.1.norm2.bias" in msg
    assert msg.count("visual.transformer.2.attn.to_qkv.weight") == 1  # q/k/v reported once, under Wan's name
    assert "visual.transformer.0.mlp.2.bias checkpoint (161,) vs model (160,)" in msg
    assert WAN_CLIP_CHECKPOINT in msg


def test_wan_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=WAN_CLIP_CHECKPOINT):
        load_image_encoder(tmp_path / "empty", "wan")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_image_encoder(tmp_path / "nowhere", "wan")
    with pytest.raises(UserError, match="layout"):
        load_image_encoder(tmp_path / "empty", "comfy")


# ----------------------------------------------------------------------------------------------------------------------
# the diffusers layout


def test_diffusers_missing_files(tiny, tmp_path):
    model_dir = _copy(tiny["model_dir"], tmp_path / "m")
    shutil.rmtree(model_dir / "image_processor")
    (model_dir / "image_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_image_encoder(model_dir, "diffusers")
    msg = str(err.value)
    assert "image_processor" in msg and "model.safetensors" in msg


def test_diffusers_missing_unexpected_and_misshaped_keys(tiny, tmp_path):
    model_dir = _copy(tiny["model_dir"], tmp_path / "m")
    path = model_dir / "image_encoder" / "model.safetensors"
    sd = load_file(path)
    missing = next(k for k in sd if k.endswith("encoder.layers.1.self_attn.k_proj.bias"))
    del sd[missing]
    sd["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    sd[next(k for k in sd if k.endswith("pre_layrnorm.weight"))] = torch.ones(HIDDEN + 2)
    save_file(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_image_encoder(model_dir, "diffusers")
    msg = str(err.value)
    assert "missing keys: encoder.layers.1.self_attn.k_proj.bias" in msg
    assert "unexpected keys: encoder.layers.0.extra.weight" in msg
    assert "pre_layrnorm.weight checkpoint (162,) vs model (160,)" in msg


def test_diffusers_with_projection_prefix_and_shards(tiny, reference, tmp_path):
    """A CLIPVisionModelWithProjection checkpoint (``vision_model.`` keys + visual_projection), sharded."""
    model = CLIPVisionModel.from_pretrained(tiny["model_dir"] / "image_encoder")
    with_proj = CLIPVisionModelWithProjection(model.config)
    with_proj.vision_model.load_state_dict(model.state_dict(), strict=True)
    model_dir = tmp_path / "m"
    with_proj.save_pretrained(model_dir / "image_encoder", max_shard_size="200KB")
    assert (model_dir / "image_encoder" / "model.safetensors.index.json").is_file()
    shutil.copytree(tiny["model_dir"] / "image_processor", model_dir / "image_processor")
    enc = load_image_encoder(model_dir, "diffusers")
    assert torch.equal(enc.encode(_images()), reference)
    # a shard listed in the index but absent is named
    index = json.loads((model_dir / "image_encoder" / "model.safetensors.index.json").read_text())
    shard = max(set(index["weight_map"].values()))
    (model_dir / "image_encoder" / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        load_image_encoder(model_dir, "diffusers")


def test_diffusers_duplicate_prefixed_key(tiny, tmp_path):
    model_dir = _copy(tiny["model_dir"], tmp_path / "m")
    path = model_dir / "image_encoder" / "model.safetensors"
    sd = load_file(path)
    sd["vision_model.post_layernorm.bias"] = sd["post_layernorm.bias"].clone()
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="post_layernorm.bias"):
        load_image_encoder(model_dir, "diffusers")


def test_diffusers_legacy_position_ids_are_ignored(tiny, reference, tmp_path):
    """transformers < 4.31 stored the position ids (an arange) in the checkpoint."""
    model_dir = _copy(tiny["model_dir"], tmp_path / "m")
    path = model_dir / "image_encoder" / "model.safetensors"
    sd = {"vision_model." + k.removeprefix("vision_model."): v for k, v in load_file(path).items()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(TOKENS).expand(1, -1).contiguous()
    save_file(sd, path)
    assert torch.equal(load_image_encoder(model_dir, "diffusers").encode(_images()), reference)


def test_diffusers_processor_size_must_match(tiny, tmp_path):
    model_dir = _copy(tiny["model_dir"], tmp_path / "m")
    cfg = dict(PREPROCESSOR_CONFIG, crop_size=196)
    (model_dir / "image_processor" / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="224 x 224"):
        load_image_encoder(model_dir, "diffusers")


# ----------------------------------------------------------------------------------------------------------------------
# the tiny built-in encoder


def test_build_tiny_clip(tmp_path):
    a, b, c = build_tiny_clip(0), build_tiny_clip(0), build_tiny_clip(1)
    assert a.model.config.hidden_size % 80 == 0 and a.model.config.num_attention_heads == 2
    assert a.model.config.hidden_act == "gelu"
    ta, tb, tc = a.encode(_images()), b.encode(_images()), c.encode(_images())
    assert ta.shape == (2, TOKENS, HIDDEN) and a.num_tokens == TOKENS
    assert torch.equal(ta, tb)
    assert (ta - tc).abs().mean() > 1e4 * TOL
    save_image_encoder(a, tmp_path / "wan", "wan")
    save_image_encoder(a, tmp_path / "diffusers", "diffusers")
    assert torch.equal(load_image_encoder(tmp_path / "wan", "wan").encode(_images()), ta)
    assert torch.equal(load_image_encoder(tmp_path / "diffusers", "diffusers").encode(_images()), ta)
    assert torch.equal(_diffusers_encode(tmp_path / "diffusers", _images()), ta)
    assert torch.equal(a.drop_last_layer().encode(_images()), ta)
