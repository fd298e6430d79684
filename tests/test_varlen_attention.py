"""varlen_attention on every fast backend vs the float64 reference, forward and backward,
with and without dropout; self-attention (q, k, v share cu_seqlens) and cross-length
(queries packed by their own cu_seqlens_q, e.g. only <cls> rows).

Reference: fastbert/backends/reference.py varlen_attention (unpack, padded d2l attention,
pack).  Kernels: csrc/cpu/varlen_attention.cpp (cpp), kernels/varlen_attention.py (triton).
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastbert import ops
from fastbert.backends import reference

from op_testing import (FAST_BACKENDS, assert_attention_close, device_for,
                        dtypes_for, on_backend, require,
                        require_extension)

BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FAST_BACKENDS
                  for d in dtypes_for(b)]
# (sequence lengths, heads, head size): length 1, a 0-length sequence, odd and
# non-power-of-two lengths, head sizes 32..128, the maximum length 128.
SHAPES = [
    ([1], 1, 32),
    ([5, 0, 3], 2, 48),
    ([7, 1, 13], 3, 64),
    ([9, 2], 2, 96),
    ([4, 6], 1, 128),
    ([128, 3], 1, 32),
]


def cu_of(lens, device="cpu"):
    return F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32).to(device)


def reference_grads(q, k, v, cu, max_len, dO, scale=None, keep_scale=None, cu_q=None):
    """Output and (dq, dk, dv) of the reference; with ``keep_scale`` ([B, H, L, L], 0 or
    1/(1-p)) the reference applies exactly that dropout mask to the probabilities."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if keep_scale is None:
        out = reference.varlen_attention(q, k, v, cu, max_len, 0.0, scale, cu_seqlens_q=cu_q)
    else:
        out = masked_dropout_reference(q, k, v, cu, max_len, scale, keep_scale, cu_q)
    return (out,) + torch.autograd.grad(out, (q, k, v), dO, allow_unused=True,
                                        materialize_grads=True)


def masked_dropout_reference(q, k, v, cu, max_len, scale, keep_scale, cu_q=None):
    T, H, D = q.shape
    cu_q = cu if cu_q is None else cu_q
    lengths = reference.lengths_from_cu_seqlens(cu)
    B, L = lengths.shape[0], max(max_len, 1)

    def heads(x, offsets):  # [T, H, D] -> [B*H, L, D]
        return reference.unpack(x, offsets, L).permute(0, 2, 1, 3).reshape(B * H, L, D)

    scores = torch.bmm(heads(q, cu_q), heads(k, cu).transpose(1, 2))
    scores = scores / math.sqrt(D) if scale is None else scores * scale
    weights = reference.masked_softmax(scores, lengths.repeat_interleave(H))
    out = torch.bmm(weights * keep_scale.reshape(B * H, L, L).to(weights.dtype), heads(v, cu))
    return reference.pack(out.reshape(B, H, L, D).permute(0, 2, 1, 3),
                          reference.lengths_from_cu_seqlens(cu_q))[0]


def run(backend, dtype, q, k, v, cu, max_len, dO, dropout_p=0.0, seed=None, scale=None,
        cu_q=None):
    device = q.device
    with on_backend(backend, "varlen_attention", device, dtype):
        qk, kk, vk = (t.clone().requires_grad_() for t in (q, k, v))
        out = ops.varlen_attention(qk, kk, vk, cu, max_len, dropout_p, scale, seed,
                                   cu_seqlens_q=cu_q)
        grads = torch.autograd.grad(out, (qk, kk, vk), dO, allow_unused=True,
                                    materialize_grads=True)
    return (out,) + grads


