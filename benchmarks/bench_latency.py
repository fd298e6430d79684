"""Batch-1 latency (issue 15 item 3): a user classifying one SNLI pair per call.

Each call is one premise/hypothesis pair at its own length (real SNLI test+dev lengths from
``harness.LengthSampler``; no padding: a tokenizer's output for one pair has none), eval mode,
``torch.inference_mode``, fp32, 2 threads (and 1: ``THREAD_COUNTS``).  Rows (``IMPLS``):

  ``hf-sdpa``       transformers ``BertForSequenceClassification`` (SDPA attention), eager:
                    the denominator of every ratio here (``ratio_to_hf_eager``);
  ``hf-compile``    ``torch.compile(model, dynamic=True)`` of the same model (warmed up on
                    ``WARMUP_PAIRS`` pairs of other lengths first: compile time is not timed);
  ``ort``           ONNX Runtime, CPU execution provider, the BERT-optimized graph of
                    ``peers.OrtBert`` (fused EmbedLayerNormalization / Attention /
                    SkipLayerNormalization, ORT_ENABLE_ALL, intra-op threads 2);
  ``torch-nested``  ``nn.TransformerEncoder`` fast path with the HF weights
                    (``peers.NestedTensorBert``; at batch 1 nothing is padded, so it runs the
                    fused ``_transformer_encoder_layer_fwd`` on a dense tensor);
  ``fastbert-cpp``  ``fastbert.BERTClassifier`` on the cpp backend, the pair as
                    ``(tokens[1, n], segments[1, n], valid_lens[1])`` (its encoder runs on
                    ``fastbert/inference_plan.py``); ``fastbert-cpp-modules`` (only when
                    ``--impls`` names it): the same with the plan off (the module path).

Every row classifies the same pairs (token ids random, ``<cls>`` first, segment 1 on the second
half).  Interleaved: for each pair every implementation runs once, in an order rotated from
pair to pair, so machine noise hits all rows alike; each call is timed alone
(``time.perf_counter`` around the model call; inputs are built beforehand, as a tokenizer
would have).  The JSON rows hold the per-pair times as pytest-benchmark stats (so ``median``
is p50) and ``extra_info`` p50/p99/mean plus the ratio of p50 to HF eager's p50.

    pytest benchmarks/bench_latency.py --benchmark-only       # in the suite
    python benchmarks/bench_latency.py [--pairs 400] [--threads 2] [--impls fastbert-cpp,hf-sdpa]
                                                                # a quick table, no pytest
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch

import harness
import peers

IMPLS = ("hf-sdpa", "hf-compile", "ort", "torch-nested", "fastbert-cpp")
BASELINE = "hf-sdpa"
# Threads per row: 2 (the suite's setting) and 1.  On a shared machine whose other work keeps
# both cores busy, every OpenMP parallel region of a 2-thread PyTorch call waits for a
# descheduled thread (p50 in the tens of ms for HF and fastbert alike, while ORT's own pool
# suffers less); the 1-thread rows show the per-call cost that such stalls hide.
THREADS = 2
THREAD_COUNTS = (2, 1)
PAIRS = 400          # timed pairs per row (p99 is then about the 4th slowest)
QUICK_PAIRS = 20
WARMUP_PAIRS = 24    # untimed pairs of other lengths first (compile sees its range of shapes)
CLS = 2


def make_pairs(lengths: harness.LengthSampler, n: int, seed: int) -> List[torch.Tensor]:
    """``n`` single pairs at SNLI lengths: (tokens[1, L], segments[1, L]) int64."""
    lens = lengths.sample(n, seed=seed).tolist()
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in lens:
        tokens = torch.randint(5, harness.VOCAB_SIZE, (1, L), generator=g)
        tokens[0, 0] = CLS
        segments = (torch.arange(L)[None, :] >= L // 2).long()
        out.append((tokens, segments))
    return out


def build_impls(dims: harness.BertDims, impls=IMPLS, threads: int = THREADS):
    """``{impl: callable(pair) -> logits}`` and ``{impl: why it cannot run}``; every peer has
    the HF model's weights; fastbert has its own (speed does not depend on the values)."""
    calls: Dict[str, Callable] = {}
    skipped: Dict[str, str] = {}
    hf = None
    try:
        hf = peers.build_hf(dims, torch.device("cpu")).eval()
    except peers.PeerUnavailable as exc:
        for impl in impls:
            if not impl.startswith("fastbert"):
                skipped[impl] = str(exc)

    def hf_inputs(pair):
        tokens, segments = pair
        return dict(input_ids=tokens, token_type_ids=segments,
                    attention_mask=torch.ones_like(tokens))

    check = make_pairs(harness.LengthSampler(), 1, seed=99)[0]
    check3 = (check[0], check[1], torch.tensor([check[0].shape[1]]))
    for impl in impls:
        if impl in skipped:
            continue
        try:
            if impl == "hf-sdpa":
                calls[impl] = _prepared(lambda p, m=hf: m(**p).logits, hf_inputs)
            elif impl == "hf-compile":
                torch._dynamo.reset()
                compiled = torch.compile(hf, dynamic=True)
                calls[impl] = _prepared(lambda p, m=compiled: m(**p).logits, hf_inputs)
            elif impl == "ort":
                session = peers.OrtBert(hf, threads)
                peers.check_same_logits(hf, peers.hf_forward, session, peers.ort_forward,
                                        check3, impl)

                def ort_inputs(pair):
                    tokens, segments = pair
                    return {"input_ids": tokens.numpy(),
                            "attention_mask": np.ones_like(tokens.numpy()),
                            "token_type_ids": segments.numpy()}
                sess = ort_session(session.path, threads) if ORT_NO_SPIN else session.session
                calls[impl] = _prepared(
                    lambda feed, s=sess: torch.from_numpy(s.run(None, feed)[0]), ort_inputs)
            elif impl == "torch-nested":
                nested = peers.NestedTensorBert(hf).eval()
                peers.check_same_logits(hf, peers.hf_forward, nested, lambda m, i: m(i),
                                        check3, impl)
                calls[impl] = _prepared(
                    lambda inp, m=nested: m(inp),
                    lambda pair: (pair[0], pair[1], torch.tensor([pair[0].shape[1]])))
            elif impl == "fastbert-cpp-modules":
                calls[impl] = build_fastbert(dims, "cpp", plan=False)
            elif impl.startswith("fastbert-"):
                calls[impl] = build_fastbert(dims, impl.split("-", 1)[1])
            else:
                raise ValueError(impl)
        except peers.PeerUnavailable as exc:
            skipped[impl] = str(exc)
    return calls, skipped


