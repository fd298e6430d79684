"""Parity of fastbert's reference path with the real d2l packages (0.17.6 and 1.0.3).

Same weights (state_dict copied both ways with strict=True), same inputs: outputs and every
parameter's gradient equal within 1e-6 in fp32, eval mode and train mode with dropout 0, for
valid_lens None / 1-D / 1-D float / 2-D / with zeros.
"""
import pytest
import torch

import fastbert
import fastbert.v1
from d2l_loader import load_d2l

SMALL = dict(vocab_size=20256, num_hiddens=256, ffn_num_hiddens=512, num_heads=4,
             num_layers=2, max_len=512)
# bert.base shapes (768 hidden, 3072 FFN, 12 heads, 12 layers) with a small vocab for speed.
BASE = dict(vocab_size=1000, num_hiddens=768, ffn_num_hiddens=3072, num_heads=12,
            num_layers=12, max_len=512)
CONFIGS = {"bert.small": SMALL, "bert.base-shaped": BASE}
B, L = 4, 13


def args_017(cfg, dropout):
    n = cfg["num_hiddens"]
    return ((cfg["vocab_size"], n, [n], n, cfg["ffn_num_hiddens"], cfg["num_heads"],
             cfg["num_layers"], dropout),
            dict(max_len=cfg["max_len"], key_size=n, query_size=n, value_size=n,
                 hid_in_features=n, mlm_in_features=n, nsp_in_features=n))


def args_103(cfg, dropout):
    return ((cfg["vocab_size"], cfg["num_hiddens"], cfg["ffn_num_hiddens"], cfg["num_heads"],
             cfg["num_layers"], dropout), dict(max_len=cfg["max_len"]))


def make_inputs(cfg, case, g):
    tokens = torch.randint(0, cfg["vocab_size"], (B, L), generator=g)
    segments = torch.randint(0, 2, (B, L), generator=g)
    pred_positions = torch.randint(0, L, (B, 3), generator=g)
    lens = torch.tensor([L, 1, 7, 10])
    valid_lens = {
        "none": None,
        "1d": lens,
        "1d_float": lens.float(),  # the book's datasets store valid_lens as float32
        "1d_zero": torch.tensor([0, L, 5, 0]),
        "2d": torch.randint(0, L + 1, (B, L), generator=g),
    }[case]
    return tokens, segments, valid_lens, pred_positions


def run(model, inputs, weights):
    """Forward, a loss touching every output, backward; returns outputs and grads."""
    model.zero_grad(set_to_none=True)
    outs = model(*inputs)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return [o.detach() for o in outs], grads


def assert_same(ours, theirs):
    (o1, g1), (o2, g2) = ours, theirs
    for a, b, name in zip(o1, o2, ("encoded_X", "mlm_Y_hat", "nsp_Y_hat")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert g1.keys() == g2.keys()
    for name in g1:
        if g2[name] is None:  # d2l 0.17: pos_embedding is added through .data, never trained
            assert g1[name] is None, f"{name} got a gradient; d2l gives none"
            continue
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"grad {name}: {m}")


