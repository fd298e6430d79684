"""The d2l API on the reference path: semantics beyond d2l parity, options, and bad input."""
import pytest
import torch

import fastbert
import fastbert.v1


def small_model(**options):
    return fastbert.BERTModel(100, 16, [16], 16, 32, 2, 2, 0.0, max_len=12, key_size=16,
                              query_size=16, value_size=16, hid_in_features=16,
                              mlm_in_features=16, nsp_in_features=16, **options)


def batch(B=3, L=10, vocab=100):
    return (torch.randint(0, vocab, (B, L)), torch.randint(0, 2, (B, L)),
            torch.tensor([L, 4, 1])[:B])


# ----------------------------------------------------------------------------- masked_softmax
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_valid_len_zero_gives_a_uniform_row_in_every_dtype(dtype):
    X = (torch.randn(2, 3, 5) * 10).to(dtype)
    with fastbert.use_backend("reference"):
        out = fastbert.masked_softmax(X, torch.tensor([0, 2]))
    assert not torch.isnan(out).any()  # d2l gives NaN here in fp16 (-1e6 overflows to -inf)
    torch.testing.assert_close(out[0], torch.full((3, 5), 0.2, dtype=dtype))
    assert (out[1, :, 2:] == 0).all()


def test_masked_softmax_masks_keys_past_the_valid_length():
    X = torch.randn(2, 4, 6, dtype=torch.float64)
    vl = torch.tensor([[1, 2, 6, 3], [0, 5, 4, 2]])
    with fastbert.use_backend("reference"):
        out = fastbert.masked_softmax(X, vl)
    for n in range(2):
        for q in range(4):
            k = int(vl[n, q])
            if k:
                torch.testing.assert_close(out[n, q, :k], torch.softmax(X[n, q, :k], -1))
                assert (out[n, q, k:] == 0).all()


@pytest.mark.parametrize("bad, err, match", [
    (torch.tensor([1, 7]), ValueError, r"valid_lens must lie in \[0, 6\]"),
    (torch.tensor([-1, 2]), ValueError, r"valid_lens must lie in \[0, 6\]"),
    (torch.tensor([1, 2, 3]), ValueError, "must have 2 entries"),
    (torch.ones(2, 3, 1), ValueError, "1-D or 2-D"),
    (torch.ones(2, 5), ValueError, r"shape \(2, 4\)"),
    ([1, 2], TypeError, "valid_lens must be None or a torch.Tensor"),
    (torch.tensor([True, False]), TypeError, "integer or float"),
])
def test_masked_softmax_rejects_bad_valid_lens(bad, err, match):
    with pytest.raises(err, match=match):
        fastbert.masked_softmax(torch.randn(2, 4, 6), bad)


def test_masked_softmax_rejects_bad_scores():
    with pytest.raises(ValueError, match="X must have 3 dimensions"):
        fastbert.masked_softmax(torch.randn(4, 6), None)
    with pytest.raises(TypeError, match="floating dtype"):
        fastbert.masked_softmax(torch.ones(2, 4, 6, dtype=torch.long), None)
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        fastbert.masked_softmax([[1.0]], None)


def test_mismatched_devices_are_reported():
    X = torch.randn(2, 4, 6, device="meta")
    with pytest.raises(ValueError, match="valid_lens is on cpu but the data is on meta"):
        fastbert.masked_softmax(X, torch.tensor([1, 2]))


def test_device_given_as_a_string_matches_the_same_device():
    vl = torch.tensor([1, 2])
    out = fastbert.ops.normalize_valid_lens(vl, 2, 4, 6, "cpu")
    assert out.dtype == torch.int32 and out.tolist() == [1, 2]
    with pytest.raises(ValueError, match="valid_lens is on cpu but the data is on meta"):
        fastbert.ops.normalize_valid_lens(vl, 2, 4, 6, "meta")


