"""BERT WordPiece tokenization for Hugging Face checkpoints, and the pair encoder that turns
sentence pairs into the fast encoder's inputs.

    tok = WordPieceTokenizer.from_pretrained("path/to/checkpoint")   # reads vocab.txt
    tokens, segments, valid_lens = tok.encode_pairs(premises, hypotheses, max_len=64)

Each pair becomes ``[CLS] a [SEP] b [SEP]`` with segment ids 0 for ``[CLS] a [SEP]`` and 1
for ``b [SEP]`` (BERT's layout, the same as d2l's ``<cls> a <sep> b <sep>``).  Too-long
pairs are cut longest-first, one word piece at a time from the longer side (the hypothesis on
a tie), exactly as d2l's ``_truncate_pair_of_tokens`` (and the old Python ``BertTokenizer``).
The Rust ``tokenizers`` ``longest_first`` differs only when both sides end up cut to about
half the budget: it gives the odd leftover piece to the originally longer side, d2l to the
premise.  Pairs that fit are encoded exactly as Hugging Face encodes them.

Word pieces come from the Rust ``tokenizers`` package when it is installed (the ``hf``
extra: ``pip install tokenizers``), else from the pure-Python tokenizer below, which follows
Hugging Face's ``BertTokenizer`` (basic tokenization: clean text, split CJK characters,
lowercase and strip accents, split punctuation; then greedy longest-match WordPiece).  Both
give the same ids; tests/test_hf.py checks that on real SNLI sentences.
"""
from __future__ import annotations

import json
import os
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["WordPieceTokenizer", "truncate_pair"]

Text = Union[str, Sequence[str]]  # a sentence, or its whitespace tokens (d2l style)


def truncate_pair(a: List[int], b: Optional[List[int]], budget: int) -> None:
    """Cut ``a`` and ``b`` in place until ``len(a) + len(b) <= budget``, one piece at a
    time from the longer one (``b`` on a tie): longest-first, as d2l does."""
    if b is None:
        del a[max(budget, 0):]
        return
    while len(a) + len(b) > budget:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()


