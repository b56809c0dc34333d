"""sage_attn (lightx2v/ops/attention/sage.py): INT8 Q.K^T + FP8 P.V attention in Triton.

(a) CPU: the PyTorch reference of the quantized math against exact attention, K smoothing, registration.
(b) Triton interpreter: the real kernels run on the CPU under TRITON_INTERPRET=1, in ONE subprocess (the variable
    must be set before triton is imported and must not leak into other tests): this file run as a script with
    ``--interpreter-checks`` prints a JSON dict of measurements that the tests below assert on.
(c) GPU (marked ``gpu``; needs an sm_89+ NVIDIA GPU): accuracy at [1, 8, 4096, 128] and a throughput printout
    against PyTorch SDPA at [1, 40, 32760, 128].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightx2v.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# --- helpers (also used by the interpreter subprocess and the GPU tests) ------------------------------------------

def outlier_qkv(B, Lq, Lk, H, D, *, dtype=torch.bfloat16, seed=0, device="cpu"):
    """Random q/k/v shaped like a video DiT's: a few channels of q and k much larger than the rest, a per-(head,
    channel) offset on k (which K smoothing removes) and a smaller one on v."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g)
    k = torch.randn(B, Lk, H, D, generator=g)
    v = torch.randn(B, Lk, H, D, generator=g)
    ch = torch.randperm(D, generator=g)
    q[..., ch[:4]] *= 6.0
    k[..., ch[2:6]] *= 6.0
    k += 4.0 * torch.randn(H, D, generator=g)
    v += 0.5 * torch.randn(H, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def exact_attention(q, k, v):
    """float32 SDPA, [B, L, H, D] layout."""
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2))
    return out.transpose(1, 2)


def cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# --- (a) CPU: the reference -------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Lq,Lk,H,D,dtype", [
    (1, 1024, 1024, 4, 128, torch.bfloat16),
    (2, 300, 777, 2, 64, torch.float16),  # cross-attention shapes, ragged lengths
    (1, 200, 200, 2, 80, torch.bfloat16),  # head_dim padded to 128
])
def test_reference_close_to_exact_attention_with_outliers(B, Lq, Lk, H, D, dtype):
    from lightx2v.ops.attention.sage import sage_attention_reference

    q, k, v = outlier_qkv(B, Lq, Lk, H, D, dtype=dtype, seed=1)
    ref = exact_attention(q, k, v)
    for block_n in (64, 128):
        out = sage_attention_reference(q, k, v, block_n=block_n)
        assert out.shape == q.shape and out.dtype == dtype
        assert cosine(out, ref) >= 0.995
        assert rel_l2(out, ref) < 0.08


