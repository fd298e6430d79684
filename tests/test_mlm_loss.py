"""The fused MLM head loss (fastbert.ops.mlm_loss) on every fast backend against the
reference (unfused, real slots only), and fastbert.losses.bert_pretrain_loss against the
book's _get_batch_loss_bert."""
from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbert
from fastbert import backends, ops
from fastbert.losses import bert_pretrain_loss
from op_testing import (ATOL, FAST_BACKENDS, assert_close, device_for, dtypes_for, on_backend,
                        ran_on, require)

GLUE = {"cpp": "fastbert.backends.cpp.mlm_loss", "triton": "fastbert.backends.triton.mlm_loss"}
DEVICE_OP = "mlm_loss"  # the ``device`` fixture's op (conftest.py)

# id: (B, L, C, C', V, P, vocab chunk, kind)
CASES = {
    "ragged_last_chunk": (3, 9, 16, 12, 100, 5, 32, "random"),
    "repeated_positions": (2, 6, 16, 16, 70, 6, 32, "repeat"),
    "all_padding_rows": (4, 7, 8, 24, 50, 3, 16, "padding_rows"),
    "P1": (5, 4, 16, 16, 40, 1, 16, "random"),
    "chunk_wider_than_vocab": (2, 5, 16, 8, 20, 4, 32, "random"),
    "fractional_weights": (3, 8, 16, 16, 33, 4, 16, "weighted"),
    "no_real_slot": (2, 5, 8, 8, 20, 3, 16, "empty"),
    # 133 real slots: the cpp kernel's 64-slot blocks with an odd last block (bf16 pads it),
    # an odd hidden size (bf16 pads K) and a 5-column last vocab piece.
    "slot_blocks_odd_hidden": (40, 8, 16, 13, 101, 5, 32, "random"),
}
BACKEND_DTYPES = [(b, d) for b in FAST_BACKENDS for d in dtypes_for(b)]


