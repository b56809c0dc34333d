"""LightX2V's own Wan configs (all 250 of its configs/ at f8aee98, as data in tests/data) through our config layer,
pointed at the built-in tiny models with only paths and sizes changed: each one runs, or is refused with the
"LightX2V key `X` (feature: Y) is not implemented in lightx2v" message; nothing else. A sample of one config per
folder generates a clip on CPU. The counts are the README's."""

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightx2v import LightX2VPipeline
from lightx2v.errors import UserError
from lightx2v.ops.attention import describe
from lightx2v_corpus import CONFIGS, OURS, TinyFiles, model_class, outcome, substitute, task_of

README = Path(__file__).resolve().parents[1] / "README.md"

# One config per folder of LightX2V's configs/ with something that runs (the compile configs are left out for time:
# test_runtime_options covers use_compile), each exercising another part of the engine.
SAMPLE = [
    "configs/attentions/wan_i2v_radial.json",  # radial_attn self-attention, flash_attn3 cross-attention falling back
    "configs/bench/lightx2v_5.json",  # dit_quantized fp8-sgl from float weights (quantized at load), cpu_offload
    "configs/caching/teacache/wan_t2v_1_3b_tea_480p.json",  # TeaCache
    "configs/changing_resolution/wan_i2v_U.json",  # two resolution changes, I2V
    "configs/distill/wan22/wan_moe_i2v_distill_with_lora.json",  # two experts, step-distilled, LoRA per expert
    "configs/platforms/intel_xpu/wan_t2v_1_3_lazy_offload_fp8.json",  # lazy_load + pre-quantized folder, kernels
    "configs/quantization/wan_i2v.json",  # int8-vllm
    "configs/sparse_attn/spas_sage_attn/wan_i2v.json",  # sage_attn (CPU: torch_sdpa, see _on_cpu)
    "configs/video_frame_interpolation/wan_t2v.json",  # RIFE 16 -> 24 fps
    "configs/wan/wan_flf2v.json",  # FLF2V
    "configs/wan22/wan_moe_i2v_4090.json",  # boundary + boundary_step_index + a step list on wan2.2_moe
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return TinyFiles(tmp_path_factory.mktemp("lightx2v-files"))


def _config_file(tmp_path: Path, name: str, cfg: dict, files: TinyFiles) -> tuple[str, str, Path]:
    cls = model_class(name, cfg)
    task = task_of(name, cls)
    path = tmp_path / (name.replace("/", "__"))
    path.write_text(json.dumps(substitute(cfg, cls, task, files)))
    return cls, task, path


def _check(name: str, cfg: dict, tmp_path: Path, files: TinyFiles) -> tuple[str, Exception | None]:
    cls = model_class(name, cfg)
    try:
        cls, task, path = _config_file(tmp_path, name, cfg, files)
        pipe = LightX2VPipeline(model_path=files.model(cls, task) if cls in OURS else None, model_cls=cls, task=task)
        pipe.check_generator(config_json=str(path))
    except UserError as e:
        return outcome(e), e
    return "ran", None


def test_every_lightx2v_wan_config_runs_or_is_refused_by_feature(tmp_path, files):
    logging.getLogger("lightx2v").setLevel(logging.WARNING)
    try:
        results = {name: _check(name, cfg, tmp_path, files) for name, cfg in CONFIGS.items()}
    finally:
        logging.getLogger("lightx2v").setLevel(logging.NOTSET)
    counts = Counter(kind for kind, _ in results.values())
    other = {name: str(e) for name, (kind, e) in results.items() if kind == "other"}
    assert not other, other
    assert counts["ran"] + counts["refused"] == len(CONFIGS) == 250
    # the counts are the README's (a feature that lands changes them: say so there)
    text = README.read_text()
    m = re.search(r"(\d+) of LightX2V's (\d+) Wan configs run unchanged[^.]*; (\d+) are refused", text)
    assert m, "README: the corpus counts sentence is missing"
    assert (int(m[1]), int(m[2]), int(m[3])) == (counts["ran"], len(CONFIGS), counts["refused"]), counts
    # refusals name a LightX2V feature; the ones of features other work is adding say so too
    refused = {name: str(e) for name, (kind, e) in results.items() if kind == "refused"}
    assert "LightX2V key `parallel` (feature: multi-GPU" in refused["configs/dist_infer/wan_t2v_dist_ulysses.json"]
    assert re.search("`disagg_(mode|config)`", refused["configs/disagg/wan/wan_t2v_disagg_encoder.json"])
    assert "`feature_caching: 'Ada'` (feature: AdaCache)" in refused["configs/caching/adacache/wan_t2v_ada.json"]
    assert "`model_cls: 'wan2.2_animate'`" in refused["configs/wan22/wan_animate.json"]
    # what issue 12 found refused: the quantized / kernel-selector / latent-channel configs now run
    for name in ("configs/quantization/wan_i2v.json", "configs/platforms/intel_xpu/wan_t2v_1_3.json",
                 "configs/wan22/wan_ti2v_t2v.json", "configs/wan22/wan_moe_i2v_4090.json",
                 "configs/platforms/intel_xpu/wan_t2v_1_3_lazy_offload_fp8.json"):
        assert results[name][0] == "ran", (name, results[name][1])


def _on_cpu(cfg: dict) -> dict:
    """The one change a CPU run needs beyond paths and sizes: our approximate (INT8/FP8) attention kernels need a
    CUDA GPU and never fall back to other math by themselves, so the test asks for exact attention instead."""
    out = dict(cfg)
    for key in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type"):
        entry = describe(out.get(key, "torch_sdpa"))
        if entry is not None and entry.kind == "approximate" and entry.ours is not None:
            out[key] = "torch_sdpa"
    return out


def _generate(pipe: LightX2VPipeline, task: str, **kw):
    images = {}
    if task in ("i2v", "flf2v"):
        images["image_path"] = Image.new("RGB", (40, 48), (200, 40, 30))
    if task == "flf2v":
        images["last_frame_path"] = Image.new("RGB", (40, 48), (30, 40, 200))
    return pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False, **images, **kw)["video"]


