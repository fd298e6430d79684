"""cpp glue for ``masked_softmax``: fake kernels, autograd, the backend function.

Kernels: csrc/cpu/masked_softmax.cpp (CUDA: csrc/cuda/masked_softmax.cu).  Reference:
:func:`fastbert.backends.reference.masked_softmax`.  The backward is its own op,
``dX = y * (dy - sum(dy * y))`` on visible keys, 0 at masked keys and on valid-length-0 rows.
"""
from __future__ import annotations

import torch

from ..kernel_call import call_kernel

_ops = torch.ops.fastbert
_ops.masked_softmax  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::masked_softmax")
def _masked_softmax_fake(X, valid_lens):
    return X.new_empty(X.shape)


@torch.library.register_fake("fastbert::masked_softmax_backward")
def _masked_softmax_backward_fake(grad_out, out, valid_lens):
    return out.new_empty(out.shape)


def _setup_context(ctx, inputs, output):
    _, valid_lens = inputs
    ctx.save_for_backward(output, valid_lens)


def _backward(ctx, grad_out):
    out, valid_lens = ctx.saved_tensors
    return call_kernel(_ops.masked_softmax_backward, grad_out, out, valid_lens), None


torch.library.register_autograd("fastbert::masked_softmax", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastbert::masked_softmax_backward: double backward is not implemented (use the "
                              "reference backend for higher-order gradients)")


# Without an autograd kernel a double backward would silently treat the backward as constant.
torch.library.register_autograd("fastbert::masked_softmax_backward", _no_double_backward)


def masked_softmax(X: torch.Tensor, valid_lens):
    return call_kernel(_ops.masked_softmax, X, valid_lens)


OPS = {"masked_softmax": masked_softmax}
