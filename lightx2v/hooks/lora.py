"""LoRA for the Wan DiT: read LoRA files in the usual layouts, merge them into the weights or run them beside
the weights, switch them between requests, take them off again.

    handle = apply_lora(model, LoRAConfig((LoRASpec("distill.safetensors", 1.0),), mode="dynamic"))
    handle.switch_lora(LoRAConfig((LoRASpec("style.safetensors", 0.8),), mode="dynamic"))
    handle.remove()

Key layouts, told apart by the shape of each key and mapped onto the model's own parameter names:

* kohya / ComfyUI / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``. The underscored module path is looked up among the model's real module names (dots turned into
  underscores), never re-dotted by guessing; underscored diffusers names (``lora_transformer_blocks_0_attn1_to_q``)
  are looked up the same way through the declared rename table of ``checkpoint.py``.
* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (optional ``.alpha``,
  ``lora_B.bias``), also without the ``transformer.`` prefix or with PEFT's ``base_model.model.``; diffusers
  module names go through the model's declared rename table (its hook plan's ``foreign_to_ours``). A diffusers-written safetensors file may carry its PEFT
  ``LoraConfig`` in the header (``lora_adapter_metadata``): its ``lora_alpha`` / ``alpha_pattern`` /
  ``use_rslora`` set the scale of modules that have no ``.alpha`` tensor.
* original Wan names (LightX2V's and Wan trainers' LoRAs): ``diffusion_model.blocks.0.self_attn.q.lora_A.weight``
  + ``lora_B.weight`` or ``lora_down`` / ``lora_up``, optional ``.alpha``; ``model.diffusion_model.`` or no prefix.
* full deltas (LightX2V's distill LoRAs): ``<module>.diff`` is added to ``<module>.weight``, ``<module>.diff_b``
  to ``<module>.bias`` and ``<module>.diff_m`` to ``<module>.modulation`` (``blocks.0.diff_m`` ->
  ``blocks.0.modulation``), as LightX2V's ``lora_loader.py`` and ComfyUI's ``comfy/lora.py`` do.

Scale (kohya / ComfyUI / LightX2V convention): ``W += strength * alpha / rank * up @ down`` with ``rank =
down.shape[0]``; without alpha the scale is ``strength``; full deltas are scaled by ``strength`` only; a PEFT
``lora_B.bias`` is scaled like its pair (PEFT adds ``lora_B(lora_A(x)) * scaling``, bias included).

Strict: every key of a file must land on a parameter of the model, with the right shape, or the whole file is
rejected with one :class:`CheckpointError` listing the keys that do not fit.

Modes:

* ``merge``: deltas are computed in float32 and added to the weights in place (several LoRAs summed first, one
  rounding to the weight's dtype). A weight quantized per output channel (int8 / fp8 ``weight`` beside a float
  ``weight_scale``) is dequantized, patched and requantized. Merging cannot be undone: use ``dynamic`` to switch.
* ``dynamic``: base weights stay as they are. Each patched Linear gets a forward hook that adds
  ``(x @ A^T) @ B^T`` (all LoRAs of that layer stacked along the rank, strengths and alpha/rank folded into ``B``;
  ``B @ A`` is never formed). Full deltas, and low-rank deltas of non-Linear layers (the Conv3d patch
  embedding), are applied copy-on-apply: a patched copy replaces the tensor and the original is put back by
  :meth:`LoRAHandle.switch_lora` / :meth:`LoRAHandle.remove`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.plan import plan_of
from lightx2v.ops.quant import dequantize_weight, is_quantized_dtype, quantize_weight
from lightx2v.validate import is_number

logger = logging.getLogger(__name__)

MODES = ("merge", "dynamic")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# --- configuration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRASpec:
    """One LoRA file and the strength it is applied with."""

    path: str
    strength: float = 1.0
    # which of a model's DiTs it is for (Wan2.2 A14B: "high_noise_model" / "low_noise_model"; the model family checks
    # the names); None: every DiT
    name: str | None = None

    def __post_init__(self):
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise UserError(f"LoRA name {self.name!r} must be a non-empty string (the DiT it is for)")
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise UserError(f"LoRA path must be a non-empty string, got {self.path!r}")
        object.__setattr__(self, "path", str(self.path))
        s = self.strength
        if not is_number(s):
            raise UserError(f"LoRA strength must be a finite number, got {s!r} for {self.path}")
        object.__setattr__(self, "strength", float(s))


@dataclass(frozen=True)
class LoRAConfig:
    """The set of LoRAs to put on a model and how (``merge`` into the weights, or ``dynamic`` beside them)."""

    loras: tuple[LoRASpec, ...] = ()
    mode: Literal["merge", "dynamic"] = "merge"

    def __post_init__(self):
        loras = tuple(self.loras)
        for spec in loras:
            if not isinstance(spec, LoRASpec):
                raise UserError(f"LoRAConfig.loras takes LoRASpec entries, got {spec!r}")
        object.__setattr__(self, "loras", loras)
        if self.mode not in MODES:
            raise UserError(f"LoRA mode {self.mode!r} is not one of {', '.join(MODES)}")

    _ENTRY_KEYS = ("path", "strength", "name")

    @classmethod
    def from_lightx2v(cls, lora_configs: list[dict], mode: str = "merge", names: tuple[str, ...] | None = None
                      ) -> "LoRAConfig":
        """From LightX2V's ``"lora_configs": [{"path": ..., "strength": ...}, ...]`` (strength defaults to 1).
        ``names``: the DiT names an entry's ``"name"`` may take (a model family's experts); None: not checked here."""
        if isinstance(lora_configs, dict) or not isinstance(lora_configs, (list, tuple)):
            raise UserError(f"lora_configs must be a list of {{\"path\", \"strength\"}} objects, got {lora_configs!r}")
        specs = []
        for i, entry in enumerate(lora_configs):
            if not isinstance(entry, dict):
                raise UserError(f"lora_configs[{i}] must be an object with \"path\" and \"strength\", got {entry!r}")
            unknown = sorted(set(entry) - set(cls._ENTRY_KEYS))
            if unknown:
                raise UserError(f"lora_configs[{i}] has unknown keys {unknown}; allowed: {list(cls._ENTRY_KEYS)}")
            if "path" not in entry:
                raise UserError(f"lora_configs[{i}] has no \"path\"")
            path = entry["path"]
            if not isinstance(path, str) or not path:
                raise UserError(f"lora_configs[{i}].path must be a non-empty string, got {path!r}")
            if not Path(path).is_file():
                what = "is not a file" if Path(path).exists() else "does not exist"
                raise UserError(f"lora_configs[{i}]: LoRA file {path!r} {what}")
            name = entry.get("name")
            if name is not None and names is not None and name not in names:
                raise UserError(f"lora_configs[{i}].name={name!r} is not one of {', '.join(names) or '(none)'} (the "
                                "DiT it is for)")
            specs.append(LoRASpec(path, entry.get("strength", 1.0), name))
        return cls(tuple(specs), mode)


# --- reading LoRA files ---------------------------------------------------------------------------------------


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a LoRA file (safetensors, or a torch state dict) and the safetensors header metadata."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"LoRA file {str(p)!r} " + ("is not a file" if p.exists() else "does not exist"))
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # corrupt header / truncated file
            raise CheckpointError(f"cannot read LoRA file {str(p)!r}: {e}") from e
    if suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read LoRA file {str(p)!r} as a torch state dict: {e}") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"LoRA file {str(p)!r} holds a {type(obj).__name__}, not a state dict")
        bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
        if bad:
            raise CheckpointError(f"LoRA file {str(p)!r} has entries that are not tensors: {_short(bad)}")
        return dict(obj), {}
    raise UserError(f"LoRA file {str(p)!r}: unsupported extension {suffix!r}; use .safetensors or "
                    + ", ".join(TORCH_SUFFIXES))


# Key suffix -> role. A key is "<module path><suffix>".
_SUFFIX_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
# Prefixes trainers put before the module path (tried only when the bare path does not resolve).
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# Role of a full delta -> the parameter it is added to.
_DELTA_LEAF = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}


@dataclass
class LowRank:
    """``delta = scale * up.flatten(1) @ down.flatten(1)`` reshaped to the weight. Factors keep the file's dtype."""

    down: torch.Tensor  # [rank, in, *kernel]
    up: torch.Tensor    # [out, rank, *1]
    scale: float        # alpha / rank (1 without alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size, device) -> torch.Tensor:
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (self.scale * (up @ down)).reshape(shape)


