"""Autocast for the cpp ops: custom ops get no autocast rule of their own, so their glue
casts floating inputs to the autocast dtype itself (as ``F.linear``/``bmm`` would be cast in
the reference), through differentiable ``.to`` calls so fp32 parameters still get grads."""
from __future__ import annotations

from typing import Optional

import torch

OPS: dict = {}  # helpers only (the package imports every module for its OPS)


def autocast_dtype(device_type: str, *tensors: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype to run in: the autocast dtype when autocast is on for this device, else the
    common dtype of the inputs when they differ (None: leave them as they are)."""
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
