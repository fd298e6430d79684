"""The benchmark suite's arithmetic (benchmarks/harness.py) and its report (benchmarks/report.py),
checked on small made-up inputs: no timing happens here."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import harness  # noqa: E402
import report  # noqa: E402


def test_synthetic_lengths_match_snli_mean_and_bounds():
    lens = harness.synthetic_lengths()
    assert abs(lens.mean() - harness.SYNTHETIC_MEAN) < 0.5
    assert lens.min() >= 5 and lens.max() <= harness.SEQ_LEN


def test_length_sampler_is_seeded_and_in_range():
    sampler = harness.LengthSampler()
    a, b, c = sampler.sample(64, seed=3), sampler.sample(64, seed=3), sampler.sample(64, seed=4)
    assert a.dtype == torch.int32 and a.shape == (64,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 1 and int(a.max()) <= harness.SEQ_LEN


def test_snli_lengths_are_premise_plus_hypothesis_plus_three(tmp_path, monkeypatch):
    import gzip
    snli = tmp_path / "snli"
    snli.mkdir()
    with gzip.open(snli / "snli_1.0_test.tokenized.tsv.gz", "wt") as fh:
        fh.write("gold_label\tsentence1\tsentence2\n")
        fh.write("neutral\tA man runs .\tHe is fast\n")       # 4 + 3 + 3 = 10
        fh.write("entailment\t" + "w " * 200 + "\tx\n")        # capped at 128
    monkeypatch.setattr(harness, "SNLI_DIRS", (str(tmp_path),))
    assert harness.snli_lengths().tolist() == [10, 128]


def test_encoder_flops_count_valid_tokens_only():
    dims = harness.BertDims(num_hiddens=4, num_heads=2, ffn_num_hiddens=8, num_layers=3)
    lens = torch.tensor([2, 5], dtype=torch.int32)
    C, F = 4, 8
    per_layer = sum(2 * n * (4 * C * C + 2 * C * F) + 4 * n * n * C for n in (2, 5))
    expected = 3 * per_layer + 2 * 2 * (C * C + C * harness.NUM_CLASSES)
    assert harness.encoder_forward_flops(dims, lens) == pytest.approx(expected)


def _bench(name, median, **info):
    return {"name": name, "stats": {"median": median, "rounds": 3}, "extra_info": info}


def _fake_run():
    e2e = dict(kind="e2e", op="e2e train", mode="train", config="bert.small", batch=64,
               valid_tokens=1700, seq_len=128, baseline_key="e2e/train/bert.small/64",
               flops=6e10)
    op = dict(kind="op", op="ffn", mode="fwd", config="bert.small", batch=64, valid_tokens=1700,
              baseline_key="op/ffn/bert.small/64/fwd", flops=1e9)
    return {
        "datetime": "2026-11-22T03:00:00+00:00",
        "machine_info": {"python_version": "3.11", "fastbert": {
            "cpu_model": "Test CPU", "logical_cpus": 2, "torch_threads": 2,
            "cpu_flags": ["avx", "avx2", "fma"],
            "cpu_kernel_variant": "cpp CPU kernels: avx2 (best this CPU runs)",
            "versions": {"torch": "2.x"}, "backends": {"reference": "available"},
            "lengths": {"source": "snli test+dev", "pairs": 10, "mean": 26.5, "padded_to": 128}}},
        "benchmarks": [
            _bench("c1", 0.1, kind="ceiling", op="matmul", impl="torch.matmul", dtype="fp32",
                   batch=1, valid_tokens=0, flops=2e10),                       # 200 GFLOP/s
            _bench("c2", 0.05, kind="ceiling", op="copy", impl="copy_", dtype="fp32", batch=1,
                   valid_tokens=0, bytes=1e9),                                  # 20 GB/s
            _bench("e1", 2.0, impl="d2l-eager", dtype="fp32", **e2e),
            # its own cached baseline disagrees on purpose: the twin row must win
            _bench("e2", 0.5, impl="fastbert-cpp", dtype="bf16", baseline_s=9.0,
                   falls_back=["ffn"], **e2e),
            _bench("o1", 0.01, impl="d2l eager", dtype="fp32", **op),
            _bench("o2", 0.004, impl="fastbert[cpp]", dtype="fp32", **op),
        ],
    }


def test_report_ratios_come_from_the_d2l_twin_of_the_same_run(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_fake_run()))
    md, png = tmp_path / "out" / "benchmarks.md", tmp_path / "out" / "benchmarks.png"
    report.main([str(path), "--md", str(md), "--png", str(png)])
    text = md.read_text()
    assert png.stat().st_size > 0 and "![ratio to d2l eager fp32](benchmarks.png)" in text
    assert "Test CPU" in text and "2026-11-22 03:00 UTC" in text
    assert "vector ISA: AVX2 + FMA, no AVX-512" in text
    assert "**CPU kernels**: cpp CPU kernels: avx2 (best this CPU runs)" in text
    row = next(l for l in text.splitlines() if l.startswith("| fastbert-cpp | bf16"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # median 0.5 s, 64 examples -> 128/s; 6e10 FLOP -> 120 GFLOP/s; ceiling 200 (fp32 only
    # here, so bf16 has no ceiling); ratio 2.0 / 0.5 = 4x from the twin, not 9 / 0.5.
    assert cells[2] == "500.0 ms" and cells[3] == "128.0" and cells[5] == "120.0"
    assert cells[6] == "—" and cells[7] == "4.00x" and "ffn" in cells[9]
    assert cells[8] == "—"  # ratio to the best peer: no peer ran in bf16 (per precision)
    op_row = next(l for l in text.splitlines() if "fastbert[cpp]" in l)
    assert "250.0 GFLOP/s" in op_row and "125.0%" in op_row and "2.50x" in op_row
    assert "| matmul fp32" in text and "200.0 GFLOP/s" in text and "20.0 GB/s" in text


def test_report_falls_back_to_the_rows_own_baseline_when_the_twin_is_absent(tmp_path):
    run = _fake_run()
    run["benchmarks"] = [b for b in run["benchmarks"] if b["name"] != "e1"]
    rows = report.rows_of(run)
    report.attach_ratios(rows)
    (cpp,) = [r for r in rows if r["impl"] == "fastbert-cpp"]
    assert cpp["ratio"] == pytest.approx(9.0 / 0.5)


def test_report_refuses_a_json_without_suite_rows(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit):
        report.main([str(path), "--md", str(tmp_path / "a.md"), "--png", ""])


# ----------------------------------------------------------------------------- peers (issue 15)
def _peer_run():
    """Inference fp32, batch 64: d2l 2.0 s, HF longest 1.0 s, ORT longest 0.5 s, fastbert
    0.25 s (grouped 0.2 s); ORT bf16 and the nested-tensor fp32 row skipped with reasons;
    batch-1 latency rows for HF eager, ORT and fastbert, torch.compile(HF) skipped."""
    e2e = dict(kind="e2e", op="e2e infer", mode="infer", config="bert.small", batch=64,
               valid_tokens=1700, seq_len=128, baseline_key="e2e/infer/bert.small/64",
               flops=6e10)
    lat = dict(kind="latency", op="latency", mode="infer", config="bert.small", batch=1,
               valid_tokens=26.5, threads=2, pairs=400, dtype="fp32")
    run = _fake_run()
    run["machine_info"]["fastbert"]["skipped"] = [
        {"test": "test_inference", "module": "bench_end_to_end",
         "params": {"impl": "ort-longest", "precision": "bf16", "e2e_case": ["bert.small", 64]},
         "reason": "ORT has no bf16 BERT kernels on CPU"},
        {"test": "test_inference", "module": "bench_end_to_end",
         "params": {"impl": "torch-nested-longest", "precision": "fp32",
                    "e2e_case": ["bert.small", 64]},
         "reason": "fast path off here"},
        {"test": "test_batch1_latency", "module": "bench_latency",
         "params": {"impl": "hf-compile", "latency_config": "bert.small",
                    "latency_threads": 2},
         "reason": "no compiler here"},
    ]
    run["benchmarks"] += [
        _bench("i1", 2.0, impl="d2l-eager", dtype="fp32", layout="pad128", **e2e),
        _bench("i2", 1.0, impl="hf-sdpa-longest", dtype="fp32", layout="longest", **e2e),
        _bench("i3", 0.5, impl="ort-longest", dtype="fp32", layout="longest", **e2e),
        _bench("i4", 0.25, impl="fastbert-cpp", dtype="fp32", layout="pad128", **e2e),
        _bench("i5", 0.2, impl="fastbert-cpp-grouped", dtype="fp32", layout="grouped8", **e2e),
        _bench("i6", 0.8, impl="hf-sdpa-longest", dtype="bf16", layout="longest", **e2e),
        _bench("i7", 0.1, impl="fastbert-cpp", dtype="bf16", layout="pad128", **e2e),
        _bench("l1", 0.004, impl="hf-sdpa", p50_s=0.004, p99_s=0.010, mean_s=0.005,
               ratio_to_hf_eager_p50=1.0, ratio_to_hf_eager_p99=1.0, **lat),
        _bench("l2", 0.002, impl="ort", p50_s=0.002, p99_s=0.004, mean_s=0.0025,
               ratio_to_hf_eager_p50=2.0, ratio_to_hf_eager_p99=2.5, **lat),
        _bench("l3", 0.001, impl="fastbert-cpp", p50_s=0.001, p99_s=0.002, mean_s=0.0012,
               ratio_to_hf_eager_p50=4.0, ratio_to_hf_eager_p99=5.0, **lat),
    ]
    return run


def test_ratio_to_best_peer_is_computed_per_job_and_precision():
    rows = report.rows_of(_peer_run())
    report.attach_ratios(rows)
    report.attach_best_peer(rows)
    get = {(r["kind"], r["impl"], r["dtype"], r.get("mode")): r for r in rows}
    # fp32 inference: the best peer is ORT (0.5 s), not d2l or HF
    assert get[("e2e", "fastbert-cpp", "fp32", "infer")]["ratio_to_best_peer"] == \
        pytest.approx(0.5 / 0.25)
    assert get[("e2e", "fastbert-cpp-grouped", "fp32", "infer")]["ratio_to_best_peer"] == \
        pytest.approx(0.5 / 0.2)
    assert get[("e2e", "hf-sdpa-longest", "fp32", "infer")]["ratio_to_best_peer"] == \
        pytest.approx(0.5)
    # bf16: only HF ran among the peers (its bf16 time, never the fp32 ORT one)
    assert get[("e2e", "fastbert-cpp", "bf16", "infer")]["ratio_to_best_peer"] == \
        pytest.approx(0.8 / 0.1)
    # the train job has its own best peers: in _fake_run only d2l eager fp32 ran, so the bf16
    # train row has none (never the fp32 one, never the inference job's)
    assert get[("e2e", "fastbert-cpp", "bf16", "train")]["ratio_to_best_peer"] is None
    # batch-1 latency: best peer ORT's p50
    assert get[("latency", "fastbert-cpp", "fp32", "infer")]["ratio_to_best_peer"] == \
        pytest.approx(2.0)


def test_peer_table_shows_every_peer_and_says_why_one_is_missing(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_peer_run()))
    md = tmp_path / "benchmarks.md"
    report.main([str(path), "--md", str(md), "--png", ""])
    text = md.read_text()
    lines = text.splitlines()
    head = next(l for l in lines if l.startswith("| job | d2l eager (pad 128)"))
    for _, title in report.PEER_COLUMNS:
        assert title in head
    cols = [c.strip() for c in head.strip("|").split("|")]
    row = next(l for l in lines if l.startswith("| inference fp32 |"))
    cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))
    assert cells["d2l eager (pad 128)"] == "32.0 (1.00x)"
    assert cells["HF sdpa, pad to longest"] == "64.0 (2.00x)"
    assert cells["ONNX Runtime, longest"] == "128.0 (4.00x)"
    assert cells["fastbert cpp, grouped"] == "320.0 (10.00x)"
    assert cells["fastbert / best peer"] == "**2.50x** (fastbert-cpp-grouped)"
    assert cells["HF sdpa, pad 128"] == "not run"
    # skipped peers: a numbered note with the recorded reason
    nested = cells["nn.TransformerEncoder nested"]
    assert nested.startswith("skipped [")
    n = int(nested.split("[")[1].rstrip("]"))
    assert f"{n}. fast path off here" in text
    bf16 = dict(zip(cols, [c.strip() for c in next(
        l for l in lines if l.startswith("| inference bf16 |")).strip("|").split("|")]))
    assert bf16["ONNX Runtime, longest"].startswith("skipped [")
    assert "ORT has no bf16 BERT kernels on CPU" in text
    assert bf16["fastbert / best peer"] == "**8.00x** (fastbert-cpp)"
    # the detailed table carries the per-row ratio to the best peer
    detail = next(l for l in lines if l.startswith("| ort-longest | fp32"))
    assert "| 1.00x |" in detail and "layout: longest" in detail
    # latency: p50/p99, ratio to HF eager, and the skipped compile row with its reason
    lat = next(l for l in lines if l.startswith("| fastbert cpp |"))
    assert "1.0 ms" in lat and "2.0 ms" in lat and "4.00x" in lat and "5.00x" in lat
    assert "| torch.compile(HF, dynamic=True) | skipped: no compiler here" in text
    assert "## How each peer is set up" in text and "optimize_model" in text


def test_skip_reasons_are_recorded_by_the_bench_conftest():
    import importlib.util
    import types
    spec = importlib.util.spec_from_file_location("bench_conftest",
                                                  os.path.join(BENCH_DIR, "conftest.py"))
    bench_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_conftest)

    class Item:
        originalname = "test_inference"
        name = "test_inference[x]"
        module = types.SimpleNamespace(__name__="bench_end_to_end")
        callspec = type("C", (), {"params": {"impl": "ort-longest", "precision": "bf16",
                                             "e2e_case": ("bert.small", 64)}})

    class Rep:
        skipped = True
        longrepr = ("bench_end_to_end.py", 1, "Skipped: no bf16 kernels")

    class Outcome:
        def get_result(self):
            return Rep()

    before = len(bench_conftest._SKIPPED)
    gen = bench_conftest.pytest_runtest_makereport(Item(), None)
    next(gen)
    with pytest.raises(StopIteration):
        gen.send(Outcome())
    rec = bench_conftest._SKIPPED[before]
    del bench_conftest._SKIPPED[before:]
    assert rec == {"test": "test_inference", "module": "bench_end_to_end",
                   "params": {"impl": "ort-longest", "precision": "bf16",
                              "e2e_case": ["bert.small", 64]},
                   "reason": "no bf16 kernels"}
    assert report.skip_reason([rec], "test_inference", impl="ort-longest", precision="bf16",
                              e2e_case=["bert.small", 64]) == "no bf16 kernels"
    assert report.skip_reason([rec], "test_inference", impl="ort-longest",
                              precision="fp32") is None
