"""The ``cpp`` backend: the C++ extension (CPU kernels; CUDA where built).

The extension is a portable core module, ``fastbert._C`` (op schemas, CPU feature probe,
caching allocator, CUDA twins), plus the CPU kernels built once per instruction set,
``fastbert._C_cpu_<variant>``; this file loads the core, then the one variant this CPU runs
(:mod:`fastbert.cpu_variants`): ``CPU_VARIANT`` says which and ``CPU_VARIANT_REASON`` why.

Each op's Python glue (fake kernel, autograd, the backend function with the reference
signature) lives in its own module in this package and exports ``OPS = {op name: function}``;
this file imports every glue module and registers what they export.  A glue module whose
kernels are missing from the built extension is skipped (that op falls back to the
reference), so a partial build never breaks the package.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
import pkgutil

import torch

from .. import Backend, register_backend
from ... import cpu_variants


def _build_failures() -> dict:
    """What the build recorded as failed to compile (setup.py writes fastbert/_build_report.json)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "_build_report.json")
    try:
        with open(path) as f:
            return json.load(f).get("failed", {})
    except (OSError, ValueError):
        return {}


try:
    import fastbert._C  # noqa: F401
except ImportError as _exc:  # say what the build said, if it failed
    _failed = _build_failures()
    raise ImportError(f"{_exc}" + (f"; the build reported: {_failed.get('fastbert._C', _failed)}"
                                   if _failed else "")) from _exc


def _load_cpu_variant():
    """Import the best CPU kernel module this CPU can execute; ``(name, why, rejected)``."""
    features = list(torch.ops.fastbert._cpu_features())
    built = [v.name for v in cpu_variants.VARIANTS
             if importlib.util.find_spec(cpu_variants.module_name(v.name)) is not None]
    name, why, rejected = cpu_variants.select_variant(
        features, built, os.environ.get(cpu_variants.ENV) or None)
    if name is None:
        raise ImportError(f"no CPU kernel module of fastbert can run on this CPU ({why}; built: "
                          f"{built or 'none'}; CPU features: {features or 'none detected'})")
    importlib.import_module(cpu_variants.module_name(name))
    return name, why, rejected


CPU_VARIANT, CPU_VARIANT_REASON, CPU_VARIANT_REJECTED = _load_cpu_variant()
if CPU_VARIANT_REASON.startswith(cpu_variants.ENV):
    warnings.warn(f"fastbert: {CPU_VARIANT_REASON} -> using the {CPU_VARIANT} CPU kernels",
                  RuntimeWarning, stacklevel=2)
else:
    # A better variant this CPU runs, but missing from the install: slower, so say so.
    _unbuilt = [n for n, why in CPU_VARIANT_REJECTED.items() if why.startswith("not built")]
    if _unbuilt:
        _failed = _build_failures()
        warnings.warn(
            f"fastbert: this CPU runs the {_unbuilt[0]} CPU kernels, but they are not in this "
            f"install ({_failed.get(cpu_variants.module_name(_unbuilt[0]), 'not built')}); "
            f"using the slower {CPU_VARIANT} kernels", RuntimeWarning, stacklevel=2)

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
