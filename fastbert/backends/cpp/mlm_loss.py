"""C++ glue for ``mlm_loss`` (kernel: csrc/cpu/mlm_loss.cpp; reference:
fastbert.backends.reference.mlm_loss).

``torch.ops.fastbert.mlm_loss`` returns ``(loss, lse[B, P])``: the per-slot logsumexp is
all the backward keeps besides the inputs (it recomputes the small MLP and, tile by tile,
the logits).  The kernel works on tiles of 64 slots x ``VOCAB_CHUNK`` vocab columns, each
used while it sits in cache (csrc/cpu/mlm_loss.cpp).
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


@torch.library.register_fake("fastbert::mlm_loss")
def _(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk):
    acc = _acc(X.dtype)
    return X.new_empty((), dtype=acc), X.new_empty(positions.shape, dtype=acc)


torch.library.register_fake("fastbert::mlm_loss_backward")(fake_backward)
torch.library.register_autograd("fastbert::mlm_loss", make_backward(_bwd),
                                setup_context=setup_context)


def mlm_loss(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps):
    return _fwd(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps,
                VOCAB_CHUNK)[0]


OPS = {"mlm_loss": mlm_loss}
