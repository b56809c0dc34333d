"""The TensorRT VAE on a CPU: the ONNX graphs in onnxruntime against PyTorch, every fallback to the PyTorch VAE
(with its one log line and the PyTorch result), and the engine logic (lazy static engines, profile choice, LightX2V's
32-channel encoder output) with onnxruntime standing in for TensorRT.

Only :class:`EngineSession` (tensorrt's deserialize / context / execute) and the real engine build need a GPU. The
fakes below replace exactly those: a "TensorRT" whose builder writes the ONNX graph as the engine file, and a runtime
whose sessions run that graph in onnxruntime.
"""

import importlib.util
import json
import logging

import pytest
import torch
from qwen_reference import rel_max, tiny_diffusers_vae

from lightx2v.errors import UserError
from lightx2v.models.qwen_image import trt as trt_mod
from lightx2v.models.qwen_image.stages import QwenImageOptions
from lightx2v.models.qwen_image.trt import (EngineError, TensorRTRuntime, TensorRTVAE, TensorSpec, build_trt_engines,
                                            check_onnx, export_onnx, make_vae)
from lightx2v.models.qwen_image.vae import QwenImageVAE, load_qwen_image_vae

TOL = 1e-4
SMALL_RATIOS = {"16:9": (64, 32), "9:16": (32, 64), "1:1": (48, 48)}  # the release's sizes, shrunk for the CPU


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-trt-model")
    tiny_diffusers_vae(seed=21).save_pretrained(str(root / "vae"))
    return root


@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setattr(trt_mod, "ASPECT_RATIOS", SMALL_RATIOS)
    monkeypatch.setattr(trt_mod, "STATIC_FOLDERS", {r: r.replace(":", "_") for r in SMALL_RATIOS})


def _latents(h, w, seed=0):
    return torch.randn(1, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(seed))


def _pytorch(model, part):
    return load_qwen_image_vae(model / "vae", parts=(part,))


def _opts(path, multi=False):
    return QwenImageOptions(vae_type="tensorrt", trt_vae_config={"trt_engine_path": str(path),
                                                                  "multi_profile": multi})


def _trt_lines(caplog):
    return [r.getMessage() for r in caplog.records if "TensorRT VAE" in r.getMessage()]


# --- fakes of tensorrt's two GPU-only pieces -------------------------------------------------------------------


class OrtSession:
    """An engine file that holds an ONNX graph, run by onnxruntime (stands in for EngineSession)."""

    def __init__(self, path, profiles=(), fail_run=None):
        import onnxruntime

        self.ort = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        dims = lambda shape: tuple(d if isinstance(d, int) else -1 for d in shape)  # noqa: E731
        self.inputs = [TensorSpec(i.name, dims(i.shape), torch.float32) for i in self.ort.get_inputs()]
        self.outputs = [TensorSpec(o.name, dims(o.shape), torch.float32) for o in self.ort.get_outputs()]
        self.profiles = [tuple(tuple(s) for s in p) for p in profiles]
        self.runs, self.closed, self.fail_run = [], False, fail_run

    def run(self, x, profile=None):
        if self.fail_run:
            raise EngineError(self.fail_run)
        self.runs.append((tuple(x.shape), profile))
        return torch.from_numpy(self.ort.run(None, {self.inputs[0].name: x.float().numpy()})[0])

    def close(self):
        self.closed = True


class FakeRuntime:
    """check_device accepts the CPU; load() opens the engine file as an OrtSession (profiles from the manifest)."""

    def __init__(self, profiles=None, fail_load=None, fail_run=None, session_cls=OrtSession):
        self.profiles, self.session_cls = profiles or {}, session_cls
        self.fail_load, self.fail_run = fail_load, fail_run
        self.sessions = []

    def check_device(self, device, manifest):
        return None

    def load(self, path, device):
        if self.fail_load:
            raise EngineError(self.fail_load)
        s = self.session_cls(path, self.profiles.get(path.name, ()), self.fail_run)
        self.sessions.append((path, s))
        return s


class FakeTensorRT:
    """Enough of the tensorrt module for build_trt_engines: its builder 'serializes' the parsed ONNX file and records
    the optimization profiles."""

    __version__ = "fake"
    built = {}

    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:
        FP16, BF16 = "fp16", "bf16"

    class _Profile:
        def __init__(self):
            self.shapes = None

        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, tuple(lo), tuple(opt), tuple(hi))

    class _Config:
        def __init__(self):
            self.flags, self.profiles = [], []

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p.shapes)

    class _Network:
        source = None

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.source = path
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return FakeTensorRT._Network()

        def create_builder_config(self):
            return FakeTensorRT._Config()

        def create_optimization_profile(self):
            return FakeTensorRT._Profile()

        def build_serialized_network(self, network, config):
            data = open(network.source, "rb").read()
            FakeTensorRT.built[data] = config
            return data


