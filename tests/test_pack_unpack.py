"""pack / unpack (the unpadded encoder's entry and exit) on every fast backend vs the
reference: bit-exact copies, forward and backward (each is the other's backward).

Reference: fastbert/backends/reference.py.  Kernels: csrc/cpu/pack.cpp (cpp),
kernels/pack_unpack.py (triton).
"""
import pytest
import torch

from fastbert import ops
from fastbert.backends import reference

from op_testing import (FAST_BACKENDS, assert_close, device_for, dtypes_for, on_backend, valid_lens_cases,
                        require_extension)

# X shapes [B, L, ...]: length 1, odd, non-power-of-two, the book's 64 and SNLI's 128, a 2-D
# X (one value per position) and a 4-D X ([B, L, heads, head size]).
SHAPES = [(1, 1, 4), (3, 7, 5), (4, 64, 33), (3, 128, 16), (5, 9), (3, 6, 2, 4)]
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FAST_BACKENDS for d in dtypes_for(b)]


def lens_cases(B, L):
    """1-D valid_lens cases (pack takes no None/2-D): 0, 1 and full, random, float."""
    cases = [c for c in valid_lens_cases(B, 1, L) if c[0] in ("1d", "1d_float")]
    return cases + [("all_full", torch.full((B,), L)), ("all_zero", torch.zeros(B, dtype=torch.int64))]


@pytest.fixture
def poisoned(monkeypatch):
    """C++ kernels fill their outputs with NaN before writing (csrc/cpu/cpu_common.h)."""
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", range(4), ids=["vl_1d", "vl_1d_float", "vl_full", "vl_zero"])
def test_forward_backward_matches_reference(backend, dtype, shape, case, poisoned):
    device = device_for(backend)
    B, L = shape[:2]
    _, vl = lens_cases(B, L)[case]
    vl = vl.to(device)
    X = torch.randn(shape, device=device).to(dtype)
    norm_vl = ops.normalize_valid_lens(vl, B, None, L, device)
    ref_packed, ref_cu, ref_max = reference.pack(X, norm_vl)
    g_packed = torch.randn(ref_packed.shape, device=device).to(dtype)
    g_out = torch.randn(shape, device=device).to(dtype)
    with on_backend(backend, "pack", device, dtype):
        Xk = X.clone().requires_grad_()
        packed, cu, max_len = ops.pack(Xk, vl)
        (dX,) = torch.autograd.grad(packed, Xk, g_packed)
    assert torch.equal(packed, ref_packed) and packed.dtype == dtype
    assert cu.dtype == torch.int32 and torch.equal(cu, ref_cu)
    assert max_len == ref_max and isinstance(max_len, int)
    with on_backend(backend, "unpack", device, dtype):
        Pk = ref_packed.clone().requires_grad_()
        out = ops.unpack(Pk, ref_cu, L)
        (dP,) = torch.autograd.grad(out, Pk, g_out)
    assert torch.equal(out, reference.unpack(ref_packed, ref_cu, L))

    def ref_grads(X_, gp, go):
        X_ = X_.detach().requires_grad_()
        dX_ = torch.autograd.grad(reference.pack(X_, norm_vl)[0], X_, gp)[0]
        P_ = reference.pack(X_.detach(), norm_vl)[0].requires_grad_()
        return dX_, torch.autograd.grad(reference.unpack(P_, ref_cu, L), P_, go)[0]

    dX64, dP64 = ref_grads(X.double(), g_packed.double(), g_out.double())
    assert_close(dX, dX64, atol=0.0, name="pack backward (unpack)")
    assert_close(dP, dP64, atol=0.0, name="unpack backward (pack)")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_round_trip_zeroes_pads(backend, dtype):
    device = device_for(backend)
    X = torch.randn(4, 10, 6, device=device).to(dtype)
    vl = torch.tensor([3, 0, 10, 1], device=device)
    with on_backend(backend, "pack", device, dtype):
        packed, cu, max_len = ops.pack(X, vl)
        out = ops.unpack(packed, cu, 10)
    keep = torch.arange(10, device=device)[None, :] < vl[:, None]
    assert packed.shape == (14, 6) and max_len == 10
    assert torch.equal(out, X * keep[..., None])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_token_ids_pack_on_the_backend(backend, dtype, poisoned):
    """The unpadded encoder packs token ids before embedding them: integer pack / unpack run
    on the fast backend (no fallback) and equal the reference."""
    device = device_for(backend)
    ids = torch.randint(0, 20256, (5, 9, 3), device=device).to(dtype)
    vl = torch.tensor([9, 0, 1, 4, 7], device=device)
    with on_backend(backend, "pack", device, dtype):
        packed, cu, max_len = ops.pack(ids, vl)
        out = ops.unpack(packed, cu, 9)
    want, want_cu, _ = reference.pack(ids, vl)
    assert packed.dtype == dtype and torch.equal(packed, want) and torch.equal(cu, want_cu)
    assert max_len == 9 and torch.equal(out, reference.unpack(want, want_cu, 9))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_unpack_ignores_row_padding(backend, dtype, poisoned):
    """Rows of ``packed`` past cu_seqlens[-1] (row padding: the encoder rounds its packed rows
    up, compiled or not) are ignored by unpack, and get a zero gradient."""
    device = device_for(backend)
    B, L, C, extra = 4, 9, 5, 7
    vl = torch.tensor([9, 0, 1, 4], device=device)
    X = torch.randn(B, L, C, device=device).to(dtype)
    ref_packed, cu, _ = reference.pack(X, vl)
    padded = torch.cat([ref_packed, torch.randn(extra, C, device=device).to(dtype)])
    g_out = torch.randn(B, L, C, device=device).to(dtype)
    with on_backend(backend, "unpack", device, dtype):
        Pk = padded.clone().requires_grad_()
        out = ops.unpack(Pk, cu, L)
        (dP,) = torch.autograd.grad(out, Pk, g_out)
    assert torch.equal(out, reference.unpack(ref_packed, cu, L))
    T = ref_packed.shape[0]
    assert torch.equal(dP[:T], reference.pack(g_out, vl)[0])
    assert torch.equal(dP[T:], torch.zeros_like(dP[T:]))


