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
    assert cells[6] == "—" and cells[7] == "4.00x" and "ffn" in cells[8]
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