# --- ONNX -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_onnx_graph_matches_pytorch_in_onnxruntime(model, tmp_path, part):
    vae = load_qwen_image_vae(model / "vae")
    path = export_onnx(vae, part, tmp_path / f"{part}.onnx", 32, 48, dynamic=True)
    errors = [check_onnx(vae, part, path, h, w) for h, w in ((32, 48), (64, 40))]  # also a size it was not traced at
    assert max(errors) <= TOL
    # can fail: the graph of another VAE does not pass the check
    other = QwenImageVAE(vae.config)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        check_onnx(other, part, path, 32, 48)
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and not any("3D" in op for op in ops)  # plain 2D convolutions
    shapes = [tuple(d.dim_value or -1 for d in t.type.tensor_type.shape.dim)
              for t in onnx.load(str(path)).graph.input]
    assert shapes[0][:3] == ((1, 3, 1) if part == "encoder" else (1, 16, 1))


# --- fallbacks ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_fallback_without_tensorrt_module(model, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lightx2v")
    vae = make_vae(model, "decoder", options=_opts(tmp_path))
    assert isinstance(vae, QwenImageVAE)
    assert len(_trt_lines(caplog)) == 1 and "tensorrt is not installed" in _trt_lines(caplog)[0]
    z = _latents(32, 48)
    assert torch.equal(vae.decode(z), _pytorch(model, "decoder").decode(z))
    with pytest.raises(UserError, match="tensorrt"):
        build_trt_engines(model, tmp_path / "engines", multi_profile=False)


def test_fallback_when_the_gpu_is_unsupported(model, tmp_path, caplog):
    """The real runtime's device check (here: no CUDA device) with tensorrt's import faked."""
    caplog.set_level(logging.WARNING, logger="lightx2v")
    vae = make_vae(model, "encoder", options=_opts(tmp_path), runtime=TensorRTRuntime(trt=FakeTensorRT))
    assert isinstance(vae, QwenImageVAE) and len(_trt_lines(caplog)) == 1
    assert "needs a CUDA GPU" in _trt_lines(caplog)[0]
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    assert torch.equal(vae.encode(x), _pytorch(model, "encoder").encode(x))


def test_fallback_when_the_engine_path_or_file_is_missing(model, tmp_path, caplog, small_sizes):
    caplog.set_level(logging.WARNING, logger="lightx2v")
    assert isinstance(make_vae(model, "decoder", options=_opts(tmp_path / "nowhere"), runtime=FakeRuntime()),
                      QwenImageVAE)
    assert "is not a folder" in _trt_lines(caplog)[-1]
    assert isinstance(make_vae(model, "decoder", options=_opts(tmp_path), runtime=FakeRuntime()), QwenImageVAE)
    assert "holds no static engine folder" in _trt_lines(caplog)[-1]
    (tmp_path / "16_9").mkdir()  # a static folder without its decoder engine
    vae = make_vae(model, "decoder", options=_opts(tmp_path), runtime=FakeRuntime())
    assert isinstance(vae, TensorRTVAE)
    caplog.clear()
    z = _latents(32, 64)
    for _ in range(2):  # logged once
        assert torch.equal(vae.decode(z), _pytorch(model, "decoder").decode(z))
    assert len(_trt_lines(caplog)) == 1 and "vae_decoder.trt is missing" in _trt_lines(caplog)[0]
    caplog.clear()
    multi = make_vae(model, "decoder", options=_opts(tmp_path, multi=True), runtime=FakeRuntime())
    assert isinstance(multi, QwenImageVAE) and "vae_decoder_multi_profile.trt is missing" in _trt_lines(caplog)[0]


@pytest.fixture(scope="module")
def engines(model, tmp_path_factory):
    """Static (shrunk release sizes) and multi-profile engine folders built with the fake TensorRT."""
    mp = pytest.MonkeyPatch()
    mp.setattr(trt_mod, "ASPECT_RATIOS", SMALL_RATIOS)
    mp.setattr(trt_mod, "STATIC_FOLDERS", {r: r.replace(":", "_") for r in SMALL_RATIOS})
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    root = tmp_path_factory.mktemp("engines")
    try:
        static = build_trt_engines(model, root / "static", multi_profile=False, aspect_ratios=["16:9", "9:16"],
                                   parts=["decoder"], trt=FakeTensorRT, check_size=32)
        multi = build_trt_engines(model, root / "multi", multi_profile=True, profiles=[(32, 32), (64, 96)],
                                  min_size=32, max_size=128, trt=FakeTensorRT, check_size=32)
    finally:
        mp.undo()
    return root, static, multi