@dataclass
class LoRAWeights:
    """A LoRA file resolved against a model: everything keyed by the model's parameter names."""

    path: str
    format: str                                                       # detected layout(s), for the log
    low_rank: dict[str, LowRank] = field(default_factory=dict)       # "<module>.weight" -> factors
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)    # parameter -> full delta (file dtype)

    def modules(self) -> set[str]:
        return {name.rpartition(".")[0] for name in (*self.low_rank, *self.deltas)}


class _ModuleNames:
    """Resolves the module path written in a LoRA key to a module name of ``model``."""

    def __init__(self, model: nn.Module):
        self.modules = {name for name, _ in model.named_modules() if name}
        self.tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        plan = plan_of(model)
        self.from_foreign = plan.foreign_to_ours or (lambda key: None)
        self.underscored: dict[str, str] = {}
        self.ambiguous: set[str] = set()
        for name in self.modules:
            self._add_underscored(name.replace(".", "_"), name)
        if plan.ours_to_foreign is not None:  # underscored foreign (diffusers) names, through the model's rename table
            for name in self.tensors:
                if name.endswith(".weight"):
                    foreign = plan.ours_to_foreign(name)
                    if foreign is None:
                        continue
                    alias = foreign[: -len(".weight")].replace(".", "_")
                    if alias not in self.underscored:
                        self._add_underscored(alias, name[: -len(".weight")])

    def _add_underscored(self, alias: str, name: str) -> None:
        other = self.underscored.get(alias)
        if other is not None and other != name:
            self.ambiguous.add(alias)
        self.underscored[alias] = name

    def resolve(self, path: str) -> tuple[str | None, str]:
        """(module name or None, naming: "kohya" | "wan" | "diffusers" | reason it failed)."""
        for prefix in _KOHYA_PREFIXES:
            if path.startswith(prefix):
                flat = path[len(prefix):]
                if flat in self.ambiguous:
                    return None, "ambiguous underscored name"
                module = self.underscored.get(flat)
                return module, "kohya" if module else "no such module"
        candidates = [path]
        stripped = path
        while True:
            for prefix in _DOTTED_PREFIXES:
                if stripped.startswith(prefix):
                    stripped = stripped[len(prefix):]
                    candidates.append(stripped)
                    break
            else:
                break
        for cand in candidates:
            if cand in self.modules:
                return cand, "wan"
        for cand in candidates:
            ours = self.from_foreign(cand + ".weight")
            if ours is not None and ours.endswith(".weight") and ours[: -len(".weight")] in self.modules:
                return ours[: -len(".weight")], "diffusers"
        return None, "no such module"


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIX_ROLES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _peft_alpha(metadata: dict[str, str], path: str):
    """A function module-path -> (alpha or None, rslora) from diffusers' ``lora_adapter_metadata`` header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return lambda module: (None, False)
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"LoRA file {path!r}: unreadable lora_adapter_metadata: {e}") from e
    # Pipeline-level saves prefix every field with the component ("transformer.lora_alpha").
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    if meta.get("use_dora"):
        raise CheckpointError(f"LoRA file {path!r} is a DoRA adapter (use_dora=true), which is not supported")
    alpha = meta.get("lora_alpha")
    pattern = meta.get("alpha_pattern") or {}
    rslora = bool(meta.get("use_rslora", False))

    def lookup(module: str):
        for prefix in ("base_model.model.", "transformer."):
            module = module.removeprefix(prefix)
        for pat, value in pattern.items():  # PEFT matches a pattern against the end of the module name
            if re.match(rf"(.*\.)?({pat})$", module):
                return float(value), rslora
        return (float(alpha) if alpha is not None else None), rslora

    return lookup


def resolve_lora(tensors: dict[str, torch.Tensor], model: nn.Module, *, path: str = "<LoRA>",
                 metadata: dict[str, str] | None = None, names: _ModuleNames | None = None) -> LoRAWeights:
    """Map every tensor of a LoRA state dict onto ``model``'s parameters; raise listing any key that does not fit."""
    names = names or _ModuleNames(model)
    peft_alpha = _peft_alpha(metadata or {}, path)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unsupported: list[str] = []
    duplicates: list[str] = []
    for key, t in tensors.items():
        split = _split_key(key)
        if split is None:
            unsupported.append(key)
            continue
        base, role = split
        group = groups.setdefault(base, {})
        if role in group:  # e.g. both lora_A.weight and lora_down.weight for one module
            duplicates += [group[role][0], key]
            continue
        group[role] = (key, t)

    out = LoRAWeights(path, "")
    formats: set[str] = set()
    unmatched: list[str] = []
    mismatched: list[str] = []
    incomplete: list[str] = []
    for base, group in groups.items():
        module, how = names.resolve(base)
        keys = [k for k, _ in group.values()]
        if module is None:
            unmatched += [f"{k} ({how})" for k in keys]
            continue
        formats.add(how)
        has_pair = "down" in group and "up" in group
        if ("down" in group) != ("up" in group):
            incomplete += keys
            continue
        if "up_bias" in group and not has_pair:
            incomplete.append(group["up_bias"][0])
        scale = 1.0
        if has_pair:
            (down_key, down), (up_key, up) = group["down"], group["up"]
            target_name = f"{module}.weight"
            target = names.tensors.get(target_name)
            rank = down.shape[0] if down.ndim else 0
            if target is None or target.ndim < 2:
                unmatched += [f"{down_key} (no matrix weight {target_name})", up_key]
                continue
            want_up = (target.shape[0], rank, *[1] * (target.ndim - 2))
            want_down = (rank, *target.shape[1:])
            if down.ndim != target.ndim or tuple(up.shape) != want_up or tuple(down.shape) != want_down:
                mismatched.append(f"{down_key} {tuple(down.shape)} / {up_key} {tuple(up.shape)} vs "
                                  f"{target_name} {tuple(target.shape)}")
                continue
            if "alpha" in group:
                alpha, rslora = float(group["alpha"][1].float().item()), False
            else:
                alpha, rslora = peft_alpha(base)
            if alpha is not None:
                scale = alpha / (math.sqrt(rank) if rslora else rank)
            if target_name in out.low_rank:  # the same layer under two spellings
                duplicates += [down_key, up_key]
                continue
            out.low_rank[target_name] = LowRank(down, up, scale)
            if "up_bias" in group:
                _add_delta(out, names, module, "bias", group["up_bias"], scale, unmatched, mismatched)
        for role, leaf in _DELTA_LEAF.items():
            if role in group:
                _add_delta(out, names, module, leaf, group[role], 1.0, unmatched, mismatched)

    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} keys match no parameter of the model: {_short(sorted(unmatched))}")
    if mismatched:
        problems.append(f"shape mismatches: {_short(sorted(mismatched))}")
    if incomplete:
        problems.append(f"incomplete LoRA pairs (down without up or the reverse): {_short(sorted(incomplete))}")
    if duplicates:
        problems.append(f"one module given twice under different names: {_short(sorted(set(duplicates)))}")
    if unsupported:
        problems.append(f"keys of an unsupported kind (LoCon/LoHa/LoKr/DoRA/...): {_short(sorted(unsupported))}")
    if problems:
        raise CheckpointError(f"LoRA file {path!r} does not fit the model: " + "; ".join(problems))
    if not out.low_rank and not out.deltas:
        raise CheckpointError(f"LoRA file {path!r} holds no LoRA tensors")
    out.format = "+".join(sorted(formats)) + ("+diff" if out.deltas else "")
    return out


