"""Shared machinery of the benchmark suite (imported by the bench_*.py files and conftest.py).

One job: make every benchmark measure the same way and record the same figures.

* the book's shapes (``CONFIGS``) and which (config, batch) cases a run covers;
* real sequence lengths: SNLI (premise + hypothesis whitespace tokens + 3, capped at the
  padded length 128, as the fine-tuning chapter truncates), sampled per batch with a fixed
  seed; a fixed synthetic distribution with the same mean when the data is absent;
* ``measure``: a short warm-up, then ``benchmark.pedantic`` with rounds sized to a time
  budget (slow end-to-end steps get few rounds);
* ``record``: the figures every benchmark stores in ``benchmark.extra_info``;
* ``BaselineCache`` / ``Ceilings``: per-session caches of the d2l eager fp32 baseline and of
  the machine's measured limits, so ratios are computed against numbers from the same run.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class BertDims:
    num_hiddens: int
    num_heads: int
    ffn_num_hiddens: int
    num_layers: int

    @property
    def head_size(self) -> int:
        return self.num_hiddens // self.num_heads


# The book's pretrained configs (d2l `load_pretrained_model`: bert.small / bert.base).
CONFIGS: Dict[str, BertDims] = {
    "bert.small": BertDims(256, 4, 512, 2),
    "bert.base": BertDims(768, 12, 3072, 12),
}
SEQ_LEN = 128          # the fine-tuning chapter pads SNLI pairs to max_len=128
MODEL_MAX_LEN = 512    # load_pretrained_model builds BERTModel(max_len=512)
VOCAB_SIZE = 20256     # the vocabulary the book's pretraining builds from WikiText-2
DROPOUT = 0.2          # load_pretrained_model hard-codes dropout 0.2
NUM_CLASSES = 3        # SNLI labels
LEARNING_RATE = 1e-4   # the fine-tuning chapter's Adam lr
MLM_FRACTION = 0.15    # d2l: max_num_mlm_preds = round(max_len * 0.15)

DEFAULT_CASES = (("bert.small", 64),)
LONG_CASES = (("bert.small", 64), ("bert.small", 256), ("bert.base", 64), ("bert.base", 256))
# bert.base at batch 256 is left out of the end-to-end train step: d2l's padded attention
# alone keeps about 12 GB of activations there, more than a shared 2-core box should give.
E2E_LONG_CASES = (("bert.small", 64), ("bert.small", 256), ("bert.base", 64))


def case_id(config: str, batch: int) -> str:
    return f"{config}-b{batch}"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- lengths
from fastbert.data.paths import PACKAGED_DIR  # noqa: E402

SNLI_DIRS = (
    os.environ.get("FASTBERT_DATA", ""),
    PACKAGED_DIR,  # the same SNLI test and dev files ship with fastbert
)
SNLI_FILES = ("snli/snli_1.0_test.tokenized.tsv.gz", "snli/snli_1.0_dev.tokenized.tsv.gz")
SYNTHETIC_MEAN = 26.5  # the SNLI test+dev mean of premise + hypothesis + 3


def snli_lengths(max_len: int = SEQ_LEN) -> Optional[np.ndarray]:
    """Valid lengths of the real SNLI test+dev pairs as the book builds them
    (``<cls> premise <sep> hypothesis <sep>``, truncated to ``max_len``), or None."""
    for root in SNLI_DIRS:
        paths = [os.path.join(root, f) for f in SNLI_FILES] if root else []
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            continue
        lengths: List[int] = []
        for path in paths:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                next(fh)  # header
                for line in fh:
                    _, premise, hypothesis = line.rstrip("\n").split("\t")
                    lengths.append(len(premise.split()) + len(hypothesis.split()) + 3)
        return np.minimum(np.asarray(lengths, dtype=np.int64), max_len)
    return None


def synthetic_lengths(n: int = 20000, max_len: int = SEQ_LEN) -> np.ndarray:
    """A fixed stand-in with SNLI's mean: 3 special tokens + a gamma-distributed pair length."""
    rng = np.random.default_rng(1234)
    pair = rng.gamma(shape=6.0, scale=(SYNTHETIC_MEAN - 3) / 6.0, size=n)
    return np.clip(np.rint(pair).astype(np.int64) + 3, 5, max_len)


