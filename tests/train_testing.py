"""Shared helpers for the data/hub/training tests: where the test data lives, an
official-format SNLI writer, and a single-thread setting (tiny models are dominated by
thread hand-offs on a shared CPU).

Data: the full splits (WikiText-2 train, the official SNLI samples) only when
``FASTBERT_DATA`` names a folder holding them (CI sets it to ``../shared/data``); otherwise
the splits packaged with fastbert (SNLI dev/test, WikiText-2 valid), which are the same
files.  Tests that need what only the full data has skip, saying so."""
import gzip
import os

import pytest
import torch

from fastbert.data.paths import PACKAGED_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get("FASTBERT_DATA") or None


def _has(root, *rel):
    return bool(root) and all(os.path.isfile(os.path.join(root, r)) for r in rel)


# One folder for every test: FASTBERT_DATA when it holds what the package ships, else the
# package's own folder (same layout: snli/, wikitext-2/).
DATA = FULL if _has(FULL, "snli/snli_1.0_dev.tokenized.tsv.gz",
                    "snli/snli_1.0_test.tokenized.tsv.gz",
                    "wikitext-2/wiki.valid.tokens.gz") else PACKAGED_DIR
SNLI = os.path.join(DATA, "snli")
WIKI = os.path.join(DATA, "wikitext-2")
SNLI_SAMPLES = os.path.join(FULL, "snli", "samples") if FULL else None
# Pretraining tests use the book's train split when it is there, else the packaged valid.
WIKI_SPLIT = "train" if _has(WIKI, "wiki.train.tokens.gz") else "valid"

# A tiny model for training tests (bert.small's layout, much smaller).
TINY = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=1)


def need(path):
    """``path`` if it exists, else skip the test with the reason (only the full data, through
    FASTBERT_DATA, has it)."""
    if not path or not os.path.exists(path):
        pytest.skip(f"needs the full data ({path or 'FASTBERT_DATA/...'} not found): set "
                    "FASTBERT_DATA to a folder holding it (CI: ../shared/data); the data "
                    "packaged with fastbert has only SNLI dev/test and WikiText-2 valid")
    return path


def tsv_rows(split):
    """``[(label, premise, hypothesis), ...]`` of a tokenized SNLI split (test data)."""
    with gzip.open(os.path.join(SNLI, f"snli_1.0_{split}.tokenized.tsv.gz"), "rt",
                   encoding="utf-8") as f:
        next(f)
        return [tuple(line.rstrip("\n").split("\t")) for line in f]


def official_snli_text(rows):
    """An official-format ``snli_1.0_<split>.txt`` (14 tab-separated columns) holding
    ``rows``: binary parses whose text is each sentence (the book's read_snli strips the
    parentheses back off), the other columns filled as the official file fills them."""
    header = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tcaptionID\tpairID\tlabel1\tlabel2\t"
              "label3\tlabel4\tlabel5\n")

    def binary(s):
        words = s.split()
        return "( " + " ".join(f"( {w} )" if i % 3 == 0 else w for i, w in enumerate(words)) + " )"

    lines = [header]
    for i, (label, p, h) in enumerate(rows):
        lines.append("\t".join([label, binary(p), binary(h), f"(ROOT (S {p}))", f"(ROOT (S {h}))",
                                p, h, f"{i}.jpg#0", f"{i}.jpg#0r1n", label, label, label,
                                "", ""]) + "\n")
    return "".join(lines)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def book_format_pretrained(folder, vocab, vocab_tokens=None):
    """A tiny BERT (hidden 32, one block) saved in the book's pretrained format in ``folder``:
    ``pretrained.params`` and ``vocab.json`` (``vocab_tokens``: the tokens written there,
    default the whole vocabulary).  Returns the model."""
    import json

    from fastbert import BERTModel
    bert = BERTModel(len(vocab), 32, [32], 32, 64, 2, 1, 0.1, max_len=64, key_size=32,
                     query_size=32, value_size=32, hid_in_features=32, mlm_in_features=32,
                     nsp_in_features=32)
    folder.mkdir()
    torch.save(bert.state_dict(), folder / "pretrained.params")
    with open(folder / "vocab.json", "w") as f:
        json.dump(vocab.idx_to_token if vocab_tokens is None else vocab_tokens, f)
    return bert
