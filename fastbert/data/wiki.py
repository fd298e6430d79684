"""WikiText-2 pretraining data with the book's semantics (``_read_wiki``,
``_get_nsp_data_from_paragraph``, ``_get_mlm_data_from_tokens``, ``_pad_bert_inputs``,
``_WikiTextDataset``, ``load_data_wiki``).

The random choices are the book's, call for call, on a ``random.Random``-like ``rng``
(the global ``random`` module by default, as in the book): with the same seed this module
produces exactly the book's examples.  The padding step builds whole numpy arrays
instead of ~300,000 small tensors, and the dataset stores stacked tensors.
"""
from __future__ import annotations

import gzip
import os
import random
from typing import List, Optional

import numpy as np
import torch

from .vocab import Vocab

__all__ = ["find_wiki_file", "wiki_file_candidates", "read_wiki", "get_nsp_data_from_paragraph",
           "get_mlm_data_from_tokens", "pad_bert_inputs", "WikiTextDataset", "load_data_wiki",
           "BERT_RESERVED_TOKENS"]

BERT_RESERVED_TOKENS = ["<pad>", "<mask>", "<cls>", "<sep>"]


def wiki_file_candidates(data_dir: str, split: str = "train") -> List[str]:
    """The paths :func:`find_wiki_file` tries, in order."""
    return [os.path.join(data_dir, sub, name) for sub in ("", "wikitext-2")
            for name in (f"wiki.{split}.tokens", f"wiki.{split}.tokens.gz")]


def find_wiki_file(data_dir: str, split: str = "train") -> str:
    """``wiki.<split>.tokens`` (or ``.gz``) in ``data_dir`` or its ``wikitext-2/`` folder."""
    for path in wiki_file_candidates(data_dir, split):
        if os.path.isfile(path):
            return path
    from .paths import DataNotFoundError, not_found_hint
    raise DataNotFoundError(
        f"no WikiText-2 {split!r} file under {data_dir!r} (looked for wiki.{split}.tokens[.gz] "
        f"there and in wikitext-2/).\n" + not_found_hint("wikitext-2"))


def read_wiki(data_dir: str, split: str = "train", rng=random,
              max_paragraphs: Optional[int] = None) -> List[List[str]]:
    """The book's ``_read_wiki``: lowercased lines split on ``' . '``, kept when they hold
    at least two sentences, shuffled with ``rng``.  ``max_paragraphs`` keeps the first
    paragraphs of the file (before shuffling) for quick runs.  ``data_dir`` may also be the
    ``.tokens[.gz]`` file itself."""
    path = data_dir if os.path.isfile(data_dir) else find_wiki_file(data_dir, split)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    paragraphs = [line.strip().lower().split(" . ")
                  for line in lines if len(line.split(" . ")) >= 2]
    if max_paragraphs is not None:
        paragraphs = paragraphs[:max_paragraphs]
    if not paragraphs:
        raise ValueError(f"{path} holds no paragraph with two or more sentences "
                         "(is it a WikiText-2 .tokens file?)")
    rng.shuffle(paragraphs)
    return paragraphs


def _get_next_sentence(sentence, next_sentence, paragraphs, rng):
    if rng.random() < 0.5:
        is_next = True
    else:
        next_sentence = rng.choice(rng.choice(paragraphs))
        is_next = False
    return sentence, next_sentence, is_next


def get_nsp_data_from_paragraph(paragraph, paragraphs, max_len: int, rng=random):
    """NSP examples ``(tokens, segments, is_next)`` of one tokenized paragraph (book)."""
    out = []
    for i in range(len(paragraph) - 1):
        tokens_a, tokens_b, is_next = _get_next_sentence(paragraph[i], paragraph[i + 1],
                                                         paragraphs, rng)
        if len(tokens_a) + len(tokens_b) + 3 > max_len:  # '<cls>' and two '<sep>'
            continue
        tokens = ["<cls>"] + tokens_a + ["<sep>"] + tokens_b + ["<sep>"]
        segments = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
        out.append((tokens, segments, is_next))
    return out


def get_mlm_data_from_tokens(tokens, vocab: Vocab, rng=random):
    """The book's MLM masking: 15% of the non-special positions (at least 1) are predicted;
    of those 80% become '<mask>', 10% stay, 10% become a random vocabulary token.
    Returns ``(input ids, sorted prediction positions, label ids)``."""
    candidates = [i for i, tok in enumerate(tokens) if tok not in ("<cls>", "<sep>")]
    num_mlm_preds = max(1, round(len(tokens) * 0.15))
    mlm_input = list(tokens)
    preds = []
    rng.shuffle(candidates)
    idx_to_token = vocab.idx_to_token
    for pos in candidates:
        if len(preds) >= num_mlm_preds:
            break
        if rng.random() < 0.8:
            masked = "<mask>"
        elif rng.random() < 0.5:
            masked = tokens[pos]
        else:
            masked = rng.choice(idx_to_token)
        mlm_input[pos] = masked
        preds.append((pos, tokens[pos]))
    preds.sort(key=lambda x: x[0])
    return vocab[mlm_input], [p for p, _ in preds], vocab[[t for _, t in preds]]