def make_inputs(B, L, C, Cp, V, P, kind="random", seed=0):
    """(X, positions, weights, labels, [w1, b1, ln_weight, ln_bias, w2, b2]) in float64."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    positions = torch.randint(0, L, (B, P), generator=g)
    weights = (torch.rand(B, P, generator=g) < 0.7).float()
    weights[0, 0] = 1.0
    if kind == "repeat":  # every slot of row 0 reads one token; row 1 alternates two
        positions[0] = positions[0, 0]
        positions[1, ::2] = L - 1
        weights[:2] = 1.0
    elif kind == "padding_rows":
        weights[1] = 0.0
        weights[3] = 0.0
    elif kind == "weighted":
        weights = weights * (0.25 + 2 * torch.rand(B, P, generator=g))
    elif kind == "empty":
        weights.zero_()
    labels = torch.randint(0, V, (B, P), generator=g)
    labels[weights == 0] = 0  # the book pads labels with 0
    params = [torch.randn(Cp, C, generator=g, dtype=torch.float64) / math.sqrt(C),
              0.1 * torch.randn(Cp, generator=g, dtype=torch.float64),
              1 + 0.1 * torch.randn(Cp, generator=g, dtype=torch.float64),
              0.1 * torch.randn(Cp, generator=g, dtype=torch.float64),
              2 * torch.randn(V, Cp, generator=g, dtype=torch.float64) / math.sqrt(Cp),
              0.5 * torch.randn(V, generator=g, dtype=torch.float64)]
    return X, positions, weights, labels, params


@contextlib.contextmanager
def vocab_chunk(backend: str, chunk: int):
    glue = importlib.import_module(GLUE[backend])
    old, glue.VOCAB_CHUNK = glue.VOCAB_CHUNK, chunk
    try:
        yield
    finally:
        glue.VOCAB_CHUNK = old


@pytest.fixture
def nan_filled_empty():
    """Every torch.empty (in Python and in C++) comes back NaN-filled: an output element a
    kernel forgets to write shows up as NaN."""
    det, warn = (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def run(inputs, dtype, device, grad=True):
    """ops.mlm_loss on the current backend: (loss, [dX, dw1, db1, dln_w, dln_b, dw2, db2])."""
    X, positions, weights, labels, params = inputs
    X = X.detach().to(device, dtype).requires_grad_(grad)
    params = [p.detach().to(device, dtype).requires_grad_(grad) for p in params]
    loss = ops.mlm_loss(X, positions.to(device), weights.to(device), labels.to(device), *params)
    if not grad:
        return loss, None
    return loss, list(torch.autograd.grad(loss, [X] + params, allow_unused=False))


def reference(inputs, dtype, device):
    with fastbert.use_backend("reference"):
        return run(inputs, dtype, device)


GRAD_NAMES = ("dX", "dw1", "db1", "dln_weight", "dln_bias", "dw2", "db2")


def grad_factor(name: str, dtype: torch.dtype) -> float:
    """The tolerance factor per gradient: 2, except bf16 dln_weight, 2.5.  Measured (cpp,
    AVX2 EPYC, test_scaled_grad_loss's inputs over 16 seeds): dln_weight's max error is
    0.96x PyTorch's bf16 error at the median and up to 2.08x (2 seeds of 16; seed 0: 0.0141
    vs 0.0064).  dln_weight is one sum over the slots of dHn * xhat, rounded once to bf16: at
    |1.46| a bf16 step is 0.0078, so those are the kernel 2 steps off where PyTorch is 1.
    Not the kernel's code: the OpenMP rework of 85a89de gives bitwise the same outputs as the
    code before it; and not the oneDNN GEMM fallback (mlm_loss has its own tiles).  It is how
    the tiles run on this CPU: without oneDNN's bf16 brgemm (AVX2), bf16 tiles compute in
    fp32, so dHn rounds differently from PyTorch's bf16 logits.  Every other gradient stays
    within 1.8x there."""
    return 2.5 if (name == "dln_weight" and dtype == torch.bfloat16) else 2.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_matches_reference(backend, dtype, case, nan_filled_empty):
    B, L, C, Cp, V, P, chunk, kind = CASES[case]
    device = device_for(backend)
    inputs = make_inputs(B, L, C, Cp, V, P, kind)
    loss64, grads64 = reference(inputs, torch.float64, device)
    loss_lp, grads_lp = reference(inputs, dtype, device)
    with on_backend(backend, "mlm_loss", device, dtype), vocab_chunk(backend, chunk):
        loss, grads = run(inputs, dtype, device)
    assert loss.dtype == torch.float32 and loss.shape == ()
    # The loss is float32 but computed from `dtype` inputs: that dtype's atol applies.
    assert_close(loss, loss64, loss_lp, atol=ATOL[dtype], name="loss")
    for name, g, g64, g_lp in zip(GRAD_NAMES, grads, grads64, grads_lp):
        assert g.dtype == dtype
        assert_close(g, g64, g_lp, factor=grad_factor(name, dtype), name=name)
    if kind == "empty":
        assert loss.item() == 0.0 and all(not g.any() for g in grads)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_scaled_grad_loss(backend, dtype):
    """The backward scales by d loss (here -2.5, as a loss weight would), not assumes 1."""
    device = device_for(backend)
    inputs = make_inputs(*CASES["slot_blocks_odd_hidden"][:6], kind="weighted")

    def scaled(dt):
        X, positions, weights, labels, params = inputs
        X = X.to(device, dt).requires_grad_()
        params = [p.to(device, dt).requires_grad_() for p in params]
        loss = ops.mlm_loss(X, positions.to(device), weights.to(device), labels.to(device),
                            *params)
        return list(torch.autograd.grad(-2.5 * loss, [X] + params))

    with fastbert.use_backend("reference"):
        grads64, grads_lp = scaled(torch.float64), scaled(dtype)
    with on_backend(backend, "mlm_loss", device, dtype), vocab_chunk(backend, 32):
        grads = scaled(dtype)
    for name, g, g64, g_lp in zip(GRAD_NAMES, grads, grads64, grads_lp):
        assert_close(g, g64, g_lp, factor=grad_factor(name, dtype), name=name)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_no_grad_forward(backend, dtype):
    """Without autograd (torch.no_grad, or no input requiring grad) the op is the forward
    alone, with the same loss."""
    device = device_for(backend)
    inputs = make_inputs(*CASES["slot_blocks_odd_hidden"][:6])
    loss64, _ = reference(inputs, torch.float64, device)
    loss_lp, _ = reference(inputs, dtype, device)
    X, positions, weights, labels, params = inputs
    args = (X.detach().to(device, dtype).requires_grad_(), positions.to(device),
            weights.to(device), labels.to(device),
            *[p.detach().to(device, dtype).requires_grad_() for p in params])
    with on_backend(backend, "mlm_loss", device, dtype), vocab_chunk(backend, 32):
        with_grad, _ = run(inputs, dtype, device)
        plain, _ = run(inputs, dtype, device, grad=False)
        with torch.no_grad():
            no_grad = ops.mlm_loss(*args)
    assert not plain.requires_grad and not no_grad.requires_grad
    assert torch.equal(plain, with_grad.detach()) and torch.equal(no_grad, plain)
    assert_close(plain, loss64, loss_lp, atol=ATOL[dtype], name="loss")


@pytest.mark.parametrize("two_ops", (False, True), ids=("fwd_bwd_op", "fwd_then_bwd_op"))
@pytest.mark.parametrize("chunk", (1, 2, 7, 64, 4096))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cpp_tile_edges(dtype, chunk, two_ops):
    """The cpp kernel's tiles: one-column pieces (bf16 rounds pieces up to even), odd
    pieces, one piece per slot block, one piece wider than the vocab; 133 slots in 64-slot
    blocks / one 256-slot slab.  Both training paths: the loss with its gradients in one op
    (what ops.mlm_loss runs) and the forward op then its backward op (with d lse = 0)."""
    require("cpp", "mlm_loss", torch.device("cpu"), dtype)
    inputs = make_inputs(*CASES["slot_blocks_odd_hidden"][:6], kind="weighted", seed=3)
    loss64, grads64 = reference(inputs, torch.float64, torch.device("cpu"))
    loss_lp, grads_lp = reference(inputs, dtype, torch.device("cpu"))
    if two_ops:
        X, positions, weights, labels, params = inputs
        X = X.detach().to(dtype).requires_grad_()
        params = [p.detach().to(dtype).requires_grad_() for p in params]
        loss = torch.ops.fastbert.mlm_loss(X, positions, weights, labels, *params, 1e-5,
                                           chunk)[0]
        grads = torch.autograd.grad(loss, [X] + params)
    else:
        with on_backend("cpp", "mlm_loss", torch.device("cpu"), dtype), \
                vocab_chunk("cpp", chunk):
            loss, grads = run(inputs, dtype, torch.device("cpu"))
    assert_close(loss, loss64, loss_lp, atol=ATOL[dtype], name="loss")
    for name, g, g64, g_lp in zip(GRAD_NAMES, grads, grads64, grads_lp):
        assert_close(g, g64, g_lp, factor=grad_factor(name, dtype), name=name)


def test_reference_is_the_mean_over_real_slots():
    """The reference itself against a direct formula on the full head (all slots built)."""
    X, positions, weights, labels, params = make_inputs(3, 9, 16, 12, 100, 5, "weighted")
    w1, b1, ln_w, ln_b, w2, b2 = params
    H = X[torch.arange(3)[:, None], positions]
    logits = F.linear(F.layer_norm(F.relu(F.linear(H, w1, b1)), (12,), ln_w, ln_b), w2, b2)
    ce = F.cross_entropy(logits.reshape(-1, 100), labels.reshape(-1), reduction="none")
    expected = (ce * weights.reshape(-1).double()).sum() / weights.double().sum()
    with fastbert.use_backend("reference"):
        got = ops.mlm_loss(X, positions, weights, labels, *params)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_padding_slots_take_no_part():
    """Changing what a padding slot points at or its label changes nothing."""
    X, positions, weights, labels, params = make_inputs(3, 9, 16, 12, 100, 5)
    pad = weights == 0
    assert pad.any()
    with fastbert.use_backend("reference"):
        a = ops.mlm_loss(X, positions, weights, labels, *params)
        b = ops.mlm_loss(X, torch.where(pad, 8, positions), weights,
                         torch.where(pad, 99, labels), *params)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck_float64(backend):
    """The kernels themselves in float64, both outputs (loss and the per-slot lse)."""
    if backend == "triton":
        pytest.skip("the Triton kernels take fp32/bf16/fp16 (tl.dot has no float64 path); "
                    "they are checked against the float64 reference above")
    require(backend, "mlm_loss", torch.device("cpu"), torch.float32)
    X, positions, weights, labels, params = make_inputs(2, 5, 4, 3, 11, 3, "repeat")
    X.requires_grad_()
    params = [p.requires_grad_() for p in params]

    def f(X, *p):
        return torch.ops.fastbert.mlm_loss(X, positions, weights.double(), labels, *p, 1e-5, 4)

    assert torch.autograd.gradcheck(lambda *a: f(*a)[0], (X, *params))
    assert torch.autograd.gradcheck(lambda *a: f(*a)[1], (X, *params))


def test_cpp_fwd_bwd_op():
    """The cpp op that returns the loss with its gradients for d loss = 1 (what ops.mlm_loss
    runs when gradients are needed): opcheck, float64 gradcheck through its autograd (which
    scales the saved grads), the same loss as the forward op, and the dispatch itself."""
    require("cpp", "mlm_loss", torch.device("cpu"), torch.float32)
    op = torch.ops.fastbert.mlm_loss_fwd_bwd.default
    X, positions, weights, labels, params = _opcheck_args()
    torch.library.opcheck(op, (X, positions, weights, labels, *params, 1e-5, 16))
    fused = op(X, positions, weights, labels, *params, 1e-5, 16)
    plain = torch.ops.fastbert.mlm_loss(X, positions, weights, labels, *params, 1e-5, 16)[0]
    assert torch.equal(fused[0].detach(), plain.detach())
    assert not any(g.requires_grad for g in fused[1:])

    X, positions, weights, labels, params = make_inputs(2, 5, 4, 3, 11, 3, "repeat")
    X.requires_grad_()
    params = [p.requires_grad_() for p in params]
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.fastbert.mlm_loss_fwd_bwd(a[0], positions,
                                                       weights.double(), labels, *a[1:],
                                                       1e-5, 4)[0], (X, *params))
    X, params = X.detach().float().requires_grad_(), [p.detach().float() for p in params]
    with on_backend("cpp", "mlm_loss", torch.device("cpu"), torch.float32):
        loss = ops.mlm_loss(X, positions, weights, labels, *params)
        assert "fwd_bwd" in loss.grad_fn.name()
        with torch.no_grad():
            assert ops.mlm_loss(X, positions, weights, labels, *params).grad_fn is None


def _opcheck_args(dtype=torch.float32):
    X, positions, weights, labels, params = make_inputs(3, 6, 16, 16, 40, 4, "repeat")
    X = X.to(dtype).requires_grad_()
    params = [p.to(dtype).requires_grad_() for p in params]
    return X, positions, weights.float(), labels, params


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    require(backend, "mlm_loss", device, torch.float32)
    X, positions, weights, labels, params = _opcheck_args()
    X, params = X.to(device), [p.to(device) for p in params]
    positions, weights, labels = positions.to(device), weights.to(device), labels.to(device)
    if backend == "cpp":
        fwd, bwd = torch.ops.fastbert.mlm_loss.default, torch.ops.fastbert.mlm_loss_backward.default
        extra = (1e-5, 16)
    else:
        glue = importlib.import_module(GLUE[backend])
        fwd, bwd = glue.mlm_loss_op._opoverload, glue.mlm_loss_backward_op._opoverload
        extra = (1e-5, 16)
    torch.library.opcheck(fwd, (X, positions, weights, labels, *params, *extra))
    loss, lse = fwd(X, positions, weights, labels, *params, *extra)
    with torch.no_grad():
        bwd_args = (torch.ones_like(loss), torch.randn_like(lse), X.detach(), positions,
                    weights, labels, *[p.detach() for p in params], *extra, lse.detach())
    torch.library.opcheck(bwd, bwd_args)
    # The lse output's gradient is honoured too (d lse / d logits = softmax).
    torch.library.opcheck(bwd, bwd_args[:1] + (None,) + bwd_args[2:])


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_compile_fullgraph(backend, device):
    block = (fastbert.use_backend(backend) if backend == "reference" else
             ran_on(backend, device, torch.float32, ("mlm_loss",)))
    inputs = make_inputs(3, 9, 16, 12, 100, 5)
    torch._dynamo.reset()
    X, positions, weights, labels, params = inputs
    positions, weights, labels = positions.to(device), weights.to(device), labels.to(device)
    X = X.to(device, torch.float32).requires_grad_()
    params = [p.to(device, torch.float32).requires_grad_() for p in params]
    compiled = torch.compile(ops.mlm_loss, fullgraph=True, backend="aot_eager")
    with block:
        eager_loss = ops.mlm_loss(X, positions, weights, labels, *params)
        eager_grads = torch.autograd.grad(eager_loss, [X] + params)
        loss = compiled(X, positions, weights, labels, *params)
        grads = torch.autograd.grad(loss, [X] + params)  # through the compiled backward
    assert loss.device.type == device.type
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_autocast_casts_to_the_autocast_dtype(backend, device):
    block = (fastbert.use_backend(backend) if backend == "reference" else
             ran_on(backend, device, torch.bfloat16, ("mlm_loss",)))
    X, positions, weights, labels, params = make_inputs(3, 9, 16, 12, 100, 5)
    positions, weights, labels = positions.to(device), weights.to(device), labels.to(device)
    X = X.to(device, torch.float32).requires_grad_()
    params = [p.to(device, torch.float32).requires_grad_() for p in params]
    with block:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = ops.mlm_loss(X, positions, weights, labels, *params)
        grads = torch.autograd.grad(loss, [X] + params)
        explicit = ops.mlm_loss(X.bfloat16(), positions, weights, labels,
                                *[p.bfloat16() for p in params])
    assert loss.dtype == torch.float32 and loss.device.type == device.type
    assert torch.equal(loss, explicit)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _bad(mutate):
    X, positions, weights, labels, params = make_inputs(2, 5, 8, 8, 20, 3)
    args = dict(X=X.float(), pred_positions=positions, mlm_weights=weights, labels=labels,
                w1=params[0].float(), b1=params[1].float(), ln_weight=params[2].float(),
                ln_bias=params[3].float(), w2=params[4].float(), b2=params[5].float())
    mutate(args)
    return args


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(X=a["X"][0]), ValueError, "X must have 3 dimensions"),
    (lambda a: a.update(pred_positions=a["pred_positions"].float()), TypeError, "pred_positions"),
    (lambda a: a.update(pred_positions=a["pred_positions"][:1]), ValueError, "pred_positions"),
    (lambda a: a["pred_positions"].__setitem__((0, 0), 5), ValueError, r"\[0, 4\]"),
    (lambda a: a.update(labels=a["labels"][:1]), ValueError, "labels must have shape"),
    (lambda a: a["labels"].__setitem__((0, 0), 20), ValueError, "labels of real slots"),
    (lambda a: a["mlm_weights"].__setitem__((0, 0), -1.0), ValueError, ">= 0"),
    (lambda a: a.update(mlm_weights=a["mlm_weights"].long()), TypeError, "mlm_weights"),
    (lambda a: a.update(w2=a["w2"].double()), TypeError, "w2 has dtype"),
    (lambda a: a.update(w1=a["w1"][:, :4]), ValueError, "shapes do not agree"),
    (lambda a: a.update(b2=a["b2"][:5]), ValueError, "shapes do not agree"),
])
def test_bad_input_is_a_clear_error(mutate, error, match):
    with pytest.raises(error, match=match):
        ops.mlm_loss(**_bad(mutate))


def test_padding_labels_may_be_anything():
    args = _bad(lambda a: None)
    args["labels"][args["mlm_weights"] == 0] = -100
    ops.mlm_loss(**args)  # no error: padding labels are ignored


# ----------------------------------------------------------------------------- the loss
V_SMALL = 60


def small_bert(dropout=0.0, **options):
    torch.manual_seed(1)
    return fastbert.BERTModel(V_SMALL, 32, [32], 32, 64, 2, 2, dropout, max_len=12,
                              key_size=32, query_size=32, value_size=32, hid_in_features=32,
                              mlm_in_features=32, nsp_in_features=32, **options)


def pretrain_batch(B=6, L=12, P=3, seed=0):
    """A batch shaped like d2l's _WikiTextDataset output (float valid lens, float weights,
    labels 0 at padding slots, some rows with only padding slots)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V_SMALL, (B, L), generator=g)
    segments = torch.randint(0, 2, (B, L), generator=g)
    valid_lens = torch.randint(2, L + 1, (B,), generator=g).float()
    valid_lens[0] = L
    # Masked positions lie inside each sequence, after <cls>.
    positions = 1 + (torch.rand(B, P, generator=g) * (valid_lens[:, None] - 1)).long()
    weights = (torch.rand(B, P, generator=g) < 0.7).float()
    weights[0] = 1.0
    weights[1] = 0.0
    labels = torch.randint(0, V_SMALL, (B, P), generator=g) * weights.long()
    positions = positions * weights.long()  # d2l pads positions with 0
    nsp = torch.randint(0, 2, (B,), generator=g)
    return tokens, segments, valid_lens, positions, weights, labels, nsp


