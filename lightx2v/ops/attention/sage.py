"""``sage_attn``: our own Triton attention in the spirit of SageAttention (INT8 Q.K^T, FP8 P.V).

Layout in and out is the one of :mod:`lightx2v.ops.attention`: ``q`` ``[B, Lq, H, D]``, ``k``/``v``
``[B, Lk, H, D]`` (any strides, no copies) -> ``[B, Lq, H, D]`` in ``q``'s dtype. No mask, no dropout.

The math (every step below is mirrored by :func:`sage_attention_reference`, in plain PyTorch):

* **K smoothing.** ``k -= mean_tokens(k)`` per (batch, head). Adding a constant vector to every key adds a
  constant to every score of a query row, which softmax ignores; it removes the per-channel offset DiT keys
  carry, so the INT8 range is spent on what differs between keys.
* **Q: INT8, one scale per token** (per head). ``sm_scale * log2(e)`` is folded in before quantizing, so the
  scores come out in log2 units and the kernel uses ``exp2``. A per-row scale costs nothing in the kernel
  (it multiplies the same row of S as the per-block scale would).
* **K: INT8, one scale per block of 128 keys** (per head). Attention tiles of 64 or 128 keys therefore see one
  K scale each, and the score of a tile is ``int32 dot * (q_scale[row] * k_scale)``.
* **V: FP8 e4m3 after smoothing**: ``v -= mean_tokens(v)`` per (batch, head, channel), then one scale per
  (batch, head, channel), ``amax / 448``. Both are undone in the epilogue (``out = o * v_scale + v_mean``;
  the rows of softmax sum to one, so the mean comes back exactly). V is stored transposed,
  ``[B, H, D, Lk]``, because Hopper's FP8 ``wgmma`` needs its B operand K-major (contiguous along keys).
* **P: FP8 e4m3, scaled by 2**8 = 256.** ``P = exp2(S - m)`` lies in ``[0, 1]``; cast to e4m3 as is,
  everything under 2**-9 (the smallest subnormal) flushes to zero and everything under 2**-6 keeps fewer than 3
  mantissa bits. With long sequences much of the softmax mass can sit there (for Gaussian scores the mass of a
  row peaks about ``1/sqrt(L)`` below its maximum in the worst case: 0.006 at 32k tokens). Shifting the
  exponent, ``exp2(S - m + 8)``, moves the whole range up by 2**8 for free (it is folded into the subtraction
  of the row offset); the row sum ``l`` is accumulated from the same scaled fp32 ``P``, so the factor cancels in
  ``acc / l``. A power of two, not SageAttention2's 448: it leaves every mantissa as it was (the row maximum,
  1 -> 256, stays exact; 2**8.5 = 362 rounds to 352 or 384, and that 3% error on the largest weight of a row
  cost more than the underflow it saves: 4.5% vs 3.6% relative L2 against exact attention at 32k tokens, where
  no scaling gives 4.3%), and it leaves headroom under 448 for the rounding of the offset (below).
* **Two-level accumulation of P.V.** Hopper's FP8 MMA accumulates with fewer than 32 bits of precision; each
  tile's ``P.V`` is therefore computed into a fresh accumulator and added to the running fp32 accumulator on
  the CUDA cores (``acc = acc * alpha + dot(P, V)``: the add replaces the rescale multiply, so it costs one
  register tile, no extra instructions).
* **INT32 -> FP32 without I2F.** ``|int8 . int8|`` over ``D <= 256`` channels stays under 2**22, so
  ``bitcast(s + 0x4B400000)`` is exactly ``1.5 * 2**23 + s`` as a float (Triton folds the add into the MMA's
  accumulator init). The offset is folded into the one FMA that scales S and subtracts the row offset:
  ``p = exp2(fma(f, c, -(1.5 * 2**23 * c + o)))``. That replaces a quarter-rate conversion (I2F) per score. The
  sum ``1.5 * 2**23 * c + o`` rounds, so the kernel keeps as its running offset the value actually applied
  (``bias - 1.5 * 2**23 * c``, exact because ``c`` is cut to 22 significant bits): the softmax stays exact up
  to fp32 rounding, and the PyTorch reference reproduces the kernel to ~1e-7.

* **Optional: scores one tile ahead** (``prefetch``): the int8 MMA of tile j+1 is issued before the softmax
  of tile j, so the tensor cores run while the warps do exp2 (FlashAttention-3's intra-warpgroup overlap,
  obtained by program order; in the sm_90 SASS the IGMMAs of the next tile interleave with the MUFU.EX2 of
  the current one). Costs the registers of a second score tile (253-254 per thread: one or two programs per SM).
* **Default on Hopper: TMA loads, no prefetch, overlap across programs.** Without the second score tile, a
  64 x 128 tile with 4 warps needs 166 registers (ptxas, Triton 3.6, sm_90a) and 72 KB of shared memory at 2
  stages, so three programs (12 warps) share an SM; their softmax and MMA phases drift apart and overlap (the
  inter-warpgroup overlap of FlashAttention-3's ping-pong, left to the warp schedulers). H100, [1, 40, 32760, 128]
  bf16, full call, two runs: 26.7 / 27.9 ms (1.37x / 1.34x cuDNN; the autotuner picks 64 x 128, 4 warps, 2 stages)
  vs 28.6 / 28.4 ms (1.28x / 1.31x) for the best prefetch config; cos 0.99952 vs exact either way (same math). In
  one tile the softmax is issue-bound (~9.4 instructions per score: scale FMA, max, ex2, row sum, e4m3 pack, the
  A-operand shuffles, the accumulator FMA) about as much as MUFU-bound (ex2 at 16/clk/SM). Triton 3.6's
  ``tl.range(warp_specialize=True)`` leaves this loop unspecialised on sm_90 (no ``ttg.warp_specialize`` in the
  TTGIR), and ``ex2.approx.ftz.f32`` by inline PTX compiles to the same SASS as ``tl.math.exp2``.

Kernels: one launch for K/V statistics (partial sums / max / min per chunk of tokens; a few tiny PyTorch
reductions finish them), one that quantizes Q, one that smooths and quantizes K and V, and the attention
kernel (autotuned over block sizes, warps and pipeline stages, keyed on head dim and sequence lengths).

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU (that is how the tests check them): the interpreter's
float -> fp8 cast rounds wrongly (no carry into the exponent), so in that mode values are rounded to the e4m3
grid in fp32 first (``EMULATE_FP8``); on a GPU the hardware ``cvt.rn.satfinite`` does it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lightx2v.errors import UserError

try:  # optional: without triton only the PyTorch reference is usable
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as _e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = _e

LOG2E = 1.4426950408889634
P_LOG2 = 8.0  # P is computed as exp2(S - m + P_LOG2): in [0, 256], inside e4m3's +-448
FP8_MAX = 448.0
INT8_MAX = 127.0
K_BLOCK = 128  # keys per K scale (and the padding unit of every sequence)
Q_BLOCK = 128  # queries per program of the Q quantizer (and per scale when q_per_token=False)
STATS_CHUNK = 1024  # tokens per program of the K/V statistics kernel
MAX_HEAD_DIM = 128

_MAGIC_I = 0x4B400000  # bit pattern of 1.5 * 2**23
_MAGIC_F = 12582912.0  # 1.5 * 2**23


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _padded_head_dim(d: int) -> int:
    return max(32, 1 << (d - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------------

def check_sage_available(device: torch.device) -> None:
    """Raise :class:`UserError` unless ``sage_attn`` can run on ``device``."""
    if _TRITON_IMPORT_ERROR is not None:
        raise UserError(f"attention backend 'sage_attn' needs the 'triton' package, which could not be imported "
                        f"({_TRITON_IMPORT_ERROR}); install triton or use torch_sdpa")
    device = torch.device(device)
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        raise UserError("sage_attn needs an NVIDIA GPU with FP8 tensor cores (sm_89+); use torch_sdpa "
                        f"(the model runs on {device})")
    if not torch.cuda.is_available():
        raise UserError("sage_attn needs an NVIDIA GPU with FP8 tensor cores (sm_89+); use torch_sdpa "
                        "(no CUDA GPU is visible)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise UserError("sage_attn needs an NVIDIA GPU with FP8 tensor cores (sm_89+); use torch_sdpa "
                        f"({name} is sm_{major}{minor})")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sage_attn wants [B, L, H, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"sage_attn: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"sage_attn: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or "
                         "head_dim (grouped-query attention is not supported)")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"sage_attn supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError("sage_attn: empty sequence")


# ----------------------------------------------------------------------------------------------------------------
# the quantized operands (same layout from the Triton pre-processing and from the PyTorch reference)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SageQuantized:
    """Quantized operands. Sequences are padded to multiples of 128 and head_dim to a power of two (>= 32);
    every padded element is zero (padded scales are 1)."""

    q8: torch.Tensor  # [B, H, Lq_pad, Dp] int8, Q * sm_scale * log2(e) / q_scale
    q_scale: torch.Tensor  # [B, H, Lq_pad] float32, one per query token
    k8: torch.Tensor  # [B, H, Lk_pad, Dp] int8, (K - k_mean) / k_scale
    k_scale: torch.Tensor  # [B, H, Lk_pad // 128] float32, one per block of 128 keys
    vt: torch.Tensor  # [B, H, Dp, Lk_pad] float8_e4m3fn (or float16), ((V - v_mean) / v_scale)^T
    v_scale: torch.Tensor  # [B, H, Dp] float32
    v_mean: torch.Tensor  # [B, H, Dp] float32
    k_mean: torch.Tensor  # [B, H, Dp] float32 (not needed by the attention kernel; kept for checks)
    lq: int
    lk: int
    head_dim: int

    @property
    def shape(self):
        b, h = self.q8.shape[:2]
        return b, h, self.lq, self.lk, self.head_dim


def _div(num: float, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` correctly rounded, as the kernels divide (``scalar / tensor`` in PyTorch multiplies by a
    rounded reciprocal instead, which moves ties of the INT8 rounding)."""
    return torch.full_like(den, num) / den.clamp_min(1e-30)


