"""The caching CPU allocator (csrc/caching_allocator.cpp; policy in fastbert/cpu_cache.py,
FASTBERT_CPU_CACHE_MB).

Opt-in: ``import fastbert`` and running a model leave torch's allocator alone; a training run
installs it (0: never).  Once installed: large blocks come back from the cache, data stays
intact, the limit holds with LRU eviction, small blocks never enter it, the pause nests and
is safe from several threads, and fork() while other threads use it never deadlocks the
child.  Each case runs in a fresh interpreter: the allocator is process-wide."""
import os
import subprocess
import sys

import pytest

from op_testing import require_extension

require_extension(module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def run(script, env_value=None, args=(), timeout=300):
    """Run ``script`` in a fresh interpreter (FASTBERT_CPU_CACHE_MB=env_value, unset if None);
    it must print 'ok' last."""
    env = {k: v for k, v in os.environ.items() if k != "FASTBERT_CPU_CACHE_MB"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS])
    if env_value is not None:
        env["FASTBERT_CPU_CACHE_MB"] = env_value
    r = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), \
        f"rc={r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}"
    return r


# Two threads that allocate and free cached-size blocks inside torch ops (GIL released) until
# ``stop`` is set; scripts start them.  Forking while they run is what a DataLoader does.
CHURN = r"""
import threading, torch
stop = threading.Event()
def churn():
    xs = [torch.ones(1 << 18, requires_grad=True) for _ in range(4)]
    while not stop.is_set():                     # backward: many 1 MiB blocks, no GIL
        y = xs[0]
        for x in xs * 8:
            y = y * x
        y.sum().backward()
        for x in xs:
            x.grad = None
threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
"""

UNTOUCHED = r"""
import torch, fastbert
info = fastbert.cpu_cache_info
assert fastbert.available_backends()["cpp"] == "available", fastbert.available_backends()
assert info()["installed"] == 0 and info()["torch_default_allocator"] == 1, info()
torch.manual_seed(0)
m = fastbert.BERTModel(1000, 64, [64], 64, 128, 2, 2, 0.0, max_len=64, key_size=64,
                       query_size=64, value_size=64, hid_in_features=64,
                       mlm_in_features=64, nsp_in_features=64)
clf = fastbert.BERTClassifier(m)
tok = torch.randint(0, 1000, (8, 40)); seg = torch.zeros(8, 40, dtype=torch.long)
vl = torch.tensor([40, 30, 20, 10, 5, 3, 2, 1])
with fastbert.use_backend("cpp"), fastbert.backends.dispatch_log() as log:
    clf((tok, seg, vl)).sum().backward()
assert log and {b for _, b in log} == {"cpp"}, log
with fastbert.use_backend("cpp"):
    big = torch.randn(1000, 1000); del big          # 4 MB: would be cached if installed
assert info()["installed"] == 0 and info()["torch_default_allocator"] == 1, info()
assert info()["hits"] == info()["misses"] == 0, info()
print("ok")
"""


def test_import_and_model_leave_the_allocator_alone():
    run(UNTOUCHED)


TRAINING = CHURN + r"""
import fastbert
from fastbert.train import FinetuneConfig, finetune
from train_testing import DATA, TINY
info = fastbert.cpu_cache_info
assert info()["installed"] == 0, info()
# Threads that allocate and free large blocks all along (CHURN), while the DataLoader forks
# its workers (fork start method: Linux's default on this Python).
import multiprocessing as mp
mp.set_start_method("fork", force=True)
[t.start() for t in threads]
finetune(FinetuneConfig(data_dir=DATA, max_len=32, train_limit=256, test_limit=64,
                        batch_size=32, epochs=2, max_steps=6, num_workers=2, backend="cpp",
                        device="cpu", threads=1, progress=False, verbose=False, **TINY))
stop.set(); [t.join() for t in threads]
expected = int(__import__("sys").argv[1])
assert info()["installed"] == (expected > 0), info()
assert info()["limit_bytes"] == expected << 20, info()
if expected:
    assert info()["torch_default_allocator"] == 0 and info()["hits"] > 0, info()
print("ok")
"""


def test_training_installs_it_and_forked_loader_workers_do_not_hang():
    from fastbert.cpu_cache import default_cpu_cache_mb
    run(TRAINING, None, [str(default_cpu_cache_mb())], timeout=600)


def test_training_with_zero_never_installs_it():
    run(TRAINING, "0", ["0"], timeout=600)


