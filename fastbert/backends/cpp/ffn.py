"""cpp glue for ``ffn`` (``dense2(act(dense1(x)))``, nn.Linear layouts, relu or gelu): fake
kernels, autograd, the backend function.

Kernels: csrc/cpu/ffn.cpp (oneDNN GEMMs with bias + relu fused in the epilogue, through
torch's ``mkldnn::_linear_pointwise``).  Reference: :func:`fastbert.backends.reference.ffn`.
The forward keeps one [M, F] tensor for the backward (relu: the activation, whose sign is
the mask; gelu: the pre-activation, from which gelu and gelu' are recomputed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..autocast import autocast_dtype, cast
from ..kernel_call import call_kernel, small_gemm

_ops = torch.ops.fastbert
_ops.ffn  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::ffn")
def _ffn_fake(x, w1, b1, w2, b2, activation):
    rows = math.prod(x.shape[:-1])
    return (x.new_empty(tuple(x.shape[:-1]) + (w2.shape[0],)),
            x.new_empty((rows, w1.shape[0])))


@torch.library.register_fake("fastbert::ffn_backward")
def _ffn_backward_fake(grad_y, x, w1, b1, w2, b2, saved, activation):
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty((w1.shape[0],)),
            w2.new_empty(w2.shape), w2.new_empty((w2.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation = inputs
    _, saved = output
    ctx.save_for_backward(x, w1, b1, w2, b2, saved)
    ctx.activation = activation


def _backward(ctx, grad_y, _grad_saved):
    x, w1, b1, w2, b2, saved = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = call_kernel(_ops.ffn_backward, grad_y, x, w1, b1, w2, b2, saved, ctx.activation)
    return dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None, None


torch.library.register_autograd("fastbert::ffn", _backward, setup_context=_setup_context)


def ffn(x, w1, b1, w2, b2, activation: str = "relu"):
    x, w1, b1, w2, b2 = cast(autocast_dtype(x.device.type, x, w1, b1, w2, b2), x, w1, b1, w2, b2)
    if small_gemm(x):  # a few rows, no grad: ATen's addmm is faster there (kernel_call.py)
        h = F.linear(x, w1, b1)
        h = F.relu_(h) if activation == "relu" else F.gelu(h)
        return F.linear(h, w2, b2)
    return call_kernel(_ops.ffn, x, w1, b1, w2, b2, activation)[0]


OPS = {"ffn": ffn}