def test_a_sample_per_folder_generates(tmp_path, files):
    names = sorted({name.split("/")[1] for name in SAMPLE})
    ran = {name.split("/")[1] for name, cfg in CONFIGS.items() if _check(name, cfg, tmp_path, files)[0] == "ran"}
    assert set(names) == ran, "one sample config per folder with configs that run"
    for name in SAMPLE:
        cfg = _on_cpu(CONFIGS[name])
        cls, task, path = _config_file(tmp_path, name, cfg, files)
        pipe = LightX2VPipeline(model_path=files.model(cls, task), model_cls=cls, task=task)
        pipe.create_generator(config_json=str(path))
        frames = _generate(pipe, task)
        vfi = cfg.get("video_frame_interpolation")
        want = 5 if vfi is None else (5 - 1) * vfi["target_fps"] // cfg.get("fps", 16) + 1
        assert frames.shape == (want, 32, 32, 3), name
        assert torch.isfinite(frames).all() and 0 <= frames.min() and frames.max() <= 1, name


def _expert_calls(pipe) -> list[int]:
    calls = []
    for i, e in enumerate(pipe.runner.transformer.experts):
        e.dit.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize("model_cls", ["wan2.2_moe", "wan2.2_moe_distill"])
def test_boundary_and_boundary_step_index_together_as_lightx2v(tmp_path, files, caplog, model_cls):
    """configs/wan22/wan_moe_i2v_4090.json sets boundary 0.9, boundary_step_index 2, a 4-step list and 40 steps.
    LightX2V's wan2.2_moe runner samples 40 steps (WanScheduler: no step list) and switches experts at t = 0.9 x
    1000 (MultiModelStruct); its wan2.2_moe_distill runner takes the 4 steps of the list and switches after 2
    (MultiDistillModelStruct), reading no boundary. The keys a class does not read are ignored with a note."""
    name = "configs/wan22/wan_moe_i2v_4090.json"
    cfg = _on_cpu(CONFIGS[name])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(substitute(cfg, model_cls, "i2v", files)))
    pipe = LightX2VPipeline(model_path=files.model(model_cls, "i2v"), model_cls=model_cls, task="i2v")
    with caplog.at_level(logging.INFO, logger="lightx2v"):
        pipe.create_generator(config_json=str(path))
    s = pipe.config.sampling
    calls = _expert_calls(pipe)
    _generate(pipe, "i2v")
    if model_cls == "wan2.2_moe":
        assert (s.infer_steps, s.boundary, s.boundary_step_index, s.denoising_step_list) == (40, 0.9, None, None)
        assert "denoising_step_list ignored" in caplog.text and "boundary_step_index ignored" in caplog.text
        # no CFG (enable_cfg false): one forward a step; the high-noise expert (0) while t >= 0.9 x 1000
        timesteps = pipe.runner.transformer.scheduler(s, s.sample_shift).timesteps.tolist()
        high = sum(1 for t in timesteps if t >= 900)
        assert len(timesteps) == 40 and 0 < high < 40
        assert calls == [0] * high + [1] * (40 - high)
    else:
        assert (s.infer_steps, s.boundary, s.boundary_step_index) == (4, None, 2)
        assert s.denoising_step_list == (1000, 750, 500, 250)
        assert calls == [0, 0, 1, 1]  # the first boundary_step_index steps on the high-noise expert
        assert "boundary ignored" in caplog.text
