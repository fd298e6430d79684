"""Training that survives faults (issue 16): step checkpoints and an exact resume after an
interruption, corrupt checkpoints skipped, a full disk, a loss that turns NaN, flat memory.
Tiny models, one thread, in-process (the multi-process cases: test_train_elastic.py)."""
import errno
import os
import warnings

import pytest
import torch

from fastbert import backends
from fastbert.train import checkpoint as ckpt_io
from fastbert.train import engine
from test_train import _same_params, ft, params, pt
from train_testing import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# 160 pairs, 32 a batch: 5 steps an epoch, 10 in all; dropout on (the RNGs must come back).
KW = dict(train_limit=160, test_limit=40, batch_size=32, dropout=0.1, lr=1e-3, epochs=2)


class Killed(Exception):
    pass


def _interrupt_at(monkeypatch, step):
    """The engine's test kill switch, with the SIGKILL turned into an exception (a real
    SIGKILL of a worker: test_train_elastic.py)."""
    monkeypatch.setenv("FASTBERT_TEST_KILL_AT_STEP", f"{step}:0")

    def kill(pid, sig):
        raise Killed(step)
    monkeypatch.setattr(engine.os, "kill", kill)


def _cpp_or_skip(backend):
    if backend == "cpp" and "cpp" not in backends.available_backends():
        pytest.skip("the cpp extension is not built here")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_interrupted_mid_epoch_resumes_bit_exact(tmp_path, monkeypatch, backend):
    _cpp_or_skip(backend)
    full = ft(backend=backend, **KW)
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        _interrupt_at(m, 8)   # epoch 2, after its 3rd step; the newest checkpoint: step 6
        with pytest.raises(Killed):
            ft(backend=backend, out_dir=out, checkpoint_every=3, keep_checkpoints=2, **KW)
    # Checkpoints at steps 3, 5 (the epoch end) and 6; the newest 2 kept.
    assert [s for s, _ in ckpt_io.find_checkpoints(out)] == [6, 5]
    state = ckpt_io.load_checkpoint(out)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (6, 1, 1)
    for key in ("model", "optimizer", "rng", "partial", "log", "config", "vocab", "kind",
                "bert_options"):
        assert key in state, key
    resumed = ft(backend=backend, out_dir=out, resume="auto", checkpoint_every=3, **KW)
    _same_params(params(full["model"]), params(resumed["model"]))  # bit for bit
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"]]
    assert resumed["epochs"] == full["epochs"]


def test_pretrain_step_checkpoints_resume_exact(tmp_path, monkeypatch):
    kw = dict(dropout=0.2, max_paragraphs=60, max_steps=9)
    full = pt(**kw)
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        with pytest.raises(Killed):
            pt(out_dir=str(tmp_path), checkpoint_every=2, **kw)
    assert ckpt_io.load_checkpoint(str(tmp_path))["global_step"] == 4
    resumed = pt(out_dir=str(tmp_path), resume="auto", **kw)
    _same_params(params(full["model"]), params(resumed["model"]))
    assert [s["mlm_loss"] for s in resumed["steps"]] == [s["mlm_loss"] for s in full["steps"]]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, monkeypatch):
    out = str(tmp_path)
    full = ft(**KW)
    with monkeypatch.context() as m:
        _interrupt_at(m, 8)
        with pytest.raises(Killed):
            ft(out_dir=out, checkpoint_every=3, keep_checkpoints=0, **KW)
    newest = ckpt_io.checkpoint_path(out, 6)
    with open(newest, "r+b") as f:    # truncated, as by a crash of the disk under it
        f.truncate(os.path.getsize(newest) // 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        resumed = ft(out_dir=out, resume="auto", **KW)
    assert any(newest in str(x.message) and "corrupt or truncated" in str(x.message)
               for x in w), [str(x.message) for x in w]
    _same_params(params(full["model"]), params(resumed["model"]))  # from step 5: still exact
    # Naming that file: a clear error.
    with pytest.raises(ValueError, match=f"{newest}.*corrupt or truncated"):
        ckpt_io.load_checkpoint(newest)


def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    out = str(tmp_path)
    calls = {"n": 0}
    real = ckpt_io._write_bytes

    def write(f, data):
        calls["n"] += 1
        if calls["n"] > 3:   # the first checkpoint (file, .sha256, link's .sha256) is written
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)
    monkeypatch.setattr(ckpt_io, "_write_bytes", write)
    with pytest.raises(OSError, match="cannot write checkpoint .*checkpoint-000000004.pt: the "
                                      "disk is full; the previous checkpoints are untouched"):
        ft(out_dir=out, checkpoint_every=2, **KW)
    assert [s for s, _ in ckpt_io.find_checkpoints(out)] == [2]
    assert ckpt_io.load_checkpoint(out)["global_step"] == 2
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    # An absurd learning rate: Adam moves every weight by ~lr, the logits overflow.
    out = str(tmp_path)
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step (\d+)"
                                                 r".*last good checkpoint.*is kept") as e:
        ft(out_dir=out, checkpoint_every=1, **dict(KW, lr=1e30))
    bad = int(str(e.value).split(" at step ")[1].split()[0])
    state = ckpt_io.load_checkpoint(out)
    assert state["global_step"] == bad - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_pretrained_vocab_or_shape_mismatch_says_which(tmp_path):
    r = ft(out_dir=str(tmp_path / "a"), train_limit=64, test_limit=16, batch_size=32, epochs=1)
    assert r["steps"]
    # Resuming with another vocabulary (different --train-limit): said so.
    with pytest.raises(ValueError, match="another vocabulary"):
        ft(out_dir=str(tmp_path / "a"), resume="auto", train_limit=96, test_limit=16,
           batch_size=32, epochs=2)
    # A checkpoint whose shapes do not fit: the parameter and both shapes are named.
    with pytest.raises(RuntimeError, match="size mismatch"):
        ft(out_dir=str(tmp_path / "a"), resume="auto", train_limit=64, test_limit=16,
           batch_size=32, epochs=2, num_hiddens=16)


