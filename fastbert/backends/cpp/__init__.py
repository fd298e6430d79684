"""The ``cpp`` backend: the C++ extension ``fastbert._C`` (CPU kernels; CUDA where built).

Each op's Python glue (fake kernel, autograd, the backend function with the reference
signature) lives in its own module in this package and exports ``OPS = {op name: function}``;
this file loads the extension, imports every glue module, and registers what they export.
A glue module whose kernels are missing from the built extension is skipped (that op falls
back to the reference), so a partial build never breaks the package.

Loading it also installs the extension's caching CPU allocator for large blocks (on by
default; ``FASTBERT_CPU_CACHE_MB`` sizes it, ``0`` leaves it out): see :mod:`fastbert.cpu_cache`.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from .. import Backend, register_backend

import fastbert._C  # noqa: F401  (raises ImportError when the extension was not built)

from ... import cpu_cache  # noqa: E402

cpu_cache.install_from_env()

OPS: dict = {}
SKIPPED: dict = {}  # glue module -> why it was skipped
for _info in pkgutil.iter_modules(__path__):
    try:
        OPS.update(importlib.import_module(f"{__name__}.{_info.name}").OPS)
    except (ImportError, AttributeError, RuntimeError) as _exc:
        SKIPPED[_info.name] = f"{type(_exc).__name__}: {_exc}"


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{op}", "CUDA")
    except RuntimeError:  # no torch op of that name (a glue-level op)
        return False


# A CUDA build has CUDA twins of some ops only (csrc/cuda/); the others stay CPU-only, so
# asking for them on CUDA tensors falls back (with a warning) instead of failing to dispatch.
_cuda_built = bool(getattr(torch.ops.fastbert, "_cuda_built", None))
_devices = {"cpu"} | ({"cuda"} if _cuda_built else set())
_op_devices = {op: frozenset({"cpu", "cuda"} if _cuda_built and _has_cuda_kernel(op) else {"cpu"})
               for op in OPS}
register_backend(Backend("cpp", OPS, device_types=frozenset(_devices),
                         op_device_types=_op_devices,
                         dtypes=frozenset({torch.float32, torch.bfloat16}),
                         # pack/unpack copy whole rows of bytes: token ids pack too.
                         op_dtypes={op: frozenset({torch.float32, torch.bfloat16, torch.int32,
                                                   torch.int64}) for op in ("pack", "unpack")}))
