"""Every attention name a LightX2V config may carry, what kind of math it is, and what we run for it.

This table is the one place that knows LightX2V's attention vocabulary (its ``ATTN_WEIGHT_REGISTER`` keys in
``lightx2v/common/ops/attn``, the platform keys in ``lightx2v_platform/ops/attn`` and a few names that only appear
in its configs), plus the names of our own backends. :func:`lightx2v.ops.attention.get_attention_backend` reads it:

* ``exact``: softmax(q k^T / sqrt(d)) v up to floating-point rounding (FlashAttention 2/3/4, cuDNN, the vendor
  kernels of other platforms). If the one asked for cannot run here, the best exact backend that can is used
  instead, with one warning naming both: the math is the same.
* ``approximate``: quantized attention (SageAttention's INT8 Q.K^T / FP8 P.V, FP4 ...). Runs only as the
  backend it maps to; a name we do not implement is an error, never a switch to different math.
* ``sparse``: attention restricted to a pattern of blocks (Radial, Sparge, SVG, NBHD ...). Same rule.
* ``parallel``: a sequence-parallel scheme around an attention kernel (Ulysses, ring): a parallel-inference
  setting in LightX2V, not a kernel; sequence parallelism is not implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass

EXACT, APPROXIMATE, SPARSE, PARALLEL = "exact", "approximate", "sparse", "parallel"
KINDS = (EXACT, APPROXIMATE, SPARSE, PARALLEL)


@dataclass(frozen=True)
class AttentionName:
    name: str  # as written in a config (``self_attn_1_type``, ``attn_mode`` ...)
    kind: str  # one of KINDS
    ours: str | None  # the registered backend we run for it; None: not implemented in lightx2v
    what: str  # one line: the kernel or method behind the name
    origin: str = "lightx2v"  # "lightx2v" (its registry), "lightx2v-platform", "lightx2v-config" (configs only), "ours"


_E, _A, _S, _P = EXACT, APPROXIMATE, SPARSE, PARALLEL

NAME_TABLE: tuple[AttentionName, ...] = (
    # --- exact ---------------------------------------------------------------------------------------------------
    AttentionName("torch_sdpa", _E, "torch_sdpa", "PyTorch scaled_dot_product_attention (cuDNN / flash / efficient)"),
    AttentionName("flash_attn2", _E, "flash_attn2", "FlashAttention 2 (flash_attn package)"),
    AttentionName("flash_attn3", _E, "flash_attn3", "FlashAttention 3, Hopper (flash_attn_interface or fa3-fwd)"),
    AttentionName("flash_attn4", _E, "flash_attn4", "FlashAttention 4, CuTe DSL (flash-attn-4: flash_attn.cute)"),
    AttentionName("dreamzero_fa2", _E, None, "FlashAttention 2 varlen (DreamZero's self-attention)"),
    AttentionName("dreamzero_cross_fa", _E, None, "FlashAttention 2/3 varlen (DreamZero's cross-attention)"),
    AttentionName("npu_flash_attn", _E, None, "Ascend NPU fused attention (torch_npu)", "lightx2v-platform"),
    AttentionName("mlu_flash_attn", _E, None, "Cambricon MLU flash attention (torch_mlu_ops)", "lightx2v-platform"),
    AttentionName("flash_attn_hygon_dcu", _E, None, "Hygon DCU flash attention", "lightx2v-platform"),
    AttentionName("flash_attn_enflame_gcu", _E, None, "Enflame GCU flash attention", "lightx2v-platform"),
    AttentionName("aiter_attn", _E, None, "AMD ROCm AITER flash attention", "lightx2v-platform"),
    AttentionName("iluvatar_flash_attn", _E, None, "Iluvatar CoreX flash attention", "lightx2v-platform"),
    AttentionName("intel_xpu_flash_attn", _E, None, "Intel XPU flash attention", "lightx2v-platform"),
    AttentionName("intel_xpu_cute_attn", _E, None, "Intel XPU CUTLASS-SYCL CuTe attention", "lightx2v-platform"),
    AttentionName("cudnn_sdpa", _E, "cudnn_sdpa", "cuDNN SDPA forward through nvidia-cudnn-frontend", "ours"),
    # --- approximate ---------------------------------------------------------------------------------------------
    AttentionName("sage_attn2", _A, "sage_attn", "SageAttention2: INT8 Q.K^T, FP8 P.V (our sage_attn kernel family)"),
    AttentionName("metax_sage_attn2", _A, "sage_attn", "SageAttention2 (sageattention's sageattn) on MetaX GPUs",
                  "lightx2v-platform"),
    AttentionName("sage_attn", _A, "sage_attn", "our INT8 Q.K^T + FP8 P.V Triton kernel", "ours"),
    AttentionName("sage_attn3", _A, None, "SageAttention3: FP4 microscaling attention (Blackwell)"),
    AttentionName("sage_attn2_k_int8_v_fp8", _A, None, "SageAttention2 on a pre-quantized INT8 K / FP8 V cache"),
    AttentionName("mlu_sage_attn", _A, None, "Cambricon MLU sage attention (torch_mlu_ops)", "lightx2v-platform"),
    AttentionName("flash_attn3_fp8", _A, "flash_attn3_fp8",
                  "FlashAttention 3 on FP8 e4m3 q/k/v, one scale per (batch, head)", "ours"),
    AttentionName("cudnn_sdpa_fp8", _A, "cudnn_sdpa_fp8", "cuDNN FP8 SDPA (e4m3 q/k/v/P, per-tensor scales)", "ours"),
    # --- sparse --------------------------------------------------------------------------------------------------
    AttentionName("radial_attn", _S, "radial_attn", "Radial Attention: frame-distance decaying block mask"),
    AttentionName("spas_sage_attn2", _S, None, "SpargeAttn / SLA block-sparse SageAttention2"),
    AttentionName("spas_sage_attn3", _S, None, "block-sparse SageAttention3"),
    AttentionName("spas_sage_attn", _S, None, "block-sparse SageAttention (older config name)", "lightx2v-config"),
    AttentionName("spas_flash_attn4", _S, None, "block-sparse FlashAttention 4 (SLA / Sparge maps)"),
    AttentionName("sparge_attn", _S, None, "SpargeAttn"),
    AttentionName("svg_attn", _S, None, "Sparse VideoGen"),
    AttentionName("svg2_attn", _S, None, "Sparse VideoGen 2"),
    AttentionName("nbhd_attn", _S, None, "neighbourhood block-sparse attention (MagiAttention)"),
    AttentionName("nbhd_attn_flashinfer", _S, None, "neighbourhood block-sparse attention (FlashInfer)"),
    AttentionName("sol_attn", _S, None, "Sol-Attn sparse attention"),
    AttentionName("draft_attn", _S, None, "DraftAttention"),
    AttentionName("dynamic_sparse_attn", _S, None, "dynamic block-sparse attention"),
    AttentionName("general_sparse_attn", _S, None, "configurable mask generator + sparse operator"),
    AttentionName("rainfusion_attn", _S, None, "RainFusion sparse attention"),
    AttentionName("flex_attn", _S, None, "FlexAttention with Wan-Animate's reference-frame mask"),
    AttentionName("swiftvr_mfswa", _S, None, "SwiftVR mask-free shifted-window attention"),
    # --- parallel ------------------------------------------------------------------------------------------------
    AttentionName("ulysses", _P, None, "Ulysses sequence parallelism (parallel.seq_p_attn_type)"),
    AttentionName("ulysses-4090", _P, None, "Ulysses sequence parallelism, round-robin all-to-all"),
    AttentionName("ring", _P, None, "ring-attention sequence parallelism"),
    AttentionName("kv_all_gather", _P, None, "all-gathered K/V sequence parallelism", "lightx2v-config"),
)

NAMES: dict[str, AttentionName] = {entry.name: entry for entry in NAME_TABLE}

# Exact backends of ours, best first: an exact name that cannot run here falls back to the first of these that can.
# FlashAttention 3 leads on Hopper; torch_sdpa (always there) comes before FlashAttention 2, which it contains.
# bench/bench_attention_backends.py measures them side by side.
EXACT_FALLBACK_ORDER: tuple[str, ...] = ("flash_attn3", "flash_attn4", "cudnn_sdpa", "torch_sdpa", "flash_attn2")


def lookup(name: str) -> AttentionName | None:
    return NAMES.get(name)


def names_of_kind(kind: str) -> list[str]:
    return sorted(e.name for e in NAME_TABLE if e.kind == kind)


def accepted_names() -> list[str]:
    """Names a config may carry: every exact name (it falls back) and every other name we implement."""
    return sorted(e.name for e in NAME_TABLE if e.kind == EXACT or e.ours is not None)


def _check_table() -> None:
    """Internal consistency, asserted by the tests."""
    for e in NAME_TABLE:
        assert e.kind in KINDS, e
        assert e.origin in ("lightx2v", "lightx2v-platform", "lightx2v-config", "ours"), e
    assert len(NAMES) == len(NAME_TABLE), "duplicate names"
    for name in EXACT_FALLBACK_ORDER:
        assert NAMES[name].kind == EXACT and NAMES[name].ours == name