def d2l_get_batch_loss_bert(net, loss, vocab_size, tokens_X, segments_X, valid_lens_x,
                            pred_positions_X, mlm_weights_X, mlm_Y, nsp_y):
    """d2l 0.17.6 ``_get_batch_loss_bert`` (d2l/torch.py), transcribed verbatim."""
    # Forward pass
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X,
                                  valid_lens_x.reshape(-1),
                                  pred_positions_X)
    # Compute masked language model loss
    mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1)) *\
        mlm_weights_X.reshape(-1, 1)
    mlm_l = mlm_l.sum() / (mlm_weights_X.sum() + 1e-8)
    # Compute next sentence prediction loss
    nsp_l = loss(nsp_Y_hat, nsp_y)
    l = mlm_l + nsp_l
    return mlm_l, nsp_l, l


# The ops the book-compatible loss runs on a fast backend: the unpadded model, and the full
# MaskLM head (no fused mlm_loss: the book's formula needs every slot's logits).
BOOK_PATH_OPS = ("pack", "unpack", "embedding_sum", "varlen_attention", "add_layernorm", "ffn")


@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_book_compatible_is_the_books_formula(backend, device):
    net, batch = small_bert().to(device), [t.to(device) for t in pretrain_batch()]
    block = (fastbert.use_backend("reference") if backend == "reference"
             else ran_on(backend, device, torch.float32, BOOK_PATH_OPS))
    with block as log:
        ours = bert_pretrain_loss(net, V_SMALL, *batch, book_compatible=True)
        book = d2l_get_batch_loss_bert(net, nn.CrossEntropyLoss(), V_SMALL, *batch)
    if backend != "reference":
        ran = {op for op, _ in log}
        assert "mlm_loss" not in ran and "varlen_attention" in ran, ran
    for a, b in zip(ours, book):
        assert a.device.type == device.type and torch.equal(a, b)
    # The book's MLM loss is the plain mean over all slots, padding included.
    with (fastbert.use_backend(backend) if backend == "reference"
          else ran_on(backend, device, torch.float32, BOOK_PATH_OPS)):
        _, mlm_Y_hat, _ = net(*batch[:3], batch[3])
    plain = F.cross_entropy(mlm_Y_hat.reshape(-1, V_SMALL), batch[5].reshape(-1))
    torch.testing.assert_close(ours[0], plain)


