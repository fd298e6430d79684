"""GlobalBatchSampler (shuffling, bucketing, rank split, resume) and trim_collate."""
import numpy as np
import pytest
import torch

from fastbert import BERTModel
from fastbert.data import GlobalBatchSampler, trim_collate


@pytest.mark.parametrize("bucket", [False, True])
def test_each_example_once_and_deterministic(bucket):
    lengths = np.random.default_rng(0).integers(3, 60, 1003)
    s = GlobalBatchSampler(1003, 64, seed=3, lengths=lengths, bucket=bucket, bucket_chunk=4)
    batches = s.global_batches(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1003))
    assert all(len(b) == 64 for b in batches[:-1] if not bucket)
    assert [b.tolist() for b in batches] == [b.tolist() for b in s.global_batches(0)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in s.global_batches(1)]


def test_bucketing_reduces_padding():
    lengths = np.random.default_rng(0).integers(3, 60, 4000)
    pad = {}
    for bucket in (False, True):
        s = GlobalBatchSampler(4000, 64, seed=0, lengths=lengths, bucket=bucket)
        pad[bucket] = sum(lengths[b].max() * len(b) - lengths[b].sum()
                          for b in s.global_batches(0))
    assert pad[True] < 0.2 * pad[False]


def test_ranks_partition_the_global_batch_and_resume_skips():
    one = GlobalBatchSampler(103, 10, seed=1)
    ranks = [GlobalBatchSampler(103, 10, seed=1, rank=r, world_size=3) for r in range(3)]
    whole = list(one)
    per_rank = [list(r) for r in ranks]
    assert len(whole) == len(per_rank[0]) == 11
    for i, b in enumerate(whole):
        assert sum((p[i] for p in per_rank), []) == b
    one.set_epoch(0, start_step=4)
    assert list(one) == whole[4:] and len(one) == 7
    # A last batch smaller than the world cannot feed every rank: dropped in training,
    # kept for evaluation, where a rank without an example skips it.
    assert len(GlobalBatchSampler(21, 10, rank=0, world_size=3).global_batches()) == 2
    ev = [list(GlobalBatchSampler(21, 10, shuffle=False, rank=r, world_size=3,
                                  keep_uneven=True)) for r in range(3)]
    assert [len(e) for e in ev] == [3, 2, 2] and ev[0][-1] == [20]
    assert sorted(i for e in ev for b in e for i in b) == list(range(21))
    with pytest.raises(ValueError, match="at least the number of processes"):
        GlobalBatchSampler(10, 2, world_size=3)


def test_trim_collate_is_exact():
    torch.manual_seed(0)
    net = BERTModel(50, 16, [16], 16, 32, 2, 2, 0.0, max_len=40, key_size=16, query_size=16,
                    value_size=16, hid_in_features=16, mlm_in_features=16,
                    nsp_in_features=16).eval()
    items = []
    for n in (5, 11, 3):
        tok = torch.zeros(40, dtype=torch.long)
        tok[:n] = torch.randint(1, 50, (n,))
        items.append(((tok, (torch.arange(40) > n // 2).long() * (torch.arange(40) < n),
                       torch.tensor(n)), torch.tensor(1)))
    (t, s, v), y = trim_collate(items, nested=True, multiple=8)
    assert t.shape == (3, 16) and s.shape == (3, 16)
    full = torch.utils.data.default_collate(items)[0]
    with torch.no_grad():
        a = net(t, s, v)[2]
        b = net(*full)[2]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
