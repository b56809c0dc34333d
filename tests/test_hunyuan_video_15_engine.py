"""HunyuanVideo-1.5 through the engine: LightX2VPipeline(model_cls="hunyuan_video_1.5"), the stage messages as bytes,
progress and cancel, the CLI, and the runtime features on this family (DiT offload, fp8/int8, feature caching).

Tiny random models that diffusers builds and saves (tests/hunyuan15_reference.py); CPU, float32. The pipeline must
equal the family's own generate() bit for bit and diffusers' pipelines to 5e-3 per pixel; another prompt or image
moves the frames by far more.
"""

from __future__ import annotations

import pytest
import torch

import hunyuan15_reference as ref
from lightx2v import LightX2VPipeline
from lightx2v.engine import messages
from lightx2v.engine.progress import CancelToken, RunContext
from lightx2v.errors import Cancelled, UserError
from lightx2v.models.hunyuan_video_15.stages import HunyuanVideo15Request, generate
from tiny_reference import picture

TOL = 5e-3
MOVED = 0.05  # "far more than the tolerance"
FRAMES, STEPS = 5, 2
SMALL = dict(num_frames=FRAMES, infer_steps=STEPS)


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def saved_model(tmp_path_factory, task):
    root = tmp_path_factory.mktemp(f"hy15-engine-{task}")
    pipe = ref.diffusers_pipeline(root / "tok", task)
    pipe.save_pretrained(str(root / "model"))
    return root / "model", pipe


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    folder, ref_pipe = saved_model(tmp_path_factory, "t2v")
    pipe = LightX2VPipeline(model_path=folder, model_cls="hunyuan_video_1.5", task="t2v").create_generator(**SMALL)
    return folder, ref_pipe, pipe


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    folder, ref_pipe = saved_model(tmp_path_factory, "i2v")
    pipe = LightX2VPipeline(model_path=folder, model_cls="hunyuan_video_1.5", task="i2v").create_generator(**SMALL)
    return folder, ref_pipe, pipe


def run(pipe, **kw):
    return pipe.generate(return_result_tensor=True, progress=False, **kw)["video"]


def test_t2v_equals_the_family_and_diffusers(t2v):
    folder, ref_pipe, pipe = t2v
    got = run(pipe, seed=42, prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE)
    assert got.shape == (FRAMES, 48, 80, 3)  # the 16:9 bucket of the tiny DiT's target_size
    family = generate(folder, HunyuanVideo15Request(prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE, **SMALL))
    assert torch.equal(got, family)
    want = ref.run_diffusers(ref_pipe, ref.PROMPT, negative_prompt=ref.NEGATIVE, num_frames=FRAMES,
                             num_inference_steps=STEPS)
    assert maxdiff(got, want) <= TOL
    assert maxdiff(run(pipe, seed=42, prompt=ref.OTHER_PROMPT, negative_prompt=ref.NEGATIVE), want) > MOVED
    # per request: another size and step count (no reload), as the family and diffusers give them
    small = run(pipe, seed=3, prompt=ref.OTHER_PROMPT, height=64, width=48, infer_steps=3)
    assert small.shape == (FRAMES, 64, 48, 3)
    assert torch.equal(small, generate(folder, HunyuanVideo15Request(prompt=ref.OTHER_PROMPT, seed=3, height=64,
                                                                    width=48, num_frames=FRAMES, infer_steps=3)))
    want = ref.run_diffusers(ref_pipe, ref.OTHER_PROMPT, seed=3, height=64, width=48, num_frames=FRAMES,
                             num_inference_steps=3)
    assert maxdiff(small, want) <= TOL
    square = run(pipe, prompt="x", aspect_ratio="1:1", num_frames=1)
    assert square.shape == (1, 64, 64, 3)
    with pytest.raises(UserError, match="two-expert"):
        run(pipe, prompt="x", guidance_scale=[2.0, 3.0])
    with pytest.raises(UserError, match="sample_solver"):
        run(pipe, prompt="x", sample_solver="unipc")
    with pytest.raises(UserError, match="'i2v'"):
        run(pipe, prompt="x", aspect_ratio="auto")


def test_i2v_equals_the_family_and_diffusers(i2v):
    folder, ref_pipe, pipe = i2v
    image = picture(100, 60, seed=3)
    got = run(pipe, seed=42, prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE, image_path=image)
    family = generate(folder, HunyuanVideo15Request(prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE, task="i2v",
                                                    image=image, **SMALL))
    assert torch.equal(got, family)
    want = ref.run_diffusers(ref_pipe, ref.PROMPT, image=image, negative_prompt=ref.NEGATIVE, num_frames=FRAMES,
                             num_inference_steps=STEPS)
    assert got.shape == want.shape and maxdiff(got, want) <= TOL
    assert maxdiff(run(pipe, seed=42, prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE,
                       image_path=picture(100, 60, seed=4)), want) > MOVED
    # a "W:H" ratio takes that ratio's bucket and crops the image to it
    assert run(pipe, prompt="x", image_path=image, aspect_ratio="1:1", num_frames=1).shape == (1, 64, 64, 3)
    with pytest.raises(UserError, match="needs an image"):
        run(pipe, prompt="x")