def _v_scales(v_absmax: torch.Tensor):
    """Per-channel FP8 scale of smoothed V from its max |v - mean|: (scale, 1 / scale); all-zero channels: (1, 0)."""
    ok = v_absmax > 0
    scale = torch.where(ok, v_absmax / FP8_MAX, torch.ones_like(v_absmax))
    inv = torch.where(ok, _div(FP8_MAX, v_absmax), torch.zeros_like(v_absmax))
    return scale, inv


def _int8_round(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ``(x + copysign(0.5, x)).to(int8)`` does in the kernels."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5)).to(torch.int8)


def sage_quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_per_token: bool = True,
                            pv_dtype: torch.dtype = torch.float8_e4m3fn) -> SageQuantized:
    """The pre-processing in PyTorch (fp32), same math and layout as the Triton kernels."""
    _check_inputs(q, k, v)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    Dp = _padded_head_dim(D)
    Lq_pad, Lk_pad = _round_up(Lq, K_BLOCK), _round_up(Lk, K_BLOCK)
    dev = q.device

    def pad(x, L_pad):  # [B, L, H, D] -> [B, H, L_pad, Dp] float32, zeros outside
        out = torch.zeros(B, H, L_pad, Dp, dtype=torch.float32, device=dev)
        out[:, :, : x.shape[1], :D] = x.float().transpose(1, 2)
        return out

    # Q: per token, sm_scale * log2(e) folded in
    qf = pad(q, Lq_pad) * (D ** -0.5 * LOG2E)
    if q_per_token:
        q_amax = qf.abs().amax(-1)  # [B, H, Lq_pad]
    else:
        q_amax = qf.abs().view(B, H, Lq_pad // Q_BLOCK, Q_BLOCK * Dp).amax(-1).repeat_interleave(Q_BLOCK, -1)
    ok = q_amax > 0
    q_inv = torch.where(ok, _div(INT8_MAX, q_amax), torch.zeros_like(q_amax))
    q_scale = torch.where(ok, q_amax / INT8_MAX, torch.ones_like(q_amax))
    q8 = _int8_round(qf * q_inv[..., None])

    # K: smoothed, per block of 128 keys
    kf = pad(k, Lk_pad)
    k_mean = torch.zeros(B, H, Dp, dtype=torch.float32, device=dev)
    k_mean[..., :D] = k.float().mean(1)
    valid = (torch.arange(Lk_pad, device=dev) < Lk)[:, None]
    kc = torch.where(valid, kf - k_mean[:, :, None, :], 0.0)
    k_amax = kc.view(B, H, Lk_pad // K_BLOCK, K_BLOCK * Dp).abs().amax(-1)
    ok = k_amax > 0
    k_inv = torch.where(ok, _div(INT8_MAX, k_amax), torch.zeros_like(k_amax))
    k_scale = torch.where(ok, k_amax / INT8_MAX, torch.ones_like(k_amax))
    k8 = _int8_round(kc * k_inv.repeat_interleave(K_BLOCK, -1)[..., None])

    # V: smoothed, per channel
    vf = pad(v, Lk_pad)
    v_mean = torch.zeros(B, H, Dp, dtype=torch.float32, device=dev)
    v_mean[..., :D] = v.float().mean(1)
    vc = torch.where(valid, vf - v_mean[:, :, None, :], 0.0)
    v_amax = vc.abs().amax(2)  # [B, H, Dp]
    v_scale, v_inv = _v_scales(v_amax)
    vt = (vc * v_inv[:, :, None, :]).to(pv_dtype).transpose(-1, -2).contiguous()
    return SageQuantized(q8, q_scale, k8, k_scale, vt, v_scale, v_mean, k_mean, Lq, Lk, D)


def sage_attention_core_reference(qz: SageQuantized, *, block_n: int = 128, magic_i2f: bool = True,
                                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The attention kernel's math in PyTorch fp32: online softmax over blocks of ``block_n`` keys (the block
    size decides the running offsets, hence how P rounds to fp8), INT8 scores, scaled FP8 P, two-level
    accumulation, and the same offset bookkeeping as the kernel (``magic_i2f``: the 1.5 * 2**23 offset of the
    I2F-free conversion). Returns ``[B, Lq, H, D]``."""
    if K_BLOCK % block_n:
        raise ValueError(f"block_n must divide {K_BLOCK}, got {block_n}")
    B, H, Lq, Lk, D = qz.shape
    q8 = qz.q8[:, :, :Lq].float()
    qs = qz.q_scale[:, :, :Lq]
    k8 = qz.k8.float()
    ks = qz.k_scale.repeat_interleave(K_BLOCK, -1)  # [B, H, Lk_pad]
    vt = qz.vt.float()  # [B, H, Dp, Lk_pad]
    off = _MAGIC_F if magic_i2f else 0.0
    o = torch.full((B, H, Lq), -math.inf, device=q8.device)
    l = torch.zeros(B, H, Lq, device=q8.device)
    acc = torch.zeros(B, H, Lq, vt.shape[2], device=q8.device)
    for j in range(0, Lk, block_n):
        e = min(j + block_n, Lk)
        s_int = q8 @ k8[:, :, j:e].transpose(-1, -2)  # exact integers in fp32 (|s| < 2**22)
        c = (qs * ks[:, :, j:j + 1]).view(torch.int32).bitwise_and(-4).view(torch.float32)  # 22 bits, as the kernel
        oc = off * c
        o_target = torch.maximum(o, s_int.amax(-1) * c - P_LOG2)
        bias = oc + o_target
        o_new = bias - oc  # the offset the kernel actually applies
        # fp32(s * c - o_new) rounded once, as the kernel's FMA does (exact in float64)
        p = torch.exp2((s_int.double() * c.double()[..., None] - o_new.double()[..., None]).float())
        alpha = torch.exp2(o - o_new)
        l = l * alpha + p.sum(-1)
        p = p.to(qz.vt.dtype).float()
        acc = acc * alpha[..., None] + p @ vt[:, :, :, j:e].transpose(-1, -2)
        o = o_new
    out = acc / l[..., None] * qz.v_scale[:, :, None, :] + qz.v_mean[:, :, None, :]
    return out[..., :D].transpose(1, 2).to(out_dtype)


def sage_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_n: int = 128,
                             q_per_token: bool = True, pv_fp8: bool = True, magic_i2f: bool = True) -> torch.Tensor:
    """``sage_attn``'s quantized math in plain PyTorch (any device): [B, Lq, H, D] -> [B, Lq, H, D], q's dtype."""
    qz = sage_quantize_reference(q, k, v, q_per_token=q_per_token,
                                 pv_dtype=torch.float8_e4m3fn if pv_fp8 else torch.float16)
    return sage_attention_core_reference(qz, block_n=block_n, magic_i2f=magic_i2f, out_dtype=q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:
    _P_LOG2 = tl.constexpr(P_LOG2)

    @triton.jit
    def _round_to_e4m3(x):
        """fp32 -> fp32 on the e4m3 grid (round to nearest even, saturating at +-448). Only used under the
        interpreter, whose own fp32 -> fp8 cast is wrong; the GPU's cvt.rn.satfinite does this in hardware."""
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        ax = tl.abs(x)
        bits = ax.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 mantissa bits, RNE
        normal = bits.to(tl.float32, bitcast=True)
        sub = (ax + 16384.0) - 16384.0  # subnormals: multiples of 2**-9 (the fp32 ulp at 2**14)
        r = tl.where(ax < 0.015625, sub, normal)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _sage_kv_stats_kernel(K, V, STATS, Lk, H, n_chunks,
                              stride_kb, stride_kl, stride_kh, stride_kd,
                              stride_vb, stride_vl, stride_vh, stride_vd,
                              CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                              HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
        """Per chunk of tokens: sum of K, sum of V, max of V, min of V over the tokens -> STATS[4, B, H, C, Dp]."""
        pid_c = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        offs_d = tl.arange(0, HEAD_DIM_P)
        dmask = offs_d < HEAD_DIM
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        ksum = tl.zeros([HEAD_DIM_P], dtype=tl.float32)
        vsum = tl.zeros([HEAD_DIM_P], dtype=tl.float32)
        vmax = tl.full([HEAD_DIM_P], float("-inf"), dtype=tl.float32)
        vmin = tl.full([HEAD_DIM_P], float("inf"), dtype=tl.float32)
        start = pid_c * CHUNK
        for off in range(0, CHUNK, BLOCK):
            rows = start + off + tl.arange(0, BLOCK)
            m2 = (rows < Lk)[:, None] & dmask[None, :]
            kx = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=m2, other=0.0)
            vx = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=m2, other=0.0)
            kx = kx.to(tl.float32)
            vx = vx.to(tl.float32)
            ksum += tl.sum(kx, 0)
            vsum += tl.sum(vx, 0)
            vmax = tl.maximum(vmax, tl.max(tl.where(m2, vx, float("-inf")), 0))
            vmin = tl.minimum(vmin, tl.min(tl.where(m2, vx, float("inf")), 0))
        plane = tl.num_programs(2).to(tl.int64) * H * n_chunks * HEAD_DIM_P
        out = STATS + ((b.to(tl.int64) * H + h) * n_chunks + pid_c) * HEAD_DIM_P + offs_d
        tl.store(out, ksum)
        tl.store(out + plane, vsum)
        tl.store(out + 2 * plane, vmax)
        tl.store(out + 3 * plane, vmin)

    @triton.jit
    def _sage_quant_q_kernel(Q, Q8, QS, Lq, Lq_pad, H, q_mult,
                             stride_qb, stride_ql, stride_qh, stride_qd,
                             BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                             PER_TOKEN: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM_P)
        m2 = (rows < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
        src = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        x = tl.load(src + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=m2, other=0.0)
        x = x.to(tl.float32) * q_mult
        if PER_TOKEN:
            amax = tl.max(tl.abs(x), 1)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32) + tl.max(tl.max(tl.abs(x), 1), 0)
        inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        xs = x * inv[:, None]
        q8 = (xs + tl.where(xs >= 0, 0.5, -0.5)).to(tl.int8)
        bh = b.to(tl.int64) * H + h
        tl.store(Q8 + (bh * Lq_pad + rows)[:, None] * HEAD_DIM_P + offs_d[None, :], q8)
        tl.store(QS + bh * Lq_pad + rows, scale)

    @triton.jit
    def _sage_quant_kv_kernel(K, V, KMEAN, VMEAN, VINV, K8, KS, VT, Lk, Lk_pad, H,
                              stride_kb, stride_kl, stride_kh, stride_kd,
                              stride_vb, stride_vl, stride_vh, stride_vd,
                              BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                              EMULATE_FP8: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM_P)
        m2 = (rows < Lk)[:, None] & (offs_d < HEAD_DIM)[None, :]
        bh = b.to(tl.int64) * H + h
        # K: subtract the mean, one INT8 scale for the block
        src = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        x = tl.load(src + rows[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=m2, other=0.0)
        km = tl.load(KMEAN + bh * HEAD_DIM_P + offs_d)
        x = tl.where(m2, x.to(tl.float32) - km[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
        scale = tl.where(amax > 0, amax / 127.0, 1.0)
        xs = x * inv
        k8 = (xs + tl.where(xs >= 0, 0.5, -0.5)).to(tl.int8)
        tl.store(K8 + (bh * Lk_pad + rows)[:, None] * HEAD_DIM_P + offs_d[None, :], k8)
        tl.store(KS + bh * (Lk_pad // BLOCK) + pid, scale)
        # V: subtract the mean, per-channel scale, FP8 (or fp16), stored transposed [Dp, Lk_pad]
        src = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        y = tl.load(src + rows[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=m2, other=0.0)
        vm = tl.load(VMEAN + bh * HEAD_DIM_P + offs_d)
        vi = tl.load(VINV + bh * HEAD_DIM_P + offs_d)
        y = tl.where(m2, y.to(tl.float32) - vm[None, :], 0.0) * vi[None, :]
        if EMULATE_FP8:
            y = _round_to_e4m3(y)
        yt = tl.trans(y.to(VT.dtype.element_ty))  # [Dp, BLOCK]
        tl.store(VT + (bh * HEAD_DIM_P + offs_d)[:, None] * Lk_pad + rows[None, :], yt)

    @triton.jit
    def _sage_softmax_pv(acc, l_i, o_i, s, qs, ks, vt, start_n, Lk,
                         BLOCK_N: tl.constexpr, MASK: tl.constexpr, TWO_LEVEL: tl.constexpr,
                         MAGIC: tl.constexpr, EMULATE_FP8: tl.constexpr):
        """One tile of keys, given its int32 scores ``s``: online softmax update of (acc, l, o); ``o`` is the
        log2 offset the running ``acc`` and ``l`` are scaled by (``p = exp2(S - o)``, o ~ row max - P_LOG2)."""
        # log2 units per integer unit, per query row; 22 significant bits, so that off * c below is exact
        c = ((qs * ks).to(tl.int32, bitcast=True) & -4).to(tl.float32, bitcast=True)
        if MAGIC:
            f = (s + 0x4B400000).to(tl.float32, bitcast=True)  # == 1.5 * 2**23 + s exactly (|s| < 2**22)
            off = 12582912.0
        else:
            f = s.to(tl.float32)
            off = 0.0
        if MASK:  # the ragged last tile: keys past Lk get -inf (each tile has at least one valid key)
            f = tl.where((start_n + tl.arange(0, BLOCK_N) < Lk)[None, :], f, float("-inf"))
        oc = off * c  # exact
        o_target = tl.maximum(o_i, (tl.max(f, 1) - off) * c - _P_LOG2)
        bias = oc + o_target  # rounded: the offset actually applied is bias - oc, exactly (Sterbenz)
        o_new = bias - oc
        p = tl.math.exp2(tl.fma(f, c[:, None], -bias[:, None]))  # = exp2(s*c - o_new) <= ~256: one FMA + ex2
        alpha = tl.math.exp2(o_i - o_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if EMULATE_FP8:
            if vt.dtype == tl.float8e4nv:
                p = _round_to_e4m3(p)
        pv = p.to(vt.dtype)
        if TWO_LEVEL:
            acc = tl.fma(acc, alpha[:, None], tl.dot(pv, tl.trans(vt)))
        else:
            acc = tl.dot(pv, tl.trans(vt), acc * alpha[:, None])
        return acc, l_i, o_new

    @triton.jit
    def _sage_attn_tile(acc, l_i, o_i, q, qs, k, vt, ks, start_n, Lk,
                        BLOCK_N: tl.constexpr, MASK: tl.constexpr, TWO_LEVEL: tl.constexpr,
                        MAGIC: tl.constexpr, EMULATE_FP8: tl.constexpr):
        s = tl.dot(q, tl.trans(k))  # int32, exact
        return _sage_softmax_pv(acc, l_i, o_i, s, qs, ks, vt, start_n, Lk, BLOCK_N, MASK, TWO_LEVEL, MAGIC,
                                EMULATE_FP8)

    @triton.jit
    def _sage_load_k(K8, k_ptrs, ks_ptr, bh, Lk_pad, start_n,
                     HEAD_DIM_P: tl.constexpr, KBLK: tl.constexpr, USE_TMA: tl.constexpr):
        if USE_TMA:
            k = K8.load([bh * Lk_pad + start_n, 0])
        else:
            k = tl.load(k_ptrs + start_n * HEAD_DIM_P)
        return k, tl.load(ks_ptr + start_n // KBLK)

    @triton.jit
    def _sage_load_v(VT, vt_ptrs, bh, start_n, HEAD_DIM_P: tl.constexpr, USE_TMA: tl.constexpr):
        if USE_TMA:
            vt = VT.load([bh * HEAD_DIM_P, start_n])
        else:
            vt = tl.load(vt_ptrs + start_n)
        return vt

    @triton.jit
    def _sage_attn_fwd_kernel(Q8, QS, K8, KS, VT, VS, VM, O,
                              Lq, Lk, H, Lq_pad, Lk_pad,
                              stride_ob, stride_ol, stride_oh, stride_od,
                              TUNE_LQ, TUNE_LK,
                              HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, KBLK: tl.constexpr,
                              TWO_LEVEL: tl.constexpr, MAGIC: tl.constexpr, EMULATE_FP8: tl.constexpr,
                              USE_TMA: tl.constexpr, PREFETCH: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.static_assert(KBLK % BLOCK_N == 0)
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        bh64 = bh.to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_P)

        if USE_TMA:
            q = Q8.load([bh * Lq_pad + start_m * BLOCK_M, 0])
            k_ptrs = 0
            vt_ptrs = 0
        else:
            q = tl.load(Q8 + (bh64 * Lq_pad + offs_m)[:, None] * HEAD_DIM_P + offs_d[None, :])
            k_ptrs = K8 + (bh64 * Lk_pad + offs_n)[:, None] * HEAD_DIM_P + offs_d[None, :]
            vt_ptrs = VT + (bh64 * HEAD_DIM_P + offs_d)[:, None] * Lk_pad + offs_n[None, :]
        qs = tl.load(QS + bh64 * Lq_pad + offs_m)
        ks_ptr = KS + bh64 * (Lk_pad // KBLK)

        o_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)

        n_full = (Lk // BLOCK_N) * BLOCK_N
        if PREFETCH:
            # the scores of tile j+1 are issued (async wgmma) before the softmax of tile j, so that the tensor
            # cores work while the warps do exp2 (FA3's intra-warpgroup overlap, by program order)
            if n_full > 0:
                k, ks = _sage_load_k(K8, k_ptrs, ks_ptr, bh, Lk_pad, 0, HEAD_DIM_P, KBLK, USE_TMA)
                s = tl.dot(q, tl.trans(k))
                for start_n in range(BLOCK_N, n_full, BLOCK_N):
                    k, ks_next = _sage_load_k(K8, k_ptrs, ks_ptr, bh, Lk_pad, start_n, HEAD_DIM_P, KBLK, USE_TMA)
                    s_next = tl.dot(q, tl.trans(k))
                    vt = _sage_load_v(VT, vt_ptrs, bh, start_n - BLOCK_N, HEAD_DIM_P, USE_TMA)
                    acc, l_i, o_i = _sage_softmax_pv(acc, l_i, o_i, s, qs, ks, vt, start_n - BLOCK_N, Lk,
                                                     BLOCK_N, False, TWO_LEVEL, MAGIC, EMULATE_FP8)
                    s = s_next
                    ks = ks_next
                vt = _sage_load_v(VT, vt_ptrs, bh, n_full - BLOCK_N, HEAD_DIM_P, USE_TMA)
                acc, l_i, o_i = _sage_softmax_pv(acc, l_i, o_i, s, qs, ks, vt, n_full - BLOCK_N, Lk,
                                                 BLOCK_N, False, TWO_LEVEL, MAGIC, EMULATE_FP8)
        else:
            for start_n in range(0, n_full, BLOCK_N):
                k, ks = _sage_load_k(K8, k_ptrs, ks_ptr, bh, Lk_pad, start_n, HEAD_DIM_P, KBLK, USE_TMA)
                vt = _sage_load_v(VT, vt_ptrs, bh, start_n, HEAD_DIM_P, USE_TMA)
                acc, l_i, o_i = _sage_attn_tile(acc, l_i, o_i, q, qs, k, vt, ks, start_n, Lk,
                                                BLOCK_N, False, TWO_LEVEL, MAGIC, EMULATE_FP8)
        if n_full < Lk:  # ragged last tile (its padding is zeros in memory, masked to -inf in S)
            k, ks = _sage_load_k(K8, k_ptrs, ks_ptr, bh, Lk_pad, n_full, HEAD_DIM_P, KBLK, USE_TMA)
            vt = _sage_load_v(VT, vt_ptrs, bh, n_full, HEAD_DIM_P, USE_TMA)
            acc, l_i, o_i = _sage_attn_tile(acc, l_i, o_i, q, qs, k, vt, ks, n_full, Lk,
                                            BLOCK_N, True, TWO_LEVEL, MAGIC, EMULATE_FP8)

        vs = tl.load(VS + bh64 * HEAD_DIM_P + offs_d)
        vm = tl.load(VM + bh64 * HEAD_DIM_P + offs_d)
        out = acc * (1.0 / l_i)[:, None] * vs[None, :] + vm[None, :]
        o_ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ol
                  + offs_d[None, :] * stride_od)
        omask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=omask)

    def _attn_configs():
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)]

    def _prune_attn_configs(configs, named_args, **kwargs):
        dp = kwargs.get("HEAD_DIM_P", named_args.get("HEAD_DIM_P"))
        keep = []
        for cfg in configs:
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            w, s = cfg.num_warps, cfg.num_stages
            if bm == 64 and w == 8:  # 64 rows are one warpgroup's wgmma; 8 warps would split the head dim
                continue
            if bm == 128 and w == 4 and (dp >= 128 or bn == 128):  # too much for one warpgroup: spills (ptxas)
                continue
            if dp <= 64 and s == 2 and bn == 64:  # short loop bodies want deeper pipelines
                continue
            keep.append(cfg)
        return keep or configs[:1]

    def _tma_pre_hook(nargs):
        if not nargs.get("USE_TMA"):
            return
        bm, bn, dp = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM_P"]
        nargs["Q8"].block_shape = [bm, dp]
        nargs["K8"].block_shape = [bn, dp]
        nargs["VT"].block_shape = [dp, bn]

    _sage_attn_fwd_tuned = triton.autotune(
        configs=[triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_tma_pre_hook)
                 for c in _attn_configs()],
        key=["HEAD_DIM_P", "TUNE_LQ", "TUNE_LK", "TWO_LEVEL", "MAGIC", "USE_TMA", "PREFETCH"],
        prune_configs_by={"early_config_prune": _prune_attn_configs},
    )(_sage_attn_fwd_kernel)


def _require_triton():
    if _TRITON_IMPORT_ERROR is not None:
        raise UserError(f"attention backend 'sage_attn' needs the 'triton' package, which could not be imported "
                        f"({_TRITON_IMPORT_ERROR}); install triton or use torch_sdpa")


def _launch_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullCtx()


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sage_quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_per_token: bool = True,
                  pv_dtype: torch.dtype = torch.float8_e4m3fn) -> SageQuantized:
    """The pre-processing on Triton kernels (3 launches + a few tiny reductions). Reads q/k/v in place."""
    _require_triton()
    _check_inputs(q, k, v)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    Dp = _padded_head_dim(D)
    Lq_pad, Lk_pad = _round_up(Lq, K_BLOCK), _round_up(Lk, K_BLOCK)
    dev = q.device
    f32 = torch.float32
    emulate = _interpreting()
    with _launch_ctx(q):
        n_chunks = triton.cdiv(Lk, STATS_CHUNK)
        stats = torch.empty(4, B, H, n_chunks, Dp, dtype=f32, device=dev)
        _sage_kv_stats_kernel[(n_chunks, H, B)](
            k, v, stats, Lk, H, n_chunks, *k.stride(), *v.stride(),
            CHUNK=STATS_CHUNK, BLOCK=64, HEAD_DIM=D, HEAD_DIM_P=Dp, num_warps=4)
        k_mean = stats[0].sum(2) / Lk
        v_mean = stats[1].sum(2) / Lk
        v_amax = torch.maximum(stats[2].amax(2) - v_mean, v_mean - stats[3].amin(2))
        v_amax = torch.where(torch.isfinite(v_amax), v_amax, torch.zeros_like(v_amax))  # padded channels
        v_scale, v_inv = _v_scales(v_amax)

        q8 = torch.empty(B, H, Lq_pad, Dp, dtype=torch.int8, device=dev)
        q_scale = torch.empty(B, H, Lq_pad, dtype=f32, device=dev)
        _sage_quant_q_kernel[(Lq_pad // Q_BLOCK, H, B)](
            q, q8, q_scale, Lq, Lq_pad, H, D ** -0.5 * LOG2E, *q.stride(),
            BLOCK=Q_BLOCK, HEAD_DIM=D, HEAD_DIM_P=Dp, PER_TOKEN=q_per_token, num_warps=8)

        k8 = torch.empty(B, H, Lk_pad, Dp, dtype=torch.int8, device=dev)
        k_scale = torch.empty(B, H, Lk_pad // K_BLOCK, dtype=f32, device=dev)
        vt = torch.empty(B, H, Dp, Lk_pad, dtype=pv_dtype, device=dev)
        _sage_quant_kv_kernel[(Lk_pad // K_BLOCK, H, B)](
            k, v, k_mean, v_mean, v_inv, k8, k_scale, vt, Lk, Lk_pad, H, *k.stride(), *v.stride(),
            BLOCK=K_BLOCK, HEAD_DIM=D, HEAD_DIM_P=Dp, EMULATE_FP8=emulate and pv_dtype == torch.float8_e4m3fn,
            num_warps=8)
    return SageQuantized(q8, q_scale, k8, k_scale, vt, v_scale, v_mean, k_mean, Lq, Lk, D)


def _tune_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def sage_attention_quantized(qz: SageQuantized, *, out_dtype: torch.dtype = torch.bfloat16,
                             config: dict | None = None, two_level: bool = True, magic_i2f: bool = True,
                             use_tma: bool = False, prefetch: bool = False) -> torch.Tensor:
    """The attention kernel on quantized operands -> [B, Lq, H, D] in ``out_dtype``.

    ``config``: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` to skip autotuning (tests, interpreter)."""
    _require_triton()
    B, H, Lq, Lk, D = qz.shape
    Dp = qz.q8.shape[-1]
    Lq_pad, Lk_pad = qz.q8.shape[2], qz.k8.shape[2]
    out = torch.empty(B, Lq, H, D, dtype=out_dtype, device=qz.q8.device)
    q_arg, k_arg, v_arg = qz.q8, qz.k8, qz.vt
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        bm, bn = (config["BLOCK_M"], config["BLOCK_N"]) if config else (128, 128)  # autotune re-sets them
        q_arg = TensorDescriptor.from_tensor(qz.q8.view(B * H * Lq_pad, Dp), [bm, Dp])
        k_arg = TensorDescriptor.from_tensor(qz.k8.view(B * H * Lk_pad, Dp), [bn, Dp])
        v_arg = TensorDescriptor.from_tensor(qz.vt.view(B * H * Dp, Lk_pad), [Dp, bn])
    args = (q_arg, qz.q_scale, k_arg, qz.k_scale, v_arg, qz.v_scale, qz.v_mean, out,
            Lq, Lk, H, Lq_pad, Lk_pad, *out.stride(), _tune_bucket(Lq), _tune_bucket(Lk))
    meta = dict(HEAD_DIM=D, HEAD_DIM_P=Dp, KBLK=K_BLOCK, TWO_LEVEL=two_level, MAGIC=magic_i2f,
                EMULATE_FP8=_interpreting(), USE_TMA=use_tma, PREFETCH=prefetch)
    with _launch_ctx(out):
        if config is not None:
            bm, bn = config["BLOCK_M"], config["BLOCK_N"]
            grid = (triton.cdiv(Lq, bm), B * H)
            _sage_attn_fwd_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
        else:
            def grid(meta_):
                return (triton.cdiv(Lq, meta_["BLOCK_M"]), B * H)

            _sage_attn_fwd_tuned[grid](*args, **meta)
    return out


def _has_tma(t: torch.Tensor) -> bool:
    """Hopper or newer (TMA): the default path there is TMA loads without prefetch (see ``sage_attention``)."""
    if _interpreting() or not t.is_cuda:
        return False
    return torch.cuda.get_device_capability(t.device) >= (9, 0)


@torch.compiler.disable  # Triton launches with autotuning and TMA descriptors: an opaque call under torch.compile
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, config: dict | None = None,
                   pv_fp8: bool = True, two_level: bool = True, magic_i2f: bool = True,
                   use_tma: bool | None = None, prefetch: bool | None = None,
                   q_per_token: bool = True) -> torch.Tensor:
    """``sage_attn``: q ``[B, Lq, H, D]``, k/v ``[B, Lk, H, D]`` -> ``[B, Lq, H, D]`` in q's dtype.

    Knobs for benchmarking (defaults are the tested, accurate path): ``pv_fp8=False`` keeps P.V in fp16;
    ``two_level=False`` lets the FP8 MMA accumulate straight into the running accumulator; ``magic_i2f=False``
    converts the INT32 scores with I2F; ``use_tma`` loads tiles through TMA descriptors; ``prefetch`` issues the
    scores of the next tile before the softmax of this one. Defaults: on sm_90+ TMA without prefetch (H100, [1, 40,
    32760, 128]: 26.7-27.9 ms, 1.34-1.37x cuDNN, at 64x128 tiles with 4 warps: 166 registers, so three programs share
    an SM and one's softmax overlaps another's MMAs), elsewhere prefetch without TMA (the previous default: 28.4-28.6
    ms, 1.28-1.31x on H100); env ``LIGHTX2V_SAGE_TMA`` / ``LIGHTX2V_SAGE_PREFETCH`` (``0``/``1``) override them. ``config`` fixes the
    tile configuration instead of autotuning."""
    if use_tma is None:
        env = os.environ.get("LIGHTX2V_SAGE_TMA")
        use_tma = env == "1" if env is not None else _has_tma(q)
    if prefetch is None:
        env = os.environ.get("LIGHTX2V_SAGE_PREFETCH")
        prefetch = env == "1" if env is not None else not use_tma
    qz = sage_quantize(q, k, v, q_per_token=q_per_token,
                       pv_dtype=torch.float8_e4m3fn if pv_fp8 else torch.float16)
    return sage_attention_quantized(qz, out_dtype=q.dtype, config=config, two_level=two_level,
                                    magic_i2f=magic_i2f, use_tma=use_tma, prefetch=prefetch)


def tuned_config() -> str | None:
    """The config the autotuner picked last (for benchmark printouts)."""
    if triton is None:
        return None
    best = getattr(_sage_attn_fwd_tuned, "best_config", None)
    return None if best is None else str(best)
