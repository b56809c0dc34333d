"""HunyuanVideo-1.5 modules vs diffusers 0.42.1 / transformers at tiny random configs (CPU, float32).

Tolerance: <= 1e-4 of the reference's largest magnitude; every comparison is paired with a changed input that moves the
output by far more than that (so that the check can fail).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import hunyuan15_reference as ref
from lightx2v.models.hunyuan_video_15 import tiny
from lightx2v.models.hunyuan_video_15.arch import HunyuanVideo15DiTConfig, closest_bucket
from lightx2v.models.hunyuan_video_15.dit import HunyuanVideo15DiT, valid_tokens
from lightx2v.models.hunyuan_video_15.checkpoint import assign_strict
from lightx2v.ops.attention import get_attention_backend

TOL = 1e-4


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def ours_from(module_ref, cls, cfg):
    """Our module holding the reference's tensors under the same names (strict)."""
    with torch.device("meta"):
        if cls is HunyuanVideo15DiT:
            attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=cfg.attention_head_dim,
                                         device=torch.device("cpu"))
            model = cls(cfg, attn)
        else:
            model = cls(cfg)
    assign_strict(model, module_ref.state_dict().items(), what="reference")
    return model.eval()


def _dit_inputs(cfg: HunyuanVideo15DiTConfig, g: torch.Generator, image_tokens: int):
    x = torch.randn(1, cfg.in_channels, 3, 4, 6, generator=g)
    text = torch.randn(1, 20, cfg.text_embed_dim, generator=g)
    text_mask = torch.zeros(1, 20)
    text_mask[:, :13] = 1
    glyph = torch.randn(1, 16, cfg.text_embed_2_dim, generator=g)
    glyph_mask = torch.zeros(1, 16)
    glyph_mask[:, :5] = 1
    image = torch.randn(1, image_tokens, cfg.image_embed_dim, generator=g)
    return x, text, text_mask, glyph, glyph_mask, image


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_dit_matches_diffusers(task):
    cfg = replace(tiny.TINY_DIT, task_type=task, use_meanflow=task == "i2v")
    theirs = ref.diffusers_dit(task, use_meanflow=task == "i2v")
    ours = ours_from(theirs, HunyuanVideo15DiT, cfg)
    g = torch.Generator().manual_seed(0)
    x, text, text_mask, glyph, glyph_mask, image = _dit_inputs(cfg, g, image_tokens=4)
    t = torch.tensor([731.0])
    t_r = torch.tensor([512.0]) if task == "i2v" else None
    image_ref = image if task == "i2v" else torch.zeros(1, 729, cfg.image_embed_dim)
    with torch.no_grad():
        want = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=text_mask,
                      encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask, image_embeds=image_ref,
                      timestep_r=t_r, return_dict=False)[0]
        got = ours(x, t, valid_tokens(text, text_mask), valid_tokens(glyph, glyph_mask),
                   image if task == "i2v" else None, t_r)
        assert got.shape == want.shape == (1, cfg.out_channels, 3, 4, 6)
        assert rel(got, want) <= TOL
        # can fail: one valid text token, one glyph token, the timestep or the image change the output
        text2 = text.clone()
        text2[0, 3] = torch.randn(cfg.text_embed_dim, generator=g)
        glyph2 = glyph.clone()  # (a constant shift would vanish in the glyph projection's LayerNorm)
        glyph2[0, 1] = torch.randn(cfg.text_embed_2_dim, generator=g)
        for moved in (ours(x, t, valid_tokens(text2, text_mask), valid_tokens(glyph, glyph_mask),
                           image if task == "i2v" else None, t_r),
                      ours(x, t, valid_tokens(text, text_mask), valid_tokens(glyph2, glyph_mask),
                           image if task == "i2v" else None, t_r),
                      ours(x, torch.tensor([300.0]), valid_tokens(text, text_mask), valid_tokens(glyph, glyph_mask),
                           image if task == "i2v" else None, t_r)):
            assert rel(moved, want) > 100 * TOL
        if task == "i2v":
            image2 = torch.randn(image.shape, generator=g)  # (a scaled image would vanish in the LayerNorm)
            assert rel(ours(x, t, valid_tokens(text, text_mask), valid_tokens(glyph, glyph_mask), image2, t_r),
                       want) > 100 * TOL
            assert rel(ours(x, t, valid_tokens(text, text_mask), valid_tokens(glyph, glyph_mask), image, None),
                       want) > 100 * TOL
        # padded tokens are not seen by the reference either: changing one leaves its output unchanged
        text3 = text.clone()
        text3[0, 17] += 5.0
        again = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text3, encoder_attention_mask=text_mask,
                       encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask, image_embeds=image_ref,
                       timestep_r=t_r, return_dict=False)[0]
        assert rel(again, want) <= TOL