# ----------------------------------------------------------------------------- the model
def test_bad_model_inputs_name_the_argument():
    m = small_model()
    tokens, segments, vl = batch()
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 99\]"):
        m(tokens + 100, segments, vl)
    with pytest.raises(ValueError, match=r"segments must lie in \[0, 1\]"):
        m(tokens, segments + 2, vl)
    with pytest.raises(ValueError, match="tokens must be \\[batch, seq_len\\]"):
        m(tokens[0], segments[0], vl)
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        m(tokens.float(), segments, vl)
    with pytest.raises(ValueError, match="segments shape"):
        m(tokens, segments[:, :5], vl)
    with pytest.raises(ValueError, match=r"valid_lens must lie in \[0, 10\]"):
        m(tokens, segments, torch.tensor([11, 2, 3]))
    with pytest.raises(ValueError, match="max_len is 12"):
        m(torch.zeros(1, 13, dtype=torch.long), torch.zeros(1, 13, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"pred_positions must lie in \[0, 9\]"):
        m(tokens, segments, vl, torch.tensor([[0], [10], [1]]))
    with pytest.raises(TypeError, match="pred_positions must be an integer tensor"):
        m(tokens, segments, vl, torch.zeros(3, 1))


def test_model_outputs_have_d2l_shapes_and_keys():
    m = small_model()
    tokens, segments, vl = batch()
    enc, mlm, nsp = m(tokens, segments, vl, torch.tensor([[1, 2], [0, 3], [0, 0]]))
    assert enc.shape == (3, 10, 16) and mlm.shape == (3, 2, 100) and nsp.shape == (3, 2)
    assert m(tokens, segments)[1] is None
    keys = set(m.state_dict())
    assert {"encoder.pos_embedding", "encoder.blks.1.attention.W_q.weight",
            "encoder.blks.0.addnorm2.ln.bias", "encoder.blks.0.ffn.dense1.weight",
            "hidden.0.weight", "mlm.mlp.3.bias", "nsp.output.weight"} <= keys


def test_model_options_default_to_d2l_and_change_the_network():
    assert small_model().encoder.blks[0].ffn.activation == "relu"
    assert small_model().encoder.blks[0].addnorm1.ln.eps == 1e-5
    m = small_model(ffn_activation="gelu", layer_norm_eps=1e-12, embedding_layer_norm=True)
    assert m.encoder.blks[0].ffn.activation == "gelu"
    assert m.encoder.blks[1].addnorm2.ln.eps == 1e-12
    assert "encoder.embedding_norm.weight" in m.state_dict()
    with pytest.raises(ValueError, match="activation must be one of"):
        small_model(ffn_activation="swish")


def test_positional_embedding_trains_in_v1_but_not_in_017():
    tokens, segments, vl = batch()
    for model, trains in ((small_model(), False),
                          (fastbert.v1.BERTModel(100, 16, 32, 2, 2, 0.0, max_len=12), True)):
        model(tokens, segments, vl)[0].sum().backward()
        assert (model.encoder.pos_embedding.grad is not None) == trains


def test_unpadded_encoder_equals_padded_on_valid_positions_with_reference_kernels():
    """The unpadded path (pack, varlen attention, unpack) on the reference ops."""
    torch.manual_seed(0)
    m = small_model()
    tokens, segments, vl = batch()
    with fastbert.use_backend("reference"):
        m.encoder.unpadded = False
        padded = m(tokens, segments, vl)[0]
        m.encoder.unpadded = True
        unpadded = m(tokens, segments, vl)[0]
    for b, n in enumerate(vl.tolist()):
        torch.testing.assert_close(unpadded[b, :n], padded[b, :n], rtol=1e-5, atol=1e-5)
        assert (unpadded[b, n:] == 0).all()


def test_attention_weights_kept_on_request():
    m = small_model()
    tokens, segments, vl = batch()
    with fastbert.use_backend("reference"):
        m(tokens, segments, vl)
    w = m.encoder.blks[0].attention.attention.attention_weights
    assert w.shape == (3 * 2, 10, 10)  # (batch * heads, queries, keys), as in d2l
    fastbert.keep_attention_weights(m, False)
    with fastbert.use_backend("reference"):
        m(tokens, segments, vl)
    assert m.encoder.blks[0].attention.attention.attention_weights is None
    fastbert.keep_attention_weights(m, True)
    m(tokens, segments, vl)  # any backend: weights kept, encoder stays padded
    assert m.encoder.blks[0].attention.attention.attention_weights.shape == (6, 10, 10)


def test_v1_signatures_build_d2l_1x_shapes():
    m = fastbert.v1.BERTModel(100, 16, 32, 2, 2, 0.1, max_len=12)
    assert m.encoder.blks[0].ffn.dense1.weight.shape == (32, 16)
    mha = fastbert.v1.MultiHeadAttention(16, 2, 0.0)  # lazy, as in d2l 1.x
    X = torch.randn(2, 3, 8)
    assert mha(X, X, X, None).shape == (2, 3, 16)
    assert mha.transpose_output(mha.transpose_qkv(torch.randn(2, 3, 16))).shape == (2, 3, 16)
    ffn = fastbert.v1.PositionWiseFFN(32, 16)
    assert ffn(X).shape == (2, 3, 16)
