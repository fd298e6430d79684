"""Triton glue for ``gather_positions`` (kernels: kernels/gather_positions.py).

custom_op + register_fake + register_autograd, not triton_op: see masked_softmax.py here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastbert.kernels import gather_positions as kernel


@torch.library.custom_op("fastbert_triton::gather_positions", mutates_args=())
def gather_positions_op(X: Tensor, positions: Tensor) -> Tensor:
    return kernel.forward(X, positions)


@gather_positions_op.register_fake
def _(X, positions):
    return X.new_empty((X.shape[0], positions.shape[1], X.shape[2]))


@torch.library.custom_op("fastbert_triton::gather_positions_backward", mutates_args=())
def gather_positions_backward_op(dout: Tensor, positions: Tensor, L: int) -> Tensor:
    return kernel.backward(dout, positions, L)


@gather_positions_backward_op.register_fake
def _(dout, positions, L):
    return dout.new_empty((dout.shape[0], L, dout.shape[2]))


def _setup_context(ctx, inputs, output):
    X, positions = inputs
    ctx.save_for_backward(positions)
    ctx.L = X.shape[1]


def _backward(ctx, dout):
    (positions,) = ctx.saved_tensors
    return gather_positions_backward_op(dout, positions, ctx.L), None


gather_positions_op.register_autograd(_backward, setup_context=_setup_context)


def gather_positions(X: Tensor, positions: Tensor) -> Tensor:
    return gather_positions_op(X, positions)


OPS = {"gather_positions": gather_positions}