@pytest.fixture
def poisoned(monkeypatch):
    """C++ kernels fill their outputs with NaN before writing (csrc/cpu/cpu_common.h)."""
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{'-'.join(map(str, s[0]))}_h{s[1]}_d{s[2]}")
def test_forward_backward_matches_reference(backend, dtype, shape, poisoned):
    device = device_for(backend)
    lens, H, D = shape
    cu, T, max_len = cu_of(lens, device), sum(lens), max(lens)
    q, k, v = (torch.randn(T, H, D, device=device).to(dtype) for _ in range(3))
    dO = torch.randn(T, H, D, device=device).to(dtype)
    got = run(backend, dtype, q, k, v, cu, max_len, dO)
    want64 = reference_grads(q.double(), k.double(), v.double(), cu, max_len, dO.double())
    want_lp = reference_grads(q, k, v, cu, max_len, dO)
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert g.dtype == dtype
        assert_attention_close(name, g, w64, wlp, "varlen_attention")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_explicit_scale_and_upper_bound_max_len(backend, dtype):
    """scale is honoured; max_len may be any upper bound (it is the padded L under compile)."""
    device = device_for(backend)
    lens, H, D = [3, 6], 2, 32
    cu, T = cu_of(lens, device), sum(lens)
    q, k, v = (torch.randn(T, H, D, device=device).to(dtype) for _ in range(3))
    dO = torch.randn(T, H, D, device=device).to(dtype)
    got = run(backend, dtype, q, k, v, cu, 16, dO, scale=0.3)
    want64 = reference_grads(q.double(), k.double(), v.double(), cu, 6, dO.double(), scale=0.3)
    want_lp = reference_grads(q, k, v, cu, 6, dO, scale=0.3)
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert_attention_close(name, g, w64, wlp, "varlen_attention")


def extract_keep_scale(backend, dtype, lens, H, D, p, seed, q_lens=None):
    """The dropout mask a backend applies, read through the op itself: with q = k = 0 every
    probability is 1/n, and with one-hot values v[j] = e_j, out[i, j] = keep_ij / (1-p) / n.
    The mask depends only on (seed, positions), so it is the mask of any q, k, v of this
    shape.  ``q_lens``: queries packed by their own offsets (cu_seqlens_q).  Returns
    [B, H, L, L] keep-scales (0 or 1/(1-p)), L bounding the key and query counts."""
    device = device_for(backend)
    cu, T = cu_of(lens, device), sum(lens)
    cu_q = None if q_lens is None else cu_of(q_lens, device)
    q_lens = lens if q_lens is None else q_lens
    L = max(lens + q_lens)
    assert D >= max(lens)
    q = torch.zeros(sum(q_lens), H, D, device=device, dtype=dtype)
    k = torch.zeros(T, H, D, device=device, dtype=dtype)
    v = torch.zeros(T, H, D, device=device, dtype=dtype)
    for start, n in zip(cu[:-1].tolist(), lens):
        v[start:start + n, :, :n] = torch.eye(n, D, dtype=dtype, device=device)[:, None, :n]
    with on_backend(backend, "varlen_attention", device, dtype):
        out = ops.varlen_attention(q, k, v, cu, L, p, None, seed, cu_seqlens_q=cu_q)
    keep = torch.zeros(len(lens), H, L, L)
    q_starts = F.pad(torch.tensor(q_lens).cumsum(0), (1, 0)).tolist()
    for b, (qs, nq, n) in enumerate(zip(q_starts, q_lens, lens)):
        keep[b, :, :nq, :n] = out[qs:qs + nq, :, :n].float().permute(1, 0, 2).cpu() * n
    return keep


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_dropout_is_deterministic_per_seed_and_keeps_1_minus_p(backend, dtype):
    device = device_for(backend)
    lens, H, D, p = [64, 23, 1], 2, 64, 0.3
    seed = torch.tensor(1234)
    keep = extract_keep_scale(backend, dtype, lens, H, D, p, seed)
    inside = torch.zeros_like(keep, dtype=torch.bool)
    for b, n in enumerate(lens):
        inside[b, :, :n, :n] = True
    vals = keep[inside]
    scale = 1 / (1 - p)
    # Every element is dropped (0) or kept and rescaled by 1/(1-p) (bf16: within rounding).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (((vals - scale).abs() < tol * scale) | (vals.abs() < tol)).all()
    kept = (vals > scale / 2).double().mean().item()
    n = vals.numel()  # ~9300 draws: 5 sigma of a binomial
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), kept
    # Same seed: same output; another seed: a different mask.
    cu, T = cu_of(lens, device), sum(lens)
    q, k, v = (torch.randn(T, H, D, device=device).to(dtype) for _ in range(3))
    with on_backend(backend, "varlen_attention", device, dtype):
        a = ops.varlen_attention(q, k, v, cu, max(lens), p, None, seed)
        b = ops.varlen_attention(q, k, v, cu, max(lens), p, None, seed.clone())
        c = ops.varlen_attention(q, k, v, cu, max(lens), p, None, torch.tensor(99))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_dropout_forward_backward_match_reference_with_the_same_mask(backend, dtype):
    device = device_for(backend)
    lens, H, D, p = [5, 1, 12, 0], 2, 48, 0.25
    seed = torch.tensor(77)
    keep = extract_keep_scale(backend, dtype, lens, H, D, p, seed)
    keep = (keep > 0.5 / (1 - p)).double() / (1 - p)  # exact keep-scales (bf16 rounds them)
    cu, T, L = cu_of(lens, device), sum(lens), max(lens)
    q, k, v = (torch.randn(T, H, D, device=device).to(dtype) for _ in range(3))
    dO = torch.randn(T, H, D, device=device).to(dtype)
    got = run(backend, dtype, q, k, v, cu, L, dO, p, seed)
    want64 = reference_grads(q.double(), k.double(), v.double(), cu, L, dO.double(),
                             keep_scale=keep.double())
    want_lp = reference_grads(q, k, v, cu, L, dO, keep_scale=keep)
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert_attention_close(name, g, w64, wlp, "varlen_attention dropout")


