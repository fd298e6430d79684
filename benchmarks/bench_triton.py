"""Triton kernel benchmarks (GPU only): the launchers in kernels/ called directly, without the
autograd and dispatch layers that bench_ops.py times through the front door.

    pytest benchmarks/bench_triton.py --benchmark-only [--bench-long]

Without CUDA every benchmark skips with the reason (Triton on CPU is the interpreter, a
correctness tool: timing it would be meaningless).

Rows: kernel x mode (fwd / bwd) x shape x dtype (bf16 by default; fp32, bf16, fp16 with
--bench-long), plus Triton-specific sweeps: head sizes 32/48/64/96/128 at hidden 768
(non-powers of two are padded to the next power of two inside the kernel, so 48 and 96 pay
for 64 and 128), and attention dropout 0 vs 0.2 (the mask is regenerated in the backward).
Shapes: the book's configs (harness.CONFIGS), L = 128 padded, valid lengths from SNLI.
Counted work in extra_info: matmul FLOPs on valid tokens/keys only (flash backward counted as
2x its forward, the useful work; the kernel recomputes the scores on top), or the minimal
bytes (every input read once, every output written once).
"""
from __future__ import annotations

import pytest
import torch

import harness

HEAD_SIZES = (32, 48, 64, 96, 128)
SWEEP_HIDDEN = 768


@pytest.fixture(autouse=True)
def _cuda_only():
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA GPU to benchmark (torch.cuda.is_available() is "
                    "False; on CPU Triton only runs its interpreter, a correctness tool)")


def pytest_generate_tests(metafunc):
    long_run = metafunc.config.getoption("--bench-long", default=False) or \
        harness.env_flag("FASTBERT_BENCH_LONG")
    if "case" in metafunc.fixturenames:
        cases = harness.LONG_CASES if long_run else harness.DEFAULT_CASES
        metafunc.parametrize("case", cases, ids=[harness.case_id(*c) for c in cases])
    if "dtype_name" in metafunc.fixturenames:
        names = ["fp32", "bf16", "fp16"] if long_run else ["bf16"]
        metafunc.parametrize("dtype_name", names)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _kernels():
    from fastbert.kernels import (add_layernorm, attention, ffn, gather_positions,
                                  masked_softmax, pack_unpack, varlen_attention)
    return dict(add_layernorm=add_layernorm, attention=attention, ffn=ffn,
                gather_positions=gather_positions, masked_softmax=masked_softmax,
                pack_unpack=pack_unpack, varlen_attention=varlen_attention)


def _batch(lengths, batch):
    lens = lengths.sample(batch, seed=batch).to("cuda")
    cu = torch.nn.functional.pad(torch.cumsum(lens.long(), 0), (1, 0)).to(torch.int32)
    return lens, cu, int(cu[-1]), int(lens.max())


def _run(benchmark, fn, timing, group, *, kind, impl, dtype_name, batch, tokens, **counts):
    benchmark.group = group
    seconds = harness.measure(benchmark, fn, timing, torch.device("cuda"))
    harness.record(benchmark, seconds, kind=kind, impl=impl, dtype=dtype_name, batch=batch,
                   tokens=tokens, ceilings=_CEILINGS.get("value"), **counts)


_CEILINGS: dict = {}


@pytest.fixture(autouse=True)
def _ceilings(ceilings):
    """The matmul/copy ceilings bench_ceilings.py measured in this run (% of ceiling)."""
    _CEILINGS["value"] = ceilings
    yield


# ----------------------------------------------------------------------------- attention
def _varlen_setup(lengths, batch, H, D, dtype):
    lens, cu, T, max_len = _batch(lengths, batch)
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=dtype) for _ in range(3))
    fwd_flops = 4.0 * (lens.double() ** 2).sum().item() * H * D
    return lens, cu, T, max_len, (q, k, v), fwd_flops


