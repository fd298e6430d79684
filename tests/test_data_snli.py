"""SNLI readers and SNLIBERTDataset against the book's code on real data."""
import gzip
import os
import shutil

import numpy as np
import pytest
import torch

import d2l_book_code as book
from fastbert.data import (SNLIBERTDataset, find_snli_file, load_snli_split, read_snli,
                           read_snli_official, read_snli_tsv, snli_vocab,
                           truncated_pair_lengths)
from train_testing import SNLI, SNLI_SAMPLES, need, official_snli_text, tsv_rows


@pytest.fixture(scope="module")
def snli_test():
    return read_snli_tsv(need(os.path.join(SNLI, "snli_1.0_test.tokenized.tsv.gz")))


@pytest.fixture(scope="module")
def snli_dev():
    return read_snli_tsv(need(os.path.join(SNLI, "snli_1.0_dev.tokenized.tsv.gz")))


def _official_files(dest, split_from):
    """Official-format files in ``dest``: the real samples (full data) or, without them,
    files written from the packaged TSV's first 10 rows."""
    for name, split in split_from.items():
        if SNLI_SAMPLES and os.path.isdir(SNLI_SAMPLES):
            shutil.copy(os.path.join(SNLI_SAMPLES, f"snli_1.0_{split}.txt"), dest / name)
        else:
            (dest / name).write_text(official_snli_text(tsv_rows(split)[:10]))


def test_official_reader_matches_book_read_snli(tmp_path):
    # The book reads snli_1.0_{train,test}.txt; test and dev rows stand in for both.
    _official_files(tmp_path, {"snli_1.0_test.txt": "test", "snli_1.0_train.txt": "dev"})
    for is_train in (True, False):
        assert read_snli(str(tmp_path), is_train) == book.read_snli(str(tmp_path), is_train)
    # A '-' row is dropped (the samples have none: add one).
    text = (tmp_path / "snli_1.0_test.txt").read_text().split("\n")
    text.insert(2, "-\t( ( A man ) ( sleeps . ) )\t( Nobody )" + "\tx" * 11)
    (tmp_path / "snli_1.0_test.txt").write_text("\n".join(text))
    mine, ref = read_snli(str(tmp_path), False), book.read_snli(str(tmp_path), False)
    assert mine == ref and len(mine[0]) == 10


def test_tsv_agrees_with_official_samples(snli_test, snli_dev):
    for split, data in (("test", snli_test), ("dev", snli_dev)):
        official = read_snli_official(need(SNLI_SAMPLES and os.path.join(
            SNLI_SAMPLES, f"snli_1.0_{split}.txt")))
        assert tuple(x[:10] for x in data) == official


def test_real_split_sizes_and_labels(snli_test, snli_dev):
    assert len(snli_test[0]) == 9824 and len(snli_dev[0]) == 9842
    assert np.bincount(snli_test[2]).tolist() == [3368, 3237, 3219]  # what d2l prints
    assert load_snli_split(os.path.dirname(SNLI), "test") == snli_test  # finds snli/


def test_find_and_load_plain_tsv_and_official_layout(tmp_path, snli_test):
    with gzip.open(os.path.join(SNLI, "snli_1.0_test.tokenized.tsv.gz"), "rb") as f:
        (tmp_path / "snli_1.0_test.tokenized.tsv").write_bytes(f.read())
    assert load_snli_split(str(tmp_path), "test") == snli_test
    os.makedirs(tmp_path / "zip" / "snli_1.0")
    _official_files(tmp_path / "zip" / "snli_1.0", {"snli_1.0_dev.txt": "dev"})
    assert find_snli_file(str(tmp_path / "zip"), "dev").endswith("snli_1.0/snli_1.0_dev.txt")
    dev10 = load_snli_split(str(tmp_path / "zip"), "dev")
    assert len(dev10[0]) == 10
    assert dev10 == tuple(x[:10] for x in load_snli_split(os.path.dirname(SNLI), "dev"))
    with pytest.raises(FileNotFoundError, match="no SNLI 'train' split") as e:
        load_snli_split(str(tmp_path), "train")
    for name in ("--data-dir", "FASTBERT_DATA", "--download"):
        assert name in str(e.value)


@pytest.mark.parametrize("content,match", [
    ("label\tpremise\thypothesis\n", "expected the header"),
    ("gold_label\tsentence1\tsentence2\nneutral\tonly two\n", r":2: expected 3 tab-separated"),
    ("gold_label\tsentence1\tsentence2\nmaybe\ta\tb\n", "unknown label 'maybe'"),
])
def test_malformed_tsv_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "snli_1.0_dev.tokenized.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_snli_split(str(tmp_path), "dev")


def test_malformed_official_file_is_a_clear_error(tmp_path):
    (tmp_path / "snli_1.0_test.txt").write_text("not\ta\theader\n")
    with pytest.raises(ValueError, match="not an official SNLI"):
        read_snli(str(tmp_path), False)
    with pytest.raises(FileNotFoundError, match="snli_1.0_train.txt"):
        read_snli(str(tmp_path), True)


def test_truncation_closed_form_matches_book_loop():
    rng = np.random.default_rng(0)
    lp, lh = rng.integers(0, 40, 3000), rng.integers(0, 40, 3000)
    for budget in (0, 1, 2, 5, 17, 30, 60, 100):
        got_p, got_h = truncated_pair_lengths(lp, lh, budget)
        for i in range(len(lp)):
            p, h = list(range(lp[i])), list(range(lh[i]))
            while len(p) + len(h) > budget:
                (p if len(p) > len(h) else h).pop()
            assert (got_p[i], got_h[i]) == (len(p), len(h)), (lp[i], lh[i], budget)


@pytest.mark.parametrize("max_len", [128, 64, 24, 9, 3])
def test_snlibertdataset_equals_book_on_real_data(snli_test, snli_dev, max_len):
    vocab = snli_vocab(snli_dev, min_freq=2)
    for data in (snli_test, snli_dev):
        mine = SNLIBERTDataset(data, max_len, vocab, verbose=False)
        ref = book.SNLIBERTDataset(data, max_len, vocab, processes=None)
        for name in ("all_token_ids", "all_segments", "valid_lens", "labels"):
            a, b = getattr(mine, name), getattr(ref, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert len(mine) == len(ref) == len(data[0])
        for i in (0, 5, len(mine) - 1):
            (t, s, v), y = mine[i]
            (t2, s2, v2), y2 = ref[i]
            assert torch.equal(t, t2) and torch.equal(s, s2) and v == v2 and y == y2


def test_snlibertdataset_bad_input():
    data = (["a b"], ["c"], [0])
    from fastbert.data import Vocab
    with pytest.raises(ValueError, match="max_len must be >= 3"):
        SNLIBERTDataset(data, 2, Vocab([["a"]], reserved_tokens=["<pad>", "<cls>", "<sep>"]))
    with pytest.raises(ValueError, match="no '<cls>' token"):
        SNLIBERTDataset(data, 8, Vocab([["a"]], reserved_tokens=["<pad>"]))
