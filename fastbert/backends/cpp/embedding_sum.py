"""cpp glue for ``embedding_sum`` (the unpadded encoder's token + segment + position
embedding of its packed ids): fake kernels, autograd, the backend function.

Kernel: csrc/cpu/embedding_sum.cpp.  Reference:
:func:`fastbert.backends.reference.embedding_sum`.  The backward computes only the tables'
gradients autograd asks for (d2l 0.17 never trains the positional table), each a
deterministic scatter-add into a dense gradient, as ``nn.Embedding`` gives.
"""
from __future__ import annotations

import torch

from ..kernel_call import call_kernel

_ops = torch.ops.fastbert
_ops.embedding_sum  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::embedding_sum")
def _embedding_sum_fake(ids, token_weight, segment_weight, position_weight):
    return token_weight.new_empty((ids.shape[0], token_weight.shape[1]))


@torch.library.register_fake("fastbert::embedding_sum_backward")
def _embedding_sum_backward_fake(grad, ids, V, S, P, needs):
    C = grad.shape[1]
    return tuple(grad.new_empty((n, C)) if need else grad.new_empty((0,))
                 for n, need in zip((V, S, P), needs))


def _setup_context(ctx, inputs, output):
    ids, token_weight, segment_weight, position_weight = inputs
    ctx.save_for_backward(ids)
    ctx.rows = (token_weight.shape[0], segment_weight.shape[0], position_weight.shape[0])


def _backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[1:4])
    grads = call_kernel(_ops.embedding_sum_backward, grad, ids, *ctx.rows, needs)
    return (None,) + tuple(g if need else None for g, need in zip(grads, needs))


torch.library.register_autograd("fastbert::embedding_sum", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastbert::embedding_sum_backward: double backward is not implemented "
                              "(use the reference backend for higher-order gradients)")


torch.library.register_autograd("fastbert::embedding_sum_backward", _no_double_backward)


def embedding_sum(ids, token_weight, segment_weight, position_weight):
    return call_kernel(_ops.embedding_sum, ids, token_weight, segment_weight, position_weight)


OPS = {"embedding_sum": embedding_sum}
