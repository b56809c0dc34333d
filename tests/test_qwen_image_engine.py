"""Qwen-Image through the engine: LightX2VPipeline(model_cls="qwen_image") against the family's generate() (bit for
bit) and diffusers' QwenImagePipeline / QwenImageEditPipeline / QwenImageEditPlusPipeline (<= 5e-3 per pixel, true
CFG on), the CLI (generate, build-trt), one-line errors, the stage messages as bytes, progress and cancel, and the
DiT's runtime features (block / phase / model offload, LoRA in the release's, kohya's and PEFT's naming, fp8 / int8)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from qwen_reference import OTHER_PROMPT, PROMPT, build_pipeline, picture, save_pipeline
from safetensors.torch import save_file

from lightx2v import LightX2VPipeline
from lightx2v.cli import main as cli_main
from lightx2v.engine.messages import equal, from_bytes, to_bytes
from lightx2v.engine.progress import CancelToken, RunContext
from lightx2v.errors import Cancelled, UserError
from lightx2v.models.qwen_image.stages import QwenImageOptions, QwenImageRequest, generate
from lightx2v.models.qwen_image.tiny import TINY_ASPECT_RATIOS

PIXEL_TOL = 5e-3
# The reference edit pipelines encode their images at 1024**2 (VAE) and 384**2 (vision tower, Edit-Plus) pixels;
# here both run at smaller areas (the reference's constants patched, ours set through the config keys).
VAE_AREA, COND_AREA = 192 * 192, 96 * 96
EDIT_KEYS = dict(vae_image_size=VAE_AREA, resolution=math.isqrt(VAE_AREA))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (model folder saved by diffusers, the diffusers pipeline)."""
    out = {}
    for variant in ("t2i", "edit", "edit_plus"):
        root = tmp_path_factory.mktemp(f"qwen-engine-{variant}")
        pipe = build_pipeline(variant, root / "tok", zero_cond_t=variant == "edit_plus")
        out[variant] = (save_pipeline(pipe, root / "model"), pipe)
    return out


