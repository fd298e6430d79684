"""SNLI for BERT fine-tuning: readers for the official files and the tokenized TSV, and
``SNLIBERTDataset`` with the book's content, built with numpy instead of a process pool.

Readers return the book's ``(premises, hypotheses, labels)`` triple with labels
``entailment=0, contradiction=1, neutral=2`` and rows labelled ``-`` dropped.
"""
from __future__ import annotations

import gzip
import os
import re
from typing import List, Tuple

import numpy as np
import torch

from .vocab import Vocab

__all__ = ["LABELS", "read_snli", "read_snli_official", "read_snli_tsv", "find_snli_file",
           "snli_file_candidates", "read_snli_file",
           "load_snli_split", "truncated_pair_lengths", "SNLIBERTDataset", "snli_vocab"]

LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}
SNLIData = Tuple[List[str], List[str], List[int]]

_PARENS = re.compile(r"[()]")
_SPACES = re.compile(r"\s{2,}")


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _extract_text(s: str) -> str:
    # The book: drop the parse's parentheses, collapse runs of whitespace, strip.
    return _SPACES.sub(" ", _PARENS.sub("", s)).strip()


def read_snli_official(path: str) -> SNLIData:
    """One official ``snli_1.0_<split>.txt`` file (14 tab-separated columns), read as the
    book's ``read_snli`` reads it: text from the binary-parse columns."""
    premises, hypotheses, labels = [], [], []
    with _open_text(path) as f:
        header = f.readline()
        if not header.startswith("gold_label\tsentence1_binary_parse\tsentence2_binary_parse"):
            raise ValueError(f"{path}: not an official SNLI .txt file (header starts with "
                             f"{header[:60]!r}, expected 'gold_label<TAB>sentence1_binary_parse"
                             f"<TAB>sentence2_binary_parse...')")
        for lineno, row in enumerate(f, start=2):
            cols = row.split("\t")
            if len(cols) < 3:
                raise ValueError(f"{path}:{lineno}: expected at least 3 tab-separated columns, "
                                 f"got {len(cols)}")
            if cols[0] in LABELS:
                premises.append(_extract_text(cols[1]))
                hypotheses.append(_extract_text(cols[2]))
                labels.append(LABELS[cols[0]])
    return premises, hypotheses, labels


def read_snli(data_dir: str, is_train: bool) -> SNLIData:
    """The book's ``read_snli(data_dir, is_train)``: ``snli_1.0_train.txt`` or
    ``snli_1.0_test.txt`` in ``data_dir`` (the extracted ``snli_1.0`` folder)."""
    name = "snli_1.0_train.txt" if is_train else "snli_1.0_test.txt"
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        from .paths import DataNotFoundError, not_found_hint
        raise DataNotFoundError(f"SNLI file {path} not found (the extracted snli_1.0.zip).\n"
                                + not_found_hint("snli"))
    return read_snli_official(path)


def read_snli_tsv(path: str) -> SNLIData:
    """The tokenized TSV (``gold_label<TAB>sentence1<TAB>sentence2``, optionally gzip)."""
    premises, hypotheses, labels = [], [], []
    with _open_text(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:3] != ["gold_label", "sentence1", "sentence2"]:
            raise ValueError(f"{path}: expected the header 'gold_label<TAB>sentence1<TAB>"
                             f"sentence2', got {header!r}")
        for lineno, row in enumerate(f, start=2):
            cols = row.rstrip("\n").split("\t")
            if len(cols) != 3:
                raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns, "
                                 f"got {len(cols)}")
            label = cols[0]
            if label == "-":
                continue
            if label not in LABELS:
                raise ValueError(f"{path}:{lineno}: unknown label {label!r} "
                                 f"(expected one of {sorted(LABELS)} or '-')")
            premises.append(_extract_text(cols[1]))
            hypotheses.append(_extract_text(cols[2]))
            labels.append(LABELS[label])
    return premises, hypotheses, labels


def snli_file_candidates(data_dir: str, split: str) -> List[str]:
    """The paths :func:`find_snli_file` tries, in order."""
    names = [f"snli_1.0_{split}.txt", f"snli_1.0_{split}.tokenized.tsv.gz",
             f"snli_1.0_{split}.tokenized.tsv", f"snli_1.0_{split}.txt.gz"]
    return [os.path.join(data_dir, sub, name) for sub in ("", "snli_1.0", "snli")
            for name in names]


def find_snli_file(data_dir: str, split: str) -> str:
    """The file holding ``split`` (train/dev/test) under ``data_dir``: the official
    ``snli_1.0_<split>.txt`` (also inside ``snli_1.0/``) or the tokenized TSV (``.gz`` or
    plain, also inside ``snli/``)."""
    for path in snli_file_candidates(data_dir, split):
        if os.path.isfile(path):
            return path
    from .paths import DataNotFoundError, not_found_hint
    raise DataNotFoundError(
        f"no SNLI {split!r} split under {data_dir!r} (looked for snli_1.0_{split}.txt or "
        f"snli_1.0_{split}.tokenized.tsv[.gz] there and in snli_1.0/, snli/).\n"
        + not_found_hint("snli"))


