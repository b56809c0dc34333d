"""HunyuanVideo-1.5 whole generations vs diffusers' HunyuanVideo15Pipeline / HunyuanVideo15ImageToVideoPipeline
(tiny random models that diffusers builds and saves; CPU, float32), the distilled variants, stage isolation, strict
loading and the release layout.

Tolerance: <= 5e-3 max abs per pixel; another prompt, seed, step count or image must move the frames by far more.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

import hunyuan15_reference as ref
from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.hunyuan_video_15 import tiny
from lightx2v.models.hunyuan_video_15.stages import (HunyuanVideo15Decoder, HunyuanVideo15Encoder,
                                                     HunyuanVideo15Options, HunyuanVideo15Request,
                                                     HunyuanVideo15Transformer, generate)
from tiny_reference import picture

TOL = 5e-3
MOVED = 0.05  # "far more than the tolerance"
FRAMES, STEPS = 5, 2


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


class Stages:
    """The three stages of one model folder, loaded once, run per request."""

    def __init__(self, folder, options=None):
        self.enc = HunyuanVideo15Encoder(folder, options=options)
        self.dit = HunyuanVideo15Transformer(folder, options=options)
        self.dec = HunyuanVideo15Decoder(folder, options=options)

    def __call__(self, request):
        encoded = self.enc.encode(request)
        return self.dec.decode(self.dit.denoise(encoded, request), encoded), encoded


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("hy15-t2v")
    pipe = ref.diffusers_pipeline(root / "tok", "t2v")
    pipe.save_pretrained(str(root / "model"))
    return root / "model", pipe, Stages(root / "model")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("hy15-i2v")
    pipe = ref.diffusers_pipeline(root / "tok", "i2v")
    pipe.save_pretrained(str(root / "model"))
    return root / "model", pipe, Stages(root / "model")


def test_t2v_matches_diffusers(t2v):
    folder, pipe, ours = t2v
    # no height/width: both take the 16:9 bucket of the DiT's target_size; a quoted word feeds ByT5
    want = ref.run_diffusers(pipe, ref.PROMPT, negative_prompt=ref.NEGATIVE, num_frames=FRAMES,
                             num_inference_steps=STEPS)
    req = HunyuanVideo15Request(prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE, num_frames=FRAMES, infer_steps=STEPS)
    got, encoded = ours(req)
    assert (encoded.height, encoded.width) == (48, 80)  # the 16:9 bucket of target_size 64, as diffusers picks it
    assert encoded.prompt_embeds_2.shape[1] > 0 and encoded.sampling.do_cfg and encoded.sampling.guidance_scale == 6.0
    assert got.shape == want.shape == (FRAMES, 48, 80, 3) and got.dtype == torch.float32
    assert maxdiff(got, want) <= TOL
    for other in (replace(req, prompt=ref.OTHER_PROMPT), replace(req, seed=7), replace(req, infer_steps=STEPS + 1),
                  replace(req, prompt=ref.PROMPT.replace("OPEN", "SHUT")),  # only the glyph text differs
                  replace(req, negative_prompt="")):
        assert maxdiff(ours(other)[0], want) > MOVED, other


def test_t2v_explicit_size_and_guidance_match_diffusers(t2v):
    folder, pipe, ours = t2v
    want = ref.run_diffusers(pipe, ref.OTHER_PROMPT, height=64, width=48, num_frames=5, num_inference_steps=2, seed=3)
    got, _ = ours(HunyuanVideo15Request(prompt=ref.OTHER_PROMPT, height=64, width=48, num_frames=5, infer_steps=2,
                                        seed=3))
    assert got.shape == (5, 64, 48, 3) and maxdiff(got, want) <= TOL
    # generate() (the three stages chained, each loading alone) gives the same frames
    again = generate(folder, HunyuanVideo15Request(prompt=ref.OTHER_PROMPT, height=64, width=48, num_frames=5,
                                                   infer_steps=2, seed=3))
    assert maxdiff(again, got) == 0.0


def test_cfg_distilled_matches_diffusers_without_guidance(t2v):
    """CFG-distilled checkpoints run one forward per step: diffusers' guider at scale 1, LightX2V's enable_cfg off."""
    import diffusers

    folder, pipe, ours = t2v
    guider = pipe.guider
    pipe.guider = diffusers.ClassifierFreeGuidance(guidance_scale=1.0)
    try:
        want = ref.run_diffusers(pipe, ref.PROMPT, num_frames=FRAMES, num_inference_steps=STEPS)
    finally:
        pipe.guider = guider
    req = HunyuanVideo15Request(prompt=ref.PROMPT, num_frames=FRAMES, infer_steps=STEPS, guidance_scale=1.0)
    got, encoded = ours(req)
    assert not encoded.sampling.do_cfg and encoded.negative_prompt_embeds is None
    assert maxdiff(got, want) <= TOL
    off, _ = ours(replace(req, guidance_scale=6.0, enable_cfg=False))  # LightX2V's hunyuan_video_i2v_720p_cfg_distilled
    assert maxdiff(off, got) == 0.0
    assert maxdiff(ours(replace(req, guidance_scale=None))[0], want) > MOVED  # the checkpoint's CFG (6.0) is on


def test_step_distilled_matches_diffusers_sigmas(t2v, tmp_path):
    """LightX2V's 4-step distillation (denoising_step_list [1000, 750, 500, 250], no CFG, a separate DiT file in the
    release's key names) equals diffusers' pipeline given the sigmas [1, .75, .5, .25] with that DiT."""
    import diffusers
    from safetensors.torch import save_file

    from lightx2v.models.hunyuan_video_15.checkpoint import dit_state_dict_to_release

    folder, pipe, _ = t2v
    distilled = ref.diffusers_dit("t2v", seed=11)
    path = tmp_path / "distill_model.safetensors"
    save_file({k: v.contiguous() for k, v in dit_state_dict_to_release(distilled.state_dict()).items()}, str(path))
    base, guider = pipe.transformer, pipe.guider
    pipe.transformer, pipe.guider = distilled, diffusers.ClassifierFreeGuidance(guidance_scale=1.0)
    try:
        want = ref.run_diffusers(pipe, ref.PROMPT, num_frames=FRAMES, sigmas=[1.0, 0.75, 0.5, 0.25])
    finally:
        pipe.transformer, pipe.guider = base, guider
    options = HunyuanVideo15Options(dit_original_ckpt=str(path))
    req = HunyuanVideo15Request(prompt=ref.PROMPT, num_frames=FRAMES, denoising_step_list=(1000, 750, 500, 250),
                                enable_cfg=False, sample_shift=tiny.TINY_SHIFT)
    got = generate(folder, req, options=options)
    assert maxdiff(got, want) <= TOL
    assert maxdiff(generate(folder, req), want) > MOVED  # the folder's own DiT is another model


def test_i2v_matches_diffusers(i2v):
    folder, pipe, ours = i2v
    image = picture(100, 60, seed=3)
    want = ref.run_diffusers(pipe, ref.PROMPT, image=image, negative_prompt=ref.NEGATIVE, num_frames=FRAMES,
                             num_inference_steps=STEPS)
    req = HunyuanVideo15Request(prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE, task="i2v", image=image,
                                num_frames=FRAMES, infer_steps=STEPS)
    got, encoded = ours(req)
    assert (encoded.height, encoded.width) == tuple(want.shape[1:3])  # the bucket of the image's aspect ratio
    assert encoded.image_embeds.shape == (1, 4, tiny.TINY_SIGLIP["hidden_size"])
    assert encoded.image_latents.shape == (1, 4, 1, encoded.height // 16, encoded.width // 16)
    assert maxdiff(got, want) <= TOL
    assert maxdiff(ours(replace(req, image=picture(100, 60, seed=4)))[0], want) > MOVED
    assert maxdiff(ours(replace(req, seed=1))[0], want) > MOVED


@pytest.mark.parametrize("layout", ["diffusers", "release"])
def test_stage_isolation(i2v, layout, tmp_path, monkeypatch):
    """Each stage reads only its own files: recorded through every way our loaders open weights."""
    import safetensors
    import safetensors.torch

    import sys

    import lightx2v.models.hunyuan_video_15.checkpoint as ck

    helpers = sys.modules[ck.iter_safetensors.__module__]  # where the shared loading helpers live

    if layout == "diffusers":
        folder, options = i2v[0], None
        text, image, dit_file = {"text_encoder", "text_encoder_2"}, {"image_encoder"}, \
            i2v[0] / "transformer" / "diffusion_pytorch_model.safetensors"
    else:
        folder = tiny.write_tiny_model(tmp_path / "r", "i2v", "release")
        options = HunyuanVideo15Options(transformer_model_name="480p_i2v")
        text, image = {"text_encoder"}, {"vision_encoder"}
        dit_file = folder / "transformer" / "480p_i2v" / "diffusion_pytorch_model.safetensors"
    opened: list[str] = []
    real_open, real_load = safetensors.safe_open, torch.load

    def rec_open(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    def rec_load(path, *a, **k):
        opened.append(str(path))
        return real_load(path, *a, **k)

    for mod in (safetensors, safetensors.torch, ck, helpers):
        monkeypatch.setattr(mod, "safe_open", rec_open, raising=False)
    monkeypatch.setattr(torch, "load", rec_load)

    def tops():
        out = {str(p)[len(str(folder)) + 1:].split("/")[0] for p in opened}
        opened.clear()
        return out

    enc = HunyuanVideo15Encoder(folder, options=options, preload_i2v=True)
    assert tops() == text | image | {"vae"}
    assert enc.vae.decoder is None  # the VAE decoder's tensors are skipped unread
    t2v_enc = HunyuanVideo15Encoder(folder, options=options)
    assert tops() == text and t2v_enc.image_encoder is None
    dit = HunyuanVideo15Transformer(folder, options=options)
    assert tops() == {"transformer"}
    with real_open(str(dit_file), "pt") as f:  # the DiT holds its checkpoint's tensors and no others
        names = set(f.keys())
    if layout == "release":
        names = {k for k, _ in ck.dit_tensors_from_release((n, torch.zeros(3)) for n in names)}
    assert set(dit.dit.state_dict()) == names
    dec = HunyuanVideo15Decoder(folder, options=options)
    assert tops() == {"vae"} and dec.vae.encoder is None


def test_strict_loading_reports_every_problem(t2v, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = t2v[0]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    wfile = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(wfile))
    sd.pop("proj_out.bias")
    sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2)
    sd["cond_type_embed.weight"] = torch.zeros(4, 32)
    save_file(sd, str(wfile))
    with pytest.raises(CheckpointError) as e:
        HunyuanVideo15Transformer(bad)
    msg = str(e.value)
    assert "proj_out.bias" in msg and "transformer_blocks.0.attn.extra.weight" in msg and "cond_type_embed" in msg
    vfile = bad / "vae" / "diffusion_pytorch_model.safetensors"
    vsd = load_file(str(vfile))
    vsd.pop("decoder.conv_out.conv.bias")
    save_file(vsd, str(vfile))
    with pytest.raises(CheckpointError, match="decoder.conv_out.conv.bias"):
        HunyuanVideo15Decoder(bad)
    HunyuanVideo15Encoder(bad)  # the encoder does not read the VAE decoder for T2V
    tfile = bad / "text_encoder_2" / "model.safetensors"
    tsd = load_file(str(tfile))
    tsd["encoder.block.9.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)
    save_file(tsd, str(tfile))
    with pytest.raises(CheckpointError, match="encoder.block.9"):
        HunyuanVideo15Encoder(bad)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    cfg["guidance_embeds"] = True
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="guidance_embeds"):
        HunyuanVideo15Transformer(bad)


def test_request_validation():
    with pytest.raises(UserError, match="4k\\+1"):
        HunyuanVideo15Request(prompt="a", num_frames=8)
    with pytest.raises(UserError, match="multiple of 16"):
        HunyuanVideo15Request(prompt="a", height=50, width=64)
    with pytest.raises(UserError, match="both height and width"):
        HunyuanVideo15Request(prompt="a", height=64)
    with pytest.raises(UserError, match="needs an image"):
        HunyuanVideo15Request(prompt="a", task="i2v")
    with pytest.raises(UserError, match="task="):
        HunyuanVideo15Request(prompt="a", task="flf2v")
    with pytest.raises(UserError, match="aspect_ratio"):
        HunyuanVideo15Request(prompt="a", aspect_ratio="wide")
    with pytest.raises(UserError, match="does not match denoising_step_list"):
        HunyuanVideo15Request(prompt="a", infer_steps=50, denoising_step_list=(1000, 750, 500, 250))
    with pytest.raises(UserError, match="strictly decreasing"):
        HunyuanVideo15Request(prompt="a", denoising_step_list=(250, 500))
    with pytest.raises(UserError, match="seed"):
        HunyuanVideo15Request(prompt="a", seed=-1)


def test_tiny_model_release_and_diffusers_layouts(tmp_path):
    """The built-in tiny model: diffusers' pipeline loads the diffusers-layout folder and matches us; the release
    layout (same weights, the release's key names, fused qkv, swapped final modulation, Qwen2.5-VL/ByT5/SigLIP
    folders) gives the same frames."""
    import diffusers

    dfolder = tiny.write_tiny_model(tmp_path / "d", "i2v", "diffusers")
    rfolder = tiny.write_tiny_model(tmp_path / "r", "i2v", "release")
    assert (rfolder / "transformer" / "480p_i2v" / "config.json").is_file()
    keys = json.loads((rfolder / "transformer" / "480p_i2v" / "config.json").read_text())
    assert keys["heads_num"] == tiny.TINY_DIT.num_attention_heads and keys["target_size"] == 64
    image = picture(64, 64, seed=5)
    req = HunyuanVideo15Request(prompt=ref.PROMPT, task="i2v", image=image, num_frames=5, infer_steps=2)
    ours_d = generate(dfolder, req)
    ours_r = generate(rfolder, req, options=HunyuanVideo15Options(transformer_model_name="480p_i2v"))
    assert maxdiff(ours_d, ours_r) <= 1e-5
    pipe = diffusers.HunyuanVideo15ImageToVideoPipeline.from_pretrained(str(dfolder))
    want = ref.run_diffusers(pipe, ref.PROMPT, image=image, num_frames=5, num_inference_steps=2)
    assert maxdiff(ours_d, want) <= TOL
    with pytest.raises(UserError, match="transformer_model_name"):
        HunyuanVideo15Transformer(rfolder, options=HunyuanVideo15Options(transformer_model_name="720p_i2v"))


def test_i2v_meanflow_dit_matches_diffusers(i2v, tmp_path):
    """A MeanFlow DiT (use_meanflow: the release's step-distilled I2V models) also gets the next timestep, 0 after the
    last step, as diffusers' I2V pipeline gives it."""
    folder, pipe, _ = i2v
    meanflow = ref.diffusers_dit("i2v", seed=13, use_meanflow=True)
    copy = tmp_path / "meanflow"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("transformer"))
    meanflow.save_pretrained(str(copy / "transformer"))
    image = picture(64, 80, seed=6)
    base = pipe.transformer
    pipe.transformer = meanflow
    try:
        want = ref.run_diffusers(pipe, ref.OTHER_PROMPT, image=image, num_frames=FRAMES, num_inference_steps=STEPS)
    finally:
        pipe.transformer = base
    req = HunyuanVideo15Request(prompt=ref.OTHER_PROMPT, task="i2v", image=image, num_frames=FRAMES,
                                infer_steps=STEPS)
    got = generate(copy, req)
    assert maxdiff(got, want) <= TOL
    with torch.no_grad():  # without the second time embedding the result is another one
        meanflow.time_embed.timestep_embedder_r.linear_2.weight.zero_()
        meanflow.time_embed.timestep_embedder_r.linear_2.bias.zero_()
    meanflow.save_pretrained(str(copy / "transformer"))
    assert maxdiff(generate(copy, req), want) > MOVED
