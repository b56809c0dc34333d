"""The hook point of a model's transformer block stack.

A DiT runs its blocks through one :class:`BlockStack` (``tokens = self.block_stack(tokens, args)``) instead of a
loop of its own. Runtime features that act on the stack as a whole attach here from outside, without replacing any
method of the model: feature caching (skip the stack, reuse a residual), sequence parallelism (split the tokens
at the stack's input, gather them at its output), or a test that runs only the first block.

A hook is a callable ``hook(inner, tokens, args, start, stop) -> tokens``: it receives the next inner callable
``inner(tokens, args, start=0, stop=None)`` (the next hook, or the plain loop over ``blocks[start:stop]``) and decides
how to call it: once, not at all, or several times over sub-ranges of blocks (first-block caching runs block 0,
then blocks 1..N-1). Hooks are ordered by ``order``: a larger order sits further outside. Conventions:
``ORDER_PARALLEL`` (innermost: the blocks see the local shard of the tokens) < ``ORDER_CACHE`` (caching decides on
whole sequences, the same on every rank).

``args`` is the model's own object of per-forward block inputs (a NamedTuple); hooks that measure something read
the attributes the model documents for them (Wan: ``modulation``, ``temb``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

ORDER_PARALLEL = 0
ORDER_CACHE = 100

Inner = Callable[..., torch.Tensor]


class BlockStack:
    """``blocks``: the model's nn.ModuleList (not owned: the model registers it); ``call_block(block, tokens, args)``
    runs one block."""

    def __init__(self, blocks: nn.ModuleList, call_block: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]):
        self.blocks = blocks
        self.call_block = call_block
        self._hooks: list[tuple[int, Callable]] = []  # sorted by order, innermost first

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def hooks(self) -> tuple[Callable, ...]:
        """The attached hooks, innermost first."""
        return tuple(h for _, h in self._hooks)

    def add_hook(self, hook: Callable, *, order: int) -> None:
        if any(h is hook for _, h in self._hooks):
            raise RuntimeError(f"{hook!r} is already attached to this block stack")
        self._hooks.append((order, hook))
        self._hooks.sort(key=lambda oh: oh[0])

    def remove_hook(self, hook: Callable) -> None:
        """Detach ``hook``; removing one that is not attached is harmless."""
        self._hooks = [(o, h) for o, h in self._hooks if h is not hook]

    def run(self, tokens: torch.Tensor, args: Any, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The plain loop over ``blocks[start:stop]`` (no hooks)."""
        for block in self.blocks[start:stop]:
            tokens = self.call_block(block, tokens, args)
        return tokens

    def __call__(self, tokens: torch.Tensor, args: Any) -> torch.Tensor:
        return self._inner(len(self._hooks))(tokens, args)

    def _inner(self, level: int) -> Inner:
        """The callable that runs hooks[:level] around the plain loop (level 0: the plain loop)."""
        if level == 0:
            return self.run
        hook = self._hooks[level - 1][1]
        inner = self._inner(level - 1)
        return lambda tokens, args, start=0, stop=None: hook(inner, tokens, args, start, stop)
