"""The rest of issue 12 (LightX2V drop-in): builder methods and constructor arguments with LightX2V's signatures and
meaning, pre-quantized checkpoints (ours and LightX2V's layout, lazy_load), kernel selectors, latent channels and
repeated DiT sizes, key suggestions, and the answers to a new user's bad input (before any model loads)."""

import inspect
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from lightx2v import LightX2VPipeline
from lightx2v.cli import main
from lightx2v.config import build_config, suggest, all_keys
from lightx2v.convert import convert_checkpoint
from lightx2v.engine.family import families
from lightx2v.errors import CheckpointError, UserError
from lightx2v.ops.quant import QuantLinear
from lightx2v_corpus import NOT_IMPLEMENTED, TinyFiles

API = json.loads((Path(__file__).resolve().parent / "data" / "lightx2v_api.json").read_text())
SMALL = dict(height=32, width=32, num_frames=5, infer_steps=2)
WAN = families()["wan"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return TinyFiles(tmp_path_factory.mktemp("dropin-files"))


def _frames(pipe, **kw):
    return pipe.generate(seed=3, prompt="a cat", return_result_tensor=True, progress=False, **kw)["video"]


# --- API: LightX2V's signatures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["__init__", "enable_quantize", "enable_offload", "enable_lora", "enable_cache",
                                    "enable_lightvae", "enable_parallel", "switch_lora"])
def test_signatures_are_lightx2vs(method):
    """Parameter names and defaults as LightX2V's (the constructor's model_path / model_cls / task defaults are
    ours: None picks the built-in tiny model, task t2v)."""
    ours = inspect.signature(getattr(LightX2VPipeline, method)).parameters
    for p in API[method]["params"]:
        assert p["name"] in ours, (method, p["name"])
        if method == "__init__" and p["name"] in ("task", "model_path", "model_cls", "support_tasks"):
            continue
        default = ours[p["name"]].default
        default = list(default) if isinstance(default, tuple) else default
        if p.get("default", inspect.Parameter.empty) is not inspect.Parameter.empty and "default" in p:
            assert default == p["default"], (method, p["name"], default, p["default"])


def test_builder_methods_set_lightx2vs_keys(files):
    pipe = LightX2VPipeline()
    pipe.enable_offload(cpu_offload=True, offload_granularity="phase", text_encoder_offload=True, vae_offload=True)
    pipe.enable_cache("Tea", coefficients=[1.0, 0.0], teacache_thresh=0.2)
    pipe.enable_lora([{"path": str(files.lora("wan2.1", "t2v")), "strength": 0.5}], lora_dynamic_apply=True)
    pipe.enable_lightvae(use_tae=True, tae_path=str(files.tae(16)))
    pipe.enable_parallel()  # sizes 1: nothing to parallelize
    cfg = pipe.check_generator(**SMALL)
    assert (cfg.offload.cpu_offload, cfg.offload.offload_granularity) == (True, "phase")
    assert cfg.runtime.t5_cpu_offload and cfg.runtime.vae_cpu_offload and not cfg.runtime.clip_cpu_offload
    assert cfg.cache.method == "Tea" and cfg.cache.teacache_thresh == 0.2
    assert cfg.lora.mode == "dynamic" and cfg.lora.loras[0].strength == 0.5
    assert cfg.family.use_tae and cfg.family.tae_path == str(files.tae(16))
    pipe.enable_cache("Mag", magcache_calibration=True)  # another method replaces the last one's keys
    assert pipe.check_generator(**SMALL).cache.method == "Mag"
    with pytest.raises(UserError) as e:
        pipe.enable_parallel(cfg_p_size=2)
    assert NOT_IMPLEMENTED.search(str(e.value)) and "`parallel`" in str(e.value)
    with pytest.raises(UserError, match="quantized text encoder"):
        pipe.enable_quantize(text_encoder_quantized=True)
    # the later call wins: a config_json after a builder call replaces the keys it names
    pipe.t5_cpu_offload = False  # LightX2V's pipeline is its config: an attribute is a key
    assert not pipe.check_generator(**SMALL).runtime.t5_cpu_offload