class LengthSampler:
    """Draws a batch of valid lengths from the real distribution (fixed seed per batch)."""

    def __init__(self, max_len: int = SEQ_LEN):
        real = snli_lengths(max_len)
        self.source = "snli test+dev" if real is not None else "synthetic (SNLI absent)"
        self.lengths = real if real is not None else synthetic_lengths(max_len=max_len)
        self.max_len = max_len

    def sample(self, batch: int, seed: int = 0) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        return torch.from_numpy(rng.choice(self.lengths, size=batch)).to(torch.int32)

    def describe(self) -> dict:
        return {"source": self.source, "pairs": int(self.lengths.size),
                "mean": round(float(self.lengths.mean()), 2),
                "max": int(self.lengths.max()), "padded_to": self.max_len}


# ----------------------------------------------------------------------------- timing
@dataclass
class TimingPolicy:
    budget_s: float = 1.0      # target time for the timed rounds of one benchmark
    min_rounds: int = 3
    max_rounds: int = 30
    round_s: float = 0.05      # iterations per round so one round lasts at least this
    warmup: int = 2

    @classmethod
    def quick(cls) -> "TimingPolicy":
        return cls(budget_s=0.0, min_rounds=1, max_rounds=1, round_s=0.0, warmup=1)


def _once(fn: Callable[[], object], dev: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    synchronize(dev)
    return time.perf_counter() - t0


def peer_conditions(is_peer: bool):
    """The conditions a row runs under.  A fastbert training run installs its caching CPU
    allocator (fastbert/cpu_cache.py), so fastbert rows install it as one would; code that runs
    without fastbert (d2l, torch.compile(d2l), HF) does not get it, so peer rows run with the
    cache paused, as their users run them."""
    import fastbert
    if is_peer:
        return fastbert.cpu_cache_disabled()
    fastbert.cpu_cache.install_for_training()
    return contextlib.nullcontext()


def peer_env(env: dict) -> dict:
    """``env`` for a child process that runs a peer: no fastbert allocator cache."""
    return dict(env, FASTBERT_CPU_CACHE_MB="0")


def quick_median(fn: Callable[[], object], dev: torch.device, reps: int = 5,
                 warmup: int = 2) -> float:
    """Median seconds per call, without pytest-benchmark (for cached baselines)."""
    for _ in range(warmup):
        fn()
    synchronize(dev)
    return statistics.median(_once(fn, dev) for _ in range(reps))


def measure(benchmark, fn: Callable[[], object], policy: TimingPolicy,
            dev: torch.device, budget_s: Optional[float] = None,
            iterations: Optional[int] = None, warmup: Optional[int] = None) -> Optional[float]:
    """Warm up ``fn`` (compiles, lazy init), then time it with ``benchmark.pedantic``.
    Returns the median seconds per call (None when benchmarks are disabled).

    ``iterations``: calls per round, fixed (the end-to-end rows pass the length of their
    batch cycle, so each round is one pass over every batch and the median round is a mean
    over the batches: throughput over an epoch, not the time of the median batch); by
    default sized so a round lasts ``policy.round_s``.  ``warmup``: calls before timing
    (default ``policy.warmup``).  A quick policy always times one call."""
    quick = policy.max_rounds == 1
    for _ in range(policy.warmup if warmup is None or quick else warmup):
        fn()
    # Calibrate on the fastest of a few calls: one call that a busy machine stalls would
    # otherwise size every round to a single iteration, and each round would carry a stall.
    one = min(_once(fn, dev) for _ in range(3 if (policy.round_s or iterations) and not quick
                                            else 1))
    budget = policy.budget_s if budget_s is None else budget_s
    if iterations is None or quick:
        iterations = max(1, int(policy.round_s / max(one, 1e-9))) if policy.round_s else 1
    rounds = int(budget / max(one * iterations, 1e-9)) if budget else policy.min_rounds
    rounds = max(policy.min_rounds, min(policy.max_rounds, rounds))

    def target():
        fn()
        synchronize(dev)

    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=0)
    if getattr(benchmark, "disabled", False) or benchmark.stats is None:
        return None
    return float(benchmark.stats.stats.median)


