"""Padded attention ``softmax(q k^T * scale, masked) v`` with d2l's valid_lens, on the flash
kernels of kernels/varlen_attention.py (VARLEN=False: batch z owns rows z*Lq.. of q and
z*Lk.. of k and v; valid_lens None, [N] or [N, Lq]; valid_len 0 -> d2l's uniform row).

Reference: fastbert.backends.reference.attention.
Dropout: element (z, i, j) is kept iff philox(seed, (z*Lq + i) * N*Lk + z*Lk + j) >= p.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dropout import keep_mask
from .varlen_attention import Problem


def _problem(q, k, v, valid_lens, dropout_p, scale, seed) -> Problem:
    N, Lq, _ = q.shape
    Lk = k.shape[1]
    return Problem(q, k, v, varlen=False, H=1, n_seqs=N, Lq=Lq, Lk=Lk, max_q=Lq, max_k=Lk,
                   valid_lens=valid_lens, dropout_p=dropout_p, scale=scale, seed=seed)


def forward(q, k, v, valid_lens: Optional[torch.Tensor], dropout_p: float = 0.0,
            scale: Optional[float] = None, seed=None):
    """(out[N, Lq, Dv], stats[2, 1, N*Lq] fp32: row max and softmax denominator)."""
    return _problem(q, k, v, valid_lens, dropout_p, scale, seed).forward()


def backward(q, k, v, out, stats, dout, valid_lens, dropout_p: float = 0.0,
             scale: Optional[float] = None, seed=None):
    """(dq, dk, dv) for :func:`forward`, the dropout mask regenerated from ``seed``."""
    return _problem(q, k, v, valid_lens, dropout_p, scale, seed).backward(out, stats, dout)


def dropout_keep_mask(N: int, Lq: int, Lk: int, dropout_p: float, seed, device=None):
    """The bool keep mask ``[N, Lq, Lk]`` the kernels draw for this seed."""
    z = torch.arange(N, device=device)[:, None, None]
    i = torch.arange(Lq, device=device)[None, :, None]
    j = torch.arange(Lk, device=device)[None, None, :]
    return keep_mask(seed, (z * Lq + i) * (N * Lk) + z * Lk + j, dropout_p)
