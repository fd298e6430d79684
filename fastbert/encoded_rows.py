"""The unpadded encoder's padded output ``encoded_X[B, L, C]`` that answers a one-position
read, ``encoded_X[:, p, :]``, from its packed rows.

Why: the book's fine-tuning chapter defines its own ``BERTClassifier`` whose forward is
``self.output(self.hidden(self.encoder(...)[:, 0, :]))`` (and fastbert's ``BERTModel`` reads
``<cls>`` the same way for NSP).  Selected from the padded ``[B, L, C]`` output, the
backward of that select allocates a zero ``[B, L, C]`` gradient (at the chapter's batch 512 x
128 x 256, 67 MB, page-faulted anew each step) and ``unpack``'s backward gathers the packed
rows back out of it.  Read from the packed rows ``[T, C]`` (``index_select`` at
``cu_seqlens[b] + p``, zero where ``p`` is past the sequence's length), the same values come
back, bit for bit, and the gradient goes to the packed rows directly: measured ~80 ms -> ~38
ms for that backward alone (batch 512 SNLI lengths, 2 threads).

Only ``X[:, p, :]`` and ``X[:, p]`` with a Python int ``p`` are routed; every other op sees
the plain tensor (fastbert/routed_tensor.py), and a tensor changed in place falls back too.
Attached only while training (grad on, eager, the unpadded path).
"""
from __future__ import annotations

from typing import Optional

import torch

from .routed_tensor import RoutedTensor

__all__ = ["EncodedRows", "attach"]

_ALL = slice(None)


class EncodedRows(RoutedTensor):
    """``unpack(packed, cu_seqlens, L)``, with ``(packed, cu_seqlens, valid_lens, version)``
    attached."""

    ROUTES = {torch.Tensor.__getitem__: "_getitem"}

    @staticmethod
    def _getitem(args, kwargs):
        encoded, index = args
        if kwargs or not isinstance(encoded, EncodedRows):
            return NotImplemented
        p = _position(index, encoded.shape)
        packed, cu_seqlens, valid_lens, version = encoded._fastbert_attached
        if p is None or encoded._version != version or packed.shape[0] == 0:
            return NotImplemented
        rows = (cu_seqlens[:-1].long() + p).clamp_(max=packed.shape[0] - 1)
        inside = (valid_lens > p)[:, None]
        return torch.where(inside, packed.index_select(0, rows), 0.0)


def _position(index, shape) -> Optional[int]:
    """``p`` for ``[:, p]`` / ``[:, p, :]`` (an int in range) on a 3-D tensor, else None."""
    if len(shape) != 3 or not isinstance(index, tuple) or len(index) not in (2, 3):
        return None
    if index[0] != _ALL or (len(index) == 3 and index[2] != _ALL):
        return None
    p = index[1]
    if type(p) is not int or not -shape[1] <= p < shape[1]:
        return None  # a bool, tensor or out-of-range index: the plain op (and its error)
    return p % shape[1]


def attach(encoded: torch.Tensor, packed: torch.Tensor, cu_seqlens: torch.Tensor,
           valid_lens: torch.Tensor) -> torch.Tensor:
    """``encoded`` (= ``unpack(packed, cu_seqlens, L)``, just computed) as EncodedRows while
    training; unchanged otherwise."""
    if not encoded.requires_grad or torch.compiler.is_compiling():
        return encoded
    return EncodedRows.wrap(encoded, (packed, cu_seqlens, valid_lens, encoded._version))
