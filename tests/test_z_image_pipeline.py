"""Z-Image whole generations against diffusers' ``ZImagePipeline`` (CPU, float32), the seed example's call sequence on
the built-in tiny model, strict loading, stage isolation and request validation."""

import json
import shutil

import pytest
import torch

from z_image_reference import SEED_PROMPT, tiny_diffusers_pipeline

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.z_image import checkpoint as ckpt
from lightx2v.models.z_image.stages import (ASPECT_RATIOS, ZImageDecoder, ZImageEncoder, ZImageOptions, ZImageRequest,
                                            ZImageTransformer, generate)
from lightx2v.models.z_image.tiny import TINY_ASPECT_RATIOS, TINY_DEFAULTS, ensure_tiny_model, write_tiny_model

PIXEL_TOL = 5e-3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ZImagePipeline built by diffusers/transformers and saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("z-image-pipeline")
    pipe = tiny_diffusers_pipeline(folder / "tok")
    pipe.save_pretrained(folder / "model")
    return folder / "model", pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The built-in tiny model, through its cache helper (written once into a test folder)."""
    root = tmp_path_factory.mktemp("z-image-tiny")
    folder = ensure_tiny_model(root)
    assert ensure_tiny_model(root) == folder and (folder / "COMPLETE").is_file()
    return folder


def reference(pipe, request: ZImageRequest, height: int, width: int) -> torch.Tensor:
    """diffusers' image for the same request: LightX2V's guidance g is diffusers' g - 1 (CFG off at <= 1)."""
    out = pipe(request.prompt, negative_prompt=request.negative_prompt, height=height, width=width,
               num_inference_steps=request.infer_steps, guidance_scale=max(request.guidance_scale - 1.0, 0.0),
               generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np")
    return torch.from_numpy(out.images)


def max_abs(a, b) -> float:
    return (a - b).abs().max().item()


# ---- whole generations ---------------------------------------------------------------------------------------

def test_generation_matches_zimage_pipeline_and_can_fail(saved):
    folder, pipe = saved
    req = ZImageRequest(prompt="a red cat on a blue chair", seed=7, infer_steps=9, guidance_scale=1.0,
                        height=80, width=144)
    ours = generate(folder, req)
    want = reference(pipe, req, 80, 144)
    assert ours.shape == want.shape == (1, 80, 144, 3) and ours.dtype == torch.float32
    assert max_abs(ours, want) <= PIXEL_TOL
    # can fail: another prompt, seed or step count moves the image far beyond the tolerance
    for change in (dict(prompt="A coffee shop entrance with a neon light"), dict(seed=8), dict(infer_steps=4)):
        moved = generate(folder, ZImageRequest(**{**req.__dict__, **change}))
        assert max_abs(moved, want) > 20 * PIXEL_TOL, change


def test_cfg_generation_matches_zimage_pipeline(saved):
    """guidance_scale 3 (LightX2V's uncond + 3 (cond - uncond)) is diffusers' guidance_scale 2."""
    folder, pipe = saved
    req = ZImageRequest(prompt="a red cat on a blue chair", negative_prompt="blurry, low quality", seed=3,
                        infer_steps=4, guidance_scale=3.0, height=64, width=96)
    ours = generate(folder, req)
    assert max_abs(ours, reference(pipe, req, 64, 96)) <= PIXEL_TOL
    no_cfg = generate(folder, ZImageRequest(**{**req.__dict__, "enable_cfg": False}))
    other_negative = generate(folder, ZImageRequest(**{**req.__dict__, "negative_prompt": "a dog"}))
    assert max_abs(no_cfg, ours) > 20 * PIXEL_TOL and max_abs(other_negative, ours) > 20 * PIXEL_TOL


def test_scheduler_options_match_zimage_pipeline(saved, tmp_path):
    """Dynamic shifting (mu from the image-token count) and a request's sample_shift, against the same pipeline with
    that scheduler."""
    import diffusers

    folder, pipe = saved
    dyn = _copy(saved, tmp_path)
    path = dyn / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dynamic_shifting": True}))
    req = ZImageRequest(prompt="a red cat", seed=5, infer_steps=3, height=48, width=80)
    for model, sched_kw, request in ((dyn, dict(use_dynamic_shifting=True), req),
                                     (folder, dict(shift=5.0), ZImageRequest(**{**req.__dict__, "sample_shift": 5.0}))):
        base = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        sched = diffusers.FlowMatchEulerDiscreteScheduler(**{**base, **sched_kw})
        assert all(sched.config[k] == v for k, v in sched_kw.items())
        ref = diffusers.ZImagePipeline(**{**pipe.components, "scheduler": sched})
        want = reference(ref, request, 48, 80)
        assert max_abs(generate(model, request), want) <= PIXEL_TOL
        assert max_abs(generate(folder, req), want) > 20 * PIXEL_TOL  # the plain Turbo schedule differs


def test_guidance_0_and_1_run_one_forward_per_step(saved, monkeypatch):
    folder, _ = saved
    tr = ZImageTransformer(folder)
    enc = ZImageEncoder(folder)
    calls = []
    real = tr.dit.forward
    monkeypatch.setattr(tr.dit, "forward", lambda *a: calls.append(1) or real(*a))
    steps = []
    results = []
    for g in (0.0, 1.0):
        req = ZImageRequest(prompt="a cat", guidance_scale=g, infer_steps=3, height=32, width=32)
        e = enc.encode(req)
        assert e.negative_prompt_embeds is None
        results.append(tr.denoise(e, req, on_step=lambda i, n: steps.append((i, n))))
    assert len(calls) == 6 and steps == [(0, 3), (1, 3), (2, 3)] * 2
    assert torch.equal(results[0], results[1])
    calls.clear()
    req = ZImageRequest(prompt="a cat", guidance_scale=2.0, infer_steps=3, height=32, width=32)
    tr.denoise(enc.encode(req), req)
    assert len(calls) == 6  # CFG: two forwards per step


# ---- the seed example on the built-in tiny model ---------------------------------------------------------------

def test_seed_example_call_sequence_on_the_tiny_model(tiny, tmp_path):
    """LightX2V's Intel XPU Z-Image-Turbo example, through our family's pieces (the lead wires
    LightX2VPipeline(model_cls="z_image") onto them): only the model path changes, and "16:9" maps to a tiny size."""
    from PIL import Image

    from lightx2v.io.video import save_image

    # pipe = LightX2VPipeline(model_path=r"xxxx\models\Z-Image-Turbo", model_cls="z_image", task="t2i")
    model_path = tiny
    # pipe.create_generator(attn_mode="torch_sdpa", aspect_ratio="16:9", infer_steps=9, guidance_scale=1)
    generator_kw = dict(attn_mode="torch_sdpa", aspect_ratio="16:9", infer_steps=9, guidance_scale=1)
    seed = 42
    prompt = 'A coffee shop entrance features a chalkboard sign reading "Qwen Coffee 😊 $2 per cup," with a neon light beside it displaying "通义千问". Next to it hangs a poster showing a beautiful Chinese woman, and beneath the poster is written "π≈3.1415926-53589793-23846264-33832795-02384197". Ultra HD, 4K, cinematic composition, Ultra HD, 4K, cinematic composition.'  # noqa: E501
    assert prompt == SEED_PROMPT  # the string the module tests tokenize and encode
    negative_prompt = ""
    save_result_path = tmp_path / "output.png"
    # pipe.generate(seed=seed, prompt=prompt, negative_prompt=negative_prompt, save_result_path=save_result_path)
    request = ZImageRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                            aspect_ratio=generator_kw["aspect_ratio"], infer_steps=generator_kw["infer_steps"],
                            guidance_scale=generator_kw["guidance_scale"], aspect_ratios=TINY_ASPECT_RATIOS)
    frames = generate(model_path, request, options=ZImageOptions(attn_mode=generator_kw["attn_mode"]))
    save_image(frames[0], save_result_path)

    width, height = TINY_ASPECT_RATIOS["16:9"]
    with Image.open(save_result_path) as img:
        assert img.format == "PNG" and img.size == (width, height)
    assert not request.do_cfg  # guidance_scale=1: no CFG
    # the same request in diffusers' ZImagePipeline, loading our tiny model's folder
    import diffusers

    pipe = diffusers.ZImagePipeline.from_pretrained(str(model_path))
    assert max_abs(frames, reference(pipe, request, height, width)) <= PIXEL_TOL


