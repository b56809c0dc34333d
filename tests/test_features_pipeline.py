"""LoRA and feature caching through the pipeline and its config keys (tiny model, CPU)."""

import pytest
import torch
from safetensors.torch import save_file

from lightx2v import LightX2VPipeline
from lightx2v.errors import UserError

SMALL = dict(height=32, width=48, num_frames=5, infer_steps=6)


def _frames(pipe, seed=1):
    return pipe.generate(seed=seed, prompt="a cat", return_result_tensor=True, progress=False)["video"]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A Wan-format LoRA (lora_down/up + alpha) on two layers of the tiny DiT (dim 64, ffn 128)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (out_f, in_f) in {"blocks.0.self_attn.q": (64, 64), "blocks.1.ffn.0": (128, 64)}.items():
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g)
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.5
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(8.0)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(sd, str(path))
    return str(path)


def test_lora_merge_dynamic_and_switch(lora_file):
    base = _frames(LightX2VPipeline().create_generator(**SMALL))
    merged = _frames(LightX2VPipeline().create_generator(**SMALL, lora_configs=[{"path": lora_file,
                                                                                 "strength": 1.0}]))
    assert (merged - base).abs().max() > 0.05
    dyn = LightX2VPipeline().create_generator(**SMALL, lora_configs=[{"path": lora_file, "strength": 1.0}],
                                              lora_mode="dynamic")
    assert (_frames(dyn) - merged).abs().max() < 1e-3
    dyn.switch_lora([{"path": lora_file, "strength": 0.0}])
    assert (_frames(dyn) - base).abs().max() < 1e-5
    with pytest.raises(UserError, match="dynamic"):
        LightX2VPipeline().create_generator(**SMALL).switch_lora([])


def test_lora_errors(tmp_path, lora_file):
    with pytest.raises(UserError, match="does not exist"):
        LightX2VPipeline().create_generator(**SMALL, lora_configs=[{"path": str(tmp_path / "x.safetensors")}])
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(4, 64),
               "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(64, 4)}, str(bad))
    with pytest.raises(UserError, match="blocks.7.self_attn.q"):
        LightX2VPipeline().create_generator(**SMALL, lora_configs=[{"path": str(bad)}])


def test_feature_caching_threshold_zero_is_exact_and_threshold_skips():
    base = _frames(LightX2VPipeline().create_generator(**SMALL))
    tea0 = LightX2VPipeline().create_generator(**SMALL, feature_caching="Tea", teacache_thresh=0.0,
                                               coefficients=[1.0, 0.0], use_ret_steps=False)
    assert torch.equal(_frames(tea0), base)
    assert sum(b["skipped"] for b in tea0.runner.transformer.last_cache_stats.values()) == 0
    fb = LightX2VPipeline().create_generator(**SMALL, feature_caching="FirstBlock", residual_diff_threshold=10.0)
    out = _frames(fb)
    stats = fb.runner.transformer.last_cache_stats
    assert stats["cond"]["skipped"] > 0 and stats["uncond"]["skipped"] > 0
    assert (out - base).abs().max() > 1e-4  # skipping changes the result


def test_caching_config_errors():
    with pytest.raises(UserError, match="Ada"):
        LightX2VPipeline().create_generator(**SMALL, feature_caching="Ada")
    with pytest.raises(UserError, match="changing_resolution"):
        LightX2VPipeline().create_generator(**SMALL, feature_caching="FirstBlock", residual_diff_threshold=0.1,
                                            changing_resolution=True)
