"""Per-op benchmarks: every hot op through the front door (``fastbert.ops.*``), forward,
backward and forward+backward, on every backend that really runs it, beside the real d2l
0.17.6 code doing the same job.

Rows per (op, mode, shape, dtype):
  ``d2l``        d2l's own code for the job (``d2l.masked_softmax``, ``DotProductAttention``,
                 ``AddNorm``, ``PositionWiseFFN``, ``MaskLM``'s gather); its fp32 time is the
                 baseline of every ratio.  varlen attention has no d2l form: its ratio is
                 against d2l's padded attention on the same batch (what d2l runs for it).
                 pack/unpack have no d2l counterpart (no ratio).
  ``reference`` / ``cpp`` / ``triton``: ``with fastbert.use_backend(name)``; a backend that
                 would fall back to the reference for the op is skipped with the reason.
  ``compile``    ``torch.compile`` of the front door on the reference backend.
Modes: ``fwd`` (under no_grad, as inference runs), ``bwd`` (``autograd.grad`` on a retained
graph: the backward alone), ``fwd+bwd`` (a training step's share).  Dropout is 0 here except in
``add_layernorm_dropout`` (the end-to-end train step runs with the book's dropout).

Shapes: B batch, L=128 padded length, valid lengths sampled from SNLI, H heads, D head size,
C hidden, F FFN hidden, T valid tokens.  The attention/softmax ops run on the padded
[B*H, L, *] layout; add_layernorm and ffn on the packed [T, C] tokens (fastbert's unpadded
encoder; the d2l rows run the same [T, C] tensor, so the ratio is the kernel's own gain).
``add_layernorm_dropout`` is AddNorm as training runs it, with the book's dropout 0.1 (d2l:
``nn.Dropout`` then add then LayerNorm; fastbert: the fused kernel's counter-RNG dropout).
Counted work: FLOPs of the useful (valid-key) matmuls, backward = 2x forward; bytes = the
minimal tensor traffic (each input read once, each output written once).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert
from fastbert import ops

import harness

OPS = ("masked_softmax", "attention", "varlen_attention", "add_layernorm",
       "add_layernorm_dropout", "ffn", "gather_positions", "pack", "unpack")
# Benchmark rows that time a fastbert op under another configuration: row name -> op.
OP_OF_ROW = {"add_layernorm_dropout": "add_layernorm"}
# The book's dropout (bert.small / bert.base fine-tuning and pretraining): AddNorm in training.
BOOK_DROPOUT = 0.1
IMPLS = ("d2l", "reference", "cpp", "triton", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
BACKWARD_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}  # matmul FLOPs relative to fwd


def pytest_generate_tests(metafunc):
    long_run = metafunc.config.getoption("--bench-long", default=False) or \
        harness.env_flag("FASTBERT_BENCH_LONG")
    if "op_case" in metafunc.fixturenames:
        cases = harness.LONG_CASES if long_run else harness.DEFAULT_CASES
        metafunc.parametrize("op_case", cases, ids=[harness.case_id(*c) for c in cases])
    if "dtype_name" in metafunc.fixturenames:
        metafunc.parametrize("dtype_name", ["fp32", "bf16"] if long_run else ["fp32"])


# ----------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One op on one batch: the front-door call, its tensor arguments, and the counts."""
    call: Callable                      # call(*args) -> Tensor, through fastbert.ops
    args: tuple
    grad_args: Sequence[int]            # indices of args to differentiate
    batch: int
    tokens: int
    fwd_flops: Optional[float] = None
    bytes_by_mode: Dict[str, float] = field(default_factory=dict)
    d2l: Optional[Callable] = None      # d2l_module -> (fn() -> Tensor, grad targets)
    baseline_op: Optional[str] = None   # the op whose d2l fp32 time is this job's baseline
    note: str = ""

    def flops(self, mode: str) -> Optional[float]:
        return None if self.fwd_flops is None else self.fwd_flops * BACKWARD_FACTOR[mode]


def _leaf(*shape, dtype, dev, scale=1.0):
    return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_()


def _cu_seqlens(lens: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)


