"""Training on real data: fine-tuning learns SNLI, pretraining lowers MLM and NSP losses,
compile/bf16 match eager/fp32, resume is exact, the CLI runs end to end.  Tiny models,
one thread, bounded steps."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastbert.cli import main
from fastbert.data import load_snli_split, snli_vocab
from fastbert.train import FinetuneConfig, PretrainConfig, finetune, pretrain
from op_testing import require_extension
from train_testing import (DATA, REPO, SNLI, TINY, WIKI, WIKI_SPLIT,  # noqa: F401
                           book_format_pretrained, need, one_thread)

pytestmark = pytest.mark.usefixtures("one_thread")


# The training logic is backend-independent: pinned to the reference ops here, except where
# a test says backend=None (the default, auto: whatever fast backend is built).
def ft(**kw):
    need(SNLI)
    base = dict(data_dir=DATA, max_len=64, progress=False, verbose=False, backend="reference",
                **TINY)
    base.update(kw)
    return finetune(FinetuneConfig(**base))


def pt(**kw):
    need(WIKI)
    base = dict(data_dir=DATA, split=WIKI_SPLIT, max_paragraphs=200, batch_size=32, max_len=32,
                progress=False, verbose=False, backend="reference", **TINY)
    base.update(kw)
    return pretrain(PretrainConfig(**base))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finetune_learns_snli_dev_and_beats_chance_on_test():
    # One epoch over all of dev (9,842 pairs), a 32-wide one-layer model.
    r = ft(test_limit=1000, epochs=1, batch_size=32, lr=1e-3, dropout=0.0, backend=None)
    losses = [s["loss"] for s in r["steps"]]
    assert len(losses) == 308
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < first - 0.04, (first, last)
    # Chance is 1/3; 1,000 test examples put 0.40 about 4.5 standard deviations above it.
    assert r["test_acc"] > 0.40, r["epochs"]
    assert r["examples_per_sec"] > 0


def test_pretraining_lowers_mlm_and_nsp_losses():
    r = pt(max_steps=60, lr=5e-3, dropout=0.0)
    steps = r["steps"]
    assert len(steps) == 60
    mean = lambda rows, k: sum(x[k] for x in rows) / len(rows)  # noqa: E731
    assert mean(steps[-10:], "mlm_loss") < mean(steps[:5], "mlm_loss") - 0.5
    assert mean(steps[-10:], "nsp_loss") < mean(steps[:10], "nsp_loss") - 0.02, steps


def _same_params(a, b, lr=None, steps=None, **tol):
    assert a.keys() == b.keys()
    for k in a:
        if tol and k.endswith("attention.W_k.bias"):
            # Its gradient is zero up to rounding (softmax ignores a per-query constant);
            # Adam turns that noise into +-lr steps: bounded, not equal.
            assert (a[k] - b[k]).abs().max() <= 2.5 * lr * steps, k
        elif tol:
            torch.testing.assert_close(a[k], b[k], **tol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_resume_is_exact_finetune(tmp_path):
    # Dropout on: the RNG state must come back too.
    kw = dict(train_limit=160, test_limit=40, batch_size=32, dropout=0.1, lr=1e-3)
    full = ft(epochs=2, **kw)
    ft(epochs=1, out_dir=str(tmp_path / "a"), **kw)
    resumed = ft(epochs=2, out_dir=str(tmp_path / "a"), resume="auto", **kw)
    _same_params(params(full["model"]), params(resumed["model"]))
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"]]
    # Stopped mid-epoch by --max-steps, then resumed: still the same run.
    ft(epochs=2, max_steps=3, out_dir=str(tmp_path / "b"), **kw)
    mid = ft(epochs=2, out_dir=str(tmp_path / "b"), resume="auto", **kw)
    _same_params(params(full["model"]), params(mid["model"]))
    assert mid["epochs"] == full["epochs"]
    log = json.load(open(tmp_path / "b" / "metrics.json"))
    assert len(log["steps"]) == 10 and [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000


def test_resume_is_exact_pretrain(tmp_path):
    kw = dict(dropout=0.2, max_paragraphs=60)
    full = pt(max_steps=9, **kw)
    pt(max_steps=4, out_dir=str(tmp_path), **kw)
    resumed = pt(max_steps=9, out_dir=str(tmp_path), resume="auto", **kw)
    _same_params(params(full["model"]), params(resumed["model"]))
    assert [s["mlm_loss"] for s in resumed["steps"]] == [s["mlm_loss"] for s in full["steps"]]
    with pytest.raises(ValueError, match="not a fine-tuning checkpoint"):
        ft(out_dir=str(tmp_path), resume="auto", train_limit=32, test_limit=8)


@pytest.mark.parametrize("backend", ["reference", None])  # None: the default, auto
def test_bf16_autocast_matches_fp32(backend):
    kw = dict(train_limit=96, test_limit=32, batch_size=32, epochs=1, dropout=0.0, lr=1e-3,
              backend=backend)
    a, b = ft(**kw), ft(amp="bf16", **kw)  # on the default (auto) backend
    for x, y in zip(a["steps"], b["steps"]):
        assert abs(x["loss"] - y["loss"]) < 0.02 * abs(x["loss"]), (x, y)
    _same_params(params(a["model"]), params(b["model"]), lr=1e-3, steps=3, rtol=0.05,
                 atol=3e-3)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        ft(amp="fp16", **kw)


def test_compiled_matches_eager():
    kw = dict(train_limit=64, test_limit=32, batch_size=32, epochs=1, dropout=0.0, lr=1e-3,
              trim=False)
    a, b = ft(**kw), ft(compile=True, **kw)
    for x, y in zip(a["steps"], b["steps"]):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
    _same_params(params(a["model"]), params(b["model"]), lr=1e-3, steps=2, rtol=1e-4,
                 atol=1e-5)
    assert a["test_acc"] == b["test_acc"]


@pytest.mark.parametrize("task", ["finetune", "pretrain"])
def test_compile_on_the_fast_path_one_graph_bounded(task):
    """--compile on the cpp backend (the unpadded encoder: pack's data-dependent row count,
    row bucketing) with batches of every shape (trimmed to their longest, a partial last
    batch): one training graph (and one for evaluation), no recompile, no graph break, the
    warm-up in step 1 only, reported in the metrics; losses match eager."""
    require_extension()
    if task == "finetune":
        kw = dict(train_limit=80, test_limit=24, batch_size=32, epochs=1, dropout=0.0,
                  lr=1e-3, backend="cpp", bucket=True)
        eager, compiled = ft(**kw), ft(compile=True, **kw)
        losses = "loss"
        assert compiled["test_acc"] == eager["test_acc"]
    else:
        kw = dict(max_steps=3, batch_size=16, backend="cpp", dropout=0.0)
        eager, compiled = pt(**kw), pt(compile=True, **kw)
        losses = "mlm_loss"
    shapes = len(eager["steps"])
    assert shapes >= 3, shapes
    for x, y in zip(eager["steps"], compiled["steps"]):
        assert abs(x[losses] - y[losses]) < 1e-4 * max(1.0, abs(x[losses])), (x, y)
    stats = compiled["compile"]
    assert eager["compile"] is None
    assert stats["recompiles"] == 0 and stats["graph_breaks"] == 0, stats
    assert stats["frames_compiled_in_steps"] == 1 and stats["warmup_steps"] == [1], stats
    assert stats["warmup_seconds"] > 0 and stats["steady_step_seconds_median"] > 0, stats
    assert [s.get("frames_compiled") for s in compiled["steps"]][:2] == [1, None]


def test_finetune_from_book_format_pretrained(tmp_path):
    data = load_snli_split(need(DATA), "dev")
    vocab = snli_vocab(tuple(x[:200] for x in data))
    torch.manual_seed(0)
    folder = tmp_path / "bert.mini.torch"
    bert = book_format_pretrained(folder, vocab)
    r = ft(pretrained=str(folder), train_limit=64, test_limit=32, batch_size=32, epochs=1)
    assert r["vocab"].idx_to_token == vocab.idx_to_token
    enc = r["model"].encoder
    torch.testing.assert_close(enc.pos_embedding, bert.encoder.pos_embedding)  # never trains
    assert enc.blks[0].addnorm1.dropout.p == 0.2  # the book's load_pretrained_model
    assert not torch.equal(enc.token_embedding.weight, bert.encoder.token_embedding.weight)


def _cli(*args, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-m", "fastbert", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=300)


def test_cli_finetune_end_to_end(tmp_path):
    need(SNLI)
    out = tmp_path / "run"
    p = _cli("finetune", "--data-dir", DATA, "--train-limit", "64", "--test-limit", "32",
             "--epochs", "1", "--batch-size", "32", "--num-hiddens", "32", "--ffn-num-hiddens",
             "64", "--num-heads", "2", "--num-layers", "1", "--max-len", "64", "--bucket",
             "--out-dir", str(out), "--no-progress", "--backend", "reference")
    assert p.returncode == 0, p.stderr
    assert "train acc" in p.stdout and "examples/sec on cpu" in p.stdout
    log = json.load(open(out / "metrics.json"))
    assert log["config"]["bucket"] is True and len(log["steps"]) == 2
    assert (out / "curves.png").is_file() and (out / "checkpoint.pt").is_file()


def test_cli_pretrain_in_process(capsys):
    need(WIKI)
    assert main(["pretrain", "--data-dir", DATA, "--split", WIKI_SPLIT, "--backend", "reference",
                 "--max-paragraphs", "40", "--max-steps", "2", "--batch-size", "16",
                 "--num-hiddens", "32", "--ffn-num-hiddens", "64", "--max-len", "32",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MLM loss" in out and "NSP loss" in out and "sentence pairs/sec" in out


def test_cli_bad_data_is_a_clear_error(tmp_path, capsys):
    assert main(["finetune", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no SNLI 'dev' and 'test' splits found" in err and str(tmp_path) in err
    for name in ("--data-dir", "FASTBERT_DATA", "--download"):
        assert name in err, name
    (tmp_path / "snli_1.0_dev.tokenized.tsv").write_text("gold_label\tsentence1\tsentence2\n"
                                                         "neutral\tonly two\n")
    (tmp_path / "snli_1.0_test.tokenized.tsv").write_text("gold_label\tsentence1\tsentence2\n"
                                                          "neutral\ta b\tc d\n")
    assert main(["finetune", "--data-dir", str(tmp_path)]) == 2
    assert ":2: expected 3 tab-separated columns" in capsys.readouterr().err
    assert main(["pretrain", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no WikiText-2 'train' split found" in err
    for name in ("--data-dir", "FASTBERT_DATA", "--download"):
        assert name in err, name


def test_finetune_from_hugging_face_folder_dispatches_to_hf(tmp_path):
    from test_hf import synthetic_config, synthetic_state, write_checkpoint
    path = write_checkpoint(tmp_path / "hf", synthetic_state(), synthetic_config())
    r = ft(pretrained=path, max_len=20, train_limit=64, test_limit=32, batch_size=32,
           epochs=1, num_hiddens=16)
    assert r["tokenizer"] is not None and r["vocab"] is None
    assert r["model"].encoder.embedding_norm is not None  # BERT's layout, from fastbert.hf
    assert len(r["steps"]) == 2 and r["test_acc"] is not None
