"""INT8 GEMM with the scale epilogue fused (lightx2v.ops.quant.int8_gemm).

(a) CPU: the PyTorch fallback is the exact math; dispatch and the checks that send a call to the fallback;
(b) both kernels ("ptr", "tma") under Triton's interpreter at tiny odd sizes (M, N, K not multiples of the tile),
    with and without bias, float32 and float16 out: equal to the fallback bit for bit, and to the float32 reference
    (xq*sx) @ (wq*sw)^T + bias within 1e-6; a wrong scale is far outside that tolerance. The interpreter needs
    TRITON_INTERPRET=1 before triton is imported, so those checks run in ONE subprocess (this file as a script);
(c) GPU (marked ``gpu``): bf16 out at [4096x5120]x[5120x13824], odd sizes, and QuantLinear's int8 path.

Run the interpreter checks by hand:  TRITON_INTERPRET=1 python tests/test_int8_gemm.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightx2v.ops.quant import int8_gemm as G

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _operands(M, N, K, seed=0, device="cpu", sw_row=False):
    """Random int8 operands over the full range, positive scales spanning two decades, a bias."""
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    sx = torch.rand(M, 1, generator=g) * 0.1 + 1e-3
    sw = torch.rand(N, 1, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    if sw_row:
        sw = sw.reshape(1, N)
    return [t.to(device) for t in (xq, sx, wq, sw, bias)]


def _reference(xq, sx, wq, sw, bias):
    """The brief's float32 reference: dequantize both operands, multiply in float32."""
    y = (xq.float() * sx.float().reshape(-1, 1)) @ (wq.float() * sw.float().reshape(-1, 1)).T
    return y if bias is None else y + bias.float()


# --- (a) CPU: fallback math and dispatch ------------------------------------------------------------------------

def test_fallback_is_the_exact_math():
    xq, sx, wq, sw, bias = _operands(37, 45, 80)
    acc = (xq.long() @ wq.long().T).float()  # exact integers, then the kernel's epilogue order
    want = acc * sx * sw.reshape(1, -1) + bias
    assert torch.equal(G.int8_matmul_torch(xq, sx, wq, sw, bias, torch.float32), want)
    assert torch.equal(G.int8_matmul(xq, sx, wq, sw, bias, torch.float32), want)  # CPU: automatic = fallback
    torch.testing.assert_close(want, _reference(xq, sx, wq, sw, bias), rtol=1e-5, atol=1e-5)


def test_quant_linear_reference_path_unchanged_on_cpu():
    from lightx2v.ops.quant import QuantLinear, quantize_activation

    lin = torch.nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, "int8")
    x = torch.randn(3, 5, 64)
    xq, sx = quantize_activation(x.reshape(-1, 64), "int8")
    got = q(x).reshape(-1, 48)
    torch.testing.assert_close(got, G.int8_matmul(xq, sx, q.weight, q.weight_scale, lin.bias, torch.float32),
                               rtol=1e-5, atol=1e-5)


def test_problems_send_calls_to_the_fallback():
    import lightx2v.ops.triton as T

    xq, sx, wq, sw, bias = _operands(9, 8, 40)  # K = 40: not a multiple of 16
    want = G.int8_matmul_torch(xq, sx, wq, sw, bias, torch.float32)
    assert torch.equal(G.int8_matmul(xq, sx, wq, sw, bias, torch.float32), want)
    with pytest.raises(ValueError, match="out_dtype"):
        G.int8_matmul(xq, sx, wq, sw, None, torch.int32)
    if not T.available():
        return
    assert "multiple of 16" in G.triton_problem(xq, wq)
    with pytest.raises(ValueError, match="multiple of 16"):
        G.int8_matmul(xq, sx, wq, sw, bias, torch.float32, impl="triton")
    w = torch.zeros(8, 32, dtype=torch.int8)
    assert G.triton_problem(torch.zeros(9, 48, dtype=torch.int8)[:, :32], w) is None  # row stride 48: aligned
    assert "row-major" in G.triton_problem(torch.zeros(32, 9, dtype=torch.int8).T, w)
    assert "row-major" in G.triton_problem(torch.zeros(9, 40, dtype=torch.int8)[:, :32], w)  # row stride 40
    assert "int8" in G.triton_problem(xq.float(), wq)


# --- (b) kernels under the Triton interpreter, in a subprocess -------------------------------------------------