def test_cpp_dropout_counter_is_documented():
    """The cpp kernels' mask is the documented counter: (t * H + h) * T + u."""
    require_extension()
    from fastbert.backends.cpp import varlen_attention as glue
    lens, H, D, p = [5, 1, 12], 2, 32, 0.4
    seed = torch.tensor(5)
    keep = extract_keep_scale("cpp", torch.float32, lens, H, D, p, seed)
    expected = glue.dropout_keep_scale(cu_of(lens), H, max(lens), p, seed)
    torch.testing.assert_close(keep, expected, rtol=1e-5, atol=1e-5)


def test_opcheck_cpp():
    require_extension()
    op = torch.ops.fastbert.varlen_attention
    cu = cu_of([3, 0, 5])
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(8, 2, 32, dtype=dtype, requires_grad=True) for _ in range(3))
        torch.library.opcheck(op, (q, k, v, cu, 0.0, 0.2, None))
        torch.library.opcheck(op, (q, k, v, cu, 0.3, 0.2, torch.tensor(3)))


def test_bad_inputs_raise_clear_errors():
    require_extension()
    op = torch.ops.fastbert.varlen_attention
    q = torch.randn(8, 2, 32)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(q, q, q, cu_of([3, 6]), 0.0, 0.2, None)  # sums to 9 > T = 8 (fewer is row padding)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        op(q, q, q, torch.tensor([0, 5, 3, 8], dtype=torch.int32), 0.0, 0.2, None)
    with pytest.raises(RuntimeError, match="seed"):
        op(q, q, q, cu_of([8]), 0.5, 0.2, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(q.half(), q.half(), q.half(), cu_of([8]), 0.0, 0.2, None)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    lens, H, D = [4, 7], 2, 32
    cu, T = cu_of(lens, device), sum(lens)
    q, k, v = (torch.randn(T, H, D, device=device).to(dtype) for _ in range(3))
    dO = torch.randn(T, H, D, device=device).to(dtype)
    eager = run(backend, dtype, q, k, v, cu, 7, dO)

    def loss(q, k, v):
        return (ops.varlen_attention(q, k, v, cu, 7, 0.0).float() * dO.float()).sum()

    with on_backend(backend, "varlen_attention", device, dtype):
        torch._dynamo.reset()
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.compile(loss, fullgraph=True)(*inputs).backward()
    for name, g, e in zip(("dq", "dk", "dv"), (t.grad for t in inputs), eager[1:]):
        torch.testing.assert_close(g, e, msg=lambda m: f"compiled {name}: {m}")


# ----------------------------------------------------------------------------- cross-length
# Queries packed by their own offsets (cu_seqlens_q): (key lengths, query counts, H, D).
CROSS_CASES = [
    ([5, 0, 7, 1, 3], [1, 2, 0, 1, 3], 2, 48),    # nq 0..3; queries but no keys; nk 1, odd
    ([23, 64, 1, 40], [1, 1, 1, 1], 4, 64),       # the classifier: <cls> only, max length 64
    ([30, 11, 64, 45], [11, 3, 11, 0], 2, 64),    # pretraining: <cls> + MLM positions
    ([6, 13], [6, 13], 3, 32),                    # nq == nk (q a separate tensor)
    ([0, 0], [2, 1], 1, 32),                      # no keys anywhere: zeros
    ([2, 1, 3], [5, 3, 1], 2, 32),                # more queries than keys (and than max_len)
    ([4, 0, 3], [0, 0, 0], 2, 32),                # no queries anywhere (Tq = 0)
]


def cross_id(case):
    return f"k{'-'.join(map(str, case[0]))}_q{'-'.join(map(str, case[1]))}_h{case[2]}_d{case[3]}"


class _PoisonTriton(TorchFunctionMode):
    """Triton launchers allocate with torch.empty / empty_like / new_empty: fill those with NaN
    so a row a kernel forgets to write shows up (the C++ kernels use FASTBERT_POISON_OUTPUTS)."""
    FACTORIES = {torch.empty, torch.empty_like, torch.Tensor.new_empty}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and out.is_floating_point():
            out.fill_(float("nan"))
        return out


def poison(backend):
    return _PoisonTriton() if backend == "triton" else contextlib.nullcontext()


def cross_inputs(lens, q_lens, H, D, device, dtype):
    q = torch.randn(sum(q_lens), H, D, device=device).to(dtype)
    k, v = (torch.randn(sum(lens), H, D, device=device).to(dtype) for _ in range(2))
    dO = torch.randn(sum(q_lens), H, D, device=device).to(dtype)
    return q, k, v, dO


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", CROSS_CASES, ids=cross_id)
def test_cross_length_matches_reference(backend, dtype, case, poisoned):
    device = device_for(backend)
    lens, q_lens, H, D = case
    cu, cu_q, L = cu_of(lens, device), cu_of(q_lens, device), max(lens)  # max_len: keys only
    q, k, v, dO = cross_inputs(lens, q_lens, H, D, device, dtype)
    with poison(backend):
        got = run(backend, dtype, q, k, v, cu, L, dO, cu_q=cu_q)
    want64 = reference_grads(q.double(), k.double(), v.double(), cu, L, dO.double(), cu_q=cu_q)
    want_lp = reference_grads(q, k, v, cu, L, dO, cu_q=cu_q)
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert g.dtype == dtype
        assert_attention_close(name, g, w64, wlp, "cross varlen_attention")
    # A sequence with queries but no keys: zero output, zero dq (exactly).
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        if n == 0 and nq > 0:
            rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
            assert (got[0][rows] == 0).all() and (got[1][rows] == 0).all()
    # Keys no query looks at get exactly zero gradients.
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        if nq == 0 and n > 0:
            rows = slice(int(cu[b]), int(cu[b + 1]))
            assert (got[2][rows] == 0).all() and (got[3][rows] == 0).all()


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cross_with_every_row_as_query_is_self_attention_bit_for_bit(backend, dtype, p):
    """cu_seqlens_q == cu_seqlens and q sharing k's rows gives today's result exactly, dropout
    bits included: the counter (tq * H + h) * Tk + u is the self-attention one."""
    device = device_for(backend)
    lens, H, D = [7, 1, 13, 0, 4], 2, 32
    cu, T, L = cu_of(lens, device), sum(lens), max(lens)
    q, k, v = (torch.randn(T, H, D, device=device).to(dtype) for _ in range(3))
    dO = torch.randn(T, H, D, device=device).to(dtype)
    seed = torch.tensor(4321) if p > 0 else None
    plain = run(backend, dtype, q, k, v, cu, L, dO, p, seed)
    cross = run(backend, dtype, q, k, v, cu, L, dO, p, seed, cu_q=cu.clone())
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, cross):
        assert torch.equal(a, b), f"{name} differs between self and cross mode"


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_cross_dropout_matches_reference_with_the_same_mask(backend, dtype):
    device = device_for(backend)
    lens, q_lens, H, D, p = [5, 1, 12, 0, 9], [2, 1, 3, 1, 0], 2, 48, 0.25
    seed = torch.tensor(77)
    keep = extract_keep_scale(backend, dtype, lens, H, D, p, seed, q_lens)
    inside = torch.zeros_like(keep, dtype=torch.bool)
    for b, (n, nq) in enumerate(zip(lens, q_lens)):
        inside[b, :, :nq, :n] = True
    vals, scale = keep[inside], 1 / (1 - p)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (((vals - scale).abs() < tol * scale) | (vals.abs() < tol)).all()
    assert 0 < (vals > scale / 2).sum() < vals.numel()  # some kept, some dropped
    keep = (keep > 0.5 / (1 - p)).double() / (1 - p)  # exact keep-scales (bf16 rounds them)
    cu, cu_q, L = cu_of(lens, device), cu_of(q_lens, device), max(lens + q_lens)
    q, k, v, dO = cross_inputs(lens, q_lens, H, D, device, dtype)
    got = run(backend, dtype, q, k, v, cu, L, dO, p, seed, cu_q=cu_q)
    want64 = reference_grads(q.double(), k.double(), v.double(), cu, L, dO.double(),
                             keep_scale=keep.double(), cu_q=cu_q)
    want_lp = reference_grads(q, k, v, cu, L, dO, keep_scale=keep, cu_q=cu_q)
    for name, g, w64, wlp in zip(("out", "dq", "dk", "dv"), got, want64, want_lp):
        assert_attention_close(name, g, w64, wlp, "cross varlen_attention dropout")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_cross_dropout_counter_matches_the_read_back_helper(backend):
    """The mask read through the op is the documented counter, as the helpers compute it
    (cpp: (tq * H + h) * Tk + u; triton: (h * Tq + tq) * Tk + u)."""
    lens, q_lens, H, D, p = [5, 1, 12, 3], [2, 1, 4, 0], 2, 32, 0.4
    seed = torch.tensor(5)
    keep = extract_keep_scale(backend, torch.float32, lens, H, D, p, seed, q_lens)
    L = max(lens + q_lens)
    device = device_for(backend)
    if backend == "cpp":
        require_extension()
        from fastbert.backends.cpp import varlen_attention as glue
        expected = glue.dropout_keep_scale(cu_of(lens), H, L, p, seed, cu_of(q_lens))
    else:
        require("triton", "varlen_attention", device, torch.float32)
        from fastbert.kernels import varlen_attention as kernel
        mask = kernel.dropout_keep_mask(cu_of(lens, device), H, L, p, seed,
                                        cu_of(q_lens, device))
        expected = mask.reshape(len(lens), H, L, L).float().cpu() / (1 - p)
    torch.testing.assert_close(keep, expected, rtol=1e-5, atol=1e-5)


