"""Backend registry and selection.

A backend is a named table ``op name -> implementation`` of the op contracts in
:mod:`fastbert.ops`.  Backends register themselves when their module is imported; the
``cpp`` and ``triton`` modules are imported lazily, the first time a backend is resolved,
so ``import fastbert`` stays cheap and never fails because a kernel toolchain is missing.

Selection, most specific first:

* ``with fastbert.use_backend("cpp"): ...``  (a block: local to its thread and its
  ``contextvars`` context, so threads and asyncio tasks each keep their own)
* ``fastbert.set_backend("cpp")``            (the process)
* ``FASTBERT_BACKEND=cpp``                   (the environment)
* ``auto`` (the default): the fastest available backend for the tensor's device.

A backend that should serve a call and cannot (not available, or lacking that op, device or
dtype) leaves it to the next one, in the end ``reference``, with one warning per reason:
under ``auto`` too, unless the user turned it off on purpose (``FASTBERT_NO_EXT=1``).
:func:`explain` says, per op, which backend runs and why each other one does not.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional

import torch

__all__ = [
    "Backend", "register_backend", "set_backend", "get_backend", "use_backend",
    "available_backends", "resolve", "resolve_name", "preload", "explain", "dispatch_log",
    "BACKEND_NAMES",
]

BACKEND_NAMES = ("auto", "reference", "cpp", "triton")
# Fastest first, per device type, for ``auto``.  Triton on CPU tensors only runs under
# TRITON_INTERPRET=1, which is a correctness tool, never a fast path: auto skips it there.
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}
# No kernel is meant to serve float64 (the reference's precision: gradcheck, parity checks):
# auto runs it on the reference without a warning.
_NO_FAST_DTYPES = frozenset({torch.float64})
# Modules that register a backend when imported (lazily, see _load).
_BACKEND_MODULES = {
    "reference": "fastbert.backends.reference",
    "cpp": "fastbert.backends.cpp",
    "triton": "fastbert.backends.triton",
}
NO_EXT_ENV = "FASTBERT_NO_EXT"


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
    # Unavailable because the user asked for that (FASTBERT_NO_EXT=1): auto does not warn.
    deliberate: bool = False

    def supports(self, op: str, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
        """None if this backend runs ``op`` here, else the reason it does not."""
        if not self.available:
            return f"backend '{self.name}' is not available: {self.reason}"
        if op not in self.ops:
            return f"backend '{self.name}' has no kernel for op '{op}'{_skipped_note(self.name)}"
        if device_type not in self.op_device_types.get(op, self.device_types):
            return f"backend '{self.name}' does not run '{op}' on {device_type} tensors"
        dtypes = self.op_dtypes.get(op, self.dtypes)
        if dtype is not None and dtype not in dtypes:
            return f"backend '{self.name}' op '{op}' does not take {dtype}"
        return None


def _skipped_note(name: str) -> str:
    """The glue modules a backend package skipped at import (their ops fall back)."""
    skipped = getattr(sys.modules.get(_BACKEND_MODULES.get(name, "")), "SKIPPED", None)
    if not skipped:
        return ""
    return " (glue modules skipped at import: " + "; ".join(
        f"{mod}: {why}" for mod, why in sorted(skipped.items())) + ")"


_registry: Dict[str, Backend] = {}
_process_choice: Optional[str] = None
# The innermost use_backend block of this thread and contextvars context (None: no block).
_block: contextvars.ContextVar = contextvars.ContextVar("fastbert_backend_block", default=None)
# Dynamo cannot read a ContextVar (graph break) but traces and guards a threading.local: under
# torch.compile the choice is read from this per-thread mirror, which use_backend keeps equal
# to the context's value.  (Only asyncio tasks or generators that interleave different blocks
# on one thread around a compiled call could see another context's block there.)
_mirror = threading.local()
_warned: set = set()
_resolve_cache: Dict[tuple, tuple] = {}
_dispatch_logs: List[list] = []  # open dispatch_log() lists


def register_backend(backend: Backend) -> None:
    _registry[backend.name] = backend
    _resolve_cache.clear()


def _no_ext_requested() -> bool:
    return os.environ.get(NO_EXT_ENV, "") not in ("", "0")


def _load(name: str) -> Backend:
    if name not in _registry:
        if name == "cpp" and _no_ext_requested():
            register_backend(Backend(name, {}, frozenset(), frozenset(), available=False,
                                     reason=f"{NO_EXT_ENV}=1 asks for no C++ extension",
                                     deliberate=True))
            return _registry[name]
        try:
            importlib.import_module(_BACKEND_MODULES[name])
        except Exception as exc:  # a broken toolchain must not break the package
            register_backend(Backend(name, {}, frozenset(), frozenset(), available=False,
                                     reason=f"{type(exc).__name__}: {exc}"))
        if name not in _registry:
            register_backend(Backend(name, {}, frozenset(), frozenset(), available=False,
                                     reason="its module registered nothing"))
    return _registry[name]


def _triton_can_run() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def preload() -> None:
    """Import every backend that can serve this machine now, outside any torch.compile trace
    (an import cannot be traced: a model whose first call is compiled must find its backends
    loaded).  Triton is imported only when it can run: a CUDA device or TRITON_INTERPRET=1.

    A C++ extension that is missing or failed to load is said once, here (unless
    ``FASTBERT_NO_EXT=1`` asked for that)."""
    for name in ("reference", "cpp", "triton"):
        if name == "triton" and not _triton_can_run():
            continue
        _load(name)
    cpp = _registry["cpp"]
    if not cpp.available and not cpp.deliberate:
        why = cpp.supports("", "cpu", None)
        if (why,) not in _warned:
            _warned.add((why,))  # auto's fallbacks for this reason stay quiet: said here
            warnings.warn(
                f"fastbert: the C++ extension did not load ({cpp.reason}): every op on CPU "
                f"tensors runs on the reference path (pure PyTorch), many times slower. "
                f"Rebuild it (pip install --no-build-isolation -e .), or set "
                f"{NO_EXT_ENV}=1 to run without it on purpose", RuntimeWarning, stacklevel=3)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for the whole process, every thread (``auto`` restores the
    default)."""
    global _process_choice
    _process_choice = _check_name(name)
    if name != "auto":
        _load(name)
    _resolve_cache.clear()