def test_memory_and_speed_stay_flat_over_hundreds_of_steps():
    # 300 steps of a tiny pretraining model, RSS logged every 25.  The first ~100 steps
    # fill the allocator caches and the lazily built kernels; after that a leak of even one
    # small tensor per step (a few KiB) would add MiBs.  Tolerance: 8 MiB from step 100 to
    # 300 (the metrics log itself grows by ~0.1 MiB).
    r = pt(max_paragraphs=60, batch_size=8, max_steps=300, epochs=1000, rss_every=25,
           dropout=0.1)
    rss = {s["step"]: s["rss_mb"] for s in r["steps"] if "rss_mb" in s}
    assert sorted(rss) == list(range(25, 301, 25))
    assert rss[300] - rss[100] < 8.0, rss
    # Throughput does not decay: the median step time of the last 100 steps within 2.5x
    # that of steps 51-150 (medians, and a wide margin: the 2 cores are shared).
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    secs = [s["seconds"] for s in r["steps"]]
    assert med(secs[200:]) < 2.5 * med(secs[50:150]), (med(secs[50:150]), med(secs[200:]))


def test_pretrained_with_a_vocabulary_that_does_not_fit_says_which(tmp_path):
    from fastbert.data import load_snli_split, snli_vocab
    from train_testing import DATA, book_format_pretrained
    vocab = snli_vocab(tuple(x[:200] for x in load_snli_split(DATA, "dev")))
    folder = tmp_path / "bert.mini.torch"
    # vocab.json 5 tokens short of the embedding
    book_format_pretrained(folder, vocab, vocab_tokens=vocab.idx_to_token[:-5])
    with pytest.raises(ValueError, match=rf"pretrained.params does not fit .*vocab="
                                         rf"{len(vocab) - 5}.*'vocab_size': {len(vocab)}"
                                         r"(.|\n)*token_embedding.weight"):
        ft(pretrained=str(folder), train_limit=32, test_limit=8, batch_size=32, epochs=1)


def test_malformed_data_line_names_file_and_line(tmp_path):
    bad = tmp_path / "snli_1.0_dev.tokenized.tsv"
    bad.write_text("gold_label\tsentence1\tsentence2\nneutral\ta b\tc d\n"
                   "entailment\tonly two columns\n")
    (tmp_path / "snli_1.0_test.tokenized.tsv").write_text(
        "gold_label\tsentence1\tsentence2\nneutral\ta b\tc d\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: expected 3 tab-separated columns"):
        ft(data_dir=str(tmp_path), out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()   # nothing written before the data is read


def test_grad_scaler_skips_are_reported_not_fatal(monkeypatch):
    # fp16's GradScaler exists for CUDA only in training; on the CPU a scaler with an
    # absurd initial scale makes the scaled gradients overflow, as fp16 ones do: the step is
    # skipped and the scale lowered, which the run must count and survive.
    import importlib
    ft_mod = importlib.import_module("fastbert.train.finetune")
    monkeypatch.setattr(ft_mod, "make_grad_scaler",
                        lambda device, amp: torch.amp.GradScaler("cpu", init_scale=2.0 ** 127))
    r = ft(**dict(KW, epochs=1))
    skipped = [s["step"] for s in r["steps"] if s.get("scaler_skipped")]
    assert skipped and skipped[0] == 1, r["steps"]
    assert len(r["steps"]) == 5 and all(s["loss"] == s["loss"] for s in r["steps"])
    assert all(torch.isfinite(p).all() for p in r["model"].parameters())
