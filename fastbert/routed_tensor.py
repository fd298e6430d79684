"""A tensor that is the plain tensor to every op, except for the few calls its subclass
routes to a cheaper computation of the same values.

fastbert returns two such outputs when training (grad on, eager), so that the book's own code
runs faster without a change: the MLM logits (:class:`fastbert.head_logits.HeadLogits`:
``F.cross_entropy`` on them runs fused into the head's Linear layer) and the encoder's padded
output (:class:`fastbert.encoded_rows.EncodedRows`: ``encoded_X[:, 0, :]`` reads the packed
rows).  Everything else about them (values, storage, autograd history) is the tensor's own,
and any other op sees, and returns, a plain ``torch.Tensor``.  A route returns
``NotImplemented`` to fall back to the plain op.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch


class RoutedTensor(torch.Tensor):
    """Subclasses fill ``ROUTES`` (a torch function -> the name of a static method taking
    ``(args, kwargs)``) and ``KEEPS`` (ops whose result, a view of the whole tensor, keeps the
    subclass: :meth:`_keep` decides); what they need is in ``_fastbert_attached``."""

    ROUTES: Dict[Callable, str] = {}
    KEEPS: Tuple[Callable, ...] = ()
    _fastbert_attached: tuple

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = cls.ROUTES.get(func)
        if route is not None and not torch.compiler.is_compiling():
            out = getattr(cls, route)(args, kwargs)
            if out is not NotImplemented:
                return out
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in cls.KEEPS and args and isinstance(args[0], cls):
            return args[0]._keep(out)
        return out

    @classmethod
    def wrap(cls, tensor: torch.Tensor, attached: tuple) -> "RoutedTensor":
        """``tensor`` itself (same storage and autograd history) as ``cls``, with
        ``attached``."""
        with torch._C.DisableTorchFunctionSubclass():
            out = tensor.as_subclass(cls)
        out._fastbert_attached = attached
        return out

    def plain(self) -> torch.Tensor:
        """The same tensor as a plain ``torch.Tensor`` (no routes)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    def _keep(self, out):
        return out

    def __repr__(self, *, tensor_contents=None):
        # Printed as the tensor it is ("tensor(...)"), not under the subclass's name.
        return self.plain().__repr__(tensor_contents=tensor_contents)
