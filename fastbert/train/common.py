"""What fine-tuning and pretraining share: options, devices, distributed setup (torchrun),
AMP, seeding, exact checkpoints (model, optimizer, scaler, every RNG, position in the
epoch), the JSON metrics log and the PNG curves."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as tdist

from .. import backends, cpu_cache

__all__ = ["RunConfig", "DistInfo", "setup_distributed", "cleanup_distributed",
           "seed_everything", "autocast", "make_grad_scaler", "rng_state", "set_rng_state",
           "MetricsLog", "progress", "Timer", "resolve_device", "all_reduce_sum", "cpu_threads",
           "make_adam"]


@dataclasses.dataclass
class RunConfig:
    """Options every command takes (see ``python -m fastbert <command> --help``)."""
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    amp: str = "off"                   # off | bf16 | fp16
    compile: bool = False
    backend: Optional[str] = None      # fastbert.set_backend name (None: leave as is)
    out_dir: Optional[str] = None      # checkpoints, metrics.json, curves.png
    resume: Optional[str] = None       # a checkpoint path, or "auto": <out_dir>/checkpoint.pt
    max_steps: Optional[int] = None    # stop (and checkpoint) after this many optimizer steps
    checkpoint_every: Optional[int] = None  # also checkpoint every N steps (mid-epoch)
    keep_checkpoints: Optional[int] = 3     # numbered checkpoints kept (None or 0: all)
    rss_every: int = 50                # log the process's RSS (MiB) every N steps (0: never)
    bucket: bool = False               # length-aware batching
    trim: bool = True                  # cut padding columns beyond a batch's longest example
    progress: bool = True              # tqdm bar (rank 0)
    num_workers: int = 0
    threads: Optional[int] = None      # torch.set_num_threads for this run (CPU)
    verbose: bool = True


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, dist: Optional[DistInfo] = None) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist else 0)
        torch.cuda.set_device(dev)
    return dev


def setup_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): gloo on the
    CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank, world, local)
    if not tdist.is_initialized():
        dev = resolve_device(device, info)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        store = _elastic_store(world)
        if store is not None:
            tdist.init_process_group(backend, store=store, rank=rank, world_size=world)
        else:
            tdist.init_process_group(backend)
        info.initialized_here = True
    return info


def _elastic_store(world: int):
    """Under torchrun the workers share the agent's TCPStore, and that store outlives a
    restart of the group; torch's env:// rendezvous uses it without a per-attempt prefix, so
    a restarted rank can read the *killed* group's addresses and fail (gloo: "connection
    refused") or hang.  A prefix per restart (TORCHELASTIC_RESTART_COUNT) keeps the attempts
    apart.  None outside torchrun's agent store (the plain env:// rendezvous is used)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            "MASTER_ADDR" not in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout
    base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=default_pg_timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return tdist.PrefixStore(f"fastbert/attempt_{attempt}", base)


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.enabled:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


@contextlib.contextmanager
def cpu_threads(n: Optional[int]):
    """``torch.set_num_threads(n)`` for the duration (None: leave it).  On a shared CPU one
    thread per process is often much faster for small models (no spinning hand-offs)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_training(cfg, body):
    """Run ``body(cfg, dist)`` with the process group, the backend choice and the thread count
    of this run set up, and torn down afterwards (the backend choice holds for this run only).
    Training is when fastbert installs its caching CPU allocator (FASTBERT_CPU_CACHE_MB; it
    stays for the process): ``import fastbert`` alone leaves the allocator alone."""
    cpu_cache.install_for_training()
    dist = setup_distributed(cfg.device)
    try:
        with (backends.use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()), \
                cpu_threads(cfg.threads):
            return body(cfg, dist)
    finally:
        cleanup_distributed(dist)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device (fp16 on the CPU is slow and "
                             "needs loss scaling); use --amp bf16 on the CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    raise ValueError(f"--amp must be off, bf16 or fp16, got {amp!r}")


def make_adam(params, lr: float) -> torch.optim.Adam:
    """The book's Adam, with PyTorch's fused implementation where it exists (CPU and CUDA
    float tensors): same update rule, one kernel instead of a dozen per parameter (the
    step takes ~5x less time for bert.small on a CPU)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def make_grad_scaler(device: torch.device, amp: str):
    """A GradScaler for fp16 on CUDA, else None (bf16 needs no loss scaling)."""
    if amp == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


class Timer:
    """Sums the wall time of the timed sections (d2l's Timer, for examples/sec)."""

    def __init__(self):
        self.total, self._start = 0.0, None

    def start(self):
        self._start = time.perf_counter()

    def stop(self) -> float:
        elapsed = time.perf_counter() - self._start
        self.total += elapsed
        return elapsed


class MetricsLog:
    """Per-step and per-epoch records, written as JSON and drawn as PNG curves (rank 0)."""

    def __init__(self, out_dir: Optional[str], config: Dict[str, Any], enabled: bool = True):
        self.out_dir, self.enabled = out_dir, enabled and out_dir is not None
        self.data: Dict[str, Any] = {"config": config, "steps": [], "epochs": []}

    @property
    def steps(self) -> List[Dict[str, Any]]:
        return self.data["steps"]

    @property
    def epochs(self) -> List[Dict[str, Any]]:
        return self.data["epochs"]

    def write(self, curves=()) -> None:
        if not self.enabled:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, "metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(path + ".tmp", path)
        if curves:
            self.plot(curves)

    def plot(self, curves) -> None:
        """``curves``: names of step/epoch fields; losses on the left, the rest (accuracies)
        on the right, against the epoch (fractional for steps)."""
        try:
            # A bare Figure renders with Agg and leaves the user's pyplot backend alone.
            from matplotlib.figure import Figure
        except ImportError:
            if not getattr(self, "_warned", False):
                print("curves.png skipped: matplotlib is not installed "
                      "(pip install matplotlib, or fastbert[plot])")
                self._warned = True
            return
        fig = Figure(figsize=(10, 3.8))
        axes = fig.subplots(1, 2)
        for name in curves:
            ax = axes[0] if "loss" in name else axes[1]
            for kind, rows, style in (("step", self.steps, "-"), ("epoch", self.epochs, "o-")):
                pts = [(r["epoch_float"], r[name]) for r in rows if r.get(name) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    alpha = 0.35 if kind == "step" and len(rows) > 1 else 1.0
                    ax.plot(xs, ys, style, alpha=alpha, label=f"{name} ({kind})")
        for ax, title in zip(axes, ("loss", "accuracy")):
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, "curves.png"), dpi=100)
