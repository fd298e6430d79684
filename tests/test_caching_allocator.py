"""The caching CPU allocator (csrc/caching_allocator.cpp; policy in fastbert/cpu_cache.py,
FASTBERT_CPU_CACHE_MB): on by default at the documented limit, off with 0; large blocks come
back from the cache, data stays intact, the limit holds, small blocks are untouched, the
run-time controls work, and a bad setting is a clear warning.  Each case runs in a fresh
interpreter: the allocator is process-wide."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastbert.backends.cpp")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import torch, fastbert
stats = torch.ops.fastbert.cpu_caching_allocator_stats
assert stats()[1] == 64 << 20, stats()           # the limit from FASTBERT_CPU_CACHE_MB
x = torch.randn(1000, 1000)                      # 4 MB: cached on free
ptr = x.data_ptr()
del x
assert stats()[0] >= 4_000_000, stats()
y = torch.full((990, 1000), 3.0)                 # same size class: the same block again
assert y.data_ptr() == ptr and bool((y == 3.0).all())
h0 = stats()[2]
for _ in range(5):                               # a train-step-like loop: all hits
    z = torch.ones(1000, 1000) * 2
    assert float(z.sum()) == 2e6
    del z
assert stats()[2] >= h0 + 5, stats()
small = [torch.ones(10) for _ in range(100)]     # small blocks are not cached
del small
big = [torch.empty(5_000_000) for _ in range(5)] # 100 MB: more than the 64 MB limit
del big
assert stats()[0] <= 64 << 20, stats()
# The model still trains and matches the reference with the allocator on.
torch.manual_seed(0)
m = fastbert.BERTModel(100, 32, [32], 32, 64, 2, 1, 0.0, max_len=16, key_size=32,
                       query_size=32, value_size=32, hid_in_features=32,
                       mlm_in_features=32, nsp_in_features=32)
tok = torch.randint(0, 100, (3, 9)); seg = torch.zeros(3, 9, dtype=torch.long)
vl = torch.tensor([9, 4, 1])
with fastbert.use_backend("cpp"):
    a = m(tok, seg, vl)[2]
with fastbert.use_backend("reference"):
    b = m(tok, seg, vl)[2]
torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


def run(env_value):
    env = dict(os.environ, FASTBERT_CPU_CACHE_MB=env_value, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cache_hits_keep_data_and_respect_the_limit():
    r = run("64")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


CONTROLS = r"""
import torch, fastbert
from fastbert import cpu_cache
info = fastbert.cpu_cache_info
expected = min(1024, cpu_cache.default_cpu_cache_mb())
assert info()["installed"] == 1 and info()["limit_bytes"] == expected << 20, info()
x = torch.randn(1000, 1000); del x               # 4 MB: cached on free
assert info()["cached_bytes"] >= 4_000_000, info()
fastbert.empty_cpu_cache()                       # released, limit kept
assert info()["cached_bytes"] == 0 and info()["limit_bytes"] == expected << 20, info()
w = torch.randn(1000, 1000); del w               # cached before the pause
with fastbert.cpu_cache_disabled():              # as without the cache; what was cached stays
    h = info()["hits"]
    y = torch.randn(1000, 1000); del y
    assert info()["hits"] == h and info()["cached_bytes"] == 4 << 20, info()
v = torch.randn(1000, 1000)                      # resumed: the block cached before comes back
assert info()["hits"] == h + 1, info()
del v
fastbert.set_cpu_cache_mb(8)
z = [torch.empty(1_000_000) for _ in range(4)]  # 16 MB freed, 8 MB kept at most
z.clear()
assert 0 < info()["cached_bytes"] <= 8 << 20, info()
del z
fastbert.empty_cpu_cache()                       # LRU: a stale size makes room for a live one
a = torch.empty(1_500_000); del a                # 6 MB class cached
b = torch.empty(1_000_000); del b                # 4 MB: 6 + 4 > 8, the stale 6 MB block goes
assert info()["cached_bytes"] == 4 << 20, info()
h = info()["hits"]
c = torch.empty(1_000_000)
assert info()["hits"] == h + 1, info()
del c
for bad in (-1, 1.5, True):
    try:
        fastbert.set_cpu_cache_mb(bad)
    except ValueError:
        pass
    else:
        raise AssertionError(bad)
print("ok")
"""


def test_on_by_default_and_controls():
    env = {k: v for k, v in os.environ.items() if k != "FASTBERT_CPU_CACHE_MB"}
    env["PYTHONPATH"] = REPO
    r = subprocess.run([sys.executable, "-c", CONTROLS], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_zero_leaves_it_out():
    """FASTBERT_CPU_CACHE_MB=0: c10's own allocator, as without fastbert."""
    env = dict(os.environ, FASTBERT_CPU_CACHE_MB="0", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", "import torch, fastbert; "
                        "print(torch.ops.fastbert.cpu_caching_allocator_stats())"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[0, 0, 0, 0, 0, 0]", r.stderr[-2000:]


def test_bad_setting_warns_and_keeps_the_backend():
    env = dict(os.environ, FASTBERT_CPU_CACHE_MB="lots", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", "import torch, fastbert; "
                        "print(fastbert.available_backends()['cpp'], "
                        "torch.ops.fastbert.cpu_caching_allocator_stats())"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "available [0, 0, 0, 0, 0, 0]", r.stderr[-2000:]
    assert "FASTBERT_CPU_CACHE_MB must be a non-negative integer" in r.stderr
