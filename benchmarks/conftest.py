"""pytest setup of the benchmark suite: ``pytest benchmarks/ --benchmark-only``.

What this conftest offers every benchmarks/bench_*.py file (bench_pretrain.py included):

Options   ``--bench-long`` (or FASTBERT_BENCH_LONG=1): the full set of shapes (bert.small and
          bert.base, batch 64 and 256) and bf16 op rows; ``--bench-quick`` (or
          FASTBERT_BENCH_QUICK=1): one round per benchmark, to validate the suite fast.
Marker    ``@pytest.mark.bench_long``: the test runs only with --bench-long.
Fixtures (session scope)
  ``bench_device``  torch.device: CUDA when present, else CPU.
  ``timing``        harness.TimingPolicy; time with ``harness.measure(benchmark, fn, timing,
                    bench_device)`` (warm-up, then benchmark.pedantic with budgeted rounds).
  ``d2l``           the real d2l 0.17.6 ``d2l.torch`` module (skips cleanly when absent);
  ``d2l_or_none``   the same, or None (for rows that only need d2l for the baseline).
  ``lengths``       harness.LengthSampler: ``lengths.sample(batch, seed)`` -> int32 valid_lens
                    drawn from real SNLI pairs (synthetic, same mean, when the data is absent).
  ``baseline``      harness.BaselineCache: d2l eager fp32 seconds per job key, measured once
                    per session; pass ``baseline_s=`` to ``harness.record`` for the ratio.
  ``ceilings``      harness.Ceilings: the matmul GFLOP/s and copy GB/s measured by
                    bench_ceilings.py earlier in the same run (pct_of_ceiling in records).
  ``long_run``      bool: --bench-long given.
Helpers   harness.record(benchmark, seconds, kind=..., impl=..., ...) fills extra_info with
          examples/s, tokens/s, GFLOP/s or GB/s, % of ceiling and the ratio to d2l;
          harness.backend_skip_reason(backend, ops, device, dtype) says why a backend would
          fall back (skip with it); harness.CONFIGS holds the book's shapes.
Machine   pytest_benchmark_update_machine_info adds the CPU model, threads, torch version,
          fastbert backends, the length source and every skipped benchmark with its
          parameters and reason (``skipped``: the report's "skipped: why" cells) to the
          JSON's machine_info.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastbert benchmarks")
    group.addoption("--bench-long", action="store_true", default=False,
                    help="run the full benchmark set (bert.base, batch 256, bf16 op rows)")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="one timed round per benchmark (to validate the suite, not to measure)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_long: runs only with --bench-long")


def is_long(config) -> bool:
    return bool(config.getoption("--bench-long", default=False)) or \
        harness.env_flag("FASTBERT_BENCH_LONG")


def is_quick(config) -> bool:
    return bool(config.getoption("--bench-quick", default=False)) or \
        harness.env_flag("FASTBERT_BENCH_QUICK")


def pytest_collection_modifyitems(config, items):
    if is_long(config):
        return
    skip = pytest.mark.skip(reason="long benchmark: run with --bench-long")
    for item in items:
        if "bench_long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def long_run(pytestconfig) -> bool:
    return is_long(pytestconfig)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return harness.device()


@pytest.fixture(scope="session")
def timing(pytestconfig) -> harness.TimingPolicy:
    return harness.TimingPolicy.quick() if is_quick(pytestconfig) else harness.TimingPolicy()


@pytest.fixture(scope="session")
def d2l():
    try:
        return harness.load_d2l_017()
    except ImportError as exc:
        pytest.skip(f"d2l {harness.D2L_VERSION} peer unavailable: {exc}")


@pytest.fixture(scope="session")
def d2l_or_none():
    try:
        return harness.load_d2l_017()
    except ImportError:
        return None


@pytest.fixture(scope="session")
def lengths() -> harness.LengthSampler:
    return _LENGTHS


@pytest.fixture(scope="session")
def baseline(bench_device) -> harness.BaselineCache:
    return harness.BaselineCache(bench_device)


@pytest.fixture(scope="session")
def ceilings() -> harness.Ceilings:
    return _CEILINGS


_LENGTHS = harness.LengthSampler()
_CEILINGS = harness.Ceilings()
# Every skipped benchmark of the run (a missing peer, a precision a peer lacks ...), with its
# parameters and reason: pytest-benchmark's JSON holds only the rows that ran, so the report
# reads the skips from machine_info.fastbert.skipped to say why a peer's cell is empty.
_SKIPPED: list = []


def _param_value(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_param_value(x) for x in v]
    return str(v)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped:
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: "):]
    params = getattr(getattr(item, "callspec", None), "params", {})
    _SKIPPED.append({"test": item.originalname if hasattr(item, "originalname") else item.name,
                     "module": item.module.__name__ if getattr(item, "module", None) else "",
                     "params": {k: _param_value(v) for k, v in params.items()},
                     "reason": reason})


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", harness.REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001  (no git: not worth failing a benchmark run)
        return ""


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "triton", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastbert
    machine_info["fastbert"] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        # Which build of the C++ kernels ran (avx512 / avx2 / default) and why: a figure
        # means little without it (the same machine runs avx2 ~10-15% slower than avx512).
        "cpu_kernel_variant": fastbert.backends._cpu_variant_line(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": _versions(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "backends": fastbert.available_backends(),
        "lengths": _LENGTHS.describe(),
        "git_commit": _git_commit(),
        "long_run": is_long(config),
        "quick_run": is_quick(config),
        "ceilings": dict(_CEILINGS.values),
        "skipped": list(_SKIPPED),
        # Other processes on the machine skew every timing: the report prints this.
        "load_average_1_5_15min_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg")
        else None,
    }
