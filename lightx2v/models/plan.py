"""What runtime hooks need to know about a model, declared by the model class as data (``Model.hook_plan``).

The hooks (offload, LoRA, quantization, compile) read this instead of knowing a family's module names: a new
family declares its own plan and every hook works on it. The block stack that caching and sequence parallelism
wrap is the model's :class:`lightx2v.models.block_stack.BlockStack` (``model.block_stack``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class HookPlan:
    blocks: str = "blocks"  # attribute holding the nn.ModuleList of transformer blocks (offload / compile units)
    # offload_granularity "phase": (phase name, submodule names inside one block); empty: phases not supported
    phases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # modules used only before the block stack (block/phase offload streams them through the slots like a block)
    embeddings: tuple[str, ...] = ()
    # Linear layers under these name prefixes are what fp8/int8 quantization replaces (the transformer blocks)
    quantize_prefixes: tuple[str, ...] = ("blocks.",)
    # LoRA files written with another naming (e.g. diffusers'): that parameter name -> ours, or None
    foreign_to_ours: Callable[[str], str | None] | None = None
    # ours -> the other naming (or None), so that underscored kohya names of the other naming resolve too
    ours_to_foreign: Callable[[str], str | None] | None = None


DEFAULT_PLAN = HookPlan()


def plan_of(model: nn.Module) -> HookPlan:
    return getattr(model, "hook_plan", DEFAULT_PLAN)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks the plan names (TypeError when the model has none)."""
    blocks = getattr(model, plan_of(model).blocks, None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no nn.ModuleList {plan_of(model).blocks!r} of transformer blocks")
    return blocks