def test_dit_without_glyph_tokens_matches_diffusers():
    cfg = tiny.TINY_DIT
    theirs = ref.diffusers_dit("t2v")
    ours = ours_from(theirs, HunyuanVideo15DiT, cfg)
    g = torch.Generator().manual_seed(1)
    x, text, text_mask, glyph, _, _ = _dit_inputs(cfg, g, image_tokens=4)
    empty = torch.zeros(1, 16)
    t = torch.tensor([999.0])
    with torch.no_grad():
        want = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=text_mask,
                      encoder_hidden_states_2=torch.zeros_like(glyph), encoder_attention_mask_2=empty,
                      image_embeds=torch.zeros(1, 729, cfg.image_embed_dim), return_dict=False)[0]
        got = ours(x, t, valid_tokens(text, text_mask), valid_tokens(glyph, empty), None)
    assert rel(got, want) <= TOL


def test_vae_encode_decode_match_diffusers():
    from lightx2v.models.hunyuan_video_15.vae import HunyuanVideo15VAE

    theirs = ref.diffusers_vae()
    ours = ours_from(theirs, HunyuanVideo15VAE, tiny.TINY_VAE)
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 9, 32, 48, generator=g) * 2 - 1
    sf = theirs.config.scaling_factor
    with torch.no_grad():
        want_z = theirs.encode(video).latent_dist.mode() * sf
        got_z = ours.encode(video)
        assert got_z.shape == want_z.shape == (1, 4, 3, 2, 3)
        assert rel(got_z, want_z) <= TOL
        assert rel(ours.encode(video.flip(-1)), want_z) > 100 * TOL
        want_x = theirs.decode(want_z / sf).sample
        got_x = ours.decode(want_z)
        assert got_x.shape == want_x.shape == (1, 3, 9, 32, 48)
        assert rel(got_x, want_x) <= TOL
        assert rel(ours.decode(want_z * 0.5), want_x) > 100 * TOL
        # one image (the I2V condition): one latent frame
        img = video[:, :, :1]
        assert rel(ours.encode(img), theirs.encode(img).latent_dist.mode() * sf) <= TOL


def test_vae_tiling_matches_diffusers():
    from lightx2v.models.hunyuan_video_15.vae import HunyuanVideo15VAE, VAETiling

    theirs = ref.diffusers_vae()
    ours = ours_from(theirs, HunyuanVideo15VAE, tiny.TINY_VAE)
    # 64 px tiles (4 latents) every 48 px: the last column of tiles is 16 px wide (diffusers needs multiples of 16)
    theirs.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=4,
                         tile_latent_min_width=4)
    tiling = VAETiling(tile_sample_size=64)
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 5, 64, 112, generator=g) * 2 - 1
    sf = theirs.config.scaling_factor
    with torch.no_grad():
        want_z = theirs.encode(video).latent_dist.mode() * sf
        got_z = ours.encode(video, tiling=tiling)
        assert rel(got_z, want_z) <= TOL
        assert rel(ours.encode(video), want_z) > 100 * TOL  # the untiled encode differs
        want_x = theirs.decode(want_z / sf).sample
        got_x = ours.decode(want_z, tiling=tiling)
        assert got_x.shape == (1, 3, 5, 64, 112)
        assert rel(got_x, want_x) <= TOL
        # the tiles are blended: the untiled decode differs (by much more than the tolerance)
        assert rel(ours.decode(want_z), want_x) > 100 * TOL


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
    """The reference's tiny Qwen / ByT5 (+ tokenizers), saved in diffusers' layout and loaded by our loaders."""
    from lightx2v.models.hunyuan_video_15.checkpoint import load_glyph_encoder, load_qwen_text_encoder

    root = tmp_path_factory.mktemp("hy15-text")
    tok, qwen = ref.qwen(root / "tok-qwen")
    tok2, t5 = ref.byt5(root / "tok-byt5")
    qwen.save_pretrained(str(root / "text_encoder"))
    tok.save_pretrained(str(root / "tokenizer"))
    t5.save_pretrained(str(root / "text_encoder_2"))
    tok2.save_pretrained(str(root / "tokenizer_2"))
    return (tok, qwen, tok2, t5, load_qwen_text_encoder(root, "diffusers"), load_glyph_encoder(root, "diffusers"))


