"""The built-in tiny Qwen-Image (release layout, written by us; diffusers loads it) and the shipped configs."""

import json
import time
from pathlib import Path

import pytest
import torch

from lightx2v.errors import UserError
from lightx2v.models.qwen_image.stages import QwenImageRequest, from_lightx2v_config, generate
from lightx2v.models.qwen_image.text_encoder import EDIT_TEMPLATE, T2I_TEMPLATE
from lightx2v.models.qwen_image.tiny import TINY_DEFAULTS, TINY_OPTIONS, ensure_tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "qwen_image"


def test_tiny_t2i_model_loads_in_diffusers_and_matches(tmp_path):
    import diffusers

    folder = ensure_tiny_model("t2i", root=tmp_path)
    assert ensure_tiny_model("t2i", root=tmp_path) == folder  # written once
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(folder))
    req = QwenImageRequest(prompt="a cat", seed=1, height=64, width=64, infer_steps=2)
    want = pipe(prompt="a cat", negative_prompt=" ", height=64, width=64, num_inference_steps=2, true_cfg_scale=4.0,
                generator=torch.Generator().manual_seed(1), output_type="np").images
    got = generate(folder, req)
    assert (got - torch.from_numpy(want)).abs().max() <= 5e-3
    start = time.perf_counter()
    frames = generate(folder, QwenImageRequest(prompt="a cat", **TINY_DEFAULTS))  # the default run
    seconds = time.perf_counter() - start
    assert frames.shape == (1, TINY_DEFAULTS["height"], TINY_DEFAULTS["width"], 3) and seconds < 30


def test_tiny_edit_plus_model_edits(tmp_path):
    from tiny_reference import picture

    folder = ensure_tiny_model("edit_plus", root=tmp_path)
    req = QwenImageRequest(prompt="make the sky blue", task="i2i", infer_steps=2,
                           images=[picture(60, 60, 2), picture(90, 60, 1)])
    frames = generate(folder, req, options=TINY_OPTIONS)
    assert frames.shape == (1, 96, 160, 3) and 0 <= frames.min() and frames.max() <= 1  # last image's ratio


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_configs_hold_only_implemented_keys(name):
    config = json.loads((CONFIGS / name).read_text())
    options, request = from_lightx2v_config(config)
    template = config["prompt_template_encode"]
    assert template == (T2I_TEMPLATE if "t2i" in name else EDIT_TEMPLATE)
    fmt = options.prompt_format("t2i" if "t2i" in name else "edit_plus", "t2i" if "t2i" in name else "i2i")
    assert fmt.drop_idx == (34 if "t2i" in name else 64)
    QwenImageRequest(prompt="a", task="t2i" if "t2i" in name else "i2i",
                     images=() if "t2i" in name else ("x.png",), **request)
    assert (options.vae_type == "tensorrt") == name.endswith("_trt.json")


def test_unknown_config_keys_are_named():
    with pytest.raises(UserError, match="use_magi_compile"):
        from_lightx2v_config({"infer_steps": 4, "use_magi_compile": True})
