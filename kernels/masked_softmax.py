"""Masked softmax (d2l semantics) forward and backward as Triton kernels.

Reference: fastbert.backends.reference.masked_softmax -- softmax over the last axis of
X[N, Lq, Lk] with keys j >= valid_len masked to probability 0; a row with valid_len 0 gets
d2l's uniform row over all Lk keys (every score filled with the same value).  Here the fill is
-inf on a max-subtracted row, so no dtype can overflow into NaN (d2l's -1e6 does in fp16).

valid_lens: None (VL_MODE 0), [N] int32 (1: one length per batch, shared by its Lq rows) or
[N, Lq] int32 (2: one length per row).  Rows are independent: each program takes BLOCK_R rows
of the flattened [N*Lq, Lk] view.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import cast, next_pow2, rows_per_program


@triton.jit
def _row_lengths(VL, rows, row_ok, Lq, Lk, VL_MODE: tl.constexpr):
    if VL_MODE == 0:
        vl = tl.zeros_like(rows) + Lk
    elif VL_MODE == 1:
        vl = tl.load(VL + rows // Lq, mask=row_ok, other=Lk)
    else:
        vl = tl.load(VL + rows, mask=row_ok, other=Lk)
    return vl


@triton.jit
def _masked_softmax_fwd_kernel(X, VL, Y, n_rows, Lq, Lk, VL_MODE: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    in_bounds = row_ok[:, None] & (cols[None, :] < Lk)
    offs = rows[:, None].to(tl.int64) * Lk + cols[None, :]
    x = tl.load(X + offs, mask=in_bounds, other=0.0).to(tl.float32)
    vl = _row_lengths(VL, rows, row_ok, Lq, Lk, VL_MODE)
    empty = vl == 0
    # valid_len 0: every key carries the same fill, i.e. a uniform row over all Lk keys.
    x = tl.where(empty[:, None], 0.0, x)
    visible = cols[None, :] < tl.where(empty, Lk, vl)[:, None]
    x = tl.where(visible, x, float("-inf"))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    y = e / tl.sum(e, axis=1)[:, None]
    tl.store(Y + offs, cast(y, Y.dtype.element_ty), mask=in_bounds)


@triton.jit
def _masked_softmax_bwd_kernel(Y, DY, VL, DX, n_rows, Lq, Lk, VL_MODE: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    in_bounds = row_ok[:, None] & (cols[None, :] < Lk)
    offs = rows[:, None].to(tl.int64) * Lk + cols[None, :]
    y = tl.load(Y + offs, mask=in_bounds, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=in_bounds, other=0.0).to(tl.float32)
    vl = _row_lengths(VL, rows, row_ok, Lq, Lk, VL_MODE)
    dx = y * (dy - tl.sum(y * dy, axis=1)[:, None])
    # Masked scores were overwritten by a constant fill: no gradient reaches them (a
    # valid_len-0 row is entirely fill, so its whole gradient is 0).
    dx = tl.where(cols[None, :] < vl[:, None], dx, 0.0)
    tl.store(DX + offs, cast(dx, DX.dtype.element_ty), mask=in_bounds)


def _launch_shape(X: torch.Tensor, valid_lens: Optional[torch.Tensor]):
    N, Lq, Lk = X.shape
    n_rows = N * Lq
    mode = 0 if valid_lens is None else valid_lens.dim()
    block_k = next_pow2(Lk)
    block_r = rows_per_program(Lk)
    grid = (triton.cdiv(n_rows, block_r),)
    return n_rows, Lq, Lk, mode, block_r, block_k, grid


def forward(X: torch.Tensor, valid_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """Y = masked_softmax(X, valid_lens); X [N, Lq, Lk], valid_lens None, [N] or [N, Lq] int32."""
    X = X.contiguous()
    Y = torch.empty_like(X)
    if X.numel() == 0:
        return Y
    n_rows, Lq, Lk, mode, block_r, block_k, grid = _launch_shape(X, valid_lens)
    vl = X if valid_lens is None else valid_lens.contiguous()  # an unused pointer when None
    _masked_softmax_fwd_kernel[grid](X, vl, Y, n_rows, Lq, Lk, VL_MODE=mode, BLOCK_R=block_r,
                                     BLOCK_K=block_k)
    return Y


def backward(Y: torch.Tensor, dY: torch.Tensor, valid_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """dX for Y = masked_softmax(X, valid_lens)."""
    Y, dY = Y.contiguous(), dY.contiguous()
    dX = torch.empty_like(Y)
    if Y.numel() == 0:
        return dX
    n_rows, Lq, Lk, mode, block_r, block_k, grid = _launch_shape(Y, valid_lens)
    vl = Y if valid_lens is None else valid_lens.contiguous()
    _masked_softmax_bwd_kernel[grid](Y, dY, vl, dX, n_rows, Lq, Lk, VL_MODE=mode,
                                     BLOCK_R=block_r, BLOCK_K=block_k)
    return dX