# ONNX Runtime's intra-op pool spin-waits for work after each run (allow_spinning, on by
# default).  Interleaved with other rows, its spinning threads take the cores from the next
# row's threads; so this benchmark builds its session with spinning off (ORT's documented
# setting for processes that share the CPU), the same optimized graph and threads otherwise.
ORT_NO_SPIN = not harness.env_flag("FASTBERT_LATENCY_ORT_SPIN")


def ort_session(path: str, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def build_fastbert(dims: harness.BertDims, backend: str, plan: bool = True):
    """``plan=False``: the module path (fastbert/inference_plan.py off during the call), the
    extra row ``fastbert-cpp-modules`` (not in IMPLS: ``--impls`` names it)."""
    import fastbert
    from fastbert import inference_plan
    why = harness.backend_skip_reason(backend, ("pack", "unpack", "varlen_attention",
                                                "add_layernorm", "ffn", "linear",
                                                "embedding_sum"),
                                      torch.device("cpu"), torch.float32)
    if why:
        raise peers.PeerUnavailable(f"fastbert backend '{backend}': {why}")
    C = dims.num_hiddens
    bert = fastbert.BERTModel(harness.VOCAB_SIZE, C, [C], C, dims.ffn_num_hiddens,
                              dims.num_heads, dims.num_layers, harness.DROPOUT,
                              max_len=harness.MODEL_MAX_LEN, key_size=C, query_size=C,
                              value_size=C, hid_in_features=C, mlm_in_features=C,
                              nsp_in_features=C)
    net = fastbert.BERTClassifier(bert, harness.NUM_CLASSES).eval()

    def call(inp, m=net):
        with fastbert.use_backend(backend):
            if plan:
                return m(inp)
            inference_plan.ENABLED = False
            try:
                return m(inp)
            finally:
                inference_plan.ENABLED = True
    return _prepared(call, lambda pair: (pair[0], pair[1],
                                         torch.tensor([pair[0].shape[1]], dtype=torch.int32)))


class _prepared:
    """A row's call with its per-pair inputs built ahead of time (``prepare(pair)``), as a
    tokenizer would hand them over: only ``fn(inputs)`` is timed."""

    def __init__(self, fn, prepare):
        self.fn, self.prepare = fn, prepare

    def __call__(self, inputs):
        return self.fn(inputs)


def run_interleaved(calls: Dict[str, Callable], pairs, warmup_pairs,
                    threads: int = THREADS) -> Dict[str, List[float]]:
    """Seconds per pair for every row, each pair run by every row in a rotated order."""
    names = list(calls)
    inputs = {n: [calls[n].prepare(p) for p in pairs] for n in names}
    warm = {n: [calls[n].prepare(p) for p in warmup_pairs] for n in names}
    times: Dict[str, List[float]] = {n: [] for n in names}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(len(warmup_pairs)):
                for n in names:
                    out = calls[n](warm[n][i])
                    assert torch.isfinite(out.float()).all(), f"{n}: non-finite logits"
            for i in range(len(pairs)):
                k = i % len(names)
                for n in names[k:] + names[:k]:
                    x = inputs[n][i]
                    t0 = time.perf_counter()
                    calls[n](x)
                    times[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return times


def summarize(times: Dict[str, List[float]]) -> Dict[str, dict]:
    out = {}
    for n, ts in times.items():
        a = np.asarray(ts)
        out[n] = {"p50_s": float(np.percentile(a, 50)), "p99_s": float(np.percentile(a, 99)),
                  "mean_s": float(a.mean()), "pairs": int(a.size)}
    base = out.get(BASELINE)
    for n, s in out.items():
        if base:
            s["ratio_to_hf_eager_p50"] = base["p50_s"] / s["p50_s"]
            s["ratio_to_hf_eager_p99"] = base["p99_s"] / s["p99_s"]
    return out


# ----------------------------------------------------------------------------- pytest
def _configs(config) -> tuple:
    long_run = config.getoption("--bench-long", default=False) or \
        harness.env_flag("FASTBERT_BENCH_LONG")
    return ("bert.small", "bert.base") if long_run else ("bert.small",)


def pytest_generate_tests(metafunc):
    if "latency_config" in metafunc.fixturenames:
        metafunc.parametrize("latency_config", _configs(metafunc.config))
    if "latency_threads" in metafunc.fixturenames:
        metafunc.parametrize("latency_threads", THREAD_COUNTS)


_RESULTS: Dict[str, tuple] = {}


def interleaved_results(config: str, threads: int, lengths, quick: bool):
    """Run every row once per (config, threads) (the first test of it does it for all)."""
    if (config, threads) not in _RESULTS:
        dims = harness.CONFIGS[config]
        n = QUICK_PAIRS if quick else PAIRS
        pairs = make_pairs(lengths, n, seed=1)
        warmup = make_pairs(lengths, 4 if quick else WARMUP_PAIRS, seed=2)
        torch.manual_seed(0)
        calls, skipped = build_impls(dims, threads=threads)
        # No row installs fastbert's caching CPU allocator: a user classifying pairs runs
        # no training (``import fastbert`` alone leaves torch's allocator alone), and at
        # batch 1 no tensor reaches its 1 MiB floor anyway.
        times = run_interleaved(calls, pairs, warmup, threads)
        tokens = float(np.mean([p[0].shape[1] for p in pairs]))
        _RESULTS[(config, threads)] = (times, summarize(times), skipped, tokens)
    return _RESULTS[(config, threads)]


@pytest.mark.parametrize("impl", IMPLS)
def test_batch1_latency(benchmark, impl, latency_config, latency_threads, lengths, timing):
    quick = timing.max_rounds == 1
    if getattr(benchmark, "disabled", False):
        pytest.skip("benchmarks disabled")
    times, summary, skipped, tokens = interleaved_results(latency_config, latency_threads,
                                                          lengths, quick)
    if impl in skipped:
        pytest.skip(skipped[impl])
    benchmark.group = f"latency batch 1 {latency_config} {latency_threads} threads"
    # The interleaved per-pair times become this row's pytest-benchmark stats (one call per
    # round), so the JSON's median is p50; pedantic cannot interleave rows across tests.
    benchmark._mode = "interleaved (bench_latency.run_interleaved)"
    stats = benchmark._make_stats(1)
    for t in times[impl]:
        stats.update(t)
    s = summary[impl]
    info = benchmark.extra_info
    info.update(kind="latency", op="latency", mode="infer", impl=impl, dtype="fp32", batch=1,
                config=latency_config, valid_tokens=tokens, threads=latency_threads,
                layout="one pair, its own length (no padding)", baseline_impl=BASELINE, **s)
    info["skipped_peers"] = dict(skipped)


# ----------------------------------------------------------------------------- script
def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="batch-1 latency, interleaved, no pytest")
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--warmup", type=int, default=WARMUP_PAIRS)
    ap.add_argument("--config", default="bert.small", choices=sorted(harness.CONFIGS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--threads", type=int, default=THREADS)
    a = ap.parse_args(argv)
    lengths = harness.LengthSampler()
    torch.manual_seed(0)
    calls, skipped = build_impls(harness.CONFIGS[a.config], tuple(a.impls.split(",")),
                                 threads=a.threads)
    times = run_interleaved(calls, make_pairs(lengths, a.pairs, seed=1),
                            make_pairs(lengths, a.warmup, seed=2), a.threads)
    print(f"{'impl':14s} {'p50':>9s} {'p99':>9s} {'mean':>9s}  p50 ratio to {BASELINE}")
    for n, s in summarize(times).items():
        r = s.get("ratio_to_hf_eager_p50")
        print(f"{n:14s} {s['p50_s'] * 1e3:8.3f}m {s['p99_s'] * 1e3:8.3f}m "
              f"{s['mean_s'] * 1e3:8.3f}m  {'' if r is None else f'{r:.2f}x'}")
    for n, why in skipped.items():
        print(f"{n:14s} skipped: {why}")


if __name__ == "__main__":
    main()
