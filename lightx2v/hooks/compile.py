"""Regional compilation: ``torch.compile`` each transformer block rather than the whole model.

All blocks share one structure, so the first compiled block's graph is reused by the others (one compile instead
of forty), and the parts around the blocks (embeddings, head, hooks such as feature caching) stay eager. Inside the blocks the
compiler fuses the elementwise work itself (the hand-written Triton kernels step aside while compiling); an
attention kernel it cannot trace runs as an opaque call (a graph break), so ``fullgraph`` is off by default.
"""

from __future__ import annotations

import torch.nn as nn

from lightx2v.models.plan import blocks_of


def apply_compile(model: nn.Module, *, mode: str | None = None, backend: str = "inductor",
                  fullgraph: bool = False, dynamic: bool | None = None) -> nn.Module:
    """Compile every transformer block (the hook plan's ``blocks``) in place (``nn.Module.compile``)."""
    for block in blocks_of(model):
        block.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return model


def remove_compile(model: nn.Module) -> nn.Module:
    for block in blocks_of(model):
        block._compiled_call_impl = None
    return model


