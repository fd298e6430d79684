"""Flash attention (online softmax, recompute in the backward) as Triton kernels, for packed
variable-length sequences; the padded ``attention`` op (kernels/attention.py) reuses the same
kernels with VARLEN=False.

Reference: fastbert.backends.reference.varlen_attention (and .attention):
  out_i = sum_j dropout(softmax_j(q_i . k_j * scale, masked))_j v_j
over the keys of q_i's own sequence.

Layouts.  Every tensor is viewed as rows of heads: q, k [rows, H, D], v, out [rows, H, DV].
  varlen: rows are the packed tokens; sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1] of
          q, k and v alike (grid axis 1 = b; VARLEN=1).
  cross-length varlen (VARLEN=2): sequence b owns key rows cu_seqlens[b]:cu_seqlens[b+1] of
          k, v and query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q.  The query offsets come
          in the VL slot (unused by varlen otherwise), so the kernels' signatures stay those
          of the other modes.  A sequence with queries but no keys outputs zeros (its
          denominator is 0) and gets zero gradients.
  padded: H = 1 and rows are the flattened [N, L]; batch z owns rows z*Lq.. of q and z*Lk.. of
          k, v.  Each query row sees keys j < its valid length (valid_lens None / [N] / [N, Lq]);
          a valid length of 0 is d2l's uniform row over all Lk keys (every score the same fill),
          whose scores get no gradient.
Head sizes that are not powers of two (48, 96) are padded to D_PAD with masked loads; lengths
need not be multiples of the blocks.  STATS (fp32 [2, H, rows_q]: each row's score maximum m
and softmax denominator l) is the only thing saved besides the inputs and the output; the
backward recomputes p = exp(s - m) / l.  (A single log-sum-exp m + log l would round to the
ulp of its magnitude and cost fp32 gradients ~8x torch's error.)

Dropout: element (h, query row r, key row c) is kept iff philox(seed, (h*TQ + r)*TK + c) >= p
(kernels/dropout.py; TQ, TK = the q and k rows: in the packed modes the valid rows, the last
offsets, read on the device; the same for self-attention), so the backward regenerates the
mask and :func:`dropout_keep_mask` can hand tests the same mask.

Row padding (packed modes): q, k, v may hold rows past their last offset (the encoder's row
bucketing).  They belong to no sequence: the kernels never read them into any sequence, the
dropout counter ignores them (above), and their output and gradient rows are written as zeros
(``_zero_rows_kernel``), so nothing else changes, bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import cast, INTERPRETER, dot_precision, mma, next_pow2, seed_value
from .dropout import dropout_keep, keep_mask


@triton.jit
def _seq_bounds(CU, CUQ, z, Lq, Lk, VARLEN: tl.constexpr):
    """(first q row, first k row, q length, k length) of sequence ``z``.  CUQ: the query
    offsets of cross-length varlen (VARLEN == 2)."""
    if VARLEN == 2:
        k_row0 = tl.load(CU + z)
        q_row0 = tl.load(CUQ + z)
        return q_row0, k_row0, tl.load(CUQ + z + 1) - q_row0, tl.load(CU + z + 1) - k_row0
    elif VARLEN:
        row0 = tl.load(CU + z)
        n = tl.load(CU + z + 1) - row0
        return row0, row0, n, n
    else:
        return z * Lq, z * Lk, Lq, Lk


@triton.jit
def _counter_extents(CU, CUQ, TQ, TK, VARLEN: tl.constexpr):
    """(Tq, Tk) of the dropout counter.  Packed modes: the valid row counts, the last
    offsets (loaded here, no host sync), so rows past them (row padding) change no bit of
    the mask; padded mode: the tensors' rows."""
    B = tl.num_programs(1)
    if VARLEN == 2:
        return tl.load(CUQ + B).to(tl.int64), tl.load(CU + B).to(tl.int64)
    elif VARLEN:
        n = tl.load(CU + B).to(tl.int64)
        return n, n
    else:
        return TQ, TK


