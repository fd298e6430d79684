"""The ``triton`` backend: Triton kernels from ``kernels/`` (GPU; CPU tensors only under
TRITON_INTERPRET=1, the interpreter used to verify them here).

Each op's glue (a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``
around the launcher) lives in its own module in this package and exports
``OPS = {op name: function}``; this file imports every glue module and registers the backend.
"""
from __future__ import annotations

import importlib
import os
import pkgutil

import torch

from .. import Backend, register_backend

import triton  # noqa: F401  (ImportError -> backend unavailable)

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

OPS: dict = {}
SKIPPED: dict = {}
for _info in pkgutil.iter_modules(__path__):
    try:
        OPS.update(importlib.import_module(f"{__name__}.{_info.name}").OPS)
    except (ImportError, AttributeError, RuntimeError) as _exc:
        SKIPPED[_info.name] = f"{type(_exc).__name__}: {_exc}"

_devices = ({"cuda"} if torch.cuda.is_available() else set()) | ({"cpu"} if INTERPRETER else set())
register_backend(Backend(
    "triton", OPS, device_types=frozenset(_devices),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    # pack/unpack copy elements unchanged: token ids pack too.
    op_dtypes={op: frozenset({torch.float32, torch.bfloat16, torch.float16, torch.int32,
                              torch.int64}) for op in ("pack", "unpack")},
    available=bool(_devices),
    reason="" if _devices else "no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)"))