def test_build_writes_engines_and_manifest(engines, model):
    root, static, multi = engines
    assert sorted(p.name for p in (root / "static").iterdir()) == ["16_9", "9_16", "lightx2v_trt.json"]
    assert (root / "static" / "16_9" / "vae_decoder.trt").is_file()
    assert not (root / "static" / "16_9" / "vae_encoder.trt").exists()  # parts=["decoder"]
    assert static["static"] == {"16_9": [32, 64], "9_16": [64, 32]} and static["compute_capability"] == [9, 0]
    assert static["vae_sha256"] == trt_mod.vae_fingerprint(model)
    assert json.loads((root / "multi" / "lightx2v_trt.json").read_text()) == multi
    config = FakeTensorRT.built[(root / "multi" / "vae_decoder_multi_profile.trt").read_bytes()]
    assert config.flags == ["fp16"]
    assert config.profiles == [("latents", (1, 16, 1, 4, 4), (1, 16, 1, 4, 4), (1, 16, 1, 16, 16)),
                               ("latents", (1, 16, 1, 4, 4), (1, 16, 1, 8, 12), (1, 16, 1, 16, 16))]


def test_static_engines_load_lazily_one_size_at_a_time(engines, model, small_sizes, caplog):
    root, _, _ = engines
    caplog.set_level(logging.WARNING, logger="lightx2v")
    runtime = FakeRuntime()
    vae = make_vae(model, "decoder", options=_opts(root / "static"), runtime=runtime)
    assert isinstance(vae, TensorRTVAE) and runtime.sessions == []  # nothing loaded before a request
    ref = _pytorch(model, "decoder")
    wide, tall = _latents(32, 64, 1), _latents(64, 32, 2)
    assert rel_max(vae.decode(wide), ref.decode(wide)) <= TOL
    assert rel_max(vae.decode(wide), ref.decode(wide)) <= TOL
    assert len(runtime.sessions) == 1 and runtime.sessions[0][0].parent.name == "16_9"
    assert rel_max(vae.decode(tall), ref.decode(tall)) <= TOL
    (_, first), (path, second) = runtime.sessions
    assert first.closed and not second.closed and path.parent.name == "9_16"  # the previous size released
    assert _trt_lines(caplog) == []
    square = _latents(48, 48, 3)  # a release size without an engine in this folder, then an arbitrary size
    odd = _latents(40, 56, 4)
    assert torch.equal(vae.decode(square), ref.decode(square)) and torch.equal(vae.decode(odd), ref.decode(odd))
    lines = _trt_lines(caplog)
    assert len(lines) == 2 and "1_1" in lines[0] and "no static engine for 56x40" in lines[1]


def test_multi_profile_engine_picks_the_closest_profile(engines, model, caplog):
    root, _, multi = engines
    caplog.set_level(logging.WARNING, logger="lightx2v")
    profiles = {}
    for part in ("encoder", "decoder"):
        cfg = FakeTensorRT.built[(root / "multi" / trt_mod.MULTI_PROFILE_FILES[part]).read_bytes()]
        profiles[trt_mod.MULTI_PROFILE_FILES[part]] = [p[1:] for p in cfg.profiles]
    runtime = FakeRuntime(profiles)
    dec = make_vae(model, "decoder", options=_opts(root / "multi", multi=True), runtime=runtime)
    enc = make_vae(model, "encoder", options=_opts(root / "multi", multi=True), runtime=runtime)
    ref_dec, ref_enc = _pytorch(model, "decoder"), _pytorch(model, "encoder")
    for (h, w), want in (((32, 40), 0), ((64, 96), 1), ((48, 80), 1), ((128, 32), 0)):
        z, x = _latents(h, w, h), torch.rand(1, 3, h, w) * 2 - 1
        assert rel_max(dec.decode(z), ref_dec.decode(z)) <= TOL
        assert rel_max(enc.encode(x), ref_enc.encode(x)) <= TOL
        assert dec._session.runs[-1][1] == want and enc._session.runs[-1][1] == want
    big = _latents(136, 32)  # above every profile's max
    assert torch.equal(dec.decode(big), ref_dec.decode(big))
    assert len(_trt_lines(caplog)) == 1 and "no optimization profile accepts 32x136" in _trt_lines(caplog)[0]