def test_cross_reference_gradcheck_float64():
    """The truth the kernels are held to: gradcheck of the reference's cross-length path
    (the fast backends take fp32/bf16 only; they are compared with it above)."""
    lens, q_lens, H, D = [3, 0, 4, 2], [1, 2, 2, 0], 2, 5
    cu, cu_q = cu_of(lens), cu_of(q_lens)
    q = torch.randn(sum(q_lens), H, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(lens), H, D, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.varlen_attention(q, k, v, cu, 4, cu_seqlens_q=cu_q), (q, k, v))


def test_cross_opcheck_cpp():
    require_extension()
    op = torch.ops.fastbert.varlen_attention
    cu, cu_q = cu_of([3, 0, 5]), cu_of([1, 2, 2])
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(5, 2, 32, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(8, 2, 32, dtype=dtype, requires_grad=True) for _ in range(2))
        torch.library.opcheck(op, (q, k, v, cu, 0.0, 0.2, None, cu_q))
        torch.library.opcheck(op, (q, k, v, cu, 0.3, 0.2, torch.tensor(3), cu_q))


def test_cross_opcheck_triton():
    require("triton", "varlen_attention", device_for("triton"), torch.float32)
    device = device_for("triton")
    op = torch.ops.fastbert_triton.varlen_attention
    cu, cu_q = cu_of([3, 0, 5], device), cu_of([1, 2, 2], device)
    q = torch.randn(5, 2, 16, device=device, requires_grad=True)
    k, v = (torch.randn(8, 2, 16, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(op, (q, k, v, cu, 5, 0.0, None, None, cu_q))
    torch.library.opcheck(op, (q, k, v, cu, 5, 0.3, 0.2, torch.tensor(3), cu_q))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_cross_compile_fullgraph(backend, dtype):
    device = device_for(backend)
    lens, q_lens, H, D = [4, 7, 0], [1, 3, 1], 2, 32
    cu, cu_q = cu_of(lens, device), cu_of(q_lens, device)
    q, k, v, dO = cross_inputs(lens, q_lens, H, D, device, dtype)
    eager = run(backend, dtype, q, k, v, cu, 7, dO, cu_q=cu_q)

    def loss(q, k, v):
        out = ops.varlen_attention(q, k, v, cu, 7, 0.0, cu_seqlens_q=cu_q)
        return (out.float() * dO.float()).sum()

    with on_backend(backend, "varlen_attention", device, dtype):
        torch._dynamo.reset()
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.compile(loss, fullgraph=True)(*inputs).backward()
    for name, g, e in zip(("dq", "dk", "dv"), (t.grad for t in inputs), eager[1:]):
        torch.testing.assert_close(g, e, msg=lambda m: f"compiled {name}: {m}")


def test_cross_bad_inputs_raise_clear_errors():
    q, k = torch.randn(3, 2, 8), torch.randn(7, 2, 8)
    cu = cu_of([3, 4])

    def call(q=q, k=k, v=k, cu_q=cu_of([1, 2]), max_len=4):
        return ops.varlen_attention(q, k, v, cu, max_len, cu_seqlens_q=cu_q)

    with pytest.raises(TypeError, match="cu_seqlens_q"):
        call(cu_q=cu_of([1, 2]).long())
    with pytest.raises(ValueError, match="B\\+1"):
        call(cu_q=cu_of([1, 1, 1]))
    with pytest.raises(ValueError, match="start at 0"):
        call(cu_q=torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(cu_q=torch.tensor([0, 3, 2], dtype=torch.int32), q=torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match="Tq = 3"):  # 4 offsets' rows > 3 (fewer: row padding)
        call(cu_q=cu_of([2, 2]))
    with pytest.raises(ValueError, match="share H, D"):
        call(q=torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match="share H, D"):
        call(v=torch.randn(6, 2, 8))
    with pytest.raises(ValueError, match="share shape"):  # without cu_seqlens_q: self-attention
        ops.varlen_attention(q, k, k, cu, 4)
    if not hasattr(torch.ops.fastbert, "varlen_attention"):
        return
    op = torch.ops.fastbert.varlen_attention
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        op(q, k, k, cu, 0.0, 0.2, None, cu_of([2, 2]))  # sums to 4 > Tq = 3
    with pytest.raises(RuntimeError, match="B\\+1"):
        op(q, k, k, cu, 0.0, 0.2, None, cu_of([1, 1, 1]))
    with pytest.raises(RuntimeError, match="share H and D"):
        op(torch.randn(3, 1, 8), k, k, cu, 0.0, 0.2, None, cu_of([1, 2]))
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        op(q, k, k, cu, 0.0, 0.2, None)  # q has its own rows: cu_seqlens_q needed


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_strided_views_of_a_fused_qkv(backend, dtype, cross, poisoned):
    """The encoder's q, k, v are column slices of one [T, 3*H*D] QKV GEMM output (row stride
    3*H*D; the cpp kernel reads them in place): same results as contiguous copies, and
    contiguous gradients, forward and backward, self- and cross-length."""
    device = device_for(backend)
    lens, H, D = [5, 1, 0, 17, 9], 3, 16
    cu, T, L = cu_of(lens, device), sum(lens), max(lens)
    qkv = torch.randn(T, 3 * H * D, device=device).to(dtype)
    q, k, v = (t.unflatten(-1, (H, D)) for t in qkv.split(H * D, -1))
    assert q.stride(0) == 3 * H * D and not q.is_contiguous()
    cu_q = None
    if cross:  # queries: rows 0 and 2 of every sequence (the pad-free ones), strided too
        q_rows = [r for b, n in enumerate(lens) for r in (int(cu[b]), int(cu[b]) + 2) if 2 < n]
        q = qkv.unflatten(-1, (3, H, D))[q_rows][:, 0]  # [Tq, H, D], row stride 3*H*D
        cu_q = cu_of([2 if n > 2 else 0 for n in lens], device)
    dO = torch.randn(q.shape, device=device).to(dtype)
    with poison(backend):
        with on_backend(backend, "varlen_attention", device, dtype):
            qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
            out = ops.varlen_attention(qs, ks, vs, cu, L, cu_seqlens_q=cu_q)
            grads = torch.autograd.grad(out, (qs, ks, vs), dO)
    want = run(backend, dtype, q.contiguous(), k.contiguous(), v.contiguous(), cu, L, dO,
               cu_q=cu_q)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out,) + grads, want):
        assert not torch.isnan(g).any(), f"{name}: unwritten element"
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ row padding
ALL_BACKENDS = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}")
                for b in ("reference",) + FAST_BACKENDS for d in dtypes_for(b)]