def _add_delta(out: LoRAWeights, names: _ModuleNames, module: str, leaf: str, entry: tuple[str, torch.Tensor],
               scale: float, unmatched: list[str], mismatched: list[str]) -> None:
    key, t = entry
    target_name = f"{module}.{leaf}"
    target = names.tensors.get(target_name)
    if target is None:
        unmatched.append(f"{key} (model has no {target_name})")
        return
    if tuple(t.shape) != tuple(target.shape):
        mismatched.append(f"{key} {tuple(t.shape)} vs {target_name} {tuple(target.shape)}")
        return
    t = t if scale == 1.0 else t.float() * scale
    prev = out.deltas.get(target_name)
    out.deltas[target_name] = t if prev is None else prev.float() + t.float()


def load_lora(spec: LoRASpec | str, model: nn.Module) -> LoRAWeights:
    """Read one LoRA file and resolve it against ``model``."""
    path = spec.path if isinstance(spec, LoRASpec) else str(spec)
    tensors, metadata = read_lora_file(path)
    return resolve_lora(tensors, model, path=path, metadata=metadata)


def _short(items: list[str], n: int = 40) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


# --- quantized weights ----------------------------------------------------------------------------------------

def is_quantized(module: nn.Module, leaf: str) -> bool:
    """True for a ``weight`` stored as int8/fp8 beside a ``weight_scale`` (per output channel or per tensor)."""
    return leaf == "weight" and hasattr(module, "weight_scale") and is_quantized_dtype(getattr(module, leaf).dtype)