def test_book_compatible_matches_real_d2l():
    """With d2l's own BERTModel and d2l's own _get_batch_loss_bert."""
    from d2l_loader import load_d2l
    d2l = load_d2l("0.17.6")
    torch.manual_seed(1)
    net = d2l.BERTModel(V_SMALL, 32, [32], 32, 64, 2, 2, 0.0, max_len=12, key_size=32,
                        query_size=32, value_size=32, hid_in_features=32, mlm_in_features=32,
                        nsp_in_features=32)
    batch = pretrain_batch()
    ours = bert_pretrain_loss(net, V_SMALL, *batch, book_compatible=True)
    book = d2l._get_batch_loss_bert(net, nn.CrossEntropyLoss(), V_SMALL, *batch)
    for a, b in zip(ours, book):
        assert torch.equal(a, b)
    # The default mode takes d2l's model too (its MaskLM has the same parameter layout).
    mlm_l, nsp_l, l = bert_pretrain_loss(net, V_SMALL, *batch)
    assert torch.equal(nsp_l, book[1]) and mlm_l > 0


def unfused_real_slot_loss(net, batch):
    tokens, segments, valid_lens, positions, weights, labels, nsp = batch
    _, mlm_Y_hat, nsp_Y_hat = net(tokens, segments, valid_lens, positions)
    ce = F.cross_entropy(mlm_Y_hat.reshape(-1, V_SMALL), labels.reshape(-1), reduction="none")
    w = weights.reshape(-1).to(ce.dtype)
    mlm_l = (ce * w).sum() / w.sum()
    nsp_l = F.cross_entropy(nsp_Y_hat, nsp)
    return mlm_l, nsp_l, mlm_l + nsp_l


