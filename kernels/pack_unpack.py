"""Pack the valid tokens of padded sequences into [T, ...] and unpack them back.

Reference: fastbert.backends.reference.pack / unpack.  Sequence b owns packed rows
cu_seqlens[b]:cu_seqlens[b+1]; trailing dims are flattened to F features per row.
pack's backward is unpack (zeros at pads) and unpack's backward is pack.
Grid: (sequence, block of BLOCK_L positions, block of BLOCK_F features); positions past a
sequence's length are skipped by pack and written as zeros by unpack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import next_pow2


@triton.jit
def _pack_kernel(X, CU, OUT, L, NF, BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr):
    b = tl.program_id(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    row0 = tl.load(CU + b)
    n = tl.load(CU + b + 1) - row0
    mask = (offs_l[:, None] < n) & (offs_f[None, :] < NF)
    src = (b.to(tl.int64) * L + offs_l)[:, None] * NF + offs_f[None, :]
    dst = (row0.to(tl.int64) + offs_l)[:, None] * NF + offs_f[None, :]
    tl.store(OUT + dst, tl.load(X + src, mask=mask), mask=mask)


@triton.jit
def _unpack_kernel(PACKED, CU, OUT, L, NF, BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr):
    b = tl.program_id(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    row0 = tl.load(CU + b)
    n = tl.load(CU + b + 1) - row0
    f_ok = offs_f[None, :] < NF
    src = (row0.to(tl.int64) + offs_l)[:, None] * NF + offs_f[None, :]
    vals = tl.load(PACKED + src, mask=(offs_l[:, None] < n) & f_ok, other=0.0)
    dst = (b.to(tl.int64) * L + offs_l)[:, None] * NF + offs_f[None, :]
    tl.store(OUT + dst, vals, mask=(offs_l[:, None] < L) & f_ok)


def _blocks(L: int, NF: int):
    block_f = min(1024, next_pow2(NF))
    return max(1, min(next_pow2(L), 8192 // block_f)), block_f


def cu_seqlens_from(valid_lens: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(valid_lens.to(torch.int64), 0), (1, 0)).to(torch.int32)


def pack_rows(X: torch.Tensor, cu_seqlens: torch.Tensor, T: int,
              out: torch.Tensor = None) -> torch.Tensor:
    """packed[T, ...] from X[B, L, ...] given the offsets (T >= cu_seqlens[-1]: rows past it,
    row padding in unpack's backward, are zero, as the cpp and CUDA twins write them)."""
    X, cu_seqlens = X.contiguous(), cu_seqlens.contiguous()
    B, L = X.shape[:2]
    NF = X[0, 0].numel() if B and L else 0
    if out is None:  # zeros: the offsets never reach rows past cu_seqlens[-1]
        out = torch.zeros((T,) + tuple(X.shape[2:]), dtype=X.dtype, device=X.device)
    if out.numel():
        block_l, block_f = _blocks(L, NF)
        grid = (B, triton.cdiv(L, block_l), triton.cdiv(NF, block_f))
        _pack_kernel[grid](X, cu_seqlens, out, L, NF, BLOCK_L=block_l, BLOCK_F=block_f)
    return out


def pack(X: torch.Tensor, valid_lens: torch.Tensor):
    """(packed[T, ...], cu_seqlens[B+1] int32); T is read back from the device (a sync)."""
    cu = cu_seqlens_from(valid_lens)
    T = int(cu[-1])  # every row is written: no zero fill
    return pack_rows(X, cu, T, torch.empty((T,) + tuple(X.shape[2:]), dtype=X.dtype,
                                           device=X.device)), cu


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    """[B, L, ...] with zeros at pad positions."""
    packed, cu_seqlens = packed.contiguous(), cu_seqlens.contiguous()
    B = cu_seqlens.shape[0] - 1
    out = torch.empty((B, L) + tuple(packed.shape[1:]), dtype=packed.dtype, device=packed.device)
    NF = out[0, 0].numel() if B and L else 0
    if out.numel():
        block_l, block_f = _blocks(L, NF)
        grid = (B, triton.cdiv(L, block_l), triton.cdiv(NF, block_f))
        _unpack_kernel[grid](packed, cu_seqlens, out, L, NF, BLOCK_L=block_l, BLOCK_F=block_f)
    return out
