"""Step-distilled sampling (denoising_step_list, wan2.1_distill, dit_original_ckpt) and changing resolution."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightx2v import LightX2VPipeline
from lightx2v.config import build_config
from lightx2v.errors import UserError
from lightx2v.models.wan.tiny import ensure_tiny_model
from lightx2v.schedulers.distill import StepDistillScheduler

SMALL = dict(height=32, width=48, num_frames=5)


def test_distill_schedule_is_lightx2v_formula():
    sched = StepDistillScheduler([1000, 750, 500, 250], shift=5.0)
    sched.set_timesteps(4)
    # sigma = 1 - i/1000 at i = 1000 - step, shifted: 5s / (1 + 4s) -> 1, 0.9375, 0.8333.., 0.625
    torch.testing.assert_close(sched.sigmas, torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625, 0.0]))
    torch.testing.assert_close(sched.timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    s3 = StepDistillScheduler([1000, 500], shift=3.0)
    s3.set_timesteps()
    torch.testing.assert_close(s3.sigmas, torch.tensor([1.0, 0.75, 0.0]))  # 3 * 0.5 / (1 + 2 * 0.5)


def lightx2v_step_distill_update(x, v, sigmas, i):
    """LightX2V's WanStepDistillScheduler.step_post (and Wan22StepDistillScheduler's), written out: float32,
    x0 = x - sigma_i * v, then (not at the last step) x0 + sigma_{i+1} * v. ``sigmas`` without the final 0."""
    x0 = x.float() - sigmas[i] * v.float()
    if i < len(sigmas) - 1:
        x0 = x0 + v.float() * sigmas[i + 1]
    return x0


def test_distill_step_is_lightx2v_update():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 4, generator=g)
    sched = StepDistillScheduler([1000, 500], shift=3.0)
    sched.set_timesteps()
    sigmas = sched.sigmas[:-1].tolist()  # [1.0, 0.75]
    out = sched.step(v, x)
    torch.testing.assert_close(out, lightx2v_step_distill_update(x, v, sigmas, 0), rtol=0, atol=0)
    torch.testing.assert_close(out, x - 0.25 * v)  # deterministic: the same velocity, sigma 1 -> 0.75
    x2 = torch.randn(x.shape, generator=g)
    torch.testing.assert_close(sched.step(v, x2), x2 - 0.75 * v)  # last step: the clean prediction
    # the update before this fix re-noised the clean prediction with fresh noise: far from LightX2V's
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    old = 0.25 * (x - 1.0 * v) + 0.75 * noise
    assert (old - out).abs().max() > 0.5


def _record_denoise(pipe):
    """(latents in, velocity out) of every DiT forward of every expert, in call order."""
    calls = []
    out_dim = pipe.runner.transformer.experts[0].dit.cfg.out_dim
    for e in pipe.runner.transformer.experts:
        e.dit.register_forward_hook(lambda m, a, o: calls.append((a[0][:, :out_dim].float().clone(), o.float())))
    return calls


@pytest.mark.parametrize("model_cls,task", [("wan2.1_distill", "t2v"), ("wan2.2_moe_distill", "t2v")])
def test_distill_trajectory_follows_lightx2v_update(model_cls, task):
    """Each step's input latents equal LightX2V's update applied to the previous step's latents and velocity
    (no CFG: one forward per step), on the built-in tiny models; the result is the last update's output."""
    pipe = LightX2VPipeline(model_cls=model_cls, task=task).create_generator(**SMALL)
    calls = _record_denoise(pipe)
    pipe.generate(seed=3, prompt="a cat", return_result_tensor=True, progress=False)
    assert len(calls) == 4
    sched = StepDistillScheduler(pipe.config.sampling.denoising_step_list, shift=pipe.config.sampling.sample_shift)
    sched.set_timesteps()
    sigmas = sched.sigmas[:-1].tolist()
    for i in range(3):
        x, v = calls[i]
        want = lightx2v_step_distill_update(x, v, sigmas, i)
        torch.testing.assert_close(calls[i + 1][0], want, rtol=0, atol=1e-6)
        # the velocity matters: the old update (fresh noise) lands far away
        assert (calls[i + 1][0] - ((1 - sigmas[i + 1]) * (x - sigmas[i] * v))).abs().max() > 0.1


@pytest.mark.parametrize("bad", [[1000, 1000], [250, 500], [0], [], [1001], [1000.0]])
def test_bad_step_lists(bad):
    with pytest.raises(UserError, match="denoising_step_list"):
        build_config({}, {"denoising_step_list": bad}, {})


