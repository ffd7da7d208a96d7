"""kvtriton's Triton kernels as operators of the dispatcher, registered directly (vLLM's direct_register_custom_op).

torch.compile must see each kernel's launch as one opaque call with a known output shape (the runner compiles a
layer's work around attention over symbolic row counts), so every kernel entry point is an operator with a fake
implementation. `torch.library.custom_op` makes one, but wraps every call in Python: its autograd wrapper, the
redispatch, an aliasing check of the outputs. On the 2-core VM a call cost 7.3 us that way against 1.6 us for the
same function defined and implemented on a `torch.library.Library` (stop 64, a no-op of the decode matmul's
signature). Inside a CUDA graph neither is paid; an eager step (a prefill past the graphs' token buckets) pays it
for every projection of every layer, 64-96 calls a step for a 16-layer model, on a host that the step waits for.

The schema comes from the function's annotations (`torch.library.infer_schema`), as `custom_op` takes it. The
implementation serves every device (CompositeExplicitAutograd): the kernels run on CUDA, and on the CPU under
Triton's interpreter for the tests. No autograd formula: the engine never differentiates through them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("kvtriton", "FRAGMENT")  # held for the process: the registrations live with it


def direct_op(fn: Callable) -> torch._ops.OpOverload:
    """Register fn as torch.ops.kvtriton.<its name> (its outputs new tensors, no input mutated) and return the
    operator, called as fn was. Give it a fake with `@torch.library.register_fake(op)`."""
    name = fn.__name__
    _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
    _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.kvtriton, name).default
