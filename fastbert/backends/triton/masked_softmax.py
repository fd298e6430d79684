"""Triton glue for ``masked_softmax`` (kernels: kernels/masked_softmax.py).

Registration (the same for every Triton op here): ``torch.library.custom_op`` in the
``fastbert_triton`` namespace with an explicit ``register_fake`` and ``register_autograd``.
``torch.library.triton_op`` + ``wrap_triton`` would let Inductor see inside the kernels, but
under TRITON_INTERPRET=1 (the only way to verify them without a GPU) its fake-tensor tracing
runs the interpreter on fake tensors and fails, so neither opcheck nor torch.compile could be
tested here.  An opaque custom op with a hand-written fake is verifiable on CPU and still
compiles with fullgraph=True on a GPU (Inductor calls the op; the kernels are already fused).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbert.kernels import masked_softmax as kernel


@torch.library.custom_op("fastbert_triton::masked_softmax", mutates_args=())
def masked_softmax_op(X: Tensor, valid_lens: Optional[Tensor]) -> Tensor:
    return kernel.forward(X, valid_lens)


@masked_softmax_op.register_fake
def _(X, valid_lens):
    return torch.empty_like(X, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastbert_triton::masked_softmax_backward", mutates_args=())
def masked_softmax_backward_op(Y: Tensor, dY: Tensor, valid_lens: Optional[Tensor]) -> Tensor:
    return kernel.backward(Y, dY, valid_lens)


@masked_softmax_backward_op.register_fake
def _(Y, dY, valid_lens):
    return torch.empty_like(Y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output, inputs[1])


def _backward(ctx, dY):
    Y, valid_lens = ctx.saved_tensors
    return masked_softmax_backward_op(Y, dY, valid_lens), None


masked_softmax_op.register_autograd(_backward, setup_context=_setup_context)


def masked_softmax(X: Tensor, valid_lens: Optional[Tensor]) -> Tensor:
    return masked_softmax_op(X, valid_lens)


OPS = {"masked_softmax": masked_softmax}
