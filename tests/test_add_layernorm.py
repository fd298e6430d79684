"""add_layernorm (``layer_norm(dropout(y) + x)``, d2l's AddNorm) on every fast backend vs
the float64 reference, forward and backward, with and without dropout.

With dropout the test asks the backend for the keep mask its kernels draw for the seed and
applies the same mask to the reference.  Reference: fastbert/backends/reference.py.  Kernels:
csrc/cpu/add_layernorm.cpp (cpp), kernels/add_layernorm.py (triton).
"""
import pytest
import torch
import torch.nn.functional as F

from fastbert import ops

from op_testing import (FAST_BACKENDS, assert_close, device_for, dtypes_for, on_backend,
                        require_extension)

# x shapes [..., C]: length 1, odd, non-power-of-two, the book's 128 hidden, BERT-small's 256
# and BERT-base's 768.  For the CPU kernel's 16-lane sweeps unrolled by 4: C = 7 is one partial
# vector, 33 two whole and a partial, 117 an unrolled group, 3 whole and a partial.
SHAPES = [(1, 1), (3, 7), (2, 5, 33), (2, 117), (2, 3, 128), (5, 256), (3, 768)]
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FAST_BACKENDS for d in dtypes_for(b)]
EPS = 1e-5


def keep_mask(backend, seed, shape, p, device):
    """The bool keep mask ``backend``'s kernels draw for an output of ``shape``."""
    if backend == "cpp":
        return torch.ops.fastbert.dropout_mask(seed, list(shape), p).to(device)
    from fastbert.kernels.add_layernorm import dropout_keep_mask
    return dropout_keep_mask(shape, p, seed, device)


def reference_with_mask(x, y, w, b, mask, p):
    """The reference's arithmetic with a given keep mask in place of F.dropout's draw."""
    y = y * mask / (1 - p) if p > 0 else y
    return F.layer_norm(y + x, (x.shape[-1],), w, b, EPS)


def _grads(fn, inputs, dout):
    inputs = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], dout)
    return out, grads


