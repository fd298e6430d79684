"""The whole fastbert.BERTModel on each fast backend (the unpadded encoder: pack,
varlen_attention, add_layernorm, ffn, unpack) vs the padded reference backend: outputs on
valid positions, zeros at pads, every parameter gradient; torch.compile(fullgraph=True) of
forward + backward; a bf16 autocast run.
"""
import copy

import pytest
import torch

import fastbert

from op_testing import FAST_BACKENDS, assert_close, device_for, ran_on

VOCAB, HIDDEN, FFN, HEADS, LAYERS, MAX_LEN = 50, 128, 256, 2, 2, 16
ACTIVATIONS = ["relu", "gelu"]


def make_model(activation="relu", dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    m = fastbert.BERTModel(VOCAB, HIDDEN, [HIDDEN], HIDDEN, FFN, HEADS, LAYERS, 0.0,
                           max_len=MAX_LEN, key_size=HIDDEN, query_size=HIDDEN,
                           value_size=HIDDEN, hid_in_features=HIDDEN, mlm_in_features=HIDDEN,
                           nsp_in_features=HIDDEN, ffn_activation=activation)
    return m.to(device=device, dtype=dtype)


def make_batch(device):
    g = torch.Generator().manual_seed(1)
    B, L = 4, 12
    tokens = torch.randint(0, VOCAB, (B, L), generator=g)
    segments = torch.randint(0, 2, (B, L), generator=g)
    valid_lens = torch.tensor([12, 1, 7, 5])
    # MLM slots on valid positions only (pads differ between the paths: zeros vs values).
    positions = torch.stack([torch.randint(0, int(n), (3,), generator=g) for n in valid_lens])
    weights = torch.randn(B, L, HIDDEN, generator=g)
    mlm_w = torch.randn(B, 3, VOCAB, generator=g)
    nsp_w = torch.randn(B, 2, generator=g)
    return [t.to(device) for t in (tokens, segments, valid_lens, positions, weights, mlm_w,
                                   nsp_w)]


def valid_mask(valid_lens, L):
    return torch.arange(L, device=valid_lens.device)[None, :] < valid_lens[:, None]


def loss_fn(model, tokens, segments, valid_lens, positions, weights, mlm_w, nsp_w):
    encoded, mlm, nsp = model(tokens, segments, valid_lens, positions)
    mask = valid_mask(valid_lens, tokens.shape[1])[..., None]
    loss = ((encoded.float() * weights.float()) * mask).sum() + (mlm.float() * mlm_w.float()).sum() \
        + (nsp.float() * nsp_w.float()).sum()
    return loss, encoded, mlm, nsp


def run(model, batch):
    model.zero_grad(set_to_none=True)
    loss, encoded, mlm, nsp = loss_fn(model, *batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return encoded.detach(), mlm.detach(), nsp.detach(), grads


def run_reference(activation, device, dtype):
    model = make_model(activation, dtype, device)
    with fastbert.use_backend("reference"):
        assert not model.encoder.uses_unpadded(torch.zeros(1, device=device, dtype=dtype),
                                               torch.ones(1))
        return run(model, make_batch(device))


# The unpadded path's ops: the backend under test must serve each (ran_on checks).
UNPADDED_OPS = ("pack", "unpack", "embedding_sum", "varlen_attention", "add_layernorm", "ffn")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_unpadded_model_matches_padded_reference(backend, activation):
    device = device_for(backend)
    batch = make_batch(device)
    model = make_model(activation, device=device)
    with ran_on(backend, device, torch.float32, UNPADDED_OPS):
        assert model.encoder.uses_unpadded(torch.zeros(1, device=device), batch[2])
        got = run(model, batch)
    want64 = run_reference(activation, device, torch.float64)
    want32 = run_reference(activation, device, torch.float32)
    valid = valid_mask(batch[2], batch[0].shape[1])
    # Encoded tokens on valid positions; pads are zeros on the unpadded path.
    # The house factor 2 holds: measured worst (err - atol) / PyTorch fp32's error, cpp (AVX2
    # EPYC) 1.23, Triton (interpreter) 1.78, both on W_k.bias, whose gradient is zero in
    # exact arithmetic (a key bias shifts a query's scores by a constant): rounding noise
    # against rounding noise; its atol is therefore 1e-6 of the model's largest gradient.
    assert_close(got[0][valid], want64[0][valid], want32[0][valid],
                 name="encoded (valid positions)")
    assert (got[0][~valid] == 0).all(), "pads must be zero on the unpadded path"
    assert_close(got[1], want64[1], want32[1], name="mlm logits")
    assert_close(got[2], want64[2], want32[2], name="nsp logits")
    assert set(got[3]) == set(want64[3])
    model_scale = max(g.abs().max().item() for g in want64[3].values())
    for name in want64[3]:
        scale = model_scale if name.endswith("W_k.bias") else \
            (want64[3][name].abs().max().item() or 1.0)
        assert_close(got[3][name], want64[3][name], want32[3][name], atol=1e-6 * scale,
                     name=f"grad {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compile_fullgraph_forward_backward(backend):
    device = device_for(backend)
    batch = make_batch(device)
    model = make_model(device=device)
    compiled_model = copy.deepcopy(model)
    with ran_on(backend, device, torch.float32, UNPADDED_OPS):
        eager = run(model, batch)
        torch._dynamo.reset()
        step = torch.compile(lambda *b: loss_fn(compiled_model, *b)[0], fullgraph=True)
        compiled_model.zero_grad(set_to_none=True)
        step(*batch).backward()
    for name, p in compiled_model.named_parameters():
        if name in eager[3]:
            torch.testing.assert_close(p.grad, eager[3][name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"compiled grad {name}: {m}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bf16_autocast(backend):
    """Under bf16 autocast the unpadded model errs no more than twice what the padded
    reference errs under the same autocast (both against float64)."""
    device = device_for(backend)
    batch = make_batch(device)
    model = make_model(device=device)
    with ran_on(backend, device, torch.bfloat16, UNPADDED_OPS), \
            torch.autocast(device.type, dtype=torch.bfloat16):
        got = run(model, batch)
    ref_model = make_model(device=device)
    with fastbert.use_backend("reference"), torch.autocast(device.type, dtype=torch.bfloat16):
        want_lp = run(ref_model, batch)
    want64 = run_reference("relu", device, torch.float64)
    valid = valid_mask(batch[2], batch[0].shape[1])
    assert_close(got[0][valid].float(), want64[0][valid], want_lp[0][valid].float(),
                 name="encoded (valid positions)")
    assert_close(got[2].float(), want64[2], want_lp[2].float(), name="nsp logits")
    for name in want64[3]:
        g = got[3][name]
        assert g.dtype == torch.float32, f"{name}: fp32 parameters get fp32 grads"
        scale = want64[3][name].abs().max().item() or 1.0
        assert_close(g, want64[3][name], want_lp[3][name], atol=1e-3 * scale,
                     name=f"grad {name}")


# ----------------------------------------------------------------------------- batch-1 inference
# The inference fast path of a small batch (benchmarks/bench_latency.py): the cpp glue runs
# GEMMs of at most SMALL_GEMM_ROWS rows on F.linear, the packed rows are not bucketed, and the
# concatenated QKV weights are kept between calls while the weights are unchanged.  These
# tests are the module path's: the inference plan, which would serve these calls, is off
# (tests/test_inference_plan.py tests it against this path).
def _classifier():
    torch.manual_seed(0)
    return fastbert.BERTClassifier(make_model(), 3).eval()


def _pairs():
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (1, 7, 12):
        tokens = torch.randint(0, VOCAB, (1, n), generator=g)
        out.append((tokens, (torch.arange(n)[None] >= n // 2).long(), torch.tensor([n])))
    tokens, segments, valid_lens = make_batch("cpu")[:3]
    return out + [(tokens, segments, valid_lens)]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_small_batch_inference_matches_reference(mode, monkeypatch):
    cpp_ffn = pytest.importorskip("fastbert.backends.cpp.ffn")
    cpp_linear = pytest.importorskip("fastbert.backends.cpp.linear")
    monkeypatch.setattr(fastbert.inference_plan, "ENABLED", False)
    small = []
    for mod in (cpp_linear, cpp_ffn):
        real = mod.small_gemm
        monkeypatch.setattr(mod, "small_gemm", lambda x, real=real: small.append(real(x))
                            or small[-1])
    net = _classifier()
    guard = torch.no_grad if mode == "no_grad" else torch.inference_mode
    for inputs in _pairs():
        with guard():
            with fastbert.use_backend("reference"):
                want = net(inputs)
            with ran_on("cpp", torch.device("cpu"), torch.float32, ops=("linear", "ffn")):
                got = net(inputs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert small and all(small), "the small-batch GEMMs did not take the F.linear path"


def test_inference_weight_cache_follows_weight_updates(monkeypatch):
    monkeypatch.setattr(fastbert.inference_plan, "ENABLED", False)
    net = _classifier()
    inputs = _pairs()[2]
    with torch.no_grad(), fastbert.use_backend("cpp"):
        before = net(inputs)
        attn = net.encoder.blks[0].attention
        attn.W_q.weight.mul_(2.0)        # in place: the cached QKV copy must not be reused
        after = net(inputs)
        last = net.encoder.blks[-1].attention
        state = {k: v * 0.5 for k, v in last.W_k.state_dict().items()}
        last.W_k.load_state_dict(state)  # the KV copy of the last block (the <cls> query path)
        after_load = net(inputs)
        with fastbert.use_backend("reference"):
            want_load = net(inputs)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after_load, want_load, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), fastbert.use_backend("reference"):
        attn.W_q.weight.mul_(1.0)
        torch.testing.assert_close(net(inputs), after_load, atol=1e-5, rtol=1e-5)
    # training (grad on) never reads the cache: gradients reach every projection weight
    net.train()
    with fastbert.use_backend("cpp"):
        net(inputs).sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for m in (attn.W_q, attn.W_k, attn.W_v))


def test_keep_attention_weights_still_leaves_the_unpadded_path():
    net = _classifier()
    inputs = _pairs()[3]
    enc = net.encoder
    assert enc.uses_unpadded(enc.token_embedding.weight, inputs[2]) or \
        fastbert.backends.resolve_name("varlen_attention", "cpu", torch.float32) == "reference"
    fastbert.keep_attention_weights(net)
    assert not enc.uses_unpadded(enc.token_embedding.weight, inputs[2])
    fastbert.keep_attention_weights(net, None)