def test_distilled_model_class(t2v):
    """hunyuan_video_1.5_distill: LightX2V's 4-step schedule without CFG by default (the same stages)."""
    folder = t2v[0]
    pipe = LightX2VPipeline(model_path=folder, model_cls="hunyuan_video_1.5_distill", task="t2v").create_generator(
        num_frames=FRAMES)
    s = pipe.config.sampling
    assert s.denoising_step_list == (1000, 750, 500, 250) and s.infer_steps == 4 and not s.enable_cfg
    assert s.fps == 16
    steps = []
    got = run(pipe, prompt=ref.PROMPT, callback=lambda stage, i, n: steps.append(i))
    assert steps == [1, 2, 3, 4]
    want = generate(folder, HunyuanVideo15Request(prompt=ref.PROMPT, num_frames=FRAMES, enable_cfg=False,
                                                  denoising_step_list=(1000, 750, 500, 250)))
    assert torch.equal(got, want)
    assert maxdiff(got, run(t2v[2], prompt=ref.PROMPT, infer_steps=4)) > MOVED  # not the 4-step Euler with CFG


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_stage_messages_through_bytes_equal_in_process(task, t2v, i2v):
    pipe = (t2v if task == "t2v" else i2v)[2]
    gen = pipe.runner
    request = pipe.make_request(seed=5, prompt=ref.PROMPT, negative_prompt=ref.NEGATIVE, return_result_tensor=True,
                                image_path=picture(80, 64, seed=1) if task == "i2v" else None)
    gen.check_request(request)
    ctx = RunContext()
    cond = gen.encoder(request, ctx)
    e = cond.encoded
    assert e.negative_prompt_embeds is not None and e.prompt_embeds_2.shape[1] > 0  # CFG, and a quoted word
    assert (e.image_embeds is not None) == (task == "i2v")
    cond_b = messages.from_bytes(messages.to_bytes(cond))
    assert messages.equal(cond, cond_b)
    lat = gen.transformer(cond, ctx)
    lat_b = gen.transformer(cond_b, ctx)
    assert torch.equal(lat.latents, lat_b.latents)
    lat_bb = messages.from_bytes(bytearray(messages.to_bytes(lat_b)))  # writable buffer: zero-copy views
    assert messages.equal(lat, lat_bb)
    frames, frames_b = gen.decoder(lat, ctx), gen.decoder(lat_bb, ctx)
    assert torch.equal(frames.frames, frames_b.frames) and frames.fps == 24
    assert messages.equal(frames, messages.from_bytes(messages.to_bytes(frames_b)))
    assert torch.equal(frames.frames, gen.run(request).frames)  # the chain in one process


def test_progress_and_cancel_after_step_one(t2v):
    pipe = t2v[2]
    seen = []
    run(pipe, prompt="x", infer_steps=3, callback=lambda stage, i, n: seen.append((stage, i, n)))
    assert seen == [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3)]
    token, seen = CancelToken(), []

    def cancel_at_first(stage, i, n):
        seen.append(i)
        if i == 1:
            token.cancel("stop")

    with pytest.raises(Cancelled, match="stop"):
        run(pipe, prompt="x", infer_steps=3, callback=cancel_at_first, cancel=token)
    assert seen == [1]
    assert run(pipe, prompt="x", num_frames=1).shape == (1, 48, 80, 3)  # the generator still works