def _varlen_fn(mode, qkv, cu, max_len, dropout_p):
    K = _kernels()["varlen_attention"]
    seed = torch.tensor(1, dtype=torch.int64) if dropout_p else None
    if mode == "fwd":
        return lambda: K.forward(*qkv, cu, max_len, dropout_p, None, seed)
    out, lse = K.forward(*qkv, cu, max_len, dropout_p, None, seed)
    dout = torch.randn_like(out)
    return lambda: K.backward(*qkv, out, lse, dout, cu, max_len, dropout_p, None, seed)


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_varlen_attention(benchmark, timing, lengths, case, dtype_name, mode, dropout_p):
    dims = harness.CONFIGS[case[0]]
    lens, cu, T, max_len, qkv, fwd_flops = _varlen_setup(lengths, case[1], dims.num_heads,
                                                         dims.head_size, DTYPES[dtype_name])
    _run(benchmark, _varlen_fn(mode, qkv, cu, max_len, dropout_p), timing,
         f"triton varlen_attention {mode}", kind="op", impl="triton-kernel",
         dtype_name=dtype_name, batch=case[1], tokens=T, op="varlen_attention", mode=mode,
         dropout_p=dropout_p, shape=f"{case[0]} H{dims.num_heads} D{dims.head_size}",
         flops=fwd_flops * (2.0 if mode == "bwd" else 1.0))


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("D", HEAD_SIZES)
def test_varlen_attention_head_sizes(benchmark, timing, lengths, dtype_name, mode, D):
    batch, H = 64, SWEEP_HIDDEN // D
    lens, cu, T, max_len, qkv, fwd_flops = _varlen_setup(lengths, batch, H, D,
                                                         DTYPES[dtype_name])
    _run(benchmark, _varlen_fn(mode, qkv, cu, max_len, 0.0), timing,
         f"triton varlen_attention head sizes {mode}", kind="op", impl="triton-kernel",
         dtype_name=dtype_name, batch=batch, tokens=T, op="varlen_attention", mode=mode,
         shape=f"C{SWEEP_HIDDEN} H{H} D{D}", flops=fwd_flops * (2.0 if mode == "bwd" else 1.0))


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_padded_attention(benchmark, timing, lengths, case, dtype_name, mode):
    dims, batch = harness.CONFIGS[case[0]], case[1]
    H, D, L = dims.num_heads, dims.head_size, harness.SEQ_LEN
    lens, _, T, _ = _batch(lengths, batch)
    vl = lens.repeat_interleave(H)
    dtype = DTYPES[dtype_name]
    q, k, v = (torch.randn(batch * H, L, D, device="cuda", dtype=dtype) for _ in range(3))
    K = _kernels()["attention"]
    if mode == "fwd":
        fn = lambda: K.forward(q, k, v, vl)  # noqa: E731
    else:
        out, lse = K.forward(q, k, v, vl)
        dout = torch.randn_like(out)
        fn = lambda: K.backward(q, k, v, out, lse, dout, vl)  # noqa: E731
    # Useful work: every query row (pads included: the padded op computes them) x valid keys.
    fwd_flops = 4.0 * L * lens.double().sum().item() * H * D
    _run(benchmark, fn, timing, f"triton attention (padded) {mode}", kind="op",
         impl="triton-kernel", dtype_name=dtype_name, batch=batch, tokens=T, op="attention",
         mode=mode, shape=f"{case[0]} L{L}",
         flops=fwd_flops * (2.0 if mode == "bwd" else 1.0))


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_masked_softmax(benchmark, timing, lengths, case, dtype_name, mode):
    dims, batch = harness.CONFIGS[case[0]], case[1]
    H, L = dims.num_heads, harness.SEQ_LEN
    lens, _, T, _ = _batch(lengths, batch)
    vl = lens.repeat_interleave(H)
    X = torch.randn(batch * H, L, L, device="cuda", dtype=DTYPES[dtype_name])
    K = _kernels()["masked_softmax"]
    if mode == "fwd":
        fn, tensors = (lambda: K.forward(X, vl)), 2  # noqa: E731  read X, write Y
    else:
        Y = K.forward(X, vl)
        dY = torch.randn_like(Y)
        fn, tensors = (lambda: K.backward(Y, dY, vl)), 3  # noqa: E731  read Y, dY, write dX
    _run(benchmark, fn, timing, f"triton masked_softmax {mode}", kind="op",
         impl="triton-kernel", dtype_name=dtype_name, batch=batch, tokens=T,
         op="masked_softmax", mode=mode, shape=f"{case[0]} [{batch * H},{L},{L}]",
         bytes_moved=float(tensors * X.numel() * X.element_size()))