SIZES = [  # (M, N, K): the interpreter's tiles are 32 x 32 x 32 (INTERPRETER_CONFIG)
    (37, 45, 80),   # 2 x 2 tiles, both ragged; K tail of 16 (masked loop / TMA zero fill)
    (70, 45, 48),   # 3 row blocks: a partial group in the grouped ordering (GROUP_M = 2)
    (33, 64, 96),   # K a multiple of BLOCK_K (the unmasked loop), N exactly two tiles
    (5, 3, 16),     # smaller than one tile everywhere
    (1, 1, 16),
]


def _run_interpreter_checks() -> dict:
    import lightx2v.ops.triton as T

    report = {"_lazy_import": "triton" not in sys.modules}  # importing the modules did not import triton
    assert T.interpreting() and T.available()
    for M, N, K in SIZES:
        for variant in G.VARIANTS:
            for with_bias in (False, True):
                for dt in (torch.float32, torch.float16):
                    sw_row = (M + with_bias) % 2 == 0  # sw as [1, N] in half the cases
                    xq, sx, wq, sw, bias = _operands(M, N, K, seed=M * 7 + N, sw_row=sw_row)
                    b = bias if with_bias else None
                    out = torch.full((M, N), float("nan"), dtype=dt)  # poisoned: every element must be written
                    got = G.launch(xq, sx, wq, sw, b, dt, out=out, variant=variant)
                    name = f"{variant}/{M}x{N}x{K}/bias={with_bias}/{str(dt)[6:]}"
                    report[name] = {
                        "equal_fallback": bool(torch.equal(got, G.int8_matmul_torch(xq, sx, wq, sw, b, dt))),
                        "rel_reference": _rel(got, _reference(xq, sx, wq, sw, b)),
                        "nan": bool(torch.isnan(got).any()), "is_out": got is out,
                    }
    # a wrong scale: what the checks above would see (the kernel with a perturbed operand vs the true reference)
    xq, sx, wq, sw, bias = _operands(37, 45, 80, seed=3)
    want = _reference(xq, sx, wq, sw, bias)
    report["_wrong"] = {
        "sw_flipped": _rel(G.launch(xq, sx, wq, sw.flip(0), bias, torch.float32, variant="ptr"), want),
        "sx_times_1.001": _rel(G.launch(xq, sx * 1.001, wq, sw, bias, torch.float32, variant="tma"), want),
        "sw_one_channel_2x": _rel(G.launch(xq, sx, wq, sw * (torch.arange(45) == 7)[:, None].add(1), bias,
                                           torch.float32, variant="ptr"), want),
        "no_bias": _rel(G.launch(xq, sx, wq, sw, None, torch.float32, variant="tma"), want),
    }
    # the public entry point: forced Triton under the interpreter runs the kernel
    report["_public_equal"] = bool(torch.equal(G.int8_matmul(xq, sx, wq, sw, bias, torch.float32, impl="triton"),
                                               G.int8_matmul_torch(xq, sx, wq, sw, bias, torch.float32)))
    return report