@pytest.fixture
def poisoned(monkeypatch):
    """C++ kernels fill their outputs with NaN before writing (csrc/cpu/cpu_common.h)."""
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape,p,affine", [
    pytest.param(s, p, True, id=f"{'x'.join(map(str, s))}-p{p}") for s in SHAPES for p in (0.0, 0.3)
] + [pytest.param((2, 5, 33), 0.0, False, id="2x5x33-noaffine")])  # None weight/bias: one shape
def test_forward_backward_matches_reference(backend, dtype, shape, p, affine, poisoned):
    device = device_for(backend)
    C = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    y = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.5 * torch.randn(C, device=device)).to(dtype) if affine else None
    b = (0.5 * torch.randn(C, device=device)).to(dtype) if affine else None
    dout = torch.randn(shape, device=device).to(dtype)
    seed = torch.tensor(20261122, dtype=torch.int64) if p > 0 else None
    with on_backend(backend, "add_layernorm", device, dtype):
        out, grads = _grads(lambda x_, y_, w_, b_: ops.add_layernorm(x_, y_, w_, b_, EPS, p, seed),
                            [x, y, w, b], dout)
    mask = keep_mask(backend, seed, shape, p, device) if p > 0 else torch.ones(shape, dtype=torch.bool,
                                                                                device=device)
    as64 = lambda t: None if t is None else t.double()
    ref = lambda x_, y_, w_, b_: reference_with_mask(x_, y_, w_, b_, mask, p)
    out64, grads64 = _grads(ref, [as64(t) for t in (x, y, w, b)], dout.double())
    outlp, gradslp = _grads(ref, [x, y, w, b], dout)
    assert_close(out, out64, outlp, name="add_layernorm forward")
    for name, g, g64, glp in zip(("dx", "dy", "dweight", "dbias"), grads, grads64, gradslp):
        assert g.dtype == dtype, name
        assert_close(g, g64, glp, name=f"add_layernorm {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_dropout_keep_rate_and_scaling(backend):
    """Keep rate ~ 1-p, masks differ between seeds, kept values are scaled by 1/(1-p): the
    backward gives dy = dx * keep / (1 - p) (dz flows to x as is, to y through dropout)."""
    device, dtype, p = device_for(backend), torch.float32, 0.3
    shape = (64, 256)
    seed = torch.tensor(7, dtype=torch.int64)
    mask = keep_mask(backend, seed, shape, p, device)
    n = mask.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
    # Per column too: a counter RNG that ignored part of the index would fail here.
    assert (mask.float().mean(0) - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / 64) ** 0.5
    other = keep_mask(backend, torch.tensor(8, dtype=torch.int64), shape, p, device)
    agree = (mask == other).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * sigma * 2
    x = torch.randn(shape, device=device, requires_grad=True)
    y = torch.randn(shape, device=device, requires_grad=True)
    with on_backend(backend, "add_layernorm", device, dtype):
        out = ops.add_layernorm(x, y, None, None, EPS, p, seed)
        out.backward(torch.randn(shape, device=device))
    torch.testing.assert_close(y.grad, x.grad * mask / (1 - p), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_same_seed_same_output(backend):
    device = device_for(backend)
    x, y = torch.randn(4, 33, device=device), torch.randn(4, 33, device=device)
    with on_backend(backend, "add_layernorm", device, torch.float32):
        a = ops.add_layernorm(x, y, None, None, EPS, 0.5, torch.tensor(3))
        b = ops.add_layernorm(x, y, None, None, EPS, 0.5, torch.tensor(3))
        c = ops.add_layernorm(x, y, None, None, EPS, 0.5, torch.tensor(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradcheck_float64_kernel():
    """The C++ kernels take float64: gradcheck with and without dropout (fixed seed)."""
    require_extension()  # the glue registers autograd and fakes
    op = torch.ops.fastbert.add_layernorm
    for p, seed in ((0.0, None), (0.4, torch.tensor(11))):
        inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 6), (2, 3, 6), (6,), (6,))]
        assert torch.autograd.gradcheck(lambda x, y, w, b: op(x, y, w, b, EPS, p, seed)[0], inputs)


def test_cpp_mixed_dtype_weight():
    """bf16 activations with fp32 LayerNorm parameters (e.g. autocast-style mixes)."""
    require_extension()  # the glue registers autograd and fakes
    x, y = torch.randn(3, 16).bfloat16(), torch.randn(3, 16).bfloat16()
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    out = torch.ops.fastbert.add_layernorm(x, y, w, b, EPS, 0.0, None)[0]
    out.float().sum().backward()
    ref = F.layer_norm(x.double() + y.double(), (16,), w.double(), b.double(), EPS)
    assert out.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 0.05


def test_backward_without_dropout_leaves_grad_y_to_grad_x():
    """The op contract: with dropout_p == 0 grad_y equals grad_x, so the kernel returns an
    empty tensor for it and the autograd glue hands grad_x to both inputs."""
    require_extension()
    x, y, g = torch.randn(4, 33), torch.randn(4, 33), torch.randn(4, 33)
    w = torch.randn(33)
    _, mean, rstd = torch.ops.fastbert.add_layernorm(x, y, w, None, EPS, 0.0, None)
    dx, dy, dw, db = torch.ops.fastbert.add_layernorm_backward(g, x, y, w, mean, rstd, 0.0, None)
    assert dy.shape == (0,) and dx.shape == x.shape
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    with on_backend("cpp", "add_layernorm", x.device, x.dtype):
        gx, gy = torch.autograd.grad(ops.add_layernorm(xg, yg, w, None, EPS), (xg, yg), g)
    torch.testing.assert_close(gx, dx, rtol=0, atol=0)
    torch.testing.assert_close(gy, dx, rtol=0, atol=0)


def test_opcheck():
    require_extension()  # the glue registers autograd and fakes
    fb = torch.ops.fastbert
    seed = torch.tensor(5, dtype=torch.int64)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 10, dtype=dtype, requires_grad=True)
        y = torch.randn(2, 3, 10, dtype=dtype, requires_grad=True)
        w = torch.randn(10, dtype=dtype, requires_grad=True)
        b = torch.randn(10, dtype=dtype, requires_grad=True)
        for args in ((x, y, w, b, EPS, 0.0, None), (x, y, w, b, EPS, 0.25, seed),
                     (x, y, None, None, EPS, 0.0, None)):
            torch.library.opcheck(fb.add_layernorm.default, args)
        _, mean, rstd = fb.add_layernorm(x, y, w, b, EPS, 0.25, seed)
        torch.library.opcheck(fb.add_layernorm_backward.default,
                              (torch.randn_like(x), x.detach(), y.detach(), w.detach(), mean.detach(),
                               rstd.detach(), 0.25, seed))
        _, mean, rstd = fb.add_layernorm(x, y, w, b, EPS, 0.0, None)
        torch.library.opcheck(fb.add_layernorm_backward.default,  # grad_y left out: empty
                              (torch.randn_like(x), x.detach(), y.detach(), w.detach(), mean.detach(),
                               rstd.detach(), 0.0, None))
    torch.library.opcheck(fb.dropout_mask.default, (seed, [3, 5], 0.5))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    torch._dynamo.reset()
    seed = torch.tensor(99, dtype=torch.int64)

    def f(x, y, w, b, seed):
        return ops.add_layernorm(x, y, w, b, EPS, 0.2, seed) * 2

    x, y = torch.randn(2, 5, 24, device=device).to(dtype), torch.randn(2, 5, 24, device=device).to(dtype)
    w, b = torch.randn(24, device=device).to(dtype), torch.randn(24, device=device).to(dtype)
    results = []
    with on_backend(backend, "add_layernorm", device, dtype):
        for fn in (torch.compile(f, fullgraph=True), f):
            inputs = [t.clone().requires_grad_() for t in (x, y, w, b)]
            out = fn(*inputs, seed)
            out.float().sum().backward()
            results.append([out] + [t.grad for t in inputs])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------ bad input (the C++ op itself)
