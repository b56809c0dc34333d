"""Whole T2V generations: ours against diffusers' WanPipeline on the same tiny checkpoint (CPU, float32)."""

import numpy as np
import pytest
import torch

from lightx2v import LightX2VPipeline
from lightx2v.convert import convert_checkpoint
from tiny_reference import FLOW_SHIFT

pytest.importorskip("diffusers")

REQ = dict(height=32, width=48, num_frames=9, infer_steps=6, guidance_scale=5.0)
PROMPT, NEG = "a red cat jumps over the fence", "blurry"


def reference(pipe, prompt=PROMPT, seed=7, steps=REQ["infer_steps"]):
    out = pipe(prompt=prompt, negative_prompt=NEG, height=REQ["height"], width=REQ["width"],
               num_frames=REQ["num_frames"], num_inference_steps=steps, guidance_scale=REQ["guidance_scale"],
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return torch.from_numpy(np.asarray(out.frames[0]))  # [F, H, W, 3] in [0, 1]


def ours(model_dir, prompt=PROMPT, seed=7, **kw):
    pipe = LightX2VPipeline(model_path=model_dir, model_cls="wan2.1", task="t2v")
    pipe.create_generator(device="cpu", sample_shift=FLOW_SHIFT, **{**REQ, **kw})
    frames = pipe.generate(seed=seed, prompt=prompt, negative_prompt=NEG, return_result_tensor=True,
                              progress=False)["video"]
    return frames


@pytest.fixture(scope="module")
def ref_frames(tiny_diffusers_t2v):
    return reference(tiny_diffusers_t2v[1])


def test_t2v_matches_diffusers_pipeline(tiny_diffusers_t2v, ref_frames):
    model_dir, _ = tiny_diffusers_t2v
    got = ours(model_dir)
    assert got.shape == ref_frames.shape == (9, 32, 48, 3)
    assert (got - ref_frames).abs().max().item() <= 5e-3


def test_t2v_matches_after_conversion_to_wan_layout(tiny_diffusers_t2v, ref_frames, tmp_path):
    model_dir, _ = tiny_diffusers_t2v
    wan_dir = convert_checkpoint(model_dir, tmp_path / "wan", layout="wan")
    assert (wan_dir / "Wan2.1_VAE.pth").is_file() and (wan_dir / "config.json").is_file()
    got = ours(wan_dir)
    assert (got - ref_frames).abs().max().item() <= 5e-3
    # ... and back to diffusers, which diffusers itself can load
    back = convert_checkpoint(wan_dir, tmp_path / "back", layout="diffusers")
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(back)
    pipe.scheduler = tiny_diffusers_t2v[1].scheduler
    assert (reference(pipe) - ref_frames).abs().max().item() <= 1e-5


def test_parity_check_can_fail(tiny_diffusers_t2v, ref_frames):
    """Changing the prompt, the seed or the step count moves the output far beyond the 5e-3 tolerance."""
    model_dir, _ = tiny_diffusers_t2v
    for kw in (dict(prompt="a blue whale sings under the sea"), dict(seed=8), dict(infer_steps=5)):
        assert (ours(model_dir, **kw) - ref_frames).abs().max().item() > 5e-2, kw


def test_t2v_euler_solver_matches_diffusers(tiny_diffusers_t2v, ref_frames):
    import diffusers

    model_dir, pipe = tiny_diffusers_t2v
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    ref = diffusers.WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=pipe.transformer,
                                vae=pipe.vae, scheduler=euler)
    want = reference(ref)
    got = ours(model_dir, sample_solver="euler")
    assert (got - want).abs().max().item() <= 5e-3
    assert (want - ref_frames).abs().max().item() > 5e-2  # the solver matters at this step count


def test_no_cfg_matches_diffusers_guidance_one(tiny_diffusers_t2v):
    model_dir, pipe = tiny_diffusers_t2v
    out = pipe(prompt=PROMPT, height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(3), output_type="np")
    want = torch.from_numpy(np.asarray(out.frames[0]))
    got = ours(model_dir, seed=3, infer_steps=4, enable_cfg=False)
    assert (got - want).abs().max().item() <= 5e-3