@pytest.fixture
def small_areas(monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for module in (edit, plus):
        original = module.calculate_dimensions
        mapping = {1024 * 1024: VAE_AREA, 384 * 384: COND_AREA}
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, f=original: f(mapping.get(area, area), ratio))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two edit images as PNG files (lossless: the reference gets the same pixels)."""
    folder = tmp_path_factory.mktemp("qwen-engine-images")
    images = [picture(120, 80, 1), picture(64, 96, 2)]
    paths = []
    for i, img in enumerate(images):
        paths.append(str(folder / f"in{i}.png"))
        img.save(paths[-1])
    return images, paths


def _ref(pipe, **kw):
    seed = kw.pop("seed")
    return torch.from_numpy(pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images)


def _gen(pipe, **kw):
    return pipe.generate(return_result_tensor=True, progress=False, **kw)["video"]


def _max(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- whole generations ------------------------------------------------------------------------------------------


def test_t2i_equals_the_family_and_diffusers(saved):
    folder, ref = saved["t2i"]
    pipe = LightX2VPipeline(model_path=folder, model_cls="qwen_image", task="t2i").create_generator(
        height=64, width=96, infer_steps=3, guidance_scale=4.0)
    ours = _gen(pipe, seed=3, prompt=PROMPT, negative_prompt="blurry")
    family = generate(folder, QwenImageRequest(prompt=PROMPT, negative_prompt="blurry", seed=3, height=64, width=96,
                                               infer_steps=3, guidance_scale=4.0))
    assert ours.shape == (1, 64, 96, 3) and torch.equal(ours, family)
    want = _ref(ref, prompt=PROMPT, negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=3, height=64,
                width=96, seed=3)
    assert _max(ours, want) <= PIXEL_TOL
    other = _gen(pipe, seed=3, prompt=OTHER_PROMPT, negative_prompt="blurry")
    assert _max(other, ours) > 10 * PIXEL_TOL  # the prompt matters
    no_cfg = _gen(pipe, seed=3, prompt=PROMPT, negative_prompt="blurry", guidance_scale=1.0)
    assert _max(no_cfg, ours) > 10 * PIXEL_TOL  # and so does true CFG
    s = pipe.config.sampling
    assert (s.infer_steps, s.guidance_scale, s.sample_shift, s.num_frames) == (3, 4.0, "auto", 1)


def test_edit_one_image_equals_diffusers(saved, small_areas, pictures):
    folder, ref = saved["edit"]
    (image, _), (path, _) = pictures
    pipe = LightX2VPipeline(model_path=folder, model_cls="qwen_image", task="i2i").create_generator(
        infer_steps=2, **EDIT_KEYS)
    ours = _gen(pipe, seed=7, prompt=PROMPT, negative_prompt=" ", image_path=path)
    want = _ref(ref, image=image, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2,
                seed=7)
    assert ours.shape == want.shape == (1, 160, 224, 3)  # no size asked: the image's aspect ratio (i2i's "auto")
    assert _max(ours, want) <= PIXEL_TOL
    family = generate(folder, QwenImageRequest(prompt=PROMPT, negative_prompt=" ", seed=7, task="i2i",
                                               infer_steps=2, images=[image]),
                      options=QwenImageOptions(vae_image_size=VAE_AREA, resolution=math.isqrt(VAE_AREA)))
    assert torch.equal(ours, family)
    from PIL import ImageOps

    other = _gen(pipe, seed=7, prompt=PROMPT, negative_prompt=" ", image_path=ImageOps.invert(image))
    assert _max(other, ours) > 10 * PIXEL_TOL  # the image matters
    with pytest.raises(UserError, match="Qwen-Image-Edit takes one image, got 2"):
        _gen(pipe, prompt=PROMPT, image_path=",".join(pictures[1]))


def test_edit_plus_two_images_equals_diffusers(saved, small_areas, pictures):
    folder, ref = saved["edit_plus"]
    images, paths = pictures
    pipe = LightX2VPipeline(model_path=folder, model_cls="qwen-image-edit-2511", task="i2i").create_generator(
        infer_steps=2, guidance_scale=3.0, CONDITION_IMAGE_SIZE=COND_AREA, **EDIT_KEYS)
    ours = _gen(pipe, seed=11, prompt=PROMPT, negative_prompt=" ", image_path=",".join(paths), height=64, width=80)
    want = _ref(ref, image=images, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=3.0, num_inference_steps=2,
                height=64, width=80, seed=11)
    assert ours.shape == (1, 64, 80, 3) and _max(ours, want) <= PIXEL_TOL
    family = generate(folder, QwenImageRequest(prompt=PROMPT, negative_prompt=" ", seed=11, task="i2i", height=64,
                                               width=80, infer_steps=2, guidance_scale=3.0, images=images),
                      options=QwenImageOptions(vae_image_size=VAE_AREA, condition_image_size=COND_AREA))
    assert torch.equal(ours, family)
    from PIL import ImageOps

    other = _gen(pipe, seed=11, prompt=PROMPT, negative_prompt=" ", image_path=[paths[0], ImageOps.invert(images[1])],
                 height=64, width=80)
    assert _max(other, ours) > 10 * PIXEL_TOL  # the second image matters


# --- messages, progress, cancel -----------------------------------------------------------------------------------


def test_stage_messages_round_trip_through_bytes(saved, small_areas, pictures):
    folder, _ = saved["edit_plus"]
    pipe = LightX2VPipeline(model_path=folder, model_cls="qwen_image", task="i2i").create_generator(
        infer_steps=2, CONDITION_IMAGE_SIZE=COND_AREA, **EDIT_KEYS)
    req = pipe.make_request(seed=2, prompt=PROMPT, image_path=",".join(pictures[1]), return_result_tensor=True,
                            height=48, width=64)
    encoder, transformer, decoder = pipe.runner.stages
    cond = encoder(req, RunContext())
    assert cond.message_kind == "qwen_image.encoded" and cond.encoded.image_latents is not None
    assert cond.encoded.negative_prompt_embeds is not None  # true CFG: both prompts encoded
    back = from_bytes(to_bytes(cond))
    assert equal(back, cond)
    assert equal(from_bytes(bytearray(to_bytes(cond))), cond)  # zero-copy views of a writable buffer
    latents = transformer(back, RunContext())
    latents_back = from_bytes(to_bytes(latents))
    assert latents.message_kind == "qwen_image.latents" and equal(latents_back, latents)
    frames = decoder(latents_back, RunContext())
    assert torch.equal(frames.frames, pipe.run(req)[1])  # apart == in one process, bit for bit


def test_progress_after_every_step_and_cancel_after_step_one(saved):
    folder, _ = saved["t2i"]
    pipe = LightX2VPipeline(model_path=folder, model_cls="qwen_image", task="t2i").create_generator(
        height=32, width=32, infer_steps=3)
    seen = []
    _gen(pipe, prompt="a", callback=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen == [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3)]
    assert {"text encode", "denoise", "VAE decode"} <= set(pipe.last_timings)
    token, seen = CancelToken(), []

    def on_step(stage, done, total):
        seen.append(done)
        if done == 1:
            token.cancel("stop after one step")

    with pytest.raises(Cancelled, match="stop after one step"):
        _gen(pipe, prompt="a", callback=on_step, cancel=token)
    assert seen == [1]


# --- errors ---------------------------------------------------------------------------------------------------------


def test_one_line_errors(saved, pictures):
    t2i, _ = saved["t2i"]
    pipe = LightX2VPipeline(model_path=t2i, model_cls="qwen_image", task="t2i").create_generator(
        height=32, width=32, infer_steps=2)
    cases = [
        (lambda: _gen(pipe, prompt="a", aspect_ratio="5:4"), "aspect_ratio='5:4' is not known"),
        (lambda: _gen(pipe, prompt="a", height=100, width=64), "height=100 is not divisible by 16"),
        (lambda: _gen(pipe, prompt="a", image_path=pictures[1][0]), "task 't2i' takes no image_path"),
        (lambda: _gen(pipe, prompt="a", task="i2i", image_path=pictures[1][0]), "needs an edit checkpoint"),
        (lambda: _gen(pipe, prompt="a", task="i2i"), "needs image_path"),
        (lambda: _gen(pipe, prompt="a", num_frames=5), "num_frames=5"),
        (lambda: _gen(pipe, prompt="a", sample_solver="unipc", resize_mode="crop"), "resize_mode='crop'"),
        (lambda: _gen(pipe, prompt="a", image_path="x.png,", task="i2i"), "empty entry"),
        (lambda: LightX2VPipeline(model_path=t2i, model_cls="qwen_image", task="i2i").create_generator(),
         "needs an edit checkpoint"),
        (lambda: LightX2VPipeline(model_path=t2i, model_cls="qwen_image", task="t2i").create_generator(
            aspect_ratio="5:4"), "aspect_ratio='5:4' is not known"),
        (lambda: LightX2VPipeline(model_path=t2i, model_cls="qwen_image", task="t2i").create_generator(
            feature_caching="Tea", teacache_thresh=0.1, coefficients=[1.0, 0.0], use_ret_steps=False,
            use_tiling_vae=True), "feature_caching, use_tiling_vae: not implemented for qwen_image"),
        (lambda: _gen(pipe, prompt="a", infer_steps=1), "infer_steps must be >= 2"),
        (lambda: LightX2VPipeline(model_path=t2i, model_cls="qwen_image", task="t2v"), "does not do task 't2v'"),
        (lambda: LightX2VPipeline(model_path=t2i, model_cls="qwen_image", task="t2i").create_generator(
            prompt_template_encode="no slot"), "exactly one"),
        (lambda: LightX2VPipeline(model_path=t2i, model_cls="qwen_image", task="t2i").create_generator(
            vae_type="onnx"), "vae_type='onnx'"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match) as e:
            call()
        assert "\n" not in str(e.value), match


def test_checkpoint_cross_checks_before_any_weight_is_read(saved, tmp_path, monkeypatch):
    import json
    import shutil

    from lightx2v import loading
    from lightx2v.errors import CheckpointError

    folder, _ = saved["t2i"]
    bad = shutil.copytree(folder, tmp_path / "model")
    cfg_path = bad / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "joint_attention_dim": 48}))
    opened = []
    monkeypatch.setattr(loading, "safe_open", lambda *a, **k: opened.append(a) or pytest.fail("weights read"))
    with pytest.raises(CheckpointError, match="text encoder's width 32 does not match the DiT's joint_attention_dim 48"):
        LightX2VPipeline(model_path=bad, model_cls="qwen_image", task="t2i").create_generator()
    assert not opened


def test_model_class_aliases_carry_lightx2v_settings():
    from lightx2v.engine.family import family_of

    fam = family_of("qwen-image-edit")
    assert fam is family_of("qwen_image") is family_of("qwen-image-2512") and fam.tasks == ("t2i", "i2i")
    edit, plus = fam.defaults("qwen-image-edit", "i2i"), fam.defaults("qwen-image-edit-2511", "i2i")
    assert (edit["CONDITION_IMAGE_SIZE"], edit["USE_IMAGE_ID_IN_PROMPT"]) == (1024 * 1024, False)
    assert (plus["CONDITION_IMAGE_SIZE"], plus["USE_IMAGE_ID_IN_PROMPT"]) == (384 * 384, True)
    assert fam.defaults("qwen-image", "t2i")["prompt_template_encode_start_idx"] == 34
    assert fam.defaults("qwen_image", "i2i")["aspect_ratio"] == "auto"


# --- the CLI ----------------------------------------------------------------------------------------------------------


def test_cli_generate_t2i_on_the_tiny_model(tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    r = subprocess.run([sys.executable, "-m", "lightx2v.cli", "generate", "--model_cls", "qwen_image", "--task", "t2i",
                        "--prompt", "a red cat", "--save_result_path", str(out), "--infer_steps", "2",
                        "--no_progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as img:
        assert img.size == TINY_ASPECT_RATIOS["16:9"]  # the tiny model's table: LightX2V's 16:9 default


def test_cli_edit_and_bad_inputs_in_process(tmp_path, pictures, capsys):
    from PIL import Image

    out = tmp_path / "edit.png"
    base = ["generate", "--model_cls", "qwen_image", "--prompt", "make it blue", "--infer_steps", "2",
            "--no_progress", "--save_result_path", str(out)]
    assert cli_main(base + ["--task", "i2i", "--image_path", ",".join(pictures[1])]) == 0
    with Image.open(out) as img:  # the last image's aspect ratio (64x96) at the tiny model's resolution**2
        assert img.size[0] < img.size[1]
    capsys.readouterr()
    for extra, match in ((["--task", "t2i", "--aspect_ratio", "5:4"], "aspect_ratio='5:4' is not known"),
                         (["--task", "t2i", "--height", "100", "--width", "64"], "height=100 is not divisible by 16"),
                         (["--task", "i2i"], "needs image_path")):
        assert cli_main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0] and err[0].startswith("lightx2v: error:"), err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_cli_build_trt_without_tensorrt_is_one_line(saved, tmp_path, capsys):
    folder, _ = saved["t2i"]
    assert cli_main(["build-trt", "--model_path", str(folder), "--out", str(tmp_path / "engines")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightx2v: error:") and "tensorrt" in lines[0], lines
    assert not (tmp_path / "engines").exists()  # stopped before anything was written
    with pytest.raises(SystemExit) as e:  # argparse: one line, exit 2
        cli_main(["build-trt", "--model_path", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--out" in err[0]


def test_build_trt_arguments_reach_the_builder(saved, tmp_path, monkeypatch):
    """The sub-command passes its flags to trt.build_trt_engines (faked here: the real build needs a GPU)."""
    from lightx2v.models.qwen_image import trt

    calls = []
    monkeypatch.setattr(trt, "build_trt_engines", lambda *a, **k: calls.append((a, k)) or {})
    folder, _ = saved["t2i"]
    assert cli_main(["build-trt", "--model_path", str(folder), "--out", str(tmp_path), "--multi_profile",
                     "--profiles", "512x512,720x1280", "--precision", "bf16", "--parts", "decoder"]) == 0
    (args, kw), = calls
    assert args == (str(folder), str(tmp_path)) and kw["multi_profile"] and kw["profiles"] == [(512, 512), (720, 1280)]
    assert kw["precision"] == "bf16" and kw["parts"] == ["decoder"] and kw["check"]
    assert cli_main(["build-trt", "--model_path", str(folder), "--out", str(tmp_path), "--profiles", "1x"]) == 2


# --- the DiT's runtime features (the built-in tiny model) -------------------------------------------------------------

FEATURE = dict(infer_steps=2, aspect_ratio="3:4")


def _tiny(**kw):
    return LightX2VPipeline(model_cls="qwen_image", task="t2i").create_generator(**FEATURE, **kw)


@pytest.fixture(scope="module")
def tiny_base():
    pipe = _tiny()
    return pipe, _gen(pipe, seed=1, prompt="a cat")


@pytest.mark.parametrize("granularity", ["block", "phase", "model"])
def test_offload_is_bit_identical(tiny_base, granularity):
    pipe, base = tiny_base
    off = _tiny(cpu_offload=True, offload_granularity=granularity)
    assert torch.equal(_gen(off, seed=1, prompt="a cat"), base)
    stats = off.runner.transformer.offload.stats()
    blocks = len(pipe.runner.transformer.dit.transformer_blocks)
    units = {"block": blocks, "phase": 3 * blocks, "model": None}[granularity]
    if units is not None:  # every unit streamed in at each of the 2 steps x 2 CFG forwards (+ the embeddings)
        assert stats.copies >= 4 * units


def _lora_tensors(dit, seed=0):
    """(module name, down [r, in], up [out, r]) for three linears of the tiny DiT (attention, MLP, adaLN)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.0.proj",
                 "transformer_blocks.0.txt_mod.1"):
        w = dit.get_submodule(name).weight
        out.append((name, torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g) * 0.5))
    return out


