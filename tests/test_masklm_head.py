"""fastbert.MaskLM, the head whose full ``[B, P, vocab]`` logits the book's pretraining
chapter takes (``net(...)`` -> ``mlm_Y_hat``, then its own CrossEntropyLoss): forward and
backward on every backend against d2l's formula in float64 (gather, Linear, ReLU, LayerNorm,
Linear), with the house tolerance; the backend that ran is asserted.  Also: d2l's state_dict
keys, torch.compile(fullgraph=True), hooks still seen, and the book's whole step against the
real d2l 0.17.6 model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert
from op_testing import ATOL, FAST_BACKENDS, assert_close, dtypes_for, ran_on, require

DEVICE_OP = "linear"  # the ``device`` fixture's op (conftest.py)
HEAD_OPS = ("gather_positions", "linear")

# id: (B, L, C_in, C_hidden, V, P)
CASES = {
    "book_like": (4, 9, 16, 16, 64, 3),
    "one_slot": (5, 6, 8, 12, 40, 1),
    "odd_vocab_odd_hidden": (3, 7, 13, 11, 101, 4),
    "repeated_positions": (2, 5, 8, 8, 33, 6),
}
BACKEND_DTYPES = [(b, d) for b in ("reference",) + FAST_BACKENDS
                  for d in (dtypes_for(b) if b != "reference" else (torch.float32,))]


def make_case(B, L, Cin, Ch, V, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, L, Cin, generator=g, dtype=torch.float64)
    positions = torch.randint(0, L, (B, P), generator=g)
    positions[0] = positions[0, 0]  # one row reads a single token P times (scatter-add)
    head = fastbert.MaskLM(V, Ch, num_inputs=Cin).double()
    with torch.no_grad():  # fresh non-trivial parameters (LayerNorm's are 1/0 at init)
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    grad = torch.randn(B, P, V, generator=g, dtype=torch.float64)
    return X, positions, head, grad


def d2l_formula(X, positions, head):
    """d2l 0.17.6 MaskLM.forward: ``self.mlp(X[batch_idx, pred_positions])`` with plain
    PyTorch modules of the same parameters."""
    lin1, _, ln, lin2 = head.mlp
    B, P = positions.shape
    batch_idx = torch.repeat_interleave(torch.arange(B), P)
    masked_X = X[batch_idx, positions.reshape(-1)].reshape(B, P, -1)
    h = F.layer_norm(torch.relu(F.linear(masked_X, lin1.weight, lin1.bias)),
                     ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return F.linear(h, lin2.weight, lin2.bias)


def fwd_bwd(fn, X, head, grad):
    X = X.detach().clone().requires_grad_(True)
    head.zero_grad()
    out = fn(X, head)
    out.backward(grad.to(out.dtype))
    return [out.detach(), X.grad] + [p.grad for p in head.parameters()]


NAMES = ["logits", "dX", "dw1", "db1", "dln_w", "dln_b", "dw2", "db2"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES,
                         ids=[f"{b}-{str(d).split('.')[-1]}" for b, d in BACKEND_DTYPES])
def test_masklm_forward_backward(backend, dtype, case, device):
    X, positions, head, grad = make_case(*CASES[case])
    positions = positions.to(device)
    ref = fwd_bwd(lambda x, h: d2l_formula(x, positions.cpu(), h), X, head, grad)
    torch_lowp = fwd_bwd(lambda x, h: d2l_formula(x, positions, h),
                         X.to(device, dtype), head.to(device, dtype), grad.to(device))
    if backend == "reference":
        block = fastbert.use_backend("reference")
    else:
        block = ran_on(backend, device, dtype, HEAD_OPS)
    with block:
        ours = fwd_bwd(lambda x, h: h(x, positions), X.to(device, dtype), head, grad.to(device))
    for name, o, r, t in zip(NAMES, ours, ref, torch_lowp):
        assert o.dtype == dtype and o.device.type == device.type, name
        assert_close(o.cpu(), r, t.cpu(), name=f"{backend} {case} {name}",
                     atol=ATOL[dtype] * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_masklm_under_autocast(backend, device):
    """bf16 autocast (the book's model in fp32, run under torch.autocast): the same casts as
    nn.Linear, the logits in bf16, fp32 parameter gradients."""
    X, positions, head, grad = make_case(*CASES["odd_vocab_odd_hidden"])
    head = head.float().to(device)
    positions = positions.to(device)
    ref = fwd_bwd(lambda x, h: d2l_formula(x, positions.cpu(), h), X, head.double().cpu(), grad)
    head = head.float().to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        torch_lowp = fwd_bwd(lambda x, h: d2l_formula(x, positions, h),
                             X.float().to(device), head, grad.to(device))
        with ran_on(backend, device, torch.bfloat16, HEAD_OPS):
            ours = fwd_bwd(lambda x, h: h(x, positions), X.float().to(device), head,
                           grad.to(device))
    assert ours[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in ours[1:])
    for name, o, r, t in zip(NAMES, ours, ref, torch_lowp):
        assert_close(o.cpu().double(), r, t.cpu().double(), name=f"autocast {name}",
                     atol=ATOL[torch.bfloat16] * max(1.0, r.abs().max().item()))


def test_masklm_runs_the_fast_ops():
    """The plain head goes through fastbert.ops.linear (both layers) and gather_positions."""
    X, positions, head, _ = make_case(*CASES["book_like"])
    require("cpp", "linear", torch.device("cpu"), torch.float32)
    with ran_on("cpp", torch.device("cpu"), torch.float32, HEAD_OPS) as log:
        head.float()(X.float(), positions)
    assert [op for op, _ in log] == ["gather_positions", "linear", "linear"], log


def test_masklm_hooks_and_swapped_layers_see_module_calls():
    X, positions, head, _ = make_case(*CASES["book_like"])
    head, X = head.float(), X.float()
    seen = []
    handle = head.mlp[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = head(X, positions)
    handle.remove()
    assert seen == [out.shape]
    head.mlp[1] = nn.GELU()  # a user's swapped activation is honoured
    torch.testing.assert_close(head(X, positions), head.mlp(X[torch.arange(X.shape[0])[:, None],
                                                             positions]))


def test_masklm_state_dict_is_d2ls():
    from d2l_loader import load_d2l
    d2l = load_d2l("0.17.6")
    ours, theirs = fastbert.MaskLM(50, 16, num_inputs=8), d2l.MaskLM(50, 16, num_inputs=8)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    X, positions = torch.randn(3, 7, 8), torch.randint(0, 7, (3, 4))
    assert_close(ours(X, positions), theirs(X, positions).double(),
                 atol=ATOL[torch.float32] * 10)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_masklm_compiles_fullgraph(backend, device):
    X, positions, head, grad = make_case(*CASES["odd_vocab_odd_hidden"])
    head, X, grad, positions = head.float().to(device), X.float().to(device), \
        grad.float().to(device), positions.to(device)
    with ran_on(backend, device, torch.float32, HEAD_OPS):
        eager = fwd_bwd(lambda x, h: h(x, positions), X, head, grad)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with fastbert.use_backend(backend):
        traced = fwd_bwd(lambda x, h: compiled(x, positions), X, head, grad)
    for name, a, b in zip(NAMES, traced, eager):
        torch.testing.assert_close(a, b, msg=name)


def test_book_pretraining_step_matches_real_d2l():
    """The chapter's step verbatim (real d2l's _get_batch_loss_bert, CrossEntropyLoss, the
    full mlm_Y_hat) with fastbert's BERTModel (cpp backend, unpadded encoder, the fast
    MaskLM) vs d2l's BERTModel holding the same weights, dropout 0: losses and every
    parameter's gradient agree."""
    from d2l_loader import load_d2l
    from test_mlm_loss import V_SMALL, pretrain_batch
    d2l = load_d2l("0.17.6")
    require("cpp", "linear", torch.device("cpu"), torch.float32)
    args = (V_SMALL, 32, [32], 32, 64, 2, 2, 0.0)
    kw = dict(max_len=12, key_size=32, query_size=32, value_size=32, hid_in_features=32,
              mlm_in_features=32, nsp_in_features=32)
    torch.manual_seed(3)
    theirs = d2l.BERTModel(*args, **kw)
    ours = fastbert.BERTModel(*args, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    batch = pretrain_batch(B=7, P=3, seed=2)
    loss = nn.CrossEntropyLoss()
    with ran_on("cpp", torch.device("cpu"), torch.float32, HEAD_OPS) as log:
        lo = d2l._get_batch_loss_bert(ours, loss, V_SMALL, *batch)
        lo[2].backward()
    assert {"linear", "gather_positions", "varlen_attention"} <= {op for op, _ in log}
    lt = d2l._get_batch_loss_bert(theirs, loss, V_SMALL, *batch)
    lt[2].backward()
    for a, b in zip(lo, lt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs_params[name]
        if q.grad is None:  # d2l 0.17's positional embedding never gets a gradient
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
