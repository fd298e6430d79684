"""The CPU kernel variants of the C++ extension, and which one this CPU can run.

The CPU kernels (``csrc/cpu/*.cpp``) are compiled once per instruction set, into one module
each (``fastbert._C_cpu_<name>``), and exactly one is loaded, picked at run time from the
CPU's features, the way ATen's ``CPU_CAPABILITY`` dispatch picks its kernels (and the way
faiss loads ``_swigfaiss_avx2`` or ``_swigfaiss_avx512``).  A module built for an
instruction set the CPU lacks is never loaded, so the extension never executes an illegal
instruction.  The portable core (op schemas, the caching allocator, the CPU feature probe,
CUDA twins) is one module, ``fastbert._C``, built with no instruction-set flags.

This file is imported by ``setup.py`` (what to build, with which flags) as well as at run
time (what to load), so it imports nothing but the standard library.

``FASTBERT_CPU_CAPABILITY=avx512|avx2|default`` (run time) asks for a variant, e.g. to
measure the AVX2 kernels on an AVX-512 machine; a variant this CPU cannot run, or that was
not built, is refused with a warning and the best one that can run is used instead.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

__all__ = ["Variant", "VARIANTS", "ENV", "variants_to_build", "select_variant", "module_name"]

ENV = "FASTBERT_CPU_CAPABILITY"


@dataclass(frozen=True)
class Variant:
    name: str
    cflags: Tuple[str, ...]     # compiler flags of its kernels (gcc/clang)
    requires: Tuple[str, ...]   # CPU features (names of csrc/cpu_features.cpp) it executes
    x86_only: bool              # its flags exist only for x86-64 compilers


# Best first.  at::vec::Vectorized takes its flavour from CPU_CAPABILITY_* (torch's build sets
# them per file); the instruction-set flags let the compiler use the same instructions in
# our own loops.  The AVX-512 variant asks for what ATen's AVX512 capability asks for (F, BW,
# VL, DQ, plus FMA): no kernel uses AVX512-BF16 instructions, so requiring them would only
# move Skylake-SP .. Ice Lake servers down to AVX2.
VARIANTS: Tuple[Variant, ...] = (
    Variant("avx512",
            ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
             "-mavx512dq", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
            ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
            x86_only=True),
    Variant("avx2",
            ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
            ("avx", "avx2", "fma", "f16c"),
            x86_only=True),
    # Any C++17 compiler on any architecture: at::vec's generic (scalar) Vectorized, which
    # the compiler auto-vectorizes for the target's baseline (SSE2 on x86-64, NEON on arm64).
    Variant("default", ("-DCPU_CAPABILITY=DEFAULT",), (), x86_only=False),
)
_BY_NAME = {v.name: v for v in VARIANTS}


def module_name(variant: str) -> str:
    return f"fastbert._C_cpu_{variant}"


def _is_x86_64(machine: Optional[str] = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "x64")


def variants_to_build(machine: Optional[str] = None, only: Optional[str] = None) -> Tuple[Variant, ...]:
    """What ``setup.py`` builds: every variant this architecture's compiler takes, or the
    comma-separated names in ``only`` (``FASTBERT_CPU_VARIANTS``, a quicker developer build)."""
    usable = [v for v in VARIANTS if _is_x86_64(machine) or not v.x86_only]
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in _BY_NAME]
        if unknown:
            raise ValueError(f"FASTBERT_CPU_VARIANTS: unknown variant(s) {unknown}; "
                             f"choose from {[v.name for v in VARIANTS]}")
        usable = [v for v in usable if v.name in names]
    return tuple(usable)


def select_variant(features: Iterable[str], built: Sequence[str],
                   requested: Optional[str] = None) -> Tuple[Optional[str], str, Dict[str, str]]:
    """``(variant, why, rejected)``: the best built variant whose instruction sets ``features``
    has (or ``requested``, when it can run); ``rejected`` says why each better one was not
    taken.  ``variant`` is None when none can run (only possible with no ``default`` built)."""
    have = set(features)
    rejected: Dict[str, str] = {}

    def why_not(v: Variant) -> Optional[str]:
        # The CPU first: "not built" then means a variant this CPU would run (the loader warns
        # about those, as a slower install than this machine allows).
        missing = [f for f in v.requires if f not in have]
        if missing:
            return "this CPU lacks " + ", ".join(missing)
        if v.name not in built:
            return "not built (its module is missing from this install)"
        return None

    note = ""
    if requested:
        requested = requested.strip().lower()
        if requested not in _BY_NAME:
            note = (f"{ENV}={requested!r} is not a variant (choose from "
                    f"{[v.name for v in VARIANTS]}); ")
        else:
            reason = why_not(_BY_NAME[requested])
            if reason is None:
                return requested, f"asked for by {ENV}={requested}", rejected
            rejected[requested] = f"asked for by {ENV}, but {reason}"
            note = f"{ENV}={requested} refused ({reason}); "
    for v in VARIANTS:
        reason = why_not(v)
        if reason is None:
            return v.name, note + f"the best variant this CPU runs ({', '.join(v.requires) or 'no special instructions'})", rejected
        rejected.setdefault(v.name, reason)
    return None, note + "no built variant can run here", rejected
