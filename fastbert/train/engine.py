"""The one training loop behind fine-tuning and pretraining.

A task (:class:`Task`: :mod:`.finetune` or :mod:`.pretrain`) brings its model, data and
loss; the engine does the rest, once for both:

* resume: ``--resume`` (a file, or ``auto``: the newest *verified* checkpoint of
  ``--out-dir``, falling back past corrupt ones) and, under ``torchrun --max-restarts``,
  by itself on a restarted group (``TORCHELASTIC_RESTART_COUNT`` > 0).  Rank 0 reads the
  checkpoint and broadcasts it, so the other ranks (other nodes) need no shared disk;
* the deterministic global-batch sampler (the data order is a function of seed, epoch and
  position, so the position is all a checkpoint needs), the loader, DDP, torch.compile;
* AMP (autocast, a GradScaler for fp16 whose skipped steps are counted, not fatal);
* checkpoints (rank 0, :mod:`.checkpoint`: atomic, sha256-checked, the last
  ``--keep-checkpoints`` kept) at every epoch end, every ``--checkpoint-every`` steps and at
  ``--max-steps``: model, optimizer, scaler, epoch, position in it, the epoch's partial
  sums, every RNG (Python, NumPy, torch CPU/CUDA: fastbert's fused dropout draws its seeds
  from torch's CPU generator), the metrics log;
* a loss that is not finite stops the run naming the step (the last checkpoint on disk is
  from before it);
* the metrics log (JSON + curves), with the process's RSS every ``--rss-every`` steps.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as tdist
from torch import nn

from ..data.batching import GlobalBatchSampler
from . import checkpoint as ckpt_io
from . import compiling
from .common import (MetricsLog, Timer, all_reduce_sum, autocast, progress, rng_state,
                     set_rng_state)
from .use import bert_options

__all__ = ["Task", "train", "restart_count", "rss_mb", "find_resume"]


def restart_count() -> int:
    """How many times torchrun restarted this worker group (0: the first start, or no
    torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; else the peak from
    getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Task:
    """What a training task gives the engine.  Attributes set by the task's setup:
    ``kind``, ``net`` (its state_dict is the checkpoint's ``model``), ``bert``,
    ``step_module`` (what DDP and compile wrap), ``optimizer``, ``scaler``, ``train_set``,
    ``collate``, ``vocab`` (a Vocab or None), ``curves``."""

    kind: str = ""
    curves: tuple = ()

    def check_resume(self, state: Dict[str, Any], path: str) -> None:
        if state.get("kind") != self.kind:
            what = {"finetune": "fine-tuning", "pretrain": "pretraining"}[self.kind]
            raise ValueError(f"{path} is not a {what} checkpoint (kind {state.get('kind')!r})")
        if self.vocab is not None and state.get("vocab") != self.vocab.idx_to_token:
            raise ValueError(f"{path} was trained with another vocabulary ({self.vocab_hint})")

    vocab_hint = "different data"

    def forward(self, model, batch, dist):
        """``(loss to backpropagate, float64 CPU tensor of per-step sums)``; the engine sums
        the second over the ranks."""
        raise NotImplementedError

    def record(self, stats: torch.Tensor) -> Dict[str, Any]:
        """The step's log fields from the summed stats (the first field is a loss)."""
        raise NotImplementedError

    def num_examples(self, stats: torch.Tensor) -> int:
        return int(stats[-1])

    def epoch_row(self, engine: "Engine", epoch: int, sums: torch.Tensor) -> Optional[dict]:
        """The finished epoch's log row (None: none)."""
        return None

    def postfix(self, sums, stats) -> Dict[str, str]:
        return {}

    def progress_total(self, sampler, cfg, global_step):
        return None


@dataclasses.dataclass
class Engine:
    cfg: Any
    dist: Any
    device: torch.device
    task: Task
    log: MetricsLog
    model: nn.Module = None
    global_step: int = 0
    last_checkpoint: Optional[str] = None
    compile_stats: Any = None
    scaler_skipped: int = 0

    def say(self, *a, **k):
        if self.dist.is_main and self.cfg.verbose:
            print(*a, **k)


def find_resume(cfg, dist) -> Optional[str]:
    """The checkpoint (file or run folder) to resume from: ``--resume``, or ``--out-dir``
    on a group torchrun restarted (when it holds a checkpoint)."""
    if cfg.resume:
        if cfg.resume == "auto":
            if not cfg.out_dir:
                raise ValueError("--resume without a path needs --out-dir")
            return cfg.out_dir
        return cfg.resume
    if restart_count() > 0 and cfg.out_dir and (
            ckpt_io.find_checkpoints(cfg.out_dir)
            or os.path.isfile(os.path.join(cfg.out_dir, ckpt_io.LATEST_NAME))):
        return cfg.out_dir
    return None


def _load_resume(cfg, dist, say):
    """``(path, state)``: rank 0 decides where to resume from, reads the checkpoint and
    broadcasts it, so the other ranks (other nodes) need no shared disk."""
    if not cfg.resume and restart_count() == 0:
        return None, None
    box: List[Any] = [None, None, None]
    if dist.is_main:
        try:
            where = find_resume(cfg, dist)
            if where is not None and os.path.isdir(where):
                path, state = ckpt_io.latest_checkpoint(where)
                if path is None:
                    raise FileNotFoundError(f"--resume: no checkpoint in {where}")
                box = [path, state, None]
            elif where is not None:
                box = [where, ckpt_io.load_checkpoint(where), None]
        except (OSError, ValueError) as e:
            box = [None, None, e]
    if dist.enabled:
        tdist.broadcast_object_list(box, src=0)
    if box[2] is not None:
        raise box[2]
    if box[1] is not None and restart_count() > 0 and not cfg.resume:
        say(f"torchrun restart {restart_count()}: resuming from the newest checkpoint")
    return box[0], box[1]


def _kill_hook():
    """``FASTBERT_TEST_KILL_AT_STEP=STEP[:RANK]`` (tests only): SIGKILL this worker right
    after that global step, on the first start of the group only (restart count 0)."""
    spec = os.environ.get("FASTBERT_TEST_KILL_AT_STEP")
    if not spec or restart_count() != 0:
        return None
    step, _, rank = spec.partition(":")
    return int(step), int(rank or 1)


def train(cfg, dist, device, task: Task) -> Engine:
    """Run the loop for ``task``; returns the :class:`Engine` (its ``log``, ``timer``,
    ``examples``)."""
    with compiling.scope(cfg.compile):
        return _train(cfg, dist, device, task)


def _train(cfg, dist, device, task: Task) -> Engine:
    main = dist.is_main
    log = MetricsLog(cfg.out_dir, dataclasses.asdict(cfg), enabled=main)
    eng = Engine(cfg, dist, device, task, log)
    every = getattr(cfg, "checkpoint_every", None) or 0
    keep = getattr(cfg, "keep_checkpoints", None)
    rss_every = getattr(cfg, "rss_every", None) or 0
    start_epoch = start_step = 0
    partial = None
    path, state = _load_resume(cfg, dist, eng.say)
    net, optimizer, scaler = task.net, task.optimizer, task.scaler
    if state is not None:
        task.check_resume(state, path)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        eng.global_step, partial = state["global_step"], state.get("partial")
        log.data["steps"], log.data["epochs"] = state["log"]["steps"], state["log"]["epochs"]
        eng.scaler_skipped = state.get("scaler_skipped", 0)
        eng.last_checkpoint = path
        eng.say(f"resumed from {path}: epoch {start_epoch + 1}, step {start_step}")
    elif main and cfg.out_dir and os.path.isdir(cfg.out_dir):
        gone = [p for p in ckpt_io.remove_checkpoints(cfg.out_dir) if p.endswith(".pt")]
        if gone:
            eng.say(f"a fresh run: removed {len(gone)} checkpoint(s) of an earlier run in "
                    f"{cfg.out_dir} (use --resume to continue it)")

    sampler = GlobalBatchSampler(len(task.train_set), cfg.batch_size, shuffle=True,
                                 seed=cfg.seed, lengths=task.train_set.lengths,
                                 bucket=cfg.bucket, rank=dist.rank, world_size=dist.world_size)
    # Its own generator: iterating never touches the global RNG (exact resume).
    loader = torch.utils.data.DataLoader(task.train_set, batch_sampler=sampler,
                                         collate_fn=task.collate,
                                         num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(0))
    model = task.step_module
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            task.step_module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = compiling.compile_module(model)
    eng.model = model
    eng.compile_stats = compiling.CompileStats(cfg.compile)

    def save(epoch, step_in_epoch, partial_sums=None):
        if not cfg.out_dir:
            return
        # Every rank's RNGs: ranks draw different amounts (dropout over differently sized
        # shards), so each gets its own back on resume.
        rngs = [None] * dist.world_size if main else None
        if dist.enabled:
            tdist.gather_object(rng_state(), rngs, dst=0)
        else:
            rngs = [rng_state()]
        if not main:
            return
        eng.last_checkpoint = ckpt_io.save_checkpoint(cfg.out_dir, {
            "kind": task.kind, "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": eng.global_step,
            "partial": partial_sums, "rng": rngs[0], "rng_ranks": rngs, "log": log.data,
            "scaler_skipped": eng.scaler_skipped, "world_size": dist.world_size,
            "config": dataclasses.asdict(cfg), "bert_options": bert_options(task.bert),
            "vocab": task.vocab.idx_to_token if task.vocab is not None else None},
            eng.global_step, keep=keep)

    if state is not None:
        # Last: everything above may have drawn random numbers.  This rank's own RNGs when
        # the world size is the same, else rank 0's.
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else state["rng"])
    state = None
    kill = _kill_hook()
    eng.timer, eng.examples = Timer(), 0
    done = cfg.max_steps is not None and eng.global_step >= cfg.max_steps
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        num_batches = len(sampler.global_batches())
        sums = torch.tensor(partial if partial is not None and epoch == start_epoch
                            else [0.0] * task.num_stats, dtype=torch.float64)
        step_in_epoch = sampler.start_step
        bar = progress(loader, main and cfg.progress, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       total=task.progress_total(sampler, cfg, eng.global_step))
        for batch in bar:
            eng.compile_stats.before_step()
            eng.timer.start()
            batch = [x.to(device, non_blocking=True) if torch.is_tensor(x)
                     else [t.to(device, non_blocking=True) for t in x] for x in batch]
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, cfg.amp):
                total, stats = task.forward(model, batch, dist)
            if scaler is not None:
                before = scaler.get_scale()
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
                skipped = scaler.get_scale() < before
                eng.scaler_skipped += int(skipped)
            else:
                total.backward()
                optimizer.step()
                skipped = False
            all_reduce_sum(stats, dist)
            step_seconds = eng.timer.stop()
            step_in_epoch += 1
            eng.global_step += 1
            compiled = eng.compile_stats.after_step(eng.global_step, step_seconds)
            rec = task.record(stats)
            first = next(iter(rec.values()))
            if not skipped and not torch.isfinite(torch.tensor(first)):
                where = (f"the last good checkpoint, {eng.last_checkpoint}, is kept"
                         if eng.last_checkpoint else "no checkpoint had been written")
                log.write(curves=task.curves)
                raise FloatingPointError(
                    f"the training loss is {first} at step {eng.global_step} (epoch "
                    f"{epoch + 1}, step {step_in_epoch} of it): stopped; {where} (a lower "
                    f"--lr, or --amp off, may help)")
            sums += stats
            eng.examples += task.num_examples(stats)
            row = {"step": eng.global_step, "epoch_float": epoch + step_in_epoch / num_batches,
                   **rec, "seconds": step_seconds}
            if skipped:
                row["scaler_skipped"] = True
            if compiled:
                row["frames_compiled"] = compiled
            if rss_every and eng.global_step % rss_every == 0:
                row["rss_mb"] = round(rss_mb(), 1)
            log.steps.append(row)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(**task.postfix(sums, stats))
            if cfg.max_steps is not None and eng.global_step >= cfg.max_steps:
                done = True
            if every and eng.global_step % every == 0 and step_in_epoch < num_batches \
                    and not done:
                save(epoch, step_in_epoch, sums.tolist())
                log.write()
            if kill and eng.global_step == kill[0] and dist.rank == kill[1]:
                os.kill(os.getpid(), signal.SIGKILL)
            if done:
                break
        finished = step_in_epoch >= num_batches
        if finished:
            row = task.epoch_row(eng, epoch, sums)
            if row is not None:
                log.epochs.append(row)
        # Stopped mid-epoch: keep the position (and the partial sums) so --resume continues
        # exactly here.
        save(epoch + 1 if finished else epoch, 0 if finished else step_in_epoch,
             None if finished else sums.tolist())
        log.write(curves=task.curves)
    if eng.scaler_skipped:
        eng.say(f"GradScaler skipped {eng.scaler_skipped} step(s) (inf/NaN gradients in "
                f"fp16; the scale was lowered)")
    log.data["scaler_skipped"] = eng.scaler_skipped
    if cfg.compile:
        log.data["compile"] = eng.compile_stats.summary()
        eng.say(eng.compile_stats.line())
        log.write()
    return eng
