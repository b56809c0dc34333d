"""CFG batching, regional compile, encoder offload / unloading and the memory report (tiny model, CPU)."""

import pytest
import torch

from lightx2v import LightX2VPipeline
from lightx2v.errors import UserError
from lightx2v.hooks.compile import apply_compile
from lightx2v.models.wan.checkpoint import load_dit
from lightx2v.models.wan.tiny import ensure_tiny_model
from lightx2v.ops.attention import get_attention_backend

SMALL = dict(height=32, width=48, num_frames=5, infer_steps=4)


def _frames(pipe, **kw):
    return pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False, **kw)["video"]


def test_cfg_batch_matches_two_forwards():
    base = LightX2VPipeline().create_generator(**SMALL, cfg_batch=False)
    batched = LightX2VPipeline().create_generator(**SMALL, cfg_batch=True)
    calls = []
    batched.runner.transformer.dit.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    a, b = _frames(base), _frames(batched)
    assert calls == [2] * 4  # one forward of batch 2 per step
    assert (a - b).abs().max() < 1e-4


def test_encoder_offload_and_unload_give_the_same_video():
    base = _frames(LightX2VPipeline().create_generator(**SMALL))
    for kw in (dict(t5_cpu_offload=True, vae_cpu_offload=True), dict(unload_modules=True)):
        pipe = LightX2VPipeline().create_generator(**SMALL, **kw)
        assert torch.equal(_frames(pipe), base), kw
    unloaded = LightX2VPipeline().create_generator(**SMALL, unload_modules=True)
    assert unloaded.runner.encoder.text_encoder.obj is None and unloaded.runner.decoder.vae.obj is None
    _frames(unloaded)
    assert unloaded.runner.last_memory["host RSS"] > 0.01


def test_regional_compile_captures_each_block_whole():
    root = ensure_tiny_model()
    attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=16, device=torch.device("cpu"))
    eager, compiled = load_dit(root, "wan", attn=attn), load_dit(root, "wan", attn=attn)
    apply_compile(compiled, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    x, t, ctx = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 512, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, ctx), eager(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_runtime_option_errors():
    with pytest.raises(UserError, match="cfg_batch"):
        LightX2VPipeline().create_generator(**SMALL, cfg_batch="yes")
    with pytest.raises(UserError, match="t5_cpu_offload"):
        LightX2VPipeline().create_generator(**SMALL, t5_cpu_offload="true")


@pytest.mark.parametrize("kw", [dict(offload_granularity="model"), dict(offload_granularity="block"),
                                dict(offload_granularity="phase"), dict(offload_granularity="block", lazy_load=True)])
def test_dit_offload_through_the_pipeline_is_exact(kw):
    base = _frames(LightX2VPipeline().create_generator(**SMALL))
    pipe = LightX2VPipeline().create_generator(**SMALL, cpu_offload=True, **kw)
    assert torch.equal(_frames(pipe), base)
    assert pipe.runner.transformer.experts[0].offload.stats().copies > 0 or kw["offload_granularity"] == "model"


def test_offload_option_errors():
    with pytest.raises(UserError, match="offload_granularity"):
        LightX2VPipeline().create_generator(**SMALL, cpu_offload=True, offload_granularity="layer")
    with pytest.raises(UserError, match="use_compile cannot be combined"):
        LightX2VPipeline().create_generator(**SMALL, cpu_offload=True, use_compile=True)
    with pytest.raises(UserError, match="lazy_load"):
        LightX2VPipeline().create_generator(**SMALL, cpu_offload=True, lazy_load=True, dit_quant_scheme="fp8")


def test_tiled_vae_through_the_pipeline():
    kw = dict(height=512, width=288, num_frames=5, infer_steps=2)  # larger than one 256 px tile both ways
    base = _frames(LightX2VPipeline().create_generator(**kw))
    tiled = _frames(LightX2VPipeline().create_generator(**kw, use_tiling_vae=True))
    assert tiled.shape == base.shape == (5, 512, 288, 3)
    assert 0 < (tiled - base).abs().mean() < 0.1  # tiles blend: close, not equal