def _xy(shape=(2, 4)):
    return torch.randn(shape), torch.randn(shape)


@pytest.mark.parametrize("make_args,match", [
    (lambda: (*_xy(), None, None, EPS, 0.0, None), None),  # valid: the control
    (lambda: (torch.randn(2, 4).half(), torch.randn(2, 4).half(), None, None, EPS, 0.0, None), "float32, bfloat16"),
    (lambda: (torch.randn(2, 4), torch.randn(2, 5), None, None, EPS, 0.0, None), "same shape"),
    (lambda: (torch.randn(2, 4), torch.randn(2, 4).double(), None, None, EPS, 0.0, None), "share a dtype"),
    (lambda: (*_xy(), torch.randn(5), None, EPS, 0.0, None), r"weight must have shape \(4,\)"),
    (lambda: (*_xy(), None, torch.randn(4, 1), EPS, 0.0, None), r"bias must have shape \(4,\)"),
    (lambda: (*_xy(), None, None, EPS, 0.5, None), "needs a seed"),
    (lambda: (*_xy(), None, None, EPS, 0.5, torch.tensor(1.0)), "0-d int64 CPU"),
    (lambda: (*_xy(), None, None, EPS, 1.0, torch.tensor(1)), r"\[0, 1\)"),
    (lambda: (torch.randn(2, 0), torch.randn(2, 0), None, None, EPS, 0.0, None), "non-empty last axis"),
])
def test_cpp_bad_input(make_args, match):
    require_extension()  # the glue registers autograd and fakes
    if match is None:
        torch.ops.fastbert.add_layernorm(*make_args())
        return
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastbert.add_layernorm(*make_args())


def test_cpp_backward_bad_input():
    require_extension()  # the glue registers autograd and fakes
    x, y = _xy()
    _, mean, rstd = torch.ops.fastbert.add_layernorm(x, y, None, None, EPS, 0.0, None)
    with pytest.raises(RuntimeError, match="grad_out must match"):
        torch.ops.fastbert.add_layernorm_backward(torch.randn(2, 5), x, y, None, mean, rstd, 0.0, None)
    with pytest.raises(RuntimeError, match="one per row"):
        torch.ops.fastbert.add_layernorm_backward(torch.randn(2, 4), x, y, None, mean[:1], rstd, 0.0, None)


# ------------------------------------------------------------------ the CUDA twin (GPU machines)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_kernel_matches_reference(dtype):
    """Same counter RNG as the CPU: dropout_mask (CPU) is the CUDA kernels' mask too."""
    require_extension()
    if not hasattr(torch.ops.fastbert, "_cuda_built"):
        pytest.fail("torch has CUDA but fastbert._C was built without the CUDA kernels")
    seed = torch.tensor(123, dtype=torch.int64)
    for shape in SHAPES:
        for p in (0.0, 0.3):
            C = shape[-1]
            x, y, dout = (torch.randn(shape).to(dtype) for _ in range(3))
            w, b = (1 + torch.randn(C)).to(dtype), torch.randn(C).to(dtype)
            mask = torch.ops.fastbert.dropout_mask(seed, list(shape), p)
            fn = lambda *t: torch.ops.fastbert.add_layernorm(*t, EPS, p, seed if p > 0 else None)[0]
            out, grads = _grads(fn, [t.cuda() for t in (x, y, w, b)], dout.cuda())
            ref = lambda *t: reference_with_mask(*t, mask, p)
            out64, grads64 = _grads(ref, [t.double() for t in (x, y, w, b)], dout.double())
            outlp, gradslp = _grads(ref, [x, y, w, b], dout)
            assert_close(out.cpu(), out64, outlp, name="CUDA add_layernorm")
            for g, g64, glp in zip(grads, grads64, gradslp):
                assert_close(g.cpu(), g64, glp, name="CUDA add_layernorm grad")