def test_tiny_model_defaults_and_determinism(tiny, tmp_path):
    req = ZImageRequest(prompt="a cat", **{k: v for k, v in TINY_DEFAULTS.items()})
    assert req.size(16) == (80, 144) and req.infer_steps == 9 and not req.do_cfg
    again = write_tiny_model(tmp_path / "again")
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert (tiny / rel).read_bytes() == (again / rel).read_bytes(), rel


# ---- stages load only their own weights ----------------------------------------------------------------------

def test_each_stage_opens_only_its_own_weights(saved, monkeypatch):
    import safetensors

    folder, _ = saved
    opened = []
    real = safetensors.safe_open

    def recording(path, *a, **kw):
        opened.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", recording)
    for cls, sub in ((ZImageEncoder, "text_encoder"), (ZImageTransformer, "transformer"), (ZImageDecoder, "vae")):
        opened.clear()
        cls(folder)
        assert opened and all(p.startswith(str(folder / sub) + "/") for p in opened), (cls.__name__, opened)


def test_stage_messages_hold_tensors_and_plain_values(saved):
    folder, _ = saved
    req = ZImageRequest(prompt="a cat", guidance_scale=2.5, negative_prompt="a dog", aspect_ratio="1:1",
                        aspect_ratios={"1:1": [48, 48]}, infer_steps=2)
    e = ZImageEncoder(folder).encode(req)
    assert (e.height, e.width, e.latent_shape) == (48, 48, (1, 16, 6, 6))
    assert e.prompt_embeds.ndim == 2 and e.negative_prompt_embeds.shape[1] == 32
    lat = ZImageTransformer(folder).denoise(e, req)
    assert lat.shape == e.latent_shape and lat.dtype == torch.float32
    frames = ZImageDecoder(folder).decode(lat, e)
    assert frames.shape == (1, 48, 48, 3) and frames.min() >= 0 and frames.max() <= 1


