"""ffn (``dense2(act(dense1(x)))``) on every fast backend vs the float64 reference, forward
and backward (x, both weights, both biases), relu and gelu, with and without biases.

Reference: fastbert/backends/reference.py ffn.  Kernels: csrc/cpu/ffn.cpp (cpp),
kernels/ffn.py (triton).
"""
import pytest
import torch

from fastbert import ops
from fastbert.backends import reference

from op_testing import (FAST_BACKENDS, assert_close, device_for, dtypes_for, on_backend,
                        require_extension)

BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FAST_BACKENDS
                  for d in dtypes_for(b)]
# (x shape, F, C2): one row, odd and non-power-of-two sizes, 3-D (padded) and 2-D (packed)
# inputs, the book's 256 -> 512 -> 256 (bert.small) on a few rows.
SHAPES = [((1, 8), 16, 8), ((2, 5, 24), 40, 24), ((7, 33), 48, 20), ((13, 64), 96, 64),
          ((9, 256), 512, 256)]
NAMES = ("y", "dx", "dw1", "db1", "dw2", "db2")


def make(shape, F, C2, device, dtype, with_bias=True):
    C = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    w1 = (torch.randn(F, C, device=device) / C ** 0.5).to(dtype)
    w2 = (torch.randn(C2, F, device=device) / F ** 0.5).to(dtype)
    b1 = torch.randn(F, device=device).to(dtype) if with_bias else None
    b2 = torch.randn(C2, device=device).to(dtype) if with_bias else None
    dy = torch.randn(shape[:-1] + (C2,), device=device).to(dtype)
    return x, w1, b1, w2, b2, dy


def grads(fn, x, w1, b1, w2, b2, dy, activation, cast=None):
    params = [t if t is None else (t if cast is None else t.to(cast)).detach().requires_grad_()
              for t in (x, w1, b1, w2, b2)]
    y = fn(*params, activation)
    want = [p for p in params if p is not None]
    g = iter(torch.autograd.grad(y, want, dy if cast is None else dy.to(cast)))
    return [y] + [None if p is None else next(g) for p in params]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{'x'.join(map(str, s[0]))}_f{s[1]}_o{s[2]}")
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward_matches_reference(backend, dtype, shape, activation, with_bias):
    device = device_for(backend)
    x, w1, b1, w2, b2, dy = make(*shape, device, dtype, with_bias)
    with on_backend(backend, "ffn", device, dtype):
        got = grads(ops.ffn, x, w1, b1, w2, b2, dy, activation)
    want64 = grads(reference.ffn, x, w1, b1, w2, b2, dy, activation, cast=torch.float64)
    want_lp = grads(reference.ffn, x, w1, b1, w2, b2, dy, activation)
    for name, g, w64, wlp in zip(NAMES, got, want64, want_lp):
        if w64 is None:
            assert g is None, f"{name} must be None for a None bias"
            continue
        assert g.dtype == dtype
        assert_close(g, w64, wlp, name=f"ffn {activation} {name}")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_empty_input(backend, dtype):
    device = device_for(backend)
    x, w1, b1, w2, b2, dy = make((0, 16), 24, 8, device, dtype)
    with on_backend(backend, "ffn", device, dtype):
        got = grads(ops.ffn, x, w1, b1, w2, b2, dy, "relu")
    assert got[0].shape == (0, 8)
    assert all((g == 0).all() for g in got[2:])  # no rows: zero parameter gradients


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bf16_autocast_matches_reference_autocast(backend):
    """Under CPU autocast the glue runs in bf16 like F.linear does, and fp32 parameters get
    fp32 gradients."""
    device = device_for(backend)
    x, w1, b1, w2, b2, dy = make((6, 32), 48, 32, device, torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with on_backend(backend, "ffn", device, torch.float32):
            got = grads(ops.ffn, x, w1, b1, w2, b2, dy, "gelu")
        want_lp = grads(reference.ffn, x, w1, b1, w2, b2, dy, "gelu")
    want64 = grads(reference.ffn, x, w1, b1, w2, b2, dy, "gelu", cast=torch.float64)
    for name, g, w64, wlp in zip(NAMES, got, want64, want_lp):
        assert g.dtype == wlp.dtype, (name, g.dtype, wlp.dtype)
        assert_close(g.to(wlp.dtype), w64, wlp, atol=1e-3, name=f"ffn autocast {name}")


def test_opcheck_cpp():
    require_extension()
    op = torch.ops.fastbert.ffn
    for dtype in (torch.float32, torch.bfloat16):
        for activation in ("relu", "gelu"):
            x, w1, b1, w2, b2, _ = make((2, 3, 16), 24, 8, "cpu", dtype)
            args = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
            torch.library.opcheck(op, (*args, activation))
            torch.library.opcheck(op, (args[0], args[1], None, args[3], None, activation))


def test_bad_inputs_raise_clear_errors():
    require_extension()
    op = torch.ops.fastbert.ffn
    x, w1, b1, w2, b2, _ = make((3, 16), 24, 8, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="activation"):
        op(x, w1, b1, w2, b2, "tanh")
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        op(x, w1.t().contiguous(), b1, w2, b2, "relu")
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(x, w1.bfloat16(), b1, w2, b2, "relu")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    x, w1, b1, w2, b2, dy = make((2, 5, 16), 24, 16, device, dtype)
    with on_backend(backend, "ffn", device, dtype):
        eager = grads(ops.ffn, x, w1, b1, w2, b2, dy, "relu")

        def loss(x, w1, b1, w2, b2):
            return (ops.ffn(x, w1, b1, w2, b2, "relu").float() * dy.float()).sum()

        torch._dynamo.reset()
        params = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        torch.compile(loss, fullgraph=True)(*params).backward()
    for name, p, e in zip(NAMES[1:], params, eager[1:]):
        torch.testing.assert_close(p.grad, e, msg=lambda m: f"compiled {name}: {m}")
