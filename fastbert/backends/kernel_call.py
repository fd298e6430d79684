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


# Inference GEMMs on few rows (batch-1 classification: ~27 packed rows, 1 for the <cls>
# query) run faster on ATen's addmm (MKL) than through oneDNN's pointwise linear, whose
# per-call cost dominates there: measured on an AVX2 EPYC, 1-2 threads, fp32, [M, 256] x
# [256, 256..768]: M = 1: 10-27 us vs 31-45 us (and the cpp op adds its own checks, ~30 us
# more); M = 32: 39-122 vs 62-126 us; M = 128: equal.  So the cpp linear/ffn glue runs fp32
# forward-only calls of at most SMALL_GEMM_ROWS rows on F.linear (the reference's own
# arithmetic); training (grad on), bf16 and bigger batches keep the oneDNN kernels.
SMALL_GEMM_ROWS = 128


def small_gemm(x: torch.Tensor) -> bool:
    """True when ``x``'s GEMM should run on F.linear (see SMALL_GEMM_ROWS)."""
    # Compiling first: under torch.compile the row count may be unbacked (packed tokens).
    return (not torch.compiler.is_compiling() and x.dtype == torch.float32
            and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.numel() <= SMALL_GEMM_ROWS * x.shape[-1])