# ----------------------------------------------------------------------------- token-wise
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_add_layernorm(benchmark, timing, lengths, case, dtype_name, mode, dropout_p):
    dims, batch = harness.CONFIGS[case[0]], case[1]
    _, _, T, _ = _batch(lengths, batch)
    C, dtype = dims.num_hiddens, DTYPES[dtype_name]
    x, y = (torch.randn(T, C, device="cuda", dtype=dtype) for _ in range(2))
    w, b = torch.ones(C, device="cuda", dtype=dtype), torch.zeros(C, device="cuda", dtype=dtype)
    seed = torch.tensor(1, dtype=torch.int64) if dropout_p else None
    K = _kernels()["add_layernorm"]
    if mode == "fwd":
        fn, tensors = (lambda: K.forward(x, y, w, b, 1e-5, dropout_p, seed)), 3  # noqa: E731
    else:
        out, mean, rstd = K.forward(x, y, w, b, 1e-5, dropout_p, seed)
        dout = torch.randn_like(out)
        fn = lambda: K.backward(dout, x, y, w, mean, rstd, dropout_p, seed)  # noqa: E731
        tensors = 5  # read dout, x, y; write dx, dy
    _run(benchmark, fn, timing, f"triton add_layernorm {mode}", kind="op",
         impl="triton-kernel", dtype_name=dtype_name, batch=batch, tokens=T, op="add_layernorm",
         mode=mode, dropout_p=dropout_p, shape=f"{case[0]} [{T},{C}]",
         bytes_moved=float(tensors * x.numel() * x.element_size()))


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_ffn(benchmark, timing, lengths, case, dtype_name, mode, activation):
    dims, batch = harness.CONFIGS[case[0]], case[1]
    _, _, T, _ = _batch(lengths, batch)
    C, Fh, dtype = dims.num_hiddens, dims.ffn_num_hiddens, DTYPES[dtype_name]
    x = torch.randn(T, C, device="cuda", dtype=dtype)
    w1 = torch.randn(Fh, C, device="cuda", dtype=dtype) / C ** 0.5
    w2 = torch.randn(C, Fh, device="cuda", dtype=dtype) / Fh ** 0.5
    b1, b2 = torch.zeros(Fh, device="cuda", dtype=dtype), torch.zeros(C, device="cuda", dtype=dtype)
    K = _kernels()["ffn"]
    if mode == "fwd":
        fn = lambda: K.forward(x, w1, b1, w2, b2, activation)  # noqa: E731
    else:
        out, a, h = K.forward(x, w1, b1, w2, b2, activation)
        dout = torch.randn_like(out)
        fn = lambda: K.backward(dout, x, w1, w2, a, h, activation, True, True)  # noqa: E731
    fwd_flops = 2.0 * 2.0 * T * C * Fh
    _run(benchmark, fn, timing, f"triton ffn {mode}", kind="op", impl="triton-kernel",
         dtype_name=dtype_name, batch=batch, tokens=T, op="ffn", mode=mode,
         activation=activation, shape=f"{case[0]} [{T},{C}]x{Fh}",
         flops=fwd_flops * (2.0 if mode == "bwd" else 1.0))


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_gather_positions(benchmark, timing, case, dtype_name, mode):
    dims, batch = harness.CONFIGS[case[0]], case[1]
    L, C = harness.SEQ_LEN, dims.num_hiddens
    P = round(L * harness.MLM_FRACTION)
    X = torch.randn(batch, L, C, device="cuda", dtype=DTYPES[dtype_name])
    pos = torch.randint(0, L, (batch, P), device="cuda")
    K = _kernels()["gather_positions"]
    if mode == "fwd":
        fn = lambda: K.forward(X, pos)  # noqa: E731
        moved = 2 * batch * P * C  # read the gathered rows, write them
    else:
        dout = torch.randn(batch, P, C, device="cuda", dtype=X.dtype)
        fn = lambda: K.backward(dout, pos, L)  # noqa: E731
        moved = batch * P * C + batch * L * C  # read dout, write all of dX
    _run(benchmark, fn, timing, f"triton gather_positions {mode}", kind="op",
         impl="triton-kernel", dtype_name=dtype_name, batch=batch, tokens=batch * P,
         op="gather_positions", mode=mode, shape=f"{case[0]} [{batch},{L},{C}] P{P}",
         bytes_moved=float(moved * X.element_size()))


@pytest.mark.parametrize("direction", ["pack", "unpack"])
def test_pack_unpack(benchmark, timing, lengths, case, dtype_name, direction):
    dims, batch = harness.CONFIGS[case[0]], case[1]
    L, C = harness.SEQ_LEN, dims.num_hiddens
    lens, cu, T, _ = _batch(lengths, batch)
    X = torch.randn(batch, L, C, device="cuda", dtype=DTYPES[dtype_name])
    K = _kernels()["pack_unpack"]
    if direction == "pack":
        fn = lambda: K.pack_rows(X, cu, T)  # noqa: E731  (the kernel; pack() adds a sync)
        moved = 2 * T * C
    else:
        packed = K.pack_rows(X, cu, T)
        fn = lambda: K.unpack(packed, cu, L)  # noqa: E731
        moved = T * C + batch * L * C  # read the tokens, write the padded tensor
    _run(benchmark, fn, timing, f"triton {direction}", kind="op", impl="triton-kernel",
         dtype_name=dtype_name, batch=batch, tokens=T, op=direction, mode="fwd",
         shape=f"{case[0]} [{batch},{L},{C}]", bytes_moved=float(moved * X.element_size()))