def _patched_tensors(module: nn.Module, leaf: str, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """New values for ``module.<leaf>`` (and ``weight_scale`` for a quantized weight) with ``delta`` added."""
    t = getattr(module, leaf)
    if is_quantized(module, leaf):
        old_scale = module.weight_scale
        w = dequantize_weight(t, old_scale) + delta.to(t.device)
        q, scale = quantize_weight(w, t.dtype, per_tensor=old_scale.numel() == 1 and t.shape[0] > 1)
        return {leaf: q, "weight_scale": scale.reshape(old_scale.shape).to(old_scale.dtype)}
    return {leaf: (t.float() + delta.to(t.device)).to(t.dtype)}


def _assign(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    """Point ``module.<leaf>`` at ``value`` (a Parameter keeps its identity; only its data changes)."""
    if leaf in module._parameters and module._parameters[leaf] is not None:
        module._parameters[leaf].data = value
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        setattr(module, leaf, value)


# --- applying -------------------------------------------------------------------------------------------------


class _LowRankHook:
    """Forward hook on a Linear: ``y + (x @ down^T) @ up^T``. ``down``: [R, in], ``up``: [out, R] with every
    LoRA's strength * alpha / rank folded in, stored in the layer's dtype and device; an input of another dtype or
    device gets a cast per call (the stored factors are never overwritten, so no rounding accumulates)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        down, up = self.down, self.up
        if down.dtype != x.dtype or down.device != x.device:
            down, up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
        return output + F.linear(F.linear(x, down), up).to(output.dtype)


def _is_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    duck_linear = hasattr(module, "in_features") and hasattr(module, "out_features")  # quantized Linear classes
    return isinstance(module, nn.Linear) or (isinstance(w, torch.Tensor) and w.ndim == 2 and duck_linear)


def _factor_dtype(module: nn.Module) -> torch.dtype:
    for t in (getattr(module, "weight", None), getattr(module, "bias", None)):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return t.dtype
    return torch.float32


@dataclass(frozen=True)
class AppliedLoRA:
    path: str
    format: str
    strength: float
    modules: int  # modules whose parameters or output this LoRA changes


class LoRAHandle:
    """What :func:`apply_lora` did to a model; ``switch_lora`` / ``remove`` in dynamic mode."""

    def __init__(self, model: nn.Module, config: LoRAConfig):
        self.model = model
        self.config = config
        self.applied: tuple[AppliedLoRA, ...] = ()
        self._hooks: list = []
        self._saved: list[tuple[nn.Module, str, torch.Tensor]] = []  # originals replaced copy-on-apply

    @property
    def patched(self) -> dict[str, int]:
        """LoRA path -> number of modules it patched."""
        return {a.path: a.modules for a in self.applied}

    @property
    def mode(self) -> str:
        return self.config.mode

    def switch_lora(self, config: LoRAConfig) -> "LoRAHandle":
        """Replace the active LoRAs by ``config``'s without touching the base weights (dynamic mode only).

        The new files are read and checked first: if one does not fit, the current LoRAs stay active."""
        if self.config.mode != "dynamic" or config.mode != "dynamic":
            raise UserError("switch_lora needs mode='dynamic' for both the current and the new LoRAConfig "
                            "(merged LoRAs are baked into the weights)")
        loaded = _load_all(self.model, config)
        self._restore()
        self.config = config
        self._apply(loaded)
        return self

    def remove(self) -> None:
        """Take the LoRAs off: the hooks go and every replaced tensor is put back (dynamic mode only)."""
        if self.config.mode != "dynamic":
            raise UserError("LoRAs merged with mode='merge' cannot be removed; use mode='dynamic' to switch LoRAs")
        self._restore()
        self.config = LoRAConfig((), "dynamic")
        self.applied = ()

    # -- internals ---------------------------------------------------------------------------------------------

    def _restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for module, leaf, original in reversed(self._saved):
            _assign(module, leaf, original)
        self._saved = []

    @torch.no_grad()
    def _apply(self, loaded: list[tuple[LoRAWeights, float]]) -> None:
        dynamic = self.config.mode == "dynamic"
        modules = dict(self.model.named_modules())
        full: dict[str, list[tuple[object, float]]] = {}  # param -> [(LowRank | delta tensor, strength)]
        hooked: dict[str, list[tuple[LowRank, float]]] = {}  # Linear module -> [(factors, strength)]
        for lw, strength in loaded:
            for name, lr in lw.low_rank.items():
                owner = name.rpartition(".")[0]
                if dynamic and _is_linear(modules[owner]):
                    hooked.setdefault(owner, []).append((lr, strength))
                else:
                    full.setdefault(name, []).append((lr, strength))
            for name, d in lw.deltas.items():
                full.setdefault(name, []).append((d, strength))

        for name, parts in full.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = modules[owner_name] if owner_name else self.model
            target = getattr(owner, leaf)
            delta = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
            for part, strength in parts:
                if isinstance(part, LowRank):
                    delta += strength * part.delta(target.shape, target.device)
                else:
                    delta += strength * part.to(device=target.device, dtype=torch.float32)
            new = _patched_tensors(owner, leaf, delta)
            for attr, value in new.items():
                if dynamic:  # copy-on-apply: keep the original tensor to put back
                    current = owner._parameters.get(attr)
                    self._saved.append((owner, attr, current.data if current is not None else getattr(owner, attr)))
                    _assign(owner, attr, value)
                else:
                    getattr(owner, attr).copy_(value)
            del delta, new

        for owner_name, parts in hooked.items():
            owner = modules[owner_name]
            device, dtype = owner.weight.device, _factor_dtype(owner)
            down = torch.cat([lr.down.to(device, torch.float32) for lr, _ in parts], dim=0)
            up = torch.cat([lr.up.to(device, torch.float32) * (s * lr.scale) for lr, s in parts], dim=1)
            self._hooks.append(owner.register_forward_hook(_LowRankHook(down.to(dtype), up.to(dtype))))

        self.applied = tuple(AppliedLoRA(lw.path, lw.format, s, len(lw.modules())) for lw, s in loaded)
        if self.applied:
            logger.info("LoRA (%s): %s", self.config.mode, "; ".join(
                f"{Path(a.path).name} [{a.format}] strength {a.strength:g}: {a.modules} modules" for a in self.applied))


def _load_all(model: nn.Module, config: LoRAConfig) -> list[tuple[LoRAWeights, float]]:
    names = _ModuleNames(model)
    out = []
    for spec in config.loras:
        tensors, metadata = read_lora_file(spec.path)
        out.append((resolve_lora(tensors, model, path=spec.path, metadata=metadata, names=names), spec.strength))
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> LoRAHandle:
    """Put ``cfg``'s LoRAs on ``model`` (merged into the weights, or dynamic beside them) and return the handle.

    Every file is read and checked against the model before anything is changed."""
    if not isinstance(cfg, LoRAConfig):
        raise UserError(f"apply_lora takes a LoRAConfig, got {type(cfg).__name__}")
    loaded = _load_all(model, cfg)
    handle = LoRAHandle(model, cfg)
    handle._apply(loaded)
    return handle

