"""cpp glue for ``varlen_attention`` (attention within each packed sequence of
``q, k, v[T, H, D]``, or queries ``q[Tq, H, D]`` packed by their own ``cu_seqlens_q``):
fake kernels, autograd, the backend function.

Kernels: csrc/cpu/varlen_attention.cpp (fused per (sequence, head) on small tiles, never a
padded [B*H, L, L] tensor; shared core csrc/cpu/attention_core.h).  Reference:
:func:`fastbert.backends.reference.varlen_attention`.  The forward returns a per-row
logsumexp (fp32 [Tq, H]) beside the output; the backward recomputes the probabilities from
q and k (whole rows fit in its tiles) and regenerates the dropout mask from the seed.  The
score element (query row tq, head h, key row u), global packed rows, has dropout counter
``(tq * H + h) * Tk + u`` (``(t * H + h) * T + u`` for self-attention):
:func:`dropout_keep_scale` returns that mask laid out per sequence (for tests).
"""
from __future__ import annotations

import math

import torch

from ... import ops as _front
from ..autocast import autocast_dtype, cast
from ..kernel_call import call_kernel

_ops = torch.ops.fastbert
_ops.varlen_attention  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::varlen_attention")
def _varlen_attention_fake(q, k, v, cu_seqlens, dropout_p, scale, seed, cu_seqlens_q=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("fastbert::varlen_attention_backward")
def _varlen_attention_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, dropout_p, scale,
                                    seed, cu_seqlens_q=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, dropout_p, scale, seed, cu_seqlens_q = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, cu_seqlens_q)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, seed, cu_seqlens_q = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = call_kernel(_ops.varlen_attention_backward, grad_out, q, k, v, out, lse, cu_seqlens,
                                                ctx.dropout_p, ctx.scale, seed, cu_seqlens_q)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("fastbert::varlen_attention", _backward,
                                setup_context=_setup_context)


def varlen_attention(q, k, v, cu_seqlens, max_len: int, dropout_p: float = 0.0,
                     scale=None, seed=None, cu_seqlens_q=None):
    # max_len is only an upper bound here (the kernel reads the lengths from cu_seqlens).
    q, k, v = cast(autocast_dtype(q.device.type, q, k, v), q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if dropout_p > 0 and seed is None:
        seed = _front.dropout_seed(dropout_p)
    return call_kernel(_ops.varlen_attention, q, k, v, cu_seqlens, float(dropout_p), float(scale),
                                 seed if dropout_p > 0 else None, cu_seqlens_q)[0]


def dropout_keep_scale(cu_seqlens: torch.Tensor, num_heads: int, max_len: int,
                       dropout_p: float, seed: torch.Tensor,
                       cu_seqlens_q=None) -> torch.Tensor:
    """The keep-scale mask (0 or 1/(1-p)) the kernels apply, as ``[B, H, L, L]`` (query i,
    key j of sequence b; zero outside the sequence; queries by ``cu_seqlens_q`` when given,
    ``max_len`` bounding the query counts too).  For tests."""
    cu_q = cu_seqlens if cu_seqlens_q is None else cu_seqlens_q
    Tq, Tk, H, L = int(cu_q[-1]), int(cu_seqlens[-1]), num_heads, max_len
    keep = _ops.dropout_mask(seed, [Tq, H, Tk], float(dropout_p))  # the counter space
    out = torch.zeros(cu_seqlens.shape[0] - 1, H, L, L)
    for b, (qs, qe, ks, ke) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(),
                                             cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        block = keep[qs:qe, :, ks:ke]  # [i, h, j]
        out[b, :, :qe - qs, :ke - ks] = block.permute(1, 0, 2).float() / (1.0 - dropout_p)
    return out


OPS = {"varlen_attention": varlen_attention}