SETTING = r"""
import fastbert
from fastbert.cpu_cache import install_for_training
assert install_for_training() is True
assert fastbert.cpu_cache_info()["limit_bytes"] == 48 << 20, fastbert.cpu_cache_info()
fastbert.set_cpu_cache_mb(16)                    # the user's limit: a later run keeps it
assert install_for_training() is True
assert fastbert.cpu_cache_info()["limit_bytes"] == 16 << 20, fastbert.cpu_cache_info()
print("ok")
"""


def test_training_install_reads_the_setting_and_keeps_a_users_limit():
    run(SETTING, "48")


CACHE = r"""
import torch, fastbert
info = fastbert.cpu_cache_info
fastbert.enable_cpu_cache(64)
assert info()["installed"] == 1 and info()["limit_bytes"] == 64 << 20, info()
assert info()["torch_default_allocator"] == 0, info()
x = torch.randn(1000, 1000)                      # 4 MB: cached on free
ptr = x.data_ptr()
del x
assert info()["cached_bytes"] >= 4_000_000, info()
y = torch.full((990, 1000), 3.0)                 # same size class: the same block again
assert y.data_ptr() == ptr and bool((y == 3.0).all())
del y
h0 = info()["hits"]
for _ in range(5):                               # a train-step-like loop: all hits
    z = torch.ones(1000, 1000) * 2
    assert float(z.sum()) == 2e6
    del z
assert info()["hits"] >= h0 + 5, info()
live, h, m = info()["live_blocks"], info()["hits"], info()["misses"]
small = [torch.ones(1000) for _ in range(100)]   # small blocks never enter the cache
assert (info()["live_blocks"], info()["hits"], info()["misses"]) == (live, h, m), info()
del small
big = [torch.empty(5_000_000) for _ in range(5)] # 100 MB: more than the 64 MB limit
del big
assert info()["cached_bytes"] <= 64 << 20, info()
fastbert.empty_cpu_cache()                       # released, limit kept
assert info()["cached_bytes"] == 0 and info()["limit_bytes"] == 64 << 20, info()
fastbert.set_cpu_cache_mb(8)
a = torch.empty(1_500_000); del a                # 6 MB class cached
b = torch.empty(1_000_000); del b                # 4 MB: 6 + 4 > 8, the stale 6 MB block goes
assert info()["cached_bytes"] == 4 << 20, info()
h = info()["hits"]
c = torch.empty(1_000_000)
assert info()["hits"] == h + 1, info()
del c
fastbert.set_cpu_cache_mb(0)                     # everything released, nothing cached any more
assert info()["cached_bytes"] == 0, info()
h, m = info()["hits"], info()["misses"]
d = torch.empty(1_000_000); del d
assert (info()["hits"], info()["misses"], info()["cached_bytes"]) == (h, m, 0), info()
fastbert.enable_cpu_cache()                      # back on, at the default limit
from fastbert.cpu_cache import default_cpu_cache_mb
assert info()["limit_bytes"] == default_cpu_cache_mb() << 20, info()
# The model still matches the reference with the allocator on.
torch.manual_seed(0)
mdl = fastbert.BERTModel(100, 32, [32], 32, 64, 2, 1, 0.0, max_len=16, key_size=32,
                         query_size=32, value_size=32, hid_in_features=32,
                         mlm_in_features=32, nsp_in_features=32)
tok = torch.randint(0, 100, (3, 9)); seg = torch.zeros(3, 9, dtype=torch.long)
vl = torch.tensor([9, 4, 1])
with fastbert.use_backend("cpp"):
    r1 = mdl(tok, seg, vl)[2]
with fastbert.use_backend("reference"):
    r2 = mdl(tok, seg, vl)[2]
torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
for bad in (-1, 1.5, True, "8"):
    for fn in (fastbert.set_cpu_cache_mb, fastbert.enable_cpu_cache):
        try:
            fn(bad)
        except ValueError as e:
            assert "limit_mb" in str(e), e
        else:
            raise AssertionError((fn, bad))
try:
    fastbert.enable_cpu_cache(0)
except ValueError as e:
    assert "positive" in str(e), e
else:
    raise AssertionError("enable_cpu_cache(0)")
print("ok")
"""


def test_cache_hits_keep_data_and_respect_the_limit():
    run(CACHE)