def test_constructor_arguments(files, tmp_path):
    dit = files.dit_file("wan2.1", "t2v")
    cfg = LightX2VPipeline(dit_original_ckpt=str(dit)).check_generator(**SMALL)
    assert cfg.checkpoint.dit_original_ckpt == str(dit)
    with pytest.raises(UserError) as e:
        LightX2VPipeline(sf_model_path="x.pt")
    assert NOT_IMPLEMENTED.search(str(e.value)) and "self-forcing" in str(e.value)
    with pytest.raises(UserError, match="support_tasks"):
        LightX2VPipeline(support_tasks=["s2v"])
    pipe = LightX2VPipeline(model_cls="wan2.2", task="t2v", support_tasks=["t2v", "i2v"])
    assert pipe.support_tasks == ["t2v", "i2v"]
    with pytest.raises(UserError, match="two-expert"):  # the experts' keys on a one-DiT model
        LightX2VPipeline(high_noise_original_ckpt=str(dit)).check_generator(**SMALL)
    ran = LightX2VPipeline(transformer_model_name="480p_t2v")  # HunyuanVideo's sub-folder: Wan has one transformer
    assert ran.check_generator(**SMALL) is not None
    with pytest.raises(UserError) as e:
        LightX2VPipeline(model_cls="wan2.1_vace", task="vace")
    assert NOT_IMPLEMENTED.search(str(e.value))


def test_generate_returns_lightx2vs_dict(tmp_path):
    pipe = LightX2VPipeline().create_generator(**SMALL)
    saved = pipe.generate(seed=1, prompt="x", save_result_path=tmp_path / "o.mp4", progress=False)
    assert saved == {"video": None} and saved.path == str(tmp_path / "o.mp4") and isinstance(saved.path, str)
    both = pipe.generate(seed=1, prompt="x", save_result_path=tmp_path / "p.mp4", return_result_tensor=True,
                         progress=False)
    assert list(both) == ["video"] and both["video"].shape == (5, 32, 32, 3) and Path(both.path).is_file()
    with pytest.raises(UserError, match="lora_mode"):
        pipe.switch_lora("x.safetensors", 1.0)


# --- pre-quantized checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_pre_quantized_checkpoints_are_recognised(tmp_path, files, scheme, caplog):
    """`lightx2v convert --quantize` output loads without dit_quant_scheme (recognised from its weight_scale
    tensors) and gives exactly what quantizing at load gives; LightX2V's layout (dit_quantized + a folder of
    block_N.safetensors, its converter's --save_by_block) too, and with lazy_load."""
    tiny = files.model("wan2.1", "t2v")
    ref = _frames(LightX2VPipeline(model_path=tiny).create_generator(**SMALL, dit_quant_scheme=scheme))
    plain = _frames(LightX2VPipeline(model_path=tiny).create_generator(**SMALL))
    assert (ref - plain).abs().max() > 0  # quantization is visible
    # convert rewrites the text encoder and the VAE too: compare with its float twin, quantized at load
    twin = convert_checkpoint(tiny, tmp_path / "f", layout="wan")
    twin_ref = _frames(LightX2VPipeline(model_path=twin).create_generator(**SMALL, dit_quant_scheme=scheme))
    ours = convert_checkpoint(tiny, tmp_path / "q", layout="wan", quantize=scheme)
    with caplog.at_level(logging.INFO, logger="lightx2v"):
        pipe = LightX2VPipeline(model_path=ours).create_generator(**SMALL)
    assert f"pre-quantized {scheme} linears" in caplog.text
    assert isinstance(pipe.runner.transformer.dit.blocks[0].self_attn.q, QuantLinear)
    assert torch.equal(_frames(pipe), twin_ref)
    # LightX2V's layout, from dit_quantized_ckpt (a folder of block files), with LightX2V's scheme names
    folder = files.quantized("wan2.1", "t2v", scheme, by_block=True)
    assert (folder / "non_block.safetensors").is_file() and (folder / "block_0.safetensors").is_file()
    lx = dict(dit_quantized=True, dit_quant_scheme=f"{scheme}-sgl", dit_quantized_ckpt=str(folder))
    theirs = _frames(LightX2VPipeline(model_path=tiny).create_generator(**SMALL, **lx))
    assert (theirs - ref).abs().max() < 2e-3  # their rounding of the scale (clamp before / qmax) aside, the same
    off = dict(cpu_offload=True, offload_granularity="block")
    lazy = _frames(LightX2VPipeline(model_path=tiny).create_generator(**SMALL, **lx, **off, lazy_load=True))
    held = _frames(LightX2VPipeline(model_path=tiny).create_generator(**SMALL, **lx, **off))
    assert torch.equal(lazy, held)  # the blocks read from disk as stored: the same weights as in host memory
    assert (lazy - theirs).abs().max() < 1e-5  # CPU float32 sums in another order over the offload buffers
    with pytest.raises(CheckpointError, match=f"holds {scheme} weights"):
        other = "fp8" if scheme == "int8" else "int8"
        LightX2VPipeline(model_path=ours).create_generator(**SMALL, dit_quant_scheme=other)


