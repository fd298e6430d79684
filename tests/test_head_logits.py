"""The MLM head's logits (fastbert/head_logits.py): PyTorch's ``F.cross_entropy`` on them runs
fused into the head's Linear layer, and must give what autograd through ``F.linear`` +
``F.cross_entropy`` gives (the reference), in float64 and float32, on every reduction,
``ignore_index``, odd vocab sizes that end in a partial chunk, and a single slot.  Anything
the fused path does not cover falls back to PyTorch's own loss, with the same values."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert
from fastbert import head_logits
from fastbert.head_logits import HeadLogits, attach_head, why_not_fused

from op_testing import assert_close, require_extension

FUSED_NODE = "_LinearCrossEntropyBackward"


def make_head(N, C, V, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64) / C ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    return hidden, weight, b


def run(hidden, weight, bias, target, fused, dtype, **ce):
    """Loss and (d hidden, d weight, d bias) of cross_entropy(hidden @ weight^T + bias)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = F.linear(h, w, b)
    if fused:
        logits = attach_head(logits, h, w, b)
        assert type(logits) is HeadLogits
    loss = F.cross_entropy(logits, target, **ce)
    if fused:
        assert type(loss.grad_fn).__name__ == FUSED_NODE, why_not_fused(logits, target, **ce)
    grad_out = torch.randn(loss.shape, dtype=loss.dtype) if loss.dim() else None
    loss.backward(grad_out if grad_out is not None else torch.ones_like(loss))
    return [loss.detach()] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,C,V", [(1, 8, 5), (37, 16, 130), (64, 24, 97)])
def test_fused_cross_entropy_matches_reference(monkeypatch, dtype, reduction, N, C, V):
    # Small chunks, so several chunks run and the last one is partial (130 = 2 * 48 + 34).
    monkeypatch.setattr(head_logits, "CHUNK_COLUMNS", 48)
    monkeypatch.setattr(head_logits, "LSE_ROWS", 16)
    hidden, weight, bias = make_head(N, C, V, dtype)
    target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    if N > 1:
        target[::5] = -100  # ignored rows (PyTorch's default ignore_index)
    torch.manual_seed(2)
    got = run(hidden, weight, bias, target, True, dtype, reduction=reduction)
    torch.manual_seed(2)
    ref64 = run(hidden, weight, bias, target, False, torch.float64, reduction=reduction)
    torch.manual_seed(2)
    lowp = run(hidden, weight, bias, target, False, dtype, reduction=reduction)
    for name, out, r64, lp in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, ref64, lowp):
        # A summed loss (~150 here) rounds at its own ulp, whichever order the sum takes (the
        # fp32 run of PyTorch can land exactly by luck): atol scales with its magnitude.
        atol = 1e-6 * max(1.0, r64.abs().max().item()) if dtype == torch.float32 else None
        assert_close(out, r64.to(dtype), lp if dtype != torch.float64 else None, atol=atol,
                     name=name)


def test_no_bias_custom_ignore_index_and_all_ignored():
    hidden, weight, _ = make_head(9, 8, 33, torch.float64, bias=False)
    target = torch.randint(0, 33, (9,))
    target[:4] = 7
    got = run(hidden, weight, None, target, True, torch.float64, ignore_index=7)
    ref = run(hidden, weight, None, target, False, torch.float64, ignore_index=7)
    for out, r in zip(got[:3], ref[:3]):
        torch.testing.assert_close(out, r)
    # Every row ignored: PyTorch's mean is 0/0 = nan, and so is ours.
    all_ignored = torch.full((9,), -100)
    h = hidden.clone().requires_grad_()
    loss = F.cross_entropy(attach_head(F.linear(h, weight), h, weight, None), all_ignored)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(F.linear(hidden, weight),
                                                             all_ignored))


def test_target_out_of_range_raises_like_pytorch():
    hidden, weight, bias = make_head(4, 8, 10, torch.float64)
    h = hidden.requires_grad_()
    logits = attach_head(F.linear(h, weight, bias), h, weight, bias)
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        F.cross_entropy(logits, torch.tensor([1, 2, 10, 3]))