PAUSE = r"""
import threading, torch, fastbert
info = fastbert.cpu_cache_info
with fastbert.cpu_cache_disabled():              # a pause taken before the install counts
    fastbert.enable_cpu_cache(64)
    m = info()["misses"]
    x = torch.empty(1 << 20); del x
    assert info()["misses"] == m and info()["cached_bytes"] == 0, info()
assert info()["paused"] == 0, info()
w = torch.empty(1 << 20)                         # a cache block, alive across the pause
with fastbert.cpu_cache_disabled():
    with fastbert.cpu_cache_disabled():
        assert info()["paused"] == 2, info()
        v = torch.empty(1 << 20)                 # allocated while paused: c10's block
    assert info()["paused"] == 1, info()         # the inner exit keeps the outer pause
    h, m = info()["hits"], info()["misses"]
    y = torch.empty(1 << 20); del y
    assert (info()["hits"], info()["misses"]) == (h, m), info()
    del w                                        # a cache block freed while paused: kept
    assert info()["cached_bytes"] == 4 << 20, info()
assert info()["paused"] == 0, info()
del v                                            # freed after the pause: still c10's, not cached
assert info()["cached_bytes"] == 4 << 20, info()
h = info()["hits"]
u = torch.empty(1 << 20); del u                  # resumed: the cached block comes back
assert info()["hits"] == h + 1, info()
try:                                             # a resume without a pause is an error
    torch.ops.fastbert.pause_cpu_caching_allocator(False)
except RuntimeError as e:
    assert "not paused" in str(e), e
else:
    raise AssertionError("unbalanced resume")
# Two threads pausing and resuming independently, overlapping in every order.
barrier = threading.Barrier(2)
errors = []
def worker(i):
    try:
        for k in range(300):
            with fastbert.cpu_cache_disabled():
                if k % 7 == i:
                    barrier.wait()               # both inside at once now and then
                assert info()["paused"] >= 1
                t = torch.empty(1 << 18); del t
    except Exception as e:
        errors.append(e); barrier.abort()
ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
[t.start() for t in ts]; [t.join() for t in ts]
assert not errors, errors
assert info()["paused"] == 0, info()
h = info()["hits"]
u = torch.empty(1 << 20); del u                  # both done: the cache serves again
assert info()["hits"] == h + 1, info()
print("ok")
"""


def test_pause_nests_and_is_thread_safe():
    run(PAUSE)


# CHURN's threads allocate and free cached-size blocks while the main thread forks; each
# child allocates and frees a cached-size block and exits.  A child that inherited the cache's mutex locked would hang:
# the parent kills it after a deadline and fails (the subprocess timeout is the backstop).
FORK_STRESS = CHURN + r"""
import os, sys, time, fastbert
fastbert.enable_cpu_cache(64)
torch.set_num_threads(1)
forks = int(sys.argv[1])
[t.start() for t in threads]
for i in range(forks):
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            y = torch.full((1 << 19,), 2.0)      # 2 MiB: through the cache's mutex
            ok = float(y.sum()) == 2.0 * (1 << 19)
            del y
        finally:
            os._exit(0 if ok else 3)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9); os.waitpid(pid, 0)
            print(f"child {i} of {forks} hung (deadlock after fork)", flush=True)
            os._exit(1)
        time.sleep(0.0005)
    assert os.waitstatus_to_exitcode(status) == 0, (i, status)
stop.set(); [t.join() for t in threads]
assert fastbert.cpu_cache_info()["hits"] > 0
print("ok")
"""


def test_fork_while_other_threads_allocate_never_hangs_the_child():
    run(FORK_STRESS, args=["150"], timeout=600)


# The same churn while a DataLoader forks two workers per epoch, each making cached-size
# blocks; a hung worker fails through the loader's timeout.
DATALOADER = CHURN + r"""
import multiprocessing as mp, fastbert
mp.set_start_method("fork", force=True)
fastbert.enable_cpu_cache(64)
torch.set_num_threads(1)
class Big(torch.utils.data.Dataset):             # each item is a cached-size block
    def __len__(self): return 16
    def __getitem__(self, i): return torch.full((1 << 18,), float(i))
[t.start() for t in threads]
loader = torch.utils.data.DataLoader(Big(), batch_size=2, num_workers=2, timeout=120)
for epoch in range(20):                          # every epoch forks two new workers
    total = sum(float(b.sum()) for b in loader)
    assert total == sum(range(16)) * (1 << 18), total
stop.set(); [t.join() for t in threads]
print("ok")
"""


def test_forked_dataloader_workers_do_not_hang():
    run(DATALOADER, timeout=600)


def test_bad_setting_warns_and_training_runs_without_it():
    r = run("import warnings, fastbert\n"
            "from fastbert.cpu_cache import install_for_training\n"
            "assert install_for_training() is False\n"
            "assert fastbert.cpu_cache_info()['installed'] == 0\n"
            "print('ok')", "lots")
    assert "FASTBERT_CPU_CACHE_MB must be a non-negative integer" in r.stderr
