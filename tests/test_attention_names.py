"""Attention names (lightx2v/ops/attention/names.py and the entry point): LightX2V's vocabulary, aliases, the
exact-backend fallback with one warning, and errors for approximate / sparse / parallel names we lack.
All on the CPU; a GPU is simulated where a check needs one (nothing runs on it)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import lightx2v.ops.attention as A
from lightx2v.errors import UserError
from lightx2v.ops.attention import names as N

# LightX2V at f8aee98: the keys of ATTN_WEIGHT_REGISTER (lightx2v/common/ops/attn, models/networks) and of the
# platform registries (lightx2v_platform/ops/attn), and names that appear only in its configs.
LIGHTX2V_REGISTRY = {
    "exact": ["torch_sdpa", "flash_attn2", "flash_attn3", "flash_attn4", "dreamzero_fa2", "dreamzero_cross_fa"],
    "approximate": ["sage_attn2", "sage_attn3", "sage_attn2_k_int8_v_fp8"],
    "sparse": ["radial_attn", "spas_sage_attn2", "spas_sage_attn3", "spas_flash_attn4", "sparge_attn", "svg_attn",
               "svg2_attn", "nbhd_attn", "nbhd_attn_flashinfer", "sol_attn", "draft_attn", "dynamic_sparse_attn",
               "general_sparse_attn", "rainfusion_attn", "flex_attn", "swiftvr_mfswa"],
    "parallel": ["ulysses", "ulysses-4090", "ring"],
}
LIGHTX2V_PLATFORM = {
    "exact": ["npu_flash_attn", "mlu_flash_attn", "flash_attn_hygon_dcu", "flash_attn_enflame_gcu", "aiter_attn",
              "iluvatar_flash_attn", "intel_xpu_flash_attn", "intel_xpu_cute_attn"],
    "approximate": ["mlu_sage_attn", "metax_sage_attn2"],
}
CONFIG_ONLY = {"sparse": ["spas_sage_attn"], "parallel": ["kv_all_gather"]}


def _all(*tables):
    return [(kind, name) for t in tables for kind, names in t.items() for name in names]


def test_table_is_consistent():
    N._check_table()


@pytest.mark.parametrize("kind,name", _all(LIGHTX2V_REGISTRY, LIGHTX2V_PLATFORM, CONFIG_ONLY))
def test_every_lightx2v_name_is_classified(kind, name):
    entry = N.lookup(name)
    assert entry is not None, name
    assert entry.kind == kind
    assert entry.ours is None or entry.ours in A.available_backends()


def test_what_we_map_names_to():
    mapped = {e.name: e.ours for e in N.NAME_TABLE if e.ours is not None}
    assert mapped["sage_attn2"] == "sage_attn" and mapped["metax_sage_attn2"] == "sage_attn"
    assert mapped["radial_attn"] == "radial_attn"
    for name in ("torch_sdpa", "flash_attn2", "flash_attn3", "flash_attn4"):
        assert mapped[name] == name
    # every registered backend is in the table, under its own name
    for name in A.available_backends():
        assert N.lookup(name) is not None and N.lookup(name).ours == name
        assert N.lookup(name).kind == A._BACKENDS[name].kind
    accepted = A.accepted_names()
    assert set(N.names_of_kind("exact")) <= set(accepted) and "sage_attn2" in accepted and "svg_attn" not in accepted


@pytest.fixture
def fake_hopper(monkeypatch):
    """Pretend a Hopper GPU is present (for the checks only; nothing runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(A, "_WARNED", set())


def _installed(monkeypatch, *names):
    """Mark these backends as installed (their package present), the others of the optional ones as missing."""
    optional = ("flash_attn2", "flash_attn3", "flash_attn4", "cudnn_sdpa", "flash_attn3_fp8", "cudnn_sdpa_fp8")
    for name in optional:
        b = A._BACKENDS[name]
        monkeypatch.setitem(A._BACKENDS, name, A.AttentionBackend(**{**b.__dict__, "available": (
            lambda ok=name in names: ok)}))


def test_sage_attn2_is_our_sage_attn(fake_hopper):
    pytest.importorskip("triton")
    backend = A.get_attention_backend("sage_attn2", dtype=torch.bfloat16, head_dim=128, device="cuda")
    assert backend is A._BACKENDS["sage_attn"]


def test_approximate_never_falls_back(caplog):
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            A.get_attention_backend("sage_attn2", dtype=torch.bfloat16, head_dim=128, device="cpu")
    assert not caplog.records


def test_exact_falls_back_with_one_warning(caplog, monkeypatch):
    _installed(monkeypatch)  # nothing optional installed
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        for _ in range(3):
            backend = A.get_attention_backend("flash_attn3", dtype=torch.float32, head_dim=64, device="cpu")
            assert backend is A._BACKENDS["torch_sdpa"]
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "'flash_attn3'" in msg and "'torch_sdpa'" in msg and "not installed" in msg
    # a second exact name warns once too
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        A.get_attention_backend("flash_attn2", dtype=torch.float32, head_dim=64, device="cpu")
        A.get_attention_backend("flash_attn2", dtype=torch.float32, head_dim=64, device="cpu")
    assert len(caplog.records) == 2 and "'flash_attn2'" in caplog.records[1].getMessage()


def test_platform_exact_names_fall_back(caplog):
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        backend = A.get_attention_backend("intel_xpu_flash_attn", dtype=torch.float32, head_dim=64, device="cpu")
    assert backend.name == "torch_sdpa"
    assert "'intel_xpu_flash_attn'" in caplog.text and "Intel XPU" in caplog.text and "'torch_sdpa'" in caplog.text


def test_fallback_takes_the_best_installed_exact(fake_hopper, monkeypatch, caplog):
    _installed(monkeypatch, "flash_attn3", "cudnn_sdpa")
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        assert A.get_attention_backend("flash_attn2", dtype=torch.bfloat16, head_dim=128, device="cuda").name == \
            "flash_attn3"
        assert A.get_attention_backend("npu_flash_attn", dtype=torch.bfloat16, head_dim=128, device="cuda").name == \
            "flash_attn3"
        # fp32: none of the flash kernels takes it; torch_sdpa does
        assert A.get_attention_backend("flash_attn3", dtype=torch.float32, head_dim=128, device="cuda").name == \
            "torch_sdpa"
        # head_dim 100 is not a multiple of 8 (flash_attn3, cudnn_sdpa)
        assert A.get_attention_backend("flash_attn2", dtype=torch.bfloat16, head_dim=100, device="cuda").name == \
            "torch_sdpa"
    assert "does not support dtype torch.float32" in caplog.text
    _installed(monkeypatch, "flash_attn3")
    # an installed exact backend that can run is used as is, without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightx2v"):
        assert A.get_attention_backend("flash_attn3", dtype=torch.bfloat16, head_dim=128, device="cuda").name == \
            "flash_attn3"
    assert not caplog.records


def test_fa3_fwd_wheel_has_no_fp16(fake_hopper, monkeypatch):
    import lightx2v.ops.attention.flash as FL

    _installed(monkeypatch, "flash_attn3")
    monkeypatch.setattr(FL, "flash_attn3_provider", lambda: "fa3_fwd_interface")
    with pytest.raises(UserError, match="fa3-fwd wheel, which is built without fp16"):
        A.get_attention_backend("flash_attn3", dtype=torch.float16, head_dim=128, device="cuda", allow_fallback=False)
    assert A.get_attention_backend("flash_attn3", dtype=torch.float16, head_dim=128, device="cuda").name == "torch_sdpa"
    assert A.get_attention_backend("flash_attn3", dtype=torch.bfloat16, head_dim=128, device="cuda").name == \
        "flash_attn3"


def test_no_fallback_when_asked():
    with pytest.raises(UserError, match="'flash_attn3' is not installed here|needs a CUDA GPU"):
        A.get_attention_backend("flash_attn3", dtype=torch.bfloat16, head_dim=64, device="cpu", allow_fallback=False)
    with pytest.raises(UserError, match="'aiter_attn'.*not part of lightx2v"):
        A.get_attention_backend("aiter_attn", dtype=torch.float32, head_dim=64, device="cpu", allow_fallback=False)


@pytest.mark.parametrize("name,words", [
    ("svg_attn", "Sparse VideoGen; sparse attention"),
    ("spas_sage_attn2", "sparse attention"),
    ("sage_attn3", "FP4 microscaling attention (Blackwell); approximate attention"),
    ("mlu_sage_attn", "approximate attention"),
    ("ulysses", "sequence parallelism"),
])
def test_names_we_lack_are_errors(name, words):
    for call in (lambda: A.validate_attention_name(name),
                 lambda: A.get_attention_backend(name, dtype=torch.float32, head_dim=64, device="cpu")):
        with pytest.raises(UserError) as err:
            call()
        msg = str(err.value)
        assert f"{name!r}" in msg and words in msg and "not implemented in lightx2v" in msg
        assert "available: " in msg and "sage_attn2" in msg and "radial_attn" in msg


def test_unknown_name():
    with pytest.raises(UserError, match="'flash_attn5' is not an available attention backend .*; available: .*torch_sdpa"):
        A.get_attention_backend("flash_attn5", dtype=torch.float32, head_dim=64, device="cpu")


def test_flash_attn4_wheel_does_not_fake_flash_attn2(tmp_path, monkeypatch):
    """The flash-attn-4 wheel installs flash_attn/cute only: flash_attn imports (a namespace package) but
    FlashAttention 2 is not there."""
    import lightx2v.ops.attention.flash as FL

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, mod)
    assert FL._has_module("flash_attn.cute")
    assert not FL.flash_attn2_available()
    assert FL.flash_attn4_available() == FL._has_module("cutlass")


