"""Qwen-Image end to end against diffusers' pipelines (tiny random models saved by diffusers, CPU float32): the text
encoder's embeddings, whole text-to-image and edit generations (Edit: one image; Edit-Plus: two, with zero_cond_t as
in Edit-2511) to <= 5e-3 per pixel with true CFG on, the can-fail checks, stage isolation and request errors."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from qwen_reference import OTHER_PROMPT, PROMPT, build_pipeline, picture, save_pipeline

from lightx2v.errors import UserError
from lightx2v.models.qwen_image import stages
from lightx2v.models.qwen_image.stages import (QwenImageDecoder, QwenImageEncoder, QwenImageOptions,
                                               QwenImageRequest, QwenImageTransformer, generate)
from lightx2v.models.qwen_image.text_encoder import EDIT_DROP_IDX, EDIT_TEMPLATE, T2I_DROP_IDX, T2I_TEMPLATE

PIXEL_TOL = 5e-3
# The edit pipelines encode their images at 1024**2 pixels for the VAE and (Edit-Plus) 384**2 for the vision tower;
# these tests run them at smaller areas (the reference's own area constants patched, ours set to the same values) to
# stay fast; test_edit_preprocessing_at_release_areas checks the preprocessing at the real areas.
VAE_AREA, COND_AREA = 192 * 192, 96 * 96


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (model folder saved by diffusers, the diffusers pipeline)."""
    out = {}
    for variant in ("t2i", "edit", "edit_plus"):
        root = tmp_path_factory.mktemp(f"qwen-{variant}")
        pipe = build_pipeline(variant, root / "tok", zero_cond_t=variant == "edit_plus")
        out[variant] = (save_pipeline(pipe, root / "model"), pipe)
    return out


@pytest.fixture
def small_areas(monkeypatch):
    """Patch the reference's image areas (1024**2 -> VAE_AREA, 384**2 -> COND_AREA) in both edit pipelines."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for module in (edit, plus):
        original = module.calculate_dimensions
        mapping = {1024 * 1024: VAE_AREA, 384 * 384: COND_AREA}
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, f=original: f(mapping.get(area, area), ratio))
    return QwenImageOptions(vae_image_size=VAE_AREA, resolution=math.isqrt(VAE_AREA))


def _reference(pipe, request: QwenImageRequest, **extra):
    kw = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, true_cfg_scale=request.guidance_scale,
              num_inference_steps=request.infer_steps, generator=torch.Generator().manual_seed(request.seed),
              output_type="np", **extra)
    if request.height is not None:
        kw.update(height=request.height, width=request.width)
    return torch.from_numpy(pipe(**kw).images)


def _inverted(image):
    from PIL import ImageOps

    return ImageOps.invert(image)


def _max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- text encoder ---------------------------------------------------------------------------------------------


def test_tiny_tokenizer_drops_exactly_the_template_header(saved):
    _, pipe = saved["t2i"]
    tok = pipe.tokenizer
    assert len(tok(T2I_TEMPLATE.split("{}")[0]).input_ids) == T2I_DROP_IDX == pipe.prompt_template_encode_start_idx
    assert len(tok(EDIT_TEMPLATE.split("{}")[0]).input_ids) == EDIT_DROP_IDX


def test_text_embeddings_match_diffusers(saved):
    from lightx2v.models.qwen_image.text_encoder import PromptFormat, load_text_encoder

    folder, pipe = saved["t2i"]
    te = load_text_encoder(folder)
    fmt = PromptFormat.for_variant("t2i", "t2i")
    for prompt in (PROMPT, "", "word " * 600):  # the last: truncated to 512 embeddings
        want, mask = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=512)  # __call__'s default
        got = te.encode(prompt, fmt)
        assert mask is None and got.shape == want.shape
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert want.shape[1] == 512
    assert _max_abs(te.encode(OTHER_PROMPT, fmt)[0, :5], te.encode(PROMPT, fmt)[0, :5]) > 0.1


@pytest.mark.parametrize("variant", ["edit", "edit_plus"])
def test_text_embeddings_with_images_match_diffusers(saved, variant):
    from lightx2v.models.qwen_image.text_encoder import PromptFormat, load_text_encoder

    folder, pipe = saved[variant]
    te = load_text_encoder(folder, with_images=True)
    fmt = PromptFormat.for_variant(variant, "i2i")
    images = [picture(96, 64, 1)] if variant == "edit" else [picture(96, 64, 1), picture(64, 80, 2)]
    want, _ = pipe.encode_prompt(PROMPT, image=images if variant == "edit_plus" else images[0], device="cpu")
    got = te.encode(PROMPT, fmt, images)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-5)
    # the token ids are the processor's
    text = fmt.text(PROMPT, len(images))
    ref_ids = pipe.processor(text=[text], images=images, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(te.inputs(PROMPT, fmt, images)["input_ids"], ref_ids)
    # can fail: another image changes the embeddings
    other = te.encode(PROMPT, fmt, [_inverted(images[0])] + images[1:])
    assert _max_abs(other, got) > 0.01


def test_text_encoder_checkpoint_names(saved, tmp_path):
    """Older transformers saved Qwen2.5-VL as model.* + visual.*; both namings load, lm_head is never read."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lightx2v import loading
    from lightx2v.models.qwen_image import text_encoder as te_mod

    folder, _ = saved["t2i"]
    shutil.copytree(folder / "text_encoder", tmp_path / "text_encoder")
    shutil.copytree(folder / "tokenizer", tmp_path / "tokenizer")
    weights = tmp_path / "text_encoder" / "model.safetensors"
    sd = load_file(str(weights))
    old = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v for k, v in sd.items()}
    save_file(old, str(weights))
    read = []

    class Recording:
        def __init__(self, *a, **k):
            self.f = safe_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def keys(self):
            return self.f.keys()

        def get_slice(self, k):
            return self.f.get_slice(k)

        def get_tensor(self, k):
            read.append(k)
            return self.f.get_tensor(k)

    loading.safe_open, original = Recording, loading.safe_open
    try:
        te = te_mod.load_text_encoder(tmp_path)
    finally:
        loading.safe_open = original
    ref = te_mod.load_text_encoder(folder)
    assert "lm_head.weight" not in read and len(read) == len(old) - 1
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k, v in te.model.state_dict().items())


