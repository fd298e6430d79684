"""cpp glue for ``gather_positions`` (the MLM gather ``X[b, positions[b, p]]``): fake
kernels, autograd, the backend function.

Kernels: csrc/cpu/gather_positions.cpp (CUDA: csrc/cuda/gather_positions.cu).  Reference:
:func:`fastbert.backends.reference.gather_positions`.  The backward is a deterministic
scatter-add (positions may repeat); each op is the other's backward, so double backward works.
"""
from __future__ import annotations

import torch

from ..kernel_call import call_kernel

_ops = torch.ops.fastbert
_ops.gather_positions  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::gather_positions")
def _gather_fake(X, positions):
    return X.new_empty((X.shape[0], positions.shape[1], X.shape[2]))


@torch.library.register_fake("fastbert::gather_positions_backward")
def _gather_backward_fake(grad_out, positions, L):
    return grad_out.new_empty((grad_out.shape[0], L, grad_out.shape[2]))


def _gather_setup(ctx, inputs, output):
    X, positions = inputs
    ctx.save_for_backward(positions)
    ctx.L = X.shape[1]


def _gather_backward(ctx, grad_out):
    (positions,) = ctx.saved_tensors
    return call_kernel(_ops.gather_positions_backward, grad_out, positions, ctx.L), None


def _scatter_setup(ctx, inputs, output):
    _, positions, _ = inputs
    ctx.save_for_backward(positions)


def _scatter_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    return call_kernel(_ops.gather_positions, grad, positions), None, None


torch.library.register_autograd("fastbert::gather_positions", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("fastbert::gather_positions_backward", _scatter_backward,
                                setup_context=_scatter_setup)


def gather_positions(X: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return call_kernel(_ops.gather_positions, X, positions.to(torch.int64))


OPS = {"gather_positions": gather_positions}
