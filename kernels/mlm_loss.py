"""The MLM head's vocab projection + cross-entropy, never building the [S, V] logits.

Reference: fastbert.backends.reference.mlm_loss (glue: fastbert/backends/triton/mlm_loss.py,
which gathers the real slots and runs the small MLP; these kernels take its output
``H[S, C']``, the output layer ``W[V, C'], b[V]`` and the labels ``y[S]``).

* :func:`logsumexp_forward`: per slot, walk the vocab in BLOCK_V chunks, logits tile =
  H_blk @ W_chunk^T + b in float32, folded into a running (max, sum) - the online
  logsumexp - and the label's logit picked on the way.  Returns lse[S], label_logit[S].
* :func:`grad_hidden`: dH = dlogits @ W, where dlogits = p_coef * softmax - coef * onehot(y)
  is recomputed per chunk from lse (nothing [S, V] is stored).  One program per (slot block,
  C' block), looping over the vocab.
* :func:`grad_weight`: dW = dlogits^T @ H and db = column sums of dlogits.  One program per
  (vocab block, C' block), looping over the slots: each output element is written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER, dot_precision, mma, next_pow2


@triton.jit
def _logits_tile(H, W, BIAS, offs_s, offs_v, S, V, C, stride_h, stride_w,
                 BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREC: tl.constexpr):
    """float32 [BLOCK_S, BLOCK_V] = H[offs_s] @ W[offs_v]^T + b[offs_v] (out of range: -inf)."""
    acc = tl.zeros((BLOCK_S, BLOCK_V), tl.float32)
    s_ok = offs_s < S
    v_ok = offs_v < V
    k0 = 0
    while k0 < C:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        h = tl.load(H + offs_s[:, None].to(tl.int64) * stride_h + offs_k[None, :],
                    mask=s_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + offs_v[None, :].to(tl.int64) * stride_w + offs_k[:, None],
                    mask=v_ok[None, :] & k_ok[:, None], other=0.0)
        acc += mma(h, w, PREC)
        k0 += BLOCK_K
    bias = tl.load(BIAS + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    # Logits stay float32 (the unfused Linear rounds them to its dtype first).
    return tl.where(v_ok[None, :], acc + bias[None, :], float("-inf"))


@triton.jit
def _operand(x, dtype, PREC: tl.constexpr):
    """A float32 tile as a dot operand: rounded to the inputs' dtype, as the unfused backward
    rounds dlogits; kept float32 under the interpreter ("upcast"), whose float32 -> bf16
    conversion is not round-to-nearest-even."""
    if PREC == "upcast":
        return x
    else:
        return x.to(dtype)


@triton.jit
def _lse_kernel(H, W, BIAS, Y, LSE, LABEL_LOGIT, S, V, C, stride_h, stride_w,
                BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                PREC: tl.constexpr):
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    y = tl.load(Y + offs_s, mask=s_ok, other=-1)
    run_max = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_S,), tl.float32)
    label_logit = tl.zeros((BLOCK_S,), tl.float32)
    v0 = 0
    while v0 < V:
        offs_v = v0 + tl.arange(0, BLOCK_V)
        logits = _logits_tile(H, W, BIAS, offs_s, offs_v, S, V, C, stride_h, stride_w,
                              BLOCK_S, BLOCK_V, BLOCK_K, PREC)
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + \
            tl.sum(tl.exp(logits - new_max[:, None]), 1)
        run_max = new_max
        label_logit += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), 1)
        v0 += BLOCK_V
    tl.store(LSE + offs_s, run_max + tl.log(run_sum), mask=s_ok)
    tl.store(LABEL_LOGIT + offs_s, label_logit, mask=s_ok)


@triton.jit
def _dlogits_tile(H, W, BIAS, Y, LSE, COEF, PCOEF, offs_s, offs_v, S, V, C, stride_h,
                  stride_w, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """p_coef * softmax - coef * onehot(y) on one tile, float32 (0 outside the ranges)."""
    s_ok = offs_s < S
    logits = _logits_tile(H, W, BIAS, offs_s, offs_v, S, V, C, stride_h, stride_w,
                          BLOCK_S, BLOCK_V, BLOCK_K, PREC)
    lse = tl.load(LSE + offs_s, mask=s_ok, other=0.0)
    coef = tl.load(COEF + offs_s, mask=s_ok, other=0.0)
    pcoef = tl.load(PCOEF + offs_s, mask=s_ok, other=0.0)
    y = tl.load(Y + offs_s, mask=s_ok, other=-1)
    d = pcoef[:, None] * tl.exp(logits - lse[:, None])  # exp(-inf) = 0 past V
    d = d - tl.where(offs_v[None, :] == y[:, None], coef[:, None], 0.0)
    return tl.where(s_ok[:, None], d, 0.0)


@triton.jit
def _grad_hidden_kernel(H, W, BIAS, Y, LSE, COEF, PCOEF, DH, S, V, C, stride_h, stride_w,
                        BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    v0 = 0
    while v0 < V:
        offs_v = v0 + tl.arange(0, BLOCK_V)
        d = _dlogits_tile(H, W, BIAS, Y, LSE, COEF, PCOEF, offs_s, offs_v, S, V, C, stride_h,
                          stride_w, BLOCK_S, BLOCK_V, BLOCK_K, PREC)
        w = tl.load(W + offs_v[:, None].to(tl.int64) * stride_w + offs_c[None, :],
                    mask=(offs_v[:, None] < V) & c_ok[None, :], other=0.0)
        acc += mma(_operand(d, W.dtype.element_ty, PREC), w, PREC)
        v0 += BLOCK_V
    tl.store(DH + offs_s[:, None].to(tl.int64) * C + offs_c[None, :], acc,
             mask=(offs_s[:, None] < S) & c_ok[None, :])


@triton.jit
def _grad_weight_kernel(H, W, BIAS, Y, LSE, COEF, PCOEF, DW, DB, S, V, C, stride_h, stride_w,
                        BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_V, BLOCK_C), tl.float32)
    bias_acc = tl.zeros((BLOCK_V,), tl.float32)
    s0 = 0
    while s0 < S:
        offs_s = s0 + tl.arange(0, BLOCK_S)
        d = _dlogits_tile(H, W, BIAS, Y, LSE, COEF, PCOEF, offs_s, offs_v, S, V, C, stride_h,
                          stride_w, BLOCK_S, BLOCK_V, BLOCK_K, PREC)
        h = tl.load(H + offs_s[:, None].to(tl.int64) * stride_h + offs_c[None, :],
                    mask=(offs_s[:, None] < S) & c_ok[None, :], other=0.0)
        acc += mma(tl.trans(_operand(d, H.dtype.element_ty, PREC)), h, PREC)
        bias_acc += tl.sum(d, 0)
        s0 += BLOCK_S
    v_ok = offs_v < V
    tl.store(DW + offs_v[:, None].to(tl.int64) * C + offs_c[None, :], acc,
             mask=v_ok[:, None] & c_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(DB + offs_v, bias_acc, mask=v_ok)


def _blocks(S: int, C: int, block_v: int):
    block_s = 16 if INTERPRETER else 64
    block_k = min(64, next_pow2(C, 16))
    block_c = min(128, next_pow2(C, 16))
    return block_s, max(16, next_pow2(block_v, 16)), block_k, block_c


def logsumexp_forward(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                      block_v: int):
    """(lse[S], label_logit[S]) in float32 for logits = H @ W^T + b (never materialized)."""
    H, W, b, y = H.contiguous(), W.contiguous(), b.contiguous(), y.contiguous()
    S, C = H.shape
    V = W.shape[0]
    lse = torch.empty(S, dtype=torch.float32, device=H.device)
    label_logit = torch.empty(S, dtype=torch.float32, device=H.device)
    if S:
        bs, bv, bk, _ = _blocks(S, C, block_v)
        _lse_kernel[(triton.cdiv(S, bs),)](H, W, b, y, lse, label_logit, S, V, C, C, C,
                                          BLOCK_S=bs, BLOCK_V=bv, BLOCK_K=bk,
                                          PREC=dot_precision(H.dtype))
    return lse, label_logit


def grad_hidden(H, W, b, y, lse, coef, p_coef, block_v: int) -> torch.Tensor:
    """dH[S, C'] (float32) for dlogits = p_coef * softmax - coef * onehot(y)."""
    H, W, b = H.contiguous(), W.contiguous(), b.contiguous()
    S, C = H.shape
    dH = torch.empty((S, C), dtype=torch.float32, device=H.device)
    if S:
        bs, bv, bk, bc = _blocks(S, C, block_v)
        grid = (triton.cdiv(S, bs), triton.cdiv(C, bc))
        _grad_hidden_kernel[grid](H, W, b, y.contiguous(), lse.contiguous(), coef.contiguous(),
                                  p_coef.contiguous(), dH, S, W.shape[0], C, C, C,
                                  BLOCK_S=bs, BLOCK_V=bv, BLOCK_K=bk, BLOCK_C=bc,
                                  PREC=dot_precision(H.dtype))
    return dH


def grad_weight(H, W, b, y, lse, coef, p_coef, block_v: int):
    """(dW[V, C'], db[V]) in float32 for the same dlogits."""
    H, W, b = H.contiguous(), W.contiguous(), b.contiguous()
    S, C = H.shape
    V = W.shape[0]
    dW = torch.empty((V, C), dtype=torch.float32, device=H.device)
    db = torch.empty((V,), dtype=torch.float32, device=H.device)
    if S == 0:
        return dW.zero_(), db.zero_()
    bs, bv, bk, bc = _blocks(S, C, block_v)
    grid = (triton.cdiv(V, bv), triton.cdiv(C, bc))
    _grad_weight_kernel[grid](H, W, b, y.contiguous(), lse.contiguous(), coef.contiguous(),
                              p_coef.contiguous(), dW, db, S, V, C, C, C,
                              BLOCK_S=bs, BLOCK_V=bv, BLOCK_K=bk, BLOCK_C=bc,
                              PREC=dot_precision(H.dtype))
    return dW, db
