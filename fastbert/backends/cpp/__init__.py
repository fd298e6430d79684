"""The ``cpp`` backend: the C++ extension ``fastbert._C`` (CPU kernels; CUDA where built).

Each op's Python glue (fake kernel, autograd, the backend function with the reference
signature) lives in its own module in this package and exports ``OPS = {op name: function}``;
this file loads the extension, imports every glue module, and registers what they export.
A glue module whose kernels are missing from the built extension is skipped (that op falls
back to the reference), so a partial build never breaks the package.

``FASTBERT_CPU_CACHE_MB=N`` (N > 0) installs the extension's caching CPU allocator for blocks
of 1 MiB and more, keeping at most N MB of freed blocks (csrc/cpu/caching_allocator.cpp:
glibc returns large blocks to the kernel, so every train step page-faults them back in).
Off by default: it is process-wide, and it speeds up whatever else runs in the process too.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import warnings

import torch

from .. import Backend, register_backend

import fastbert._C  # noqa: F401  (raises ImportError when the extension was not built)


def _cache_limit_mb() -> int:
    """FASTBERT_CPU_CACHE_MB; a bad value warns and leaves the cache off (the kernels still
    load: a typo must not cost the whole backend)."""
    raw = os.environ.get("FASTBERT_CPU_CACHE_MB", "0")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        warnings.warn(f"fastbert: FASTBERT_CPU_CACHE_MB must be a non-negative integer (MB), "
                      f"got {raw!r}; the caching CPU allocator stays off", RuntimeWarning)
        return 0
    return value


if hasattr(torch.ops.fastbert, "enable_cpu_caching_allocator") and _cache_limit_mb() > 0:
    torch.ops.fastbert.enable_cpu_caching_allocator(_cache_limit_mb())

OPS: dict = {}
SKIPPED: dict = {}  # glue module -> why it was skipped
for _info in pkgutil.iter_modules(__path__):
    try:
        OPS.update(importlib.import_module(f"{__name__}.{_info.name}").OPS)
    except (ImportError, AttributeError, RuntimeError) as _exc:
        SKIPPED[_info.name] = f"{type(_exc).__name__}: {_exc}"

_devices = {"cpu"} | ({"cuda"} if getattr(torch.ops.fastbert, "_cuda_built", None) else set())
register_backend(Backend("cpp", OPS, device_types=frozenset(_devices),
                         dtypes=frozenset({torch.float32, torch.bfloat16}),
                         # pack/unpack copy whole rows of bytes: token ids pack too.
                         op_dtypes={op: frozenset({torch.float32, torch.bfloat16, torch.int32,
                                                   torch.int64}) for op in ("pack", "unpack")}))
