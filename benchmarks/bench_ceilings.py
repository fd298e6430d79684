"""The machine's ceilings, measured in the same run as everything else.

A large matmul (fp32 and bf16; torch.matmul and oneDNN's fused linear when this torch has it)
bounds what any compute-bound kernel can reach; a large copy bounds memory-bound ops. The
report states every result as a percentage of these, and the other benchmark files read them
from the session's ``ceilings`` fixture (this file is collected first).
"""
from __future__ import annotations

import pytest
import torch

import harness

MATMUL_N = {"cpu": 2048, "cuda": 8192}
COPY_BYTES = 256 * 2**20  # per buffer: far beyond any cache


def _mkldnn_linear():
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    return op


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["torch.matmul", "mkldnn._linear_pointwise"])
def test_matmul_ceiling(benchmark, impl, dtype_name, bench_device, timing, ceilings):
    dtype = harness.DTYPES[dtype_name]
    n = MATMUL_N[bench_device.type]
    a = torch.randn(n, n, device=bench_device).to(dtype)
    b = torch.randn(n, n, device=bench_device).to(dtype)
    if impl == "torch.matmul":
        fn = lambda: torch.matmul(a, b)  # noqa: E731
    else:
        op = _mkldnn_linear()
        if op is None or bench_device.type != "cpu":
            pytest.skip("torch.ops.mkldnn._linear_pointwise is not available here")
        bias = torch.zeros(n, dtype=dtype)
        fn = lambda: op(a, b, bias, "none", [], "")  # noqa: E731  (a @ b^T + bias)
    assert torch.isfinite(fn()).all()
    benchmark.group = "ceiling: matmul"
    seconds = harness.measure(benchmark, fn, timing, bench_device)
    flops = 2.0 * n ** 3
    harness.record(benchmark, seconds, kind="ceiling", impl=impl, dtype=dtype_name, batch=1,
                   tokens=0, flops=flops, op="matmul", shape=f"{n}x{n}x{n}")
    if seconds:
        ceilings.offer(f"matmul_{dtype_name}", flops / seconds / 1e9)


def test_copy_ceiling(benchmark, bench_device, timing, ceilings):
    src = torch.ones(COPY_BYTES // 4, device=bench_device)
    dst = torch.empty_like(src)
    benchmark.group = "ceiling: memory"
    seconds = harness.measure(benchmark, lambda: dst.copy_(src), timing, bench_device)
    moved = 2.0 * COPY_BYTES  # read src + write dst
    harness.record(benchmark, seconds, kind="ceiling", impl="Tensor.copy_", dtype="fp32",
                   batch=1, tokens=0, bytes_moved=moved, op="copy", shape=f"{COPY_BYTES >> 20} MiB")
    if seconds:
        ceilings.offer("copy", moved / seconds / 1e9)
