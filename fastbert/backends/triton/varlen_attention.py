"""Triton glue for ``varlen_attention`` (kernels: kernels/varlen_attention.py).

custom_op + register_fake + register_autograd, not triton_op: see masked_softmax.py here.
The forward returns (out, stats: row max and denominator); the backward op recomputes the
probabilities from them and regenerates the dropout mask from ``seed`` (nothing [T, T]-sized
is saved).  ``cu_seqlens_q`` (None: self-attention) packs the queries by their own offsets.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert import ops
from fastbert.kernels import varlen_attention as kernel

from ..autocast import autocast_dtype, cast


@torch.library.custom_op("fastbert_triton::varlen_attention", mutates_args=())
def varlen_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int,
                        dropout_p: float, scale: Optional[float], seed: Optional[Tensor],
                        cu_seqlens_q: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return kernel.forward(q, k, v, cu_seqlens, max_len, dropout_p, scale, seed, cu_seqlens_q)


@varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_len, dropout_p, scale, seed, cu_seqlens_q=None):
    T, H, _ = q.shape
    return (q.new_empty((T, H, v.shape[-1])),
            q.new_empty((2, H, T), dtype=torch.float32))


@torch.library.custom_op("fastbert_triton::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 dout: Tensor, cu_seqlens: Tensor, max_len: int,
                                 dropout_p: float, scale: Optional[float], seed: Optional[Tensor],
                                 cu_seqlens_q: Optional[Tensor] = None
                                 ) -> Tuple[Tensor, Tensor, Tensor]:
    return kernel.backward(q, k, v, out, lse, dout, cu_seqlens, max_len, dropout_p, scale, seed,
                           cu_seqlens_q)


@varlen_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, cu_seqlens, max_len, dropout_p, scale, seed, cu_seqlens_q=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_len, dropout_p, scale, seed, cu_seqlens_q = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, cu_seqlens_q)
    ctx.max_len, ctx.dropout_p, ctx.scale = max_len, dropout_p, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, seed, cu_seqlens_q = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward_op(q, k, v, out, lse, dout, cu_seqlens, ctx.max_len,
                                              ctx.dropout_p, ctx.scale, seed, cu_seqlens_q)
    return dq, dk, dv, None, None, None, None, None, None


varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(q, k, v, cu_seqlens, max_len: int, dropout_p: float = 0.0,
                     scale: Optional[float] = None, seed=None, cu_seqlens_q=None):
    q, k, v = cast(autocast_dtype(q.device.type, q, k, v), q, k, v)
    if dropout_p > 0 and seed is None:
        seed = ops.dropout_seed(dropout_p)
    return varlen_attention_op(q, k, v, cu_seqlens, max_len, dropout_p, scale,
                               seed if dropout_p > 0 else None, cu_seqlens_q)[0]


OPS = {"varlen_attention": varlen_attention}