def test_lazy_load_with_float_weights_and_a_scheme_is_refused_by_reason(files):
    with pytest.raises(UserError, match="lightx2v convert SRC DST --layout wan --quantize fp8"):
        LightX2VPipeline().create_generator(**SMALL, cpu_offload=True, lazy_load=True, dit_quant_scheme="fp8")


def test_dit_quantized_needs_a_scheme_and_unimplemented_formats_are_named():
    with pytest.raises(UserError, match="dit_quantized: true needs dit_quant_scheme"):
        build_config({}, {"dit_quantized": True}, {}, family=WAN)
    for scheme, feature in (("nvfp4", "NVFP4"), ("gguf-Q4_K_S", "GGUF"), ("mxfp4", "MXFP4")):
        with pytest.raises(UserError) as e:
            build_config({}, {"dit_quantized": True, "dit_quant_scheme": scheme}, {}, family=WAN)
        assert NOT_IMPLEMENTED.search(str(e.value)) and feature in str(e.value)


# --- kernel selectors, checkpoint sizes, suggestions ------------------------------------------------------------

def test_kernel_selectors_same_math_accepted_other_math_refused(caplog):
    values = {"rms_norm_type": "sgl-kernel", "layer_norm_type": "Triton", "modulate_type": "torch",
              "rope_type": "flashinfer_rope", "norm_modulate_backend": "torch", "double_precision_rope": True}
    cfg = build_config({}, values, {}, family=WAN)
    assert len([n for n in cfg.notes if "kernel choices" in n]) == 1  # one line for all of them
    assert "rope_type='flashinfer_rope'" in cfg.notes[0]
    with pytest.raises(UserError, match="SeedVR's implementation"):
        build_config({}, {"rope_type": "rope3d"}, {}, family=WAN)
    with pytest.raises(UserError, match="not an implementation LightX2V registers"):
        build_config({}, {"rms_norm_type": "fastest"}, {}, family=WAN)


def test_num_channels_latents_and_dit_sizes_checked_against_the_checkpoint():
    assert LightX2VPipeline(model_cls="wan2.2").check_generator(**SMALL, num_channels_latents=48)
    with pytest.raises(UserError, match="num_channels_latents=16 does not fit .* 48 latent channels"):
        LightX2VPipeline(model_cls="wan2.2").check_generator(**SMALL, num_channels_latents=16)
    from lightx2v.models.wan.checkpoint import read_dit_config
    from lightx2v.models.wan.tiny import ensure_tiny_model

    tiny = read_dit_config(ensure_tiny_model(), "wan")
    assert LightX2VPipeline().check_generator(**SMALL, dim=tiny.dim, num_layers=tiny.num_layers, eps=1e-6)
    with pytest.raises(UserError, match=f"dim=5120 does not fit the DiT .* dim={tiny.dim}"):
        LightX2VPipeline().check_generator(**SMALL, dim=5120)
    with pytest.raises(UserError, match="window_size"):
        build_config({}, {"window_size": [8, 8]}, {}, family=WAN)


def test_suggestions_only_for_close_spellings():
    known = all_keys(WAN)
    assert suggest("infer_step", known) == ["infer_steps"]
    assert suggest("enable_cgf", known) == ["enable_cfg"]
    assert suggest("lora_mod", known) == ["lora_mode"]
    for far in ("disagg_mod", "target_fsp", "enable_reus", "cfg_scal"):
        assert not [k for k in suggest(far, known) if k in ("lora_mode", "target_width", "enable_cfg",
                                                            "guidance_scale")], far
    for key, value in (("disagg_mode", "encoder"), ("cfg_scale", 4.0), ("enable_reuse", True)):
        with pytest.raises(UserError) as e:
            build_config({}, {key: value}, {}, family=WAN)
        assert NOT_IMPLEMENTED.search(str(e.value)) and "did you mean" not in str(e.value), key
    cfg = build_config({}, {"target_fps": 16, "convert_model_dtype": True}, {}, family=WAN)  # LightX2V ignores them
    assert any("target_fps ignored" in n for n in cfg.notes)


# --- a new user's bad input: one line, exit 2, before any model loads ---------------------------------------------

def _cli(capsys, caplog, *argv):
    with caplog.at_level(logging.INFO, logger="lightx2v"):
        code = main(list(argv))
    err = capsys.readouterr().err
    return code, err, caplog.text


@pytest.mark.parametrize("path,message", [
    ("/proc/x.mp4", "cannot write to the output folder '/proc'"),
    ("OUT/o.txt", "unsupported file type '.txt'"),
    ("OUT/o", "unsupported file type '(none)'"),
    ("OUT/o.png", "is an image file name but the result has 5 frames"),
])
def test_output_path_checked_before_loading(capsys, caplog, tmp_path, path, message):
    path = path.replace("OUT", str(tmp_path))
    code, err, log = _cli(capsys, caplog, "generate", "--save_result_path", path, "--num_frames", "5")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "loaded" not in log