def test_lora_merge_in_release_kohya_and_peft_names(tiny_base, tmp_path):
    pipe, base = tiny_base
    dit = pipe.runner.transformer.dit
    parts = _lora_tensors(dit)
    alpha, strength = 8.0, 0.7
    release, kohya, peft = {}, {}, {}
    for name, down, up in parts:  # release (diffusers) module names, LightX2V / Lightning style down/up + alpha
        release[f"{name}.lora_down.weight"], release[f"{name}.lora_up.weight"] = down, up
        release[f"{name}.alpha"] = torch.tensor(alpha)
        flat = "lora_unet_" + name.replace(".", "_")
        kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = down, up
        kohya[f"{flat}.alpha"] = torch.tensor(alpha)
        # diffusers / PEFT: the pipeline component's prefix, lora_A / lora_B
        peft[f"transformer.{name}.lora_A.weight"], peft[f"transformer.{name}.lora_B.weight"] = down, up
        peft[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    files = {}
    for kind, sd in (("release", release), ("kohya", kohya), ("peft", peft)):
        files[kind] = str(tmp_path / f"{kind}.safetensors")
        save_file(sd, files[kind])
    merged = {}
    for kind, path in files.items():
        p = _tiny(lora_configs=[{"path": path, "strength": strength}])
        merged[kind] = (p, _gen(p, seed=1, prompt="a cat"))
        sd, ref = p.runner.transformer.dit.state_dict(), dit.state_dict()
        for name, down, up in parts:  # W + s * alpha / r * up @ down
            assert torch.allclose(sd[f"{name}.weight"], ref[f"{name}.weight"] + strength * alpha / 4 * (up @ down),
                                  rtol=0, atol=1e-6), (kind, name)
        untouched = [k for k in ref if not any(k.startswith(n + ".") for n, _, _ in parts)]
        assert all(torch.equal(sd[k], ref[k]) for k in untouched)
    assert torch.equal(merged["release"][1], merged["kohya"][1]) and torch.equal(merged["release"][1],
                                                                                merged["peft"][1])
    assert _max(merged["release"][1], base) > 10 * PIXEL_TOL  # the LoRA changes the image
    # dynamic: beside the weights, switchable per request and between requests
    dyn = _tiny(lora_configs=[{"path": files["kohya"], "strength": strength}], lora_mode="dynamic")
    assert _max(_gen(dyn, seed=1, prompt="a cat"), merged["release"][1]) < 1e-4
    assert torch.equal(_gen(dyn, seed=1, prompt="a cat", lora_configs=[]), base)
    dyn.switch_lora([{"path": files["release"], "strength": strength}])
    assert _max(_gen(dyn, seed=1, prompt="a cat"), merged["release"][1]) < 1e-4
    with pytest.raises(UserError, match="dynamic"):
        _gen(pipe, seed=1, prompt="a cat", lora_configs=[])


# Measured on the tiny model (2 steps, 96x128, 8-bit weights per output channel and activations per token):
# max / mean abs per pixel int8 0.048 / 0.0022, fp8 (3 mantissa bits: ~4x int8's rounding) 0.18 / 0.0088; another
# prompt moves the image by 0.68 max.
@pytest.mark.parametrize("scheme, max_tol, mean_tol", [("int8", 0.08, 0.004), ("fp8-sgl", 0.3, 0.015)])
def test_quantized_dit_within_tolerance(tiny_base, scheme, max_tol, mean_tol):
    from lightx2v.ops.quant import QuantLinear

    pipe, base = tiny_base
    q = _tiny(dit_quant_scheme=scheme)
    dit = q.runner.transformer.dit
    assert isinstance(dit.transformer_blocks[0].attn.to_q, QuantLinear)
    assert isinstance(dit.transformer_blocks[1].img_mod[1], QuantLinear)
    assert type(dit.img_in) is torch.nn.Linear and type(dit.proj_out) is torch.nn.Linear  # outside the blocks
    got = _gen(q, seed=1, prompt="a cat")
    err = (got - base).abs()
    assert 0 < err.max() <= max_tol and err.mean() <= mean_tol, (err.max(), err.mean())
    other_prompt = (_gen(pipe, seed=1, prompt="a red car in the snow") - base).abs()
    assert other_prompt.mean() > 5 * err.mean()  # quantization moves the image far less than the prompt does
    offloaded = _tiny(dit_quant_scheme=scheme, cpu_offload=True, offload_granularity="block")
    assert torch.equal(_gen(offloaded, seed=1, prompt="a cat"), got)  # int8 / fp8 buffers stream bit-exactly