def test_unfused_cases_fall_back_to_pytorch_with_a_reason():
    hidden, weight, bias = make_head(6, 8, 11, torch.float64)
    target = torch.randint(0, 11, (6,))
    h = hidden.clone().requires_grad_()

    def fresh():
        return attach_head(F.linear(h, weight, bias), h, weight, bias)

    cases = {
        "label smoothing": dict(label_smoothing=0.1),
        "class weights": dict(weight=torch.rand(11, dtype=torch.float64)),
    }
    for why, kwargs in cases.items():
        logits = fresh()
        assert why_not_fused(logits, target, **kwargs) is not None, why
        loss = F.cross_entropy(logits, target, **kwargs)
        assert type(loss.grad_fn).__name__ != FUSED_NODE
        torch.testing.assert_close(loss, F.cross_entropy(logits.detach().as_subclass(
            torch.Tensor), target, **kwargs))
    # Changed in place after the head wrote them: the stored logits are no longer h W^T + b.
    logits = fresh()
    with torch.no_grad():
        logits.mul_(2)
    assert "in place" in why_not_fused(logits, target)
    assert type(F.cross_entropy(logits, target).grad_fn).__name__ != FUSED_NODE
    # Grad mode off, and autocast on.
    logits = fresh()
    with torch.no_grad():
        assert "grad mode" in why_not_fused(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in why_not_fused(logits, target)
    # [B, P, V] (cross_entropy reads dim 1 as the classes): not the head's layout.
    assert why_not_fused(fresh().reshape(2, 3, 11), target.reshape(2, 3)) is not None


def test_other_ops_see_a_plain_tensor_and_reshape_keeps_the_head():
    hidden, weight, bias = make_head(6, 8, 11, torch.float64)
    h = hidden.requires_grad_()
    logits = attach_head(F.linear(h, weight, bias), h, weight, bias).reshape(2, 3, 11)
    assert type(logits) is HeadLogits
    assert type(logits.reshape(-1, 11)) is HeadLogits
    assert type(logits + 1) is torch.Tensor
    assert type(logits.argmax(-1)) is torch.Tensor
    assert type(logits[:, 0]) is torch.Tensor
    assert type(logits.reshape(-1)) is torch.Tensor  # vocab no longer last: the head is dropped
    assert repr(logits) == repr(logits.plain()) and repr(logits).startswith("tensor(")
    assert logits.requires_grad and logits.grad_fn is not None
    # Gradients through a non-loss use still reach the head's inputs (autograd's own path).
    logits.sum().backward()
    torch.testing.assert_close(h.grad, weight.sum(0).expand(6, 8))


def book_batch(V, B=6, L=20, P=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, L), generator=g)
    segments = (torch.arange(L) >= L // 2).long().expand(B, L)
    valid_lens = torch.randint(3, L + 1, (B,), generator=g).float()
    pred_positions = torch.randint(0, 3, (B, P), generator=g)
    weights = (torch.rand(B, P, generator=g) > 0.3).float()
    labels = torch.randint(0, V, (B, P), generator=g)
    nsp = torch.randint(0, 2, (B,), generator=g)
    return tokens, segments, valid_lens, pred_positions, weights, labels, nsp


def assert_grads_close(got, ref):
    """Parameter gradients equal up to fp32 rounding (atol scaled by each one's size)."""
    assert got.keys() == ref.keys()
    for name in ref:
        scale = max(1.0, ref[name].abs().max().item())
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6 * scale,
                                   msg=name)


def small_book_model(V):
    torch.manual_seed(0)
    return fastbert.BERTModel(V, 32, [32], 32, 64, 2, 2, 0.0, max_len=32, key_size=32,
                              query_size=32, value_size=32, hid_in_features=32,
                              mlm_in_features=32, nsp_in_features=32)


