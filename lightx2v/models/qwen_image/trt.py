"""TensorRT engines for the Qwen-Image VAE, with the PyTorch VAE as the fallback.

Selected by ``vae_type: "tensorrt"`` and ``trt_vae_config: {"trt_engine_path": DIR, "multi_profile": bool}``
(LightX2V's keys and engine folder layout, so its engines load too):

* static engines (``multi_profile: false``, text-to-image): ``DIR/<16_9|9_16|1_1|4_3|3_4|3_2|2_3>/vae_encoder.trt``
  and ``vae_decoder.trt``, one pair per aspect ratio at the release's size (``arch.ASPECT_RATIOS``). A pair is loaded
  on the first request at its size and released when a request at another size comes (one pair in GPU memory);
  other sizes run on the PyTorch VAE.
* one multi-profile engine per half (``multi_profile: true``, edits: images of any size):
  ``DIR/vae_encoder_multi_profile.trt`` / ``vae_decoder_multi_profile.trt``. Each optimization profile accepts
  sizes in [min, max] and is tuned for its ``opt`` size; a request runs on the profile whose opt size is closest
  (|dh| + |dw|) among those that accept it.

Engines take and return 5D tensors as LightX2V's do: the encoder image [1, 3, 1, H, W] in [-1, 1] -> latents
[1, 16 (or 32: mean and log-variance), 1, H/8, W/8] (not normalised: the mean is taken, then normalised here), the
decoder raw latents [1, 16, 1, h, w] -> image [1, 3, 1, 8h, 8w] (clamped here). The IO dtype is read from the
engine.

Fallback: whenever an engine cannot serve a request the PyTorch VAE does (loaded on first need), and ONE log line
(logger ``lightx2v``, once per reason) says why: tensorrt is not importable; the engine path or file is missing; the
engine does not match the model (tensor ranks/channels/static size; names other than ``lightx2v_trt.json``'s; that
manifest saying it was built from other VAE weights); the GPU is not supported (no CUDA device, another compute
capability than it was built for, TensorRT refuses to deserialize it); allocating the execution context or the
output fails.

Building (:func:`build_trt_engines`; ``lightx2v build-trt`` calls it): the VAE halves are exported to ONNX as the 2D
networks they are for single images (``vae.py``: no Conv3d, a third of the multiply-adds of the 3D graph), each
export is checked in onnxruntime on the CPU against PyTorch (<= 1e-4 relative), and TensorRT builds the engines; a
manifest ``lightx2v_trt.json`` records the VAE weights' sha256, the GPU's compute capability, the sizes and profiles.

Everything but the engine build and execution runs on a CPU: the session objects (:class:`EngineSession`) are the
only code that touches tensorrt, and tests inject fakes of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import UserError
from lightx2v.models.qwen_image.arch import ASPECT_RATIOS, IMAGE_CHANNELS
from lightx2v.models.qwen_image.checkpoint import VAE_DIR, model_root
from lightx2v.models.qwen_image.vae import (PARTS, VAE_CONFIG, VAE_WEIGHTS, QwenImageVAE, _decoder2d, _encoder2d,
                                            load_qwen_image_vae, read_vae_config)
from lightx2v.loading import safetensors_files

log = logging.getLogger("lightx2v")

STATIC_FOLDERS = {ratio: ratio.replace(":", "_") for ratio in ASPECT_RATIOS}  # "16:9" -> "16_9"
ENGINE_FILES = {"encoder": "vae_encoder.trt", "decoder": "vae_decoder.trt"}
MULTI_PROFILE_FILES = {"encoder": "vae_encoder_multi_profile.trt", "decoder": "vae_decoder_multi_profile.trt"}
MANIFEST = "lightx2v_trt.json"
MANIFEST_FORMAT = 1
# (height, width) opt sizes of the multi-profile engines: LightX2V's profile list, its 3:2 one (1088x1620, not a
# multiple of 16: no latent grid) made 1088x1632. Every profile accepts sizes in [MIN_SIZE, MAX_SIZE].
DEFAULT_PROFILES = ((512, 512), (1024, 1024), (480, 848), (720, 1280), (1088, 1920), (1280, 720), (1920, 1088),
                    (768, 1024), (1088, 1632))
MIN_SIZE, MAX_SIZE = 256, 2048
IO_NAMES = {"encoder": ("image", "latents"), "decoder": ("latents", "image")}
ONNX_TOLERANCE = 1e-4


# --- export graphs ---------------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    """image [B, 3, 1, H, W] in [-1, 1] -> posterior mean [B, z, 1, H/8, W/8] (the graph the encoder engine holds)."""

    def __init__(self, vae: QwenImageVAE):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = _encoder2d(self.vae.encoder, image[:, :, 0])
        z = self.vae.config.z_dim
        return F.conv2d(h, self.vae.conv1.weight[:z, :, 0], self.vae.conv1.bias[:z])[:, :, None]


class DecoderGraph(nn.Module):
    """raw latents [B, z, 1, h, w] -> image [B, 3, 1, 8h, 8w] clamped to [-1, 1] (the decoder engine's graph)."""

    def __init__(self, vae: QwenImageVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(latents[:, :, 0], self.vae.conv2.weight[:, :, 0], self.vae.conv2.bias)
        return _decoder2d(self.vae.decoder, x).clamp(-1.0, 1.0)[:, :, None]


def _graph(vae: QwenImageVAE, part: str) -> nn.Module:
    return (EncoderGraph if part == "encoder" else DecoderGraph)(vae).eval()


def _example_input(vae: QwenImageVAE, part: str, height: int, width: int) -> torch.Tensor:
    sf = vae.spatial_factor
    g = torch.Generator().manual_seed(0)
    if part == "encoder":
        return torch.rand((1, IMAGE_CHANNELS, 1, height, width), generator=g) * 2 - 1
    return torch.randn((1, vae.config.z_dim, 1, height // sf, width // sf), generator=g)


def export_onnx(vae: QwenImageVAE, part: str, path: str | Path, height: int, width: int, *, dynamic: bool = False,
                opset: int = 17, dynamo: bool = False) -> Path:
    """Export the ``part`` ("encoder" / "decoder") of ``vae`` to ONNX at ``height`` x ``width`` pixels (``dynamic``:
    H and W free). Inputs/outputs are named ``image`` / ``latents`` (see the module docstring). The export runs on
    the CPU in float32. ``dynamo=False`` uses PyTorch's TorchScript exporter (seconds; ``True``: torch.export, the
    successor, which takes minutes here)."""
    if part not in PARTS:
        raise UserError(f"VAE part {part!r}: choose from {PARTS}")
    vae = vae.float().cpu()
    graph, x = _graph(vae, part), _example_input(vae, part, height, width)
    name_in, name_out = IO_NAMES[part]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {}
    if dynamic and dynamo:
        h, w = torch.export.Dim("h", min=1, max=1024), torch.export.Dim("w", min=1, max=1024)
        mult = vae.spatial_factor if part == "encoder" else 1
        kw["dynamic_shapes"] = ({3: mult * h, 4: mult * w},)
    elif dynamic:
        kw["dynamic_axes"] = {name_in: {3: "height", 4: "width"}, name_out: {3: "out_height", 4: "out_width"}}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(graph, (x,), str(path), input_names=[name_in], output_names=[name_out],
                          opset_version=opset, dynamo=dynamo, **kw)
    return path


def check_onnx(vae: QwenImageVAE, part: str, path: str | Path, height: int, width: int,
               tolerance: float = ONNX_TOLERANCE) -> float:
    """Run the ONNX graph in onnxruntime (CPU) on a random input of ``height`` x ``width`` pixels and compare it with
    the PyTorch VAE (float32). Returns the max abs difference relative to the largest PyTorch value; raises
    RuntimeError above ``tolerance``."""
    import onnxruntime

    vae = vae.float().cpu()
    x = _example_input(vae, part, height, width)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {IO_NAMES[part][0]: x.numpy()})[0])
    with torch.no_grad():
        want = _graph(vae, part)(x)
    if got.shape != want.shape:
        raise RuntimeError(f"ONNX {part} output {list(got.shape)} != PyTorch {list(want.shape)}")
    rel = ((got - want).abs().max() / want.abs().max()).item()
    if not rel <= tolerance:
        raise RuntimeError(f"ONNX {part} graph {path} differs from PyTorch by {rel:.3g} (relative) > {tolerance}")
    return rel


# --- fingerprint and manifest ----------------------------------------------------------------------------------


def vae_fingerprint(model_path: str | Path) -> str:
    """sha256 over the VAE's config.json and weight files (the engines bake the weights in)."""
    vae_dir = model_root(model_path) / VAE_DIR
    h = hashlib.sha256()
    for f in [vae_dir / VAE_CONFIG, *safetensors_files(vae_dir, VAE_WEIGHTS)]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def read_manifest(engine_root: Path) -> dict | None:
    path = Path(engine_root) / MANIFEST
    if not path.is_file():
        return None  # engines built elsewhere (e.g. by LightX2V): checked by their tensors only
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"format": None}


# --- engine sessions --------------------------------------------------------------------------------------------


class EngineError(RuntimeError):
    """An engine cannot serve: the message says why (it becomes the fallback's log line)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 where dynamic
    dtype: torch.dtype


class EngineSession:
    """One deserialized engine and its execution context (the only class that touches tensorrt).

    ``inputs`` / ``outputs``: TensorSpecs; ``profiles``: per optimization profile, the (min, opt, max) shapes of the
    input. :meth:`run` executes on the current CUDA stream and returns the output tensor.
    """

    def __init__(self, trt, path: Path, device: torch.device):
        self.trt, self.device = trt, device
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        try:
            engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        except Exception as e:  # noqa: BLE001 - TensorRT raises several types
            raise EngineError(f"TensorRT cannot deserialize {path} on this GPU ({e})") from e
        if engine is None:
            raise EngineError(f"TensorRT cannot deserialize {path} on this GPU (built for another GPU or TensorRT "
                              "version?)")
        self.engine, self.runtime = engine, runtime
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = [TensorSpec(n, tuple(engine.get_tensor_shape(n)), _torch_dtype(trt, engine.get_tensor_dtype(n)))
                 for n in names]
        is_input = [engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.inputs = [s for s, i in zip(specs, is_input) if i]
        self.outputs = [s for s, i in zip(specs, is_input) if not i]
        self.profiles = []
        if self.inputs:
            name = self.inputs[0].name
            for p in range(engine.num_optimization_profiles):
                self.profiles.append(tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, p)))
        with torch.cuda.device(device):
            context = engine.create_execution_context()
        if context is None:
            raise EngineError(f"cannot allocate the execution context of {path} (out of GPU memory?)")
        self.context = context
        self._profile: int | None = None

    def run(self, x: torch.Tensor, profile: int | None = None) -> torch.Tensor:
        ctx, stream = self.context, torch.cuda.current_stream(self.device)
        if profile is not None and profile != self._profile:
            ctx.set_optimization_profile_async(profile, stream.cuda_stream)
            self._profile = profile
        spec_in, spec_out = self.inputs[0], self.outputs[0]
        x = x.to(device=self.device, dtype=spec_in.dtype).contiguous()
        ctx.set_input_shape(spec_in.name, tuple(x.shape))
        try:
            out = torch.empty(tuple(ctx.get_tensor_shape(spec_out.name)), dtype=spec_out.dtype, device=self.device)
        except torch.OutOfMemoryError as e:
            raise EngineError(f"cannot allocate the engine's output ({e})") from e
        ctx.set_tensor_address(spec_in.name, x.data_ptr())
        ctx.set_tensor_address(spec_out.name, out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed")
        return out

    def close(self) -> None:
        self.context = self.engine = self.runtime = None


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dt not in table:
        raise EngineError(f"engine tensor dtype {dt} is not float32/float16/bfloat16")
    return table[dt]


class TensorRTRuntime:
    """Loads engines with the ``tensorrt`` package; raises ImportError when it is not installed."""

    def __init__(self, trt=None):
        if trt is None:
            import tensorrt as trt  # noqa: F811 - ImportError is the "not installed" fallback
        self.trt = trt

    def check_device(self, device: torch.device, manifest: dict | None) -> str | None:
        """Why engines cannot run on ``device`` (None when they can)."""
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"TensorRT needs a CUDA GPU, the VAE runs on {device}"
        built = (manifest or {}).get("compute_capability")
        have = list(torch.cuda.get_device_capability(device))
        if built is not None and list(built) != have:
            return (f"the engines were built for compute capability {built[0]}.{built[1]}, this GPU has "
                    f"{have[0]}.{have[1]}")
        return None

    def load(self, path: Path, device: torch.device) -> EngineSession:
        return EngineSession(self.trt, path, device)


# --- the runtime VAE ---------------------------------------------------------------------------------------------


def _expected_shapes(part: str, z_dim: int, sf: int, height: int, width: int) -> tuple[tuple, tuple]:
    img = (1, IMAGE_CHANNELS, 1, height, width)
    lat = (1, z_dim, 1, height // sf, width // sf)
    return (img, lat) if part == "encoder" else (lat, img)


def session_problem(session, part: str, z_dim: int, sf: int, size: tuple[int, int] | None,
                    names: Sequence[str] | None = None) -> str | None:
    """Why ``session`` does not fit this VAE half (None when it does). ``size``: the static engine's (H, W);
    ``names``: the (input, output) tensor names the manifest recorded (engines built elsewhere have their own)."""
    if len(session.inputs) != 1 or len(session.outputs) != 1:
        return f"it has {len(session.inputs)} inputs and {len(session.outputs)} outputs, not 1 and 1"
    si, so = session.inputs[0], session.outputs[0]
    if names is not None and (si.name, so.name) != tuple(names):
        return f"its tensors are named {si.name!r} -> {so.name!r}, the manifest says {names[0]!r} -> {names[1]!r}"
    if len(si.shape) != 5 or len(so.shape) != 5:
        return f"its tensors have shapes {list(si.shape)} -> {list(so.shape)}, not [1, C, 1, H, W]"
    c_in, c_out = (IMAGE_CHANNELS, (z_dim, 2 * z_dim)) if part == "encoder" else (z_dim, (IMAGE_CHANNELS,))
    if si.shape[1] != c_in or so.shape[1] not in c_out:
        return (f"it maps {si.shape[1]} to {so.shape[1]} channels; this VAE's {part} maps {c_in} to "
                f"{' or '.join(map(str, c_out))}")
    if size is not None:
        want_in = _expected_shapes(part, z_dim, sf, *size)[0]
        if tuple(si.shape) != want_in:
            return f"its input is {list(si.shape)}, expected {list(want_in)} for {size[1]}x{size[0]}"
    return None


class TensorRTVAE:
    """A VAE half served by TensorRT engines, with the PyTorch VAE as fallback (see the module docstring).

    Same interface as :class:`QwenImageVAE` for one half: ``encode(images)`` / ``decode(latents)`` (4D, normalised
    latents). ``pytorch_vae``: returns the PyTorch half (called on the first fallback).
    """

    def __init__(self, part: str, config, engine_root: Path, multi_profile: bool, runtime, device, dtype,
                 pytorch_vae: Callable[[], QwenImageVAE], manifest: dict | None = None):
        self.part, self.config, self.root, self.multi_profile = part, config, Path(engine_root), multi_profile
        self.runtime, self.device, self.dtype = runtime, torch.device(device), dtype
        self.manifest = manifest
        self._pytorch_vae_fn, self._pytorch = pytorch_vae, None
        self._logged: set[str] = set()
        self._session = None  # the loaded engine (static: of self._static_key)
        self._static_key: str | None = None
        self._missing_static: set[str] = set()
        if multi_profile:
            self._session = self._load(self.root / MULTI_PROFILE_FILES[part], None)

    # -- fallback ------------------------------------------------------------------------------------------------

    def fallback(self, reason: str) -> QwenImageVAE:
        """The PyTorch VAE half, logging ``reason`` once."""
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("TensorRT VAE %s: %s; using the PyTorch VAE", self.part, reason)
        if self._pytorch is None:
            self._pytorch = self._pytorch_vae_fn()
        return self._pytorch

    # -- engines -------------------------------------------------------------------------------------------------

    def _load(self, path: Path, size: tuple[int, int] | None):
        """A session for ``path``, or None (after logging) when it cannot be used."""
        if not path.is_file():
            self.fallback(f"engine file {path} is missing")
            return None
        try:
            session = self.runtime.load(path, self.device)
        except EngineError as e:
            self.fallback(str(e))
            return None
        names = ((self.manifest or {}).get("io") or {}).get(self.part)
        problem = session_problem(session, self.part, self.config.z_dim, self.config.spatial_factor, size, names)
        if problem:
            session.close()
            self.fallback(f"engine {path} does not match the model: {problem}")
            return None
        return session

    def release(self) -> None:
        """Free the loaded engine (static mode loads the next size's on demand)."""
        if self._session is not None:
            self._session.close()
        self._session, self._static_key = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _static_session(self, height: int, width: int):
        ratio = next((r for r, (w, h) in ASPECT_RATIOS.items() if (h, w) == (height, width)), None)
        if ratio is None:
            self.fallback(f"no static engine for {width}x{height} (static engines exist for the release's sizes: "
                          f"{', '.join(f'{w}x{h}' for w, h in ASPECT_RATIOS.values())}); use multi_profile for "
                          "other sizes")
            return None
        key = STATIC_FOLDERS[ratio]
        if key == self._static_key and self._session is not None:
            return self._session
        if key in self._missing_static:
            return None
        self.release()  # one pair in memory: drop the previous size's engine first
        session = self._load(self.root / key / ENGINE_FILES[self.part], (height, width))
        if session is None:
            self._missing_static.add(key)
            return None
        self._session, self._static_key = session, key
        return session

    def _profile_for(self, shape: tuple[int, ...]) -> int | None:
        """The profile accepting ``shape`` whose opt (H, W) is closest; None if none accepts it."""
        best, best_d = None, None
        for i, (lo, opt, hi) in enumerate(self._session.profiles):
            if len(lo) != len(shape) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                continue
            d = abs(opt[-2] - shape[-2]) + abs(opt[-1] - shape[-1])
            if best_d is None or d < best_d:
                best, best_d = i, d
        return best

    def _run(self, x5: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
        """The engine's output for the 5D input, or None (logged) when the PyTorch VAE must run instead."""
        if self.multi_profile:
            session = self._session
            if session is None:
                return None
            profile = self._profile_for(tuple(x5.shape))
            if profile is None:
                self.fallback(f"no optimization profile accepts {width}x{height}")
                return None
        else:
            session, profile = self._static_session(height, width), None
            if session is None:
                return None
        try:
            return session.run(x5, profile)
        except EngineError as e:
            self.release()
            self.fallback(str(e))
            return None

    # -- the VAE interface ------------------------------------------------------------------------------------------

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def _stats(self, like: torch.Tensor):
        shape = (1, self.config.z_dim, 1, 1)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def _pytorch_vae(self) -> QwenImageVAE:
        """The PyTorch half (every path that returns None from :meth:`_run` has logged why already)."""
        if self._pytorch is None:
            self._pytorch = self._pytorch_vae_fn()
        return self._pytorch

    def _run_single(self, x5: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
        if x5.shape[0] != 1:
            self.fallback("the engines take one image at a time")
            return None
        return self._run(x5, height, width)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [1, 3, H, W] in [-1, 1] -> normalised latents [1, z, H/8, W/8] in the VAE dtype."""
        _, _, h, w = images.shape
        out = self._run_single(images[:, :, None], h, w)
        if out is None:
            return self._pytorch_vae().encode(images)
        mu = out[:, : self.config.z_dim, 0].to(self.dtype)  # a 32-channel engine output: mean, then log-variance
        mean, std = self._stats(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """normalised latents [1, z, h, w] -> images [1, 3, 8h, 8w] in [-1, 1] in the VAE dtype."""
        _, _, h, w = z.shape
        sf = self.spatial_factor
        z = z.to(self.dtype)
        mean, std = self._stats(z)
        out = self._run_single((z / (1.0 / std) + mean)[:, :, None], h * sf, w * sf)
        if out is None:
            return self._pytorch_vae().decode(z)
        return out[:, :, 0].to(self.dtype).clamp_(-1.0, 1.0)


# --- choosing the VAE ------------------------------------------------------------------------------------------


def make_vae(model_path: str | Path, part: str, *, device="cpu", dtype: torch.dtype = torch.float32, options=None,
             runtime=None):
    """The VAE half ``part`` ("encoder" / "decoder") the options ask for: the PyTorch VAE (``vae_type`` "baseline"),
    or a :class:`TensorRTVAE` (``vae_type`` "tensorrt"), which becomes the PyTorch VAE with one log line when
    engines cannot be used at all (see the module docstring). ``runtime``: the engine loader (default: a
    :class:`TensorRTRuntime`; tests inject fakes)."""
    root = model_root(model_path)
    device = torch.device(device)

    def pytorch_vae() -> QwenImageVAE:
        return load_qwen_image_vae(root / VAE_DIR, parts=(part,), device=device, dtype=dtype)

    if options is None or getattr(options, "vae_type", "baseline") != "tensorrt":
        return pytorch_vae()

    def fallback(reason: str) -> QwenImageVAE:
        log.warning("TensorRT VAE %s: %s; using the PyTorch VAE", part, reason)
        return pytorch_vae()

    trt_cfg = dict(options.trt_vae_config or {})
    engine_path, multi_profile = trt_cfg.get("trt_engine_path"), bool(trt_cfg.get("multi_profile", False))
    if not engine_path:
        return fallback("trt_vae_config has no trt_engine_path")
    engine_root = Path(engine_path)
    if not engine_root.is_dir():
        return fallback(f"trt_engine_path {str(engine_root)!r} is not a folder")
    if runtime is None:
        try:
            runtime = TensorRTRuntime()
        except ImportError as e:
            return fallback(f"tensorrt is not installed ({e})")
    manifest = read_manifest(engine_root)
    problem = runtime.check_device(device, manifest)
    if problem:
        return fallback(problem)
    if manifest is not None:
        if manifest.get("format") != MANIFEST_FORMAT:
            return fallback(f"{engine_root / MANIFEST} is not a format-{MANIFEST_FORMAT} manifest")
        if manifest.get("vae_sha256") != vae_fingerprint(root):
            return fallback(f"the engines in {engine_root} were built from other VAE weights than {root / VAE_DIR}")
    if not multi_profile and not any((engine_root / f).is_dir() for f in STATIC_FOLDERS.values()):
        return fallback(f"{engine_root} holds no static engine folder ({', '.join(STATIC_FOLDERS.values())})")
    config = read_vae_config(root / VAE_DIR)
    vae = TensorRTVAE(part, config, engine_root, multi_profile, runtime, device, dtype, pytorch_vae, manifest)
    if multi_profile and vae._session is None:
        return vae._pytorch_vae()  # the multi-profile engine failed to load (logged): PyTorch serves everything
    return vae


# --- building engines ----------------------------------------------------------------------------------------------


def build_trt_engines(model_path: str | Path, out_dir: str | Path, *, multi_profile: bool,
                      parts: Iterable[str] = PARTS, aspect_ratios: Sequence[str] | None = None,
                      profiles: Sequence[tuple[int, int]] = DEFAULT_PROFILES, min_size: int = MIN_SIZE,
                      max_size: int = MAX_SIZE, precision: str = "fp16", workspace_gib: float = 8.0,
                      check: bool = True, check_size: int = 256, trt=None) -> dict:
    """Build TensorRT engines of the model's VAE into ``out_dir`` (the folder ``trt_engine_path`` then names).

    ``multi_profile=False``: static engines, one folder per aspect ratio (``aspect_ratios``: default all of
    ``arch.ASPECT_RATIOS``) at the release's size. ``True``: one engine per part with one optimization profile per
    ``profiles`` (height, width) opt size, each accepting [min_size, max_size] (multiples of 16).
    ``precision``: "fp16", "bf16" (TensorRT >= 9) or "fp32"; the IO stays float32. ``check``: each ONNX export is
    compared with PyTorch in onnxruntime on the CPU (static: at its size; dynamic: at ``check_size``) and the build
    stops if it differs by more than 1e-4 (relative). Needs a CUDA GPU and the ``tensorrt`` package; returns the
    manifest written to ``out_dir/lightx2v_trt.json``.
    """
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise UserError(f"building TensorRT engines needs the tensorrt package ({e}): pip install "
                            "tensorrt") from None
    if not torch.cuda.is_available():
        raise UserError("building TensorRT engines needs a CUDA GPU")
    if precision not in ("fp16", "bf16", "fp32"):
        raise UserError(f"precision={precision!r}: allowed fp16, bf16, fp32")
    parts = tuple(parts)
    if not parts or any(p not in PARTS for p in parts):
        raise UserError(f"parts {parts!r}: choose from {PARTS}")
    ratios = list(aspect_ratios) if aspect_ratios is not None else list(ASPECT_RATIOS)
    unknown = [r for r in ratios if r not in ASPECT_RATIOS]
    if unknown:
        raise UserError(f"unknown aspect ratios {unknown}; allowed: {', '.join(ASPECT_RATIOS)}")
    for h, w in profiles if multi_profile else ():
        if not (min_size <= h <= max_size and min_size <= w <= max_size) or h % 16 or w % 16:
            raise UserError(f"profile {h}x{w} must be multiples of 16 within [{min_size}, {max_size}]")
    root, out = model_root(model_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_qwen_image_vae(root / VAE_DIR, parts=parts)
    sf = vae.spatial_factor
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "vae_sha256": vae_fingerprint(root), "z_dim": vae.config.z_dim,
        "spatial_factor": sf, "precision": precision, "tensorrt": getattr(trt, "__version__", None),
        "compute_capability": list(torch.cuda.get_device_capability()), "io": {p: list(IO_NAMES[p]) for p in parts},
        "multi_profile": multi_profile}
    if multi_profile:
        manifest["profiles"] = [list(p) for p in profiles]
        manifest["min_size"], manifest["max_size"] = min_size, max_size
        for part in parts:
            onnx_path = export_onnx(vae, part, out / f"{part}_dynamic.onnx", check_size, check_size, dynamic=True)
            if check:
                check_onnx(vae, part, onnx_path, check_size, check_size)
            sizes = [((min_size, min_size), (h, w), (max_size, max_size)) for h, w in profiles]
            shapes = [tuple(_expected_shapes(part, vae.config.z_dim, sf, *s)[0] for s in trio) for trio in sizes]
            _build_engine(trt, onnx_path, out / MULTI_PROFILE_FILES[part], IO_NAMES[part][0], shapes, precision,
                          workspace_gib)
    else:
        manifest["static"] = {}
        for ratio in ratios:
            w, h = ASPECT_RATIOS[ratio]
            folder = out / STATIC_FOLDERS[ratio]
            for part in parts:
                onnx_path = export_onnx(vae, part, folder / f"{part}.onnx", h, w)
                if check:
                    check_onnx(vae, part, onnx_path, h, w)
                shape = _expected_shapes(part, vae.config.z_dim, sf, h, w)[0]
                _build_engine(trt, onnx_path, folder / ENGINE_FILES[part], IO_NAMES[part][0], [(shape,) * 3],
                              precision, workspace_gib)
            manifest["static"][STATIC_FOLDERS[ratio]] = [h, w]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _build_engine(trt, onnx_path: Path, engine_path: Path, input_name: str, profiles, precision: str,
                  workspace_gib: float) -> None:
    """Parse ``onnx_path`` and build/serialize an engine with one optimization profile per (min, opt, max)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # required before TensorRT 10
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    for lo, opt, hi in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
