"""Profile one bert.small fine-tuning train step (BERTClassifier: forward, CE loss, backward,
Adam) on a backend vs the reference backend, in one process: fp32 and bf16 autocast.

Batch 64 of SNLI lengths (harness.LengthSampler: real test+dev lengths, mean ~27) padded to
128, dropout 0.2 (the book's fine-tuning model).  Prints train-step and inference examples/s per (backend, precision),
the ratio to the reference fp32 step (the d2l eager computation), and the top torch.profiler
entries of the fast backend's step.  Timings alternate between configurations so a noisy
shared machine hurts them alike.

    python benchmarks/profile_train_step.py [--backend cpp] [--steps 8] [--threads 2] [--top 15]
        [--batch 64] [--no-profile]
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import LengthSampler  # noqa: E402

import fastbert  # noqa: E402

VOCAB, HIDDEN, FFN, HEADS, LAYERS, L, BATCH = 20256, 256, 512, 4, 2, 128, 64


def make_net(seed=0):
    torch.manual_seed(seed)
    bert = fastbert.BERTModel(VOCAB, HIDDEN, [HIDDEN], HIDDEN, FFN, HEADS, LAYERS, 0.2,
                              max_len=512, key_size=HIDDEN, query_size=HIDDEN,
                              value_size=HIDDEN, hid_in_features=HIDDEN,
                              mlm_in_features=HIDDEN, nsp_in_features=HIDDEN)
    net = fastbert.BERTClassifier(bert)
    return net, torch.optim.Adam(net.parameters(), lr=1e-4)


def make_batch(seed):
    vl = LengthSampler(L).sample(BATCH, seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=g)
    segments = torch.randint(0, 2, (BATCH, L), generator=g)
    labels = torch.randint(0, 3, (BATCH,), generator=g)
    return (tokens, segments, vl.float()), labels  # the book stores valid_lens as floats


def step(net, opt, batch, bf16):
    inputs, labels = batch
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(inputs)
        loss = loss_fn(logits, labels)
    loss.sum().backward()
    opt.step()
    opt.zero_grad()


def infer(net, batch, bf16):
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(batch[0])
    net.train()


def timed(fn, configs, nets, batches, use_opt):
    """Median seconds per call of each configuration, alternating configurations."""
    times = {c: [] for c in configs}
    for i, batch in enumerate(batches):
        for c in configs:
            net, opt = nets[c]
            # The reference stands in for d2l: as d2l runs, without fastbert's allocator cache.
            with fastbert.use_backend(c[0]), harness.peer_conditions(c[0] == "reference"):
                t = time.perf_counter()
                fn(net, opt, batch, c[1]) if use_opt else fn(net, batch, c[1])
                dt = time.perf_counter() - t
            if i >= 2:  # warm-up
                times[c].append(dt)
    return {c: statistics.median(v) for c, v in times.items()}


def report(title, med, configs):
    base = BATCH / med[("reference", False)]
    print(f"-- {title}")
    for c in configs:
        eps = BATCH / med[c]
        print(f"{c[0]:>10} {'bf16' if c[1] else 'fp32'}: {eps:8.1f} examples/s "
              f"({eps / base:5.2f}x reference fp32)")


def main():
    global BATCH
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    BATCH = a.batch
    torch.set_num_threads(a.threads)
    configs = [(b, bf16) for bf16 in (False, True) for b in ("reference", a.backend)]
    nets = {c: make_net() for c in configs}
    batches = [make_batch(s) for s in range(a.steps + 2)]
    print(f"threads={a.threads} batch={BATCH} mean valid length="
          f"{float(torch.cat([b[0][2] for b in batches]).mean()):.1f} padded to {L}")
    report("train step (forward, CE loss, backward, Adam)",
           timed(step, configs, nets, batches, True), configs)
    report("inference (eval, no_grad)", timed(infer, configs, nets, batches, False), configs)
    if a.no_profile:
        return
    for bf16 in (False, True):
        net, opt = nets[(a.backend, bf16)]
        with fastbert.use_backend(a.backend):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for batch in batches[:3]:
                    step(net, opt, batch, bf16)
        print(f"\n== {a.backend} {'bf16 autocast' if bf16 else 'fp32'}: top self CPU time "
              f"(3 steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top,
                                        max_name_column_width=40))


if __name__ == "__main__":
    main()
