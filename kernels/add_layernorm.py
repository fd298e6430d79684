"""Fused residual + dropout + LayerNorm, forward and backward (d2l ``AddNorm(X, Y)``).

Reference: fastbert.backends.reference.add_layernorm -- layer_norm(dropout(y) + x) over the
last axis, optional weight and bias.  Math in fp32 whatever the storage dtype.

Each program normalizes BLOCK_R rows of the [R, C] view.  Dropout keeps y[r, c] iff
philox(seed, r*C + c) >= p (kernels/dropout.py): the backward regenerates the mask, and
:func:`dropout_keep_mask` gives tests the same mask.  The forward saves only per-row mean and
rstd (fp32); the backward writes per-program partial sums of dweight/dbias (no atomics, so it
is deterministic) that a torch sum finishes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import cast, next_pow2, rows_per_program, seed_value
from .dropout import dropout_keep, keep_mask


@triton.jit
def _residual(X, Y, offs, in_bounds, seed, dropout_p, DROPOUT: tl.constexpr):
    """z = dropout(y) + x in fp32."""
    x = tl.load(X + offs, mask=in_bounds, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = dropout_keep(seed, offs, dropout_p)
        y = tl.where(keep, y / (1.0 - dropout_p), 0.0)
    else:
        keep = in_bounds
    return x + y, keep


@triton.jit
def _add_layernorm_fwd_kernel(X, Y, W, B, OUT, MEAN, RSTD, R, C, eps, seed, dropout_p,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, DROPOUT: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    in_bounds = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    z, _ = _residual(X, Y, offs, in_bounds, seed, dropout_p, DROPOUT)
    mean = tl.sum(z, axis=1) / C
    zc = tl.where(in_bounds, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / C + eps)
    out = zc * rstd[:, None]
    if HAS_W:
        out = out * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        out = out + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs, cast(out, OUT.dtype.element_ty), mask=in_bounds)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _add_layernorm_bwd_kernel(DOUT, X, Y, W, MEAN, RSTD, DX, DY, DW_PART, DB_PART, R, C, seed,
                              dropout_p, HAS_W: tl.constexpr, DROPOUT: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    in_bounds = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    z, keep = _residual(X, Y, offs, in_bounds, seed, dropout_p, DROPOUT)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    xhat = tl.where(in_bounds, (z - mean[:, None]) * rstd[:, None], 0.0)
    g = tl.load(DOUT + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_W:
        gw = g * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        gw = g
    c1 = tl.sum(xhat * gw, axis=1) / C
    c2 = tl.sum(gw, axis=1) / C
    dz = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    tl.store(DX + offs, cast(dz, DX.dtype.element_ty), mask=in_bounds)
    if DROPOUT:
        dy = tl.where(keep, dz / (1.0 - dropout_p), 0.0)
    else:
        dy = dz
    tl.store(DY + offs, cast(dy, DY.dtype.element_ty), mask=in_bounds)
    tl.store(DW_PART + pid * C + cols, tl.sum(g * xhat, axis=0), mask=col_ok)
    tl.store(DB_PART + pid * C + cols, tl.sum(g, axis=0), mask=col_ok)


def _geometry(x: torch.Tensor):
    C = x.shape[-1]
    R = x.numel() // C if C else 0
    block_r = rows_per_program(C)
    return R, C, block_r, next_pow2(C), triton.cdiv(R, block_r)


def forward(x, y, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
            dropout_p: float = 0.0, seed=None):
    """(out [x.shape] in the promoted dtype of x and y (as ``dropout(y) + x``), mean[R] fp32,
    rstd[R] fp32)."""
    x, y = x.contiguous(), y.contiguous()
    R, C, block_r, block_c, n_prog = _geometry(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
    mean = torch.empty(R, dtype=torch.float32, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    if R and C:
        _add_layernorm_fwd_kernel[(n_prog,)](
            x, y, x if weight is None else weight, x if bias is None else bias, out, mean, rstd,
            R, C, float(eps), seed_value(seed), float(dropout_p), HAS_W=weight is not None,
            HAS_B=bias is not None, DROPOUT=dropout_p > 0, BLOCK_R=block_r, BLOCK_C=block_c)
    return out, mean, rstd


def backward(dout, x, y, weight: Optional[torch.Tensor], mean, rstd, dropout_p: float = 0.0,
             seed=None):
    """(dx, dy, dweight fp32 [C], dbias fp32 [C])."""
    dout, x, y = dout.contiguous(), x.contiguous(), y.contiguous()
    R, C, block_r, block_c, n_prog = _geometry(x)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    dw_part = torch.zeros((max(n_prog, 1), C), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((max(n_prog, 1), C), dtype=torch.float32, device=x.device)
    if R and C:
        _add_layernorm_bwd_kernel[(n_prog,)](
            dout, x, y, x if weight is None else weight, mean, rstd, dx, dy, dw_part, db_part,
            R, C, seed_value(seed), float(dropout_p), HAS_W=weight is not None,
            DROPOUT=dropout_p > 0, BLOCK_R=block_r, BLOCK_C=block_c)
    return dx, dy, dw_part.sum(0), db_part.sum(0)


def dropout_keep_mask(shape, dropout_p: float, seed, device=None) -> torch.Tensor:
    """The bool keep mask (shape of y) the kernels draw for this seed."""
    n = 1
    for s in shape:
        n *= s
    return keep_mask(seed, torch.arange(n, device=device).reshape(shape), dropout_p)