# --- whole generations ----------------------------------------------------------------------------------------


def test_t2i_matches_diffusers_with_true_cfg(saved):
    folder, pipe = saved["t2i"]
    req = QwenImageRequest(prompt=PROMPT, negative_prompt="blurry", seed=3, height=64, width=96, infer_steps=3,
                           guidance_scale=4.0)
    want = _reference(pipe, req)
    got = generate(folder, req)
    assert got.shape == (1, 64, 96, 3) and got.dtype == torch.float32
    assert _max_abs(got, want) <= PIXEL_TOL
    # can fail: another prompt or seed moves the image by far more than the tolerance
    for change in ({"prompt": OTHER_PROMPT}, {"seed": 4}):
        other = generate(folder, replace(req, **change))
        assert _max_abs(other, got) > 10 * PIXEL_TOL, change


def test_t2i_without_cfg_matches_diffusers(saved):
    folder, pipe = saved["t2i"]
    req = QwenImageRequest(prompt=PROMPT, seed=5, height=48, width=48, infer_steps=2, guidance_scale=1.0)
    want = torch.from_numpy(pipe(prompt=PROMPT, height=48, width=48, num_inference_steps=2, true_cfg_scale=1.0,
                                 generator=torch.Generator().manual_seed(5), output_type="np").images)
    assert _max_abs(generate(folder, req), want) <= PIXEL_TOL


def test_edit_matches_diffusers(saved, small_areas):
    folder, pipe = saved["edit"]
    image = picture(120, 80, 1)
    req = QwenImageRequest(prompt=PROMPT, seed=7, task="i2i", infer_steps=2, guidance_scale=4.0, images=[image])
    want = _reference(pipe, req, image=image)  # no size: the image's aspect ratio at the (patched) area
    got = generate(folder, req, options=small_areas)
    assert got.shape == want.shape and got.shape[1:3] == (160, 224)
    assert _max_abs(got, want) <= PIXEL_TOL
    other = generate(folder, replace(req, images=(_inverted(image),)), options=small_areas)
    assert _max_abs(other, got) > 10 * PIXEL_TOL


def test_edit_plus_two_images_matches_diffusers(saved, small_areas):
    folder, pipe = saved["edit_plus"]
    assert pipe.transformer.config.zero_cond_t  # Edit-2511's modulation of the condition tokens
    images = [picture(120, 80, 1), picture(64, 96, 2)]
    req = QwenImageRequest(prompt=PROMPT, seed=11, task="i2i", height=64, width=80, infer_steps=2,
                           guidance_scale=3.0, images=images)
    want = _reference(pipe, req, image=images)
    options = replace(small_areas, condition_image_size=COND_AREA)
    got = generate(folder, req, options=options)
    assert _max_abs(got, want) <= PIXEL_TOL
    other = generate(folder, replace(req, images=(images[0], _inverted(images[1]))), options=options)
    assert _max_abs(other, got) > 10 * PIXEL_TOL


