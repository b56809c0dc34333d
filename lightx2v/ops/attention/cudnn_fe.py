"""cuDNN's fused attention through ``nvidia-cudnn-frontend`` (``import cudnn``): bf16/fp16 and FP8.

The frontend builds one execution graph per problem (shapes, strides, dtype); it is cached on the backend object,
so only the first call at a new shape pays for the build (about a second). q/k/v ``[B, L, H, D]`` are handed to
cuDNN as ``[B, H, L, D]`` views with their strides (no copies); the output is written as ``[B, L, H, D]``.

* ``cudnn_sdpa``: ``pygraph.sdpa`` in the input dtype, float32 softmax, no mask, scale 1/sqrt(D).
* ``cudnn_sdpa_fp8``: ``pygraph.sdpa_fp8``: q, k, v in e4m3 with one scale per tensor (the granularity the FP8
  graph takes), K smoothed first (exact for softmax); P quantized by cuDNN with ``scale_s = 256`` (P in [0, 1]
  -> [0, 256], inside e4m3's 448; a power of two, as in our sage_attn); output bf16 where this cuDNN offers it,
  else fp16 (cast back). Hopper or newer.
"""

from __future__ import annotations

import importlib.util
import math
import threading

import torch

P_SCALE = 256.0


def cudnn_frontend_available() -> bool:
    try:
        return importlib.util.find_spec("cudnn") is not None
    except (ImportError, ValueError):
        return False


class CudnnSdpa:
    """Callable backend ``(q, k, v) -> out``; ``fp8=True`` for the FP8 graph."""

    def __init__(self, fp8: bool = False, smooth_k: bool = True):
        self.fp8 = fp8
        self.smooth_k = smooth_k
        self._graphs: dict = {}
        self._handles: dict = {}
        self._lock = threading.Lock()
        self.last_plan: str | None = None  # what the last build chose (benchmark printouts)

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _handle(self, device: torch.device):
        import cudnn

        index = device.index if device.index is not None else torch.cuda.current_device()
        h = self._handles.get(index)
        if h is None:
            with torch.cuda.device(index):
                h = cudnn.create_handle()
            self._handles[index] = h
        cudnn.set_stream(h, torch.cuda.current_stream(index).cuda_stream)
        return h

    @staticmethod
    def _cudnn_type(dtype: torch.dtype):
        import cudnn

        return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF,
                torch.float8_e4m3fn: cudnn.data_type.FP8_E4M3, torch.float32: cudnn.data_type.FLOAT}[dtype]

    def _build(self, handle, qt, kt, vt, out_dtype: torch.dtype):
        """One graph for [B, H, L, D] views qt/kt/vt; returns (graph, tensors, workspace, out_dtype)."""
        import cudnn

        io = self._cudnn_type(qt.dtype)
        f32 = cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        t = {name: g.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=io)
             for name, x in (("q", qt), ("k", kt), ("v", vt))}
        scale = 1.0 / math.sqrt(qt.shape[-1])
        B, H, Lq, _ = qt.shape
        Dv = vt.shape[-1]
        o_dim, o_stride = [B, H, Lq, Dv], [Lq * H * Dv, Dv, H * Dv, 1]  # [B, Lq, H, Dv] memory
        if self.fp8:
            for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
                t[name] = g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
            o, _, amax_s, amax_o = g.sdpa_fp8(
                q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
                descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                generate_stats=False, attn_scale=scale, use_causal_mask=False, name="sdpa_fp8")
            for name, a in (("amax_s", amax_s), ("amax_o", amax_o)):
                a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
                t[name] = a
        else:
            o, _ = g.sdpa(q=t["q"], k=t["k"], v=t["v"], generate_stats=False, attn_scale=scale,
                          use_causal_mask=False, name="sdpa")
        o.set_output(True).set_dim(o_dim).set_stride(o_stride).set_data_type(self._cudnn_type(out_dtype))
        t["o"] = o
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        ws = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=qt.device)
        try:
            self.last_plan = str(g.get_plan_name_at_index(0))
        except Exception:  # pragma: no cover - depends on the frontend version
            self.last_plan = None
        return g, t, ws, out_dtype

    def _graph_for(self, handle, qt, kt, vt, want: torch.dtype):
        key = (qt.device, qt.dtype, want, tuple(qt.shape), tuple(kt.shape), tuple(vt.shape), qt.stride(),
               kt.stride(), vt.stride())
        entry = self._graphs.get(key)
        if entry is not None:
            return entry
        with self._lock:
            errors = []
            # FP8: bf16 output where supported, else fp16 (cast back by the caller)
            for out_dtype in ((want, torch.float16) if self.fp8 and want != torch.float16 else (want,)):
                try:
                    entry = self._build(handle, qt, kt, vt, out_dtype)
                    break
                except Exception as e:  # noqa: BLE001 - cudnnGraphNotSupportedError, or a validate() RuntimeError
                    errors.append(f"output {str(out_dtype).removeprefix('torch.')}: {type(e).__name__}: {e}")
            if entry is None:
                raise RuntimeError(f"cuDNN has no {'FP8 ' if self.fp8 else ''}SDPA plan for q {tuple(qt.shape)} "
                                   f"{qt.dtype}: " + "; ".join(errors))
            self._graphs[key] = entry
        return entry

    # -- the call ----------------------------------------------------------------------------------------------
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype."""
        from lightx2v.ops.attention._opaque import opaque

        return opaque(self._forward, q, k, v)  # graph building and execution: opaque under torch.compile

    def _forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return self._execute(q, k, v, q.dtype, {})
        from lightx2v.ops.attention.fp8 import quantize_fp8

        qz = quantize_fp8(q, per_head=False, smooth=False)
        kz = quantize_fp8(k, per_head=False, smooth=self.smooth_k)
        vz = quantize_fp8(v, per_head=False, smooth=False)
        return self.run_quantized(qz, kz, vz, out_dtype=q.dtype)

    def run_quantized(self, qz, kz, vz, out_dtype: torch.dtype) -> torch.Tensor:
        """The FP8 graph on operands already quantized per tensor (:func:`~lightx2v.ops.attention.fp8.quantize_fp8`
        with ``per_head=False``); the mean of a smoothed V is added back."""
        one = torch.ones(1, dtype=torch.float32, device=qz.x8.device)
        extra = {"descale_q": qz.scale, "descale_k": kz.scale, "descale_v": vz.scale,
                 "descale_s": one / P_SCALE, "scale_s": one * P_SCALE, "scale_o": one}
        out = self._execute(qz.x8, kz.x8, vz.x8, out_dtype, extra)
        return out if vz.mean is None else out + vz.mean.to(out.dtype)

    def _execute(self, q, k, v, want: torch.dtype, extra: dict) -> torch.Tensor:
        handle = self._handle(q.device)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        g, t, ws, out_dtype = self._graph_for(handle, qt, kt, vt, want)
        B, Lq, H, _ = q.shape
        out = torch.empty(B, Lq, H, v.shape[-1], dtype=out_dtype, device=q.device)
        pack = {t["q"]: qt, t["k"]: kt, t["v"]: vt, t["o"]: out.transpose(1, 2)}  # [B, H, Lq, D] view
        for name, val in extra.items():
            pack[t[name]] = val.reshape(1, 1, 1, 1).contiguous()
        if self.fp8:
            for name in ("amax_s", "amax_o"):
                pack[t[name]] = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        g.execute(pack, ws, handle=handle)
        return out if out.dtype == want else out.to(want)