def test_cpp_backward_same_bits_for_any_thread_count():
    """dweight/dbias are reduced over fixed row chunks in a fixed order."""
    require_extension()
    x, y, g = (torch.randn(300, 40) for _ in range(3))
    w = torch.randn(40)
    seed = torch.tensor(9)
    _, mean, rstd = torch.ops.fastbert.add_layernorm(x, y, w, None, EPS, 0.2, seed)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.fastbert.add_layernorm_backward(g, x, y, w, mean, rstd, 0.2, seed))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_cpp_dropout_mask_bad_input():
    require_extension()
    with pytest.raises(RuntimeError, match=r"\[0, 1\)"):
        torch.ops.fastbert.dropout_mask(torch.tensor(1), [4], 1.0)
    with pytest.raises(RuntimeError, match="0-d int64 CPU"):
        torch.ops.fastbert.dropout_mask(torch.tensor([1, 2]), [4], 0.5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_mixed_dtypes_promote_like_the_reference(backend):
    """fp32 x (the residual) + bf16 y (a sublayer's output under autocast): computed in the
    promoted dtype, as ``dropout(y) + x`` does in the reference; grads come back per dtype."""
    device = device_for(backend)
    x = torch.randn(3, 5, 24, device=device)
    y = torch.randn(3, 5, 24, device=device).bfloat16()
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    with on_backend(backend, "add_layernorm", device, torch.float32):
        xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = ops.add_layernorm(xk, yk, w, b, EPS, 0.0)
        out.sum().backward()
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    ref = F.layer_norm(x64 + y64, (24,), w.double(), b.double(), EPS)
    ref.sum().backward()
    assert out.dtype == torch.float32 and xk.grad.dtype == torch.float32 and yk.grad.dtype == torch.bfloat16
    assert_close(out, ref.detach(), atol=1e-5, name="mixed-dtype add_layernorm")
    assert_close(yk.grad.double(), y64.grad, atol=2e-2, name="mixed-dtype dy")


@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["x32-y16", "x16-y32"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (2, 117), (70, 256)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpp_mixed_dtypes_read_in_place(x_dtype, y_dtype, shape, p, poisoned):
    """The CPU kernel reads an fp32/bf16 pair as it is (no promotion copies): fp32 output and
    statistics, each gradient written in its input's dtype, against the float64 reference
    with the kernel's own keep mask.  x, y and the fp32 output are exact in fp32 arithmetic,
    so the fp32 tolerance applies; the bf16 gradient may err by its rounding."""
    require_extension()
    C = shape[-1]
    x, y = torch.randn(shape).to(x_dtype), torch.randn(shape).to(y_dtype)
    w, b = 1 + 0.5 * torch.randn(C), 0.5 * torch.randn(C)
    dout = torch.randn(shape)
    seed = torch.tensor(31, dtype=torch.int64) if p > 0 else None
    with on_backend("cpp", "add_layernorm", x.device, torch.float32):
        out, grads = _grads(lambda x_, y_, w_, b_: ops.add_layernorm(x_, y_, w_, b_, EPS, p, seed),
                            [x, y, w, b], dout)
    mask = keep_mask("cpp", seed, shape, p, x.device) if p > 0 else torch.ones(shape, dtype=torch.bool)
    out64, grads64 = _grads(lambda *t: reference_with_mask(*t, mask, p),
                            [t.double() for t in (x, y, w, b)], dout.double())
    assert out.dtype == torch.float32
    assert_close(out, out64, atol=2e-5, name="mixed add_layernorm forward")
    for name, g, g64, dtype in zip(("dx", "dy", "dweight", "dbias"), grads, grads64,
                                   (x_dtype, y_dtype, torch.float32, torch.float32)):
        assert g.dtype == dtype, name
        # bf16 rounding of the gradient: half an ulp, 2^-9 relative, of the largest entry.
        atol = 2e-5 * max(1.0, g64.abs().max().item()) if dtype == torch.float32 else \
            2.0 ** -8 * g64.abs().max().item() + 1e-6
        assert_close(g.float(), g64, atol=atol, name=f"mixed add_layernorm {name}")


def test_cpp_mixed_dtypes_opcheck():
    require_extension()
    fb = torch.ops.fastbert
    seed = torch.tensor(5, dtype=torch.int64)
    x = torch.randn(2, 3, 10, requires_grad=True)
    y = torch.randn(2, 3, 10, dtype=torch.bfloat16, requires_grad=True)
    w, b = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    for args in ((x, y, w, b, EPS, 0.0, None), (y, x, w, b, EPS, 0.25, seed)):
        torch.library.opcheck(fb.add_layernorm.default, args)
        _, mean, rstd = fb.add_layernorm(*args)
        torch.library.opcheck(fb.add_layernorm_backward.default,
                              (torch.randn(2, 3, 10), args[0].detach(), args[1].detach(), w.detach(),
                               mean.detach(), rstd.detach(), args[5], args[6]))