def test_request_checked_before_loading(capsys, caplog, tmp_path):
    out = str(tmp_path / "o.mp4")
    code, err, log = _cli(capsys, caplog, "generate", "--save_result_path", out, "--seed", "-1")
    assert code == 2 and "seed=-1" in err and "loaded" not in log
    code, err, log = _cli(capsys, caplog, "generate", "--save_result_path", out, "--height", "480", "--width", "832",
                          "--num_frames", "100001")
    assert code == 2 and "num_frames=100001" in err and "memory" in err and "loaded" not in log
    code, err, _ = _cli(capsys, caplog, "generate", "--save_result_path", out, "--boundary", "0.5")
    assert code == 2 and "boundary=0.5" in err and "one DiT" in err and "guidance_scale" not in err
    code, err, _ = _cli(capsys, caplog, "generate", "--save_result_path", out, "--config_json", str(tmp_path))
    assert code == 2 and "is a folder, not a JSON file" in err


def test_large_result_warns(monkeypatch, caplog):
    from lightx2v import pipeline
    from lightx2v.engine.request import SamplingConfig

    monkeypatch.setattr(pipeline, "_memory_bytes", lambda: (8 * 2**30, 4 * 2**30))
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        pipeline.check_output_size(SamplingConfig(height=480, width=832, num_frames=161))  # 1.4 GiB
    assert "num_frames=161 at 480x832: decoding it takes at least 1.4 GiB" in caplog.text
    with pytest.raises(UserError, match="more than this machine's 8.0 GiB"):
        pipeline.check_output_size(SamplingConfig(height=720, width=1280, num_frames=401))


def test_cpu_offload_on_a_cpu_run_is_said_once(caplog):
    with caplog.at_level(logging.INFO, logger="lightx2v"):
        LightX2VPipeline().create_generator(**SMALL, cpu_offload=True, device="cpu")
    assert caplog.text.count("cpu_offload: the DiT runs on the CPU") == 1


def test_model_path_at_the_tiny_model_brings_its_sizes():
    from lightx2v.models.wan.tiny import ensure_tiny_model

    s = LightX2VPipeline(model_path=ensure_tiny_model()).check_generator().sampling
    assert (s.height, s.width, s.num_frames, s.infer_steps) == (128, 128, 17, 20)


def test_cli_usage_version_and_help(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: lightx2v" in err and "generate" in err and "convert" in err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("lightx2v ")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    from lightx2v.cli import OVERRIDES

    options = text[text.index("overrides:"):]
    for flag in OVERRIDES:
        block = options[options.index(f"--{flag} "):]
        assert "(default" in block[:400], flag
    assert "denoising steps (default 50)" in " ".join(text.split())
    assert "--dit_quant_scheme" in text


def test_the_api_logs_its_timing_line_without_logging_configured(monkeypatch):
    """A script that configures no logging sees the timing line (a stderr handler of ours on "lightx2v"); once it
    configures logging, ours steps aside and the level is theirs. Nothing is configured at import."""
    import io

    from lightx2v.pipeline import _ensure_log_handler

    root, ours = logging.getLogger(), logging.getLogger("lightx2v")
    saved = (list(root.handlers), list(ours.handlers), ours.level)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        root.handlers, ours.handlers = [], []
        ours.setLevel(logging.NOTSET)
        pipe = LightX2VPipeline().create_generator(**SMALL)
        pipe.generate(seed=1, prompt="x", return_result_tensor=True, progress=False)
        assert "denoise" in stream.getvalue() and "VAE decode" in stream.getvalue()
        assert len(ours.handlers) == 1 and ours.level == logging.INFO
        root.addHandler(logging.NullHandler())  # the caller configures logging
        _ensure_log_handler()
        assert ours.handlers == [] and ours.level == logging.NOTSET
    finally:
        root.handlers, ours.handlers = saved[0], saved[1]
        ours.setLevel(saved[2])


def test_i2v_uses_the_pil_image_processor():
    """No torchvision warning on an I2V run: transformers' PIL processor, chosen explicitly."""
    pipe = LightX2VPipeline(task="i2v").create_generator(**SMALL)
    with pipe.runner.encoder.image_encoder.use() as clip:
        names = {type(v).__name__ for v in vars(clip).values()}
    assert "CLIPImageProcessorPil" in names or not hasattr(__import__("transformers"), "CLIPImageProcessorPil")