# ----------------------------------------------------------------------------- caches
class BaselineCache:
    """Seconds per call of the d2l eager fp32 baseline, per key, measured once per session.

    ``get(key, make_fn)`` measures ``make_fn()`` (which returns the callable to time) the
    first time, under :func:`peer_conditions`; a d2l fp32 benchmark row ``put``s its own
    median when it runs first."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.seconds: Dict[tuple, float] = {}

    def put(self, key: tuple, seconds: Optional[float]) -> None:
        if seconds is not None:
            self.seconds.setdefault(key, seconds)

    def get(self, key: tuple, make_fn: Optional[Callable[[], Callable[[], object]]] = None,
            reps: int = 5) -> Optional[float]:
        if key not in self.seconds and make_fn is not None:
            fn = make_fn()
            if fn is None:
                return None
            with peer_conditions(True):
                self.seconds[key] = quick_median(fn, self.dev, reps=reps)
        return self.seconds.get(key)


class Ceilings:
    """The machine's measured limits in this run: GFLOP/s per dtype, copy GB/s."""

    def __init__(self):
        self.values: Dict[str, float] = {}

    def offer(self, name: str, value: float) -> None:
        self.values[name] = max(value, self.values.get(name, 0.0))

    def matmul(self, dtype: torch.dtype) -> Optional[float]:
        return self.values.get(f"matmul_{dtype_name(dtype)}")

    def copy(self) -> Optional[float]:
        return self.values.get("copy")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}[dtype]


# ----------------------------------------------------------------------------- records
def record(benchmark, seconds: Optional[float], *, kind: str, impl: str, dtype: str,
           batch: int, tokens: int, flops: Optional[float] = None,
           bytes_moved: Optional[float] = None, ceilings: Optional[Ceilings] = None,
           baseline_s: Optional[float] = None, **labels) -> None:
    """Store the figures of one benchmark in ``benchmark.extra_info`` (JSON-serializable).

    ``flops``: useful FLOPs per call (padding excluded); ``bytes_moved``: minimal tensor
    traffic per call for memory-bound ops; ``baseline_s``: the d2l eager fp32 time of the
    same job in this run (ratio = baseline / this, so > 1 means faster than d2l)."""
    info = benchmark.extra_info
    info.update(kind=kind, impl=impl, dtype=dtype, batch=batch, valid_tokens=int(tokens))
    info.update({k: v for k, v in labels.items()})
    if flops is not None:
        info["flops"] = float(flops)
    if bytes_moved is not None:
        info["bytes"] = float(bytes_moved)
    if seconds is None or seconds <= 0:
        return
    info["median_s"] = seconds
    info["examples_per_s"] = batch / seconds
    info["tokens_per_s"] = tokens / seconds
    if flops is not None:
        info["gflops_per_s"] = flops / seconds / 1e9
        limit = ceilings.matmul(DTYPES.get(dtype, torch.float32)) if ceilings else None
        if limit:
            info["pct_of_ceiling"] = 100.0 * info["gflops_per_s"] / limit
            info["ceiling"] = f"matmul_{dtype}"
    if bytes_moved is not None:
        info["gb_per_s"] = bytes_moved / seconds / 1e9
        limit = ceilings.copy() if ceilings else None
        if limit and flops is None:
            info["pct_of_ceiling"] = 100.0 * info["gb_per_s"] / limit
            info["ceiling"] = "copy"
    if baseline_s is not None:
        info["baseline_s"] = baseline_s
        info["ratio_to_d2l_fp32"] = baseline_s / seconds


