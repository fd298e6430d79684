"""cpp glue for ``add_layernorm`` (``layer_norm(dropout(y) + x)``, d2l's AddNorm): fake
kernels, autograd, the backend function.

Without dropout, ``add_layernorm_backward`` returns an empty tensor for ``grad_y`` when x and y
share a dtype (it equals ``grad_x``, as in d2l's ``dropout(Y) + X``, whose add hands one
gradient to both): the glue passes ``grad_x`` for both, and the kernel saves writing a tensor
the size of ``x``.

The CPU kernel takes an fp32 ``x`` with a bf16 ``y`` (or the reverse), as autocast produces
them (fp32 residual, bf16 sublayer output): it computes and returns fp32, the promoted dtype,
and writes each gradient in its input's dtype, so no cast pass runs before or after it.

Kernels: csrc/cpu/add_layernorm.cpp (CUDA: csrc/cuda/add_layernorm.cu).  Reference:
:func:`fastbert.backends.reference.add_layernorm`.  The forward returns per-row mean and rstd
(fp32; fp64 for fp64 input) beside the output; the backward recomputes ``x + dropout(y)``
and regenerates the dropout mask from the seed.  ``dropout_mask(seed, shape, p)`` returns the
keep mask the kernels draw (for tests).
"""
from __future__ import annotations

import torch

from ... import ops as _front
from ..kernel_call import call_kernel

_ops = torch.ops.fastbert
_ops.add_layernorm  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastbert::add_layernorm")
def _add_layernorm_fake(x, y, weight, bias, eps, dropout_p, seed):
    stats = x.shape[:-1]
    out_dtype = torch.promote_types(x.dtype, y.dtype)
    acc = _stat_dtype(out_dtype)
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(stats, dtype=acc),
            x.new_empty(stats, dtype=acc))


@torch.library.register_fake("fastbert::add_layernorm_backward")
def _add_layernorm_backward_fake(grad_out, x, y, weight, mean, rstd, dropout_p, seed):
    param_dtype = weight.dtype if weight is not None else grad_out.dtype
    C = x.shape[-1]
    grad_y = y.new_empty(y.shape) if dropout_p > 0 or y.dtype != x.dtype else y.new_empty((0,))
    return (x.new_empty(x.shape), grad_y, x.new_empty((C,), dtype=param_dtype),
            x.new_empty((C,), dtype=param_dtype))


@torch.library.register_fake("fastbert::dropout_mask")
def _dropout_mask_fake(seed, shape, p):
    return seed.new_empty(shape, dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    x, y, weight, bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, y, weight, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.same_dtype = x.dtype == y.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, y, weight, mean, rstd, seed = ctx.saved_tensors
    dx, dy, dweight, dbias = call_kernel(_ops.add_layernorm_backward, grad_out, x, y, weight,
                                         mean, rstd, ctx.dropout_p, seed)
    if ctx.dropout_p == 0 and ctx.same_dtype:  # the kernel leaves grad_y out: it equals grad_x
        dy = dx
    if weight is None:
        dweight = None
    if ctx.bias_dtype is None:
        dbias = None
    elif dbias.dtype != ctx.bias_dtype:
        dbias = dbias.to(ctx.bias_dtype)
    return dx, dy, dweight, dbias, None, None, None


torch.library.register_autograd("fastbert::add_layernorm", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastbert::add_layernorm_backward: double backward is not implemented (use the "
                              "reference backend for higher-order gradients)")


# Without an autograd kernel a double backward would silently treat the backward as constant.
torch.library.register_autograd("fastbert::add_layernorm_backward", _no_double_backward)


# The dtype pair the CPU kernel reads as it is (autocast's fp32 residual + bf16 sublayer output).
_CPU_MIXED = {torch.float32, torch.bfloat16}


def add_layernorm(x, y, weight, bias, eps: float, dropout_p: float = 0.0, seed=None):
    if dropout_p > 0 and seed is None:
        seed = _front.dropout_seed(dropout_p)
    if x.dtype != y.dtype and not (x.device.type == "cpu" and {x.dtype, y.dtype} == _CPU_MIXED):
        # Other mixes run in the promoted dtype, as the reference's `dropout(y) + x`.
        dtype = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dtype), y.to(dtype)
    return call_kernel(_ops.add_layernorm, x, y, weight, bias, float(eps), float(dropout_p),
                              seed if dropout_p > 0 else None)[0]


def dropout_mask(seed: torch.Tensor, shape, p: float) -> torch.Tensor:
    """The bool keep mask (CPU) the fused kernels use for an output of ``shape``."""
    return _ops.dropout_mask(seed, list(shape), float(p))


OPS = {"add_layernorm": add_layernorm}
