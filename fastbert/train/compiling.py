"""``--compile``: torch.compile for the training loop, with its recompiles bounded and its
warm-up measured.

* One graph for the whole model, traced with dynamic shapes: the packed token count T is a
  function of the batch's data (``fastbert::pack``'s fake kernel gives it an unbacked size),
  batch size and length vary with every batch.  ``dynamic=True`` makes them symbolic from
  the first trace (no static first graph thrown away at the second shape), and
  ``capture_dynamic_output_shape_ops`` lets Dynamo trace through ``pack`` instead of
  breaking the graph there (which cost one graph, and its recompiles, per module below it).
  That setting is Dynamo's process-wide config, so it is set only inside :func:`scope`,
  around fastbert's own loop, and restored after; so is ``use_duck_shape=False``
  (:data:`SHAPE_CONFIG`: a first batch of size equal to its length must not tie the two).
* So a run compiles one training graph and one evaluation graph (grad mode off), however its
  batches are shaped; :class:`CompileStats` counts what Dynamo compiled anyway (recompiles,
  graph breaks) and which steps paid for it, into the metrics log.
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Any, Dict, List

import torch

__all__ = ["compile_module", "scope", "CompileStats"]

DYNAMO_CONFIG = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(module, dynamic=True)


# Without duck shaping: by default the first trace gives dims of equal size one symbol, so a
# first batch whose size equals its (trimmed) length (32 x 32) guards B == L and the next
# batch recompiles.  A batch's size and length are unrelated.
SHAPE_CONFIG = {"use_duck_shape": False}


@contextlib.contextmanager
def scope(enabled: bool):
    """Dynamo's config for fastbert's graphs, for the duration of the block (or nothing)."""
    if not enabled:
        yield
        return
    import torch.fx.experimental._config as shape_config
    with torch._dynamo.config.patch(**DYNAMO_CONFIG), shape_config.patch(**SHAPE_CONFIG):
        yield


def _counters() -> Dict[str, int]:
    from torch._dynamo.utils import counters
    return {"frames": int(counters["frames"].get("ok", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


class CompileStats:
    """Frames Dynamo compiled while the loop ran: in which training steps (their time is the
    warm-up), and in all (evaluation included)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = _counters() if enabled else None
        self.step_frames = 0
        self.warmup_seconds = 0.0
        self.warmup_steps: List[int] = []
        self.steady_seconds: List[float] = []
        self._before = None

    def before_step(self) -> None:
        if self.enabled:
            self._before = _counters()["frames"]

    def after_step(self, step: int, seconds: float) -> int:
        """Frames compiled during this step (0 when not compiling)."""
        if not self.enabled:
            return 0
        new = _counters()["frames"] - self._before
        if new:
            self.step_frames += new
            self.warmup_seconds += seconds
            self.warmup_steps.append(step)
        else:
            self.steady_seconds.append(seconds)
        return new

    def summary(self) -> Dict[str, Any]:
        now = _counters()
        frames = now["frames"] - self.start["frames"]
        steady = self.steady_seconds
        outside = frames - self.step_frames  # evaluation (grad mode off)
        return {
            # One graph for the training steps and one for evaluation is the floor; every
            # other frame compiled is a recompile (or a graph break's second half).
            "frames_compiled": frames,
            "frames_compiled_in_steps": self.step_frames,
            "recompiles": max(0, self.step_frames - 1) + max(0, outside - 1),
            "graph_breaks": now["graph_breaks"] - self.start["graph_breaks"],
            "warmup_steps": self.warmup_steps,
            "warmup_seconds": round(self.warmup_seconds, 3),
            "steady_step_seconds_median": (round(statistics.median(steady), 5)
                                           if steady else None),
        }

    def line(self) -> str:
        s = self.summary()
        steady = s["steady_step_seconds_median"]
        return (f"torch.compile: {s['frames_compiled']} graph(s) compiled "
                f"({s['recompiles']} recompile(s), {s['graph_breaks']} graph break(s)); "
                f"warm-up {s['warmup_seconds']:.1f} s in step(s) {s['warmup_steps']}; "
                + (f"steady step {steady * 1e3:.1f} ms (median)" if steady else
                   "no steady step yet"))
