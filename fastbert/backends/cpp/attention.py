"""cpp glue for ``attention`` (padded: ``softmax(q k^T * scale, masked) v`` for
``q[N, Lq, D]``, ``k[N, Lk, D]``, ``v[N, Lk, Dv]``, valid_lens None / [N] / [N, Lq]): fake
kernels, autograd, the backend function.

Kernels: csrc/cpu/attention.cpp (scores, masked softmax and P V fused per batch entry on
small tiles; shared core csrc/cpu/attention_core.h).  Reference:
:func:`fastbert.backends.reference.attention` (d2l: a valid length of 0 gives a uniform row
with no gradient to the scores).  The forward returns a per-row logsumexp (fp32 [N, Lq]);
the backward recomputes the probabilities from q and k and regenerates the dropout mask, whose element
(n, i, j) has counter ``(n * Lq + i) * Lk + j`` (the flat index: ``dropout_mask(seed,
[N, Lq, Lk], p)`` of the add_layernorm glue returns it).
"""
from __future__ import annotations

import math

import torch

from ... import ops as _front
from ..autocast import autocast_dtype, cast
from ..kernel_call import call_kernel

_ops = torch.ops.fastbert
_ops.attention  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::attention")
def _attention_fake(q, k, v, valid_lens, dropout_p, scale, seed):
    N, Lq = q.shape[0], q.shape[1]
    return q.new_empty((N, Lq, v.shape[2])), q.new_empty((N, Lq), dtype=torch.float32)


@torch.library.register_fake("fastbert::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, valid_lens, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, valid_lens, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, valid_lens, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, valid_lens, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = call_kernel(_ops.attention_backward, grad_out, q, k, v, out, lse, valid_lens,
                                         ctx.dropout_p, ctx.scale, seed)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("fastbert::attention", _backward, setup_context=_setup_context)


def attention(q, k, v, valid_lens, dropout_p: float = 0.0, scale=None):
    q, k, v = cast(autocast_dtype(q.device.type, q, k, v), q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    seed = _front.dropout_seed(dropout_p) if dropout_p > 0 else None
    return call_kernel(_ops.attention, q, k, v, valid_lens, float(dropout_p), float(scale), seed)[0]


OPS = {"attention": attention}
