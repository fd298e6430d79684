"""fastbert's caching CPU allocator: when it is on, and how to size, empty or pause it.

Why: a training step allocates and frees the same large tensors every step (Adam's
temporaries over the 20,256 x 256 token embedding, that embedding's dense gradient, the
activations).  glibc gives blocks that large back to the kernel on free, so every step
page-faults them in again.  PyTorch's CPU performance guide recommends tcmalloc/jemalloc
through LD_PRELOAD for this; the C++ extension (csrc/caching_allocator.cpp) does the same
without a preload: it keeps freed blocks of 1 MiB or more, by size class (LRU eviction), up to
a limit, and hands them out again.  Measured on the bert.small SNLI train step (batch 64,
cpp backend, fresh SNLI-length batches, off vs on in separate processes,
benchmarks/allocator_train_step.py): AVX-512 machine, bf16 ~38.7 -> ~29 ms and fp32 ~47 ->
~37 ms; AVX2 EPYC (shared), fp32 median off/on 1.08 over 7 rounds (103-129 vs 93-120 ms),
bf16 (no bf16 hardware, 2.2 s a step) within noise.  The README's "caching CPU allocator"
paragraph has the details.

**Opt-in.** ``import fastbert``, loading the C++ backend and running a model leave torch's
CPU allocator alone.  It is installed, process-wide (like PyTorch's CUDA caching allocator),
only when fastbert is asked to train: :func:`fastbert.train.finetune` /
:func:`fastbert.train.pretrain` (and so ``python -m fastbert finetune|pretrain``) call
:func:`install_for_training` at start, which reads ``FASTBERT_CPU_CACHE_MB`` (unset or
``auto``: :func:`default_cpu_cache_mb`, ``min(1024 MB, RAM / 16)``; ``N``: N MB; ``0``: never
install it).  Outside training, :func:`enable_cpu_cache` installs it explicitly.  Once
installed it stays for the process; ``set_cpu_cache_mb(0)`` releases what it holds and sends
every later allocation straight to c10's allocator.

**What it touches.** Blocks it does not cache (under 1 MiB, allocated while paused or at
limit 0) come from c10's allocator with c10's deleter: their free takes no lock of
fastbert's.  Cached-size blocks go through one mutex.  ``pthread_atfork`` handlers hold that
mutex across ``fork()``, so a child (a DataLoader worker) never inherits it locked.

**Pause.** ``with cpu_cache_disabled():`` runs a block as without the cache: new large
allocations bypass it.  The pause is a process-wide depth, so blocks nest and several threads
may pause and resume independently (the cache is paused while any of them is inside one).  A
block allocated while paused is freed straight to c10 whenever it is freed; a block the cache
handed out and that is freed while paused is kept for reuse as usual (a pause in one thread
does not flush the cache another thread trains with).

:func:`set_cpu_cache_mb`, :func:`empty_cpu_cache` and :func:`cpu_cache_info` control it at
run time.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Dict, Optional

import torch

__all__ = ["enable_cpu_cache", "install_for_training", "set_cpu_cache_mb", "empty_cpu_cache",
           "cpu_cache_disabled", "cpu_cache_info", "default_cpu_cache_mb"]

ENV = "FASTBERT_CPU_CACHE_MB"
MAX_DEFAULT_MB = 1024


def _ops():
    """The extension's allocator ops (loading the core module fastbert._C if needed, which
    installs nothing), or None when the extension is not built."""
    ops = torch.ops.fastbert
    if not hasattr(ops, "enable_cpu_caching_allocator"):
        try:
            import fastbert._C  # noqa: F401
        except (ImportError, OSError):
            return None
    return ops if hasattr(ops, "enable_cpu_caching_allocator") else None


def _require_ops():
    ops = _ops()
    if ops is None:
        raise RuntimeError("the caching CPU allocator is part of fastbert's C++ extension, "
                           "which is not built here (see fastbert.available_backends())")
    return ops


def default_cpu_cache_mb() -> int:
    """``min(1024, physical RAM / 16)`` MB: room for a train step's large temporaries without
    holding a noticeable share of a small machine's memory."""
    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return MAX_DEFAULT_MB
    return int(max(0, min(MAX_DEFAULT_MB, ram_mb // 16)))


def _env_limit_mb() -> int:
    """The limit FASTBERT_CPU_CACHE_MB asks for (unset or ``auto``: the default); a bad value
    warns and leaves the cache off (a typo must not stop a training run)."""
    raw = os.environ.get(ENV, "auto").strip()
    if raw.lower() in ("", "auto"):
        return default_cpu_cache_mb()
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        warnings.warn(f"fastbert: {ENV} must be a non-negative integer (MB) or 'auto', got "
                      f"{raw!r}; the caching CPU allocator stays off", RuntimeWarning)
        return 0
    return value


def _check_limit(name: str, limit_mb, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(limit_mb, int) or isinstance(limit_mb, bool) or limit_mb < low:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int (MB), got {limit_mb!r}")
    return limit_mb


def _installed(ops) -> bool:
    return bool(ops.cpu_caching_allocator_stats()[5])


def enable_cpu_cache(limit_mb: Optional[int] = None) -> None:
    """Install the caching allocator process-wide (or set its limit if it is installed):
    keep at most ``limit_mb`` MB of freed large blocks (None: :func:`default_cpu_cache_mb`).
    Training runs call :func:`install_for_training` instead; this is for your own loops."""
    limit = default_cpu_cache_mb() if limit_mb is None else _check_limit("limit_mb", limit_mb,
                                                                         allow_zero=False)
    _require_ops().enable_cpu_caching_allocator(limit)


def install_for_training() -> bool:
    """What a training run does at start: install the allocator at FASTBERT_CPU_CACHE_MB's
    limit (unset/``auto``: the default; ``0``: not at all).  A cache the user already
    installed keeps its limit; without the extension this does nothing.  Returns whether the
    allocator is installed."""
    ops = _ops()
    if ops is None:
        return False
    if _installed(ops):
        return True
    limit = _env_limit_mb()
    if limit > 0:
        ops.enable_cpu_caching_allocator(limit)
    return _installed(ops)


def cpu_cache_info() -> Dict[str, int]:
    """``installed`` (0/1: torch's CPU allocator is this cache), ``cached_bytes`` (freed blocks
    held now), ``limit_bytes``, ``hits``, ``misses`` (large allocations served from / not from
    the cache), ``live_blocks`` (cache-allocated blocks not freed yet), ``paused`` (the pause
    depth), ``torch_default_allocator`` (0/1: torch's CPU allocator is c10's own)."""
    ops = _ops()
    if ops is None:
        values = [0] * 6 + [0, 1]
    else:
        values = ops.cpu_caching_allocator_stats()
    keys = ("cached_bytes", "limit_bytes", "hits", "misses", "live_blocks", "installed",
            "paused", "torch_default_allocator")
    return dict(zip(keys, values))


def set_cpu_cache_mb(limit_mb: int) -> None:
    """Keep at most ``limit_mb`` MB of freed large blocks (installing the allocator if it is not
    yet); ``0`` releases every cached block and sends later allocations straight to c10."""
    _check_limit("limit_mb", limit_mb, allow_zero=True)
    ops = _ops()
    if limit_mb == 0 and (ops is None or not _installed(ops)):
        return  # never installed: nothing to release, and no reason to install it now
    _require_ops().enable_cpu_caching_allocator(limit_mb)


def empty_cpu_cache() -> None:
    """Give every cached block back to the system; the limit stays."""
    ops = _ops()
    if ops is not None:
        ops.empty_cpu_caching_allocator()


@contextlib.contextmanager
def cpu_cache_disabled():
    """Run a block as without the cache (e.g. to time other code as it runs without fastbert):
    its large allocations go straight to c10's allocator and are freed at once.  Blocks cached
    before stay cached for after the block.  Nests, and is safe from several threads: the
    cache resumes when the last pause ends."""
    ops = _ops()
    if ops is None:
        yield
        return
    ops.pause_cpu_caching_allocator(True)
    try:
        yield
    finally:
        ops.pause_cpu_caching_allocator(False)