def load_snli_split(data_dir: str, split: str) -> SNLIData:
    """Read one split from ``data_dir`` in whichever supported format is there."""
    return read_snli_file(find_snli_file(data_dir, split))


def read_snli_file(path: str) -> SNLIData:
    """One SNLI file, official ``.txt`` or tokenized TSV (told apart by its name)."""
    if ".tokenized.tsv" in os.path.basename(path):
        return read_snli_tsv(path)
    return read_snli_official(path)


def snli_vocab(dataset: SNLIData, min_freq: int = 1,
               reserved_tokens=("<pad>", "<mask>", "<cls>", "<sep>")) -> Vocab:
    """A BERT vocabulary from SNLI text, tokenized as the fine-tuning chapter does
    (lowercased, whitespace split)."""
    tokens = [s.lower().split() for s in dataset[0]] + [s.lower().split() for s in dataset[1]]
    return Vocab(tokens, min_freq=min_freq, reserved_tokens=list(reserved_tokens))


def truncated_pair_lengths(len_p: np.ndarray, len_h: np.ndarray, budget: int):
    """Closed form of the book's ``_truncate_pair_of_tokens``: pop from the longer of the
    premise and hypothesis (the hypothesis on ties) until ``len_p + len_h <= budget``."""
    len_p = np.asarray(len_p, dtype=np.int64)
    len_h = np.asarray(len_h, dtype=np.int64)
    excess = len_p + len_h - budget
    # Popping only the longer side finishes first when it stays the longer one throughout;
    # otherwise both meet and alternate (hypothesis first), ending at ceil/floor of half.
    only_p = (len_p > len_h) & (len_p - excess >= len_h)
    only_h = (len_p <= len_h) & (len_h - excess >= len_p - 1)
    half_p, half_h = (budget + 1) // 2, budget // 2
    new_p = np.where(only_p, len_p - excess, np.where(only_h, len_p, half_p))
    new_h = np.where(only_p, len_h, np.where(only_h, len_h - excess, half_h))
    keep = excess <= 0
    return np.where(keep, len_p, new_p), np.where(keep, len_h, new_h)


class SNLIBERTDataset(torch.utils.data.Dataset):
    """The fine-tuning chapter's dataset: ``<cls> premise <sep> hypothesis <sep>`` ids padded
    with ``'<pad>'`` to ``max_len``, segments (0/1, padded with 0) and ``valid_lens``.

    Same content as the book's class (lowercased whitespace tokens, the same truncation,
    int64 tensors), built with numpy in one pass instead of a 4-process pool.  ``lengths``
    (numpy) holds the valid lengths for length-aware batching.
    """

    def __init__(self, dataset: SNLIData, max_len: int, vocab: Vocab, verbose: bool = True):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 ('<cls>' and two '<sep>'), got {max_len}")
        for tok in ("<pad>", "<cls>", "<sep>"):
            if tok not in vocab.token_to_idx:
                raise ValueError(f"the vocabulary has no {tok!r} token")
        premises, hypotheses, labels = dataset
        if not len(premises) == len(hypotheses) == len(labels):
            raise ValueError("premises, hypotheses and labels differ in length")
        self.vocab, self.max_len = vocab, max_len
        self.labels = torch.tensor(labels, dtype=torch.long)
        p_tok = [s.lower().split() for s in premises]
        h_tok = [s.lower().split() for s in hypotheses]
        self.all_token_ids, self.all_segments, self.valid_lens = self._build(p_tok, h_tok)
        self.lengths = self.valid_lens.numpy()
        if verbose:
            print("read " + str(len(self.all_token_ids)) + " examples")

    def _build(self, p_tok, h_tok):
        n, L, vocab = len(p_tok), self.max_len, self.vocab
        lp = np.fromiter(map(len, p_tok), dtype=np.int64, count=n)
        lh = np.fromiter(map(len, h_tok), dtype=np.int64, count=n)
        new_p, new_h = truncated_pair_lengths(lp, lh, L - 3)
        pad, cls, sep = vocab["<pad>"], vocab["<cls>"], vocab["<sep>"]
        ids = np.full((n, L), pad, dtype=np.int64)
        rows = np.arange(n)
        ids[:, 0] = cls
        ids[rows, 1 + new_p] = sep
        ids[rows, 2 + new_p + new_h] = sep
        for toks, lens, new_lens, col0 in ((p_tok, lp, new_p, 1), (h_tok, lh, new_h, 2 + new_p)):
            flat = vocab.lookup_array([t for s in toks for t in s])
            row = np.repeat(rows, lens)
            pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
            keep = pos < new_lens[row]
            start = col0[row] if isinstance(col0, np.ndarray) else col0
            ids[row[keep], (start + pos)[keep]] = flat[keep]
        valid = new_p + new_h + 3
        cols = np.arange(L)[None, :]
        segments = ((cols >= (new_p + 2)[:, None]) & (cols < valid[:, None])).astype(np.int64)
        return torch.from_numpy(ids), torch.from_numpy(segments), torch.from_numpy(valid)

    def __getitem__(self, idx):
        return (self.all_token_ids[idx], self.all_segments[idx],
                self.valid_lens[idx]), self.labels[idx]

    def __len__(self):
        return len(self.all_token_ids)
