"""C++ glue for ``mlm_loss`` (kernel: csrc/cpu/mlm_loss.cpp; reference:
fastbert.backends.reference.mlm_loss).

When gradients will be needed (grad mode on and an input requires grad), ``mlm_loss`` runs
``torch.ops.fastbert.mlm_loss_fwd_bwd``, which returns the loss and the gradients for
d loss = 1 from one sweep over the vocab (3 GEMM passes); its backward scales them by d loss.
Otherwise it runs the forward alone, ``torch.ops.fastbert.mlm_loss -> (loss, lse[B, P])``
(1 pass), whose own backward op (``mlm_loss_backward``: the MLP and, tile by tile, the
logits recomputed; 3 passes) serves callers of that op and honours d lse too.  The kernels
work on tiles of slots x ``VOCAB_CHUNK`` vocab columns, each used while it sits in cache
(csrc/cpu/mlm_loss.cpp).
"""
from __future__ import annotations

import torch

from ..mlm_loss_autograd import (accumulation_dtype as _acc, fake_backward, make_backward,
                                 setup_context)

# Vocab columns per tile: a [64, 512] fp32 tile (128 KB) and its 512 rows of w2 and dW2 stay
# in L2 (measured: 512 beats 256 and 2048 at the book's shape).  Tests shrink it to exercise
# several pieces, a ragged last piece and a piece wider than V.
VOCAB_CHUNK = 512

_fwd = torch.ops.fastbert.mlm_loss  # AttributeError if the extension lacks the kernel
_bwd = torch.ops.fastbert.mlm_loss_backward
_fwd_bwd = torch.ops.fastbert.mlm_loss_fwd_bwd


@torch.library.register_fake("fastbert::mlm_loss")
def _(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk):
    acc = _acc(X.dtype)
    return X.new_empty((), dtype=acc), X.new_empty(positions.shape, dtype=acc)


torch.library.register_fake("fastbert::mlm_loss_backward")(fake_backward)
torch.library.register_autograd("fastbert::mlm_loss", make_backward(_bwd),
                                setup_context=setup_context)


# mlm_loss_fwd_bwd: (loss, grads for d loss = 1) in one sweep.  Its backward only scales the
# saved grads by d loss (a 0-d tensor); the grads it returns are not differentiable outputs.
@torch.library.register_fake("fastbert::mlm_loss_fwd_bwd")
def _(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk):
    return (X.new_empty((), dtype=_acc(X.dtype)),
            *(torch.empty_like(t) for t in (X, w1, b1, ln_weight, ln_bias, w2, b2)))


def _fwd_bwd_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _fwd_bwd_backward(ctx, grad_loss, *_):
    dX, dw1, db1, dln_w, dln_b, dw2, db2 = (
        (grad_loss * g).to(g.dtype) for g in ctx.saved_tensors)
    return dX, None, None, None, dw1, db1, dln_w, dln_b, dw2, db2, None, None


torch.library.register_autograd("fastbert::mlm_loss_fwd_bwd", _fwd_bwd_backward,
                                setup_context=_fwd_bwd_setup_context)


def mlm_loss(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps):
    args = (X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, VOCAB_CHUNK)
    if torch.is_grad_enabled() and any(
            t.requires_grad for t in (X, w1, b1, ln_weight, ln_bias, w2, b2)):
        # Gradients will be needed: compute them with the loss (3 GEMM passes, not 4).
        return _fwd_bwd(*args)[0]
    return _fwd(*args)[0]


OPS = {"mlm_loss": mlm_loss}
