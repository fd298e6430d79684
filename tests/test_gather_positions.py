"""gather_positions (the MLM gather ``X[b, positions[b, p]]``) on every fast backend vs the
reference; its backward scatter-adds (positions repeat) and must be deterministic.

Reference: fastbert/backends/reference.py.  Kernels: csrc/cpu/gather_positions.cpp (cpp),
kernels/gather_positions.py (triton).
"""
import pytest
import torch

from fastbert import ops
from fastbert.backends import reference

from op_testing import (FAST_BACKENDS, assert_close, device_for, dtypes_for, on_backend,
                        require_extension)

# (B, L, C, P): length 1, odd, non-power-of-two, the book's max_len 64 (10 predictions),
# SNLI's 128, BERT-small's 256 hidden.
SHAPES = [(1, 1, 1, 1), (3, 7, 5, 4), (2, 64, 33, 10), (4, 128, 24, 20), (2, 9, 256, 9), (2, 5, 3, 0)]
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FAST_BACKENDS for d in dtypes_for(b)]


def random_positions(B, L, P, device, dtype=torch.int64):
    """Random positions with repeats (slot 1 repeats slot 0; more by chance)."""
    pos = torch.randint(0, L, (B, P))
    if P > 1:
        pos[:, 1] = pos[:, 0]
    if P > 2:
        pos[:, -1] = L - 1
    return pos.to(device=device, dtype=dtype)


@pytest.fixture
def poisoned(monkeypatch):
    """C++ kernels fill their outputs with NaN before writing (csrc/cpu/cpu_common.h)."""
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_forward_backward_matches_reference(backend, dtype, shape, pos_dtype, poisoned):
    device = device_for(backend)
    B, L, C, P = shape
    X = torch.randn(B, L, C, device=device).to(dtype)
    pos = random_positions(B, L, P, device, pos_dtype)
    dout = torch.randn(B, P, C, device=device).to(dtype)
    with on_backend(backend, "gather_positions", device, dtype):
        Xk = X.clone().requires_grad_()
        out = ops.gather_positions(Xk, pos)
        (dX,) = torch.autograd.grad(out, Xk, dout)
    ref = reference.gather_positions(X, pos)
    assert out.dtype == dtype and torch.equal(out, ref), "a gather is a copy: bit-exact"

    def ref_grad(X_, dout_):
        X_ = X_.detach().requires_grad_()
        return torch.autograd.grad(reference.gather_positions(X_, pos), X_, dout_)[0]

    assert dX.dtype == dtype
    assert_close(dX, ref_grad(X.double(), dout.double()), ref_grad(X, dout), name="scatter-add dX")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_backward_is_deterministic(backend, dtype):
    device = device_for(backend)
    B, L, C, P = 3, 6, 40, 32  # many repeats: 32 slots over 6 positions
    X = torch.randn(B, L, C, device=device).to(dtype).requires_grad_()
    pos = torch.randint(0, L, (B, P), device=device)
    dout = torch.randn(B, P, C, device=device).to(dtype)
    with on_backend(backend, "gather_positions", device, dtype):
        grads = [torch.autograd.grad(ops.gather_positions(X, pos), X, dout)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_gradcheck_float64_kernel():
    require_extension()  # the glue registers autograd and fakes
    X = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[1, 1, 4], [0, 2, 2]])
    fn = lambda x: torch.ops.fastbert.gather_positions(x, pos)
    assert torch.autograd.gradcheck(fn, (X,))
    assert torch.autograd.gradgradcheck(fn, (X,))


def test_opcheck():
    require_extension()  # the glue registers autograd and fakes
    fb = torch.ops.fastbert
    for dtype in (torch.float32, torch.bfloat16):
        X = torch.randn(3, 8, 6, dtype=dtype, requires_grad=True)
        pos = torch.tensor([[0, 0, 7], [3, 2, 3], [5, 5, 5]])
        torch.library.opcheck(fb.gather_positions.default, (X, pos))
        torch.library.opcheck(fb.gather_positions_backward.default,
                              (torch.randn(3, 3, 6, dtype=dtype, requires_grad=True), pos, 8))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    torch._dynamo.reset()
    X = torch.randn(2, 9, 16, device=device).to(dtype)
    pos = torch.tensor([[1, 1, 8, 0], [4, 2, 2, 2]], device=device)
    f = lambda x, p: ops.gather_positions(x, p) * 2
    results = []
    with on_backend(backend, "gather_positions", device, dtype):
        for fn in (torch.compile(f, fullgraph=True), f):
            Xr = X.clone().requires_grad_()
            out = fn(Xr, pos)
            out.float().sum().backward()
            results.append((out, Xr.grad))
    for a, e in zip(*results):
        assert torch.equal(a, e)


# ------------------------------------------------------------------ bad input (the C++ op itself)
@pytest.mark.parametrize("make_args,match", [
    (lambda: (torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 2]])), None),  # valid: the control
    (lambda: (torch.randn(2, 5, 3).half(), torch.tensor([[0], [1]])), "float32, bfloat16"),
    (lambda: (torch.randn(2, 5), torch.tensor([[0], [1]])), r"\[B, L, C\]"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([[0], [1]], dtype=torch.int32)), "int64"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([0, 1])), r"\[2, P\]"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([[0], [1], [2]])), r"\[2, P\]"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([[0], [5]])), r"\[0, 4\]"),
    (lambda: (torch.randn(2, 5, 3), torch.tensor([[-1], [0]])), r"\[0, 4\]"),
])
def test_cpp_bad_input(make_args, match):
    require_extension()  # the glue registers autograd and fakes
    if match is None:
        torch.ops.fastbert.gather_positions(*make_args())
        return
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastbert.gather_positions(*make_args())


def test_cpp_backward_bad_input():
    require_extension()  # the glue registers autograd and fakes
    with pytest.raises(RuntimeError, match=r"\[0, 3\]"):
        torch.ops.fastbert.gather_positions_backward(torch.randn(1, 2, 3), torch.tensor([[0, 4]]), 4)
    with pytest.raises(RuntimeError, match="like grad_out"):
        torch.ops.fastbert.gather_positions_backward(torch.randn(1, 2, 3), torch.tensor([[0]]), 4)


# ------------------------------------------------------------------ the CUDA twin (GPU machines)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernel_matches_cpu(dtype):
    require_extension()
    if not hasattr(torch.ops.fastbert, "_cuda_built"):
        pytest.fail("torch has CUDA but fastbert._C was built without the CUDA kernels")
    for B, L, C, P in SHAPES:
        X = torch.randn(B, L, C).to(dtype)
        pos = random_positions(B, L, P, "cpu")
        dout = torch.randn(B, P, C).to(dtype)
        Xc = X.cuda().requires_grad_()
        out = torch.ops.fastbert.gather_positions(Xc, pos.cuda())
        (dX,) = torch.autograd.grad(out, Xc, dout.cuda())
        assert torch.equal(out.cpu(), reference.gather_positions(X, pos))
        X64 = X.double().requires_grad_()
        (dX64,) = torch.autograd.grad(reference.gather_positions(X64, pos), X64, dout.double())
        assert_close(dX.cpu(), dX64, atol=1e-2 if dtype != torch.float32 else 1e-5, name="CUDA scatter-add")
