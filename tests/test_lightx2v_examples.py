"""LightX2V's Wan examples (its examples/wan/*.py and the seed's two Intel XPU usage examples, as call sequences in
tests/data/lightx2v_wan_examples.json) replayed against our tiny models with only paths and sizes changed. The ones
whose feature we implement run and save a video; the others are refused by feature name."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from lightx2v import LightX2VPipeline
from lightx2v.errors import UserError
from lightx2v_corpus import CONFIGS, EXAMPLES, NOT_IMPLEMENTED, OURS, SIZE, TinyFiles, substitute

API = json.loads((Path(__file__).resolve().parent / "data" / "lightx2v_api.json").read_text())
SIZES = {"height": SIZE["target_height"], "width": SIZE["target_width"], "num_frames": SIZE["target_video_length"]}
# what each example asks for that we lack (everything else runs)
REFUSED = {
    "examples/wan/wan_animate.py": "`model_cls: 'wan2.2_animate'`",
    "examples/wan/wan_vace.py": "`model_cls: 'wan2.1_vace'`",
    "examples/wan/wan_i2v_nvfp4.py": "`dit_quant_scheme: 'nvfp4'` (feature: NVFP4 4-bit weights)",
    "examples/wan/wan_t2v_nvfp4.py": "`dit_quant_scheme: 'nvfp4'` (feature: NVFP4 4-bit weights)",
    "seed:intel_xpu_wan_t2v_flash_attn_usage": "(feature: quantized T5 text encoder)",  # t5_quantized + scheme
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return TinyFiles(tmp_path_factory.mktemp("lightx2v-example-files"))


def _corpus_config(path: str) -> str:
    """The corpus key of an example's config_json (its path from LightX2V's configs/ on)."""
    path = path.replace("\\", "/")
    return path[path.index("configs/"):]


def _cpu_attention(name: str) -> str:
    """sage_attn2 (our INT8/FP8 sage_attn kernel) runs on CUDA only and never falls back to other math; on the CPU
    the test asks for exact attention (the examples' only change beyond paths and sizes, see test_sage_on_cpu)."""
    return "torch_sdpa" if name in ("sage_attn2", "sage_attn") else name


def replay(name: str, tmp_path: Path, files: TinyFiles, cpu: bool = True):
    """Run example ``name``'s calls in order; returns (pipeline, the last generate's result)."""
    pipe = result = None
    model_cls = task = None
    for step in EXAMPLES[name]["steps"]:
        call, kwargs, args = step.get("call"), dict(step.get("kwargs", {})), list(step.get("args", []))
        if "set_attribute" in step:
            setattr(pipe, step["set_attribute"], step["value"])
            continue
        if call == "LightX2VPipeline":
            model_cls, task = kwargs["model_cls"], kwargs["task"]
            ours = model_cls in OURS
            # LightX2V's own constructor takes no src_ref_images (its VACE example passes one): we take what it takes
            kwargs = {k: v for k, v in kwargs.items() if k in {p["name"] for p in API["__init__"]["params"]}}
            if ours:
                kwargs["model_path"] = str(files.model(model_cls, task))
                for key in ("high_noise_original_ckpt", "low_noise_original_ckpt"):
                    if key in kwargs:
                        kwargs[key] = str(files.dit_file(model_cls, task, key.split("_")[0]))
            pipe = LightX2VPipeline(**kwargs)
        elif call == "enable_lora":
            args[0] = [{**e, "path": str(files.lora(model_cls, task))} for e in args[0]]
            pipe.enable_lora(*args, **kwargs)
        elif call == "enable_quantize":
            scheme = kwargs.get("quant_scheme", "fp8-sgl").split("-")[0]
            if kwargs.get("dit_quantized_ckpt") and scheme in ("fp8", "int8"):
                kwargs["dit_quantized_ckpt"] = str(files.quantized(model_cls, task, scheme))
            pipe.enable_quantize(*args, **kwargs)
        elif call.startswith("enable_"):
            getattr(pipe, call)(*args, **kwargs)
        elif call == "create_generator":
            if "config_json" in kwargs:
                key = _corpus_config(kwargs["config_json"])
                cfg = substitute(CONFIGS[key], model_cls, task, files)
                if cpu:
                    cfg = {k: _cpu_attention(v) if k.endswith("attn_1_type") or k.endswith("attn_2_type") else v
                           for k, v in cfg.items()}
                path = tmp_path / Path(key).name
                path.write_text(json.dumps(cfg))
                kwargs["config_json"] = str(path)
            kwargs.update({k: v for k, v in SIZES.items() if k in kwargs})
            if cpu and "attn_mode" in kwargs:
                kwargs["attn_mode"] = _cpu_attention(kwargs["attn_mode"])
            pipe.create_generator(**kwargs)
        elif call == "generate":
            if "image_path" in kwargs:
                kwargs["image_path"] = Image.new("RGB", (48, 40), (200, 40, 30))
            if "last_frame_path" in kwargs:
                kwargs["last_frame_path"] = Image.new("RGB", (48, 40), (30, 40, 200))
            if isinstance(kwargs.get("negative_prompt"), dict):  # a variable of the example's: its text is not data
                kwargs["negative_prompt"] = "blurry"
            kwargs["save_result_path"] = str(tmp_path / "out.mp4")
            result = pipe.generate(**kwargs, progress=False)
        else:
            raise AssertionError(f"{name}: unknown step {step}")
    return pipe, result


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_lightx2v_example(name, tmp_path, files, caplog):
    if name in REFUSED:
        with pytest.raises(UserError) as e:
            replay(name, tmp_path, files)
        assert NOT_IMPLEMENTED.search(str(e.value)) and REFUSED[name] in str(e.value), str(e.value)
        return
    with caplog.at_level(logging.INFO, logger="lightx2v"):
        pipe, result = replay(name, tmp_path, files)
    assert result == {"video": None}  # what LightX2V's generate returns once the video is saved
    assert result.path == str(tmp_path / "out.mp4") and Path(result.path).stat().st_size > 0
    assert "denoise" in caplog.text  # the timing line


def test_seed_intel_xpu_example_keeps_the_json_keys(tmp_path, files):
    """The seed's Intel XPU Wan example: create_generator(config_json=...) then create_generator(attn_mode=...,
    infer_steps=50, ...). As in LightX2V, the second call sets the keys it names and keeps the JSON's others."""
    pipe, _ = replay("seed:intel_xpu_wan_t2v_usage", tmp_path, files)
    cfg = pipe.config
    json_cfg = CONFIGS["configs/platforms/intel_xpu/wan_t2v_1_3.json"]
    assert json_cfg["t5_cpu_offload"] and json_cfg["vae_cpu_offload"] and json_cfg["use_tiling_vae"]
    assert cfg.runtime.t5_cpu_offload and cfg.runtime.vae_cpu_offload and cfg.runtime.use_tiling_vae  # kept
    s = cfg.sampling
    assert (json_cfg["infer_steps"], json_cfg["sample_guide_scale"], json_cfg["sample_shift"]) == (4, 6, 8)
    assert (s.infer_steps, s.guidance_scale, s.sample_shift) == (50, 5.0, 5.0)  # the second call's
    assert (s.height, s.width, s.num_frames) == (32, 32, 5)  # sizes: the test's
    assert cfg.attention.self_attn_1_type == "torch_sdpa"
    assert any("kernel choices" in n and "rope_type='torch_real_rope'" in n for n in cfg.notes)


def test_sage_on_cpu_is_the_one_change(tmp_path, files):
    """With the examples' attention name unchanged (sage_attn2: our INT8 Q.K / FP8 P.V kernel), the CPU run stops
    when the DiT is built, naming the kernel and what it needs; the config itself is accepted."""
    with pytest.raises(UserError, match="attention backend 'sage_attn'") as e:
        replay("examples/wan/wan_t2v.py", tmp_path, files, cpu=False)
    assert "dtype" in str(e.value) or "CUDA" in str(e.value)
