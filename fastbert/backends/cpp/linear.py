"""cpp glue for ``linear`` (``F.linear``: ``x[..., K] @ weight[N, K].T + bias[N]``): fake
kernels, autograd, the backend function.

Kernel: csrc/cpu/linear.cpp (oneDNN GEMMs through torch's ``mkldnn::_linear_pointwise``,
2-3x MKL's addmm/mm in fp32 on this CPU).  Reference:
:func:`fastbert.backends.reference.linear`.  The backward needs only the inputs.
"""
from __future__ import annotations

import torch

from ..autocast import autocast_dtype, cast
from ..kernel_call import call_kernel, small_gemm

_ops = torch.ops.fastbert
_ops.linear  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::linear")
def _linear_fake(x, w, b):
    return x.new_empty(tuple(x.shape[:-1]) + (w.shape[0],))


@torch.library.register_fake("fastbert::linear_backward")
def _linear_backward_fake(grad_y, x, w, b):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty((w.shape[0],))


def _setup_context(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w, b)


def _backward(ctx, grad_y):
    x, w, b = ctx.saved_tensors
    dx, dw, db = call_kernel(_ops.linear_backward, grad_y, x, w, b)
    return dx, dw, db if b is not None else None


torch.library.register_autograd("fastbert::linear", _backward, setup_context=_setup_context)


def linear(x, weight, bias=None):
    x, weight, bias = cast(autocast_dtype(x.device.type, x, weight, bias), x, weight, bias)
    if small_gemm(x):  # a few rows, no grad: ATen's addmm is faster there (kernel_call.py)
        return torch.nn.functional.linear(x, weight, bias)
    return call_kernel(_ops.linear, x, weight, bias)


OPS = {"linear": linear}
