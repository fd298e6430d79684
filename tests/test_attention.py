"""Padded attention on every fast backend vs the float64 reference, forward and backward,
every valid_lens case, with and without dropout.

Reference: fastbert/backends/reference.py attention (d2l DotProductAttention: keys at or
past the valid length get probability 0; a valid length of 0 gives a uniform row).
Kernels: csrc/cpu/attention.cpp (cpp), kernels/ (triton).
"""
import math

import pytest
import torch

from fastbert import ops
from fastbert.backends import reference

from op_testing import (FAST_BACKENDS, assert_attention_close, device_for,
                        dtypes_for, on_backend,
                        valid_lens_cases, require_extension)

BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FAST_BACKENDS
                  for d in dtypes_for(b)]
# (N, Lq, Lk, D, Dv): length 1, odd, non-power-of-two, Lq != Lk, Dv != D, head sizes
# 32..128, the maximum length 128.
SHAPES = [
    (1, 1, 1, 32, 32),
    (3, 5, 7, 48, 48),
    (4, 3, 33, 64, 40),
    (3, 9, 9, 96, 96),
    (2, 4, 6, 128, 128),
    (3, 128, 128, 32, 32),
]
VL_CASES = ["vl_none", "vl_1d", "vl_1d_float", "vl_2d"]