def build_pair(version, cfg, dropout):
    d2l = load_d2l(version)
    torch.manual_seed(1)
    if version == "0.17.6":
        args, kwargs = args_017(cfg, dropout)
        theirs, ours = d2l.BERTModel(*args, **kwargs), fastbert.BERTModel(*args, **kwargs)
    else:
        args, kwargs = args_103(cfg, dropout)
        theirs, ours = d2l.BERTModel(*args, **kwargs), fastbert.v1.BERTModel(*args, **kwargs)
        # d2l 1.x builds lazy layers: one forward materializes them before any state_dict.
        theirs(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
               None, torch.zeros(1, 1, dtype=torch.long))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("version", ["0.17.6", "1.0.3"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_round_trip(version, config):
    ours, theirs = build_pair(version, CONFIGS[config], 0.1)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    fresh = type(theirs)(*(args_017 if version == "0.17.6" else args_103)(CONFIGS[config], 0.1)[0],
                         **(args_017 if version == "0.17.6" else args_103)(CONFIGS[config], 0.1)[1])
    if version == "1.0.3":
        fresh(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), None,
              torch.zeros(1, 1, dtype=torch.long))
    fresh.load_state_dict(ours.state_dict(), strict=True)  # and back into d2l
    for (n, a), b in zip(ours.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("version", ["0.17.6", "1.0.3"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["eval", "train_dropout0"])
@pytest.mark.parametrize("case", ["none", "1d", "1d_float", "1d_zero", "2d"])
def test_outputs_and_gradients_match_d2l(version, config, mode, case):
    cfg = CONFIGS[config]
    ours, theirs = build_pair(version, cfg, 0.1 if mode == "eval" else 0.0)
    for m in (ours, theirs):
        m.train(mode != "eval")
    g = torch.Generator().manual_seed(2)
    inputs = make_inputs(cfg, case, g)
    n = cfg["num_hiddens"]
    weights = [torch.randn(B, L, n, generator=g), torch.randn(B, 3, cfg["vocab_size"], generator=g),
               torch.randn(B, 2, generator=g)]
    with fastbert.use_backend("reference"):
        got = run(ours, inputs, weights)
    assert_same(got, run(theirs, inputs, weights))


@pytest.mark.parametrize("version", ["0.17.6", "1.0.3"])
def test_masked_softmax_matches_d2l_and_does_not_mutate(version):
    d2l = load_d2l(version)
    X = torch.randn(6, 5, 7)
    for vl in (None, torch.tensor([0, 1, 7, 3, 2, 5]), torch.tensor([0., 1., 7., 3., 2., 5.]),
               torch.randint(0, 8, (6, 5))):
        before = X.clone()
        with fastbert.use_backend("reference"):
            ours = fastbert.masked_softmax(X, vl)
        assert torch.equal(X, before), "fastbert must not mutate its input"
        torch.testing.assert_close(ours, d2l.masked_softmax(X.clone(), vl), rtol=0, atol=0)


class BookBERTClassifier(torch.nn.Module):
    """The fine-tuning chapter's classifier, transcribed (it is not in the d2l package)."""

    def __init__(self, bert):
        super().__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.output = torch.nn.Linear(256, 3)

    def forward(self, inputs):
        tokens_X, segments_X, valid_lens_x = inputs
        encoded_X = self.encoder(tokens_X, segments_X, valid_lens_x)
        return self.output(self.hidden(encoded_X[:, 0, :]))


def test_bert_classifier_matches_the_book():
    ours_bert, their_bert = build_pair("0.17.6", SMALL, 0.0)
    theirs = BookBERTClassifier(their_bert)
    ours = fastbert.BERTClassifier(ours_bert)
    ours.output.load_state_dict(theirs.output.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    tokens, segments, valid_lens, _ = make_inputs(SMALL, "1d_float", torch.Generator().manual_seed(4))
    with fastbert.use_backend("reference"):
        got = ours((tokens, segments, valid_lens))
    torch.testing.assert_close(got, theirs((tokens, segments, valid_lens)), rtol=1e-6, atol=1e-6)


def test_d2l_layers_match():
    """The layer classes the book also uses on their own."""
    d2l = load_d2l("0.17.6")
    torch.manual_seed(3)
    theirs = d2l.MultiHeadAttention(8, 8, 8, 8, 2, 0.0)
    ours = fastbert.MultiHeadAttention(8, 8, 8, 8, 2, 0.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    X = torch.randn(3, 4, 8)
    vl = torch.tensor([3, 2, 0])
    with fastbert.use_backend("reference"):
        torch.testing.assert_close(ours(X, X, X, vl), theirs(X, X, X, vl), rtol=0, atol=0)
        torch.testing.assert_close(ours.attention.attention_weights,
                                   theirs.attention.attention_weights, rtol=0, atol=0)
    ffn_t, ffn_o = d2l.PositionWiseFFN(8, 16, 8), fastbert.PositionWiseFFN(8, 16, 8)
    ffn_o.load_state_dict(ffn_t.state_dict(), strict=True)
    an_t, an_o = d2l.AddNorm([8], 0.0), fastbert.AddNorm([8], 0.0)
    Y = torch.randn(3, 4, 8)
    with fastbert.use_backend("reference"):
        torch.testing.assert_close(ffn_o(X), ffn_t(X), rtol=0, atol=0)
        torch.testing.assert_close(an_o(X, Y), an_t(X, Y), rtol=0, atol=0)
    assert fastbert.get_tokens_and_segments(["a", "b"], ["c"]) == \
        d2l.get_tokens_and_segments(["a", "b"], ["c"])
    torch.testing.assert_close(fastbert.transpose_output(fastbert.transpose_qkv(X, 2), 2), X)