def test_backends_declare_their_constraints():
    b = A._BACKENDS
    assert b["flash_attn3"].min_capability == (9, 0)
    assert b["cudnn_sdpa_fp8"].min_capability == (10, 0)  # cuDNN declines FP8 SDPA with a bf16 output on sm_90
    assert b["flash_attn4"].dtypes == (torch.float16, torch.bfloat16) and b["flash_attn4"].max_head_dim == 256
    assert all(b[n].needs_cuda for n in ("flash_attn3", "flash_attn4", "cudnn_sdpa", "cudnn_sdpa_fp8",
                                         "flash_attn3_fp8"))
    assert {n for n, x in b.items() if x.kind == "approximate"} == {"sage_attn", "flash_attn3_fp8", "cudnn_sdpa_fp8"}
    assert [n for n, x in b.items() if x.needs_grid] == ["radial_attn"]


# --- FP8 operands (used by flash_attn3_fp8 / cudnn_sdpa_fp8) -----------------------------------------------------

def test_fp8_quantization_and_smoothing():
    from lightx2v.ops.attention.fp8 import dequantize_fp8, fp8_attention_reference, quantize_fp8

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 3, 64, generator=g) for _ in range(3))
    k = k + 8.0 * torch.randn(3, 64, generator=g)  # a per-(head, channel) offset, as DiT keys carry
    for per_head in (True, False):
        for smooth in (False, True):
            z = quantize_fp8(k, per_head=per_head, smooth=smooth)
            assert z.x8.dtype == torch.float8_e4m3fn and z.x8.shape == k.shape
            assert z.scale.shape == ((2, 3) if per_head else (1,))
            assert z.x8.float().abs().max() == 448  # the largest value maps to e4m3's maximum
            rel = ((dequantize_fp8(z) - k).norm() / k.norm()).item()
            assert rel < 0.05
    exact = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2)).transpose(1, 2)
    errs = {}
    for smooth_k in (False, True):
        out = fp8_attention_reference(q, k, v, per_head=False, smooth_k=smooth_k, smooth_v=True)
        errs[smooth_k] = ((out - exact).norm() / exact.norm()).item()
    assert errs[True] < 0.05 and errs[True] < errs[False] / 2  # K smoothing is what makes per-tensor FP8 work
    zero = quantize_fp8(torch.zeros(1, 4, 1, 16), per_head=True, smooth=False)
    assert zero.scale.item() == 1.0 and zero.x8.float().abs().sum() == 0