def test_qwen_text_encoder_matches_diffusers(text_encoders):
    from diffusers import HunyuanVideo15Pipeline

    from lightx2v.models.hunyuan_video_15.text_encoder import SYSTEM_MESSAGE

    tok, qwen, _, _, ours, _ = text_encoders
    for prompt in (ref.PROMPT, ""):
        want, want_mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(
            qwen, tok, prompt, torch.device("cpu"), tokenizer_max_length=1000, system_message=SYSTEM_MESSAGE,
            crop_start=108)
        got, got_mask = ours.encode_padded(prompt)
        assert torch.equal(got_mask, want_mask)
        assert rel(got, want) <= TOL
        valid = ours.encode(prompt)
        assert valid.shape == (1, int(want_mask.sum()), qwen.config.hidden_size)
        assert rel(valid, want[want_mask.bool()][None]) <= TOL
    # the prompt (not only the template) is what is left after the crop, and it matters
    other = ours.encode(ref.OTHER_PROMPT)
    first = ours.encode(ref.PROMPT)
    n = min(other.shape[1], first.shape[1])
    assert rel(other[:, :n], first[:, :n]) > 100 * TOL


def test_glyph_encoder_matches_diffusers(text_encoders):
    from diffusers import HunyuanVideo15Pipeline
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    from lightx2v.models.hunyuan_video_15.text_encoder import glyph_text

    _, _, tok2, t5, _, ours = text_encoders
    for p in (ref.PROMPT, 'two signs: "A" and “B” and "A" again', "no quotes here", 'one "x"'):
        assert glyph_text(p) == extract_glyph_texts(p)
    for prompt in (ref.PROMPT, "no quotes here"):
        want, want_mask = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(tok2, t5, prompt, torch.device("cpu"), 256)
        got, got_mask = ours.encode_padded(prompt)
        assert torch.equal(got_mask, want_mask)
        assert rel(got, want) <= TOL if want.abs().max() > 0 else torch.equal(got, want)
    assert ours.encode("no quotes here").shape == (1, 0, t5.config.d_model)
    a, b = ours.encode('a sign that says "OPEN"'), ours.encode('a sign that says "SHUT"')
    assert a.shape == b.shape and rel(a, b) > 100 * TOL


def test_siglip_image_encoder_matches_diffusers(tmp_path):
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    from lightx2v.models.hunyuan_video_15.checkpoint import load_image_encoder
    from tiny_reference import picture

    processor, model = ref.siglip()
    model.save_pretrained(str(tmp_path / "image_encoder"))
    processor.save_pretrained(str(tmp_path / "feature_extractor"))
    ours = load_image_encoder(tmp_path, "diffusers")
    img = picture(80, 48, seed=1)
    want = HunyuanVideo15ImageToVideoPipeline._get_image_embeds(model, processor, img, torch.device("cpu"))
    got = ours.encode(img)
    assert got.shape == want.shape == (1, 4, tiny.TINY_SIGLIP["hidden_size"])
    assert rel(got, want) <= TOL
    assert rel(ours.encode(picture(80, 48, seed=2)), want) > 100 * TOL


def test_output_size_buckets_match_diffusers():
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    proc = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for base in (640, 960, 64):
        for h, w in ((9, 16), (16, 9), (1, 1), (3, 4), (4, 3), (480, 832), (1080, 1920), (5, 7)):
            assert closest_bucket(h, w, base) == tuple(proc.calculate_default_height_width(h, w, base))
    assert closest_bucket(9, 16, 640) == (480, 848)
    assert closest_bucket(9, 16, 960) == (720, 1280)


