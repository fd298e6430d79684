"""The caching CPU allocator's effect on the bert.small SNLI fine-tuning train step
(BERTClassifier, batch 64, forward + CE loss + backward + Adam; profile_train_step.py's step),
fp32 and bf16 autocast, cpp backend.

Each measurement is its own process (the allocator is process-wide): ``off`` is a process
as ``import fastbert`` leaves it (torch's allocator), ``on`` installs the cache as a training
run does (``fastbert.cpu_cache.install_for_training()``, FASTBERT_CPU_CACHE_MB or the
default).  Every step gets a fresh SNLI-length batch, as training does (the token count, and
so the large blocks' sizes, change from step to step).  Processes alternate off/on (the order
flips every round) and repeat, so the spread of a shared machine shows in the figures.

    python benchmarks/allocator_train_step.py [--rounds 3] [--steps 24] [--warmup 8]
        [--threads 2] [--amp fp32 bf16]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(a):
    import torch
    sys.path.insert(0, HERE)
    import profile_train_step as p
    import fastbert
    torch.set_num_threads(a.threads)
    if a.cache == "on":
        assert fastbert.cpu_cache.install_for_training(), "the cache did not install"
    assert fastbert.cpu_cache_info()["installed"] == (a.cache == "on")
    bf16 = a.amp == "bf16"
    net, opt = p.make_net()
    batches = [p.make_batch(1000 + s) for s in range(a.warmup + a.steps)]  # all distinct
    times = []
    with fastbert.use_backend("cpp"):
        for i, batch in enumerate(batches):
            t = time.perf_counter()
            p.step(net, opt, batch, bf16)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    print(json.dumps({"median_ms": 1e3 * statistics.median(times),
                      "hits": fastbert.cpu_cache_info()["hits"]}))


def run_child(a, amp, cache):
    cmd = [sys.executable, __file__, "--child", "--amp", amp, "--cache", cache,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{amp} cache {cache} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["median_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--cache", choices=("on", "off"))
    ap.add_argument("--amp", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.child:
        a.amp = a.amp[0]
        return child(a)
    res = {(amp, c): [] for amp in a.amp for c in ("off", "on")}
    for r in range(a.rounds):
        for amp in a.amp:
            for c in (("off", "on") if r % 2 == 0 else ("on", "off")):
                res[(amp, c)].append(run_child(a, amp, c))
                print(f"round {r} {amp} cache {c}: {res[(amp, c)][-1]:.1f} ms", flush=True)
    print(f"\nbert.small train step, batch 64, fresh SNLI-length batches, cpp backend, "
          f"threads={a.threads}, median of {a.steps} steps per process")
    for amp in a.amp:
        off, on = res[(amp, "off")], res[(amp, "on")]
        ratios = [x / y for x, y in zip(off, on)]
        print(f"{amp}: off {' '.join(f'{x:.1f}' for x in off)} ms | on "
              f"{' '.join(f'{x:.1f}' for x in on)} ms | off/on per round "
              f"{' '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
