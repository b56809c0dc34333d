"""``opaque(fn, *args)``: run ``fn`` outside ``torch.compile`` tracing (a graph break; eager inside a compiled block).

Its own module, imported at the first call of a backend that needs it: ``torch.compiler.disable`` imports
torch._dynamo, and with it triton, which importing :mod:`lightx2v.ops.attention` must not do.
"""

import torch


@torch.compiler.disable
def opaque(fn, *args, **kwargs):
    return fn(*args, **kwargs)
