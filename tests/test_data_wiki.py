"""WikiText-2 pretraining data against the book's pipeline (same seed, same examples)."""
import gzip
import os
import random

import pytest
import torch

import d2l_book_code as book
from fastbert.data import BERT_RESERVED_TOKENS, Vocab, WikiTextDataset, read_wiki
from train_testing import WIKI, need

FIELDS = ["all_token_ids", "all_segments", "valid_lens", "all_pred_positions",
          "all_mlm_weights", "all_mlm_labels", "nsp_labels"]


def _lines(split):
    with gzip.open(need(os.path.join(WIKI, f"wiki.{split}.tokens.gz")), "rt",
                   encoding="utf-8") as f:
        return f.readlines()


@pytest.fixture(scope="module")
def train_lines():
    return _lines("train")  # the full data only (FASTBERT_DATA)


@pytest.fixture(scope="module")
def book_lines():
    """The book's train split when available, else the packaged valid split."""
    have_train = os.path.isfile(os.path.join(WIKI, "wiki.train.tokens.gz"))
    return _lines("train" if have_train else "valid")


# Paragraphs and sentences of _read_wiki per split (the data README's figures).
@pytest.mark.parametrize("split,paragraphs,sentences", [("train", 15496, 74631),
                                                         ("valid", 1673, 7889)])
def test_read_wiki_matches_book(split, paragraphs, sentences):
    lines = _lines(split)
    random.seed(7)
    ref = book._read_wiki_lines(lines)
    random.seed(7)
    mine = read_wiki(WIKI, split)  # the global `random`, as the book
    assert mine == ref
    assert len(mine) == paragraphs and sum(map(len, mine)) == sentences
    assert read_wiki(WIKI, split, rng=random.Random(7)) == ref  # a private generator


@pytest.mark.parametrize("max_len", [64, 20])
def test_dataset_equals_book(book_lines, max_len):
    random.seed(1)
    paragraphs = book._read_wiki_lines(book_lines)[:1200]
    random.seed(2)
    ref = book._WikiTextDataset(paragraphs, max_len)
    random.seed(2)
    mine = WikiTextDataset(paragraphs, max_len)
    assert mine.vocab.idx_to_token == ref.vocab.idx_to_token
    assert len(mine) == len(ref) > (1000 if max_len == 64 else 20)
    for name in FIELDS:
        a, b = getattr(mine, name), torch.stack(getattr(ref, name))
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert mine.valid_lens.dtype == torch.float32
    assert mine.all_pred_positions.shape[1] == round(max_len * 0.15)
    for i in (0, len(mine) - 1):
        for x, y in zip(mine[i], ref[i]):
            assert torch.equal(x, y)


def test_mlm_masking_rates():
    # 80/10/10 over many predictions, on the book's own arithmetic.
    rng = random.Random(0)
    paragraphs = [[" ".join(f"w{rng.randrange(50)}" for _ in range(20)) for _ in range(4)]
                  for _ in range(400)]
    ds = WikiTextDataset(paragraphs, 64, rng=random.Random(3), min_freq=1)
    mask_id = ds.vocab["<mask>"]
    w = ds.all_mlm_weights.bool()
    inputs = torch.gather(ds.all_token_ids, 1, ds.all_pred_positions)[w]
    labels = ds.all_mlm_labels[w]
    n = len(labels)
    masked = (inputs == mask_id).float().mean().item()
    kept = (inputs == labels).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02, (masked, kept, n)
    # Prediction slots never point at <cls>/<sep>.
    specials = torch.tensor([ds.vocab["<cls>"], ds.vocab["<sep>"]])
    assert not torch.isin(labels, specials).any()


def test_full_train_vocab_has_book_size(train_lines):
    paragraphs = read_wiki(WIKI, rng=random.Random(0))
    sentences = [s.split() for p in paragraphs for s in p]
    assert len(Vocab(sentences, min_freq=5, reserved_tokens=BERT_RESERVED_TOKENS)) == 20256


def test_plain_folder_and_errors(tmp_path):
    with gzip.open(need(os.path.join(WIKI, "wiki.valid.tokens.gz")), "rb") as f:
        (tmp_path / "wiki.train.tokens").write_bytes(f.read())
    assert len(read_wiki(str(tmp_path), rng=random.Random(0))) == 1673
    with pytest.raises(FileNotFoundError, match="no WikiText-2 'test' file"):
        read_wiki(str(tmp_path), "test")
    (tmp_path / "wiki.test.tokens").write_text("one line without sentences\n")
    with pytest.raises(ValueError, match="no paragraph with two or more sentences"):
        read_wiki(str(tmp_path), "test")
