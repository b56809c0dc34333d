"""Fused Triton kernels (lightx2v.ops.triton) and their PyTorch fallbacks.

(a) each fallback is bit-for-bit the math ``lightx2v.models.wan.dit`` does (same ops); dispatch and argument checks;
(b) each kernel under Triton's interpreter (CPU, float32 and float16, tiny ragged shapes, single-block and chunked
    paths, strided views) against the fallback. The interpreter needs TRITON_INTERPRET=1 before triton is imported,
    so those checks run in ONE subprocess (this file run as a script) and the tests read its JSON report;
(c) GPU (marked ``gpu``): bf16 at the DiT's real sizes against the fallback, within bf16 rounding.

Run the interpreter checks by hand:  TRITON_INTERPRET=1 python tests/test_triton_kernels.py
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightx2v.ops.triton as T
from lightx2v.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _inputs(B=2, L=37, H=4, D=24, dtype=torch.float32, device="cpu", seed=0, strided=False):
    """Random inputs in the DiT's layout. ``strided``: x/y/q as views with padded rows, cos/sin as non-contiguous
    views of the complex table, shift/scale/gate as chunks of a [B, 6, C] tensor (as WanBlock makes them)."""
    from lightx2v.models.wan.dit import rope_tables

    g = torch.Generator(device="cpu").manual_seed(seed)
    C = H * D
    pad = 8 if strided else 0

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = (rnd(B, L, C + pad) + 0.3)[..., :C].to(dtype)  # nonzero mean: LayerNorm must subtract it
    y = rnd(B, L, C + pad)[..., :C].to(dtype)
    e = rnd(B, 6, C, scale=0.2)  # float32 modulation, chunks have batch stride 6C
    shift, scale, gate = e[:, 0:1], e[:, 1:2], e[:, 2:3]
    if not strided:
        shift, scale, gate = shift.contiguous(), scale.contiguous(), gate.contiguous()
    q = (rnd(B, L, C + pad)[..., :C] * 2).to(dtype).unflatten(-1, (H, D))  # [B, L, H, D], rows of C + pad
    w = (1 + rnd(C, scale=0.1)).to(dtype)
    f = max(1, L // 6)
    grid = (f, 2, -(-L // (2 * f)))  # f * 2 * w >= L; the table is cut to L rows (ragged L)
    rot = rope_tables(D, grid, device)[:L]
    if strided:
        cos, sin = rot.real, rot.imag  # views with pair stride 2
    else:
        cos, sin = T.rope_cos_sin(rot)
    return dict(x=x, y=y, shift=shift, scale=scale, gate=gate, q=q, w=w, rot=rot, cos=cos, sin=sin)


# --- (a) fallbacks are the DiT's math, bit for bit ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_fallbacks_equal_dit_math(dtype, strided):
    from lightx2v.models.wan.dit import RMSNorm, apply_rope, layer_norm_f32

    d = _inputs(dtype=dtype, strided=strided)
    x, y, shift, scale, gate, q, w, rot = (d[k] for k in ("x", "y", "shift", "scale", "gate", "q", "w", "rot"))
    B, L, H, D = q.shape

    ref = (layer_norm_f32(x, EPS) * (1 + scale) + shift).to(x.dtype)  # WanBlock.forward
    assert torch.equal(T.norm_modulate(x, shift, scale, EPS, impl="torch"), ref)
    assert torch.equal(T.norm_modulate(x, shift, scale, EPS), ref)  # CPU: automatic = fallback

    ref = (x.float() + y.float() * gate).to(x.dtype)
    assert torch.equal(T.gated_residual(x, y, gate, impl="torch"), ref)
    x2 = x.clone()
    assert T.gated_residual_(x2, y, gate, impl="torch") is x2 and torch.equal(x2, ref)

    norm = RMSNorm(H * D, EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        ref = norm(x)
        assert torch.equal(T.rms_norm(x, norm.weight, EPS, impl="torch"), ref)
        assert torch.equal(T.rms_norm(x, w.float(), EPS, impl="torch"), ref)  # float32 weight: rounded like RMSNorm

        ref = apply_rope(q, rot)
        q2 = q.clone()
        assert T.rope_(q2, d["cos"], d["sin"], impl="torch") is q2 and torch.equal(q2, ref)

        ref = apply_rope(norm(q.flatten(2)).unflatten(-1, (H, D)), rot)  # SelfAttention: norm_q, then rope
        q2 = q.clone()
        assert T.rms_norm_rope_(q2, norm.weight, EPS, d["cos"], d["sin"], impl="torch") is q2
        assert torch.equal(q2, ref)


def test_rope_cos_sin_roundtrip():
    from lightx2v.models.wan.dit import rope_tables

    rot = rope_tables(24, (3, 4, 5), "cpu")
    cos, sin = T.rope_cos_sin(rot)
    assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and cos.shape == (60, 12)
    assert torch.equal(torch.complex(cos, sin), rot)


def test_dispatch_and_argument_checks():
    d = _inputs()
    x, shift, scale = d["x"], d["shift"], d["scale"]
    with pytest.raises(UserError, match="impl="):
        T.norm_modulate(x, shift, scale, EPS, impl="cuda")
    # a per-token (not per-sample) shift: the kernel cannot take it; automatic falls back, forced raises
    per_token = shift.expand_as(x).contiguous()
    ref = T.norm_modulate(x, per_token, scale, EPS, impl="torch")
    assert torch.equal(T.norm_modulate(x, per_token, scale, EPS), ref)
    if T.available():
        with pytest.raises(ValueError, match="per-sample"):
            T.norm_modulate(x, per_token, scale, EPS, impl="triton")
        # last dim not contiguous
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)
        with pytest.raises(ValueError, match="contiguous"):
            T.gated_residual(xt, xt, d["gate"], impl="triton")
        if not T.interpreting():
            with pytest.raises(ValueError, match="CUDA"):
                T.rms_norm(x, d["w"], EPS, impl="triton")
    with pytest.raises(ValueError, match="out must be"):
        T.rms_norm(x, d["w"], EPS, out=torch.empty_like(x, dtype=torch.float16), impl="torch")
    # inputs that need gradients: the automatic choice is the (autograd-aware) fallback
    xg = x.clone().requires_grad_(True)
    T.norm_modulate(xg, shift, scale, EPS).sum().backward()
    assert xg.grad is not None


# --- (b) kernels under the Triton interpreter, in a subprocess -------------------------------------------------

def _interpreter_cases():
    """Yield (name, kernel_result, fallback_result) for every op and layout, run with impl='triton' on CPU tensors."""
    pkg = T
    f32, f16 = torch.float32, torch.float16
    for dtype, tag, L, H, D, strided, max_row, max_col in (
        (f32, "C96", 37, 4, 24, False, None, None),           # single block of 128 (C not a power of two), L=37
        (f32, "C96-strided", 13, 4, 24, True, None, None),    # padded rows, [B,6,C] chunks, cos/sin pair stride 2
        (f32, "C96-chunked", 13, 4, 24, True, 64, 32),        # rows in 2 chunks of 64 (last one ragged), 3 col tiles
        (f32, "C80-chunked", 13, 4, 20, False, 32, 32),       # D/2=10; 3 row chunks, col tiles 32+32+16 (ragged)
        (f16, "C96", 37, 4, 24, False, None, None),
        (f16, "C80-chunked-strided", 13, 4, 20, True, 32, 32),
    ):
        saved = pkg.MAX_ROW_BLOCK, pkg.ROW_CHUNK, pkg.MAX_COL_BLOCK
        if max_row:
            pkg.MAX_ROW_BLOCK = pkg.ROW_CHUNK = max_row
        if max_col:
            pkg.MAX_COL_BLOCK = max_col
        try:
            d = _inputs(L=L, H=H, D=D, dtype=dtype, strided=strided, seed=len(tag))
            yield from _cases_for(f"{str(dtype)[6:]}-{tag}", d)
        finally:
            pkg.MAX_ROW_BLOCK, pkg.ROW_CHUNK, pkg.MAX_COL_BLOCK = saved
    # batch-broadcast gate/shift ([1, 1, C] and [C]) and L=1
    d = _inputs(L=1, seed=5)
    yield ("float32-L1-broadcast/norm_modulate",
           T.norm_modulate(d["x"], d["shift"][:1], d["scale"][0, 0], EPS, impl="triton"),
           T.norm_modulate(d["x"], d["shift"][:1], d["scale"][0, 0], EPS, impl="torch"))
    yield ("float32-L1-broadcast/gated_residual",
           T.gated_residual(d["x"], d["y"], d["gate"][0, 0], impl="triton"),
           T.gated_residual(d["x"], d["y"], d["gate"][0, 0], impl="torch"))


def _cases_for(name, d):
    x, y, shift, scale, gate, q, w, cos, sin = (d[k] for k in ("x", "y", "shift", "scale", "gate", "q", "w", "cos",
                                                              "sin"))
    nan = float("nan")
    out = torch.full(x.shape, nan, dtype=x.dtype, device=x.device)  # poisoned: every element must be written
    yield (f"{name}/norm_modulate", T.norm_modulate(x, shift, scale, EPS, out=out, impl="triton"),
           T.norm_modulate(x, shift, scale, EPS, impl="torch"))
    out = torch.full(x.shape, nan, dtype=x.dtype, device=x.device)
    yield (f"{name}/gated_residual", T.gated_residual(x, y, gate, out=out, impl="triton"),
           T.gated_residual(x, y, gate, impl="torch"))
    yf = y.float() if x.dtype != torch.float32 else y.half()  # y in another dtype than x
    yield (f"{name}/gated_residual-mixed", T.gated_residual(x, yf, gate, impl="triton"),
           T.gated_residual(x, yf, gate, impl="torch"))
    x2 = x.clone()
    r = T.gated_residual_(x2, y, gate, impl="triton")
    assert r is x2
    yield (f"{name}/gated_residual_", x2, T.gated_residual(x, y, gate, impl="torch"))
    out = torch.full(x.shape, nan, dtype=x.dtype, device=x.device)
    yield (f"{name}/rms_norm", T.rms_norm(x, w, EPS, out=out, impl="triton"), T.rms_norm(x, w, EPS, impl="torch"))
    yield (f"{name}/rms_norm-w32", T.rms_norm(x, w.float(), EPS, impl="triton"),
           T.rms_norm(x, w.float(), EPS, impl="torch"))
    q2 = q.clone()
    assert T.rope_(q2, cos, sin, impl="triton") is q2
    yield (f"{name}/rope_", q2, T.rope_(q.clone(), cos, sin, impl="torch"))
    q2 = q.clone()
    assert T.rms_norm_rope_(q2, w, EPS, cos, sin, impl="triton") is q2
    yield (f"{name}/rms_norm_rope_", q2, T.rms_norm_rope_(q.clone(), w, EPS, cos, sin, impl="torch"))


def _run_interpreter_checks() -> dict:
    """Body of the subprocess (TRITON_INTERPRET=1): JSON-able {case: {rel, maxabs, nan, dtype}}."""
    report = {"_lazy_import": "triton" not in sys.modules}  # importing lightx2v.ops.triton did not import triton
    assert T.interpreting() and T.available()
    with torch.no_grad():
        for name, got, want in _interpreter_cases():
            report[name] = dict(rel=_rel(got, want), maxabs=_maxabs(got, want), ulp=_ulps(got, want),
                                nan=bool(torch.isnan(got).any()), dtype=str(got.dtype), shape=list(got.shape),
                                strides=list(got.stride()))
    return report


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the last place of b's dtype at b's largest magnitude."""
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[b.dtype]
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / 2.0 ** (torch.floor(torch.log2(b.abs().max())) - mant)).item()