def test_edit_preprocessing_at_release_areas():
    """Our resize of edit images equals the pipelines' at the real areas (1024**2 VAE, 384**2 vision)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    proc = VaeImageProcessor(vae_scale_factor=16)
    image = picture(640, 427, 3)
    [(_, cond, vae_tensor, (vh, vw))] = stages.edit_images([image], 384 * 384, 1024 * 1024)
    cw, ch = calculate_dimensions(384 * 384, 640 / 427)
    ww, wh = calculate_dimensions(1024 * 1024, 640 / 427)
    assert (cond.size, (vw, vh)) == ((cw, ch), (ww, wh)) == ((480, 320), (1248, 832))
    assert np.array_equal(np.asarray(cond), np.asarray(proc.resize(image, ch, cw)))
    assert torch.equal(vae_tensor, proc.preprocess(image, wh, ww))


# --- sizes, stages, errors ------------------------------------------------------------------------------------


def test_sizes_from_aspect_ratio_and_defaults(saved):
    folder, _ = saved["t2i"]
    enc = QwenImageEncoder(folder)
    for ratio, (w, h) in (("16:9", (1664, 928)), ("3:4", (1104, 1472)), ("1:1", (1328, 1328))):
        e = enc.encode(QwenImageRequest(prompt="a", aspect_ratio=ratio, enable_cfg=False))
        assert (e.height, e.width, e.latent_shape) == (h, w, (1, 16, h // 8, w // 8))
        assert e.image_shapes == ((1, h // 16, w // 16),) and e.negative_prompt_embeds is None
    e = enc.encode(QwenImageRequest(prompt="a"))  # nothing asked: LightX2V's configs' 16:9
    assert (e.width, e.height) == (1664, 928) and e.negative_prompt_embeds is not None
    e = enc.encode(QwenImageRequest(prompt="a", aspect_ratio="1:1", height=64, width=32))  # explicit size wins
    assert (e.height, e.width) == (64, 32)


def test_each_stage_opens_only_its_own_files(saved, monkeypatch, small_areas):
    from safetensors import safe_open

    from lightx2v import loading

    folder, _ = saved["edit_plus"]
    opened = []

    def recording(path, *a, **k):
        opened.append(str(path))
        return safe_open(path, *a, **k)

    monkeypatch.setattr(loading, "safe_open", recording)  # every loader opens safetensors through loading.py

    def components(stage_cls):
        opened.clear()
        stage = stage_cls(folder, options=small_areas)
        return stage, {p.split("/")[-2] for p in opened}

    enc, comps = components(QwenImageEncoder)
    assert comps == {"text_encoder", "vae"}
    assert {k.split(".")[0] for k in enc.vae.state_dict()} == {"encoder", "conv1"}  # the VAE's encoder half only
    _, comps = components(QwenImageTransformer)
    assert comps == {"transformer"}
    dec, comps = components(QwenImageDecoder)
    assert comps == {"vae"} and {k.split(".")[0] for k in dec.vae.state_dict()} == {"decoder", "conv2"}
    t2i_folder, _ = saved["t2i"]
    opened.clear()
    QwenImageEncoder(t2i_folder)
    assert {p.split("/")[-2] for p in opened} == {"text_encoder"}  # text-to-image: no VAE encoder


def test_stage_messages_run_apart(saved, small_areas):
    """The three stages in sequence give generate()'s image; the messages are tensors and plain values."""
    from dataclasses import fields

    folder, _ = saved["edit_plus"]
    req = QwenImageRequest(prompt=PROMPT, seed=2, task="i2i", height=48, width=64, infer_steps=2,
                           images=[picture(100, 70, 4)])
    opts = QwenImageOptions(vae_image_size=VAE_AREA, condition_image_size=COND_AREA)
    encoded = QwenImageEncoder(folder, options=opts).encode(req)
    for f in fields(encoded):
        v = getattr(encoded, f.name)
        assert v is None or isinstance(v, (torch.Tensor, int, tuple)), f.name
    steps = []
    latents = QwenImageTransformer(folder, options=opts).denoise(encoded, req, on_step=lambda i, n: steps.append(
        (i, n)))
    assert steps == [(0, 2), (1, 2)] and latents.shape == encoded.latent_shape
    frames = QwenImageDecoder(folder, options=opts).decode(latents, encoded)
    assert torch.equal(frames, generate(folder, req, options=opts))
    assert 0 <= frames.min() and frames.max() <= 1


@pytest.mark.parametrize("kwargs, match", [
    ({"aspect_ratio": "5:4"}, "aspect_ratio='5:4'"),
    ({"height": 100, "width": 64}, "height=100 must be a positive multiple of 16"),
    ({"height": 64}, "both height and width"),
    ({"task": "i2i"}, "needs at least one image"),
    ({"images": ["x.png"]}, "t2i takes no images"),
    ({"task": "t2v"}, "task='t2v'"),
    ({"infer_steps": 0}, "infer_steps=0"),
    ({"guidance_scale": -1}, "guidance_scale=-1"),
    ({"sample_shift": 0}, "sample_shift=0"),
])
def test_bad_requests_are_one_line_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        QwenImageRequest(prompt="a", **kwargs)
    assert "\n" not in str(e.value)


def test_task_checkpoint_mismatches(saved, small_areas):
    t2i_folder, _ = saved["t2i"]
    edit_folder, _ = saved["edit"]
    with pytest.raises(UserError, match="needs an edit checkpoint"):
        QwenImageEncoder(t2i_folder).encode(QwenImageRequest(prompt="a", task="i2i", images=[picture(32, 32, 1)]))
    with pytest.raises(UserError, match="takes one image"):
        QwenImageEncoder(edit_folder, options=small_areas).encode(
            QwenImageRequest(prompt="a", task="i2i", images=[picture(32, 32, 1), picture(32, 32, 2)]))
    with pytest.raises(UserError, match="does not exist"):
        QwenImageEncoder(edit_folder, options=small_areas).encode(
            QwenImageRequest(prompt="a", task="i2i", images=["/nope.png"]))