# ------------------------------------------------------------------ pure-Python WordPiece
def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # ASCII symbols count as punctuation for BERT even when Unicode says otherwise (e.g. "$").
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class _PythonWordPiece:
    """Hugging Face ``BertTokenizer`` semantics in plain Python (the fallback path)."""

    def __init__(self, vocab: Dict[str, int], lowercase: bool, strip_accents: Optional[bool],
                 tokenize_chinese_chars: bool, unk_token: str, max_chars_per_word: int = 100):
        self.vocab, self.lowercase = vocab, lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.unk_token, self.max_chars_per_word = unk_token, max_chars_per_word
        self._cache: Dict[str, List[str]] = {}

    def _basic(self, text: str) -> List[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if self.tokenize_chinese_chars and _is_cjk(cp):
                chars.extend((" ", ch, " "))
            else:
                chars.append(" " if _is_whitespace(ch) else ch)
        words = []
        for word in "".join(chars).split():
            if self.lowercase:
                word = word.lower()
            if self.strip_accents:
                word = "".join(c for c in unicodedata.normalize("NFD", word)
                               if unicodedata.category(c) != "Mn")
            current: List[str] = []
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append("".join(current))
                        current = []
                    words.append(ch)
                else:
                    current.append(ch)
            if current:
                words.append("".join(current))
        return words

    def _wordpiece(self, word: str) -> List[str]:
        if word in self._cache:
            return self._cache[word]
        pieces: List[str] = []
        start = 0 if len(word) <= self.max_chars_per_word else len(word)  # too long: [UNK]
        while start < len(word):
            end, found = len(word), None
            while start < end:  # greedy: the longest piece in the vocabulary
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = piece
                    break
                end -= 1
            if found is None:  # a word with an unknown part is one [UNK]
                pieces = [self.unk_token]
                break
            pieces.append(found)
            start = end
        if not pieces:
            pieces = [self.unk_token] if word else []
        self._cache[word] = pieces
        return pieces

    def tokenize(self, text: str) -> List[str]:
        return [p for w in self._basic(text) for p in self._wordpiece(w)]


class WordPieceTokenizer:
    """A BERT WordPiece vocabulary and tokenizer.

    Attributes: ``idx_to_token``, ``token_to_idx``, ``vocab_size`` (``len(tok)``) and the
    special ids ``pad_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``; ``backend`` is
    ``"tokenizers"`` or ``"python"``.
    """

    def __init__(self, vocab_file: str, lowercase: bool = True,
                 strip_accents: Optional[bool] = None, tokenize_chinese_chars: bool = True,
                 unk_token: str = "[UNK]", sep_token: str = "[SEP]", pad_token: str = "[PAD]",
                 cls_token: str = "[CLS]", mask_token: str = "[MASK]",
                 backend: Optional[str] = None):
        with open(vocab_file, "r", encoding="utf-8") as f:
            self.idx_to_token = [line.rstrip("\n") for line in f]
        self.token_to_idx = {}
        for i, tok in enumerate(self.idx_to_token):
            self.token_to_idx.setdefault(tok, i)  # HF keeps the first id of a duplicate
        self.vocab_file, self.lowercase = vocab_file, lowercase
        specials = {"unk": unk_token, "sep": sep_token, "pad": pad_token, "cls": cls_token,
                    "mask": mask_token}
        missing = [t for t in specials.values() if t not in self.token_to_idx]
        if missing:
            raise ValueError(f"{vocab_file}: special tokens {missing} are not in the vocabulary")
        for name, tok in specials.items():
            setattr(self, f"{name}_token", tok)
            setattr(self, f"{name}_id", self.token_to_idx[tok])
        if backend not in (None, "tokenizers", "python"):
            raise ValueError(f"backend must be None, 'tokenizers' or 'python', got {backend!r}")
        self._rust = None
        if backend in (None, "tokenizers"):
            try:
                from tokenizers import BertWordPieceTokenizer
            except ImportError:
                if backend == "tokenizers":
                    raise ImportError("the 'tokenizers' package is not installed: "
                                      "pip install tokenizers (or fastbert[hf])") from None
            else:
                self._rust = BertWordPieceTokenizer(
                    vocab_file, unk_token=unk_token, sep_token=sep_token, cls_token=cls_token,
                    pad_token=pad_token, mask_token=mask_token, clean_text=True,
                    handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents,
                    lowercase=lowercase)
        self._python = _PythonWordPiece(self.token_to_idx, lowercase, strip_accents,
                                        tokenize_chinese_chars, unk_token)
        self.backend = "tokenizers" if self._rust is not None else "python"

    @classmethod
    def from_pretrained(cls, path: str, backend: Optional[str] = None) -> "WordPieceTokenizer":
        """The tokenizer of a Hugging Face BERT folder: ``vocab.txt`` plus the casing options
        of ``tokenizer_config.json`` when present (``do_lower_case`` defaults to True, as
        in ``BertTokenizer``)."""
        vocab_file = os.path.join(path, "vocab.txt")
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"{path}: no vocab.txt (a BERT WordPiece vocabulary)")
        cfg = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, "r", encoding="utf-8") as f:
                cfg = json.load(f)
        names = {k: cfg[k] for k in ("unk_token", "sep_token", "pad_token", "cls_token",
                                     "mask_token") if isinstance(cfg.get(k), str)}
        return cls(vocab_file, lowercase=bool(cfg.get("do_lower_case", True)),
                   strip_accents=cfg.get("strip_accents"),
                   tokenize_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
                   backend=backend, **names)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    @property
    def vocab_size(self) -> int:
        return len(self.idx_to_token)

    # -------------------------------------------------------------- word pieces and ids
    @staticmethod
    def _as_text(text: Text) -> str:
        if isinstance(text, str):
            return text
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            return " ".join(text)
        raise TypeError(f"a sentence must be a str or a list of str tokens, got "
                        f"{type(text).__name__}")

    def tokenize(self, text: Text) -> List[str]:
        """Word pieces of one sentence (no special tokens)."""
        return [self.idx_to_token[i] for i in self.encode_batch([text])[0]]

    def encode_batch(self, texts: Sequence[Text]) -> List[List[int]]:
        """Word-piece ids of each sentence (no special tokens)."""
        texts = [self._as_text(t) for t in texts]
        if self._rust is not None:
            return [e.ids for e in self._rust.encode_batch(texts, add_special_tokens=False)]
        unk = self.unk_id
        return [[self.token_to_idx.get(p, unk) for p in self._python.tokenize(t)]
                for t in texts]

    # -------------------------------------------------------------- model inputs
    def encode_pairs(self, premises: Sequence[Text], hypotheses: Optional[Sequence[Text]] = None,
                     max_len: int = 128, pad_to_max_len: bool = False,
                     device: Union[str, torch.device, None] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode sentence pairs (or single sentences when ``hypotheses`` is None) as
        ``(tokens, segments, valid_lens)``: int64 tensors of shapes ``[B, L]``, ``[B, L]``
        and ``[B]``, ready for ``BERTModel(tokens, segments, valid_lens)`` /
        ``BERTClassifier((tokens, segments, valid_lens))``.

        ``L`` is the longest encoded pair (at most ``max_len``), or ``max_len`` with
        ``pad_to_max_len=True`` (the book pads every example to ``max_len``).  Pads hold
        ``pad_id`` with segment 0 and lie past ``valid_lens``."""
        if not isinstance(max_len, int) or isinstance(max_len, bool):
            raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
        specials = 2 if hypotheses is None else 3
        if max_len < specials:
            raise ValueError(f"max_len must be at least {specials} (the [CLS]/[SEP] tokens), "
                             f"got {max_len}")
        if isinstance(premises, str) or (hypotheses is not None and isinstance(hypotheses, str)):
            raise TypeError("premises and hypotheses must be lists of sentences, not one str")
        if hypotheses is not None and len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
        ids_a = self.encode_batch(premises)
        ids_b = self.encode_batch(hypotheses) if hypotheses is not None else [None] * len(ids_a)
        rows, segs = [], []
        for a, b in zip(ids_a, ids_b):
            truncate_pair(a, b, max_len - specials)
            row = [self.cls_id] + a + [self.sep_id]
            seg = [0] * len(row)
            if b is not None:
                row += b + [self.sep_id]
                seg += [1] * (len(b) + 1)
            rows.append(row)
            segs.append(seg)
        B = len(rows)
        L = max_len if pad_to_max_len else max((len(r) for r in rows), default=specials)
        tokens = torch.full((B, L), self.pad_id, dtype=torch.long)
        segments = torch.zeros((B, L), dtype=torch.long)
        valid_lens = torch.empty(B, dtype=torch.long)
        for i, (row, seg) in enumerate(zip(rows, segs)):
            tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            segments[i, :len(seg)] = torch.tensor(seg, dtype=torch.long)
            valid_lens[i] = len(row)
        if device is not None:
            tokens, segments, valid_lens = (t.to(device) for t in (tokens, segments, valid_lens))
        return tokens, segments, valid_lens

    __call__ = encode_pairs

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase}, "
                f"backend={self.backend!r})")
