"""Triton glue for ``ffn`` (kernels: kernels/ffn.py, a matmul with a bias + activation
epilogue forward and an activation-derivative epilogue backward).

custom_op + register_fake + register_autograd, not triton_op: see masked_softmax.py here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert.kernels import ffn as kernel

from ..autocast import autocast_dtype, cast


@torch.library.custom_op("fastbert_triton::ffn", mutates_args=())
def ffn_op(x2d: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
           activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    return kernel.forward(x2d, w1, b1, w2, b2, activation)


@ffn_op.register_fake
def _(x2d, w1, b1, w2, b2, activation):
    M = x2d.shape[0]
    F = w1.shape[0]
    h = x2d.new_empty((M, F) if activation == "gelu" else (0,))
    return x2d.new_empty((M, w2.shape[0])), x2d.new_empty((M, F)), h


@torch.library.custom_op("fastbert_triton::ffn_backward", mutates_args=())
def ffn_backward_op(dout: Tensor, x2d: Tensor, w1: Tensor, w2: Tensor, a: Tensor, h: Tensor,
                    activation: str, has_b1: bool,
                    has_b2: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernel.backward(dout, x2d, w1, w2, a, h, activation, has_b1, has_b2)


@ffn_backward_op.register_fake
def _(dout, x2d, w1, w2, a, h, activation, has_b1, has_b2):
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x2d, memory_format=torch.contiguous_format),
            torch.empty_like(w1, memory_format=torch.contiguous_format),
            dout.new_empty((w1.shape[0],) if has_b1 else (0,), **f32),
            torch.empty_like(w2, memory_format=torch.contiguous_format),
            dout.new_empty((w2.shape[0],) if has_b2 else (0,), **f32))


def _setup_context(ctx, inputs, output):
    x2d, w1, b1, w2, b2, activation = inputs
    _, a, h = output
    ctx.mark_non_differentiable(a, h)
    ctx.save_for_backward(x2d, w1, w2, a, h)
    ctx.activation = activation
    ctx.b1_dtype = None if b1 is None else b1.dtype
    ctx.b2_dtype = None if b2 is None else b2.dtype


def _backward(ctx, dout, _da, _dh):
    x2d, w1, w2, a, h = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = ffn_backward_op(dout, x2d, w1, w2, a, h, ctx.activation,
                                             ctx.b1_dtype is not None, ctx.b2_dtype is not None)
    return (dx, dw1, None if ctx.b1_dtype is None else db1.to(ctx.b1_dtype), dw2,
            None if ctx.b2_dtype is None else db2.to(ctx.b2_dtype), None)


ffn_op.register_autograd(_backward, setup_context=_setup_context)


def ffn(x, w1, b1, w2, b2, activation: str = "relu"):
    x, w1, b1, w2, b2 = cast(autocast_dtype(x.device.type, x, w1, b1, w2, b2), x, w1, b1, w2, b2)
    lead = x.shape[:-1]
    out = ffn_op(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2, activation)[0]
    return out.reshape(lead + (w2.shape[0],))


OPS = {"ffn": ffn}
