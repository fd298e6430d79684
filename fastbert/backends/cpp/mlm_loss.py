"""C++ glue for ``mlm_loss`` (kernel: csrc/cpu/mlm_loss.cpp; reference:
fastbert.backends.reference.mlm_loss).

``torch.ops.fastbert.mlm_loss`` returns ``(loss, lse[B, P])``: the per-slot logsumexp is
all the backward keeps besides the inputs (it recomputes the small MLP and, chunk by chunk,
the logits).  ``VOCAB_CHUNK`` columns of logits exist at a time.
"""
from __future__ import annotations

import torch

# Columns of logits per chunk: [real slots, VOCAB_CHUNK] is the largest temporary.  Tests
# shrink it to exercise several chunks, a ragged last chunk and a chunk wider than V.
VOCAB_CHUNK = 2048

_fwd = torch.ops.fastbert.mlm_loss  # AttributeError if the extension lacks the kernel
_bwd = torch.ops.fastbert.mlm_loss_backward


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastbert::mlm_loss")
def _(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk):
    acc = _acc(X.dtype)
    return X.new_empty((), dtype=acc), X.new_empty(positions.shape, dtype=acc)


@torch.library.register_fake("fastbert::mlm_loss_backward")
def _(grad_loss, grad_lse, X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2,
      eps, chunk, lse):
    return tuple(torch.empty_like(t) for t in (X, w1, b1, ln_weight, ln_bias, w2, b2))


def _setup_context(ctx, inputs, output):
    X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk = inputs
    ctx.save_for_backward(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2,
                          output[1])
    ctx.eps, ctx.chunk = eps, chunk


def _backward(ctx, grad_loss, grad_lse):
    *inputs, lse = ctx.saved_tensors
    dX, dw1, db1, dln_w, dln_b, dw2, db2 = _bwd(grad_loss, grad_lse, *inputs, ctx.eps,
                                                ctx.chunk, lse)
    return dX, None, None, None, dw1, db1, dln_w, dln_b, dw2, db2, None, None


torch.library.register_autograd("fastbert::mlm_loss", _backward, setup_context=_setup_context)


def mlm_loss(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps):
    return _fwd(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps,
                VOCAB_CHUNK)[0]


OPS = {"mlm_loss": mlm_loss}
