"""LightX2V's HunyuanVideo-1.5 configs (ModelTC/LightX2V configs/hunyuan_video_15/, written here as data) load in this
family's config handling where we implement what they ask for, or are refused with a message naming the feature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightx2v.errors import UserError
from lightx2v.models.hunyuan_video_15.config import load_lightx2v_config

_BASE = {"infer_steps": 50, "fps": 24, "target_video_length": 121, "vae_stride": [4, 16, 16], "sample_shift": 5.0,
         "sample_guide_scale": 6.0, "enable_cfg": True}
_T2V = {**_BASE, "transformer_model_name": "480p_t2v", "aspect_ratio": "16:9"}
_I2V = {**_BASE, "transformer_model_name": "480p_i2v"}
_OFFLOAD = {"cpu_offload": True, "offload_granularity": "block", "vae_cpu_offload": False, "byt5_cpu_offload": False,
            "qwen25vl_cpu_offload": True, "siglip_cpu_offload": False}
_NO_OFFLOAD = {"cpu_offload": False, "offload_granularity": "block", "vae_cpu_offload": False,
               "byt5_cpu_offload": False, "qwen25vl_cpu_offload": True, "siglip_cpu_offload": False}
_RATIOS = [1.0, 1.01562, 1.00781] + [1.0] * 8 + [0.99609] * 20 + [0.99219] * 3 + [0.98828] * 4 + [0.98438] * 2 + \
          [0.98047] * 2 + [0.97656, 0.97266, 0.96484, 0.95703, 0.94922, 0.92969, 0.91016, 0.88672]

# name -> (config, None if it must load, else a fragment the refusal must contain)
LIGHTX2V_CONFIGS = {
    "hunyuan_video_t2v_480p.json": ({**_T2V, "attn_type": "sage_attn2"}, None),
    "hunyuan_video_t2v_720p.json": ({**_T2V, "transformer_model_name": "720p_t2v", "sample_shift": 9.0,
                                     "attn_type": "sage_attn2"}, None),
    "hunyuan_video_i2v_480p.json": ({**_I2V, "attn_type": "sage_attn2"}, None),
    "hunyuan_video_i2v_720p.json": ({**_I2V, "transformer_model_name": "720p_i2v", "sample_shift": 7.0,
                                     "attn_type": "sage_attn2"}, None),
    "hunyuan_video_i2v_720p_cfg_distilled.json": ({**_I2V, "transformer_model_name": "720p_i2v_distilled",
                                                   "sample_shift": 9.0, "enable_cfg": False,
                                                   "attn_type": "sage_attn2"}, None),
    "hunyuan_video_t2v_480p_distill.json": ({**_T2V, "infer_steps": 4, "fps": 16, "target_video_length": 81,
                                             "sample_guide_scale": -1.0, "enable_cfg": False,
                                             "attn_type": "sage_attn2",
                                             "dit_original_ckpt": "hunyuanvideo-1.5/distill_models/480p_t2v/"
                                                                  "distill_model.safetensors",
                                             "denoising_step_list": [1000, 750, 500, 250]}, None),
    "4090/hy15_t2v_480p_bf16.json": ({**_T2V, "attn_type": "sage_attn2", **_OFFLOAD}, "cpu_offload"),
    "4090/hy15_t2v_480p_bf16_dist.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "sage_attn2",
                                           "parallel": {"seq_p_attn_type": "ulysses-4090", "seq_p_size": 8}},
                                          "parallel"),
    "4090/hy15_t2v_480p_fp8.json": ({**_T2V, "attn_type": "sage_attn2", **_OFFLOAD,
                                     "dit_quantized_ckpt": "/path/to/480p_t2v_fp8.safetensors", "dit_quantized": True,
                                     "dit_quant_scheme": "fp8-q8f",
                                     "qwen25vl_quantized_ckpt": "/path/to/qwen25vl_fp8.safetensors",
                                     "qwen25vl_quantized": True, "qwen25vl_quant_scheme": "fp8-q8f"}, "quantized DiT"),
    "5090/hy15_t2v_480p_bf16.json": ({**_T2V, "attn_type": "sage_attn3", **_OFFLOAD}, "cpu_offload"),
    "5090/hy15_t2v_480p_bf16_dist.json": ({**_T2V, "attn_type": "sage_attn3", **_OFFLOAD,
                                           "parallel": {"seq_p_attn_type": "ulysses", "seq_p_size": 8}}, "parallel"),
    "5090/hy15_t2v_480p_fp8.json": ({**_T2V, "attn_type": "sage_attn3", "qwen25vl_cpu_offload": True,
                                     "dit_quantized_ckpt": "/path/to/480p_t2v_fp8.safetensors", "dit_quantized": True,
                                     "dit_quant_scheme": "fp8-sgl",
                                     "qwen25vl_quantized_ckpt": "/path/to/qwen25vl_fp8.safetensors",
                                     "qwen25vl_quantized": True, "qwen25vl_quant_scheme": "fp8-sgl"},
                                    "quantized Qwen2.5-VL"),
    "cache/hy_15_i2v_480p_magcache.json": ({**_I2V, "attn_type": "sage_attn2", "feature_caching": "Mag",
                                            "magcache_calibration": False, "magcache_K": 6, "magcache_thresh": 0.24,
                                            "magcache_retention_ratio": 0.2,
                                            "magcache_ratios": [_RATIOS, _RATIOS]}, "feature caching"),
    "cache/hy_15_i2v_480p_magcache_calibration.json": ({**_I2V, "attn_type": "sage_attn2", "feature_caching": "Mag",
                                                        "magcache_calibration": True}, "feature caching"),
    "cache/hy_15_i2v_480p_teacache.json": ({**_I2V, "attn_type": "flash_attn3", "feature_caching": "Tea",
                                            "coefficients": [8.08528429e+03, -2.44607178e+03, 2.49489589e+02,
                                                             -9.10697865e+00, 1.20261379e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "feature caching"),
    "cache/hy_15_i2v_720p_teacache.json": ({**_I2V, "transformer_model_name": "720p_i2v", "sample_shift": 7.0,
                                            "attn_type": "flash_attn3", "feature_caching": "Tea",
                                            "coefficients": [3.84300014e+03, -1.39247433e+03, 1.69167679e+02,
                                                             -7.07679232e+00, 1.02419011e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "feature caching"),
    "cache/hy_15_t2v_480p_teacache.json": ({**_BASE, "transformer_model_name": "480p_t2v", "attn_type": "flash_attn3",
                                            "feature_caching": "Tea",
                                            "coefficients": [-2.97190924e+04, 2.22834983e+04, -4.37418360e+03,
                                                             3.39340251e+02, -1.01365855e+01, 1.29101768e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "feature caching"),
    # (LightX2V's file says "729p_t2v": a typo it never runs; we refuse the name)
    "cache/hy_15_t2v_720p_teacache.json": ({**_BASE, "transformer_model_name": "729p_t2v", "attn_type": "flash_attn3",
                                            "feature_caching": "Tea",
                                            "coefficients": [-3.08907507e+04, 1.67786188e+04, -3.19178643e+03,
                                                             2.60740519e+02, -8.19205881e+00, 1.07913775e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "feature caching"),
    "fp8comm/hy15_i2v_480p_int8_offload_dist_fp8_comm.json": (
        {**_I2V, "enable_cfg": False, "attn_type": "sage_attn3", "vae_cpu_offload": False, "byt5_cpu_offload": False,
         "qwen25vl_cpu_offload": True, "siglip_cpu_offload": False,
         "dit_quantized_ckpt": "/path/to/quant_model.safetensors", "dit_quantized": True,
         "dit_quant_scheme": "int8-q8f", "parallel": {"seq_p_size": 8, "seq_p_fp8_comm": True,
                                                      "seq_p_attn_type": "ulysses"}}, "parallel"),
    "lightae/hy15_t2v_480p_bf16.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "flash_attn3", "use_tae": True,
                                         "tae_path": "/path/to/lighttae"}, "LightTAE"),
    "offload/hy15_t2v_480p_bf16.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "sage_attn2", **_OFFLOAD},
                                        "cpu_offload"),
    "quant/hy15_t2v_480p_fp8.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "flash_attn3",
                                      "dit_quantized_ckpt": "/path/to/quant_model.safetensors", "dit_quantized": True,
                                      "dit_quant_scheme": "fp8-sgl"}, "quantized DiT"),
    "vsr/hy15_i2v_480p.json": ({**_I2V, "attn_type": "flash_attn3",
                                "video_super_resolution": {"sr_version": "720p_sr_distilled", "flow_shift": 2.0,
                                                           "base_resolution": "480p", "guidance_scale": 1.0,
                                                           "num_inference_steps": 6, "use_meanflow": True}},
                               "super-resolution"),
}


@pytest.mark.parametrize("name", sorted(LIGHTX2V_CONFIGS))
def test_lightx2v_config_loads_or_names_the_missing_feature(name):
    cfg, refusal = LIGHTX2V_CONFIGS[name]
    if refusal is None:
        out = load_lightx2v_config(cfg)
        assert out.options.transformer_model_name == cfg["transformer_model_name"]
        assert out.options.attn_mode == "sage_attn"  # LightX2V's sage_attn2 -> our INT8/FP8 Triton kernel
        assert out.fps == cfg["fps"]
        req = out.request("a cat", **({"task": "i2v", "image": "x.png"} if "i2v" in name else {}))
        assert req.num_frames == cfg["target_video_length"] and req.sample_shift == cfg["sample_shift"]
        assert req.enable_cfg == cfg["enable_cfg"]
        if "denoising_step_list" in cfg:
            assert req.denoising_step_list == (1000, 750, 500, 250) and req.guidance_scale is None
            assert out.options.dit_original_ckpt == cfg["dit_original_ckpt"]
        else:
            assert req.infer_steps == 50
            assert req.guidance_scale == (6.0 if cfg["enable_cfg"] else None)  # unused without CFG
    else:
        with pytest.raises(UserError) as e:
            load_lightx2v_config(cfg)
        assert refusal in str(e.value) and "does not implement" in str(e.value)


def test_refusal_names_every_missing_feature():
    cfg, _ = LIGHTX2V_CONFIGS["4090/hy15_t2v_480p_fp8.json"]
    msg = str(pytest.raises(UserError, load_lightx2v_config, cfg).value)
    for feature in ("cpu_offload", "qwen25vl_cpu_offload", "quantized DiT", "quantized Qwen2.5-VL"):
        assert feature in msg


def test_our_configs_load():
    folder = Path(__file__).resolve().parents[1] / "configs" / "hunyuan_video_15"
    paths = sorted(folder.glob("*.json"))
    assert len(paths) == 6
    for p in paths:
        cfg = load_lightx2v_config(p)
        assert cfg.options.transformer_model_name == json.loads(p.read_text())["transformer_model_name"]


def test_config_mistakes():
    with pytest.raises(UserError, match="did you mean 'sample_shift'"):
        load_lightx2v_config({"sample_shfit": 5.0})
    with pytest.raises(UserError, match="vae_stride"):
        load_lightx2v_config({"vae_stride": [4, 8, 8]})
    with pytest.raises(UserError, match="sage_attn3"):
        load_lightx2v_config({"attn_type": "sage_attn3"})
    with pytest.raises(UserError, match="transformer_model_name"):
        load_lightx2v_config({"transformer_model_name": "480p"})
    with pytest.raises(UserError, match="i2v model"):
        load_lightx2v_config({"transformer_model_name": "480p_i2v", "task": "t2v"})
    with pytest.raises(UserError, match="denoising_step_list"):
        load_lightx2v_config({"model_cls": "hunyuan_video_1.5_distill"})
    with pytest.raises(UserError, match="teacache_thresh"):
        load_lightx2v_config({"teacache_thresh": 0.2})
    with pytest.raises(UserError, match="num_frames"):
        load_lightx2v_config({"target_video_length": 120})
    assert load_lightx2v_config({"feature_caching": "NoCaching", "cpu_offload": False}).model_cls == "hunyuan_video_1.5"
