"""Autocast for the kernel backends' ops (cpp and triton): custom ops get no autocast rule of
their own, so the glue casts floating inputs to the autocast dtype itself (as the reference's
``F.linear``/``bmm`` would be cast), through differentiable ``.to`` calls so fp32 parameters
still get fp32 grads.
Without autocast, inputs of mixed dtypes run in their promoted dtype (as the reference)."""
from __future__ import annotations

from typing import Optional

import torch

OPS: dict = {}  # helpers only (the package imports every module for its OPS)


def autocast_dtype(device_type: str, *tensors: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype to run in: the autocast dtype when autocast is on for this device, else the
    promoted dtype of the inputs when they differ (None: leave them as they are)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        dtype = None
        for d in dtypes:
            dtype = d if dtype is None else torch.promote_types(dtype, d)
        return dtype
    return None


def cast(dtype: Optional[torch.dtype], *tensors: Optional[torch.Tensor]):
    if dtype is None:
        return tensors
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
