"""The unpadded encoder's training output (fastbert/encoded_rows.py): ``encoded_X[:, p, :]``
read from the packed rows must be exactly the padded output's row (values bit for bit,
gradients of every parameter as through the plain select), with and without dropout, at
positions past some sequences' lengths, for a length-0 sequence; anything else is the plain
op."""
import pytest
import torch
from torch import nn

import fastbert
from fastbert import encoded_rows
from fastbert.encoded_rows import EncodedRows

from op_testing import require_extension

V, C = 97, 32


class BookClassifier(nn.Module):
    """The fine-tuning chapter's own BERTClassifier (d2l 0.17), over any encoder."""

    def __init__(self, bert):
        super().__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.output = nn.Linear(C, 3)

    def forward(self, inputs):
        tokens_X, segments_X, valid_lens_x = inputs
        encoded_X = self.encoder(tokens_X, segments_X, valid_lens_x)
        return self.output(self.hidden(encoded_X[:, 0, :]))


def model(dropout):
    torch.manual_seed(0)
    bert = fastbert.BERTModel(V, C, [C], C, 64, 2, 2, dropout, max_len=24, key_size=C,
                              query_size=C, value_size=C, hid_in_features=C,
                              mlm_in_features=C, nsp_in_features=C)
    return BookClassifier(bert)


def batch(B=5, L=12):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, L), generator=g)
    segments = (torch.arange(L) >= L // 2).long().expand(B, L)
    valid_lens = torch.tensor([12, 1, 7, 0, 5][:B], dtype=torch.float32)
    return tokens, segments, valid_lens


def step(net, inputs, routed: bool, monkeypatch):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout seeds on both runs
    with monkeypatch.context() as m:
        if not routed:
            m.setattr(encoded_rows, "attach", lambda encoded, *attached: encoded)
        out = net(inputs)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_book_classifier_reads_packed_rows_with_the_same_values_and_grads(dropout,
                                                                          monkeypatch):
    require_extension("varlen_attention")
    net, inputs = model(dropout), batch()
    with fastbert.use_backend("cpp"):
        encoded = net.encoder(*inputs)
        assert type(encoded) is EncodedRows
        assert type(encoded[:, 0, :].grad_fn).__name__ == "WhereBackward0"
        out, grads = step(net, inputs, True, monkeypatch)
        plain_out, plain_grads = step(net, inputs, False, monkeypatch)
    assert torch.equal(out, plain_out)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_positions_lengths_and_fallbacks():
    require_extension("varlen_attention")
    net, (tokens, segments, valid_lens) = model(0.0), batch()
    with fastbert.use_backend("cpp"):
        encoded = net.encoder(tokens, segments, valid_lens)
    plain = encoded.plain()
    # Every position, both spellings, negative too: bit for bit the padded output's rows,
    # zeros where p is past a sequence's length (and for the length-0 sequence).
    for p in (0, 1, 6, 11, -1):
        for got in (encoded[:, p, :], encoded[:, p]):
            assert type(got) is torch.Tensor and type(got.grad_fn).__name__ == "WhereBackward0"
            assert torch.equal(got, plain[:, p, :])
    assert not encoded[3, 0].any()
    # Other reads are the plain op.
    for index in ((0,), (slice(None), slice(1, 3)), (slice(None), torch.tensor(0)),
                  (slice(None), 0, 1), (Ellipsis, 0)):
        got = encoded[index if len(index) > 1 else index[0]]
        assert type(got) is torch.Tensor and type(got.grad_fn).__name__ != "WhereBackward0"
        assert torch.equal(got, plain[index if len(index) > 1 else index[0]])
    with pytest.raises(IndexError):
        encoded[:, 12]
    assert type(encoded + 1) is torch.Tensor
    # Changed in place: the stored rows are stale, so the plain select runs.
    with torch.no_grad():
        encoded.mul_(2)
    assert type(encoded[:, 0].grad_fn).__name__ != "WhereBackward0"
    torch.testing.assert_close(encoded[:, 0], plain[:, 0])  # plain shares the storage
    # Grad off, and the reference backend: a plain tensor.
    with torch.no_grad(), fastbert.use_backend("cpp"):
        assert type(net.encoder(tokens, segments, valid_lens)) is torch.Tensor
    with fastbert.use_backend("reference"):
        assert type(net.encoder(tokens, segments, valid_lens)) is torch.Tensor
