"""fastbert/inference_plan.py: the unpadded encoder's forward without autograd in few calls
(batch-1 latency).  Its outputs equal the module path's (plan off) and the reference
backend's, for forward, forward_rows and BERTClassifier, batch 1 and several, lengths 1, odd
and max_len, valid_lens None / 0 / 1 / full; it runs where it should (RUNS counts) and not
where the module path must (grad on, hooks, keep_attention_weights, the reference backend,
training dropout, too many tokens); its cached weights follow load_state_dict and in-place
updates; why_not says why."""
import pytest
import torch
from torch import nn

import fastbert
from fastbert import inference_plan

pytest.importorskip("fastbert.backends.cpp.varlen_attention")

VOCAB, HIDDEN, FFN, HEADS, MAX_LEN = 40, 64, 96, 4, 16
TOL = dict(atol=2e-5, rtol=2e-5)


def make_bert(layers=2, **options):
    torch.manual_seed(0)
    m = fastbert.BERTModel(VOCAB, HIDDEN, [HIDDEN], HIDDEN, FFN, HEADS, layers, 0.1,
                           max_len=MAX_LEN, key_size=HIDDEN, query_size=HIDDEN,
                           value_size=HIDDEN, hid_in_features=HIDDEN, mlm_in_features=HIDDEN,
                           nsp_in_features=HIDDEN, **options)
    return m.eval()


