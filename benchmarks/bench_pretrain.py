"""The book's BERT pretraining step, side by side: d2l eager fp32 (the real d2l 0.17.6
BERTModel and _get_batch_loss_bert), fastbert fp32 and fastbert bf16 autocast (fused MLM head
loss, fastbert.losses.bert_pretrain_loss), plus the MLM head alone.

    pytest benchmarks/bench_pretrain.py --benchmark-only

The recipe (d2l "Pretraining BERT"): batch 512, max_len 64, 128 hidden, 2 heads, 2 layers,
FFN 256, dropout 0.2, Adam lr 0.01, the 20,256-token WikiText-2 vocab, 10 prediction slots
per sequence.  One step = zero_grad, forward, both losses, backward, Adam step.  The batch is
512 real examples of WikiText-2 built by fastbert.data.wiki (the book's pipeline); without
the data, a stand-in with the same shapes, lengths and slot-padding rate.

extra_info per step row: examples_per_s (sentence pairs/s), ratio_to_d2l_fp32, and the peak
memory of a step, measured in a fresh subprocess per implementation: the peak resident set
during the step (Linux VmHWM, reset through /proc/self/clear_refs just before the step) minus
the resident set once model, optimizer and batch exist (before the first step):
``peak_step_rss_mb`` for the first step and ``peak_steady_step_rss_mb`` for the third (both
include Adam's state, created by the first step); the d2l figures of the same run sit beside
them (``d2l_...``).  RSS counts what the allocator really holds, not what tensors use, so it
is an honest upper bound of both.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

BATCH, MAX_LEN, HIDDEN, FFN, HEADS, LAYERS, DROPOUT, LR = 512, 64, 128, 256, 2, 2, 0.2, 0.01
IMPLS = ("d2l-fp32", "fastbert-fp32", "fastbert-bf16")
BOOK_VOCAB = 20256
BOOK_SLOTS = 10          # round(64 * 0.15)


def book_bert(module, vocab_size: int) -> nn.Module:
    """d2l's pretraining chapter's model, from ``module`` (d2l.torch or fastbert)."""
    return module.BERTModel(vocab_size, num_hiddens=HIDDEN, norm_shape=[HIDDEN],
                            ffn_num_input=HIDDEN, ffn_num_hiddens=FFN, num_heads=HEADS,
                            num_layers=LAYERS, dropout=DROPOUT, key_size=HIDDEN,
                            query_size=HIDDEN, value_size=HIDDEN, hid_in_features=HIDDEN,
                            mlm_in_features=HIDDEN, nsp_in_features=HIDDEN)


def wiki_batch(seed: int = 0):
    """(batch tuple as the book's loader yields it, vocab size, source description)."""
    try:
        from fastbert.data.paths import locate
        from fastbert.data.wiki import WikiTextDataset, read_wiki
        rng = random.Random(seed)
        train = locate("wikitext-2", ["train"]).files["train"]  # FASTBERT_DATA or the cache
        dataset = WikiTextDataset(read_wiki(train, rng=rng), MAX_LEN,
                                  rng=rng)
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:BATCH]
        batch = tuple(t[idx] for t in (dataset.all_token_ids, dataset.all_segments,
                                       dataset.valid_lens, dataset.all_pred_positions,
                                       dataset.all_mlm_weights, dataset.all_mlm_labels,
                                       dataset.nsp_labels))
        return batch, len(dataset.vocab), f"wikitext-2 train ({len(dataset)} examples)"
    except (ImportError, OSError, FileNotFoundError, ValueError) as exc:
        return stand_in_batch(seed), BOOK_VOCAB, f"random stand-in ({type(exc).__name__})"