def _fill_rows(rows: List[List[int]], width: int, fill) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.asarray(fill).dtype)
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((v for r in rows for v in r), dtype=out.dtype, count=int(lens.sum()))
    row_idx = np.repeat(np.arange(len(rows)), lens)
    col_idx = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    out[row_idx, col_idx] = flat
    return out


def pad_bert_inputs(examples, max_len: int, vocab: Vocab):
    """The book's ``_pad_bert_inputs`` as stacked tensors: token ids (padded with '<pad>'),
    segments (0), float32 valid lengths, prediction positions (0), float32 MLM weights
    (1 real / 0 padding slot), MLM labels (0) and NSP labels, with
    ``max_num_mlm_preds = round(max_len * 0.15)`` slots."""
    max_preds = round(max_len * 0.15)
    token_ids = [e[0] for e in examples]
    positions = [e[1] for e in examples]
    labels = [e[2] for e in examples]
    segments = [e[3] for e in examples]
    lens = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(examples))
    n_preds = np.fromiter(map(len, positions), dtype=np.int64, count=len(examples))
    if len(examples) and (lens.max() > max_len or n_preds.max() > max_preds):
        raise ValueError("an example is longer than max_len or has more than "
                         "round(max_len * 0.15) predictions")
    weights = (np.arange(max_preds)[None, :] < n_preds[:, None]).astype(np.float32)
    return (torch.from_numpy(_fill_rows(token_ids, max_len, np.int64(vocab["<pad>"]))),
            torch.from_numpy(_fill_rows(segments, max_len, np.int64(0))),
            torch.from_numpy(lens.astype(np.float32)),
            torch.from_numpy(_fill_rows(positions, max_preds, np.int64(0))),
            torch.from_numpy(weights),
            torch.from_numpy(_fill_rows(labels, max_preds, np.int64(0))),
            torch.tensor([bool(e[4]) for e in examples], dtype=torch.long))


class WikiTextDataset(torch.utils.data.Dataset):
    """The book's ``_WikiTextDataset``: items are ``(token_ids, segments, valid_len,
    pred_positions, mlm_weights, mlm_labels, nsp_label)``.  ``vocab``: reuse a vocabulary
    (default: built from these paragraphs with ``min_freq=5`` and the BERT reserved tokens)."""

    def __init__(self, paragraphs, max_len: int, vocab: Optional[Vocab] = None, rng=random,
                 min_freq: int = 5):
        paragraphs = [[s.split() for s in paragraph] for paragraph in paragraphs]
        sentences = [s for paragraph in paragraphs for s in paragraph]
        self.vocab = vocab if vocab is not None else Vocab(
            sentences, min_freq=min_freq, reserved_tokens=BERT_RESERVED_TOKENS)
        examples = []
        for paragraph in paragraphs:
            examples.extend(get_nsp_data_from_paragraph(paragraph, paragraphs, max_len, rng))
        examples = [get_mlm_data_from_tokens(tokens, self.vocab, rng) + (segments, is_next)
                    for tokens, segments, is_next in examples]
        (self.all_token_ids, self.all_segments, self.valid_lens, self.all_pred_positions,
         self.all_mlm_weights, self.all_mlm_labels, self.nsp_labels) = pad_bert_inputs(
            examples, max_len, self.vocab)
        self.lengths = self.valid_lens.numpy().astype(np.int64)

    def __getitem__(self, idx):
        return (self.all_token_ids[idx], self.all_segments[idx], self.valid_lens[idx],
                self.all_pred_positions[idx], self.all_mlm_weights[idx],
                self.all_mlm_labels[idx], self.nsp_labels[idx])

    def __len__(self):
        return len(self.all_token_ids)


def load_data_wiki(batch_size: int, max_len: int, data_dir: Optional[str] = None,
                   num_workers: int = 0, split: Optional[str] = None):
    """The book's ``load_data_wiki``: a shuffled DataLoader and the vocabulary.  Reads the
    ``train`` split from ``data_dir``, else ``FASTBERT_DATA``, the cache or (with a printed
    note, when no train split is anywhere and no ``split`` was named) the packaged ``valid``
    split, instead of downloading (see :mod:`fastbert.data.paths`)."""
    from .paths import locate_wiki
    source, notice = locate_wiki(split, data_dir)
    if notice:
        print(notice)
    (path,) = source.files.values()
    train_set = WikiTextDataset(read_wiki(path), max_len)
    loader = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True,
                                         num_workers=num_workers)
    return loader, train_set.vocab