def test_the_step_list_fixes_the_step_count():
    """As LightX2V's step-distill schedulers (infer_steps = len(denoising_step_list)): a config's other
    infer_steps is ignored, with a note; a request that asks for both at odds is refused."""
    cfg = build_config({}, {"denoising_step_list": [1000, 500]}, {"infer_steps": 10})
    assert cfg.sampling.infer_steps == 2 and any("infer_steps=10 ignored" in n for n in cfg.notes)
    assert build_config({}, {"denoising_step_list": [1000, 500]}, {}).sampling.infer_steps == 2
    from dataclasses import replace

    with pytest.raises(UserError, match="infer_steps=10 does not match"):
        replace(cfg.sampling, infer_steps=10)
    with pytest.raises(UserError, match="sample_solver"):
        build_config({}, {"denoising_step_list": [1000, 500], "sample_solver": "euler"}, {})


def _count_forwards(pipe):
    calls = []
    pipe.runner.transformer.dit.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    return calls


def test_wan21_distill_runs_four_cfg_free_forwards():
    pipe = LightX2VPipeline(model_cls="wan2.1_distill").create_generator(**SMALL)
    s = pipe.config.sampling
    assert s.denoising_step_list == (1000, 750, 500, 250) and s.infer_steps == 4 and not s.do_cfg
    calls = _count_forwards(pipe)
    a = pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    assert len(calls) == 4
    b = pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    c = pipe.generate(seed=2, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    assert torch.equal(a, b) and (a - c).abs().max() > 0.05


def test_dit_original_ckpt_replaces_the_dit_weights(tmp_path):
    root = ensure_tiny_model()
    sd = load_file(str(root / "diffusion_pytorch_model.safetensors"))
    sd = {k: (v * 1.5 if k.endswith("ffn.0.weight") else v) for k, v in sd.items()}
    distilled = tmp_path / "distilled.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(distilled))
    base = LightX2VPipeline().create_generator(**SMALL, infer_steps=3)
    other = LightX2VPipeline().create_generator(**SMALL, infer_steps=3, dit_original_ckpt=str(distilled))
    assert torch.equal(other.runner.transformer.dit.blocks[0].ffn[0].weight, sd["blocks.0.ffn.0.weight"])
    a = base.generate(seed=1, prompt="x", return_result_tensor=True, progress=False)["video"]
    b = other.generate(seed=1, prompt="x", return_result_tensor=True, progress=False)["video"]
    assert (a - b).abs().max() > 1e-3
    sd.pop("head.head.bias")
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match="missing keys \\[head.head.bias\\]"):
        LightX2VPipeline().create_generator(**SMALL, dit_original_ckpt=str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match="does not exist"):
        LightX2VPipeline().create_generator(**SMALL, dit_original_ckpt=str(tmp_path / "nope.safetensors"))


def test_changing_resolution_t2v():
    kw = dict(height=64, width=64, num_frames=5, infer_steps=4)
    pipe = LightX2VPipeline().create_generator(**kw, changing_resolution=True, resolution_rate=[0.5],
                                               changing_resolution_steps=[2])
    calls = _count_forwards(pipe)
    a = pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    # CFG: 2 forwards per step; 2 steps on 4x4 latents (half of 8x8), then 2 at full size
    assert [c[-2:] for c in calls] == [(4, 4)] * 4 + [(8, 8)] * 4
    assert a.shape == (5, 64, 64, 3)
    b = pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    plain = LightX2VPipeline().create_generator(**kw)
    c = plain.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    assert torch.equal(a, b) and (a - c).abs().max() > 0.05


def test_changing_resolution_i2v_conditions_each_stage(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (80, 64), (200, 30, 30))
    pipe = LightX2VPipeline(task="i2v").create_generator(height=64, width=64, num_frames=5, infer_steps=3,
                                                         changing_resolution=True, changing_resolution_steps=[1])
    calls = _count_forwards(pipe)
    a = pipe.generate(seed=1, prompt="x", image_path=img, return_result_tensor=True, progress=False)["video"]
    # 0.75 of 8 -> 6 (even); 36 input channels at both sizes
    assert [c[1] for c in calls] == [36] * 6 and [c[-1] for c in calls] == [6, 6, 8, 8, 8, 8]
    assert a.shape == (5, 64, 64, 3)


def test_changing_resolution_validation():
    with pytest.raises(UserError, match="changing_resolution_steps"):
        build_config({}, {"changing_resolution": True, "changing_resolution_steps": [50]}, {})
    with pytest.raises(UserError, match="resolution_rate"):
        build_config({}, {"changing_resolution": True, "resolution_rate": [1.5]}, {})
    with pytest.raises(UserError, match="need changing_resolution: true"):
        build_config({}, {"resolution_rate": [0.5]}, {})