def stand_in_batch(seed: int = 0):
    """Same shapes, lengths and slot padding as a WikiText-2 batch, random content."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.randint(24, MAX_LEN + 1, (BATCH,), generator=g)  # ~31-34% padding slots
    tokens = torch.randint(5, BOOK_VOCAB, (BATCH, MAX_LEN), generator=g)
    tokens[torch.arange(MAX_LEN)[None, :] >= valid[:, None]] = 0
    segments = (torch.arange(MAX_LEN)[None, :] >= valid[:, None] // 2).long()
    # d2l: max(1, round(0.15 * len(tokens))) real slots, padded to round(0.15 * max_len).
    n_real = (valid.float() * 0.15).round().clamp(1, BOOK_SLOTS).long()
    real = torch.arange(BOOK_SLOTS)[None, :] < n_real[:, None]
    positions = (1 + torch.rand(BATCH, BOOK_SLOTS, generator=g) * (valid[:, None] - 2)).long()
    labels = torch.randint(5, BOOK_VOCAB, (BATCH, BOOK_SLOTS), generator=g)
    return (tokens, segments, valid.float(), positions * real, real.float(), labels * real,
            torch.randint(0, 2, (BATCH,), generator=g))


def make_step(impl: str, batch, vocab_size: int, d2l=None):
    """One training step of ``impl`` on ``batch`` (the book's train_bert loop body)."""
    torch.manual_seed(0)
    if impl.startswith("d2l"):
        net = book_bert(d2l, vocab_size)
        loss = nn.CrossEntropyLoss()

        def losses():
            return d2l._get_batch_loss_bert(net, loss, vocab_size, *batch)
    else:
        import fastbert
        from fastbert.losses import bert_pretrain_loss
        net = book_bert(fastbert, vocab_size)

        def losses():
            return bert_pretrain_loss(net, vocab_size, *batch)
    net.train()
    trainer = torch.optim.Adam(net.parameters(), lr=LR)
    lowp = impl.endswith("bf16")

    def step():
        trainer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lowp):
            mlm_l, nsp_l, l = losses()
        l.backward()
        trainer.step()
        return mlm_l.detach(), nsp_l.detach()
    return step


def make_head(impl: str, batch, vocab_size: int, d2l=None):
    """Forward + backward of the MLM head and its loss alone, on an encoder-shaped X."""
    torch.manual_seed(0)
    _, _, _, positions, weights, labels, _ = batch
    X = torch.randn(BATCH, MAX_LEN, HIDDEN, requires_grad=True)
    if impl.startswith("d2l"):
        head = d2l.MaskLM(vocab_size, HIDDEN, num_inputs=HIDDEN)
        loss = nn.CrossEntropyLoss()

        def fn():
            y_hat = head(X, positions)
            l = loss(y_hat.reshape(-1, vocab_size), labels.reshape(-1)) * weights.reshape(-1, 1)
            (l.sum() / (weights.sum() + 1e-8)).backward()
        return fn
    import fastbert
    from fastbert.losses import mlm_head_parameters
    head = fastbert.BERTModel(vocab_size, HIDDEN, [HIDDEN], HIDDEN, FFN, HEADS, 1, 0.0,
                              max_len=MAX_LEN, key_size=HIDDEN, query_size=HIDDEN,
                              value_size=HIDDEN, mlm_in_features=HIDDEN)
    *params, eps = mlm_head_parameters(head)
    lowp = impl.endswith("bf16")

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lowp):
            l = fastbert.ops.mlm_loss(X, positions, weights, labels, *params, eps=eps)
        l.backward()
    return fn


# ----------------------------------------------------------------------------- memory
def _rss_mb() -> dict:
    status = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_memory_child(impl: str, batch_file: str) -> dict:
    """Runs in a fresh process: the RSS growth of one step (first and third)."""
    torch.set_num_threads(int(os.environ.get("FASTBERT_BENCH_THREADS", torch.get_num_threads())))
    saved = torch.load(batch_file)
    d2l = harness.load_d2l_017() if impl.startswith("d2l") else None
    step = make_step(impl, saved["batch"], saved["vocab_size"], d2l)
    out = {}
    before = _rss_mb()["VmRSS"]  # model, optimizer (no state yet) and batch in memory
    for i in range(3):
        _reset_peak()
        step()
        if i in (0, 2):
            out["first" if i == 0 else "steady"] = _rss_mb()["VmHWM"] - before
    return out


