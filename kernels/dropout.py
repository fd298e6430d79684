"""The counter-based dropout every fused Triton kernel uses, and a helper that materializes
its keep mask so tests can apply the very same mask to the reference.

keep(seed, offset) = philox_uniform(seed, offset) >= p, with a 64-bit ``offset`` that names one
element (each kernel documents its own offset formula).  Nothing activation-sized is stored:
a backward regenerates the mask from (seed, offset).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import seed_value


@triton.jit
def dropout_keep(seed, offsets, p):
    """True where an element survives dropout with probability ``p`` (``offsets``: int64)."""
    return tl.rand(seed, offsets) >= p


@triton.jit
def _keep_mask_kernel(seed, OFFS, KEEP, n, p, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    offs = tl.load(OFFS + i, mask=ok, other=0)
    tl.store(KEEP + i, dropout_keep(seed, offs, p).to(tl.int8), mask=ok)


def keep_mask(seed, offsets: torch.Tensor, p: float) -> torch.Tensor:
    """The bool keep mask (shape of ``offsets``, int64) that a kernel with this seed draws."""
    offsets = offsets.to(torch.int64).contiguous()
    keep = torch.empty(offsets.shape, dtype=torch.int8, device=offsets.device)
    n = offsets.numel()
    if n:
        block = 4096
        _keep_mask_kernel[(triton.cdiv(n, block),)](seed_value(seed), offsets, keep, n, float(p),
                                                      BLOCK=block)
    return keep.bool()
