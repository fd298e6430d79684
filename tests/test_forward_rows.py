"""BERTEncoder.forward_rows (the encoder's output at a few positions, its last block run for
those rows only) and the heads built on it (BERTClassifier reads <cls>; the pretraining loss
reads <cls> and the MLM positions), on every fast backend against the padded reference:
``forward(...)[b, positions[b, p]]`` with pad positions zero, outputs and every gradient."""
import copy

import pytest
import torch

import fastbert

from op_testing import FAST_BACKENDS, assert_close, device_for, ran_on

VOCAB, HIDDEN, FFN, HEADS, MAX_LEN = 50, 64, 96, 4, 16


def make_bert(layers=2, dtype=torch.float32, device="cpu", dropout=0.0):
    torch.manual_seed(0)
    m = fastbert.BERTModel(VOCAB, HIDDEN, [HIDDEN], HIDDEN, FFN, HEADS, layers, dropout,
                           max_len=MAX_LEN, key_size=HIDDEN, query_size=HIDDEN,
                           value_size=HIDDEN, hid_in_features=HIDDEN, mlm_in_features=HIDDEN,
                           nsp_in_features=HIDDEN)
    return m.to(device=device, dtype=dtype)


def make_batch(device, L=11):
    """valid_lens 0, 1, odd and full; positions with <cls>, repeats and pad positions."""
    g = torch.Generator().manual_seed(3)
    valid_lens = torch.tensor([L, 1, 0, 7, 4])
    B = valid_lens.shape[0]
    tokens = torch.randint(0, VOCAB, (B, L), generator=g)
    segments = torch.randint(0, 2, (B, L), generator=g)
    positions = torch.randint(0, L, (B, 5), generator=g)
    positions[:, 0] = 0
    positions[3, 1:3] = 2          # a repeated position
    positions[4, 4] = L - 1        # a pad position (valid length 4)
    weights = torch.randn(B, 5, HIDDEN, generator=g)
    return [t.to(device) for t in (tokens, segments, valid_lens, positions, weights)]


def reference_rows(bert, tokens, segments, valid_lens, positions):
    """The padded reference encoder, gathered, pads zeroed (the unpadded encoder's pads)."""
    with fastbert.use_backend("reference"):
        X = bert.encoder(tokens, segments, valid_lens)
    B = tokens.shape[0]
    inside = positions < valid_lens[:, None]
    return X[torch.arange(B, device=X.device)[:, None], positions] * inside[..., None]


def rows_and_grads(fn, bert, weights):
    bert.zero_grad(set_to_none=True)
    rows = fn(bert)
    (rows.double() * weights.double()).sum().backward()
    return rows.detach(), {n: p.grad.clone() for n, p in bert.named_parameters()
                           if p.grad is not None}


# The unpadded path's ops: the backend under test must serve each (ran_on checks).
PATH_OPS = ("pack", "unpack", "embedding_sum", "varlen_attention", "add_layernorm", "ffn")
PADDED_OPS = ("embedding_sum", "attention", "add_layernorm", "ffn")  # d2l's padded path


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_forward_rows_matches_the_padded_reference(backend, layers):
    device = device_for(backend)
    tokens, segments, vl, positions, weights = make_batch(device)
    bert = make_bert(layers, device=device)
    with ran_on(backend, device, torch.float32, PATH_OPS):
        assert bert.encoder.uses_unpadded(bert.encoder.token_embedding.weight, vl)
        got, got_g = rows_and_grads(
            lambda m: m.encoder.forward_rows(tokens, segments, vl, positions), bert, weights)
    want = {}
    for dtype in (torch.float64, torch.float32):
        ref = make_bert(layers, dtype, device)
        want[dtype] = rows_and_grads(
            lambda m: reference_rows(m, tokens, segments, vl, positions), ref, weights)
    assert got.shape == (5, 5, HIDDEN)
    # Factor 2 (the house rule) holds: measured worst (err - atol) / PyTorch fp32's error,
    # cpp (AVX2 EPYC) 1.63, Triton (interpreter) 1.67, both on W_k.bias, whose gradient is zero
    # in exact arithmetic (rounding noise against rounding noise): its atol is 1e-6 of the
    # model's largest gradient.
    assert_close(got, want[torch.float64][0], want[torch.float32][0], name="rows")
    inside = positions < vl[:, None]
    assert (got[~inside] == 0).all(), "rows at pad positions are zeros"
    assert set(got_g) == set(want[torch.float64][1])
    model_scale = max(g.abs().max().item() for g in want[torch.float64][1].values())
    for name, g64 in want[torch.float64][1].items():
        scale = model_scale if name.endswith("W_k.bias") else max(g64.abs().max().item(), 1e-2)
        assert_close(got_g[name], g64, want[torch.float32][1][name], atol=1e-6 * scale,
                     name=f"grad {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_forward_rows_equals_forward_gathered_on_the_same_backend(backend):
    """Same backend, same kernels: the last block for a few rows equals the whole block read
    at those rows, valid_lens None included."""
    device = device_for(backend)
    tokens, segments, vl, positions, _ = make_batch(device)
    bert = make_bert(device=device).eval()
    for lens in (vl, None):
        with ran_on(backend, device, torch.float32, PATH_OPS):
            full = bert.encoder(tokens, segments, lens)
            rows = bert.encoder.forward_rows(tokens, segments, lens, positions)
        want = full[torch.arange(5, device=device)[:, None], positions]
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)