def test_lightx2v_style_encoder_engine_with_mean_and_logvar(engines, model):
    """LightX2V's encoder engines return the 32-channel posterior; the mean is its first 16 channels."""
    root, _, _ = engines

    class WithLogvar(OrtSession):
        def __init__(self, *a):
            super().__init__(*a)
            self.outputs = [TensorSpec("latents", (1, 32, 1, -1, -1), torch.float32)]

        def run(self, x, profile=None):
            mean = super().run(x, profile)
            return torch.cat([mean, torch.full_like(mean, 7.0)], dim=1)

    profiles = {"vae_encoder_multi_profile.trt": [((1, 3, 1, 32, 32), (1, 3, 1, 64, 64), (1, 3, 1, 128, 128))]}
    enc = make_vae(model, "encoder", options=_opts(root / "multi", multi=True),
                   runtime=FakeRuntime(profiles, session_cls=WithLogvar))
    x = torch.rand(1, 3, 48, 64) * 2 - 1
    assert rel_max(enc.encode(x), _pytorch(model, "encoder").encode(x)) <= TOL


def test_fallback_when_the_engine_does_not_match_the_model(engines, model, tmp_path, caplog, small_sizes):
    import shutil

    root, _, _ = engines
    caplog.set_level(logging.WARNING, logger="lightx2v")
    ref = _pytorch(model, "decoder")

    class WrongChannels(OrtSession):
        def __init__(self, *a):
            super().__init__(*a)
            self.inputs = [TensorSpec("latents", (1, 48, 1, 4, 8), torch.float32)]

    vae = make_vae(model, "decoder", options=_opts(root / "static"), runtime=FakeRuntime(session_cls=WrongChannels))
    z = _latents(32, 64)
    assert torch.equal(vae.decode(z), ref.decode(z))
    assert "does not match the model: it maps 48 to 3 channels" in _trt_lines(caplog)[-1]
    # an engine folder where 16_9 holds the 9:16 engine (a static size that is not its folder's)
    swapped = tmp_path / "swapped"
    shutil.copytree(root / "static", swapped)
    shutil.copy(swapped / "9_16" / "vae_decoder.trt", swapped / "16_9" / "vae_decoder.trt")
    vae = make_vae(model, "decoder", options=_opts(swapped), runtime=FakeRuntime())
    assert torch.equal(vae.decode(z), ref.decode(z))
    assert "expected [1, 16, 1, 4, 8] for 64x32" in _trt_lines(caplog)[-1]
    # tensors named otherwise than the manifest records
    class Renamed(OrtSession):
        def __init__(self, *a):
            super().__init__(*a)
            self.inputs = [TensorSpec("z", s.shape, s.dtype) for s in self.inputs]

    vae = make_vae(model, "decoder", options=_opts(root / "static"), runtime=FakeRuntime(session_cls=Renamed))
    assert torch.equal(vae.decode(z), ref.decode(z))
    assert "named 'z' -> 'image', the manifest says 'latents' -> 'image'" in _trt_lines(caplog)[-1]
    # engines built from other VAE weights (the manifest's fingerprint)
    manifest = json.loads((swapped / "lightx2v_trt.json").read_text())
    (swapped / "lightx2v_trt.json").write_text(json.dumps({**manifest, "vae_sha256": "0" * 64}))
    caplog.clear()
    vae = make_vae(model, "decoder", options=_opts(swapped), runtime=FakeRuntime())
    assert isinstance(vae, QwenImageVAE) and "built from other VAE weights" in _trt_lines(caplog)[0]


def test_fallback_when_allocation_fails(engines, model, caplog, small_sizes):
    root, _, _ = engines
    caplog.set_level(logging.WARNING, logger="lightx2v")
    ref = _pytorch(model, "decoder")
    z = _latents(32, 64)
    ctx = make_vae(model, "decoder", options=_opts(root / "static"),
                   runtime=FakeRuntime(fail_load="cannot allocate the execution context of x (out of GPU memory?)"))
    assert torch.equal(ctx.decode(z), ref.decode(z))
    assert "cannot allocate the execution context" in _trt_lines(caplog)[-1]
    caplog.clear()
    runtime = FakeRuntime(fail_run="cannot allocate the engine's output (CUDA out of memory)")
    out = make_vae(model, "decoder", options=_opts(root / "static"), runtime=runtime)
    assert torch.equal(out.decode(z), ref.decode(z))
    assert len(_trt_lines(caplog)) == 1 and "cannot allocate the engine's output" in _trt_lines(caplog)[0]
    assert runtime.sessions[0][1].closed  # the failed engine is released
