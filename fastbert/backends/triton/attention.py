"""Triton glue for the padded ``attention`` op (kernels: kernels/attention.py, which runs the
flash kernels of kernels/varlen_attention.py in padded mode).

custom_op + register_fake + register_autograd, not triton_op: see masked_softmax.py here.
The op contract has no seed argument, so a fresh one is drawn here (torch's CPU generator,
see fastbert.ops.dropout_seed) and handed to the op, whose backward regenerates the mask.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert import ops
from fastbert.kernels import attention as kernel

from ..autocast import autocast_dtype, cast


@torch.library.custom_op("fastbert_triton::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, valid_lens: Optional[Tensor],
                 dropout_p: float, scale: Optional[float],
                 seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return kernel.forward(q, k, v, valid_lens, dropout_p, scale, seed)


@attention_op.register_fake
def _(q, k, v, valid_lens, dropout_p, scale, seed):
    N, Lq, _ = q.shape
    return q.new_empty((N, Lq, v.shape[-1])), q.new_empty((2, 1, N * Lq), dtype=torch.float32)


@torch.library.custom_op("fastbert_triton::attention_backward", mutates_args=())
def attention_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dout: Tensor, valid_lens: Optional[Tensor], dropout_p: float,
                          scale: Optional[float],
                          seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return kernel.backward(q, k, v, out, lse, dout, valid_lens, dropout_p, scale, seed)


@attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, valid_lens, dropout_p, scale, seed):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, valid_lens, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, valid_lens, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, valid_lens, seed = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(q, k, v, out, lse, dout, valid_lens, ctx.dropout_p,
                                       ctx.scale, seed)
    return dq, dk, dv, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, valid_lens, dropout_p: float = 0.0, scale: Optional[float] = None,
              seed=None):
    """The reference signature; ``seed`` (extra, keyword) lets tests fix the dropout mask."""
    q, k, v = cast(autocast_dtype(q.device.type, q, k, v), q, k, v)
    if dropout_p > 0 and seed is None:
        seed = ops.dropout_seed(dropout_p)
    return attention_op(q, k, v, valid_lens, dropout_p, scale,
                        seed if dropout_p > 0 else None)[0]


OPS = {"attention": attention}
