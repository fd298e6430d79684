"""masked_softmax on every fast backend vs the float64 reference, forward and backward.

Reference: fastbert/backends/reference.py (d2l semantics).  Kernels: csrc/cpu/masked_softmax.cpp
(cpp), kernels/masked_softmax.py (triton).
"""
import os
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import ops
from fastbert.backends import reference

from op_testing import (FAST_BACKENDS, assert_close, device_for, dtypes_for, on_backend, valid_lens_cases,
                        require_extension)

# (N, Lq, Lk): length 1, odd, non-power-of-two, the book's max_len 64 and SNLI's 128.
SHAPES = [(1, 1, 1), (3, 5, 7), (4, 3, 33), (2, 4, 64), (3, 2, 128)]
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FAST_BACKENDS for d in dtypes_for(b)]


def _reference(X, vl):
    """Forward output and input gradient of the reference for a fixed output gradient."""
    X = X.detach().requires_grad_()
    Y = reference.masked_softmax(X, None if vl is None else vl.to(torch.int32))
    return Y, X


@pytest.fixture
def poisoned(monkeypatch):
    """C++ kernels fill their outputs with NaN before writing (csrc/cpu/cpu_common.h)."""
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", range(4), ids=["vl_none", "vl_1d", "vl_1d_float", "vl_2d"])
def test_forward_backward_matches_reference(backend, dtype, shape, case, poisoned):
    device = device_for(backend)
    N, Lq, Lk = shape
    vl_id, vl = valid_lens_cases(N, Lq, Lk)[case]
    vl = None if vl is None else vl.to(device)
    X = (torch.randn(shape, device=device) * 3).to(dtype)
    dY = torch.randn(shape, device=device).to(dtype)
    X_before = X.clone()
    with on_backend(backend, "masked_softmax", device, dtype):
        Xk = X.clone().requires_grad_()
        Y = ops.masked_softmax(Xk, vl)
        (dX,) = torch.autograd.grad(Y, Xk, dY)
    assert torch.equal(X, X_before), "masked_softmax must not mutate X"
    norm_vl = ops.normalize_valid_lens(vl, N, Lq, Lk, device)
    Y64, X64 = _reference(X.double(), norm_vl)
    (dX64,) = torch.autograd.grad(Y64, X64, dY.double())
    Ylp, Xlp = _reference(X, norm_vl)
    (dXlp,) = torch.autograd.grad(Ylp, Xlp, dY)
    assert Y.dtype == dtype and dX.dtype == dtype
    assert_close(Y, Y64, Ylp, name="masked_softmax forward")
    assert_close(dX, dX64, dXlp, name="masked_softmax dX")
    if norm_vl is not None:  # masked keys get exactly 0, and no gradient
        mask = reference.key_mask(norm_vl, Lq, Lk)
        assert (Y[~mask & (norm_vl.view(N, -1, 1) > 0).expand(N, Lq, Lk)] == 0).all()
        assert (dX[~mask] == 0).all()


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_zero_valid_len_rows_are_uniform(backend, dtype):
    device = device_for(backend)
    X = torch.randn(2, 3, 9, device=device).to(dtype)
    with on_backend(backend, "masked_softmax", device, dtype):
        Y = ops.masked_softmax(X, torch.tensor([0, 9], device=device))
    assert torch.equal(Y[0].float(), torch.full((3, 9), 1 / 9, dtype=dtype).float().to(device))
    assert not torch.isnan(Y).any()


def test_gradcheck_float64_kernel():
    """The C++ kernels take float64 too: gradcheck them through the registered autograd."""
    require_extension()  # the glue registers autograd and fakes
    op = torch.ops.fastbert.masked_softmax
    for vl in (None, torch.tensor([0, 1, 5], dtype=torch.int32),
               torch.tensor([[0, 2], [5, 1], [3, 3]], dtype=torch.int32)):
        X = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: op(x, vl), (X,))


def _opcheck_samples():
    X = torch.randn(3, 4, 10)
    return [(X, None), (X, torch.tensor([0, 3, 10], dtype=torch.int32)),
            (X.bfloat16(), torch.randint(0, 11, (3, 4), dtype=torch.int32))]


