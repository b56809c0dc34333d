"""LightX2V's HunyuanVideo-1.5 configs (ModelTC/LightX2V configs/hunyuan_video_15/, written here as data) through the
engine's config layer with this family (``build_config(..., family=...)`` and the family's checks before loading):
they load where we implement what they ask for, or are refused with a message naming the missing feature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightx2v.config import build_config, load_config_json
from lightx2v.engine.family import family_of
from lightx2v.errors import UserError
from lightx2v.models.hunyuan_video_15.family import check_generator_config, options, to_request

FAMILY = family_of("hunyuan_video_1.5")

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
    "4090/hy15_t2v_480p_bf16.json": ({**_T2V, "attn_type": "sage_attn2", **_OFFLOAD}, None),
    "4090/hy15_t2v_480p_bf16_dist.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "sage_attn2",
                                           "parallel": {"seq_p_attn_type": "ulysses-4090", "seq_p_size": 8}},
                                          "LightX2V key `parallel`"),
    "4090/hy15_t2v_480p_fp8.json": ({**_T2V, "attn_type": "sage_attn2", **_OFFLOAD,
                                     "dit_quantized_ckpt": "/path/to/480p_t2v_fp8.safetensors", "dit_quantized": True,
                                     "dit_quant_scheme": "fp8-q8f",
                                     "qwen25vl_quantized_ckpt": "/path/to/qwen25vl_fp8.safetensors",
                                     "qwen25vl_quantized": True, "qwen25vl_quant_scheme": "fp8-q8f"}, "pre-quantized DiT"),
    "5090/hy15_t2v_480p_bf16.json": ({**_T2V, "attn_type": "sage_attn3", **_OFFLOAD}, "sage_attn3"),
    "5090/hy15_t2v_480p_bf16_dist.json": ({**_T2V, "attn_type": "sage_attn3", **_OFFLOAD,
                                           "parallel": {"seq_p_attn_type": "ulysses", "seq_p_size": 8}}, "LightX2V key `parallel`"),
    "5090/hy15_t2v_480p_fp8.json": ({**_T2V, "attn_type": "sage_attn3", "qwen25vl_cpu_offload": True,
                                     "dit_quantized_ckpt": "/path/to/480p_t2v_fp8.safetensors", "dit_quantized": True,
                                     "dit_quant_scheme": "fp8-sgl",
                                     "qwen25vl_quantized_ckpt": "/path/to/qwen25vl_fp8.safetensors",
                                     "qwen25vl_quantized": True, "qwen25vl_quant_scheme": "fp8-sgl"},
                                    "quantized Qwen2.5-VL"),
    "cache/hy_15_i2v_480p_magcache.json": ({**_I2V, "attn_type": "sage_attn2", "feature_caching": "Mag",
                                            "magcache_calibration": False, "magcache_K": 6, "magcache_thresh": 0.24,
                                            "magcache_retention_ratio": 0.2,
                                            "magcache_ratios": [_RATIOS, _RATIOS]}, None),
    "cache/hy_15_i2v_480p_magcache_calibration.json": ({**_I2V, "attn_type": "sage_attn2", "feature_caching": "Mag",
                                                        "magcache_calibration": True}, "magcache_thresh"),
    "cache/hy_15_i2v_480p_teacache.json": ({**_I2V, "attn_type": "flash_attn3", "feature_caching": "Tea",
                                            "coefficients": [8.08528429e+03, -2.44607178e+03, 2.49489589e+02,
                                                             -9.10697865e+00, 1.20261379e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "use_ret_steps"),
    "cache/hy_15_i2v_720p_teacache.json": ({**_I2V, "transformer_model_name": "720p_i2v", "sample_shift": 7.0,
                                            "attn_type": "flash_attn3", "feature_caching": "Tea",
                                            "coefficients": [3.84300014e+03, -1.39247433e+03, 1.69167679e+02,
                                                             -7.07679232e+00, 1.02419011e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "use_ret_steps"),
    "cache/hy_15_t2v_480p_teacache.json": ({**_BASE, "transformer_model_name": "480p_t2v", "attn_type": "flash_attn3",
                                            "feature_caching": "Tea",
                                            "coefficients": [-2.97190924e+04, 2.22834983e+04, -4.37418360e+03,
                                                             3.39340251e+02, -1.01365855e+01, 1.29101768e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "use_ret_steps"),
    # (LightX2V's file says "729p_t2v": a typo it never runs; its TeaCache keys are refused first, the name after)
    "cache/hy_15_t2v_720p_teacache.json": ({**_BASE, "transformer_model_name": "729p_t2v", "attn_type": "flash_attn3",
                                            "feature_caching": "Tea",
                                            "coefficients": [-3.08907507e+04, 1.67786188e+04, -3.19178643e+03,
                                                             2.60740519e+02, -8.19205881e+00, 1.07913775e-01],
                                            "teacache_thresh": 0.15, **_NO_OFFLOAD}, "use_ret_steps"),
    "fp8comm/hy15_i2v_480p_int8_offload_dist_fp8_comm.json": (
        {**_I2V, "enable_cfg": False, "attn_type": "sage_attn3", "vae_cpu_offload": False, "byt5_cpu_offload": False,
         "qwen25vl_cpu_offload": True, "siglip_cpu_offload": False,
         "dit_quantized_ckpt": "/path/to/quant_model.safetensors", "dit_quantized": True,
         "dit_quant_scheme": "int8-q8f", "parallel": {"seq_p_size": 8, "seq_p_fp8_comm": True,
                                                      "seq_p_attn_type": "ulysses"}}, "LightX2V key `parallel`"),
    "lightae/hy15_t2v_480p_bf16.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "flash_attn3", "use_tae": True,
                                         "tae_path": "/path/to/lighttae"}, "LightTAE"),
    "offload/hy15_t2v_480p_bf16.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "sage_attn2", **_OFFLOAD},
                                        None),
    "quant/hy15_t2v_480p_fp8.json": ({**_T2V, "sample_shift": 7.0, "attn_type": "flash_attn3",
                                      "dit_quantized_ckpt": "/path/to/quant_model.safetensors", "dit_quantized": True,
                                      "dit_quant_scheme": "fp8-sgl"}, "pre-quantized DiT"),
    "vsr/hy15_i2v_480p.json": ({**_I2V, "attn_type": "flash_attn3",
                                "video_super_resolution": {"sr_version": "720p_sr_distilled", "flow_shift": 2.0,
                                                           "base_resolution": "480p", "guidance_scale": 1.0,
                                                           "num_inference_steps": 6, "use_meanflow": True}},
                               "super-resolution"),
}


def generator_config(values: dict, task: str, model_cls: str = "hunyuan_video_1.5", tmp_path=None):
    """A LightX2V config as create_generator builds it (the family's defaults < the config), checked as the family
    checks it before reading any weight."""
    values = dict(values)
    if "dit_original_ckpt" in values and tmp_path is not None:  # LightX2V's example path: a file of ours instead
        (tmp_path / "distill_model.safetensors").write_bytes(b"")
        values["dit_original_ckpt"] = str(tmp_path / "distill_model.safetensors")
    cfg = build_config(FAMILY.defaults(model_cls, task), values, {}, family=FAMILY)
    check_generator_config(cfg, task)
    return cfg


@pytest.mark.parametrize("name", sorted(LIGHTX2V_CONFIGS))
def test_lightx2v_config_loads_or_names_the_missing_feature(name, tmp_path):
    values, refusal = LIGHTX2V_CONFIGS[name]
    task = "i2v" if "i2v" in name else "t2v"
    model_cls = "hunyuan_video_1.5_distill" if "distill." in name else "hunyuan_video_1.5"
    if refusal is not None:
        with pytest.raises(UserError) as e:
            generator_config(values, task, model_cls, tmp_path)
        assert refusal in str(e.value), str(e.value)
        return
    cfg = generator_config(values, task, model_cls, tmp_path)
    opts = options(cfg)
    from lightx2v.ops.attention import describe

    # LightX2V's sage_attn2 is our sage_attn kernel (the attention name table resolves it)
    assert opts.transformer_model_name == values["transformer_model_name"]
    assert describe(opts.attn_mode).ours == "sage_attn"
    s = cfg.sampling
    assert (s.fps, s.num_frames, s.sample_shift, s.enable_cfg) == (values["fps"], values["target_video_length"],
                                                                   values["sample_shift"], values["enable_cfg"])
    assert s.aspect_ratio == values.get("aspect_ratio", "auto")  # I2V: the input image's size
    assert cfg.family.vae_stride == (4, 16, 16)
    if "denoising_step_list" in values:
        assert s.denoising_step_list == (1000, 750, 500, 250) and s.infer_steps == 4 and not s.do_cfg
        assert opts.dit_original_ckpt == str(tmp_path / "distill_model.safetensors")
    else:
        assert s.infer_steps == 50 and s.guidance_scale == 6.0
    if values.get("cpu_offload"):  # the DiT streamed by blocks; Qwen2.5-VL on the CPU between uses, the rest not
        assert cfg.offload.cpu_offload and cfg.offload.offload_granularity == "block"
        assert opts.qwen25vl_cpu_offload and not (opts.byt5_cpu_offload or opts.siglip_cpu_offload
                                                  or opts.vae_cpu_offload)
    if values.get("feature_caching") == "Mag":
        assert cfg.cache.method == "Mag" and cfg.cache.magcache_K == 6 and len(cfg.cache.magcache_ratios[0]) == 50
    # the family's request of this config (a prompt, and for I2V an image)
    from lightx2v.engine.request import GenerationRequest
    from PIL import Image

    images = (Image.new("RGB", (64, 48)),) if task == "i2v" else ()
    req = to_request(GenerationRequest(task=task, sampling=s, prompt="a cat", images=images,
                                       return_result_tensor=True), 640)
    assert req.num_frames == values["target_video_length"] and req.sample_shift == values["sample_shift"]
    assert req.enable_cfg is (None if values["enable_cfg"] else False)
    assert req.height is None and req.infer_steps == s.infer_steps  # the size: the bucket of the ratio / the image
    assert req.aspect_ratio == "16:9" if task == "t2v" else req.image is images[0]


def test_refusal_names_every_missing_feature():
    values, _ = LIGHTX2V_CONFIGS["4090/hy15_t2v_480p_fp8.json"]
    msg = str(pytest.raises(UserError, generator_config, values, "t2v").value)
    for feature in ("pre-quantized DiT", "quantized Qwen2.5-VL", "not implemented yet for hunyuan_video_1.5"):
        assert feature in msg, msg
    assert "cpu_offload" not in msg  # DiT and encoder offload are implemented


def test_our_configs_load(tmp_path):
    folder = Path(__file__).resolve().parents[1] / "configs" / "hunyuan_video_15"
    paths = sorted(folder.glob("*.json"))
    assert len(paths) == 6
    for p in paths:
        values = load_config_json(p)
        cfg = generator_config(values, "i2v" if "i2v" in p.name else "t2v", tmp_path=tmp_path)
        assert cfg.family.transformer_model_name == json.loads(p.read_text())["transformer_model_name"]


def test_config_mistakes():
    for values, task, fragment in [
            ({"sample_shfit": 5.0}, "t2v", "did you mean 'sample_shift'"),
            ({"vae_stride": [4, 8, 8]}, "t2v", "vae_stride"),
            ({"attn_type": "sage_attn3"}, "t2v", "sage_attn3"),
            ({"transformer_model_name": "480p"}, "t2v", "transformer_model_name"),
            ({"transformer_model_name": "480p_i2v"}, "t2v", "i2v model"),
            ({"teacache_thresh": 0.2}, "t2v", "teacache_thresh"),
            ({"target_video_length": 120}, "t2v", "num_frames"),
            ({"aspect_ratio": "auto"}, "t2v", "aspect_ratio 'auto'"),
            ({"aspect_ratio": "wide"}, "t2v", "aspect_ratio"),
            ({"sample_solver": "unipc"}, "t2v", "sample_solver"),
            ({"resize_mode": "adaptive"}, "i2v", "resize_mode"),
            ({"guidance_scale": [3.0, 4.0]}, "t2v", "two-expert"),
            ({"boundary": 0.9}, "t2v", "two-expert"),
            ({"lazy_load": True, "cpu_offload": True}, "t2v", "lazy_load"),
            ({"use_compile": True}, "t2v", "use_compile"),
            ({"t5_cpu_offload": True}, "t2v", "qwen25vl_cpu_offload"),
            ({"cfg_batch": True}, "t2v", "cfg_batch"),
            ({"dit_quantized": True}, "t2v", "dit_quant_scheme"),
            ({"qwen25vl_cpu_offload": "yes"}, "t2v", "qwen25vl_cpu_offload"),
            ({"parallel": {"seq_p_size": 2}}, "t2v", "parallel")]:
        with pytest.raises(UserError, match=fragment):
            generator_config(values, task)
    cfg = generator_config({"feature_caching": "NoCaching", "cpu_offload": False}, "t2v")
    assert cfg.cache.method == "NoCaching" and not cfg.offload.cpu_offload
    # an unset encoder offload follows cpu_offload (LightX2V's rule); a given one wins
    cfg = generator_config({"cpu_offload": True, "byt5_cpu_offload": False}, "i2v")
    o = options(cfg)
    assert o.qwen25vl_cpu_offload and o.siglip_cpu_offload and not o.byt5_cpu_offload and not o.vae_cpu_offload