def test_sampler_matches_diffusers_scheduler():
    import diffusers

    from lightx2v.models.hunyuan_video_15.scheduler import FlowSigmaEuler, default_sigmas, distilled_sigmas

    for sigmas, shift in ((default_sigmas(50), 5.0), (default_sigmas(7), 9.0), (distilled_sigmas([1000, 750, 500, 250]),
                                                                                 5.0)):
        theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        theirs.set_timesteps(sigmas=list(sigmas))
        ours = FlowSigmaEuler(sigmas, shift)
        assert torch.equal(ours.timesteps, theirs.timesteps)
        assert torch.equal(ours.sigmas, theirs.sigmas)
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
        v = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
        for t in theirs.timesteps[:3]:
            want = theirs.step(v, t, x, return_dict=False)[0]
            assert torch.equal(ours.step(v, x), want)
            x = want
    # LightX2V's step-distill schedule: the 1000-point shifted table at the listed timesteps
    table = torch.linspace(1, 0, 1001)[:-1]
    table = 5.0 * table / (1 + 4.0 * table)
    ours = FlowSigmaEuler(distilled_sigmas([1000, 750, 500, 250]), 5.0)
    assert torch.allclose(ours.sigmas[:-1], table[[0, 250, 500, 750]], atol=1e-6)


def test_release_text_encoders(tmp_path):
    """The release's text encoders: the whole Qwen2.5-VL checkpoint (vision tower and LM head skipped) in
    text_encoder/llm/, and Glyph-SDXL-v2's ByT5 weights (a ``state_dict`` with ``module.text_tower.encoder.`` names and
    a vocabulary grown by its colour / font tokens) beside text_encoder/byt5-small/."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

    from lightx2v.models.hunyuan_video_15.checkpoint import load_glyph_encoder, load_qwen_text_encoder

    tok = tiny.build_tiny_qwen_tokenizer(tmp_path / "tok")
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0])
    vl = ref.randomise(Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=tiny.tiny_qwen_config(tok).to_dict(), vision_config=vision)), 7)
    llm = tmp_path / "text_encoder" / "llm"
    vl.save_pretrained(str(llm))
    tok.save_pretrained(str(llm))
    qwen = load_qwen_text_encoder(tmp_path, "release")
    ids = tok("a cat walks", return_tensors="pt").input_ids
    with torch.no_grad():
        want = vl.model.language_model(input_ids=ids, output_hidden_states=True).hidden_states[-3]
        assert rel(qwen.model(input_ids=ids, output_hidden_states=True).hidden_states[-3], want) <= TOL

    base, glyph = tmp_path / "text_encoder" / "byt5-small", tmp_path / "text_encoder" / "Glyph-SDXL-v2"
    byt5_tok = tiny.build_tiny_byt5_tokenizer(base)
    (glyph / "assets").mkdir(parents=True)
    (glyph / "checkpoints").mkdir()
    (glyph / "assets" / "color_idx.json").write_text('{"red": 0, "blue": 1}')
    (glyph / "assets" / "multilingual_10-lang_idx.json").write_text('{"en-Roboto": 0, "zh-Kai": 1}')
    t5 = ref.randomise(T5EncoderModel(T5Config(vocab_size=len(byt5_tok) + 4, **tiny.TINY_BYT5)), 8)
    T5Config(vocab_size=384, **tiny.TINY_BYT5).save_pretrained(str(base))  # byt5-small's own vocabulary size
    stack = {f"module.text_tower.encoder.{k[len('encoder.'):]}": v for k, v in t5.state_dict().items()
             if k.startswith("encoder.")}
    torch.save({"state_dict": stack}, str(glyph / "checkpoints" / "byt5_model.pt"))
    enc = load_glyph_encoder(tmp_path, "release")
    assert enc.tokenizer.convert_tokens_to_ids("<en-font-0>") == len(byt5_tok) + 2  # colours first, then fonts
    prompt = 'a sign that says "OPEN <color-1>"'
    got, mask = enc.encode_padded(prompt)
    from diffusers import HunyuanVideo15Pipeline

    want, want_mask = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(enc.tokenizer, t5, prompt, torch.device("cpu"))
    assert torch.equal(mask, want_mask) and rel(got, want) <= TOL
    assert int(mask.sum()) < len(glyph_text_of(prompt)) + 2  # <color-1> is one token, not 9 bytes


def glyph_text_of(prompt):
    from lightx2v.models.hunyuan_video_15.text_encoder import glyph_text

    return glyph_text(prompt)
