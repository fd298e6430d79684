"""Triton glue for ``pack`` and ``unpack`` (kernels: kernels/pack_unpack.py).

custom_op + register_fake + register_autograd, not triton_op: see masked_softmax.py here.
pack's output length T depends on the data: its fake kernel allocates a new dynamic size,
so torch.compile traces through pack without a graph break.  max_len is computed outside
the op: eagerly the true maximum (a device sync), under compile the padded L (an upper bound
that the attention kernels accept, so no data-dependent int reaches Python).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from fastbert.kernels import pack_unpack as kernel


@torch.library.custom_op("fastbert_triton::pack", mutates_args=())
def pack_op(X: Tensor, valid_lens: Tensor) -> Tuple[Tensor, Tensor]:
    return kernel.pack(X, valid_lens)


@pack_op.register_fake
def _(X, valid_lens):
    T = torch.library.get_ctx().new_dynamic_size()
    return (X.new_empty((T,) + tuple(X.shape[2:])),
            valid_lens.new_empty((X.shape[0] + 1,), dtype=torch.int32))


@torch.library.custom_op("fastbert_triton::pack_rows", mutates_args=())
def pack_rows_op(X: Tensor, cu_seqlens: Tensor, T: int) -> Tensor:
    return kernel.pack_rows(X, cu_seqlens, T)


@pack_rows_op.register_fake
def _(X, cu_seqlens, T):
    return X.new_empty((T,) + tuple(X.shape[2:]))


@torch.library.custom_op("fastbert_triton::unpack", mutates_args=())
def unpack_op(packed: Tensor, cu_seqlens: Tensor, L: int) -> Tensor:
    return kernel.unpack(packed, cu_seqlens, L)


@unpack_op.register_fake
def _(packed, cu_seqlens, L):
    return packed.new_empty((cu_seqlens.shape[0] - 1, L) + tuple(packed.shape[1:]))


def _pack_setup(ctx, inputs, output):
    X, _ = inputs
    packed, cu = output
    ctx.mark_non_differentiable(cu)
    ctx.save_for_backward(cu)
    ctx.L = X.shape[1]


def _pack_backward(ctx, dpacked, _dcu):
    (cu,) = ctx.saved_tensors
    return unpack_op(dpacked, cu, ctx.L), None


def _pack_rows_setup(ctx, inputs, output):
    X, cu, _ = inputs
    ctx.save_for_backward(cu)
    ctx.L = X.shape[1]


def _pack_rows_backward(ctx, dpacked):
    (cu,) = ctx.saved_tensors
    return unpack_op(dpacked, cu, ctx.L), None, None


def _unpack_setup(ctx, inputs, output):
    packed, cu, _ = inputs
    ctx.save_for_backward(cu)
    ctx.T = packed.shape[0]


def _unpack_backward(ctx, dout):
    (cu,) = ctx.saved_tensors
    return pack_rows_op(dout, cu, ctx.T), None, None


pack_op.register_autograd(_pack_backward, setup_context=_pack_setup)
pack_rows_op.register_autograd(_pack_rows_backward, setup_context=_pack_rows_setup)
unpack_op.register_autograd(_unpack_backward, setup_context=_unpack_setup)


def pack(X: Tensor, valid_lens: Tensor):
    packed, cu_seqlens = pack_op(X, valid_lens)
    if torch.compiler.is_compiling():
        max_len = X.shape[1]
    else:
        max_len = int(valid_lens.max()) if valid_lens.numel() else 0
    return packed, cu_seqlens, max_len


def unpack(packed: Tensor, cu_seqlens: Tensor, L: int) -> Tensor:
    return unpack_op(packed, cu_seqlens, L)


OPS = {"pack": pack, "unpack": unpack}
