"""fastbert's caching CPU allocator: when it is on, and how to size, empty or pause it.

Why: a training step allocates and frees the same large tensors every step (Adam's
temporaries over the 20,256 x 256 token embedding, that embedding's dense gradient, the
activations).  glibc gives blocks that large back to the kernel on free, so every step
page-faults them in again; on the bert.small SNLI train step that was ~25% of fastbert's
step.  PyTorch's CPU performance guide recommends tcmalloc/jemalloc through LD_PRELOAD for
this; the C++ extension (csrc/caching_allocator.cpp) does the same without a preload: it
keeps freed blocks of 1 MiB or more, by size class, up to a limit, and hands them out again.
Smaller blocks go straight to c10's allocator.

It is on by default when the extension is built, at ``min(1024 MB, RAM / 16)``; like
PyTorch's CUDA caching allocator it is process-wide (tensors of everything in the process
use it).  ``FASTBERT_CPU_CACHE_MB=N`` sets the limit (``0``: never install it, c10's
allocator as without fastbert); :func:`set_cpu_cache_mb`, :func:`empty_cpu_cache`,
:func:`cpu_cache_disabled` and :func:`cpu_cache_info` control it at run time.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Dict

import torch

__all__ = ["set_cpu_cache_mb", "empty_cpu_cache", "cpu_cache_disabled", "cpu_cache_info",
           "default_cpu_cache_mb"]

ENV = "FASTBERT_CPU_CACHE_MB"
MAX_DEFAULT_MB = 1024


def _ops():
    """The extension's allocator ops, or None when the extension is not built."""
    ops = torch.ops.fastbert
    return ops if hasattr(ops, "enable_cpu_caching_allocator") else None


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
    warns and leaves the cache off (the kernels still load: a typo must not cost the backend)."""
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


def install_from_env() -> None:
    """Called once when the C++ backend loads."""
    ops = _ops()
    limit = _env_limit_mb()
    if ops is not None and limit > 0:
        ops.enable_cpu_caching_allocator(limit)


def cpu_cache_info() -> Dict[str, int]:
    """``installed`` (0/1), ``cached_bytes`` (freed blocks held now), ``limit_bytes``, ``hits``,
    ``misses`` (large allocations served from / not from the cache), ``live_blocks``."""
    ops = _ops()
    cached, limit, hits, misses, live, installed = ops.cpu_caching_allocator_stats() if ops else [0] * 6
    return {"installed": installed, "cached_bytes": cached,
            "limit_bytes": limit, "hits": hits, "misses": misses, "live_blocks": live}


def set_cpu_cache_mb(limit_mb: int) -> None:
    """Keep at most ``limit_mb`` MB of freed large blocks (installing the allocator if it is not
    yet); ``0`` releases every cached block and caches nothing more."""
    if not isinstance(limit_mb, int) or isinstance(limit_mb, bool) or limit_mb < 0:
        raise ValueError(f"limit_mb must be a non-negative int, got {limit_mb!r}")
    ops = _ops()
    if ops is None:
        if limit_mb == 0:
            return
        raise RuntimeError("the caching CPU allocator is part of fastbert's C++ extension, "
                           "which is not built here (see fastbert.available_backends())")
    if limit_mb == 0 and not cpu_cache_info()["installed"]:
        return  # never installed: nothing to release, and no reason to install it now
    ops.enable_cpu_caching_allocator(limit_mb)


def empty_cpu_cache() -> None:
    """Give every cached block back to the system; the limit stays."""
    info = cpu_cache_info()
    if info["installed"]:
        ops = _ops()
        ops.enable_cpu_caching_allocator(0)
        ops.enable_cpu_caching_allocator(info["limit_bytes"] >> 20)


@contextlib.contextmanager
def cpu_cache_disabled():
    """Run a block as without the cache (e.g. to time other code as it runs without fastbert):
    its large allocations go straight to c10's allocator and are freed at once.  Blocks cached
    before stay cached for after the block."""
    ops = _ops()
    if ops is None or not cpu_cache_info()["installed"]:
        yield
        return
    ops.pause_cpu_caching_allocator(True)
    try:
        yield
    finally:
        ops.pause_cpu_caching_allocator(False)