# ----------------------------------------------------------------------------- backends
def backend_skip_reason(backend: str, ops: Iterable[str], dev: torch.device,
                        dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot run all of ``ops`` here (None when it runs every one of them),
    checked with ``fastbert.backends.resolve_name`` so a fallback is never timed as a kernel."""
    import warnings

    import fastbert
    from fastbert import backends
    if backend == "triton" and dev.type != "cuda":
        return ("triton runs compiled kernels on CUDA only; on CPU it is Triton's interpreter, "
                "a correctness tool, not a kernel")
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fastbert.use_backend(backend):
            for op in ops:
                if backends.resolve_name(op, dev.type, dtype) != backend:
                    why = backends._load(backend).supports(op, dev.type, dtype)
                    missing.append(why or f"{op} resolves elsewhere")
    return "; ".join(dict.fromkeys(missing)) if missing else None


def resolved_ops(backend: str, dev: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """Which backend really runs each op under ``use_backend(backend)``."""
    import warnings

    import fastbert
    from fastbert import backends
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fastbert.use_backend(backend):
            for op in ALL_OPS:
                out[op] = backends.resolve_name(op, dev.type, dtype)
    return out


ALL_OPS = ("masked_softmax", "attention", "pack", "unpack", "varlen_attention", "add_layernorm",
           "ffn", "gather_positions")


# ----------------------------------------------------------------------------- FLOPs
def encoder_forward_flops(dims: BertDims, lengths: torch.Tensor) -> float:
    """Useful matmul FLOPs of one encoder forward on the valid tokens only: Q/K/V/O
    projections (4 C^2 per token), FFN (2 C F per token), scores and weighted sum
    (2 n C per token of a length-n sequence), each multiply-add counted as 2."""
    n = lengths.double()
    C, F = dims.num_hiddens, dims.ffn_num_hiddens
    per_layer = (2 * n * (4 * C * C + 2 * C * F) + 2 * 2 * n * n * C).sum().item()
    classifier = 2 * lengths.numel() * (C * C + C * NUM_CLASSES)
    return dims.num_layers * per_layer + classifier


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- d2l peer
D2L_VERSION = "0.17.6"


def _drop_torchvision_stand_in() -> None:
    """After d2l is imported, take the stand-in ``torchvision`` out of sys.modules again (d2l
    keeps its own reference): transformers probes ``find_spec("torchvision")``, which a
    module without a spec makes raise."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.datasets"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__spec__", None) is None \
                and getattr(mod, "__file__", None) is None:
            del sys.modules[name]


def load_d2l_017():
    """The real ``d2l.torch`` 0.17.6, through tests/d2l_loader.py when the repo has it (the
    same loader the parity tests use), else from ``.deps/d2l-0.17.6`` (``pip install --no-deps
    --target .deps/d2l-0.17.6 d2l==0.17.6``) or ``FASTBERT_D2L_0_17_6`` with a stand-in
    ``torchvision`` (the BERT code never uses it).  Raises ImportError when absent."""
    try:
        module = _load_d2l_017()
    finally:
        _drop_torchvision_stand_in()
    _register_d2l_names(module)
    return module


def _register_d2l_names(module) -> None:
    """Put ``d2l`` / ``d2l.torch`` back in sys.modules (the shared loader forgets them so two
    versions can coexist): torch.compile re-imports the module of every function it traces.
    Only 0.17.6 is ever loaded in a benchmark process."""
    import types
    if sys.modules.get("d2l.torch") is module:
        return
    if "d2l" not in sys.modules:
        package = types.ModuleType("d2l")
        package.__path__ = [os.path.dirname(module.__file__)]
        package.torch = module
        sys.modules["d2l"] = package
    sys.modules.setdefault("d2l.torch", module)


def _load_d2l_017():
    """See load_d2l_017."""
    tests_dir = os.path.join(REPO, "tests")
    if os.path.isfile(os.path.join(tests_dir, "d2l_loader.py")):
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        import d2l_loader  # noqa: E402
        path = d2l_loader.d2l_dir(D2L_VERSION)
        if not os.path.isdir(os.path.join(path, "d2l")):
            raise ImportError(f"d2l {D2L_VERSION} is not installed at {path}")
        return d2l_loader.load_d2l(D2L_VERSION)
    import importlib
    import types
    path = os.environ.get("FASTBERT_D2L_0_17_6") or os.path.join(REPO, ".deps", "d2l-0.17.6")
    if not os.path.isdir(os.path.join(path, "d2l")):
        raise ImportError(f"d2l {D2L_VERSION} is not installed at {path} (pip install --no-deps "
                          f"--target .deps/d2l-0.17.6 d2l==0.17.6)")
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.__path__ = []
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})
    sys.path.insert(0, path)
    try:
        return importlib.import_module("d2l.torch")
    finally:
        sys.path.remove(path)