@pytest.mark.parametrize("unpadded", (False, True))
@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_default_loss_is_the_real_slot_mean(backend, unpadded, device):
    """bert_pretrain_loss (fused head) vs the unfused formula on the full MaskLM output,
    losses and every parameter's gradient, with the padded and the unpadded encoder (the
    backend under test on its device; the references on the CPU)."""
    batch = pretrain_batch()

    def losses_and_grads(net, fn):
        out = fn(net)
        params = list(net.parameters())
        grads = torch.autograd.grad(out[2], params, allow_unused=True)
        # The positional embedding never trains in d2l 0.17 (no gradient): zeros.
        return out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    net64 = small_bert(unpadded=unpadded).double()
    with fastbert.use_backend("reference"):
        ref64 = losses_and_grads(net64, lambda n: unfused_real_slot_loss(n, batch))
        ref32 = losses_and_grads(small_bert(unpadded=unpadded),
                                 lambda n: unfused_real_slot_loss(n, batch))
    on_device = [t.to(device) for t in batch]
    with (fastbert.use_backend("reference") if backend == "reference" else
          ran_on(backend, device, torch.float32, ("mlm_loss",))):
        ours = losses_and_grads(small_bert(unpadded=unpadded).to(device),
                                lambda n: bert_pretrain_loss(n, V_SMALL, *on_device))
    assert ours[0][0].device.type == device.type
    ours = ([t.cpu() for t in ours[0]], [t.cpu() for t in ours[1]])
    # Factor 2 (the house rule) holds: measured on cpp (AVX2 EPYC), every loss and gradient
    # error is within the fp32 atol (1e-6), both encoder paths.
    for a, b, c in zip(ours[0], ref64[0], ref32[0]):
        assert a.dtype == torch.float32
        assert_close(a, b, c, name="loss")
    names = [n for n, _ in small_bert().named_parameters()]
    for name, a, b, c in zip(names, ours[1], ref64[1], ref32[1]):
        assert_close(a, b, c, name=name)