def test_opcheck():
    require_extension()  # the glue registers autograd and fakes
    for X, vl in _opcheck_samples():
        X = X.requires_grad_()
        torch.library.opcheck(torch.ops.fastbert.masked_softmax.default, (X, vl))
        Y = torch.ops.fastbert.masked_softmax(X.detach(), vl)
        torch.library.opcheck(torch.ops.fastbert.masked_softmax_backward.default,
                              (torch.randn_like(Y), Y, vl))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    torch._dynamo.reset()
    X = torch.randn(3, 4, 10, device=device).to(dtype)
    vl = torch.tensor([0, 4, 10], device=device)
    fn = torch.compile(lambda x, v: ops.masked_softmax(x, v) * 2, fullgraph=True)
    with on_backend(backend, "masked_softmax", device, dtype):
        Xc = X.clone().requires_grad_()
        Y = fn(Xc, vl)
        Y.float().sum().backward()
        Xe = X.clone().requires_grad_()
        Ye = ops.masked_softmax(Xe, vl) * 2
        Ye.float().sum().backward()
    assert torch.equal(Y, Ye)
    torch.testing.assert_close(Xc.grad, Xe.grad)


# ------------------------------------------------------------------ bad input (the C++ op itself)
@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(2, 3, 4).half(), None), "float32, bfloat16 or float64"),
    (lambda: (torch.randint(0, 3, (2, 3, 4)), None), "float32, bfloat16 or float64"),
    (lambda: (torch.randn(3, 4), None), r"\[N, Lq, Lk\]"),
    (lambda: (torch.randn(2, 3, 4), torch.tensor([1, 2])), "int32"),
    (lambda: (torch.randn(2, 3, 4), torch.tensor([1, 2, 3], dtype=torch.int32)), "shape"),
    (lambda: (torch.randn(2, 3, 4), torch.tensor([1, 5], dtype=torch.int32)), r"\[0, 4\]"),
    (lambda: (torch.randn(2, 3, 4), torch.tensor([-1, 2], dtype=torch.int32)), r"\[0, 4\]"),
])
def test_cpp_bad_input(args, match):
    require_extension()  # the glue registers autograd and fakes
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastbert.masked_softmax(*args())


def test_cpp_backward_bad_input():
    require_extension()  # the glue registers autograd and fakes
    Y = torch.rand(2, 3, 4)
    with pytest.raises(RuntimeError, match="grad_out must match"):
        torch.ops.fastbert.masked_softmax_backward(torch.rand(2, 3, 5), Y, None)


# ------------------------------------------------------------------ the CUDA twin (GPU machines)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernel_matches_reference(dtype):
    require_extension()
    if not hasattr(torch.ops.fastbert, "_cuda_built"):
        pytest.fail("torch has CUDA but fastbert._C was built without the CUDA kernels")
    for shape in SHAPES:
        N, Lq, Lk = shape
        for _, vl in valid_lens_cases(N, Lq, Lk):
            vl = ops.normalize_valid_lens(vl, N, Lq, Lk, torch.device("cpu"))
            X = (torch.randn(shape) * 3).to(dtype)
            dY = torch.randn(shape).to(dtype)
            Xc = X.cuda().requires_grad_()
            Y = torch.ops.fastbert.masked_softmax(Xc, None if vl is None else vl.cuda())
            (dX,) = torch.autograd.grad(Y, Xc, dY.cuda())
            Y64, X64 = _reference(X.double(), vl)
            (dX64,) = torch.autograd.grad(Y64, X64, dY.double())
            Ylp, Xlp = _reference(X, vl)
            (dXlp,) = torch.autograd.grad(Ylp, Xlp, dY)
            assert_close(Y.cpu(), Y64, Ylp, name="CUDA masked_softmax")
            assert_close(dX.cpu(), dX64, dXlp, name="CUDA masked_softmax dX")


def test_without_the_extension_the_package_falls_back_with_one_warning():
    """An unbuilt fastbert._C leaves a working package: reference results, one warning."""
    code = (
        "import sys, warnings; sys.modules['fastbert._C'] = None\n"
        "import torch, fastbert\n"
        "from fastbert import ops\n"
        "from fastbert.backends import reference\n"
        "X = torch.randn(2, 3, 4); vl = torch.tensor([0, 2])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    with fastbert.use_backend('cpp'):\n"
        "        Y = ops.masked_softmax(X, vl); ops.masked_softmax(X, vl)\n"
        "        ops.pack(torch.randn(2, 3, 4), vl)\n"
        "assert torch.equal(Y, reference.masked_softmax(X, vl.int())), 'wrong fallback'\n"
        "msgs = [str(x.message) for x in w if 'fastbert' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'not available' in msgs[0], msgs\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