def test_cpp_any_dtype_and_gradcheck_float64():
    """The C++ copies take any dtype (token ids, fp64); gradcheck in float64."""
    require_extension()  # the glue registers autograd and fakes
    fb = torch.ops.fastbert
    ids = torch.randint(0, 100, (3, 5))
    vl = torch.tensor([2, 5, 0], dtype=torch.int32)
    packed, cu = fb.pack(ids, vl)
    assert torch.equal(packed, torch.cat([ids[0, :2], ids[1]])) and cu.tolist() == [0, 2, 7, 7]
    X = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fb.pack(x, vl)[0], (X,))
    P = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: fb.unpack(p, cu, 5), (P,))
    assert torch.autograd.gradgradcheck(lambda p: fb.unpack(p, cu, 5), (P,))
    assert torch.autograd.gradcheck(lambda x: fb.pack_rows(x, cu, 7), (X,))


def test_opcheck():
    require_extension()  # the glue registers autograd and fakes
    fb = torch.ops.fastbert
    vl = torch.tensor([2, 5, 0, 4], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        X = torch.randn(4, 5, 3, dtype=dtype, requires_grad=True)
        torch.library.opcheck(fb.pack.default, (X, vl))
        packed, cu = fb.pack(X.detach(), vl)
        torch.library.opcheck(fb.unpack.default, (packed.requires_grad_(), cu, 5))
        torch.library.opcheck(fb.pack_rows.default, (X, cu, 11))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    """pack -> work on [T, C] -> unpack traces as one graph (T is an unbacked size); while
    compiling max_len is the padded length L (the documented upper bound)."""
    device = device_for(backend)
    torch._dynamo.reset()
    X = torch.randn(3, 8, 6, device=device).to(dtype)
    vl = torch.tensor([5, 0, 8], device=device)

    def f(x, v):
        packed, cu, max_len = ops.pack(x, v)
        return ops.unpack(torch.tanh(packed) * max_len, cu, x.shape[1])

    with on_backend(backend, "pack", device, dtype):
        Xc = X.clone().requires_grad_()
        out = torch.compile(f, fullgraph=True)(Xc, vl)
        out.float().sum().backward()
    keep = (torch.arange(8, device=device)[None, :] < vl[:, None])[..., None]
    Xe = X.clone().requires_grad_()
    expected = torch.tanh(Xe) * keep * 8
    expected.float().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(Xc.grad, Xe.grad)


# ------------------------------------------------------------------ bad input (the C++ op itself)
I32 = dict(dtype=torch.int32)


@pytest.mark.parametrize("op,make_args,match", [
    ("pack", lambda: (torch.randn(2, 3), torch.tensor([1, 3], **I32)), None),  # valid: the control
    ("pack", lambda: (torch.randn(3), torch.tensor([1, 2, 3], **I32)), r"\[B, L, ...\]"),
    ("pack", lambda: (torch.randn(2, 3), torch.tensor([1, 2])), "int32"),
    ("pack", lambda: (torch.randn(2, 3), torch.tensor([1], **I32)), r"shape \(2,\)"),
    ("pack", lambda: (torch.randn(2, 3), torch.tensor([1, 4], **I32)), r"\[0, 3\]"),
    ("pack", lambda: (torch.randn(2, 3), torch.tensor([-1, 2], **I32)), r"\[0, 3\]"),
    ("unpack", lambda: (torch.randn(4, 2), torch.tensor([0, 1, 4], **I32), 3), None),
    ("unpack", lambda: (torch.randn(4, 2), torch.tensor([0, 1, 4]), 3), "int32"),
    ("unpack", lambda: (torch.randn(4, 2), torch.tensor([1, 1, 4], **I32), 3), r"cu_seqlens\[0\] must be 0"),
    ("unpack", lambda: (torch.randn(4, 2), torch.tensor([0, 3, 2], **I32), 3), "length -1"),
    ("unpack", lambda: (torch.randn(4, 2), torch.tensor([0, 0, 4], **I32), 3), "length 4"),
    ("unpack", lambda: (torch.randn(4, 2), torch.tensor([0, 1, 3], **I32), 3), None),  # row padding
    ("unpack", lambda: (torch.randn(2, 2), torch.tensor([0, 1, 3], **I32), 3), "at most the number of packed rows 2"),
    ("pack_rows", lambda: (torch.randn(2, 3), torch.tensor([0, 1, 5], **I32), 5), r"length 4 .*\[0, L=3\]"),
    ("pack_rows", lambda: (torch.randn(2, 3), torch.tensor([0, 1, 3], **I32), 5), None),  # row padding
    ("pack_rows", lambda: (torch.randn(2, 3), torch.tensor([0, 1, 3], **I32), 2), "at most the number of packed rows 2"),
    ("pack_rows", lambda: (torch.randn(2, 3), torch.tensor([0, 1], **I32), 1), "B\\+1 = 3"),
])
def test_cpp_bad_input(op, make_args, match):
    require_extension()  # the glue registers autograd and fakes
    fn = getattr(torch.ops.fastbert, op)
    if match is None:
        fn(*make_args())
        return
    with pytest.raises(RuntimeError, match=match):
        fn(*make_args())


# ------------------------------------------------------------------ the CUDA twin (GPU machines)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_reference():
    require_extension()
    if not hasattr(torch.ops.fastbert, "_cuda_built"):
        pytest.fail("torch has CUDA but fastbert._C was built without the CUDA kernels")
    fb = torch.ops.fastbert
    for shape in SHAPES:
        B, L = shape[:2]
        for _, vl in lens_cases(B, L):
            vl = ops.normalize_valid_lens(vl, B, None, L, torch.device("cpu"))
            X = torch.randn(shape)
            ref_packed, ref_cu, _ = reference.pack(X, vl)
            packed, cu = fb.pack(X.cuda(), vl.cuda())
            assert torch.equal(packed.cpu(), ref_packed) and torch.equal(cu.cpu(), ref_cu)
            assert torch.equal(fb.unpack(packed, cu, L).cpu(), reference.unpack(ref_packed, ref_cu, L))
            assert torch.equal(fb.pack_rows(X.cuda(), cu, packed.shape[0]).cpu(), ref_packed)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compile_dynamic_shapes_through_the_packed_path(backend):
    """pack -> add_layernorm (dropout) -> unpack -> gather, compiled once with dynamic=True
    and reused for other B and L: same values and gradients as eager."""
    device, dtype = device_for(backend), torch.float32
    torch._dynamo.reset()

    def f(x, v, pos, w, b, seed):
        packed, cu, _ = ops.pack(x, v)
        h = ops.add_layernorm(packed, torch.tanh(packed), w, b, 1e-5, 0.1, seed)
        return ops.gather_positions(ops.unpack(h, cu, x.shape[1]), pos)

    with on_backend(backend, "pack", device, dtype):
        for op in ("unpack", "add_layernorm", "gather_positions"):
            with on_backend(backend, op, device, dtype):
                pass
        compiled = torch.compile(f, fullgraph=True, dynamic=True)
        for B, L in ((3, 8), (5, 12), (4, 7)):
            x = torch.randn(B, L, 16, device=device)
            v = torch.randint(0, L + 1, (B,), device=device)
            pos = torch.randint(0, L, (B, 4), device=device)
            w, b = torch.randn(16, device=device), torch.randn(16, device=device)
            seed = torch.tensor(5)
            results = []
            for fn in (compiled, f):
                inputs = [t.clone().requires_grad_() for t in (x, w, b)]
                out = fn(inputs[0], v, pos, inputs[1], inputs[2], seed)
                out.sum().backward()
                results.append([out] + [t.grad for t in inputs])
            for a, e in zip(*results):
                torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
