"""Calling a registered fastbert op's kernel without the autograd layer when there is nothing
for autograd to record.

``torch.library.register_autograd`` puts a Python wrapper in front of each op.  With grad
mode off (inference under ``no_grad``, and inside the ops' own backward functions) the
wrapper only finds that and redispatches, at ~20-40 µs a call: a good part of a small op's
time and of an inference step's (14 op calls in bert.small).  ``call_kernel`` goes straight
to the backend kernel in that case.  With grad mode on (training, ``create_graph=True``
double backward) and while ``torch.compile`` traces, it is a plain call.
"""
from __future__ import annotations

import torch


def call_kernel(op, *args):
    """``op(*args)``, skipping the autograd dispatch layer when grad mode is off."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