@pytest.fixture(scope="module")
def interpreter_report():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("LIGHTX2V_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def _cases(report, op):
    return {k: v for k, v in report.items() if not k.startswith("_") and k.split("/")[1] == op}


def test_interpreter_imports_triton_lazily(interpreter_report):
    assert interpreter_report["_lazy_import"]


@pytest.mark.parametrize("op", ["norm_modulate", "gated_residual", "gated_residual-mixed", "gated_residual_",
                                "rms_norm", "rms_norm-w32", "rope_", "rms_norm_rope_"])
def test_interpreter_kernel_matches_fallback(interpreter_report, op):
    cases = _cases(interpreter_report, op)
    assert len(cases) >= 6, sorted(interpreter_report)
    for name, r in cases.items():
        assert not r["nan"], name  # poisoned outputs fully written
        if r["dtype"] == "torch.float32":  # ulp: in units of the last place at the output's largest magnitude
            assert r["rel"] < 1e-6 and r["ulp"] <= 8, (name, r)
        else:  # float16: the kernels round once, PyTorch's rms_norm (and norm + rope) round twice
            assert r["rel"] < 1e-3 and r["ulp"] <= 1.0, (name, r)


def test_interpreter_broadcast_rows(interpreter_report):
    cases = {k: v for k, v in interpreter_report.items() if "broadcast" in k}
    assert len(cases) == 2
    for name, r in cases.items():
        assert r["rel"] < 1e-6 and not r["nan"], (name, r)


# --- (c) GPU, real sizes ----------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check_bf16(name, got, fallback, ideal):
    """got (kernel), fallback (DiT math), ideal (the same math without intermediate roundings, float32)."""
    assert not torch.isnan(got).any(), name
    e_k, e_f = _rel(got, ideal), _rel(fallback, ideal)
    assert _rel(got, fallback) < 8e-3, (name, _rel(got, fallback))
    assert e_k <= 1.1 * e_f + 1e-6, (name, e_k, e_f)  # no worse than the fallback's own bf16 rounding
    return e_k, e_f


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("D", [24, 128])
def test_gpu_small_shapes(dtype, strided, D):
    """Ragged shapes on the GPU, every dtype. bf16 only here: the interpreter (triton 3.6 and 3.9) converts float32
    to bf16 by truncation (seen: its error exactly that of truncation, twice the fallback's), the GPU rounds to
    nearest (cvt.rn.bf16.f32 in the PTX)."""
    pytest.importorskip("triton")
    d = _inputs(B=2, L=37, H=4, D=D, dtype=dtype, device="cuda", strided=strided)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    with torch.no_grad():
        for name, got, want in _cases_for(f"{dtype}-{strided}", d):
            assert not torch.isnan(got).any(), name
            assert _rel(got, want) < tol, (name, _rel(got, want))
        # automatic choice on CUDA is the kernel
        a = T.norm_modulate(d["x"], d["shift"], d["scale"], EPS)
        assert torch.equal(a, T.norm_modulate(d["x"], d["shift"], d["scale"], EPS, impl="triton"))


def _real_size_checks(device, B, L, H, D, grid, dt=torch.bfloat16):
    from lightx2v.models.wan.dit import rope_tables

    C = H * D
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(B, L, C, device=device, generator=g) + 0.3).to(dt)
    y = torch.randn(B, L, C, device=device, generator=g).to(dt)
    e = torch.randn(B, 6, C, device=device, generator=g) * 0.2
    shift, scale, gate = e[:, 0:1], e[:, 1:2], e[:, 2:3]
    w = (1 + 0.1 * torch.randn(C, device=device, generator=g)).to(dt)
    cos, sin = T.rope_cos_sin(rope_tables(D, grid, device))
    nm = importlib.import_module("lightx2v.ops.triton.norm_modulate")
    rp = importlib.import_module("lightx2v.ops.triton.rope")
    errs = {}
    with torch.no_grad():
        out = torch.full_like(x, float("nan"))
        errs["norm_modulate"] = _check_bf16(
            "norm_modulate", T.norm_modulate(x, shift, scale, EPS, out=out, impl="triton"),
            T.norm_modulate(x, shift, scale, EPS, impl="torch"), nm.norm_modulate_torch(x.float(), shift, scale, EPS))
        out = torch.full_like(x, float("nan"))
        errs["gated_residual"] = _check_bf16(
            "gated_residual", T.gated_residual(x, y, gate, out=out, impl="triton"),
            T.gated_residual(x, y, gate, impl="torch"), x.float() + y.float() * gate)
        x2 = x.clone()
        T.gated_residual_(x2, y, gate, impl="triton")
        assert torch.equal(x2, out)
        out = torch.full_like(x, float("nan"))
        errs["rms_norm"] = _check_bf16(
            "rms_norm", T.rms_norm(x, w, EPS, out=out, impl="triton"), T.rms_norm(x, w, EPS, impl="torch"),
            T.rms_norm(x.float(), w.float(), EPS, impl="torch"))
        q = x.unflatten(-1, (H, D))
        errs["rope_"] = _check_bf16(
            "rope_", T.rope_(q.clone(), cos, sin, impl="triton"), rp.rope_torch(q, cos, sin),
            rp.rope_torch(q.float(), cos, sin))
        errs["rms_norm_rope_"] = _check_bf16(
            "rms_norm_rope_", T.rms_norm_rope_(q.clone(), w, EPS, cos, sin, impl="triton"),
            rp.rms_norm_rope_torch(q, w, EPS, cos, sin), rp.rms_norm_rope_torch(q.float(), w.float(), EPS, cos, sin))
    return errs  # op -> (kernel's and fallback's relative error against float32 math)


@pytest.mark.gpu
@needs_gpu
def test_gpu_real_size_bf16():
    """[1, 32760, 5120] bf16 (Wan 14B, 81 frames at 720p: a 21 x 30 x 52 token grid), q/k as [1, 32760, 40, 128]."""
    pytest.importorskip("triton")
    errs = _real_size_checks(torch.device("cuda"), 1, 32760, 40, 128, (21, 30, 52))
    print({k: f"kernel {a:.2e} / fallback {b:.2e}" for k, (a, b) in errs.items()})


if __name__ == "__main__":  # the interpreter subprocess (TRITON_INTERPRET=1 must be in the environment)
    if not T.interpreting():
        sys.exit("run with TRITON_INTERPRET=1")
    print("REPORT " + json.dumps(_run_interpreter_checks()))