def reference_grads(q, k, v, vl, dO, dropout_keep=None, scale=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if dropout_keep is None:
        out = reference.attention(q, k, v, vl, 0.0, scale)
    else:
        _, weights = reference.attention_with_weights(q, k, v, vl, 0.0, scale)
        out = torch.bmm(weights * dropout_keep.to(weights.dtype), v)
    return (out,) + torch.autograd.grad(out, (q, k, v), dO)


def run(backend, dtype, q, k, v, vl, dO, dropout_p=0.0, scale=None):
    device = q.device
    with on_backend(backend, "attention", device, dtype):
        qk, kk, vk = (t.clone().requires_grad_() for t in (q, k, v))
        out = ops.attention(qk, kk, vk, vl, dropout_p, scale)
        grads = torch.autograd.grad(out, (qk, kk, vk), dO)
    return (out,) + grads


@pytest.fixture
def poisoned(monkeypatch):
    """C++ kernels fill their outputs with NaN before writing (csrc/cpu/cpu_common.h)."""
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")


def inputs(shape, device, dtype):
    N, Lq, Lk, D, Dv = shape
    q = torch.randn(N, Lq, D, device=device).to(dtype)
    k = torch.randn(N, Lk, D, device=device).to(dtype)
    v = torch.randn(N, Lk, Dv, device=device).to(dtype)
    dO = torch.randn(N, Lq, Dv, device=device).to(dtype)
    return q, k, v, dO


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", range(4), ids=VL_CASES)
def test_forward_backward_matches_reference(backend, dtype, shape, case, poisoned):
    device = device_for(backend)
    N, Lq, Lk, D, Dv = shape
    _, vl = valid_lens_cases(N, Lq, Lk)[case]
    vl = None if vl is None else vl.to(device)
    q, k, v, dO = inputs(shape, device, dtype)
    got = run(backend, dtype, q, k, v, vl, dO)
    norm_vl = ops.normalize_valid_lens(vl, N, Lq, Lk, device)
    want64 = reference_grads(q.double(), k.double(), v.double(), norm_vl, dO.double())
    want_lp = reference_grads(q, k, v, norm_vl, dO)
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert g.dtype == dtype
        assert_attention_close(name, g, w64, wlp, "attention")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_zero_valid_len_is_uniform_and_has_no_score_gradient(backend, dtype):
    device = device_for(backend)
    q, k, v, dO = inputs((2, 3, 5, 32, 32), device, dtype)
    out, dq, dk, dv = run(backend, dtype, q, k, v, torch.tensor([0, 5], device=device), dO)
    torch.testing.assert_close(out[0].float(), v[0].float().mean(0).expand(3, -1),
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    assert (dq[0] == 0).all() and (dk[0] == 0).all()


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_explicit_scale(backend, dtype):
    device = device_for(backend)
    q, k, v, dO = inputs((2, 4, 6, 32, 32), device, dtype)
    vl = torch.tensor([3, 6], device=device)
    got = run(backend, dtype, q, k, v, vl, dO, scale=0.37)
    want64 = reference_grads(q.double(), k.double(), v.double(), vl.int(), dO.double(),
                             scale=0.37)
    want_lp = reference_grads(q, k, v, vl.int(), dO, scale=0.37)
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert_attention_close(name, g, w64, wlp, "attention")


def extract_keep_scale(backend, dtype, N, Lq, Lk, p):
    """The dropout mask a backend applies, read through the op: q = k = 0 makes every
    probability 1/Lk and one-hot values v[j] = e_j give out[n, i, j] = keep / (1-p) / Lk.
    Seeds come from torch's generator, so a manual_seed before each call repeats the mask."""
    device = device_for(backend)
    q = torch.zeros(N, Lq, 8, device=device, dtype=dtype)
    k = torch.zeros(N, Lk, 8, device=device, dtype=dtype)
    v = torch.eye(Lk, device=device, dtype=dtype).expand(N, Lk, Lk).contiguous()
    with on_backend(backend, "attention", device, dtype):
        out = ops.attention(q, k, v, None, p)
    return out.float().cpu() * Lk


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_dropout_keep_rate_and_determinism(backend, dtype):
    N, Lq, Lk, p = 4, 40, 48, 0.2
    torch.manual_seed(11)
    keep = extract_keep_scale(backend, dtype, N, Lq, Lk, p)
    scale = 1 / (1 - p)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (((keep - scale).abs() < tol * scale) | (keep.abs() < tol)).all()
    kept = (keep > scale / 2).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel()), kept
    torch.manual_seed(11)
    assert torch.equal(keep, extract_keep_scale(backend, dtype, N, Lq, Lk, p))
    assert not torch.equal(keep, extract_keep_scale(backend, dtype, N, Lq, Lk, p))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", range(4), ids=VL_CASES)
def test_dropout_forward_backward_match_reference_with_the_same_mask(backend, dtype, case):
    device = device_for(backend)
    N, Lq, Lk, D, p = 3, 5, 7, 32, 0.3
    _, vl = valid_lens_cases(N, Lq, Lk)[case]
    vl = None if vl is None else vl.to(device)
    torch.manual_seed(5)
    keep = extract_keep_scale(backend, dtype, N, Lq, Lk, p)
    keep = (keep > 0.5 / (1 - p)).double() / (1 - p)
    q, k, v, dO = inputs((N, Lq, Lk, D, D), device, dtype)
    torch.manual_seed(5)  # the same seed draw as extract_keep_scale's
    got = run(backend, dtype, q, k, v, vl, dO, dropout_p=p)
    norm_vl = ops.normalize_valid_lens(vl, N, Lq, Lk, device)
    want64 = reference_grads(q.double(), k.double(), v.double(), norm_vl, dO.double(),
                             dropout_keep=keep.to(device))
    want_lp = reference_grads(q, k, v, norm_vl, dO, dropout_keep=keep.to(device))
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert_attention_close(name, g, w64, wlp, "attention dropout")


def test_cpp_dropout_counter_is_the_flat_index():
    """cpp: probability (n, i, j) is kept iff dropout_mask(seed, [N, Lq, Lk], p) says so."""
    require_extension()
    N, Lq, Lk, p = 2, 5, 9, 0.5
    torch.manual_seed(3)
    keep = extract_keep_scale("cpp", torch.float32, N, Lq, Lk, p)
    torch.manual_seed(3)
    seed = ops.dropout_seed(p)
    mask = torch.ops.fastbert.dropout_mask(seed, [N, Lq, Lk], p)
    torch.testing.assert_close(keep, mask.float() / (1 - p), rtol=1e-5, atol=1e-5)


def test_opcheck_cpp():
    require_extension()
    op = torch.ops.fastbert.attention
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(3, 4, 32, dtype=dtype, requires_grad=True)
        k = torch.randn(3, 6, 32, dtype=dtype, requires_grad=True)
        v = torch.randn(3, 6, 16, dtype=dtype, requires_grad=True)
        for vl in (None, torch.tensor([0, 3, 6], dtype=torch.int32),
                   torch.randint(0, 7, (3, 4), dtype=torch.int32)):
            torch.library.opcheck(op, (q, k, v, vl, 0.0, 0.2, None))
        torch.library.opcheck(op, (q, k, v, None, 0.3, 0.2, torch.tensor(3)))


def test_bad_inputs_raise_clear_errors():
    require_extension()
    op = torch.ops.fastbert.attention
    q = torch.randn(2, 3, 16)
    with pytest.raises(RuntimeError, match="valid_lens must lie in"):
        op(q, q, q, torch.tensor([1, 4], dtype=torch.int32), 0.0, 0.2, None)
    with pytest.raises(RuntimeError, match="valid_lens must be"):
        op(q, q, q, torch.tensor([1, 2, 3], dtype=torch.int32), 0.0, 0.2, None)
    with pytest.raises(RuntimeError, match="seed"):
        op(q, q, q, None, 0.5, 0.2, None)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        op(q, torch.randn(2, 3, 8), q, None, 0.0, 0.2, None)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    q, k, v, dO = inputs((4, 5, 7, 32, 32), device, dtype)
    vl = torch.tensor([0, 1, 7, 3], device=device)
    eager = run(backend, dtype, q, k, v, vl, dO)

    def loss(q, k, v):
        return (ops.attention(q, k, v, vl, 0.0).float() * dO.float()).sum()

    with on_backend(backend, "attention", device, dtype):
        torch._dynamo.reset()
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.compile(loss, fullgraph=True)(*xs).backward()
    for name, g, e in zip(("dq", "dk", "dv"), (t.grad for t in xs), eager[1:]):
        torch.testing.assert_close(g, e, msg=lambda m: f"compiled {name}: {m}")
