"""The MLM position gather ``out[b, p] = X[b, positions[b, p]]`` and its backward.

Reference: fastbert.backends.reference.gather_positions.

The backward scatter-adds, and positions may repeat.  Instead of atomics (whose summation
order varies, and which 16-bit dtypes lack on many GPUs) each program owns a block of
BLOCK_L rows of dX[b] and walks the P positions of row b, adding every gradient row aimed at
one of its rows: each dX element is written once, summed in a fixed order (deterministic),
and untouched rows come out as zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cast, next_pow2


@triton.jit
def _gather_kernel(X, POS, OUT, P, L, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P
    mask = p_ok[:, None] & (offs_c[None, :] < C)
    pos = tl.load(POS + b * P + offs_p, mask=p_ok, other=0).to(tl.int64)
    rows = b.to(tl.int64) * L + pos
    vals = tl.load(X + rows[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    tl.store(OUT + (b.to(tl.int64) * P + offs_p)[:, None] * C + offs_c[None, :], vals, mask=mask)


@triton.jit
def _scatter_add_kernel(DOUT, POS, DX, P, L, C, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    for p in range(0, P):
        pos = tl.load(POS + b * P + p).to(tl.int32)
        g = tl.load(DOUT + (b.to(tl.int64) * P + p) * C + offs_c, mask=c_ok, other=0.0)
        acc += tl.where(offs_l[:, None] == pos, g.to(tl.float32)[None, :], 0.0)
    mask = (offs_l[:, None] < L) & c_ok[None, :]
    tl.store(DX + (b.to(tl.int64) * L + offs_l)[:, None] * C + offs_c[None, :],
             cast(acc, DX.dtype.element_ty), mask=mask)


def forward(X: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, P, C] rows of X[B, L, C] at positions[B, P]."""
    X, positions = X.contiguous(), positions.contiguous()
    B, L, C = X.shape
    P = positions.shape[1]
    out = torch.empty((B, P, C), dtype=X.dtype, device=X.device)
    if out.numel():
        block_c = min(1024, next_pow2(C))
        block_p = max(1, min(64, 8192 // block_c))
        grid = (B, triton.cdiv(P, block_p), triton.cdiv(C, block_c))
        _gather_kernel[grid](X, positions, out, P, L, C, BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def backward(dout: torch.Tensor, positions: torch.Tensor, L: int) -> torch.Tensor:
    """dX[B, L, C]: dout[b, p] summed into row positions[b, p] (repeats add up)."""
    dout, positions = dout.contiguous(), positions.contiguous()
    B, P, C = dout.shape
    dX = torch.empty((B, L, C), dtype=dout.dtype, device=dout.device)
    if dX.numel():
        if P == 0:
            return dX.zero_()
        block_c = min(256, next_pow2(C))
        block_l = max(1, min(64, next_pow2(L), 8192 // block_c))
        grid = (B, triton.cdiv(L, block_l), triton.cdiv(C, block_c))
        _scatter_add_kernel[grid](dout, positions, dX, P, L, C, BLOCK_L=block_l, BLOCK_C=block_c)
    return dX