def build(op: str, dims: harness.BertDims, lens: torch.Tensor, dtype: torch.dtype,
          dev: torch.device) -> Job:
    B, L = lens.numel(), harness.SEQ_LEN
    H, D, C, Fh = dims.num_heads, dims.head_size, dims.num_hiddens, dims.ffn_num_hiddens
    lens = lens.to(dev)
    T = int(lens.sum())
    n = lens.double()
    elt = torch.finfo(dtype).bits // 8

    if op == "masked_softmax":
        X = _leaf(B * H, L, L, dtype=dtype, dev=dev)
        vl = lens.repeat_interleave(H)
        size = X.numel() * elt
        # d2l writes -1e6 into its input in place: under autograd it gets a copy (1 extra pass).
        return Job(lambda X, vl: ops.masked_softmax(X, vl), (X, vl), (0,), B, T,
                   bytes_by_mode={"fwd": 2 * size, "bwd": 3 * size, "fwd+bwd": 5 * size},
                   d2l=lambda d2l: (lambda: d2l.masked_softmax(
                       X.clone() if torch.is_grad_enabled() else X, vl), (X,)),
                   baseline_op="masked_softmax",
                   note="d2l rows copy X under autograd (d2l masks its input in place)")

    if op == "attention":
        q, k, v = (_leaf(B * H, L, D, dtype=dtype, dev=dev) for _ in range(3))
        vl = lens.repeat_interleave(H)

        def d2l_attention(d2l):
            att = d2l.DotProductAttention(0.0)
            return (lambda: att(q, k, v, vl)), (q, k, v)
        return Job(lambda q, k, v, vl: ops.attention(q, k, v, vl), (q, k, v, vl), (0, 1, 2),
                   B, T, fwd_flops=4.0 * H * D * L * n.sum().item(), d2l=d2l_attention,
                   baseline_op="attention")

    if op == "varlen_attention":
        q, k, v = (_leaf(T, H, D, dtype=dtype, dev=dev) for _ in range(3))
        cu, max_len = _cu_seqlens(lens), int(lens.max())
        return Job(lambda q, k, v, cu: ops.varlen_attention(q, k, v, cu, max_len),
                   (q, k, v, cu), (0, 1, 2), B, T,
                   fwd_flops=4.0 * H * D * (n * n).sum().item(), baseline_op="attention",
                   note="ratio against d2l's padded attention on the same batch")

    if op in ("add_layernorm", "add_layernorm_dropout"):
        p = BOOK_DROPOUT if op == "add_layernorm_dropout" else 0.0
        x, y = _leaf(T, C, dtype=dtype, dev=dev), _leaf(T, C, dtype=dtype, dev=dev)
        w = (1 + 0.1 * torch.randn(C, device=dev)).to(dtype).requires_grad_()
        b = (0.1 * torch.randn(C, device=dev)).to(dtype).requires_grad_()
        size = T * C * elt

        def d2l_addnorm(d2l):
            an = d2l.AddNorm(C, p).to(device=dev, dtype=dtype)  # a fresh module trains
            with torch.no_grad():
                an.ln.weight.copy_(w)
                an.ln.bias.copy_(b)
            return (lambda: an(x, y)), (x, y, an.ln.weight, an.ln.bias)
        # Minimal traffic: forward reads x, y, writes out; backward reads dout, x, y, writes
        # dx (and dy with dropout; without, d2l's add hands dx to both).
        bwd = (5 if p > 0 else 4) * size
        return Job(lambda x, y, w, b: ops.add_layernorm(x, y, w, b, 1e-5, p), (x, y, w, b),
                   (0, 1, 2, 3), B, T,
                   bytes_by_mode={"fwd": 3 * size, "bwd": bwd, "fwd+bwd": 3 * size + bwd},
                   d2l=d2l_addnorm, baseline_op=op)

    if op == "ffn":
        x = _leaf(T, C, dtype=dtype, dev=dev)
        w1, b1 = _leaf(Fh, C, dtype=dtype, dev=dev, scale=C ** -0.5), _leaf(Fh, dtype=dtype, dev=dev)
        w2, b2 = _leaf(C, Fh, dtype=dtype, dev=dev, scale=Fh ** -0.5), _leaf(C, dtype=dtype, dev=dev)

        def d2l_ffn(d2l):
            m = d2l.PositionWiseFFN(C, Fh, C).to(device=dev, dtype=dtype)
            with torch.no_grad():
                for dst, src in ((m.dense1.weight, w1), (m.dense1.bias, b1),
                                 (m.dense2.weight, w2), (m.dense2.bias, b2)):
                    dst.copy_(src)
            return (lambda: m(x)), (x, *m.parameters())
        return Job(lambda x, w1, b1, w2, b2: ops.ffn(x, w1, b1, w2, b2, "relu"),
                   (x, w1, b1, w2, b2), (0, 1, 2, 3, 4), B, T, fwd_flops=4.0 * T * C * Fh,
                   d2l=d2l_ffn, baseline_op="ffn")

    if op == "gather_positions":
        P = round(L * harness.MLM_FRACTION)
        X = _leaf(B, L, C, dtype=dtype, dev=dev)
        positions = (torch.rand(B, P, device=dev) * lens[:, None]).long()
        out = B * P * C * elt

        def d2l_gather(d2l):
            mlm = d2l.MaskLM(harness.VOCAB_SIZE, C, C)
            mlm.mlp = nn.Identity()  # keep exactly d2l's gather, drop its MLP
            return (lambda: mlm(X, positions)), (X,)
        return Job(lambda X, pos: ops.gather_positions(X, pos), (X, positions), (0,), B, T,
                   bytes_by_mode={"fwd": 2 * out, "bwd": X.numel() * elt + 2 * out,
                                  "fwd+bwd": X.numel() * elt + 4 * out},
                   d2l=d2l_gather, baseline_op="gather_positions")

    if op == "pack":
        X = _leaf(B, L, C, dtype=dtype, dev=dev)
        rows, full = T * C * elt, X.numel() * elt
        return Job(lambda X, vl: ops.pack(X, vl)[0], (X, lens), (0,), B, T,
                   bytes_by_mode={"fwd": 2 * rows, "bwd": rows + full, "fwd+bwd": 3 * rows + full},
                   note="no d2l counterpart (d2l never packs)")

    if op == "unpack":
        packed = _leaf(T, C, dtype=dtype, dev=dev)
        cu = _cu_seqlens(lens)
        rows, full = T * C * elt, B * L * C * elt
        return Job(lambda p, cu: ops.unpack(p, cu, L), (packed, cu), (0,), B, T,
                   bytes_by_mode={"fwd": rows + full, "bwd": 2 * rows, "fwd+bwd": 3 * rows + full},
                   note="no d2l counterpart (d2l never packs)")
    raise KeyError(op)