@pytest.mark.parametrize("backend,dtype", ALL_BACKENDS)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_row_padding_changes_nothing_else(backend, dtype, cross, p, poisoned):
    """Rows past the last offset (the encoder's row bucketing) belong to no sequence: the
    valid rows' output and gradients equal the call without them, bit for bit (dropout
    included), and the padding rows get zero output and zero gradients."""
    device = device_for(backend)
    lens, H, D, pad = [5, 0, 13, 1], 2, 48, 7
    cu = cu_of(lens, device)
    T = sum(lens)
    cu_q = cu_of([1, 1, 1, 1], device) if cross else None
    Tq = 4 if cross else T
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, H, D, generator=g).to(dtype).to(device) for n in (Tq, T, T))
    dO = torch.randn(Tq, H, D, generator=g).to(dtype).to(device)
    seed = torch.tensor(77, dtype=torch.int64) if p > 0 else None

    def run_padded(qpad, kvpad):
        # Padding rows hold large finite values: a kernel that read them would show it.
        grow = lambda t, n: torch.cat([t, torch.full((n,) + t.shape[1:], 1e4, dtype=dtype,  # noqa: E731
                                                     device=device)])
        qp = (grow(q, qpad) if qpad else q).detach().requires_grad_()
        kp, vp = ((grow(t, kvpad) if kvpad else t).detach().requires_grad_() for t in (k, v))
        with on_backend(backend, "varlen_attention", device, dtype):
            out = ops.varlen_attention(qp, kp, vp, cu, max(lens), p, None, seed, cu_seqlens_q=cu_q)
        dO_p = torch.cat([dO, torch.randn((out.shape[0] - Tq,) + dO.shape[1:]).to(dtype).to(device)])
        return (out,) + torch.autograd.grad(out, (qp, kp, vp), dO_p)

    plain = run_padded(0, 0)
    padded = run_padded(0 if cross else pad, pad)
    out, dq, dk, dv = padded
    if backend == "reference" and p > 0:  # F.dropout draws its own mask: check the padding only
        pass
    else:
        for a, b in zip(plain, (out[:Tq], dq[:Tq], dk[:T], dv[:T])):
            assert torch.equal(a, b)
    assert torch.count_nonzero(out[Tq:]) == 0 and torch.count_nonzero(dq[Tq:]) == 0
    assert torch.count_nonzero(dk[T:]) == 0 and torch.count_nonzero(dv[T:]) == 0
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_row_padding_bad_offsets():
    """More valid rows than the tensors hold is an error at the front door too."""
    q = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="at most"):
        ops.varlen_attention(q[:1], q, q, cu_of([2, 2]), 2, cu_seqlens_q=cu_of([1, 2]))