# ---- strict loading ------------------------------------------------------------------------------------------

def _copy(saved, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(saved[0], dst)
    return dst


def test_dit_loading_reports_every_bad_key(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(saved, tmp_path)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["layers.1.attention.to_k.weight"]
    sd["layers.0.attention.to_q.weight"] = sd["layers.0.attention.to_q.weight"][:, :32].contiguous()
    sd["layers.9.feed_forward.w1.weight"] = torch.zeros(2, 2)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        ZImageTransformer(folder)
    msg = str(e.value)
    for word in ("missing keys: layers.1.attention.to_k.weight", "unexpected keys: layers.9.feed_forward.w1.weight",
                 "layers.0.attention.to_q.weight"):
        assert word in msg


def test_vae_and_files_missing_are_reported(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(saved, tmp_path)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["decoder.conv_out.bias"]
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        ZImageDecoder(folder)
    path.unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):
        ZImageDecoder(folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer"):
        ZImageEncoder(folder)


def test_bad_configs_and_paths_are_user_errors(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "siglip_feat_dim": 16}))
    with pytest.raises(CheckpointError, match="siglip_feat_dim"):
        ZImageTransformer(folder)
    cfg_path.write_text(json.dumps({**cfg, "in_channels": 4}))
    with pytest.raises(CheckpointError, match="latent channels"):
        ZImageEncoder(folder)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.model_root(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="diffusers layout"):
        ZImageDecoder(tmp_path / "empty")
    with pytest.raises(UserError, match="attention backend"):
        ZImageTransformer(saved[0], options=ZImageOptions(attn_mode="nope"))


# ---- requests ------------------------------------------------------------------------------------------------

def test_request_sizes_follow_lightx2v():
    assert ZImageRequest(prompt="x").size(16) == (928, 1664)  # default "16:9": LightX2V's 1664x928 (w x h)
    for name, (w, h) in ASPECT_RATIOS.items():
        assert ZImageRequest(prompt="x", aspect_ratio=name).size(16) == (h, w)
    assert ZImageRequest(prompt="x", height=512, width=768, aspect_ratio="bogus-ignored").size(16) == (512, 768)
    assert ZImageRequest(prompt="x", aspect_ratio="21:9", aspect_ratios={"21:9": [224, 96]}).size(16) == (96, 224)


@pytest.mark.parametrize("kw,word", [
    (dict(aspect_ratio="5:4"), "aspect_ratio"),
    (dict(height=512), "both height and width"),
    (dict(height=8, width=512), "height"),
    (dict(infer_steps=0), "infer_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(enable_cfg=True, guidance_scale=1.0), "enable_cfg"),
    (dict(seed=-1), "seed"),
    (dict(seed=True), "seed"),
    (dict(sample_shift=0.0), "sample_shift"),
    (dict(prompt=None), "prompt"),
    (dict(aspect_ratios={"1:1": [100]}), "aspect_ratios"),
])
def test_request_validation(kw, word):
    with pytest.raises(UserError, match=word):
        ZImageRequest(**{"prompt": "x", **kw})


def test_size_must_fit_the_model(saved):
    with pytest.raises(UserError, match="multiples of 16"):
        ZImageRequest(prompt="x", height=520, width=512).size(16)
    enc = ZImageEncoder(saved[0])
    with pytest.raises(UserError, match="multiples of 16"):
        enc.encode(ZImageRequest(prompt="x", height=40, width=64))


# ---- configs -------------------------------------------------------------------------------------------------

def test_shipped_configs_map_onto_the_family(tiny):
    from pathlib import Path

    from lightx2v.models.z_image.checkpoint import read_dit_config
    from lightx2v.models.z_image.stages import check_config, split_config

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted((root / "z_image").glob("*.json")) + [root / "platforms" / "intel_xpu" / "z_image_turbo_t2i.json"]
    assert len(paths) >= 2
    for path in paths:
        req_kw, opt_kw, checks = split_config(json.loads(path.read_text()))
        req = ZImageRequest(prompt="x", **req_kw)
        assert req.infer_steps == 9 and not req.do_cfg and req.aspect_ratio in ASPECT_RATIOS
        ZImageOptions(**opt_kw)
        check_config(checks, read_dit_config(tiny))  # 16 latent channels, patch 2: as the release
    with pytest.raises(UserError, match="infer_step"):
        split_config({"infer_step": 9})
    with pytest.raises(UserError, match="num_channels_latents"):
        check_config(split_config({"num_channels_latents": 48})[2], read_dit_config(tiny))
