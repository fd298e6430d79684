"""varlen_attention on every fast backend vs the float64 reference, forward and backward,
with and without dropout.

Reference: fastbert/backends/reference.py varlen_attention (unpack, padded d2l attention,
pack).  Kernels: csrc/cpu/varlen_attention.cpp (cpp), kernels/varlen_attention.py (triton).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastbert import ops
from fastbert.backends import reference

from op_testing import FAST_BACKENDS, assert_close, device_for, dtypes_for, on_backend

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


def reference_grads(q, k, v, cu, max_len, dO, scale=None, keep_scale=None):
    """Output and (dq, dk, dv) of the reference; with ``keep_scale`` ([B, H, L, L], 0 or
    1/(1-p)) the reference applies exactly that dropout mask to the probabilities."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if keep_scale is None:
        out = reference.varlen_attention(q, k, v, cu, max_len, 0.0, scale)
    else:
        out = masked_dropout_reference(q, k, v, cu, max_len, scale, keep_scale)
    return (out,) + torch.autograd.grad(out, (q, k, v), dO)


def masked_dropout_reference(q, k, v, cu, max_len, scale, keep_scale):
    T, H, D = q.shape
    lengths = reference.lengths_from_cu_seqlens(cu)
    B, L = lengths.shape[0], max(max_len, 1)

    def heads(x):  # [T, H, D] -> [B*H, L, D]
        return reference.unpack(x, cu, L).permute(0, 2, 1, 3).reshape(B * H, L, D)

    scores = torch.bmm(heads(q), heads(k).transpose(1, 2))
    scores = scores / math.sqrt(D) if scale is None else scores * scale
    weights = reference.masked_softmax(scores, lengths.repeat_interleave(H))
    out = torch.bmm(weights * keep_scale.reshape(B * H, L, L).to(weights.dtype), heads(v))
    return reference.pack(out.reshape(B, H, L, D).permute(0, 2, 1, 3), lengths)[0]


def run(backend, dtype, q, k, v, cu, max_len, dO, dropout_p=0.0, seed=None, scale=None):
    device = q.device
    with on_backend(backend, "varlen_attention", device, dtype):
        qk, kk, vk = (t.clone().requires_grad_() for t in (q, k, v))
        out = ops.varlen_attention(qk, kk, vk, cu, max_len, dropout_p, scale, seed)
        grads = torch.autograd.grad(out, (qk, kk, vk), dO)
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
        assert_close(g, w64, wlp, name=f"varlen_attention {name}")


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
        assert_close(g, w64, wlp, name=f"varlen_attention {name}")


def extract_keep_scale(backend, dtype, lens, H, D, p, seed):
    """The dropout mask a backend applies, read through the op itself: with q = k = 0 every
    probability is 1/n, and with one-hot values v[j] = e_j, out[i, j] = keep_ij / (1-p) / n.
    The mask depends only on (seed, positions), so it is the mask of any q, k, v of this
    shape.  Returns [B, H, L, L] keep-scales (0 or 1/(1-p))."""
    device = device_for(backend)
    cu, T, L = cu_of(lens, device), sum(lens), max(lens)
    assert D >= L
    q = torch.zeros(T, H, D, device=device, dtype=dtype)
    v = torch.zeros(T, H, D, device=device, dtype=dtype)
    for start, n in zip(cu[:-1].tolist(), lens):
        v[start:start + n, :, :n] = torch.eye(n, D, dtype=dtype, device=device)[:, None, :n]
    with on_backend(backend, "varlen_attention", device, dtype):
        out = ops.varlen_attention(q, q, v, cu, L, p, None, seed)
    keep = torch.zeros(len(lens), H, L, L)
    for b, (start, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        keep[b, :, :n, :n] = out[start:start + n, :, :n].float().permute(1, 0, 2).cpu() * n
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
        assert_close(g, w64, wlp, name=f"varlen_attention dropout {name}")


def test_cpp_dropout_counter_is_documented():
    """The cpp kernels' mask is the documented counter: (t * H + h) * T + u."""
    pytest.importorskip("fastbert._C")
    from fastbert.backends.cpp import varlen_attention as glue
    lens, H, D, p = [5, 1, 12], 2, 32, 0.4
    seed = torch.tensor(5)
    keep = extract_keep_scale("cpp", torch.float32, lens, H, D, p, seed)
    expected = glue.dropout_keep_scale(cu_of(lens), H, max(lens), p, seed)
    torch.testing.assert_close(keep, expected, rtol=1e-5, atol=1e-5)


def test_opcheck_cpp():
    pytest.importorskip("fastbert._C")
    op = torch.ops.fastbert.varlen_attention
    cu = cu_of([3, 0, 5])
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(8, 2, 32, dtype=dtype, requires_grad=True) for _ in range(3))
        torch.library.opcheck(op, (q, k, v, cu, 0.0, 0.2, None))
        torch.library.opcheck(op, (q, k, v, cu, 0.3, 0.2, torch.tensor(3)))


def test_bad_inputs_raise_clear_errors():
    pytest.importorskip("fastbert._C")
    op = torch.ops.fastbert.varlen_attention
    q = torch.randn(8, 2, 32)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        op(q, q, q, cu_of([3, 4]), 0.0, 0.2, None)  # sums to 7, not T = 8
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