def test_k_smoothing_leaves_exact_attention_unchanged():
    q, k, v = outlier_qkv(2, 64, 96, 3, 64, dtype=torch.float32, seed=2)
    smoothed = k - k.mean(dim=1, keepdim=True)
    torch.testing.assert_close(exact_attention(q, smoothed, v), exact_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_quantized_layout_and_smoothing():
    from lightx2v.ops.attention.sage import sage_quantize_reference

    q, k, v = outlier_qkv(1, 80, 200, 2, 80, dtype=torch.float32, seed=3)
    qz = sage_quantize_reference(q, k, v)
    assert qz.q8.shape == (1, 2, 128, 128) and qz.q8.dtype == torch.int8
    assert qz.k8.shape == (1, 2, 256, 128) and qz.k_scale.shape == (1, 2, 2)
    assert qz.vt.shape == (1, 2, 128, 256) and qz.vt.dtype == torch.float8_e4m3fn
    assert qz.q8[:, :, 80:].abs().sum() == 0 and qz.q8[..., 80:].abs().sum() == 0  # padding is zero
    assert qz.k8[:, :, 200:].abs().sum() == 0 and qz.vt.float()[:, :, :, 200:].abs().sum() == 0
    assert qz.q8.abs().max() == 127 and qz.k8.abs().max() == 127
    assert qz.vt.float().abs().max() == 448
    # the smoothed keys have (about) zero mean: the dequantized keys' mean is ~ 0 next to their spread
    kd = qz.k8[:, :, :200, :80].float() * qz.k_scale.repeat_interleave(128, -1)[:, :, :200, None]
    assert kd.mean(2).abs().max() < 0.05 * kd.std()
    torch.testing.assert_close(qz.k_mean[..., :80], k.mean(1), rtol=1e-5, atol=1e-5)


def test_k_smoothing_and_p_scaling_help():
    """Without K smoothing a large key offset eats the INT8 range; without the 2**8 scale small probabilities
    flush to zero in FP8. Both show up against exact attention."""
    import lightx2v.ops.attention.sage as S

    q, k, v = outlier_qkv(1, 256, 4096, 1, 128, dtype=torch.float32, seed=4)
    k = k + 12.0 * torch.randn(1, 1, 1, 128, generator=torch.Generator().manual_seed(9))
    ref = exact_attention(q, k, v)
    err = rel_l2(S.sage_attention_reference(q, k, v), ref)
    # the same, but K quantized without subtracting its mean
    no_smooth = S.sage_quantize_reference(q, k, v)
    kf = k.float().transpose(1, 2)  # [1, 1, 4096, 128]
    amax = kf.reshape(1, 1, 32, 128 * 128).abs().amax(-1)
    no_smooth.k_scale = amax / 127
    no_smooth.k8 = S._int8_round(kf * (127 / amax).repeat_interleave(128, -1)[..., None])
    err_no_smooth = rel_l2(S.sage_attention_core_reference(no_smooth), ref)
    assert err < err_no_smooth

    qg, kg, vg = (torch.randn(1, n, 1, 128, generator=torch.Generator().manual_seed(5 + i)) for i, n in
                  enumerate((128, 8192, 8192)))
    qg = qg * 2.3  # Gaussian scores of std ~2.3: the worst case for FP8 underflow at this length
    ref = exact_attention(qg, kg, vg)
    scaled = rel_l2(S.sage_attention_reference(qg, kg, vg), ref)
    old = S.P_LOG2
    try:
        S.P_LOG2 = 0.0
        unscaled = rel_l2(S.sage_attention_reference(qg, kg, vg), ref)
    finally:
        S.P_LOG2 = old
    assert scaled < unscaled


def test_int8_rounding_is_half_away_from_zero():
    from lightx2v.ops.attention.sage import _int8_round

    x = torch.tensor([-2.5, -1.5, -0.5, -0.49, 0.0, 0.49, 0.5, 1.5, 2.5, 126.6, -127.0])
    assert _int8_round(x).tolist() == [-3, -2, -1, 0, 0, 0, 1, 2, 3, 127, -127]


# --- (a) registration ---------------------------------------------------------------------------------------------

def test_sage_attn_registered_and_checks():
    from lightx2v.ops.attention import available_backends, get_attention_backend

    assert "sage_attn" in available_backends()
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        get_attention_backend("sage_attn", dtype=torch.bfloat16, head_dim=128, device="cpu")
    with pytest.raises(UserError, match="dtype"):
        get_attention_backend("sage_attn", dtype=torch.float32, head_dim=128, device="cpu")
    with pytest.raises(UserError, match="head_dim <= 128"):
        get_attention_backend("sage_attn", dtype=torch.bfloat16, head_dim=256, device="cpu")


def test_importing_the_attention_package_does_not_import_triton():
    code = ("import sys, torch; import lightx2v.ops.attention as A; A.available_backends(); "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("cap,ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_sage_attn_needs_fp8_tensor_cores(monkeypatch, cap, ok):
    pytest.importorskip("triton")
    from lightx2v.ops.attention import get_attention_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.version, "hip", None)
    if ok:
        backend = get_attention_backend("sage_attn", dtype=torch.float16, head_dim=128, device="cuda")
        assert backend.name == "sage_attn"
    else:
        with pytest.raises(UserError) as err:
            get_attention_backend("sage_attn", dtype=torch.float16, head_dim=128, device="cuda")
        assert "sage_attn needs an NVIDIA GPU with FP8 tensor cores (sm_89+); use torch_sdpa" in str(err.value)
        assert f"sm_{cap[0]}{cap[1]}" in str(err.value)


def test_sage_attn_without_triton(monkeypatch):
    import importlib.util

    import lightx2v.ops.attention.sage as S
    from lightx2v.ops.attention import get_attention_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(UserError, match="triton"):
        get_attention_backend("sage_attn", dtype=torch.float16, head_dim=128, device="cuda")
    monkeypatch.undo()
    monkeypatch.setattr(S, "_TRITON_IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(UserError, match="needs the 'triton' package"):
        S.check_sage_available(torch.device("cuda"))
    with pytest.raises(UserError, match="triton"):
        S.sage_attention(*outlier_qkv(1, 8, 8, 1, 64))


def test_autotune_pruning():
    pytest.importorskip("triton")
    import lightx2v.ops.attention.sage as S

    configs = S._attn_configs()
    for dp in (64, 128):
        kept = S._prune_attn_configs(configs, {}, HEAD_DIM_P=dp)
        assert kept and len(kept) < len(configs)
        for c in kept:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            assert not (bm == 64 and c.num_warps == 8)
            assert not (dp == 128 and bm == 128 and c.num_warps == 4)
            assert 128 % bn == 0 and {c.num_stages} <= {2, 3, 4}


def test_input_checks():
    from lightx2v.ops.attention.sage import sage_attention_reference

    q, k, v = outlier_qkv(1, 8, 8, 2, 64)
    with pytest.raises(ValueError, match="head_dim"):
        sage_attention_reference(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="grouped-query"):
        sage_attention_reference(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="head_dim <= 128"):
        sage_attention_reference(*outlier_qkv(1, 8, 8, 1, 160))


# --- (b) Triton interpreter ---------------------------------------------------------------------------------------

def _interpreter_fma_is_fused() -> bool:
    """Whether the interpreter's ``tl.fma`` rounds once, as the GPU's FFMA does. a = b = 1 + 2**-12,
    c = -(1 + 2**-11): a*b + c = 2**-24 exactly; a*b rounded to fp32 first (1 + 2**-11) gives 0."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle, interpreter_builder

    a = TensorHandle(np.array([1 + 2.0**-12], dtype=np.float32), tl.float32)
    c = TensorHandle(np.array([-(1 + 2.0**-11)], dtype=np.float32), tl.float32)
    return float(interpreter_builder.create_fma(a, a, c).data[0]) == 2.0**-24


def _use_fused_fma_in_interpreter() -> bool:
    """Triton's interpreter before 3.9 computes ``tl.fma(x, y, z)`` as ``x * y + z`` in the operands' dtype:
    two roundings. A GPU's FFMA rounds once, and the sage kernel depends on it: ``fma(f, c, -bias)`` with
    ``f = 1.5 * 2**23 + s`` cancels two numbers of ~1e7 * c, so rounding ``f * c`` first moves the exponent by up
    to half an ulp of ``f * c`` (~0.5% on p; 5e-4 relative L2 on the kernel output under Triton 3.8). Replace it
    with one rounding: in float64 the fp32 product is exact (48 bits), the sum rounds to 53 bits and then to 24;
    the two roundings differ from one only when the float64 sum lands on an fp32 rounding midpoint, an error of
    at most one fp32 ulp in such rare elements (far below the 1e-5 tolerance). Returns whether it patched."""
    import numpy as np
    from triton.runtime import interpreter

    if _interpreter_fma_is_fused():
        return False
    original = interpreter.InterpreterBuilder.create_fma

    def create_fma(self, x, y, z):
        dtype = z.data.dtype
        if dtype not in (np.float32, np.float16):
            return original(self, x, y, z)
        exact = np.multiply(x.data, y.data, dtype=np.float64) + z.data.astype(np.float64)
        return interpreter.TensorHandle(exact.astype(dtype), z.dtype.scalar)

    interpreter.InterpreterBuilder.create_fma = create_fma
    assert _interpreter_fma_is_fused()
    return True


def _interpreter_checks() -> dict:
    """Runs in the subprocess, with TRITON_INTERPRET=1 set before triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import triton
    import triton.language as tl

    import lightx2v.ops.attention.sage as S

    globals()["S"] = S  # the interpreter resolves names in a kernel through the module's globals
    res: dict = {"triton": triton.__version__, "fma_patched": _use_fused_fma_in_interpreter()}

    # the fp32 -> e4m3 rounding used in place of the interpreter's (wrong) cast
    @triton.jit
    def _round_kernel(X, Y, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(Y + o, S._round_to_e4m3(tl.load(X + o)))

    x = torch.cat([torch.linspace(-500, 500, 4001), torch.logspace(-14, 9, 4000, base=2.0),
                   -torch.logspace(-14, 9, 4000, base=2.0), torch.randn(4383) * 30])
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, x.numel())
    res["round_e4m3_mismatches"] = int((y != x.clamp(-448, 448).to(torch.float8_e4m3fn).float()).sum())

    # pre-processing: Triton vs the reference, element by element
    pre = {}
    for name, (B, Lq, Lk, H, D, dtype) in {"d64_ragged": (1, 80, 80, 2, 64, torch.float16),
                                           "d80_cross": (2, 80, 200, 2, 80, torch.bfloat16)}.items():
        q, k, v = outlier_qkv(B, Lq, Lk, H, D, dtype=dtype, seed=11)
        a, b = S.sage_quantize(q, k, v), S.sage_quantize_reference(q, k, v)
        pre[name] = {
            "q8_mismatch_frac": (a.q8 != b.q8).float().mean().item(),
            "q8_maxdiff": (a.q8.int() - b.q8.int()).abs().max().item(),
            "q_scale_rel": ((a.q_scale - b.q_scale).abs() / b.q_scale).max().item(),
            "k8_mismatch_frac": (a.k8 != b.k8).float().mean().item(),
            "k8_maxdiff": (a.k8.int() - b.k8.int()).abs().max().item(),
            "k_scale_rel": ((a.k_scale - b.k_scale).abs() / b.k_scale).max().item(),
            "vt_mismatch_frac": (a.vt.view(torch.uint8) != b.vt.view(torch.uint8)).float().mean().item(),
            "v_scale_rel": ((a.v_scale - b.v_scale).abs() / b.v_scale).max().item(),
            "v_mean_absdiff": (a.v_mean - b.v_mean).abs().max().item(),
            "k_mean_absdiff": (a.k_mean - b.k_mean).abs().max().item(),
        }
    res["preprocess"] = pre

    # the attention kernel against the reference, on the SAME quantized operands; L=80: one tile (+ ragged
    # tail), 200 x 300: several tiles (the loops, the prefetch pipeline) and a ragged tail
    kern = {}
    variants = {"default": {}, "no_magic": {"magic_i2f": False}, "fused_acc": {"two_level": False},
                "tma": {"use_tma": True}, "prefetch": {"prefetch": True},
                "prefetch_tma_nomagic": {"prefetch": True, "use_tma": True, "magic_i2f": False}}
    for Lq, Lk in ((80, 80), (200, 300)):
        q, k, v = outlier_qkv(1, Lq, Lk, 2, 64, dtype=torch.float16, seed=12)
        qz = S.sage_quantize(q, k, v)
        for bm, bn in ((64, 64), (128, 128), (64, 128), (128, 64)):
            for variant, kw in variants.items():
                ref = S.sage_attention_core_reference(qz, block_n=bn, magic_i2f=kw.get("magic_i2f", True))
                out = S.sage_attention_quantized(qz, out_dtype=torch.float32, config=dict(BLOCK_M=bm, BLOCK_N=bn),
                                                 **kw)
                kern[f"{Lq}x{Lk}/{bm}x{bn}/{variant}"] = rel_l2(out, ref)
    qz16 = S.sage_quantize(q, k, v, pv_dtype=torch.float16)
    ref = S.sage_attention_core_reference(qz16, block_n=64)
    out = S.sage_attention_quantized(qz16, out_dtype=torch.float32, config=dict(BLOCK_M=64, BLOCK_N=64))
    kern["64x64/pv_fp16"] = rel_l2(out, ref)
    res["kernel_vs_reference"] = kern

    # end to end (all kernels) against the reference and against exact attention
    e2e = {}
    cases = {"fp16_d64_L80": ((1, 80, 80, 2, 64), torch.float16, dict(BLOCK_M=64, BLOCK_N=64)),
             "bf16_d80_cross": ((2, 80, 200, 2, 80), torch.bfloat16, dict(BLOCK_M=128, BLOCK_N=64)),
             "fp16_d128_L130": ((1, 130, 130, 1, 128), torch.float16, dict(BLOCK_M=128, BLOCK_N=128))}
    for name, (shape, dtype, cfg) in cases.items():
        q, k, v = outlier_qkv(*shape, dtype=dtype, seed=13)
        out = S.sage_attention(q, k, v, config=cfg)
        ref = S.sage_attention_reference(q, k, v, block_n=cfg["BLOCK_N"])
        ex = exact_attention(q, k, v)
        e2e[name] = {"shape_ok": list(out.shape) == list(q.shape) and out.dtype == dtype,
                     "finite": bool(torch.isfinite(out).all()),
                     "rel_vs_reference": rel_l2(out, ref), "cos_vs_exact": cosine(out, ex),
                     "rel_vs_exact": rel_l2(out, ex)}
    res["end_to_end"] = e2e

    # strided inputs (q from [B, H, L, D], k/v slices of a fused qkv tensor): same result as contiguous ones
    q, k, v = outlier_qkv(1, 80, 80, 2, 64, dtype=torch.float16, seed=14)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    kv = torch.stack([k, v], dim=2)  # [B, L, 2, H, D]
    out_c = S.sage_attention(q, k, v, config=dict(BLOCK_M=64, BLOCK_N=64))
    out_s = S.sage_attention(q_strided, kv[:, :, 0], kv[:, :, 1], config=dict(BLOCK_M=64, BLOCK_N=64))
    res["strided_maxdiff"] = (out_c.float() - out_s.float()).abs().max().item()
    res["strided_was_strided"] = not (q_strided.is_contiguous() or kv[:, :, 0].is_contiguous())
    return res


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreter-checks"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    res = json.loads(lines[-1])
    res["_seconds"] = time.time() - t0
    return res


def test_interpreter_round_to_e4m3(interp):
    assert interp["round_e4m3_mismatches"] == 0


@pytest.mark.parametrize("case", ["d64_ragged", "d80_cross"])
def test_interpreter_preprocess_matches_reference(interp, case):
    r = interp["preprocess"][case]
    # a different summation order of the means may move a value across a rounding boundary: rare, by one
    assert r["q8_mismatch_frac"] == 0 and r["q_scale_rel"] < 1e-6
    assert r["k8_mismatch_frac"] < 1e-3 and r["k8_maxdiff"] <= 1 and r["k_scale_rel"] < 1e-5
    assert r["vt_mismatch_frac"] < 1e-3 and r["v_scale_rel"] < 1e-5
    assert r["v_mean_absdiff"] < 1e-5 and r["k_mean_absdiff"] < 1e-5


def test_interpreter_attention_kernel_matches_reference(interp):
    # same quantized operands: the kernel reproduces the reference up to fp32 rounding, for every tile shape
    # (incl. the ragged last tile), with and without I2F-free conversion, two-level accumulation, TMA, prefetch
    assert len(interp["kernel_vs_reference"]) == 2 * 4 * 6 + 1
    for name, err in interp["kernel_vs_reference"].items():
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("case", ["fp16_d64_L80", "bf16_d80_cross", "fp16_d128_L130"])
def test_interpreter_end_to_end(interp, case):
    r = interp["end_to_end"][case]
    assert r["shape_ok"] and r["finite"]
    # bf16 output: the interpreter truncates fp32 -> bf16 (the GPU rounds), up to one bf16 ulp
    assert r["rel_vs_reference"] < (6e-3 if case.startswith("bf16") else 1e-3)
    assert r["cos_vs_exact"] >= 0.99 and r["rel_vs_exact"] < 0.1


def test_interpreter_strided_inputs(interp):
    assert interp["strided_was_strided"] and interp["strided_maxdiff"] == 0.0


def test_interpreter_is_quick(interp):
    assert interp["_seconds"] < 120


# --- (c) GPU ------------------------------------------------------------------------------------------------------

def _sm89():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm89(), reason="needs an NVIDIA GPU with FP8 tensor cores (sm_89+)")
class TestSageGPU:
    def test_accuracy_1x8x4096x128(self):
        import lightx2v.ops.attention.sage as S
        from lightx2v.ops.attention import get_attention_backend

        attn = get_attention_backend("sage_attn", dtype=torch.bfloat16, head_dim=128, device=torch.device("cuda"))
        q, k, v = outlier_qkv(1, 4096, 4096, 8, 128, dtype=torch.bfloat16, seed=21, device="cuda")
        out = attn(q, k, v)
        torch.cuda.synchronize()
        ex = exact_attention(q, k, v)
        assert out.shape == q.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        cos, rel = cosine(out, ex), rel_l2(out, ex)
        print(f"\nsage_attn [1, 4096, 8, 128] bf16: cos {cos:.6f}, rel-L2 {rel:.4f} vs exact; "
              f"config {S.tuned_config()}")
        assert cos >= 0.995
        # the kernel computes the reference's math (up to bf16 output rounding, ex2.approx and the FP8 MMA's
        # internal accumulation inside one tile)
        for cfg, kw in [(dict(BLOCK_M=128, BLOCK_N=128, num_warps=8), {}),
                        (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8), {}),
                        (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4), {}),
                        (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8), {"use_tma": True}),
                        (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8), {"prefetch": True}),
                        (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8), {"prefetch": True, "use_tma": True}),
                        (dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2), {"prefetch": False, "use_tma": True}),
                        (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3), {"prefetch": True, "use_tma": False}),
                        (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8), {"magic_i2f": False})]:
            o = S.sage_attention(q, k, v, config=cfg, **kw)
            r = S.sage_attention_reference(q, k, v, block_n=cfg["BLOCK_N"], magic_i2f=kw.get("magic_i2f", True))
            err = rel_l2(o, r)
            print(f"  {cfg} {kw}: rel-L2 vs reference {err:.2e}, cos vs exact {cosine(o, ex):.6f}")
            assert err < 1e-2 and cosine(o, ex) >= 0.995

    @pytest.mark.parametrize("Lq,Lk,D,cfg,kw", [
        (1000, 333, 64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), {}),
        (777, 2048, 80, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), {}),
        (130, 4097, 128, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), {"use_tma": True}),
        (300, 1000, 128, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), {"prefetch": True}),
    ])
    def test_ragged_cross_and_head_dims(self, Lq, Lk, D, cfg, kw):
        import lightx2v.ops.attention.sage as S

        q, k, v = outlier_qkv(2, Lq, Lk, 3, D, dtype=torch.float16, seed=22, device="cuda")
        out = S.sage_attention(q, k, v, config=cfg, **kw)  # fixed configs: no autotuning here
        assert torch.isfinite(out).all()
        assert cosine(out, exact_attention(q, k, v)) >= 0.995
        assert rel_l2(out, S.sage_attention_reference(q, k, v, block_n=cfg["BLOCK_N"])) < 1e-2

    def test_throughput_vs_sdpa_1x40x32760x128(self):
        import lightx2v.ops.attention.sage as S

        B, L, H, D = 1, 32760, 40, 128
        q, k, v = outlier_qkv(B, L, L, H, D, dtype=torch.bfloat16, seed=23, device="cuda")
        flops = 4 * B * H * L * L * D

        def bench(fn, n=5):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(n):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return sorted(times)[len(times) // 2]

        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        out = S.sage_attention(q, k, v)  # autotunes on first use
        t_sage = bench(lambda: S.sage_attention(q, k, v))
        rows = torch.arange(0, L, 97, device="cuda")
        ex = exact_attention(q[:, rows], k, v)
        cos = cosine(out[:, rows], ex)
        print(f"\n[1, 40, 32760, 128] bf16: SDPA {t_sdpa:.2f} ms ({flops / t_sdpa / 1e9:.0f} TFLOP/s), "
              f"sage_attn {t_sage:.2f} ms ({flops / t_sage / 1e9:.0f} TFLOP/s), x{t_sdpa / t_sage:.2f}; "
              f"cos vs exact {cos:.6f}; config {S.tuned_config()}")
        assert cos >= 0.995


if __name__ == "__main__":
    if "--interpreter-checks" in sys.argv:
        print(json.dumps(_interpreter_checks()))
