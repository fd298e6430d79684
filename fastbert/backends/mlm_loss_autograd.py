"""What the ``mlm_loss`` glue of every kernel backend shares: both ops have the same schema,
``mlm_loss(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk)
-> (loss, lse[B, P])`` and ``mlm_loss_backward(grad_loss, grad_lse, <those inputs but chunk>,
eps, chunk, lse) -> (dX, dw1, db1, dln_weight, dln_bias, dw2, db2)``, so the fake backward,
the autograd context and the backward wrapper are the same code."""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss and lse dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_backward(grad_loss, grad_lse, X, positions, weights, labels, w1, b1, ln_weight,
                  ln_bias, w2, b2, eps, chunk, lse):
    return tuple(torch.empty_like(t) for t in (X, w1, b1, ln_weight, ln_bias, w2, b2))


def setup_context(ctx, inputs, output):
    X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk = inputs
    ctx.save_for_backward(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2,
                          output[1])
    ctx.eps, ctx.chunk = eps, chunk


def make_backward(backward_op):
    """The autograd backward of an ``mlm_loss`` op whose backward kernel is ``backward_op``."""
    def backward(ctx, grad_loss, grad_lse):
        *inputs, lse = ctx.saved_tensors
        dX, dw1, db1, dln_w, dln_b, dw2, db2 = backward_op(grad_loss, grad_lse, *inputs,
                                                           ctx.eps, ctx.chunk, lse)
        return dX, None, None, None, dw1, db1, dln_w, dln_b, dw2, db2, None, None
    return backward