def measure_peak_memory(impl: str, batch_file: str) -> dict:
    code = ("import sys, json; sys.path.insert(0, %r); import bench_pretrain as b; "
            "print(json.dumps(b.peak_memory_child(%r, %r)))" % (HERE, impl, batch_file))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([harness.REPO, HERE]))
    if impl.startswith("d2l"):
        env = harness.peer_env(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory child for {impl} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pretrain_data():
    batch, vocab_size, source = wiki_batch()
    fd, path = tempfile.mkstemp(suffix=".pt", prefix="fastbert_pretrain_batch_")
    os.close(fd)
    torch.save({"batch": batch, "vocab_size": vocab_size}, path)
    yield {"batch": batch, "vocab_size": vocab_size, "source": source, "file": path,
           "memory": {}}
    os.unlink(path)


def _labels(data) -> dict:
    _, _, valid, _, weights, _, _ = data["batch"]
    return dict(data_source=data["source"], vocab_size=data["vocab_size"], max_len=MAX_LEN,
                real_slots=int((weights > 0).sum()), slots=int(weights.numel()),
                recipe="d2l pretraining: 128 hidden, 2 heads, 2 layers, FFN 256, dropout 0.2, "
                       "Adam lr 0.01")


@pytest.mark.parametrize("impl", IMPLS)
def test_pretrain_step(benchmark, impl, pretrain_data, d2l, timing, baseline, bench_device):
    if bench_device.type != "cpu":
        pytest.skip("this benchmark drives the CPU build (the book's recipe on this machine)")
    batch, vocab_size = pretrain_data["batch"], pretrain_data["vocab_size"]
    step = make_step(impl, batch, vocab_size, d2l)
    with harness.peer_conditions(impl.startswith("d2l")):
        seconds = harness.measure(benchmark, step, timing, bench_device, budget_s=10.0)
    key = ("pretrain_step", BATCH, MAX_LEN)
    if impl == "d2l-fp32":
        baseline.put(key, seconds)
    base = baseline.get(key, lambda: make_step("d2l-fp32", batch, vocab_size, d2l), reps=3)
    memory = pretrain_data["memory"]
    for name in (impl, "d2l-fp32"):
        if name not in memory:
            memory[name] = measure_peak_memory(name, pretrain_data["file"])
    mlm_l, nsp_l = step()
    valid_tokens = int(batch[2].sum())
    harness.record(benchmark, seconds, kind="pretrain_step", impl=impl,
                   dtype="bf16" if impl.endswith("bf16") else "fp32", batch=BATCH,
                   tokens=valid_tokens, baseline_s=base, **_labels(pretrain_data),
                   loss_mlm_after_warmup=float(mlm_l), loss_nsp_after_warmup=float(nsp_l),
                   peak_step_rss_mb=memory[impl]["first"],
                   peak_steady_step_rss_mb=memory[impl]["steady"],
                   d2l_peak_step_rss_mb=memory["d2l-fp32"]["first"],
                   d2l_peak_steady_step_rss_mb=memory["d2l-fp32"]["steady"],
                   memory_method="peak RSS of the step (VmHWM, reset via clear_refs) minus RSS "
                                 "after setup, fresh process per implementation")


@pytest.mark.parametrize("impl", ("d2l-fp32", "fused-fp32", "fused-bf16"))
def test_mlm_head(benchmark, impl, pretrain_data, d2l, timing, baseline, bench_device):
    if bench_device.type != "cpu":
        pytest.skip("this benchmark drives the CPU build")
    batch, vocab_size = pretrain_data["batch"], pretrain_data["vocab_size"]
    fn = make_head(impl, batch, vocab_size, d2l)
    with harness.peer_conditions(impl.startswith("d2l")):
        seconds = harness.measure(benchmark, fn, timing, bench_device, budget_s=5.0)
    key = ("mlm_head", BATCH, MAX_LEN)
    if impl == "d2l-fp32":
        baseline.put(key, seconds)
    base = baseline.get(key, lambda: make_head("d2l-fp32", batch, vocab_size, d2l), reps=3)
    harness.record(benchmark, seconds, kind="mlm_head_fwd_bwd", impl=impl,
                   dtype="bf16" if impl.endswith("bf16") else "fp32", batch=BATCH,
                   tokens=int((batch[4] > 0).sum()), baseline_s=base, **_labels(pretrain_data))


# ----------------------------------------------------------------------------- interleaved
def interleaved(rounds: int = 5) -> dict:
    """The three steps and the three heads timed round by round (one of each per round), so
    every implementation sees the same load on a shared machine; prints medians and the
    per-round ratios to d2l.  ``python benchmarks/bench_pretrain.py [rounds]``."""
    import statistics
    import time
    d2l = harness.load_d2l_017()
    batch, vocab_size, source = wiki_batch()
    fns = {i: make_step(i, batch, vocab_size, d2l) for i in IMPLS}
    fns.update({"head-" + i: make_head(i, batch, vocab_size, d2l)
                for i in ("d2l-fp32", "fused-fp32", "fused-bf16")})
    for fn in fns.values():
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    print(f"data: {source}; load average {os.getloadavg()}")
    for k, ts in times.items():
        print(f"{k:16s} median {statistics.median(ts):.3f} s  min {min(ts):.3f} s  "
              f"{BATCH / statistics.median(ts):.0f} pairs/s")
    for base, others in (("d2l-fp32", ("fastbert-fp32", "fastbert-bf16")),
                         ("head-d2l-fp32", ("head-fused-fp32", "head-fused-bf16"))):
        for k in others:
            r = [a / b for a, b in zip(times[base], times[k])]
            print(f"{k} vs {base}: {statistics.median(r):.2f}x (rounds {min(r):.2f}-{max(r):.2f})")
    return times


if __name__ == "__main__":
    sys.path.insert(0, harness.REPO)
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