def test_default_and_book_differ_by_the_padding():
    net, batch = small_bert(), pretrain_batch()
    with fastbert.use_backend("reference"):
        fused = bert_pretrain_loss(net, V_SMALL, *batch)[0]
        book = bert_pretrain_loss(net, V_SMALL, *batch, book_compatible=True)[0]
        real = unfused_real_slot_loss(net, batch)[0]
    torch.testing.assert_close(fused, real)
    assert not torch.allclose(fused, book)


def test_bert_pretrain_loss_rejects_a_foreign_head():
    net, batch = small_bert(), pretrain_batch()
    net.mlm.mlp = nn.Sequential(nn.Linear(32, V_SMALL))
    with pytest.raises(TypeError, match="MaskLM"):
        bert_pretrain_loss(net, V_SMALL, *batch)
    with pytest.raises(ValueError, match="vocab_size"):
        bert_pretrain_loss(small_bert(), V_SMALL + 1, *batch)


# ----------------------------------------------------------------------------- cpp threading
@pytest.mark.parametrize("two_ops", (False, True), ids=("fused_fwd_bwd", "fwd_then_bwd_op"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cpp_more_threads_than_cores(dtype, two_ops):
    """8 threads (more than this machine's cores), more vocab pieces than threads and more
    real slots than one 256-slot slab: the fused op's one-slab-per-thread dH buffers and their
    reduction, and the separate backward's capped buffers, against the float64 reference."""
    require("cpp", "mlm_loss", torch.device("cpu"), dtype)
    inputs = make_inputs(90, 8, 16, 13, 301, 5, kind="weighted", seed=5)
    assert int((inputs[2] > 0).sum()) > 256
    loss64, grads64 = reference(inputs, torch.float64, torch.device("cpu"))
    loss_lp, grads_lp = reference(inputs, dtype, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        if two_ops:
            X, positions, weights, labels, params = inputs
            X = X.detach().to(dtype).requires_grad_()
            params = [p.detach().to(dtype).requires_grad_() for p in params]
            loss = torch.ops.fastbert.mlm_loss(X, positions, weights, labels, *params, 1e-5,
                                               16)[0]
            grads = torch.autograd.grad(loss, [X] + params)
        else:
            with on_backend("cpp", "mlm_loss", torch.device("cpu"), dtype), \
                    vocab_chunk("cpp", 16):
                loss, grads = run(inputs, dtype, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert_close(loss, loss64, loss_lp, atol=ATOL[dtype], name="loss")
    for name, g, g64, g_lp in zip(GRAD_NAMES, grads, grads64, grads_lp):
        assert_close(g, g64, g_lp, factor=grad_factor(name, dtype), name=name)


THROW_IN_REGION = r"""
import torch
import fastbert
from fastbert import ops
torch.manual_seed(0)
torch.set_num_threads(4)
X = torch.randn(20, 8, 16, requires_grad=True)
positions = torch.randint(0, 8, (20, 5))
weights = torch.ones(20, 5)
labels = torch.randint(0, 101, (20, 5))
params = [torch.randn(16, 16, requires_grad=True), torch.zeros(16, requires_grad=True),
          torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True),
          torch.randn(101, 16, requires_grad=True), torch.zeros(101, requires_grad=True)]
with fastbert.use_backend("cpp"), fastbert.backends.dispatch_log() as log:
    try:
        ops.mlm_loss(X, positions, weights, labels, *params)
    except RuntimeError as exc:
        assert "failure injected in thread" in str(exc), exc
        print("raised", log)
    else:
        raise SystemExit("no error")
"""


def test_cpp_exception_inside_the_parallel_region_is_a_python_error():
    """An exception thrown by one thread inside the fused op's OpenMP region (the test hook
    FASTBERT_TEST_MLM_LOSS_THROW_IN_REGION makes the last thread throw between two barriers)
    comes back as a RuntimeError: no abort, no deadlock.  In a subprocess, so that a crash
    fails this test instead of killing pytest."""
    require("cpp", "mlm_loss", torch.device("cpu"), torch.float32)
    import os
    import subprocess
    import sys
    env = {**os.environ, "FASTBERT_TEST_MLM_LOSS_THROW_IN_REGION": "1"}
    out = subprocess.run([sys.executable, "-c", THROW_IN_REGION], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert "raised [('mlm_loss', 'cpp')]" in out.stdout, out.stdout