@pytest.mark.parametrize("cu,max_len,error,match", [
    (torch.tensor([1, 3, 6], dtype=torch.int32), 3, ValueError, r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"),
    (torch.tensor([0, 4, 3, 6], dtype=torch.int32), 4, ValueError, r"non-decreasing, got cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 3"),
    (torch.tensor([0, 3, 7], dtype=torch.int32), 4, ValueError, r"end at most at Tk = 6.*cu_seqlens\[-1\] = 7"),
    (torch.tensor([0, 5, 6], dtype=torch.int32), 4, ValueError, r"sequence of 5 rows, longer than max_len = 4"),
    (torch.tensor([0, 3, 6]), 3, TypeError, r"cu_seqlens must be a 1-D int32 tensor.*torch.int64"),
    (torch.tensor([[0, 3, 6]], dtype=torch.int32), 3, TypeError, r"cu_seqlens must be a 1-D int32"),
    (torch.tensor([0, 3, 6], dtype=torch.int32), -1, ValueError, r"max_len must be a non-negative int"),
])
def test_cu_seqlens_contents_are_checked(cu, max_len, error, match):
    """The front door reads the offsets before any backend does (a bad one would read out of
    bounds; on a GPU silently)."""
    q = torch.randn(6, 2, 8)
    with pytest.raises(error, match=match):
        ops.varlen_attention(q, q, q, cu, max_len)


def test_unpack_checks_cu_seqlens_contents():
    packed = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens must end at most at packed rows = 6"):
        ops.unpack(packed, torch.tensor([0, 3, 7], dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r"longer than L = 2"):
        ops.unpack(packed, torch.tensor([0, 3, 6], dtype=torch.int32), 2)


@pytest.mark.parametrize("cu,max_len", [([1, 3, 6], 3), ([0, 4, 3, 6], 4), ([0, 3, 7], 4),
                                        ([0, 5, 6], 4)])
def test_device_offset_check_fails_on_what_the_cpu_check_fails_on(cu, max_len):
    """The GPU path's single device-side condition (torch._assert_async, no host sync) run
    on CPU tensors, where it raises at once: it rejects the same offsets."""
    offsets = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0, be non-decreasing"):
        ops._assert_offsets_async("cu_seqlens", offsets, 6, "Tk", max_len, "max_len")
    ops._assert_offsets_async("cu_seqlens", torch.tensor([0, 3, 6], dtype=torch.int32), 6,
                              "Tk", 3, "max_len")  # a good one passes
    ops._assert_offsets_async("cu_seqlens", torch.tensor([0], dtype=torch.int32), 0, "Tk", 0,
                              "max_len")  # B = 0