def test_padded_path_reads_the_padded_rows():
    """2-D valid_lens (and the reference backend) take d2l's padded path: forward_rows is the
    plain gather there, pad positions included."""
    tokens, segments, vl, positions, _ = make_batch(torch.device("cpu"))
    bert = make_bert().eval()
    vl2 = vl[:, None].expand(-1, tokens.shape[1])
    for backend, lens in (("reference", vl), ("cpp", vl2)):
        with (fastbert.use_backend(backend) if backend == "reference" else
              ran_on(backend, torch.device("cpu"), torch.float32, PADDED_OPS)):
            full = bert.encoder(tokens, segments, lens)
            rows = bert.encoder.forward_rows(tokens, segments, lens, positions)
        assert torch.equal(rows, full[torch.arange(5)[:, None], positions])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_classifier_matches_the_reference(backend):
    """BERTClassifier runs the last block for <cls> only; logits and gradients equal the
    padded reference's."""
    device = device_for(backend)
    tokens, segments, vl, _, _ = make_batch(device)
    vl = vl.clamp(min=1)  # <cls> of an empty sequence differs by design (pads are zeros)
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for name, be, dtype in (("got", backend, torch.float32), ("64", "reference", torch.float64),
                            ("32", "reference", torch.float32)):
        # The same parameters in every dtype: drawn in float32, then converted (a float64
        # reset_parameters() draws other numbers from the same seed).
        net = fastbert.BERTClassifier(make_bert(device=device))
        torch.manual_seed(1)
        net.output.reset_parameters()
        net = net.to(device, dtype)
        with (ran_on(be, device, dtype, PATH_OPS) if name == "got" else
              fastbert.use_backend(be)):
            out = net((tokens, segments, vl.float()))  # the book stores lengths as floats
            (out.double() * w.double()).sum().backward()
        results[name] = out.detach(), {n: p.grad for n, p in net.named_parameters()
                                       if p.grad is not None}
    got, want64, want32 = results["got"], results["64"], results["32"]
    # Factor 2 holds: measured on cpp (AVX2 EPYC), every error (logits and gradients, at most
    # 6e-8) is within its atol.
    assert_close(got[0], want64[0], want32[0], name="logits")
    assert set(got[1]) == set(want64[1])
    for name, g64 in want64[1].items():
        # max(., 1e-2): a key bias gets a mathematically zero gradient (rounding noise only)
        scale = max(g64.abs().max().item(), 1e-2)
        assert_close(got[1][name], g64, want32[1][name], atol=1e-6 * scale,
                     name=f"grad {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compile_fullgraph(backend):
    device = device_for(backend)
    tokens, segments, vl, positions, weights = make_batch(device)
    bert = make_bert(device=device)
    compiled_bert = copy.deepcopy(bert)
    with ran_on(backend, device, torch.float32, PATH_OPS):
        eager, eager_g = rows_and_grads(
            lambda m: m.encoder.forward_rows(tokens, segments, vl, positions), bert, weights)
        torch._dynamo.reset()
        fn = torch.compile(lambda *a: compiled_bert.encoder.forward_rows(*a), fullgraph=True)
        compiled, compiled_g = rows_and_grads(lambda m: fn(tokens, segments, vl, positions),
                                              compiled_bert, weights)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for name, g in eager_g.items():
        torch.testing.assert_close(compiled_g[name], g, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"compiled grad {name}: {m}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bf16_autocast(backend):
    device = device_for(backend)
    tokens, segments, vl, positions, weights = make_batch(device)
    bert = make_bert(device=device)
    with ran_on(backend, device, torch.bfloat16, PATH_OPS), \
            torch.autocast(device.type, dtype=torch.bfloat16):
        got, got_g = rows_and_grads(
            lambda m: m.encoder.forward_rows(tokens, segments, vl, positions), bert, weights)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        want_lp, want_lp_g = rows_and_grads(
            lambda m: reference_rows(m, tokens, segments, vl, positions), make_bert(device=device),
            weights)
    want64, want64_g = rows_and_grads(
        lambda m: reference_rows(m, tokens, segments, vl, positions),
        make_bert(dtype=torch.float64, device=device), weights)
    assert_close(got.float(), want64, want_lp.float(), name="rows")
    # bf16 gradients through two layers err by 1-20% of their scale on both paths (packed and
    # padded GEMMs round differently); measured per tensor, the packed path's max error is
    # 0.4-1.3x the reference's, and 2.3x for one (blks.0 W_q.weight): factor 3, not 2.
    for name, g64 in want64_g.items():
        # max(., 1e-2): a key bias gets a mathematically zero gradient (rounding noise only)
        scale = max(g64.abs().max().item(), 1e-2)
        assert_close(got_g[name], g64, want_lp_g[name], factor=3, atol=1e-3 * scale,
                     name=f"grad {name}")


@pytest.mark.parametrize("positions,error,match", [
    (torch.zeros(5, 2), TypeError, "integer tensor"),
    (torch.zeros(5, dtype=torch.long), TypeError, "shape"),
    (torch.zeros(4, 2, dtype=torch.long), ValueError, "one row per sequence"),
    (torch.full((5, 2), 11), ValueError, r"lie in \[0, 10\]"),
    (torch.full((5, 2), -1), ValueError, r"lie in \[0, 10\]"),
])
def test_bad_positions_are_clear_errors(positions, error, match):
    tokens, segments, vl, _, _ = make_batch(torch.device("cpu"))
    with pytest.raises(error, match=match):
        make_bert().encoder.forward_rows(tokens, segments, vl, positions)