@pytest.fixture(scope="module")
def interpreter_report():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("LIGHTX2V_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


TOL = 1e-6  # relative, against the float32 reference (which itself rounds each product: ~1e-7)


def test_interpreter_imports_triton_lazily(interpreter_report):
    assert interpreter_report["_lazy_import"]


@pytest.mark.parametrize("variant", ["ptr", "tma"])
def test_interpreter_kernel_equals_reference(interpreter_report, variant):
    cases = {k: v for k, v in interpreter_report.items() if k.startswith(variant + "/")}
    assert len(cases) == len(SIZES) * 4
    for name, r in cases.items():
        assert not r["nan"] and r["is_out"], (name, r)
        assert r["equal_fallback"], (name, r)  # same integers, same float32 epilogue order: bit for bit
        # float16 out: rounded once to half precision (2^-11 relative), float32: ~1e-7
        tol = TOL if name.endswith("float32") else 1e-3
        assert r["rel_reference"] < tol, (name, r)


def test_interpreter_wrong_scale_is_caught(interpreter_report):
    for what, rel in interpreter_report["_wrong"].items():
        assert rel > 100 * TOL, (what, rel)  # far outside the tolerance the checks above use
    assert interpreter_report["_public_equal"]


# --- (c) GPU ----------------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_variants():
    v = ["ptr"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) \
            and G._tensor_descriptor_cls() is not None:
        v.append("tma")
    return v


@pytest.mark.gpu
@needs_gpu
def test_gpu_real_size_bf16():
    """[4096x5120] x [5120x13824] (Wan 14B FFN up-projection, 4096 tokens), bf16 out, each kernel autotuned."""
    pytest.importorskip("triton")
    xq, sx, wq, sw, bias = _operands(4096, 13824, 5120, seed=1, device="cuda")
    exact = G.int8_matmul_torch(xq, sx, wq, sw, bias, torch.float32)  # torch._int_mm: exact int32, then f32 epilogue
    ref = _reference(xq, sx, wq, sw, bias)  # float32 matmul of the dequantized operands
    rounding = _rel(exact.to(torch.bfloat16), exact)  # what rounding to bf16 alone costs (~1e-3)
    for variant in _gpu_variants():
        out = torch.full((4096, 13824), float("nan"), dtype=torch.bfloat16, device="cuda")
        got = G.launch(xq, sx, wq, sw, bias, torch.bfloat16, out=out, variant=variant)
        torch.cuda.synchronize()
        assert not torch.isnan(got).any(), variant
        assert _rel(got, exact) <= 1.05 * rounding + 1e-6, (variant, _rel(got, exact), rounding)
        assert _rel(got, ref) < 4e-3, (variant, _rel(got, ref))
        mism = (got != exact.to(torch.bfloat16)).float().mean().item()
        assert mism < 1e-2, (variant, mism)  # differs only where an FMA lands within an ulp of a rounding boundary
    auto = G.int8_matmul(xq, sx, wq, sw, bias, torch.bfloat16)
    assert _rel(auto, exact) <= 1.05 * rounding + 1e-6


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_odd_sizes(out_dtype):
    """Ragged M, N, K (K tails masked / zero-filled), fixed configs (each compile costs ~1 s: kept few)."""
    pytest.importorskip("triton")
    tol = 2e-6 if out_dtype == torch.float32 else 8e-3
    configs = [(64, 64, 64, 4, 3, 4)] + ([(128, 128, 128, 8, 3, 8)] if out_dtype == torch.bfloat16 else [])
    for (M, N, K), with_bias in [((37, 45, 80), True), ((1, 300, 528), False), ((300, 136, 1040), True)]:
        xq, sx, wq, sw, bias = _operands(M, N, K, seed=M + N, device="cuda", sw_row=with_bias)
        b = bias if with_bias else None
        want = _reference(xq, sx, wq, sw, b)
        for variant in _gpu_variants():
            for config in configs:
                out = torch.full((M, N), float("nan"), dtype=out_dtype, device="cuda")
                got = G.launch(xq, sx, wq, sw, b, out_dtype, out=out, variant=variant, config=config)
                assert not torch.isnan(got).any(), (M, N, K, variant, config)
                assert _rel(got, want) < tol, (M, N, K, variant, config, _rel(got, want))


@pytest.mark.gpu
@needs_gpu
def test_gpu_few_tokens_autotuned():
    """M <= 64 (the small-tile configs), bf16 out, through the public entry point."""
    pytest.importorskip("triton")
    xq, sx, wq, sw, bias = _operands(8, 5120, 5120, seed=8, device="cuda")
    want = _reference(xq, sx, wq, sw, bias)
    for variant in _gpu_variants():
        got = G.launch(xq, sx, wq, sw, bias, torch.bfloat16, variant=variant)
        assert _rel(got, want) < 4e-3, (variant, _rel(got, want))
    assert _rel(G.int8_matmul(xq, sx, wq, sw, bias, torch.bfloat16), want) < 4e-3


@pytest.mark.gpu
@needs_gpu
def test_gpu_quant_linear_int8_uses_the_kernel():
    from lightx2v.ops.quant import QuantLinear, quantize_activation

    pytest.importorskip("triton")
    lin = torch.nn.Linear(5120, 1536).cuda().to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "int8")
    x = torch.randn(2, 999, 5120, device="cuda", dtype=torch.bfloat16)
    xq, sx = quantize_activation(x.reshape(-1, 5120), "int8")
    assert G.triton_problem(xq, q.weight) is None
    with torch.no_grad():
        got = q(x)
        want = G.launch(xq, sx, q.weight, q.weight_scale, lin.bias, torch.bfloat16).reshape(2, 999, 1536)
        assert torch.equal(got, want)
        q.kernel = "reference"
        ref = q(x)
    assert _rel(got, ref) < 4e-3
    assert _rel(got, lin(x)) < 0.03  # int8 quantization error against the bf16 layer (~1e-2)


if __name__ == "__main__":  # the interpreter subprocess (TRITON_INTERPRET=1 must be in the environment)
    import lightx2v.ops.triton as T

    if not T.interpreting():
        sys.exit("run with TRITON_INTERPRET=1")
    print("REPORT " + json.dumps(_run_interpreter_checks()))