def make_inputs(B, L, lens, seed=0):
    """Fresh random tokens, segments; ``lens``: None or a list of valid lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, L), generator=g)
    segments = torch.randint(0, 2, (B, L), generator=g)
    return tokens, segments, None if lens is None else torch.tensor(lens)


@pytest.fixture
def plan_runs():
    """A function returning how many times the plan ran since the fixture started."""
    start = inference_plan.RUNS
    return lambda: inference_plan.RUNS - start


def module_path(fn):
    old = inference_plan.ENABLED
    inference_plan.ENABLED = False
    try:
        return fn()
    finally:
        inference_plan.ENABLED = old


def masked(X, lens):
    """Pads zeroed (the unpadded encoder's output) for a comparison with the padded path."""
    if lens is None:
        return X
    keep = torch.arange(X.shape[1])[None, :] < lens[:, None]
    return X * keep[..., None]


CASES = [  # (B, L, valid_lens)
    (1, 1, None), (1, 1, [1]), (1, 7, [7]), (1, 7, None), (1, 9, [5]), (1, MAX_LEN, None),
    (3, 5, [5, 1, 3]), (4, 11, [11, 0, 7, 1]), (2, MAX_LEN, None), (5, 9, [0, 9, 2, 9, 4]),
]
OPTIONS = [{}, {"ffn_activation": "gelu"}, {"embedding_layer_norm": True, "layer_norm_eps": 1e-12}]


@pytest.mark.parametrize("options", OPTIONS, ids=["relu", "gelu", "embedding_norm"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_plan_matches_module_path_and_reference(options, layers, mode, plan_runs):
    bert = make_bert(layers, **options)
    clf = fastbert.BERTClassifier(bert, 3).eval()
    enc = bert.encoder
    guard = torch.no_grad if mode == "no_grad" else torch.inference_mode
    for i, (B, L, lens) in enumerate(CASES):
        tokens, segments, vl = make_inputs(B, L, lens, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        positions = torch.randint(0, L, (B, 3), generator=g)
        positions[:, 0] = 0
        with guard():
            with fastbert.use_backend("cpp"):
                before = plan_runs()
                got = (enc(tokens, segments, vl), enc.forward_rows(tokens, segments, vl, positions),
                       clf((tokens, segments, vl)))
                ran = plan_runs() - before
                mod = module_path(lambda: (enc(tokens, segments, vl),
                                           enc.forward_rows(tokens, segments, vl, positions),
                                           clf((tokens, segments, vl))))
            with fastbert.use_backend("reference"):
                ref_X = masked(enc(tokens, segments, vl), vl)
                ref_cls = clf((tokens, segments, vl))
        # T = 0 (every length 0) is the module path's; every case here has valid tokens.
        assert ran == 3, (B, L, lens)
        for a, b in zip(got, mod):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(got[0], ref_X, **TOL)
        # A sequence of length 0 has no <cls> row: d2l's padded attention gives it uniform
        # weights, the unpadded encoder zeros (module path and plan alike).
        real = slice(None) if vl is None else vl > 0
        torch.testing.assert_close(got[2][real], ref_cls[real], **TOL)
        inside = positions < (torch.full((B,), L) if vl is None else vl)[:, None]
        want_rows = ref_X[torch.arange(B)[:, None], positions] * inside[..., None]
        torch.testing.assert_close(got[1], want_rows, **TOL)


def test_why_not_and_where_the_plan_does_not_run(plan_runs):
    bert = make_bert()
    clf = fastbert.BERTClassifier(bert, 3).eval()
    inputs = make_inputs(1, 9, [9])

    def runs_plan():
        before = plan_runs()
        clf(inputs)
        return plan_runs() > before

    with fastbert.use_backend("cpp"):
        with torch.inference_mode():
            assert inference_plan.why_not(clf, inputs) is None
            assert runs_plan()
        # grad on (training or not): the module path, which records the graph
        assert "grad mode" in inference_plan.why_not(clf)
        assert not runs_plan()
        with torch.no_grad():
            # training mode with dropout > 0
            clf.train()
            assert "training mode" in inference_plan.why_not(clf)
            assert not runs_plan()
            clf.eval()
            # a forward hook anywhere in the encoder, and a global one
            seen = []
            handle = bert.encoder.blks[0].ffn.dense1.register_forward_hook(
                lambda *a: seen.append(1))
            assert "hook" in inference_plan.why_not(clf)
            assert not runs_plan()
            handle.remove()
            handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
            assert "global" in inference_plan.why_not(clf)
            handle.remove()
            assert runs_plan()
            # keep_attention_weights: the padded path
            fastbert.keep_attention_weights(clf)
            assert "keep_attention_weights" in inference_plan.why_not(clf)
            assert not runs_plan()
            fastbert.keep_attention_weights(clf, None)
            # 2-D valid_lens, too many tokens
            assert "1-D" in inference_plan.why_not(clf, (inputs[0], inputs[1],
                                                         torch.full((1, 9), 9)))
            big = make_inputs(9, MAX_LEN, None)
            assert "MAX_ROWS" in inference_plan.why_not(clf, big)
            before = plan_runs()
            clf(big)
            assert plan_runs() == before
            # all lengths 0 (T = 0): the module path
            before = plan_runs()
            clf(make_inputs(2, 5, [0, 0]))
            assert plan_runs() == before
            # a replaced layer
            blk = bert.encoder.blks[1]
            ffn = blk.ffn
            blk.ffn = nn.Sequential()
            assert "replaced" in inference_plan.why_not(clf)
            blk.ffn = ffn
            assert inference_plan.why_not(clf) is None
            # turned off
            assert "turned off" in module_path(lambda: inference_plan.why_not(clf))
    with torch.no_grad(), fastbert.use_backend("reference"):
        assert "'reference'" in inference_plan.why_not(clf)
        assert not runs_plan()
    with torch.no_grad(), fastbert.use_backend("cpp"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "autocast" in inference_plan.why_not(clf)
            assert not runs_plan()
        unpadded_off = make_bert(unpadded=False)
        assert "unpadded=False" in inference_plan.why_not(unpadded_off)
        assert "float32" in inference_plan.why_not(make_bert().double())
        assert runs_plan()


def test_cached_weights_follow_updates(plan_runs):
    bert = make_bert()
    clf = fastbert.BERTClassifier(bert, 3).eval()
    inputs = make_inputs(1, 11, [11], seed=4)

    def both():
        with torch.no_grad(), fastbert.use_backend("cpp"):
            before = plan_runs()
            got = clf(inputs)
            assert plan_runs() == before + 1
            return got, module_path(lambda: clf(inputs))

    first, _ = both()
    for change in (
        lambda: bert.encoder.blks[0].attention.W_q.weight.mul_(1.5),      # in place (QKV cat)
        lambda: bert.encoder.blks[1].ffn.dense1.bias.add_(0.1),           # in place (a view)
        lambda: bert.encoder.blks[1].attention.W_v.load_state_dict(       # a state_dict load
            {k: v * 0.5 for k, v in bert.encoder.blks[1].attention.W_v.state_dict().items()}),
        lambda: bert.encoder.load_state_dict(make_bert(ffn_activation="relu").encoder.state_dict()),
        lambda: setattr(bert.encoder.blks[0].addnorm2.ln, "weight",       # a new Parameter
                        nn.Parameter(torch.rand(HIDDEN) + 0.5)),
        lambda: bert.encoder.token_embedding.weight.normal_(),
    ):
        with torch.no_grad():
            change()
        got, want = both()
        torch.testing.assert_close(got, want, **TOL)
        assert not torch.equal(got, first)
        first = got
    # an optimizer step (grad on, then eval under no_grad)
    opt = torch.optim.SGD(clf.parameters(), lr=0.5)
    clf.train()
    with fastbert.use_backend("cpp"):
        clf(inputs).sum().backward()
    opt.step()
    clf.eval()
    got, want = both()
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.equal(got, first)
    # .to(): a new dtype leaves the plan; back to float32 it runs on the new storage
    clf.double()
    with torch.no_grad(), fastbert.use_backend("cpp"):
        assert inference_plan.why_not(clf) is not None
    clf.float()
    got, want = both()
    torch.testing.assert_close(got, want, **TOL)


def test_dispatch_log_names_the_cpp_ops(plan_runs):
    bert = make_bert()
    tokens, segments, vl = make_inputs(2, 6, [6, 3])
    with torch.inference_mode(), fastbert.use_backend("cpp"), \
            fastbert.backends.dispatch_log() as log:
        bert.encoder(tokens, segments, vl)
    assert plan_runs() == 1
    assert log and {name for _, name in log} == {"cpp"}
