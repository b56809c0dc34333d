"""FP8 / INT8 linear layers (reference path on CPU), quantize-at-load, pre-quantized checkpoints, convert."""

import subprocess
import sys

import pytest
import torch

from lightx2v import LightX2VPipeline
from lightx2v.errors import UserError
from lightx2v.models.wan.checkpoint import load_dit
from lightx2v.models.wan.tiny import ensure_tiny_model
from lightx2v.ops.attention import get_attention_backend
from lightx2v.ops.quant import (QuantLinear, dequantize_weight, quantize_activation, quantize_weight,
                                resolve_scheme)

SDPA = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=16, device=torch.device("cpu"))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme,tol", [("fp8", 0.05), ("int8", 0.01)])
def test_weight_and_activation_quantization(scheme, tol):
    w = torch.randn(96, 64) * torch.linspace(0.1, 3, 96)[:, None]  # channels of different ranges
    q, s = quantize_weight(w, scheme)
    assert q.dtype == (torch.float8_e4m3fn if scheme == "fp8" else torch.int8) and s.shape == (96, 1)
    assert _rel(dequantize_weight(q, s), w) < tol
    x = torch.randn(10, 64)
    x[3] *= 100  # an outlier token gets its own scale
    xq, sx = quantize_activation(x, scheme)
    assert _rel(xq.float() * sx, x) < tol and sx.shape == (10, 1)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quant_linear_close_to_float(scheme):
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 7, 64)
    q = QuantLinear.from_linear(lin, scheme)
    y = q(x)
    assert y.shape == (2, 7, 48)
    assert _rel(y, lin(x)) < (0.06 if scheme == "fp8" else 0.02)
    # exactly the math of the quantized operands
    xq, sx = quantize_activation(x.reshape(-1, 64), scheme)
    want = (xq.float() * sx) @ dequantize_weight(q.weight, q.weight_scale).T + lin.bias
    torch.testing.assert_close(y.reshape(-1, 48), want, rtol=1e-6, atol=1e-6)


def test_scheme_names():
    assert resolve_scheme("fp8-sgl") == resolve_scheme("fp8-vllm") == resolve_scheme("fp8-torchao") == "fp8"
    assert resolve_scheme("int8-vllm") == "int8" and resolve_scheme(None) is None
    with pytest.raises(UserError, match="nf4"):
        resolve_scheme("nf4")


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_dit_quantized_at_load_and_prequantized(tmp_path, scheme):
    root = ensure_tiny_model()
    ref = load_dit(root, "wan", attn=SDPA)
    qdit = load_dit(root, "wan", attn=SDPA, quant_scheme=scheme)
    lin = qdit.blocks[0].self_attn.q
    assert isinstance(lin, QuantLinear) and isinstance(qdit.head.head, torch.nn.Linear)  # head stays float
    x, t = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0])
    ctx = torch.randn(1, 512, 32)
    with torch.no_grad():
        want, got = ref(x, t, ctx), qdit(x, t, ctx)
    # the tiny random model has loud cross-attention (see tiny.py); real-size figures are in BENCHMARKS.md
    assert _rel(got, want) < (0.15 if scheme == "fp8" else 0.05)
    # pre-quantized checkpoint written by `lightx2v convert --quantize` loads to the same weights
    r = subprocess.run([sys.executable, "-m", "lightx2v.cli", "convert", str(root), str(tmp_path / "q"), "--layout",
                        "wan", "--quantize", scheme], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pre = load_dit(tmp_path / "q", "wan", attn=SDPA, quant_scheme=scheme)
    assert torch.equal(pre.blocks[1].ffn[0].weight.view(torch.uint8), qdit.blocks[1].ffn[0].weight.view(torch.uint8))
    with torch.no_grad():
        assert torch.equal(pre(x, t, ctx), got)
    with pytest.raises(UserError, match="pre-quantized checkpoint: set dit_quant_scheme"):
        load_dit(tmp_path / "q", "wan", attn=SDPA)
    other = "int8" if scheme == "fp8" else "fp8"
    with pytest.raises(UserError, match="does not fit dit_quant_scheme"):
        load_dit(tmp_path / "q", "wan", attn=SDPA, quant_scheme=other)


def test_pipeline_with_quant_scheme():
    pipe = LightX2VPipeline().create_generator(height=32, width=32, num_frames=5, infer_steps=3,
                                               dit_quant_scheme="fp8-vllm")
    frames = pipe.generate(seed=1, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    assert torch.isfinite(frames).all()
    with pytest.raises(UserError, match="dit_quant_scheme='w4a4'"):
        LightX2VPipeline().create_generator(dit_quant_scheme="w4a4")


_INTERP_SCRIPT = r"""
import json, torch
from lightx2v.ops.quant import quantize_activation
g = torch.Generator().manual_seed(0)
x = torch.randn(7, 300, generator=g) * torch.linspace(0.1, 5, 7)[:, None]
x[3, 17] = 80.0
x[5] = torch.arange(300) / 2.0 - 75.0  # exact .5 ties for round-half-to-even
qt, st = quantize_activation(x, "int8", impl="triton")
qr, sr = quantize_activation(x, "int8", impl="torch")
print(json.dumps({"q_equal": bool(torch.equal(qt, qr)), "s_maxdiff": float((st - sr).abs().max())}))
"""


def test_act_quant_kernel_under_the_triton_interpreter():
    """The one-pass INT8 kernel equals the PyTorch math (the interpreter's fp8 casts are unreliable: fp8 on GPU)."""
    import json
    import os

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["q_equal"] and out["s_maxdiff"] <= 1e-7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_act_quant_kernel_on_gpu(scheme):
    x = (torch.randn(32760, 5120, device="cuda") * 2).to(torch.bfloat16)
    qt, st = quantize_activation(x, scheme, impl="triton")
    qr, sr = quantize_activation(x, scheme, impl="torch")
    torch.testing.assert_close(st, sr, rtol=1e-6, atol=0)
    mism = (qt.float() != qr.float()).float().mean().item()
    assert mism < 1e-3  # same values but where x / scale lands within an ulp of a rounding boundary (GPU division)


def test_shared_input_is_quantized_once_and_released_with_it():
    import lightx2v.ops.quant as Q

    lins = [QuantLinear.from_linear(torch.nn.Linear(32, 16), "int8") for _ in range(3)]
    calls = []
    real = Q.quantize_activation
    Q.quantize_activation = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        x = torch.randn(4, 32)
        for lin in lins:  # q, k, v read the same input
            lin(x)
        assert len(calls) == 1
        lins[0](x.clone())  # another tensor (equal values) is quantized anew
        assert len(calls) == 2
        y = torch.randn(4, 32)
        lins[0](y)
        del y  # the cached quantization goes with its input
        assert Q._last_input == (None, None, None)
    finally:
        Q.quantize_activation = real
