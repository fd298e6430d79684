"""Backend registry and selection.

A backend is a named table ``op name -> implementation`` of the op contracts in
:mod:`fastbert.ops`.  Backends register themselves when their module is imported; the
``cpp`` and ``triton`` modules are imported lazily, the first time a backend is resolved,
so ``import fastbert`` stays cheap and never fails because a kernel toolchain is missing.

Selection, most specific first:

* ``with fastbert.use_backend("cpp"): ...``  (a block)
* ``fastbert.set_backend("cpp")``            (the process)
* ``FASTBERT_BACKEND=cpp``                   (the environment)
* ``auto`` (the default): the fastest available backend for the tensor's device.

A requested backend that is not available, or that lacks an op, a device or a dtype,
falls back to ``reference`` for that call, with one warning per (backend, reason).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional

import torch

__all__ = [
    "Backend", "register_backend", "set_backend", "get_backend", "use_backend",
    "available_backends", "resolve", "resolve_name", "preload", "BACKEND_NAMES",
]

BACKEND_NAMES = ("auto", "reference", "cpp", "triton")
# Fastest first, per device type, for ``auto``.  Triton on CPU tensors only runs under
# TRITON_INTERPRET=1, which is a correctness tool, never a fast path: auto skips it there.
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}
# Modules that register a backend when imported (lazily, see _load).
_BACKEND_MODULES = {
    "reference": "fastbert.backends.reference",
    "cpp": "fastbert.backends.cpp",
    "triton": "fastbert.backends.triton",
}


@dataclass
class Backend:
    name: str
    ops: Dict[str, Callable]
    device_types: FrozenSet[str]
    dtypes: FrozenSet[torch.dtype]
    available: bool = True
    reason: str = ""  # why it is not available
    # Per-op dtype overrides, e.g. fp16 only on CUDA: {"op": frozenset({...})}.
    op_dtypes: Dict[str, FrozenSet[torch.dtype]] = field(default_factory=dict)
    # Per-op device overrides, e.g. an op with a CPU kernel only in a CUDA build.
    op_device_types: Dict[str, FrozenSet[str]] = field(default_factory=dict)

    def supports(self, op: str, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
        """None if this backend runs ``op`` here, else the reason it does not."""
        if not self.available:
            return f"backend '{self.name}' is not available: {self.reason}"
        if op not in self.ops:
            return f"backend '{self.name}' has no kernel for op '{op}'"
        if device_type not in self.op_device_types.get(op, self.device_types):
            return f"backend '{self.name}' does not run '{op}' on {device_type} tensors"
        dtypes = self.op_dtypes.get(op, self.dtypes)
        if dtype is not None and dtype not in dtypes:
            return f"backend '{self.name}' op '{op}' does not take {dtype}"
        return None


_registry: Dict[str, Backend] = {}
_process_choice: Optional[str] = None
_block_stack: List[str] = []
_warned: set = set()
_resolve_cache: Dict[tuple, tuple] = {}


def register_backend(backend: Backend) -> None:
    _registry[backend.name] = backend
    _resolve_cache.clear()


def _load(name: str) -> Backend:
    if name not in _registry:
        try:
            importlib.import_module(_BACKEND_MODULES[name])
        except Exception as exc:  # a broken toolchain must not break the package
            register_backend(Backend(name, {}, frozenset(), frozenset(), available=False,
                                     reason=f"{type(exc).__name__}: {exc}"))
        if name not in _registry:
            register_backend(Backend(name, {}, frozenset(), frozenset(), available=False,
                                     reason="its module registered nothing"))
    return _registry[name]


def preload() -> None:
    """Import every backend that can serve this machine now, outside any torch.compile trace
    (an import cannot be traced: a model whose first call is compiled must find its backends
    loaded).  Triton is imported only when it can run: a CUDA device or TRITON_INTERPRET=1."""
    for name in ("reference", "cpp", "triton"):
        if name == "triton" and not (torch.cuda.is_available()
                                     or os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        _load(name)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for the whole process (``auto`` restores the default)."""
    global _process_choice
    _process_choice = _check_name(name)
    if name != "auto":
        _load(name)
    _resolve_cache.clear()


def get_backend() -> str:
    """The backend name in force here: a ``use_backend`` block, then ``set_backend``, then
    ``FASTBERT_BACKEND``, then ``auto``."""
    if _block_stack:
        return _block_stack[-1]
    if _process_choice is not None:
        return _process_choice
    env = os.environ.get("FASTBERT_BACKEND", "auto") or "auto"
    if env not in BACKEND_NAMES:
        raise ValueError(f"FASTBERT_BACKEND must be one of {BACKEND_NAMES}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block (nestable)."""
    _block_stack.append(_check_name(name))
    if name != "auto":
        _load(name)
    _resolve_cache.clear()
    try:
        yield
    finally:
        _block_stack.pop()
        _resolve_cache.clear()


def available_backends() -> Dict[str, str]:
    """``{name: "available" | reason it is not}`` for every concrete backend."""
    out = {}
    for name in BACKEND_NAMES[1:]:
        b = _load(name)
        out[name] = "available" if b.available else b.reason
    return out


def _warn_once(key, message: str) -> None:
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(f"fastbert: {message}; falling back to the reference backend", RuntimeWarning,
                  stacklevel=4)


def resolve_name(op: str, device_type: str, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend that will run ``op`` on tensors of this device type and dtype."""
    choice = get_backend()
    key = (choice, op, device_type, dtype)
    hit = _resolve_cache.get(key)
    if hit is not None:
        return hit[0]
    if choice == "auto":
        name = "reference"
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if _load(candidate).supports(op, device_type, dtype) is None:
                name = candidate
                break
    else:
        why_not = _load(choice).supports(op, device_type, dtype)
        if why_not is None:
            name = choice
        else:
            name = "reference"
            backend = _registry[choice]
            # One warning per unavailable backend; one per missing (op, device, dtype) otherwise.
            _warn_once((choice,) if not backend.available else key, why_not)
    _resolve_cache[key] = (name,)
    return name


def resolve(op: str, device_type: str, dtype: Optional[torch.dtype] = None) -> Callable:
    """The implementation of ``op`` that the current selection picks."""
    return _load(resolve_name(op, device_type, dtype)).ops[op]