def _block_choice() -> Optional[str]:
    if torch.compiler.is_compiling():
        return getattr(_mirror, "block", None)
    return _block.get()


def get_backend() -> str:
    """The backend name in force here: a ``use_backend`` block (of this thread and context),
    then ``set_backend``, then ``FASTBERT_BACKEND``, then ``auto``."""
    block = _block_choice()
    if block is not None:
        return block
    if _process_choice is not None:
        return _process_choice
    env = os.environ.get("FASTBERT_BACKEND", "auto") or "auto"
    if env not in BACKEND_NAMES:
        raise ValueError(f"FASTBERT_BACKEND must be one of {BACKEND_NAMES}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block (nestable).  The choice holds for this
    thread and ``contextvars`` context only: other threads and asyncio tasks keep theirs."""
    _check_name(name)
    if name != "auto":
        _load(name)
    token = _block.set(name)
    _mirror.block = name
    try:
        yield
    finally:
        _block.reset(token)
        _mirror.block = _block.get()


def available_backends() -> Dict[str, str]:
    """``{name: "available" | reason it is not}`` for every concrete backend."""
    out = {}
    for name in BACKEND_NAMES[1:]:
        b = _load(name)
        out[name] = "available" if b.available else b.reason
    return out


def _decide(choice: str, op: str, device_type: str, dtype: Optional[torch.dtype]):
    """``(backend that runs, {backend passed over: why})`` for ``choice``: what resolve_name
    and explain both read."""
    if choice != "auto":
        why_not = _load(choice).supports(op, device_type, dtype)
        return (choice, {}) if why_not is None else ("reference", {choice: why_not})
    passed = {}
    for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
        why_not = _load(candidate).supports(op, device_type, dtype)
        if why_not is None:
            return candidate, passed
        passed[candidate] = why_not
    return "reference", passed


def _warn_new(reasons: List[str], consequence: str, key: tuple = ()) -> None:
    """Warn about the reasons not warned about before (one warning per reason, ever)."""
    if torch.compiler.is_compiling():
        return
    new = [r for r in reasons if key + (r,) not in _warned]
    if new:
        _warned.update(key + (r,) for r in new)
        warnings.warn(f"fastbert: {'; '.join(new)}; {consequence}", RuntimeWarning, stacklevel=5)


def resolve_name(op: str, device_type: str, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend that will run ``op`` on tensors of this device type and dtype."""
    return _resolve_choice(get_backend(), op, device_type, dtype)


# Traced by torch.compile as a constant of its (guarded) arguments: read inside a trace, the
# cache dict would get a guard of its own, and filling it would cost every compiled frame one
# recompile.
@torch._dynamo.assume_constant_result
def _resolve_choice(choice: str, op: str, device_type: str,
                    dtype: Optional[torch.dtype]) -> str:
    key = (choice, op, device_type, dtype)
    hit = _resolve_cache.get(key)
    if hit is not None:
        return hit[0]
    name, passed = _decide(choice, op, device_type, dtype)
    if choice != "auto":
        if passed:  # asked for by name: said even when import or auto said it before
            _warn_new(list(passed.values()), "falling back to the reference "
                      "backend", key=("asked for",))
    elif passed and dtype not in _NO_FAST_DTYPES:
        reasons = [why for b, why in passed.items() if not _registry[b].deliberate]
        slower = " (pure PyTorch, many times slower)" if name == "reference" else ""
        _warn_new(reasons, f"auto runs '{op}' on {device_type} {dtype} on the {name} "
                           f"backend{slower}")
    _resolve_cache[key] = (name,)
    return name


def resolve(op: str, device_type: str, dtype: Optional[torch.dtype] = None) -> Callable:
    """The implementation of ``op`` that the current selection picks."""
    name = resolve_name(op, device_type, dtype)
    if _dispatch_logs and not torch.compiler.is_compiling():
        for log in _dispatch_logs:
            log.append((op, name))
    return _load(name).ops[op]


@contextlib.contextmanager
def dispatch_log() -> Iterator[list]:
    """Collect ``(op, backend)`` for every op call resolved inside the block (eager calls;
    tests use it to prove which backend ran)."""
    log: list = []
    _dispatch_logs.append(log)
    try:
        yield log
    finally:
        _dispatch_logs.remove(log)


def _cpu_variant_line() -> Optional[str]:
    """The C++ backend's CPU kernel variant and why it was picked, when it reports them
    (``fastbert.backends.cpp.CPU_VARIANT`` / ``CPU_VARIANT_REASON``)."""
    mod = sys.modules.get(_BACKEND_MODULES["cpp"])
    variant = getattr(mod, "CPU_VARIANT", None)
    if variant is None:
        return None
    reason = getattr(mod, "CPU_VARIANT_REASON", None)
    return f"cpp CPU kernels: {variant}" + (f" ({reason})" if reason else "")


def explain(device="cpu", dtype: torch.dtype = torch.float32, *, file=None) -> dict:
    """Print, and return, which backend runs each op on ``device`` tensors of ``dtype``
    under the selection in force here, and why each other backend does not.

    Returns ``{"device": str, "dtype": dtype, "selection": name, "cpu_variant": str | None,
    "ops": {op: {"backend": name, "rejected": {backend: why}}}}``."""
    device_type = torch.device(device).type
    choice = get_backend()
    _load("reference")
    ops = {}
    for op in _registry["reference"].ops:
        name, passed = _decide(choice, op, device_type, dtype)
        rejected = dict(passed)
        for other in ("cpp", "triton", "reference"):
            if other == name or other in rejected:
                continue
            if other == "triton" and not _triton_can_run() and "triton" not in _registry:
                rejected[other] = ("backend 'triton' is not available: no CUDA device and "
                                   "TRITON_INTERPRET is not 1")
                continue
            why_not = _load(other).supports(op, device_type, dtype)
            if why_not is None:
                if choice != "auto":
                    why_not = f"not selected (the selection is '{choice}')"
                elif other == "triton" and device_type == "cpu":
                    why_not = "auto never picks Triton's CPU interpreter (a correctness tool)"
                else:
                    why_not = f"auto prefers '{name}' on {device_type} tensors"
            rejected[other] = why_not
        ops[op] = {"backend": name, "rejected": rejected}
    report = {"device": device_type, "dtype": dtype, "selection": choice,
              "cpu_variant": _cpu_variant_line(), "ops": ops}
    lines = [f"fastbert backends for {device_type} {dtype} (selection: {choice})"]
    if report["cpu_variant"] is not None:
        lines.append(report["cpu_variant"])
    for op, info in ops.items():
        lines.append(f"  {op}: {info['backend']}")
        lines.extend(f"      not {b}: {why}" for b, why in info["rejected"].items())
    print("\n".join(lines), file=file)
    return report
