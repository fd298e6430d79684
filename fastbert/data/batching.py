"""Deterministic, resumable batching: shuffling, optional length bucketing, and the split
of each global batch across data-parallel ranks.

``--batch-size`` is the *global* batch (the book's 512): every rank draws the same global
batch of indices (seeded by ``seed`` and ``epoch`` only, so no RNG state needs saving) and
takes its contiguous share.  ``start_step`` skips batches already done, for exact resume.
``trim_collate`` cuts padding columns beyond the longest valid length in a batch.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["GlobalBatchSampler", "trim_collate"]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's index list for each global batch of an epoch.

    ``bucket``: group examples of similar valid length (``lengths``) into the same batch:
    the shuffled order is cut into chunks of ``bucket_chunk`` batches, each chunk sorted by
    length and cut into batches, and the batch order shuffled again.  Less padding, same
    examples per epoch.
    """

    def __init__(self, num_examples: int, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, lengths: Optional[Sequence[int]] = None,
                 bucket: bool = False, bucket_chunk: int = 50, rank: int = 0,
                 world_size: int = 1, keep_uneven: bool = False):
        if batch_size < world_size:
            raise ValueError(f"the global batch size ({batch_size}) must be at least the "
                             f"number of processes ({world_size})")
        if bucket and lengths is None:
            raise ValueError("length bucketing needs the examples' lengths")
        self.n, self.batch_size, self.shuffle, self.seed = num_examples, batch_size, shuffle, seed
        self.drop_last, self.bucket, self.bucket_chunk = drop_last, bucket, bucket_chunk
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.rank, self.world_size = rank, world_size
        # keep_uneven (evaluation): keep a last batch smaller than the world; ranks left
        # without an example skip it (no collective runs per batch there).
        self.keep_uneven = keep_uneven
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def global_batches(self, epoch: Optional[int] = None) -> List[np.ndarray]:
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        bs = self.batch_size
        if self.bucket:
            chunk = bs * self.bucket_chunk
            batches = []
            for c in range(0, self.n, chunk):
                part = order[c:c + chunk]
                part = part[np.argsort(self.lengths[part], kind="stable")]
                batches += [part[i:i + bs] for i in range(0, len(part), bs)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = [order[i:i + bs] for i in range(0, self.n, bs)]
        # A short batch is dropped when asked, or when it cannot give every rank an example.
        return [b for b in batches if len(b) == bs or not (
            self.drop_last or (len(b) < self.world_size and not self.keep_uneven))]

    def __iter__(self) -> Iterator[List[int]]:
        for b in self.global_batches()[self.start_step:]:
            mine = np.array_split(b, self.world_size)[self.rank].tolist()
            if mine:
                yield mine

    def __len__(self) -> int:
        return sum(1 for b in self.global_batches()[self.start_step:]
                   if len(b) > self.rank)


def trim_collate(batch, valid_len_index: int = 2, seq_fields=(0, 1), multiple: int = 8,
                 nested: bool = False):
    """Default-collate, then cut the sequence fields to the batch's longest valid length
    (rounded up to ``multiple``, to bound the number of distinct shapes under
    ``torch.compile``).  Exact: positions past every valid length only hold padding.
    ``nested``: items are ``((tokens, segments, valid_len), label)`` (SNLI)."""
    out = torch.utils.data.default_collate(batch)
    fields = list(out[0]) if nested else list(out)
    L = fields[seq_fields[0]].shape[1]
    longest = int(torch.ceil(fields[valid_len_index].max()).item()) if len(batch) else L
    keep = min(L, max(1, -(-longest // multiple) * multiple))
    for i in seq_fields:
        fields[i] = fields[i][:, :keep]
    return (fields, out[1]) if nested else fields