def book_step(net, V, batch):
    """The book's _get_batch_loss_bert (d2l 0.17) and backward; the MLM logits' type."""
    tokens, segments, valid_lens, pred_positions, weights, labels, nsp = batch
    loss = nn.CrossEntropyLoss()
    _, mlm_Y_hat, nsp_Y_hat = net(tokens, segments, valid_lens.reshape(-1), pred_positions)
    mlm_l = loss(mlm_Y_hat.reshape(-1, V), labels.reshape(-1)) * weights.reshape(-1, 1)
    mlm_l = mlm_l.sum() / (weights.sum() + 1e-8)
    l = mlm_l + loss(nsp_Y_hat, nsp)
    nodes = graph_nodes(l.grad_fn)
    l.backward()
    return type(mlm_Y_hat), l.detach(), nodes, {
        n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def graph_nodes(node):
    """Names of every autograd node behind ``node``."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        todo.extend(f for f, _ in n.next_functions)
    return {type(n).__name__ for n in seen}


def test_book_pretraining_loss_on_fastbert_model(monkeypatch):
    """The book's loop, unchanged, on fastbert's BERTModel (cpp backend, fp32): the logits
    carry the head and the book's loss runs fused; the same model with the head not attached
    (PyTorch's loss on plain logits) gives the same loss and gradients up to fp32 rounding;
    the reference backend's logits are plain."""
    require_extension("linear")
    V = 150
    net, batch = small_book_model(V), book_batch(V)
    with fastbert.use_backend("cpp"):
        kind, loss, nodes, grads = book_step(net, V, batch)
        net.zero_grad(set_to_none=True)
        with monkeypatch.context() as m:
            m.setattr(head_logits, "attach_head", lambda logits, *head: logits)
            plain_kind, plain_loss, plain_nodes, plain_grads = book_step(net, V, batch)
    net.zero_grad(set_to_none=True)
    with fastbert.use_backend("reference"):
        ref_kind, ref_loss, _, _ = book_step(net, V, batch)
    assert kind is HeadLogits and plain_kind is torch.Tensor and ref_kind is torch.Tensor
    assert FUSED_NODE in nodes and FUSED_NODE not in plain_nodes
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, plain_grads)


def test_pooled_logits_buffer_is_reused_only_when_free(monkeypatch):
    """Large training logits go into a buffer the head keeps (head_logits.POOL_BYTES; 0 here
    so a small head uses it): the values are F.linear's, a free buffer is reused, a held one
    is never overwritten, and gradients through another use of the logits are F.linear's."""
    monkeypatch.setattr(head_logits, "POOL_BYTES", 0)
    owner = nn.Module()
    hidden, weight, bias = (t.float() for t in make_head(12, 8, 40, torch.float32))
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    first = head_logits.head_logits(owner, h.reshape(3, 4, 8), w, b)
    assert type(first) is HeadLogits and first.shape == (3, 4, 40)
    torch.testing.assert_close(first, F.linear(hidden, weight, bias).reshape(3, 4, 40))
    kept, ptr = first.detach().clone(), first.data_ptr()
    # Held: the next logits go elsewhere and the held ones keep their values.
    second = head_logits.head_logits(owner, (h * 2).reshape(3, 4, 8), w, b)
    assert second.data_ptr() != ptr
    torch.testing.assert_close(first.detach(), kept)
    # Freed: the buffer (now the second one's) is reused.
    ptr2 = second.data_ptr()
    del first, second
    third = head_logits.head_logits(owner, h.reshape(3, 4, 8), w, b)
    assert third.data_ptr() == ptr2
    torch.testing.assert_close(third, F.linear(hidden, weight, bias).reshape(3, 4, 40))
    # Another use of the logits: autograd through the pooled Linear, against F.linear's.
    (third * torch.arange(40.0)).sum().backward()
    h0, w0, b0 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    (F.linear(h0, w0, b0) * torch.arange(40.0)).sum().backward()
    for got, ref in ((h.grad, h0.grad), (w.grad, w0.grad), (b.grad, b0.grad)):
        torch.testing.assert_close(got, ref)
    # Grad off (inference): never pooled.
    with torch.no_grad():
        assert type(head_logits.head_logits(owner, h, w, b)) is torch.Tensor


def test_book_loss_with_pooled_logits_matches_unpooled(monkeypatch):
    require_extension("linear")
    V = 150
    net, batch = small_book_model(V), book_batch(V)
    with fastbert.use_backend("cpp"):
        _, loss, _, grads = book_step(net, V, batch)
        monkeypatch.setattr(head_logits, "POOL_BYTES", 0)
        for _ in range(2):  # the second step reuses the buffer
            net.zero_grad(set_to_none=True)
            kind, pooled_loss, nodes, pooled_grads = book_step(net, V, batch)
    assert kind is HeadLogits and FUSED_NODE in nodes
    torch.testing.assert_close(pooled_loss, loss)
    assert_grads_close(pooled_grads, grads)
