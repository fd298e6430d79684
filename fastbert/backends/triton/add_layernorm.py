"""Triton glue for ``add_layernorm`` (kernels: kernels/add_layernorm.py).

custom_op + register_fake + register_autograd, not triton_op: see masked_softmax.py here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert import ops
from fastbert.kernels import add_layernorm as kernel


@torch.library.custom_op("fastbert_triton::add_layernorm", mutates_args=())
def add_layernorm_op(x: Tensor, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float, dropout_p: float,
                     seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return kernel.forward(x, y, weight, bias, eps, dropout_p, seed)


@add_layernorm_op.register_fake
def _(x, y, weight, bias, eps, dropout_p, seed):
    R = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((R,), dtype=torch.float32)
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype))
    return out, stats, stats.clone()


@torch.library.custom_op("fastbert_triton::add_layernorm_backward", mutates_args=())
def add_layernorm_backward_op(dout: Tensor, x: Tensor, y: Tensor, weight: Optional[Tensor],
                              mean: Tensor, rstd: Tensor, dropout_p: float,
                              seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernel.backward(dout, x, y, weight, mean, rstd, dropout_p, seed)


@add_layernorm_backward_op.register_fake
def _(dout, x, y, weight, mean, rstd, dropout_p, seed):
    C = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(y, memory_format=torch.contiguous_format),
            x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, y, weight, bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, y, weight, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dout, _dmean, _drstd):
    x, y, weight, mean, rstd, seed = ctx.saved_tensors
    dx, dy, dw, db = add_layernorm_backward_op(dout, x, y, weight, mean, rstd, ctx.dropout_p,
                                               seed)
    dweight = None if weight is None else dw.to(weight.dtype)
    dbias = db.to(ctx.bias_dtype) if ctx.has_bias else None
    return dx, dy, dweight, dbias, None, None, None


add_layernorm_op.register_autograd(_backward, setup_context=_setup_context)


def add_layernorm(x, y, weight, bias, eps: float, dropout_p: float = 0.0, seed=None):
    if dropout_p > 0 and seed is None:
        seed = ops.dropout_seed(dropout_p)
    return add_layernorm_op(x, y, weight, bias, eps, dropout_p,
                            seed if dropout_p > 0 else None)[0]


OPS = {"add_layernorm": add_layernorm}
