"""The book's text preprocessing: ``tokenize`` and ``Vocab`` with identical token ids.

d2l builds a ``collections.Counter`` over the flattened tokens and sorts its items by
frequency, descending, with Python's stable sort: ties keep the Counter's insertion order
(first occurrence).  ``'<unk>'`` is index 0, the reserved tokens follow, then every token
with ``freq >= min_freq``.  This class does exactly that and adds array lookups
(:meth:`Vocab.lookup_array`) for vectorized dataset building.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np

__all__ = ["tokenize", "count_corpus", "Vocab"]


def tokenize(lines: Iterable[str], token: str = "word") -> List[List[str]]:
    """Split text lines into word or character tokens (d2l)."""
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ValueError(f"unknown token type {token!r}: use 'word' or 'char'")


def count_corpus(tokens) -> collections.Counter:
    """Token frequencies of a 1-D or 2-D token list (d2l)."""
    if len(tokens) == 0 or isinstance(tokens[0], list):
        tokens = [tok for line in tokens for tok in line]
    return collections.Counter(tokens)


class Vocab:
    """Vocabulary for text (d2l 0.17 ``Vocab``; same ids for the same input)."""

    def __init__(self, tokens=None, min_freq: int = 0,
                 reserved_tokens: Optional[Sequence[str]] = None):
        tokens = [] if tokens is None else tokens
        reserved_tokens = [] if reserved_tokens is None else list(reserved_tokens)
        counter = count_corpus(tokens)
        # Stable sort: equal frequencies keep first-occurrence order, as in d2l.
        self._token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
        self.idx_to_token = ["<unk>"] + reserved_tokens
        self.token_to_idx = {tok: idx for idx, tok in enumerate(self.idx_to_token)}
        for tok, freq in self._token_freqs:
            if freq < min_freq:
                break
            if tok not in self.token_to_idx:
                self.idx_to_token.append(tok)
                self.token_to_idx[tok] = len(self.idx_to_token) - 1

    @classmethod
    def from_idx_to_token(cls, idx_to_token: Sequence[str]) -> "Vocab":
        """A vocabulary with a given id order (the book's ``vocab.json`` loading)."""
        vocab = cls()
        vocab.idx_to_token = list(idx_to_token)
        vocab.token_to_idx = {tok: idx for idx, tok in enumerate(vocab.idx_to_token)}
        return vocab

    @classmethod
    def load_json(cls, path: str) -> "Vocab":
        try:
            with open(path, "r", encoding="utf-8") as f:
                idx_to_token = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(idx_to_token, list) or not all(isinstance(t, str) for t in idx_to_token):
            raise ValueError(f"{path} must hold a JSON list of token strings (idx_to_token)")
        return cls.from_idx_to_token(idx_to_token)

    def save_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.idx_to_token, f)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        get, unk = self.token_to_idx.get, self.unk
        return [get(tok, unk) for tok in tokens]

    def lookup_array(self, tokens: Sequence[str]) -> np.ndarray:
        """Ids of a flat token sequence as an int64 array (unknown tokens give 0)."""
        get, unk = self.token_to_idx.get, self.unk
        return np.fromiter((get(tok, unk) for tok in tokens), dtype=np.int64, count=len(tokens))

    def to_tokens(self, indices):
        if not isinstance(indices, (list, tuple)):
            return self.idx_to_token[indices]
        return [self.idx_to_token[i] for i in indices]

    @property
    def unk(self) -> int:  # index of the unknown token
        return 0

    @property
    def token_freqs(self):
        return self._token_freqs
