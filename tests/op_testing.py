"""Shared helpers for the op tests: which fast backends to test, how to run an op on one of
them (and prove it did not fall back to the reference), and the tolerance rule.

Tolerance rule (the house standard): compare with a float64 reference; a low-precision
kernel's error may be at most ``2x`` what PyTorch itself makes in that dtype (the reference
path run in that dtype, vs float64), plus a small atol.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import fastbert
from fastbert import backends

FAST_BACKENDS = ("cpp", "triton")
# CI sets FASTBERT_REQUIRE_BACKENDS=cpp,triton: there a missing backend fails, never skips.
REQUIRED = {b for b in os.environ.get("FASTBERT_REQUIRE_BACKENDS", "").split(",") if b}

ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def device_for(backend: str, op: str | None = None) -> torch.device:
    """The device a test of ``backend`` runs on: CUDA when there is a GPU and the backend
    serves it there, else CPU (Triton: its interpreter).  ``triton``: CUDA; ``reference``:
    CUDA (it runs on any device: its cases then run where the fast ones do); ``cpp``: CUDA
    only for an ``op`` with a CUDA twin in this build (csrc/cuda/), else CPU, where its
    kernels are (a model, ``op=None``, runs ops that have none: CPU)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if backend in ("triton", "reference"):
        return torch.device("cuda")
    if backend == "cpp" and op is not None and backends._load("cpp").supports(op, "cuda", None) is None:
        return torch.device("cuda")
    return torch.device("cpu")


def dtypes_for(backend: str):
    if backend == "triton" and not torch.cuda.is_available():
        return (torch.float32, torch.bfloat16, torch.float16)
    if backend == "triton" or device_for(backend).type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16)
    return (torch.float32, torch.bfloat16)


def require(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> None:
    """Skip (or, for a required backend, fail) when ``backend`` cannot run ``op`` here."""
    why_not = backends._load(backend).supports(op, device.type, dtype)
    if why_not is None:
        return
    if backend in REQUIRED:
        pytest.fail(f"required backend cannot run this: {why_not}")
    pytest.skip(why_not)


def require_extension(op: str | None = None, *, module_level: bool = False) -> None:
    """For tests that call the C++ extension directly (``torch.ops.fastbert.*``, the cpp
    glue): skip when it is not loaded, fail instead where ``cpp`` is a required backend
    (FASTBERT_REQUIRE_BACKENDS, as CI sets it).  Goes through the backend registry, so
    ``FASTBERT_NO_EXT=1`` leaves it unloaded here too (``importorskip`` would load it anyway,
    and would skip in CI).  ``op``: also require that the extension serves that op."""
    cpp = backends._load("cpp")
    why_not = cpp.supports(op, "cpu", None) if op is not None else (
        None if cpp.available else f"backend 'cpp' is not available: {cpp.reason}")
    if why_not is None:
        return
    if "cpp" in REQUIRED:
        pytest.fail(f"required backend cannot run this: {why_not}", pytrace=False)
    pytest.skip(why_not, allow_module_level=module_level)


@contextlib.contextmanager
def on_backend(backend: str, op: str, device: torch.device, dtype: torch.dtype):
    """Run a block on ``backend`` after checking it really serves ``op`` (no silent fallback)."""
    require(backend, op, device, dtype)
    with fastbert.use_backend(backend):
        assert backends.resolve_name(op, device.type, dtype) == backend
        yield


@contextlib.contextmanager
def ran_on(backend: str, device: torch.device, dtype: torch.dtype, ops=()):
    """Run a block (a model, a loss: several ops) on ``backend`` and prove it: ``ops`` must
    be served there (else skip, or fail for a required backend), and every op call the
    block makes must have resolved to ``backend`` (none fell back), at least one."""
    for op in ops:
        require(backend, op, device, dtype)
    with fastbert.use_backend(backend), backends.dispatch_log() as log:
        yield log
    assert log, f"no fastbert op ran in a block meant for the {backend} backend"
    fell_back = sorted({(op, name) for op, name in log if name != backend})
    assert not fell_back, f"ops that did not run on {backend}: {fell_back}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (ints: a large sentinel) so an element a kernel forgets to write fails."""
    return t.fill_(float("nan") if t.is_floating_point() else 2**30)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor | None = None,
                 factor: float = 2.0, atol: float | None = None, name: str = "output") -> None:
    """``out`` (a kernel's result) against ``ref64`` (the float64 reference).  For a
    low-precision ``out``, ``torch_lowp`` is the reference run in that dtype by PyTorch: the
    kernel may err at most ``factor`` times as much, plus ``atol``."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten element?)"
    atol = ATOL[out.dtype] if atol is None else atol
    budget = atol + (factor * max_err(torch_lowp, ref64) if torch_lowp is not None else 0.0)
    err = max_err(out, ref64)
    assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g} ({out.dtype})"


# Attention's score gradients (dq, dk) get their atol scaled by the output's magnitude.  Why
# (measured, fp32, 3x9x9x96x96, seed 0): a row with one valid key has P = 1, so its exact dS
# is dP - rowsum(dO*O) = 0.  The kernels take rowsum(dO*O) (flash-attention's identity) where
# PyTorch's softmax backward takes rowsum(P*dP): equal in exact arithmetic, rounded in a
# different order, so the cancellation leaves ~ulp(|dP| ~ 10) there.  dq erred 1.53e-6 (torch
# 2.6e-7, |dq| up to 2.5); seeds 1-5 erred 0.3-0.5e-6.  Rows with more keys are unaffected.
SCORE_GRADS = ("dq", "dk")


def assert_attention_close(name: str, out, ref64, torch_lowp, label: str = "attention") -> None:
    """``assert_close`` for one of attention's outputs (out, dq, dk, dv), with the scaled atol
    for the score gradients (see SCORE_GRADS)."""
    atol = None
    if name in SCORE_GRADS:
        atol = ATOL[out.dtype] * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert_close(out, ref64, torch_lowp, atol=atol, name=f"{label} {name}")


def valid_lens_cases(n: int, n_queries: int, n_keys: int, generator=None):
    """(id, valid_lens) pairs: None, 1-D with 0, 1 and full, 1-D float (as the book stores
    them), 2-D per query."""
    g = generator
    one_d = torch.randint(0, n_keys + 1, (n,), generator=g)
    one_d[0] = 0
    if n > 1:
        one_d[1] = 1
    if n > 2:
        one_d[2] = n_keys
    two_d = torch.randint(0, n_keys + 1, (n, n_queries), generator=g)
    two_d[0, 0] = 0
    two_d[-1, -1] = n_keys
    return [("none", None), ("1d", one_d), ("1d_float", one_d.float()), ("2d", two_d)]