@triton.jit
def _zero_rows_kernel(X, LAST, n_elems, row_elems, BLOCK: tl.constexpr):
    """Zero the rows at and past ``*LAST`` (the last offset) of a row-major tensor: the
    rows of row padding, which no sequence owns and the attention kernels never write."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    start = tl.load(LAST).to(tl.int64) * row_elems
    tl.store(X + offs, tl.zeros((BLOCK,), X.dtype.element_ty), mask=(offs >= start) & (offs < n_elems))


@triton.jit
def _key_limits(VL, z, offs_m, m_ok, Lq, seqlen_k, VL_MODE: tl.constexpr):
    """Per query row: how many keys it sees, and whether it is a d2l valid_len-0 row."""
    if VL_MODE == 0:
        lim = tl.zeros_like(offs_m) + seqlen_k
    elif VL_MODE == 1:
        lim = tl.zeros_like(offs_m) + tl.load(VL + z)
    else:
        lim = tl.load(VL + z * Lq + offs_m, mask=m_ok, other=1)
    empty = lim == 0
    return tl.where(empty, seqlen_k, lim), empty


@triton.jit
def _row_stats(STATS, h, H, TQ, rows_q, m_ok):
    """The forward's row maximum and 1 / denominator."""
    m_i = tl.load(STATS + h * TQ + rows_q, mask=m_ok, other=0.0)
    l_i = tl.load(STATS + (H + h) * TQ + rows_q, mask=m_ok, other=1.0)
    return m_i, 1.0 / tl.where(l_i > 0.0, l_i, 1.0)  # 0: a row with no keys (cross varlen)


@triton.jit
def _key_loop_end(VL, z, seqlen_k, VL_MODE: tl.constexpr):
    """How far the key loop must run (a scalar: per-row lengths [N, Lq] run to Lk)."""
    if VL_MODE == 1:
        n = tl.load(VL + z)
        return tl.where(n == 0, seqlen_k, n)
    else:
        return seqlen_k


@triton.jit
def _scores(q, k, offs_n, lim, empty, scale, PREC: tl.constexpr):
    s = mma(q, tl.trans(k), PREC) * scale
    s = tl.where(empty[:, None], 0.0, s)  # valid_len 0: one fill for every key -> uniform
    return tl.where(offs_n[None, :] < lim[:, None], s, float("-inf"))


