"""Quantized linear layers: FP8 (E4M3) and INT8 weights with per-output-channel scales, activations quantized
per token at run time.

Weight format and GEMM kernel are separate choices: the format is what ``dit_quant_scheme`` names (``fp8`` or
``int8``; LightX2V's kernel-flavoured names such as ``fp8-sgl`` or ``int8-vllm`` are accepted as aliases of the
format), the kernel is picked from what the device can run: ``torch._scaled_mm`` (FP8, rowwise scales; Hopper/Ada),
the Triton INT8 GEMM of :mod:`lightx2v.ops.quant.int8_gemm` with the scale epilogue fused (INT8; ``torch._int_mm``
plus an eager epilogue where it cannot run), else a reference path that dequantizes (CPU, tests). Checkpoints use
LightX2V's layout: ``X.weight`` (float8_e4m3fn or int8, [out, in]) + ``X.weight_scale`` (float32, [out, 1]).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v.errors import UserError
from lightx2v.ops.quant import int8_gemm

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
SCHEMES = ("fp8", "int8")
_STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def resolve_scheme(name: str | None) -> str | None:
    """``None``/"none"/"bf16" -> None; ``fp8``, ``fp8-*``, ``int8``, ``int8-*`` -> the format."""
    if name in (None, "", "none", "None", "bf16", "Default"):
        return None
    if not isinstance(name, str):
        raise UserError(f"dit_quant_scheme={name!r} must be a string")
    base = name.split("-", 1)[0].lower()
    if base not in SCHEMES:
        raise UserError(f"dit_quant_scheme={name!r} is not supported; allowed: fp8, int8 (and LightX2V's aliases "
                        "such as fp8-sgl, fp8-vllm, fp8-torchao, fp8-triton, int8-vllm, int8-triton)")
    return base


_QMAX = {torch.int8: INT8_MAX, torch.float8_e4m3fn: FP8_MAX, torch.float8_e5m2: 57344.0}


def quantize_weight(w: torch.Tensor, scheme: str | torch.dtype, per_tensor: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``w`` [out, ...] -> (quantized weight, float32 scale [out, 1]; [1] with ``per_tensor``): symmetric absmax
    scaling per output channel. ``scheme``: "fp8" / "int8" or the storage dtype (int8, float8_e4m3fn, float8_e5m2)."""
    dtype = _STORAGE[scheme] if isinstance(scheme, str) else scheme
    qmax = _QMAX[dtype]
    wf = w.float()
    amax = wf.abs().amax().reshape(1) if per_tensor else wf.abs().flatten(1).amax(dim=1, keepdim=True)
    scale = (amax / qmax).clamp(min=1e-12)
    q = wf / (scale if per_tensor else scale.reshape(-1, *[1] * (w.ndim - 1)))
    q = q.round().clamp(-qmax, qmax).to(dtype) if dtype == torch.int8 else q.clamp(-qmax, qmax).to(dtype)
    return q, scale


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    return dtype in _QMAX


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8/fp8 ``q`` [out, ...] with a per-output-channel ([out], [out, 1]) or per-tensor scale -> float32."""
    scale = scale.float()
    if scale.numel() == 1:
        return q.float() * scale.reshape([1] * q.ndim)
    if scale.numel() == q.shape[0]:
        return q.float() * scale.reshape(-1, *[1] * (q.ndim - 1))
    raise UserError(f"weight_scale of shape {tuple(scale.shape)} is neither per tensor nor per output channel of a "
                    f"weight {tuple(q.shape)}")


def quantize_activation(x2d: torch.Tensor, scheme: str, impl: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (quantized [M, K], float32 per-token scale [M, 1]). On CUDA a one-pass Triton kernel
    (``impl=None``: automatic; "torch" / "triton" force one)."""
    from lightx2v.ops import triton as fused

    if impl == "triton" or (impl is None and x2d.is_cuda and fused.available() and x2d.stride(-1) == 1
                            and x2d.shape[-1] <= 65536 and not torch.compiler.is_compiling()):
        from lightx2v.ops.quant.act_quant import quantize_activation_triton

        return quantize_activation_triton(x2d, scheme)
    xf = x2d.float()
    qmax = FP8_MAX if scheme == "fp8" else INT8_MAX
    scale = (xf.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    q = xf / scale
    q = q.to(torch.float8_e4m3fn) if scheme == "fp8" else q.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _fp8_mm_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored quantized ([out, in] + per-row float32 scale)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=_STORAGE[scheme], device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.kernel = "auto"  # "auto" | "reference"

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: str) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, scheme, device="meta")
        q.weight, q.weight_scale = quantize_weight(lin.weight.data, scheme)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        return q

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, sx = _quantized_input(x, self.scheme)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        bias = None if self.bias is None else self.bias.to(out_dtype)
        if self.kernel == "auto" and self.scheme == "fp8" and _fp8_mm_ok(x.device):
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale.reshape(1, -1),
                                 bias=bias, out_dtype=out_dtype)
        elif (self.kernel == "auto" and self.scheme == "int8" and x.device.type == "cuda"
              and int8_gemm.triton_problem(xq, self.weight) is None):
            # Triton: int32 accumulation and the scale/bias epilogue in one kernel, one [M, N] store
            y = int8_gemm.int8_matmul(xq, sx, self.weight, self.weight_scale, bias, out_dtype, impl="triton")
        elif self.kernel == "auto" and self.scheme == "int8" and x.device.type == "cuda" and xq.shape[0] > 16:
            acc = torch._int_mm(xq, self.weight.t())  # int32 [M, N]
            y = acc.float() * sx * self.weight_scale.reshape(1, -1)
            y = (y + bias.float() if bias is not None else y).to(out_dtype)
        else:  # reference: the same quantized operands, multiplied in float32
            y = F.linear(xq.float() * sx, dequantize_weight(self.weight, self.weight_scale),
                         None if bias is None else bias.float()).to(out_dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


_last_input: tuple = (None, None, None)  # (weakref to the input tensor, scheme, (xq, sx))


def _forget_last_input(_ref=None) -> None:
    global _last_input
    _last_input = (None, None, None)


def _quantized_input(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` per token, reusing the result when the same tensor object is quantized again right after
    (q, k and v projections read the same input: one quantization instead of three). The cached result is dropped
    as soon as ``x`` itself is freed, so it never holds memory beyond its input's lifetime."""
    global _last_input
    ref, last_scheme, result = _last_input
    if ref is not None and ref() is x and last_scheme == scheme:
        return result
    result = quantize_activation(x.reshape(-1, x.shape[-1]), scheme)
    _last_input = (weakref.ref(x, _forget_last_input), scheme, result)
    return result


def quantize_stream(tensors, quantized: set[str], scheme: str, device, what: str):
    """Pass (name, tensor) pairs of a checkpoint through, quantizing the float ``weight`` of each module in
    ``quantized`` (one at a time, on ``device``) and adding its ``weight_scale``; weights already stored in
    ``scheme``'s format pass through (with their ``weight_scale``), anything else as it comes. Every family's loader
    streams its DiT through this when ``dit_quant_scheme`` is set."""
    from lightx2v.errors import CheckpointError

    for name, t in tensors:
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            if t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                q, scale = quantize_weight(t.to(device), scheme)
                yield name, q
                yield f"{module}.weight_scale", scale
                continue
            if t.dtype != _STORAGE[scheme]:
                raise CheckpointError(f"{what}: {name} is stored as {t.dtype}, which does not fit "
                                      f"dit_quant_scheme {scheme!r} ({_STORAGE[scheme]})")
        yield name, t


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers that quantization replaces: those under the model's hook plan's
    ``quantize_prefixes`` (the transformer blocks: attention projections and FFN). Embeddings, norms, the
    time/text/image projections and the head stay in high precision."""
    from lightx2v.models.plan import plan_of

    prefixes = plan_of(model).quantize_prefixes
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefixes)]


def apply_quantization(model: nn.Module, scheme: str) -> nn.Module:
    """Replace the block Linear layers of ``model`` by QuantLinear (quantizing their current weights; on the meta
    device this just builds the quantized structure for loading a pre-quantized checkpoint)."""
    for name in quantizable_linears(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, leaf)
        if lin.weight.is_meta:
            new = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme, device="meta")
        else:
            new = QuantLinear.from_linear(lin, scheme)
        setattr(parent, leaf, new)
    return model
