"""Wan2.2: the A14B two-expert models (T2V, I2V without CLIP) and the TI2V-5B DiT's per-frame timesteps,
against diffusers (tiny random-weight models, CPU, float32)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lightx2v import LightX2VPipeline
from lightx2v.convert import convert_checkpoint
from lightx2v.errors import UserError
from tiny_reference import (FLOW_SHIFT, build_diffusers_wan22_moe_pipeline, build_diffusers_wan22_ti2v_pipeline,
                            picture, tiny_diffusers_dit)

pytest.importorskip("diffusers")

H, W, F, STEPS = 32, 48, 9, 6
PROMPT, NEG = "a red cat jumps over the fence", "blurry"
TOL = 5e-3



def saved_pipeline(tmp_path_factory, build, task):
    """A tiny diffusers pipeline built by ``build(tok_dir, task)`` and saved: (model folder, pipeline)."""
    d = tmp_path_factory.mktemp(f"{build.__name__}_{task}")
    pipe = build(d / "tok", task)
    pipe.save_pretrained(d / "model")
    return d / "model", pipe


@pytest.fixture(scope="module")
def moe_t2v(tmp_path_factory):
    return saved_pipeline(tmp_path_factory, build_diffusers_wan22_moe_pipeline, "t2v")


@pytest.fixture(scope="module")
def moe_i2v(tmp_path_factory):
    return saved_pipeline(tmp_path_factory, build_diffusers_wan22_moe_pipeline, "i2v")


def reference(pipe, guidance=(4.0, 3.0), seed=7, **kw):
    out = pipe(prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_frames=F, num_inference_steps=STEPS,
               guidance_scale=guidance[0], guidance_scale_2=guidance[1], generator=torch.Generator().manual_seed(seed),
               output_type="np", **kw)
    return torch.from_numpy(np.asarray(out.frames[0]))


def ours(model_dir, task="t2v", guidance=(4.0, 3.0), seed=7, image=None, model_cls="wan2.2_moe", last=None, **kw):
    pipe = LightX2VPipeline(model_path=model_dir, model_cls=model_cls, task=task)
    kw = {"sample_shift": FLOW_SHIFT, "height": H, "width": W, "num_frames": F, "infer_steps": STEPS,
          "guidance_scale": list(guidance), **kw}
    pipe.create_generator(device="cpu", **kw)
    frames = pipe.generate(seed=seed, prompt=PROMPT, negative_prompt=NEG, image_path=image, last_frame_path=last,
                           return_result_tensor=True, progress=False)["video"]
    return frames, pipe


def timesteps_of(pipe_ours):
    s = pipe_ours.config.sampling
    sched = pipe_ours.runner.transformer.scheduler(s, s.sample_shift)
    return [int(t) for t in sched.timesteps]


def test_a14b_t2v_matches_diffusers(moe_t2v, tmp_path):
    model_dir, pipe = moe_t2v
    want = reference(pipe)
    got, mine = ours(model_dir)
    assert got.shape == want.shape == (F, H, W, 3)
    assert (got - want).abs().max().item() <= TOL
    ts = timesteps_of(mine)
    assert any(t >= 875 for t in ts) and any(t < 875 for t in ts)  # both experts run in this schedule
    # the low-noise expert and its guidance matter: another guidance, or the high expert all along, moves it
    assert (ours(model_dir, guidance=(4.0, 1.5))[0] - want).abs().max().item() > 10 * TOL
    assert (ours(model_dir, boundary=0.01)[0] - want).abs().max().item() > 10 * TOL
    # the original Wan2.2 layout (high_noise_model/, low_noise_model/) gives the same video
    wan = convert_checkpoint(model_dir, tmp_path / "wan", layout="wan")
    assert (wan / "high_noise_model" / "config.json").is_file() and (wan / "low_noise_model").is_dir()
    assert (ours(wan)[0] - want).abs().max().item() <= TOL
    # ... and back to diffusers, which loads it as a two-expert pipeline with the same boundary
    import diffusers

    back = diffusers.WanPipeline.from_pretrained(convert_checkpoint(wan, tmp_path / "back", layout="diffusers"))
    assert back.transformer_2 is not None and back.config.boundary_ratio == 0.875
    back.scheduler = pipe.scheduler
    assert (reference(back) - want).abs().max().item() <= 1e-5


def test_a14b_i2v_matches_diffusers(moe_i2v, tmp_path):
    model_dir, pipe = moe_i2v
    img = picture(W, H, 0)
    want = reference(pipe, guidance=(3.5, 2.0), image=img)
    got, _ = ours(model_dir, "i2v", guidance=(3.5, 2.0), image=img)
    assert (got - want).abs().max().item() <= TOL
    assert (ours(model_dir, "i2v", guidance=(3.5, 2.0), image=picture(W, H, 1))[0] - want).abs().max() > 10 * TOL
    wan = convert_checkpoint(model_dir, tmp_path / "wan", layout="wan")
    assert not (wan / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").exists()  # Wan2.2: no CLIP
    assert (ours(wan, "i2v", guidance=(3.5, 2.0), image=img)[0] - want).abs().max().item() <= TOL


def test_a14b_flf2v_matches_diffusers(moe_i2v):
    """Wan2.2 A14B first-last-frame (LightX2V's wan_moe_flf2v): the I2V experts with the last frame's latents and
    mask at the end, as diffusers' WanImageToVideoPipeline(last_image=...)."""
    model_dir, pipe = moe_i2v
    first, last = picture(W, H, 0), picture(W, H, 1)
    want = reference(pipe, guidance=(3.5, 2.0), image=first, last_image=last)
    got, _ = ours(model_dir, "flf2v", guidance=(3.5, 2.0), image=first, last=last)
    assert (got - want).abs().max().item() <= TOL
    without, _ = ours(model_dir, "i2v", guidance=(3.5, 2.0), image=first)
    assert (without - want).abs().max().item() > 10 * TOL  # the last frame matters


def test_a14b_offload_and_default_boundary(moe_t2v):
    """Offloaded experts give the same video; the boundary defaults to 0.875 for T2V (0.9 for I2V)."""
    model_dir, _ = moe_t2v
    plain, pipe = ours(model_dir)
    assert pipe.config.sampling.boundary == 0.875
    off, _ = ours(model_dir, cpu_offload=True, offload_granularity="block")
    assert torch.equal(plain, off)
    # model-level offload: while one expert computes, the other holds nothing on the device
    pipe = LightX2VPipeline(model_path=model_dir, model_cls="wan2.2_moe", task="t2v")
    pipe.create_generator(device="cpu", sample_shift=FLOW_SHIFT, height=H, width=W, num_frames=F, infer_steps=STEPS,
                          cpu_offload=True, offload_granularity="model")
    experts = pipe.runner.transformer.experts
    seen = []
    for me, other in ((experts[0], experts[1]), (experts[1], experts[0])):
        me.dit.register_forward_pre_hook(lambda m, a, me=me, other=other: seen.append(
            (me.index, len(me.offload.resident_blocks()) > 0, other.offload.resident_blocks())))
    frames = pipe.generate(seed=7, prompt=PROMPT, negative_prompt=NEG, return_result_tensor=True, progress=False)["video"]
    assert torch.equal(frames, plain)
    assert {i for i, _, _ in seen} == {0, 1} and all(mine and not other for _, mine, other in seen)
    assert [i for i, _, _ in seen] == sorted(i for i, _, _ in seen)  # high first, then low: one switch


def test_model_class_must_fit(moe_t2v, tiny_diffusers_t2v):
    with pytest.raises(UserError, match="two-expert"):
        LightX2VPipeline(model_path=moe_t2v[0], model_cls="wan2.1", task="t2v").create_generator(device="cpu")
    with pytest.raises(UserError, match="needs a two-expert checkpoint"):
        LightX2VPipeline(model_path=tiny_diffusers_t2v[0], model_cls="wan2.2_moe",
                         task="t2v").create_generator(device="cpu")
    with pytest.raises(UserError, match="does not do task"):
        LightX2VPipeline(model_cls="wan2.2", task="flf2v")
    with pytest.raises(UserError, match="does not fit the checkpoint"):  # A14B FLF2V needs the I2V experts
        LightX2VPipeline(model_path=moe_t2v[0], model_cls="wan2.2_moe", task="flf2v").check_generator(device="cpu")
    with pytest.raises(UserError, match="guidance_scale"):
        ours(moe_t2v[0], guidance=(1.0, 2.0, 3.0))
    one = LightX2VPipeline(model_path=tiny_diffusers_t2v[0], model_cls="wan2.1", task="t2v")
    for bad in ({"guidance_scale": [4.0, 3.0]}, {"boundary": 0.9}, {"boundary_step_index": 1}):
        with pytest.raises(UserError, match="this model has one DiT"):
            one.create_generator(device="cpu", **bad)
    # the key the model class's LightX2V runner does not read is ignored, with a note (as LightX2V ignores it)
    cfg = LightX2VPipeline(model_path=moe_t2v[0], model_cls="wan2.2_moe").check_generator(boundary_step_index=2)
    assert cfg.sampling.boundary_step_index is None and cfg.sampling.boundary == 0.875
    assert any(n.startswith("boundary_step_index ignored") for n in cfg.notes)
    cfg = LightX2VPipeline(model_cls="wan2.2_moe_distill", task="t2v").check_generator(device="cpu", boundary=0.9)
    assert cfg.sampling.boundary is None and cfg.sampling.boundary_step_index == 2
    assert any(n.startswith("boundary ignored") for n in cfg.notes)
    with pytest.raises(UserError, match="either boundary or boundary_step_index"):  # one request asking for both
        LightX2VPipeline(model_cls="wan2.2_moe_distill", task="t2v").create_generator(device="cpu").generate(
            prompt="x", boundary=0.9, return_result_tensor=True)


def test_per_frame_timesteps_match_diffusers():
    """The TI2V-5B DiT input: a timestep per token (0 on the conditioning frame), as diffusers takes it."""
    from lightx2v.models.wan.checkpoint import dit_key_from_diffusers
    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.models.wan.arch import WanDiTConfig
    from lightx2v.ops.attention import get_attention_backend

    ref = tiny_diffusers_dit(in_channels=16, out_channels=16)
    cfg = WanDiTConfig.from_diffusers_config({k: v for k, v in ref.config.items() if not k.startswith("_")})
    ours_dit = WanDiT(cfg, get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=cfg.head_dim,
                                                 device=torch.device("cpu")))
    ours_dit.load_state_dict({dit_key_from_diffusers(k): v for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    ctx = torch.randn(1, 512, 32, generator=g)
    per_frame = torch.tensor([[0.0, 700.0, 700.0]])
    per_token = per_frame.repeat_interleave(4 * 6, dim=1)  # [1, L]: 4 x 6 tokens per latent frame
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=per_token, encoder_hidden_states=ctx, return_dict=False)[0]
        got_tokens = ours_dit(x, per_token, ctx)
        got_frames = ours_dit(x, per_frame, ctx)
        uniform = ours_dit(x, torch.tensor([700.0]), ctx)
    scale = want.abs().max().item()
    assert (got_tokens - want).abs().max().item() <= 1e-5 * scale
    assert torch.equal(got_tokens, got_frames)
    assert (uniform - want).abs().max().item() > 100 * 1e-5 * scale  # the zero timestep of frame 0 matters
    with torch.no_grad():  # all frames at one timestep: exactly the one-timestep path
        assert torch.equal(ours_dit(x, torch.full((1, 3), 700.0), ctx), uniform)
    with pytest.raises(ValueError, match="constant within each latent frame"):
        ours_dit(x, torch.arange(72.0)[None], ctx)


def _count_calls(pipe_ours) -> list[int]:
    counts = [0] * len(pipe_ours.runner.transformer.experts)
    for i, e in enumerate(pipe_ours.runner.transformer.experts):
        e.dit.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_tiny_moe_distill_routes_steps_by_boundary_step_index():
    """wan2.2_moe_distill on the built-in tiny two-expert model: 4 steps without CFG, the first
    boundary_step_index of them on the high-noise expert."""
    for index, want in ((2, [2, 2]), (1, [1, 3]), (4, [4, 0])):
        pipe = LightX2VPipeline(model_cls="wan2.2_moe_distill", task="i2v")
        pipe.create_generator(device="cpu", height=32, width=32, num_frames=5, boundary_step_index=index)
        counts = _count_calls(pipe)
        pipe.generate(seed=1, prompt="p", image_path=picture(32, 32, 3), return_result_tensor=True, progress=False)
        assert counts == want
    assert pipe.config.sampling.denoising_step_list == (1000, 750, 500, 250)


def test_moe_boundary_routes_by_timestep():
    pipe = LightX2VPipeline(model_cls="wan2.2_moe", task="t2v")
    pipe.create_generator(device="cpu", height=32, width=32, num_frames=5, infer_steps=8, boundary=0.875)
    counts = _count_calls(pipe)
    pipe.generate(seed=1, prompt="p", return_result_tensor=True, progress=False)
    ts = timesteps_of(pipe)
    high = sum(t >= 875 for t in ts)
    assert 0 < high < 8 and counts == [2 * high, 2 * (8 - high)]  # CFG: two forwards a step


def test_moe_lora_goes_to_its_expert(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    lora = tmp_path / "high.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 64, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(64, 2, generator=g)}, str(lora))
    plain = LightX2VPipeline(model_cls="wan2.2_moe", task="t2v").create_generator(device="cpu")
    pipe = LightX2VPipeline(model_cls="wan2.2_moe", task="t2v").create_generator(
        device="cpu", lora_configs=[{"path": str(lora), "strength": 1.0, "name": "high_noise_model"}])
    q = [e.dit.blocks[0].self_attn.q.weight for e in pipe.runner.transformer.experts]
    q0 = [e.dit.blocks[0].self_attn.q.weight for e in plain.runner.transformer.experts]
    assert not torch.equal(q[0], q0[0]) and torch.equal(q[1], q0[1])


# --- TI2V-5B: 48-channel latents through the Wan2.2 VAE (16x), the image as the first latent frame at t = 0 ---

W5 = 64  # pixel sizes divisible by 32 (16x VAE, 2x2 patches)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    build = build_diffusers_wan22_ti2v_pipeline
    return {task: saved_pipeline(tmp_path_factory, build, task) for task in ("t2v", "i2v")}


def ti2v_reference(pipe, image=None, seed=7):
    kw = {"image": image} if image is not None else {}
    out = pipe(prompt=PROMPT, negative_prompt=NEG, height=H, width=W5, num_frames=F, num_inference_steps=STEPS,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np", **kw)
    return torch.from_numpy(np.asarray(out.frames[0]))


def ti2v_ours(model_dir, task, image=None, seed=7):
    frames, pipe = ours(model_dir, task, guidance=(5.0,), seed=seed, image=image, model_cls="wan2.2", width=W5,
                        guidance_scale=5.0)
    return frames, pipe


def test_ti2v_t2v_matches_diffusers(ti2v, tmp_path):
    model_dir, pipe = ti2v["t2v"]
    want = ti2v_reference(pipe)
    got, mine = ti2v_ours(model_dir, "t2v")
    assert got.shape == want.shape == (F, H, W5, 3)
    assert mine.config.sampling.fps == 24  # the Wan2.2 5B default
    with pytest.raises(UserError, match="use model_cls 'wan2.2'"):  # the diffusers folder, under another class
        LightX2VPipeline(model_path=model_dir, model_cls="wan2.1", task="t2v").create_generator(device="cpu")
    assert (got - want).abs().max().item() <= TOL
    assert (ti2v_ours(model_dir, "t2v", seed=8)[0] - want).abs().max().item() > 10 * TOL
    wan = convert_checkpoint(model_dir, tmp_path / "wan", layout="wan")
    assert (wan / "Wan2.2_VAE.pth").is_file() and not (wan / "Wan2.1_VAE.pth").exists()
    assert (ti2v_ours(wan, "t2v")[0] - want).abs().max().item() <= TOL
    import diffusers

    back = diffusers.WanPipeline.from_pretrained(convert_checkpoint(wan, tmp_path / "back", layout="diffusers"))
    assert back.config.expand_timesteps and back.vae.config.z_dim == 48
    back.scheduler = pipe.scheduler
    assert (ti2v_reference(back) - want).abs().max().item() <= 1e-5


def test_ti2v_i2v_matches_diffusers(ti2v, tmp_path):
    model_dir, pipe = ti2v["i2v"]
    img = picture(W5, H, 0)
    want = ti2v_reference(pipe, image=img)
    got, _ = ti2v_ours(model_dir, "i2v", image=img)
    assert (got - want).abs().max().item() <= TOL
    assert (ti2v_ours(model_dir, "i2v", image=picture(W5, H, 1))[0] - want).abs().max().item() > 10 * TOL
    wan = convert_checkpoint(model_dir, tmp_path / "wan", layout="wan")
    assert (ti2v_ours(wan, "i2v", image=img)[0] - want).abs().max().item() <= TOL


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_tiny_ti2v_builtin(task, tmp_path):
    """The built-in tiny TI2V model (48-channel VAE at 16x): both tasks run; the image is the first frame."""
    pipe = LightX2VPipeline(model_cls="wan2.2", task=task)
    pipe.create_generator(device="cpu", height=64, width=96, num_frames=5, infer_steps=3)
    image = picture(96, 64, 2) if task == "i2v" else None
    result = pipe.generate(seed=3, prompt="a cat", image_path=image, save_result_path=tmp_path / "o.mp4",
                           return_result_tensor=True, progress=False)
    frames = result["video"]
    assert frames.shape == (5, 64, 96, 3) and Path(result.path).is_file()
    assert pipe.runner.encoder.vae_spatial == 16 and pipe.config.sampling.fps == 24
    with pytest.raises(UserError, match="divisible by 32"):
        LightX2VPipeline(model_cls="wan2.2", task=task).create_generator(device="cpu", height=48, width=96)
    with pytest.raises(UserError, match="use model_cls 'wan2.2'"):  # a TI2V-5B folder under another model class
        LightX2VPipeline(model_path=pipe.model_path or pipe.runner.info['model_path'], model_cls="wan2.1",
                         task=task).create_generator(device="cpu")


def test_a14b_lazy_load_and_expert_weight_files(moe_t2v, tmp_path):
    """lazy_load streams each expert's blocks from its own folder; high/low_noise_original_ckpt take each expert's
    weights from one file; both give the same video as the plain load."""
    from safetensors.torch import save_file

    from lightx2v.models.wan.checkpoint import dit_tensors

    model_dir, _ = moe_t2v
    plain, _ = ours(model_dir)
    lazy, _ = ours(model_dir, cpu_offload=True, offload_granularity="block", lazy_load=True)
    assert torch.equal(plain, lazy)
    files = {}
    for expert in ("high", "low"):  # the experts' weights (Wan names) in one file each
        files[expert] = tmp_path / f"{expert}.safetensors"
        save_file({k: v.contiguous() for k, v in dit_tensors(model_dir, "diffusers", expert)}, str(files[expert]))
    single, _ = ours(model_dir, high_noise_original_ckpt=str(files["high"]), low_noise_original_ckpt=str(files["low"]))
    # same weights; CPU GEMMs may round differently with the tensors' memory alignment, hence not bit-exact
    assert (single - plain).abs().max().item() <= 1e-5
    swapped, _ = ours(model_dir, high_noise_original_ckpt=str(files["low"]), low_noise_original_ckpt=str(files["high"]))
    assert (swapped - plain).abs().max().item() > 10 * TOL
    with pytest.raises(UserError, match="high_noise_original_ckpt"):
        ours(model_dir, dit_original_ckpt=str(files["high"]))