@triton.jit
def _flash_fwd_kernel(Q, K, V, O, STATS, CU, VL, seed, dropout_p, scale, H, Lq, Lk, TQ, TK,
                      D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr,
                      DV_PAD: tl.constexpr, VARLEN: tl.constexpr, VL_MODE: tl.constexpr,
                      DROPOUT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, z, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_row0, k_row0, seqlen_q, seqlen_k = _seq_bounds(CU, VL, z, Lq, Lk, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < seqlen_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        m_ok = offs_m < seqlen_q
        rows_q = (q_row0 + offs_m).to(tl.int64)
        q = tl.load(Q + (rows_q * H + h)[:, None] * D + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lim, empty = _key_limits(VL, z, offs_m, m_ok, Lq, seqlen_k, VL_MODE)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DV_PAD), tl.float32)
        n_end = _key_loop_end(VL, z, seqlen_k, VL_MODE)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seqlen_k
            rows_k = (k_row0 + offs_n).to(tl.int64)
            k = tl.load(K + (rows_k * H + h)[:, None] * D + offs_d[None, :],
                        mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            s = _scores(q, k, offs_n, lim, empty, scale, PREC)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)  # the softmax denominator ignores dropout
            if DROPOUT:
                ctq, ctk = _counter_extents(CU, VL, TQ, TK, VARLEN)
                offs = (h * ctq + rows_q)[:, None] * ctk + rows_k[None, :]
                p = tl.where(dropout_keep(seed, offs, dropout_p), p / (1.0 - dropout_p), 0.0)
            v = tl.load(V + (rows_k * H + h)[:, None] * DV + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + mma(cast(p, v.dtype), v, PREC)
            m_i = m_new
        # l_i == 0 only when the sequence has no keys (cross-length varlen): output zeros.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(O + (rows_q * H + h)[:, None] * DV + offs_dv[None, :],
                 cast(out, O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))
        tl.store(STATS + h * TQ + rows_q, m_i, mask=m_ok)
        tl.store(STATS + (H + h) * TQ + rows_q, l_i, mask=m_ok)


@triton.jit
def _p_dp_block(q, do, K, V, start_n, k_row0, seqlen_k, h, H, rows_q, lim, empty, m_i, inv_l,
                seed, dropout_p, scale, TQ, TK, offs_d, offs_dv, D: tl.constexpr,
                DV: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """For one key block: k, p (the forward's probabilities) and dp (= dO v^T through the
    dropout mask, i.e. the gradient of the undropped probabilities)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seqlen_k
    rows_k = (k_row0 + offs_n).to(tl.int64)
    k = tl.load(K + (rows_k * H + h)[:, None] * D + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + (rows_k * H + h)[:, None] * DV + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    s = _scores(q, k, offs_n, lim, empty, scale, PREC)
    p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
    dp = mma(do, tl.trans(v), PREC)
    if DROPOUT:  # TQ, TK: the counter's extents (_counter_extents)
        offs = (h * TQ + rows_q)[:, None] * TK + rows_k[None, :]
        dp = tl.where(dropout_keep(seed, offs, dropout_p), dp / (1.0 - dropout_p), 0.0)
    return k, p, dp


@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, O, DO, STATS, DELTA, DQ, CU, VL, seed, dropout_p, scale, H,
                         Lq, Lk, TQ, TK, D: tl.constexpr, DV: tl.constexpr,
                         D_PAD: tl.constexpr, DV_PAD: tl.constexpr, VARLEN: tl.constexpr,
                         VL_MODE: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         EXACT_DELTA: tl.constexpr):
    """dQ for one query block; also stores DELTA_i = sum_j p_ij dp_ij for the dK/dV kernel.

    EXACT_DELTA (fp32): DELTA from the recomputed p and dp in a first pass over the keys, as
    torch's softmax backward does: dp's rounding errors then cancel in dp - DELTA (from
    rowsum(dO * O) they do not, and fp32 dQ misses torch's accuracy several times over).
    16-bit inputs take the usual flash shortcut rowsum(dO * O), a third of the work."""
    pid_m, z, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_row0, k_row0, seqlen_q, seqlen_k = _seq_bounds(CU, VL, z, Lq, Lk, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < seqlen_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        m_ok = offs_m < seqlen_q
        rows_q = (q_row0 + offs_m).to(tl.int64)
        q_mask = m_ok[:, None] & (offs_d[None, :] < D)
        o_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
        q = tl.load(Q + (rows_q * H + h)[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        o_offs = (rows_q * H + h)[:, None] * DV + offs_dv[None, :]
        do = tl.load(DO + o_offs, mask=o_mask, other=0.0)
        m_i, inv_l = _row_stats(STATS, h, H, TQ, rows_q, m_ok)
        lim, empty = _key_limits(VL, z, offs_m, m_ok, Lq, seqlen_k, VL_MODE)
        n_end = _key_loop_end(VL, z, seqlen_k, VL_MODE)
        ctq, ctk = _counter_extents(CU, VL, TQ, TK, VARLEN)
        if EXACT_DELTA:
            delta = tl.zeros((BLOCK_M,), tl.float32)
            for start_n in range(0, n_end, BLOCK_N):
                _, p, dp = _p_dp_block(q, do, K, V, start_n, k_row0, seqlen_k, h, H, rows_q,
                                       lim, empty, m_i, inv_l, seed, dropout_p, scale, ctq, ctk,
                                       offs_d, offs_dv, D, DV, DROPOUT, PREC, BLOCK_N)
                delta += tl.sum(p * dp, axis=1)
        else:
            o = tl.load(O + o_offs, mask=o_mask, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(DELTA + h * TQ + rows_q, delta, mask=m_ok)
        dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        for start_n in range(0, n_end, BLOCK_N):
            k, p, dp = _p_dp_block(q, do, K, V, start_n, k_row0, seqlen_k, h, H, rows_q, lim,
                                   empty, m_i, inv_l, seed, dropout_p, scale, ctq, ctk, offs_d,
                                   offs_dv, D, DV, DROPOUT, PREC, BLOCK_N)
            ds = tl.where(empty[:, None] | ~m_ok[:, None], 0.0, p * (dp - delta[:, None]))
            dq += mma(cast(ds, k.dtype), k, PREC)
        tl.store(DQ + (rows_q * H + h)[:, None] * D + offs_d[None, :],
                 cast(dq * scale, DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, STATS, DELTA, DK, DV_OUT, CU, VL, seed, dropout_p, scale,
                           H, Lq, Lk, TQ, TK, D: tl.constexpr, DV: tl.constexpr,
                           D_PAD: tl.constexpr, DV_PAD: tl.constexpr, VARLEN: tl.constexpr,
                           VL_MODE: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV for one key block (loops over the query blocks: no atomics, deterministic)."""
    pid_n, z, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_row0, k_row0, seqlen_q, seqlen_k = _seq_bounds(CU, VL, z, Lq, Lk, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n < seqlen_k:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        n_ok = offs_n < seqlen_k
        rows_k = (k_row0 + offs_n).to(tl.int64)
        k_mask = n_ok[:, None] & (offs_d[None, :] < D)
        v_mask = n_ok[:, None] & (offs_dv[None, :] < DV)
        k = tl.load(K + (rows_k * H + h)[:, None] * D + offs_d[None, :], mask=k_mask, other=0.0)
        v = tl.load(V + (rows_k * H + h)[:, None] * DV + offs_dv[None, :], mask=v_mask,
                    other=0.0)
        dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
        dv = tl.zeros((BLOCK_N, DV_PAD), tl.float32)
        for start_m in range(0, seqlen_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen_q
            rows_q = (q_row0 + offs_m).to(tl.int64)
            q = tl.load(Q + (rows_q * H + h)[:, None] * D + offs_d[None, :],
                        mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(DO + (rows_q * H + h)[:, None] * DV + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            m_i, inv_l = _row_stats(STATS, h, H, TQ, rows_q, m_ok)
            delta = tl.load(DELTA + h * TQ + rows_q, mask=m_ok, other=0.0)
            lim, empty = _key_limits(VL, z, offs_m, m_ok, Lq, seqlen_k, VL_MODE)
            s = _scores(q, k, offs_n, lim, empty, scale, PREC)
            p = tl.where(m_ok[:, None], tl.exp(s - m_i[:, None]) * inv_l[:, None], 0.0)
            dp = mma(do, tl.trans(v), PREC)
            if DROPOUT:
                ctq, ctk = _counter_extents(CU, VL, TQ, TK, VARLEN)
                offs = (h * ctq + rows_q)[:, None] * ctk + rows_k[None, :]
                keep = dropout_keep(seed, offs, dropout_p)
                p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                p_drop = p
            dv += mma(tl.trans(cast(p_drop, do.dtype)), do, PREC)
            ds = tl.where(empty[:, None], 0.0, p * (dp - delta[:, None]))
            dk += mma(tl.trans(cast(ds, q.dtype)), q, PREC)
        tl.store(DK + (rows_k * H + h)[:, None] * D + offs_d[None, :],
                 cast(dk * scale, DK.dtype.element_ty), mask=k_mask)
        tl.store(DV_OUT + (rows_k * H + h)[:, None] * DV + offs_dv[None, :],
                 cast(dv, DV_OUT.dtype.element_ty), mask=v_mask)


# ----------------------------------------------------------------------------- launchers
def _blocks(max_q: int, max_k: int, d_pad: int, element_size: int):
    """(BLOCK_M, BLOCK_N): at least 16 (tl.dot's minimum), at most 64.  On a GPU, 32 when a
    padded head row exceeds 128 bytes (fp32 D > 32, 16-bit D > 64): the backward's tiles
    then need over 99 KB of shared memory at 64, the per-block limit of sm_86/sm_89."""
    cap = 64 if (INTERPRETER or d_pad * element_size <= 128) else 32
    return min(cap, next_pow2(max_q, 16)), min(cap, next_pow2(max_k, 16))


class Problem:
    """Everything the three kernels share about one attention call."""

    def __init__(self, q, k, v, *, varlen: bool, H: int, n_seqs: int, Lq: int, Lk: int,
                 max_q: int, max_k: int, cu_seqlens=None, valid_lens=None,
                 dropout_p: float = 0.0, scale: Optional[float] = None, seed=None,
                 cu_seqlens_q=None):
        self.q, self.k, self.v = q.contiguous(), k.contiguous(), v.contiguous()
        self.D, self.DV = q.shape[-1], v.shape[-1]
        self.H, self.n_seqs, self.Lq, self.Lk = H, n_seqs, Lq, Lk
        self.TQ, self.TK = q.shape[0] * (1 if varlen else Lq), k.shape[0] * (1 if varlen else Lk)
        # VARLEN: 0 padded, 1 packed self-attention, 2 packed with separate query offsets
        # (passed in the VL slot).
        self.varlen = 0 if not varlen else (1 if cu_seqlens_q is None else 2)
        self.cu = cu_seqlens.contiguous() if cu_seqlens is not None else self.q
        self.vl = valid_lens.contiguous() if valid_lens is not None else self.q
        if cu_seqlens_q is not None:
            self.vl = cu_seqlens_q.contiguous()
        self.vl_mode = 0 if (varlen or valid_lens is None) else valid_lens.dim()
        self.dropout_p = float(dropout_p)
        self.dropout = self.dropout_p > 0.0
        self.seed = seed_value(seed) if self.dropout else 0
        self.scale = float(1.0 / math.sqrt(self.D) if scale is None else scale)
        self.d_pad, self.dv_pad = next_pow2(self.D, 16), next_pow2(self.DV, 16)
        self.block_m, self.block_n = _blocks(max_q, max_k, max(self.d_pad, self.dv_pad),
                                             self.q.element_size())
        self.max_q, self.max_k = max_q, max_k

    def meta(self):
        return dict(D=self.D, DV=self.DV, D_PAD=self.d_pad, DV_PAD=self.dv_pad,
                    VARLEN=self.varlen, VL_MODE=self.vl_mode, DROPOUT=self.dropout,
                    PREC=dot_precision(self.q.dtype), BLOCK_M=self.block_m, BLOCK_N=self.block_n)

    def scalars(self):
        return (self.cu, self.vl, self.seed, self.dropout_p, self.scale, self.H, self.Lq,
                self.Lk, self.TQ, self.TK)

    def zero_padding_rows(self, *pairs):
        """Packed modes: zero the rows past the last offset (row padding: q, k, v may hold
        rows that belong to no sequence; the kernels never write them).  One small launch per
        tensor that reads the offset on the device (no host sync); it writes only those rows.
        ``pairs``: (tensor, "q" | "k") for the offsets that end its rows."""
        if not self.varlen:
            return
        for t, side in pairs:
            if not t.numel():
                continue
            offsets = self.vl if (side == "q" and self.varlen == 2) else self.cu
            block = 1024
            _zero_rows_kernel[(triton.cdiv(t.numel(), block),)](
                t, offsets[offsets.shape[0] - 1:], t.numel(), t[0].numel(), BLOCK=block)

    def forward(self):
        out = torch.empty(self.q.shape[:-1] + (self.DV,), dtype=self.q.dtype, device=self.q.device)
        stats = torch.empty((2, self.H, self.TQ), dtype=torch.float32, device=self.q.device)
        if out.numel() and self.max_q > 0 and self.max_k > 0:
            grid = (triton.cdiv(self.max_q, self.block_m), self.n_seqs, self.H)
            _flash_fwd_kernel[grid](self.q, self.k, self.v, out, stats, *self.scalars(),
                                    **self.meta())
            self.zero_padding_rows((out, "q"))
        elif out.numel():
            out.zero_()
        return out, stats

    def backward(self, out, stats, dout):
        dq, dk, dv = (torch.empty_like(t) for t in (self.q, self.k, self.v))
        if self.max_q <= 0 or self.max_k <= 0:
            return dq.zero_(), dk.zero_(), dv.zero_()
        out, dout = out.contiguous(), dout.contiguous()
        delta = torch.empty(stats.shape[1:], dtype=torch.float32, device=stats.device)
        grid_q = (triton.cdiv(self.max_q, self.block_m), self.n_seqs, self.H)
        _flash_bwd_dq_kernel[grid_q](self.q, self.k, self.v, out, dout, stats, delta, dq,
                                     *self.scalars(), **self.meta(),
                                     EXACT_DELTA=self.q.dtype == torch.float32)
        grid_k = (triton.cdiv(self.max_k, self.block_n), self.n_seqs, self.H)
        _flash_bwd_dkdv_kernel[grid_k](self.q, self.k, self.v, dout, stats, delta, dk, dv,
                                       *self.scalars(), **self.meta())
        self.zero_padding_rows((dq, "q"), (dk, "k"), (dv, "k"))
        return dq, dk, dv


def _varlen_problem(q, k, v, cu_seqlens, max_len, dropout_p, scale, seed,
                    cu_seqlens_q=None) -> Problem:
    T, H, _ = q.shape
    B = cu_seqlens.shape[0] - 1
    max_q = max_len
    if cu_seqlens_q is not None:
        # The grid's query extent: the largest query count, read from the offsets (one small
        # copy to the host; a count may exceed max_len, and <cls>-only queries get
        # BLOCK_M = 16 instead of a block sized for whole sequences).
        max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B > 0 else 0
    return Problem(q, k, v, varlen=True, H=H, n_seqs=B, Lq=0, Lk=0,
                   max_q=max_q, max_k=max_len, cu_seqlens=cu_seqlens, dropout_p=dropout_p,
                   scale=scale, seed=seed, cu_seqlens_q=cu_seqlens_q)


def forward(q, k, v, cu_seqlens, max_len: int, dropout_p: float = 0.0,
            scale: Optional[float] = None, seed=None, cu_seqlens_q=None):
    """(out[Tq, H, D], stats[2, H, Tq] fp32: row max and softmax denominator).  ``max_len``
    must bound every sequence's length (the grid covers max_len keys, and queries unless
    ``cu_seqlens_q`` gives them; an upper bound such as the padded L is fine)."""
    return _varlen_problem(q, k, v, cu_seqlens, max_len, dropout_p, scale, seed,
                           cu_seqlens_q).forward()


def backward(q, k, v, out, stats, dout, cu_seqlens, max_len: int, dropout_p: float = 0.0,
             scale: Optional[float] = None, seed=None, cu_seqlens_q=None):
    """(dq, dk, dv) for :func:`forward`, the dropout mask regenerated from ``seed``."""
    problem = _varlen_problem(q, k, v, cu_seqlens, max_len, dropout_p, scale, seed,
                              cu_seqlens_q)
    return problem.backward(out, stats, dout)


def dropout_keep_mask(cu_seqlens: torch.Tensor, H: int, L: int, dropout_p: float, seed,
                      cu_seqlens_q=None):
    """The keep mask the kernels draw, as bool ``[B*H, L, L]`` in the layout of the padded
    reference (query i, key j of sequence b, head h; entries past a sequence are False).
    Queries by ``cu_seqlens_q`` when given (L must bound the query counts too)."""
    cu = cu_seqlens.long()
    cu_q = cu if cu_seqlens_q is None else cu_seqlens_q.long()
    B = cu.shape[0] - 1
    TQ, TK = int(cu_q[-1]), int(cu[-1])
    pos = torch.arange(L, device=cu.device)
    rows_q = cu_q[:-1, None] + pos[None, :]                              # [B, L] query rows
    rows_k = cu[:-1, None] + pos[None, :]                                # [B, L] key rows
    inside_q = pos[None, :] < (cu_q[1:] - cu_q[:-1])[:, None]
    inside_k = pos[None, :] < (cu[1:] - cu[:-1])[:, None]
    h = torch.arange(H, device=cu.device)
    offs = ((h[None, :, None, None] * TQ + rows_q[:, None, :, None]) * TK
            + rows_k[:, None, None, :])                                  # [B, H, L, L]
    keep = keep_mask(seed, offs, dropout_p)
    keep &= inside_q[:, None, :, None] & inside_k[:, None, None, :]
    return keep.reshape(B * H, L, L)
