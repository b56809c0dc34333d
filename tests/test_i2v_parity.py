"""Whole I2V / FLF2V generations: ours against diffusers' WanImageToVideoPipeline (tiny models, CPU, float32)."""

import numpy as np
import pytest
import torch

from lightx2v import LightX2VPipeline
from lightx2v.convert import convert_checkpoint
from lightx2v.io.image import adaptive_size, center_crop_to_aspect
from tiny_reference import FLOW_SHIFT, build_diffusers_wan_i2v_pipeline, picture

pytest.importorskip("diffusers")

H, W, F, STEPS = 32, 48, 9, 5
PROMPT, NEG = "the cat turns its head", "blurry"



@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    d = tmp_path_factory.mktemp("i2v")
    pipe = build_diffusers_wan_i2v_pipeline(d / "tok")
    pipe.save_pretrained(d / "model")
    return d / "model", pipe


@pytest.fixture(scope="module")
def flf2v(tmp_path_factory):
    d = tmp_path_factory.mktemp("flf2v")
    pipe = build_diffusers_wan_i2v_pipeline(d / "tok", flf=True)
    pipe.save_pretrained(d / "model")
    return d / "model", pipe


def reference(pipe, image, height=H, width=W, last_image=None, seed=11):
    kw = dict(last_image=last_image) if last_image is not None else {}
    out = pipe(image=image, prompt=PROMPT, negative_prompt=NEG, height=height, width=width, num_frames=F,
               num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
               output_type="np", **kw)
    return torch.from_numpy(np.asarray(out.frames[0]))


def ours(model_dir, task, image, last=None, seed=11, **kw):
    pipe = LightX2VPipeline(model_path=model_dir, model_cls="wan2.1", task=task)
    pipe.create_generator(device="cpu", sample_shift=FLOW_SHIFT, height=H, width=W, num_frames=F, infer_steps=STEPS,
                          guidance_scale=5.0, **kw)
    frames = pipe.generate(seed=seed, prompt=PROMPT, negative_prompt=NEG, image_path=image, last_frame_path=last,
                              return_result_tensor=True, progress=False)["video"]
    return frames


def test_i2v_crop_matches_diffusers(i2v):
    model_dir, pipe = i2v
    img = picture(90, 40, 0)  # wider than 48:32, so the crop matters
    want = reference(pipe, center_crop_to_aspect(img, W, H))
    got = ours(model_dir, "i2v", img, resize_mode="crop")
    assert got.shape == want.shape == (F, H, W, 3)
    assert (got - want).abs().max().item() <= 5e-3
    # the image matters: another picture moves the video far beyond the tolerance
    assert (ours(model_dir, "i2v", picture(90, 40, 1), resize_mode="crop") - want).abs().max().item() > 5e-2


def test_i2v_stretch_and_adaptive_match_diffusers(i2v, tmp_path):
    model_dir, pipe = i2v
    img = picture(40, 60, 2)
    want = reference(pipe, img)
    assert (ours(model_dir, "i2v", img, resize_mode="stretch") - want).abs().max().item() <= 5e-3
    h, w = adaptive_size(img, H * W)
    assert (h, w) == (48, 32)  # portrait picture -> portrait video within the same pixel budget
    want = reference(pipe, img, height=h, width=w)
    path = tmp_path / "portrait.png"
    img.save(path)
    got = ours(model_dir, "i2v", str(path), resize_mode="adaptive")
    assert got.shape == (F, h, w, 3) and (got - want).abs().max().item() <= 5e-3


def test_i2v_after_conversion_to_wan_layout(i2v, tmp_path):
    model_dir, pipe = i2v
    img = picture(48, 32, 3)
    wan = convert_checkpoint(model_dir, tmp_path / "wan", layout="wan")
    assert (wan / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").is_file()
    assert (ours(wan, "i2v", img) - reference(pipe, img)).abs().max().item() <= 5e-3


def test_flf2v_matches_diffusers(flf2v, tmp_path):
    model_dir, pipe = flf2v
    first, last = picture(48, 32, 4), picture(48, 32, 5)
    want = reference(pipe, first, last_image=last)
    got = ours(model_dir, "flf2v", first, last)
    assert (got - want).abs().max().item() <= 5e-3
    wan = convert_checkpoint(model_dir, tmp_path / "wan", layout="wan")
    assert (ours(wan, "flf2v", first, last) - want).abs().max().item() <= 5e-3
    assert (ours(model_dir, "flf2v", first, picture(48, 32, 6)) - want).abs().max().item() > 5e-2


def test_task_must_fit_checkpoint(i2v):
    from lightx2v.errors import UserError

    with pytest.raises(UserError, match="image-to-video model"):
        LightX2VPipeline(model_path=i2v[0], task="t2v").create_generator(device="cpu")
