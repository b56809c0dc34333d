"""Z-Image through the engine: LightX2VPipeline(model_cls="z_image"), the CLI, the seed's Intel XPU example calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from z_image_reference import SEED_PROMPT, tiny_diffusers_pipeline

from lightx2v import LightX2VPipeline
from lightx2v.errors import UserError
from lightx2v.models.z_image.stages import ZImageRequest, generate
from lightx2v.models.z_image.tiny import TINY_ASPECT_RATIOS

ROOT = Path(__file__).resolve().parents[1]
PIXEL_TOL = 5e-3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("z-image-engine")
    pipe = tiny_diffusers_pipeline(folder / "tok")
    pipe.save_pretrained(folder / "model")
    return folder / "model", pipe


def test_pipeline_matches_diffusers_and_the_family_function(saved):
    folder, ref_pipe = saved
    pipe = LightX2VPipeline(model_path=folder, model_cls="z_image", task="t2i").create_generator(
        height=80, width=144, infer_steps=4)
    ours = pipe.generate(seed=3, prompt="a red cat", return_result_tensor=True, progress=False)["video"]
    want = torch.from_numpy(ref_pipe("a red cat", height=80, width=144, num_inference_steps=4, guidance_scale=0.0,
                                     generator=torch.Generator("cpu").manual_seed(3), output_type="np").images)
    assert ours.shape == (1, 80, 144, 3) and (ours - want).abs().max() <= PIXEL_TOL
    family = generate(folder, ZImageRequest(prompt="a red cat", seed=3, infer_steps=4, height=80, width=144))
    assert torch.equal(ours, family)
    other = pipe.generate(seed=3, prompt="a blue dog", return_result_tensor=True, progress=False)["video"]
    assert (other - want).abs().max() > 20 * PIXEL_TOL  # the prompt matters
    # per request: another size, and an aspect ratio from the config's table
    small = pipe.generate(seed=3, prompt="a red cat", return_result_tensor=True, height=48, width=64)["video"]
    assert small.shape == (1, 48, 64, 3)
    with pytest.raises(UserError, match="num_frames=5"):
        pipe.generate(prompt="x", return_result_tensor=True, num_frames=5)
    with pytest.raises(UserError, match="not implemented yet for z_image"):
        LightX2VPipeline(model_path=folder, model_cls="z_image", task="t2i").create_generator(cpu_offload=True)


def test_seed_intel_xpu_example_runs_with_only_the_model_path_changed(tmp_path, monkeypatch):
    """The seed's exact calls (LightX2V PR: Intel support), against the built-in tiny Z-Image model's folder; its
    lightx2v_defaults.json maps "16:9" to a tiny size."""
    from PIL import Image

    from lightx2v.models.z_image.tiny import ensure_tiny_model

    monkeypatch.chdir(tmp_path)
    model_path = ensure_tiny_model()
    pipe = LightX2VPipeline(model_path=str(model_path), model_cls="z_image", task="t2i")
    pipe.create_generator(config_json=str(ROOT / "configs/platforms/intel_xpu/z_image_turbo_t2i.json"))
    pipe.create_generator(attn_mode="torch_sdpa", aspect_ratio="16:9", infer_steps=9, guidance_scale=1)
    seed = 42
    prompt = SEED_PROMPT
    negative_prompt = ""
    save_result_path = "./output.png"
    pipe.generate(seed=seed, prompt=prompt, negative_prompt=negative_prompt, save_result_path=save_result_path)
    with Image.open(tmp_path / "output.png") as img:
        assert img.size == TINY_ASPECT_RATIOS["16:9"]
    s = pipe.config.sampling
    assert s.infer_steps == 9 and s.guidance_scale == 1 and s.aspect_ratio == "16:9" and not s.do_cfg


def test_cli_t2i(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "z.png"
    r = subprocess.run([sys.executable, "-m", "lightx2v.cli", "generate", "--model_cls", "z_image", "--task", "t2i",
                        "--prompt", "a red cat", "--save_result_path", str(out), "--no_progress", "--infer_steps",
                        "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == TINY_ASPECT_RATIOS["16:9"]