_COMPILED: Dict[tuple, Callable] = {}


def compiled(call: Callable, key: tuple) -> Callable:
    """One ``torch.compile`` per (op, shape, dtype), shared by its three modes (no_grad and
    grad mode each compile once); the recompile limit is raised so a long run's many
    shapes never silently fall back to eager."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(call, dynamic=False)
    return _COMPILED[key]


def mode_callable(fn: Callable[[], torch.Tensor], targets: Sequence[torch.Tensor], mode: str):
    """What one timed call runs: fwd under no_grad, bwd on a retained graph, or both."""
    targets = tuple(targets)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn()
        return run
    out = fn()
    grad_out = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, targets, grad_out, retain_graph=True)
    del out
    return lambda: torch.autograd.grad(fn(), targets, grad_out)


def d2l_baseline_fn(d2l, op: str, dims, lens, dev, mode: str):
    """The callable whose time is the ratio's denominator: d2l eager, fp32."""
    job = build(op, dims, lens, torch.float32, dev)
    fn, targets = job.d2l(d2l)
    return mode_callable(fn, targets, mode)


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, impl, mode, op_case, dtype_name, d2l_or_none, lengths, baseline,
            ceilings, timing, bench_device):
    config, batch = op_case
    dims, dtype = harness.CONFIGS[config], harness.DTYPES[dtype_name]
    lens = lengths.sample(batch, seed=batch)
    job = build(op, dims, lens, dtype, bench_device)

    backend = {"d2l": None, "compile": "reference"}.get(impl, impl)
    if impl == "d2l":
        if job.d2l is None:
            pytest.skip(f"d2l has no {op} ({job.note})")
        if d2l_or_none is None:
            pytest.skip(f"d2l {harness.D2L_VERSION} peer is not installed")
        fn, targets = job.d2l(d2l_or_none)
        label = "d2l eager"
    else:
        why_not = harness.backend_skip_reason(backend, [OP_OF_ROW.get(op, op)], bench_device,
                                              dtype)
        if why_not:
            pytest.skip(why_not)
        args = job.args
        targets = [args[i] for i in job.grad_args]
        call = job.call
        if impl == "compile":
            call = compiled(job.call, (op, config, batch, dtype_name))
        fn = lambda: call(*args)  # noqa: E731
        label = "torch.compile(reference)" if impl == "compile" else f"fastbert[{impl}]"

    benchmark.group = f"op {op} {mode} {harness.case_id(config, batch)} {dtype_name}"
    with warnings.catch_warnings(), harness.peer_conditions(impl == "d2l"), \
            (fastbert.use_backend(backend) if backend else _nothing()):
        warnings.simplefilter("ignore")
        run = mode_callable(fn, targets, mode)
        first = run()
        outs = first if isinstance(first, tuple) else (first,)
        assert all(torch.isfinite(o.float()).all() for o in outs if o.is_floating_point())
        seconds = harness.measure(benchmark, run, timing, bench_device)

    key = ("op", job.baseline_op, config, batch, mode)
    baseline_s = None
    if job.baseline_op is not None and d2l_or_none is not None:
        if impl == "d2l" and dtype_name == "fp32" and job.baseline_op == op:
            baseline.put(key, seconds)
        baseline_s = baseline.get(key, lambda: d2l_baseline_fn(
            d2l_or_none, job.baseline_op, dims, lens, bench_device, mode))
    harness.record(benchmark, seconds, kind="op", impl=label, dtype=dtype_name, batch=batch,
                   tokens=job.tokens, flops=job.flops(mode),
                   bytes_moved=job.bytes_by_mode.get(mode), ceilings=ceilings,
                   baseline_s=baseline_s, op=op, mode=mode, config=config,
                   seq_len=harness.SEQ_LEN, baseline_key="/".join(map(str, key)),
                   note=job.note)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
