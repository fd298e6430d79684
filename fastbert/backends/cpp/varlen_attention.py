"""cpp glue for ``varlen_attention`` (attention within each packed sequence of
``q, k, v[T, H, D]``): fake kernels, autograd, the backend function.

Kernels: csrc/cpu/varlen_attention.cpp (fused per (sequence, head) on small tiles, never a
padded [B*H, L, L] tensor; shared core csrc/cpu/attention_core.h).  Reference:
:func:`fastbert.backends.reference.varlen_attention`.  The forward returns a per-row
logsumexp (fp32 [T, H]) beside the output; the backward recomputes the probabilities from
q and k (whole rows fit in its tiles) and regenerates the dropout mask from the seed.  The score element (query token t, head
h, key token u), t and u global packed rows, has dropout counter ``(t * H + h) * T + u``:
:func:`dropout_keep_scale` returns that mask laid out per sequence (for tests).
"""
from __future__ import annotations

import math

import torch

from ... import ops as _front
from ..autocast import autocast_dtype, cast

_ops = torch.ops.fastbert
_ops.varlen_attention  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::varlen_attention")
def _varlen_attention_fake(q, k, v, cu_seqlens, dropout_p, scale, seed):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("fastbert::varlen_attention_backward")
def _varlen_attention_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, dropout_p, scale,
                                    seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _ops.varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens,
                                                ctx.dropout_p, ctx.scale, seed)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("fastbert::varlen_attention", _backward,
                                setup_context=_setup_context)


def varlen_attention(q, k, v, cu_seqlens, max_len: int, dropout_p: float = 0.0,
                     scale=None, seed=None):
    # max_len is only an upper bound here (the kernel reads the lengths from cu_seqlens).
    q, k, v = cast(autocast_dtype(q.device.type, q, k, v), q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if dropout_p > 0 and seed is None:
        seed = _front.dropout_seed(dropout_p)
    return _ops.varlen_attention(q, k, v, cu_seqlens, float(dropout_p), float(scale),
                                 seed if dropout_p > 0 else None)[0]


def dropout_keep_scale(cu_seqlens: torch.Tensor, num_heads: int, max_len: int,
                       dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The keep-scale mask (0 or 1/(1-p)) the kernels apply, as ``[B, H, L, L]`` (query i,
    key j of sequence b; zero outside the sequence).  For tests."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    T, H, L = int(cu_seqlens[-1]), num_heads, max_len
    keep = _ops.dropout_mask(seed, [T, H, T], float(dropout_p))  # the counter space
    out = torch.zeros(len(lengths), H, L, L)
    for b, (start, n) in enumerate(zip(cu_seqlens[:-1].tolist(), lengths)):
        block = keep[start:start + n, :, start:start + n]  # [i, h, j]
        out[b, :, :n, :n] = block.permute(1, 0, 2).float() / (1.0 - dropout_p)
    return out


OPS = {"varlen_attention": varlen_attention}