def test_cli_t2v_writes_a_playable_mp4(tmp_path):
    import subprocess
    import sys

    from lightx2v.io.video import read_video

    out = tmp_path / "out.mp4"
    r = subprocess.run([sys.executable, "-m", "lightx2v.cli", "generate", "--model_cls", "hunyuan_video_1.5",
                        "--task", "t2v", "--prompt", 'a sign that says "OPEN"', "--save_result_path", str(out),
                        "--no_progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    frames = read_video(out)
    assert frames.shape == (9, 48, 80, 3)  # the tiny model's defaults: 9 frames, the 16:9 bucket
    assert "text encode" in r.stderr and "denoise" in r.stderr and "VAE decode" in r.stderr


# --- runtime features on this family ----------------------------------------------------------------------------------

def generator(folder, **kw):
    return LightX2VPipeline(model_path=folder, model_cls="hunyuan_video_1.5", task="t2v").create_generator(
        **SMALL, **kw)


@pytest.mark.parametrize("granularity", ["block", "phase", "model"])
def test_dit_offload_is_bit_identical(t2v, granularity):
    folder, _, pipe = t2v
    want = run(pipe, seed=1, prompt=ref.PROMPT)
    off = generator(folder, cpu_offload=True, offload_granularity=granularity, qwen25vl_cpu_offload=True,
                    vae_cpu_offload=True)
    handle = off.runner.transformer.inner.offload
    assert handle is not None
    assert torch.equal(run(off, seed=1, prompt=ref.PROMPT), want)
    assert handle.stats().copies > 0  # the weights went through the offload path


def latents(pipe, seed: int = 1):
    """The denoised latents of one request (encoder and transformer stages)."""
    request = pipe.make_request(seed=seed, prompt=ref.PROMPT, return_result_tensor=True)
    ctx = RunContext()
    return pipe.runner.transformer(pipe.runner.encoder(request, ctx), ctx).latents


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme,tol", [("fp8", 0.3), ("int8", 0.08)])
def test_quantized_dit_is_close(t2v, scheme, tol):
    """fp8 (E4M3: a 3-bit mantissa) / int8 weights per output channel and activations per token: the denoised
    latents stay within ``tol`` (relative L2) of the float model's; another seed moves them by far more."""
    from lightx2v.ops.quant import QuantLinear

    folder, _, pipe = t2v
    want = latents(pipe)
    q = generator(folder, dit_quant_scheme=f"{scheme}-sgl")
    dit = q.runner.transformer.dit
    linears = [m for m in dit.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and isinstance(dit.transformer_blocks[0].attn.to_q, QuantLinear)
    assert isinstance(dit.proj_out, torch.nn.Linear)  # outside the blocks: float
    got = latents(q)
    err = rel(got, want)
    assert 0 < err <= tol, err
    assert rel(latents(pipe, seed=2), want) > 3 * tol
    cpu_off = generator(folder, dit_quant_scheme=scheme, cpu_offload=True, offload_granularity="block")
    assert torch.equal(latents(cpu_off), got)  # int8/fp8 blocks stream bit-identically


_TEA = {"feature_caching": "Tea", "coefficients": [1.0, 0.0], "use_ret_steps": False}
_MAG = {"feature_caching": "Mag", "magcache_K": 2, "magcache_retention_ratio": 0.2,
        "magcache_ratios": [[1.0] * 6, [1.0] * 6]}
_FIRST = {"feature_caching": "FirstBlock"}


@pytest.mark.parametrize("cache,thresh_key", [(_TEA, "teacache_thresh"), (_MAG, "magcache_thresh"),
                                              (_FIRST, "residual_diff_threshold")])
def test_feature_caching_threshold_zero_is_uncached(t2v, cache, thresh_key):
    folder, _, pipe = t2v
    want = run(pipe, seed=1, prompt=ref.PROMPT, infer_steps=6)
    exact = generator(folder, **cache, **{thresh_key: 0.0})
    assert torch.equal(run(exact, seed=1, prompt=ref.PROMPT, infer_steps=6), want)
    stats = exact.runner.last_stats["cache"]
    assert stats["cond"]["skipped"] == stats["uncond"]["skipped"] == 0 and stats["uncond"]["computed"] == 6
    loose = generator(folder, **cache, **{thresh_key: 1e9})
    got = run(loose, seed=1, prompt=ref.PROMPT, infer_steps=6)
    stats = loose.runner.last_stats["cache"]
    assert stats["cond"]["skipped"] > 0 and stats["uncond"]["skipped"] > 0  # steps skipped: another result
    assert maxdiff(got, want) > 0
    # with the DiT's blocks streamed as well (skipped blocks are never made resident): the same frames
    both = generator(folder, **cache, **{thresh_key: 1e9}, cpu_offload=True, offload_granularity="block")
    assert torch.equal(run(both, seed=1, prompt=ref.PROMPT, infer_steps=6), got)


def test_refused_features_name_themselves(t2v):
    folder = t2v[0]
    for kw, fragment in [(dict(cpu_offload=True, lazy_load=True), "lazy_load"), (dict(use_compile=True), "compile"),
                         (dict(use_tae=True), "LightTAE"), (dict(unload_modules=True), "unload_modules")]:
        with pytest.raises(UserError, match=f"{fragment}.*not implemented yet for hunyuan_video_1.5"):
            generator(folder, **kw)
    with pytest.raises(UserError, match="i2v model"):
        generator(folder, transformer_model_name="480p_i2v")
    with pytest.raises(UserError, match="whose DiT is a t2v model"):
        LightX2VPipeline(model_path=folder, model_cls="hunyuan_video_1.5", task="i2v").create_generator(**SMALL)


def test_cfg_distilled_checkpoint_warns_when_run_with_cfg(t2v, tmp_path, caplog):
    """A checkpoint whose guider runs no CFG (guidance 1: CFG-distilled) with the family's default guidance 6: a
    warning naming the fix; with enable_cfg false (LightX2V's cfg_distilled config) it is the model's own sampling."""
    import json
    import logging
    import shutil

    folder = tmp_path / "distilled"
    shutil.copytree(t2v[0], folder)
    guider = folder / "guider" / "guider_config.json"
    guider.write_text(json.dumps({**json.loads(guider.read_text()), "guidance_scale": 1.0}))
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        generator(folder)
    assert "CFG-distilled" in caplog.text and "enable_cfg false" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        pipe = generator(folder, enable_cfg=False)
    assert "CFG-distilled" not in caplog.text
    want = generate(folder, HunyuanVideo15Request(prompt=ref.PROMPT, **SMALL))  # the checkpoint's guidance: no CFG
    assert torch.equal(run(pipe, prompt=ref.PROMPT), want)
