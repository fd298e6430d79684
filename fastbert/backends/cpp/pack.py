"""cpp glue for ``pack`` / ``unpack`` (the unpadded encoder's entry and exit): fake kernels,
autograd, the backend functions.

Kernels: csrc/cpu/pack.cpp (CUDA: csrc/cuda/pack.cu).  Reference:
:func:`fastbert.backends.reference.pack` / ``unpack``.  ``pack``'s row count T is
data-dependent: its fake kernel makes it an unbacked size, so torch.compile traces through
without a graph break.  ``max_len`` is exact in eager; while compiling it is the padded
length L (an upper bound), so no data-dependent Python int is needed.
"""
from __future__ import annotations

import torch

from ..kernel_call import call_kernel

_ops = torch.ops.fastbert
_ops.pack  # noqa: B018  (AttributeError -> this glue is skipped: kernel not built)


@torch.library.register_fake("fastbert::pack")
def _pack_fake(X, valid_lens):
    T = torch.library.get_ctx().new_dynamic_size()
    return X.new_empty((T,) + tuple(X.shape[2:])), valid_lens.new_empty((X.shape[0] + 1,))


@torch.library.register_fake("fastbert::unpack")
def _unpack_fake(packed, cu_seqlens, L):
    return packed.new_empty((cu_seqlens.shape[0] - 1, L) + tuple(packed.shape[1:]))


@torch.library.register_fake("fastbert::pack_rows")
def _pack_rows_fake(X, cu_seqlens, T):
    return X.new_empty((T,) + tuple(X.shape[2:]))


def _pack_setup(ctx, inputs, output):
    X, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.L = X.shape[1]


def _pack_backward(ctx, grad_packed, _grad_cu_seqlens):
    (cu_seqlens,) = ctx.saved_tensors
    return call_kernel(_ops.unpack, grad_packed, cu_seqlens, ctx.L), None


def _unpack_setup(ctx, inputs, output):
    packed, cu_seqlens, _ = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.T = packed.shape[0]


def _unpack_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return call_kernel(_ops.pack_rows, grad, cu_seqlens, ctx.T), None, None


def _pack_rows_setup(ctx, inputs, output):
    X, cu_seqlens, _ = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.L = X.shape[1]


def _pack_rows_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return call_kernel(_ops.unpack, grad, cu_seqlens, ctx.L), None, None


torch.library.register_autograd("fastbert::pack", _pack_backward, setup_context=_pack_setup)
torch.library.register_autograd("fastbert::unpack", _unpack_backward, setup_context=_unpack_setup)
torch.library.register_autograd("fastbert::pack_rows", _pack_rows_backward, setup_context=_pack_rows_setup)


def pack(X: torch.Tensor, valid_lens: torch.Tensor):
    packed, cu_seqlens = call_kernel(_ops.pack, X, valid_lens)
    if torch.compiler.is_compiling():
        max_len = X.shape[1]  # an upper bound; exact needs a data-dependent int
    else:
        max_len = int(valid_lens.max()) if valid_lens.numel() else 0
    return packed, cu_seqlens, max_len


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    return call_kernel(_ops.unpack, packed, cu_seqlens, L)


OPS = {"pack": pack, "unpack": unpack}
