"""fastbert.data.Vocab / tokenize give the book's token ids (transcribed d2l code)."""
import gzip
import os

import numpy as np
import pytest

import d2l_book_code as book
from fastbert.data import Vocab, count_corpus, tokenize
from train_testing import SNLI, WIKI, need

RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]


def test_tokenize_matches_book():
    lines = ["a b  c ", "", " x"]
    assert tokenize(lines) == book.tokenize(lines)
    assert tokenize(lines, "char") == book.tokenize(lines, "char")
    with pytest.raises(ValueError, match="unknown token type"):
        tokenize(lines, "bpe")


@pytest.mark.parametrize("min_freq", [0, 1, 2, 5])
@pytest.mark.parametrize("reserved", [None, RESERVED])
def test_vocab_ids_match_book_on_ties(min_freq, reserved):
    # Many equal frequencies: the order must follow first occurrence (stable sort).
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 40, size=300)] + ["<pad>", "<unk>"]
    tokens = [words[i:i + 7] for i in range(0, len(words), 7)]
    mine, ref = Vocab(tokens, min_freq, reserved), book.Vocab(tokens, min_freq, reserved)
    assert mine.idx_to_token == ref.idx_to_token
    assert mine.token_to_idx == ref.token_to_idx
    assert mine.token_freqs == ref._token_freqs
    assert mine[["w1", "nope", "w3"]] == ref[["w1", "nope", "w3"]]
    assert mine["nope"] == 0 and mine.unk == 0
    assert mine.lookup_array(["w1", "nope"]).tolist() == ref[["w1", "nope"]]
    assert mine.to_tokens(mine[["w1", "w3"]]) == ["w1", "w3"]


def test_vocab_flat_and_empty():
    assert Vocab().idx_to_token == ["<unk>"] and len(Vocab()) == 1
    assert Vocab(["b", "a", "b"]).idx_to_token == book.Vocab(["b", "a", "b"]).idx_to_token
    assert count_corpus([]) == {}


def test_vocab_on_real_snli_and_wiki():
    with gzip.open(need(os.path.join(SNLI, "snli_1.0_dev.tokenized.tsv.gz")), "rt") as f:
        rows = [r.rstrip("\n").split("\t") for r in f.readlines()[1:]]
    tokens = [r[1].lower().split() for r in rows] + [r[2].lower().split() for r in rows]
    assert Vocab(tokens, 1, RESERVED).idx_to_token == book.Vocab(tokens, 1, RESERVED).idx_to_token
    with gzip.open(need(os.path.join(WIKI, "wiki.valid.tokens.gz")), "rt") as f:
        lines = f.read().lower().split(" . ")
    sentences = tokenize(lines)
    assert (Vocab(sentences, 5, RESERVED).idx_to_token
            == book.Vocab(sentences, 5, RESERVED).idx_to_token)


def test_vocab_json_roundtrip_and_errors(tmp_path):
    v = Vocab([["a", "b", "a"]], reserved_tokens=RESERVED)
    path = str(tmp_path / "vocab.json")
    v.save_json(path)
    w = Vocab.load_json(path)
    assert w.idx_to_token == v.idx_to_token and w["a"] == v["a"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Vocab.load_json(str(tmp_path / "bad.json"))
    (tmp_path / "dict.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list of token strings"):
        Vocab.load_json(str(tmp_path / "dict.json"))
