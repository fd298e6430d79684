"""embedding_sum (the unpadded encoder's token + segment + position embedding of its packed
ids) on every fast backend vs the float64 reference, forward and backward: repeated and
boundary ids, T = 0 and 1, odd widths, detached tables (no gradient asked), poisoned outputs,
gradcheck, opcheck, compile, bad input.

Reference: fastbert/backends/reference.py embedding_sum.  Kernel: csrc/cpu/embedding_sum.cpp
(cpp).  The triton backend serves this op with the reference function itself (by design, see
fastbert/backends/triton/embedding_sum.py): comparing it with the reference would compare the
reference with itself, so it has no cases here, only a test that it is still that function
(a real Triton kernel must bring its own cases).
"""
import pytest
import torch

from fastbert import ops
from fastbert.backends import reference

from fastbert import backends
from op_testing import (assert_close, device_for, dtypes_for, on_backend,
                        require_extension)

KERNEL_BACKENDS = ("cpp",)  # the backends with an embedding_sum kernel of their own
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in KERNEL_BACKENDS
                  for d in dtypes_for(b)]
# (T, C, V, P): no tokens, one token, odd and vector-multiple widths, BERT-small's 256.
SHAPES = [(0, 16, 5, 4), (1, 1, 3, 2), (37, 7, 11, 9), (64, 33, 50, 128), (300, 256, 1000, 128)]


def make_ids(T, V, P, generator):
    ids = torch.stack([torch.randint(0, V, (T,), generator=generator),
                       torch.randint(0, 2, (T,), generator=generator),
                       torch.randint(0, P, (T,), generator=generator)], -1)
    if T >= 4:  # the tables' first and last rows, and a repeated id
        ids[0] = torch.tensor([0, 0, 0])
        ids[1] = torch.tensor([V - 1, 1, P - 1])
        ids[2:4, 0] = 3 % V
    return ids


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")


def grads_of(fn, ids, tables, dout, train=(True, True, True)):
    leaves = [t.detach().requires_grad_(need) for t, need in zip(tables, train)]
    out = fn(ids, *leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, dout) if wanted and out.numel() else \
        tuple(torch.zeros_like(t) for t in wanted)
    return out, grads


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("T,C,V,P", SHAPES)
@pytest.mark.parametrize("train", [(True, True, True), (True, True, False)], ids=["all", "pos-frozen"])
def test_matches_reference(backend, dtype, T, C, V, P, train, poisoned):
    device = device_for(backend)
    g = torch.Generator().manual_seed(T * 31 + C)
    ids = make_ids(T, V, P, g).to(device)
    tables = [torch.randn(n, C, generator=g).to(dtype).to(device) for n in (V, 2, P)]
    dout = torch.randn(T, C, generator=g).to(dtype).to(device)
    with on_backend(backend, "embedding_sum", device, dtype):
        out, grads = grads_of(ops.embedding_sum, ids, tables, dout, train)
    out64, grads64 = grads_of(reference.embedding_sum, ids, [t.double() for t in tables],
                              dout.double(), train)
    outlp, gradslp = grads_of(reference.embedding_sum, ids, tables, dout, train)
    assert out.dtype == dtype and out.shape == (T, C)
    assert_close(out, out64, outlp, name="embedding_sum forward")
    assert len(grads) == sum(train)
    for g_, g64, glp in zip(grads, grads64, gradslp):
        assert g_.dtype == dtype
        assert_close(g_, g64, glp, name="embedding_sum table gradient")


def test_triton_serves_the_reference_function():
    """What the triton backend runs for embedding_sum is the reference's own function (no
    kernel to test); if that changes, the new kernel needs the cases above."""
    triton_backend = backends._load("triton")
    if not triton_backend.available:
        pytest.skip(triton_backend.reason)
    assert triton_backend.ops["embedding_sum"] is reference.embedding_sum


def test_cpp_backward_leaves_out_unneeded_tables_and_is_deterministic():
    require_extension()
    g = torch.Generator().manual_seed(3)
    ids = make_ids(500, 40, 30, g)
    grad = torch.randn(500, 24, generator=g)
    op = torch.ops.fastbert.embedding_sum_backward
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(op(grad, ids, 40, 2, 30, [True, True, False]))
    finally:
        torch.set_num_threads(threads)
    assert results[0][2].shape == (0,)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_gradcheck_float64_kernel():
    require_extension()
    g = torch.Generator().manual_seed(1)
    ids = make_ids(9, 5, 4, g)
    tables = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True, generator=g) for n in (5, 2, 4)]
    assert torch.autograd.gradcheck(lambda *t: torch.ops.fastbert.embedding_sum(ids, *t), tables)


def test_opcheck():
    require_extension()
    g = torch.Generator().manual_seed(2)
    ids = make_ids(12, 7, 6, g)
    for dtype in (torch.float32, torch.bfloat16):
        tables = [torch.randn(n, 10, generator=g).to(dtype).requires_grad_() for n in (7, 2, 6)]
        torch.library.opcheck(torch.ops.fastbert.embedding_sum.default, (ids, *tables))
        torch.library.opcheck(torch.ops.fastbert.embedding_sum_backward.default,
                              (torch.randn(12, 10).to(dtype), ids, 7, 2, 6, [True, False, True]))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    ids = make_ids(20, 9, 8, g).to(device)
    tables = [torch.randn(n, 12, generator=g).to(dtype).to(device) for n in (9, 2, 8)]

    def f(ids, a, b, c):
        return ops.embedding_sum(ids, a, b, c) * 2

    results = []
    with on_backend(backend, "embedding_sum", device, dtype):
        for fn in (torch.compile(f, fullgraph=True), f):
            leaves = [t.clone().requires_grad_() for t in tables]
            out = fn(ids, *leaves)
            out.float().sum().backward()
            results.append([out] + [t.grad for t in leaves])
    # Inductor may add a low-precision reference's three rows in fp32 and round once (eager
    # rounds twice): a few ulps of the largest value apart.
    for a, e in zip(*results):
        if dtype in (torch.bfloat16, torch.float16):
            ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
            torch.testing.assert_close(a, e, rtol=0, atol=4 * ulp * float(e.abs().max()))
        else:
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("make_args,error,match", [
    (lambda t: (torch.zeros(4, 3, dtype=torch.int32), *t), TypeError, "int64"),
    (lambda t: (torch.zeros(4, 2, dtype=torch.int64), *t), TypeError, r"\[T, 3\]"),
    (lambda t: (torch.tensor([[5, 0, 0]]), *t), ValueError, r"ids\[:, 0\].*\[0, 4\]"),
    (lambda t: (torch.tensor([[0, 2, 0]]), *t), ValueError, r"ids\[:, 1\]"),
    (lambda t: (torch.tensor([[0, 0, -1]]), *t), ValueError, r"ids\[:, 2\]"),
    (lambda t: (torch.zeros(1, 3, dtype=torch.int64), t[0], t[1].double(), t[2]), ValueError, "like token_weight"),
    (lambda t: (torch.zeros(1, 3, dtype=torch.int64), t[0], torch.randn(2, 7), t[2]), ValueError, r"\[rows, 8\]"),
])
def test_bad_input(make_args, error, match):
    tables = (torch.randn(5, 8), torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(error, match=match):
        ops.embedding_sum(*make_args(tables))


def test_cpp_kernel_checks_ids_itself():
    require_extension()
    tables = (torch.randn(5, 8), torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="position id 3 .* out of range"):
        torch.ops.fastbert.embedding_sum(torch.tensor([[0, 0, 3]]), *tables)
