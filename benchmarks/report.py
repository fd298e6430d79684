"""Turn a pytest-benchmark JSON of this suite into the performance report.

    pytest benchmarks/ --benchmark-only --benchmark-json out.json
    python benchmarks/report.py out.json            # -> docs/benchmarks.md, docs/benchmarks.png
    python benchmarks/report.py a.json b.json       # several runs of one sitting, merged

The markdown has the machine, the measured ceilings and one table per job (median time,
examples/s, tokens/s, GFLOP/s or GB/s, % of the machine's ceiling, ratio to d2l eager fp32);
the PNG is a bar chart of the ratios.  Ratios come from rows of the same run: each row's d2l
eager fp32 twin (same job key); a row whose twin did not run uses the baseline its benchmark
measured itself (extra_info.baseline_s).  A ratio above 1 is faster than d2l.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from datetime import datetime
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_IMPLS = ("d2l eager", "d2l-eager")
E2E_ORDER = ("d2l-eager", "d2l-compile", "hf-sdpa", "hf-sdpa-pad128", "hf-sdpa-longest",
             "hf-sdpa-grouped", "hf-compile-grouped", "torch-nested-longest", "ort-longest",
             "ort-grouped", "fastbert-reference", "fastbert-cpp", "fastbert-cpp-grouped",
             "fastbert-cpp-compile-grouped", "fastbert-triton")
# The peers' columns of the at-a-glance table (bench_end_to_end.ROWS), in order, with titles.
PEER_COLUMNS = (
    ("d2l-eager", "d2l eager (pad 128)"),
    ("d2l-compile", "torch.compile(d2l) (pad 128)"),
    ("hf-sdpa-pad128", "HF sdpa, pad 128"),
    ("hf-sdpa-longest", "HF sdpa, pad to longest"),
    ("hf-sdpa-grouped", "HF sdpa, length-grouped"),
    ("hf-compile-grouped", "torch.compile(HF), grouped"),
    ("torch-nested-longest", "nn.TransformerEncoder nested"),
    ("ort-longest", "ONNX Runtime, longest"),
    ("ort-grouped", "ONNX Runtime, grouped"),
)
FASTBERT_COLUMNS = (("fastbert-cpp", "fastbert cpp (pad 128)"),
                    ("fastbert-cpp-grouped", "fastbert cpp, grouped"),
                    ("fastbert-cpp-compile-grouped", "torch.compile(fastbert), grouped"),
                    ("fastbert-triton", "fastbert triton (pad 128)"))
LATENCY_ORDER = ("hf-sdpa", "hf-compile", "ort", "torch-nested", "fastbert-cpp")
LATENCY_TITLES = {"hf-sdpa": "HF sdpa eager", "hf-compile": "torch.compile(HF, dynamic=True)",
                  "ort": "ONNX Runtime (BERT-optimized)",
                  "torch-nested": "nn.TransformerEncoder fast path",
                  "fastbert-cpp": "fastbert cpp"}
# How each peer is set up (printed in docs/benchmarks.md; benchmarks/README.md has the same).
PEER_SETUP = """\
Every row runs the same pairs (token ids random in the book's 20,256-token vocabulary, valid
lengths from real SNLI), bert.small dims (256 hidden, 4 heads, FFN 512, 2 layers, ReLU, the
book's dropout 0.2 when training), the same torch threads, fp32 or `torch.autocast` bf16.

| row | what it is | batch layout | set-up |
| --- | --- | --- | --- |
| d2l-eager | the real d2l 0.17.6 `BERTModel` + the chapter's `BERTClassifier` | padded to 128 (the book's input) | eager; its fp32 time is the denominator of "ratio to d2l" |
| d2l-compile | `torch.compile(net)` of that model | padded to 128 | default mode (inductor), static shapes; the whole cycle of batches runs once before timing |
| hf-sdpa-pad128 | transformers `BertForSequenceClassification`, same dims, `attn_implementation="sdpa"`, ReLU, dropouts 0.2 | padded to 128 | eager; `attention_mask` from the valid lengths |
| hf-sdpa-longest | the same model | each batch padded to its longest pair (`DataCollatorWithPadding`) | eager |
| hf-sdpa-grouped | the same model | `Trainer(group_by_length=True)`'s `LengthGroupedSampler` order (one megabatch of the 32 batches, sorted by length), each batch padded to its longest | eager |
| hf-compile-grouped | `torch.compile(model, dynamic=True)` | grouped, as above | inductor, dynamic shapes; warmed up over the whole cycle first (compile time not timed) |
| torch-nested-longest | `nn.TransformerEncoder(enable_nested_tensor=True)` with the HF weights copied in, plus HF's embeddings, pooler and head | longest | inference only (eval + no_grad + `src_key_padding_mask`: PyTorch packs the batch into a nested tensor and runs the fused layer); logits checked against the HF model before timing; no bf16 row (the fast path switches itself off under autocast) |
| ort-longest / ort-grouped | ONNX Runtime 1.31 CPU execution provider | longest / grouped | the HF model's eager-attention twin (same weights) exported with `torch.onnx.export(opset 17, dynamic batch and sequence axes)`, then `onnxruntime.transformers.optimizer.optimize_model(model_type="bert", num_heads, hidden_size)` (fuses EmbedLayerNormalization, Attention, SkipLayerNormalization); session `ORT_ENABLE_ALL`, `intra_op_num_threads` = the torch threads, `inter_op_num_threads=1`; logits checked against PyTorch's; inference only, fp32 only |
| fastbert-cpp | `fastbert.BERTClassifier` on the cpp backend, d2l's initial weights | padded to 128 (the encoder packs the valid tokens itself) | fastbert's caching CPU allocator installed, as a fastbert training run does (peers run with it paused) |
| fastbert-cpp-grouped | the same | grouped, each batch trimmed to its longest rounded up to 8 (`fastbert.data.trim_collate`) | as above |
| fastbert-cpp-compile-grouped | `torch.compile` of the same, as `python -m fastbert finetune --compile` does it (`fastbert.train.compiling`: `dynamic=True`, Dynamo traces through the data-dependent `pack`, so one graph) | grouped, trimmed, as above | warmed up over the whole cycle first (compile time not timed; the CLI reports it) |

Weights: the HF-family peers share one seeded random initialization (speed does not depend
on the values); fastbert rows load the d2l rows' initial weights. Batch-1 latency rows
(bench_latency.py): one pair per call at its own length, no padding, eval +
`torch.inference_mode`, fp32; `hf-compile` is `torch.compile(model, dynamic=True)` warmed up
on 24 pairs of other lengths; ONNX Runtime is the same optimized graph fed one pair, its
session built with `session.intra_op.allow_spinning=0` (its idle pool threads would otherwise
spin on the cores the next row needs); every row runs each pair in turn (order rotated per
pair), each call timed alone, at 2 threads and at 1.
"""
OP_ORDER = ("d2l eager", "fastbert[reference]", "torch.compile(reference)", "fastbert[cpp]",
            "fastbert[triton]")
MODE_ORDER = ("fwd", "bwd", "fwd+bwd", "train", "infer")


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def rows_of(data: dict) -> List[dict]:
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        stats = bench.get("stats") or {}
        if "median" not in stats or "kind" not in info:
            continue
        info["median_s"] = stats["median"]
        info["rounds"] = stats.get("rounds")
        info["name"] = bench.get("name")
        rows.append(info)
    return rows


def is_baseline_row(r: dict) -> bool:
    """d2l eager fp32 doing exactly the job its key names (for ops: the key's own op)."""
    key = r.get("baseline_key") or ""
    if r.get("impl") not in BASELINE_IMPLS or r.get("dtype") != "fp32" or not key:
        return False
    return r["kind"] == "e2e" or key.split("/")[1] == r.get("op")


def attach_ratios(rows: List[dict]) -> None:
    """ratio = d2l eager fp32 median / row median, both from this JSON when possible."""
    base: Dict[str, float] = {}
    for r in rows:
        if is_baseline_row(r):
            base.setdefault(r["baseline_key"], r["median_s"])
    for r in rows:
        key = r.get("baseline_key")
        denominator = base.get(key) if key else None
        if denominator is None:
            denominator = r.get("baseline_s")
        r["ratio"] = denominator / r["median_s"] if denominator and r["median_s"] else None
        flops, moved = r.get("flops"), r.get("bytes")
        r["gflops_per_s"] = flops / r["median_s"] / 1e9 if flops else None
        r["gb_per_s"] = moved / r["median_s"] / 1e9 if moved else None
        r["examples_per_s"] = r["batch"] / r["median_s"] if r.get("batch") else None
        r["tokens_per_s"] = r["valid_tokens"] / r["median_s"] if r.get("valid_tokens") else None


def is_peer(impl: str) -> bool:
    """Code a user would run instead of fastbert (fastbert-reference is fastbert on the book's
    arithmetic, neither a peer nor a fast path)."""
    return not impl.startswith("fastbert")


def is_fast_fastbert(impl: str) -> bool:
    return impl.startswith("fastbert") and not impl.startswith("fastbert-reference")


def attach_best_peer(rows: List[dict]) -> None:
    """``ratio_to_best_peer`` = the fastest peer's median / this row's median, among the rows
    of the same job, shape and precision (> 1: faster than every peer that ran)."""
    best: Dict[tuple, float] = {}
    for r in rows:
        if r["kind"] in ("e2e", "latency") and is_peer(r.get("impl", "")) and r.get("median_s"):
            key = (r["kind"], r.get("mode"), r.get("config"), r.get("batch"), r.get("dtype"),
                   r.get("threads"))
            best[key] = min(best.get(key, float("inf")), r["median_s"])
    for r in rows:
        if r["kind"] not in ("e2e", "latency"):
            continue
        key = (r["kind"], r.get("mode"), r.get("config"), r.get("batch"), r.get("dtype"),
               r.get("threads"))
        b = best.get(key)
        r["best_peer_s"] = b
        r["ratio_to_best_peer"] = b / r["median_s"] if b and r.get("median_s") else None


def skip_reason(skipped: List[dict], test: str, **params) -> Optional[str]:
    """The reason a benchmark with these parameters was skipped in this run (conftest.py
    records every skip in machine_info.fastbert.skipped), or None."""
    for s in skipped:
        if s.get("test") != test:
            continue
        p = s.get("params", {})
        if all(p.get(k) == v for k, v in params.items()):
            return s.get("reason") or "skipped"
    return None


def _cell(r: Optional[dict], why: Optional[str], notes: List[str]) -> str:
    if r is not None:
        return f"{fmt(r['examples_per_s'])} ({fmt(r.get('ratio'), 2, 'x')})"
    if why is None:
        return "not run"
    if why not in notes:
        notes.append(why)
    return f"skipped [{notes.index(why) + 1}]"


def peer_table(rows: List[dict], skipped: List[dict]) -> List[str]:
    """The README's table: per job and precision, examples/s of every peer and of fastbert
    (ratio to d2l eager fp32), fastbert's best over the best peer that ran; a peer that did
    not run says why (skipped, with the reason as a numbered note)."""
    e2e = grouped(rows, "e2e")
    out: List[str] = []
    notes: List[str] = []
    by_shape: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for (op, mode, config, batch), group in e2e.items():
        by_shape.setdefault((config, batch), []).extend(group)
    for (config, batch), group in by_shape.items():
        cols = PEER_COLUMNS + tuple(c for c in FASTBERT_COLUMNS
                                    if any(r["impl"] == c[0] for r in group)
                                    or c[0] != "fastbert-triton")
        out += [f"**{config}, batch {batch}**: examples/s (ratio to d2l eager fp32); "
                f"last column: fastbert's best / the best peer of the row.", "",
                "| job | " + " | ".join(t for _, t in cols) + " | fastbert / best peer |",
                "|---" * (len(cols) + 2) + "|"]
        modes = [m for m in MODE_ORDER if any(r.get("mode") == m for r in group)]
        for mode in modes:
            for dtype in ("fp32", "bf16"):
                mine = [r for r in group if r.get("mode") == mode and r.get("dtype") == dtype]
                if not mine:
                    continue
                cells = []
                for impl, _ in cols:
                    r = next((x for x in mine if x["impl"] == impl), None)
                    why = None if r else skip_reason(
                        skipped, "test_finetune_train_step" if mode == "train"
                        else "test_inference", impl=impl, precision=dtype,
                        e2e_case=[config, batch])
                    cells.append(_cell(r, why, notes))
                fast = [r for r in mine if is_fast_fastbert(r["impl"])]
                top = max(fast, key=lambda r: r["examples_per_s"] or 0) if fast else None
                lead = top.get("ratio_to_best_peer") if top else None
                label = f"{'train step' if mode == 'train' else 'inference'} {dtype}"
                out.append(f"| {label} | " + " | ".join(cells) + " | "
                           + (f"**{lead:.2f}x** ({top['impl']})" if lead else "—") + " |")
        out.append("")
    if notes:
        out += ["Skipped in this run:", ""]
        out += [f"{i + 1}. {why}" for i, why in enumerate(notes)]
        out.append("")
    return out


def latency_table(rows: List[dict], skipped: List[dict]) -> List[str]:
    lat = [r for r in rows if r["kind"] == "latency"]
    if not lat:
        return []
    out = []
    for config, threads in dict.fromkeys((r.get("config"), r.get("threads")) for r in lat):
        group = sorted((r for r in lat if r.get("config") == config
                        and r.get("threads") == threads),
                       key=lambda r: order_key(r, LATENCY_ORDER))
        r0 = group[0]
        out += [f"### batch 1 — {config}, {r0.get('pairs')} SNLI pairs, mean "
                f"{fmt(r0.get('valid_tokens'))} tokens, {r0.get('threads')} threads", "",
                "| implementation | p50 | p99 | mean | p50: HF eager / this | p99: HF eager / "
                "this | p50: best peer / this |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in group:
            out.append(f"| {LATENCY_TITLES.get(r['impl'], r['impl'])} | {fmt_time(r['p50_s'])} | "
                       f"{fmt_time(r['p99_s'])} | {fmt_time(r['mean_s'])} | "
                       f"{fmt(r.get('ratio_to_hf_eager_p50'), 2, 'x')} | "
                       f"{fmt(r.get('ratio_to_hf_eager_p99'), 2, 'x')} | "
                       f"{fmt(r.get('ratio_to_best_peer'), 2, 'x')} |")
        ran = {r["impl"] for r in group}
        for impl in LATENCY_ORDER:
            if impl in ran:
                continue
            why = skip_reason(skipped, "test_batch1_latency", impl=impl, latency_config=config,
                              latency_threads=threads)
            out.append(f"| {LATENCY_TITLES.get(impl, impl)} | skipped: {why or 'not run'} "
                       f"| | | | | |")
        out.append("")
    return out


def ceilings_of(rows: List[dict]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for r in rows:
        if r["kind"] != "ceiling":
            continue
        if r.get("op") == "matmul" and r.get("gflops_per_s"):
            name = f"matmul_{r['dtype']}"
            out[name] = max(out.get(name, 0.0), r["gflops_per_s"])
        elif r.get("op") == "copy" and r.get("gb_per_s"):
            out["copy"] = max(out.get("copy", 0.0), r["gb_per_s"])
    return out


def pct_of_ceiling(r: dict, ceilings: Dict[str, float]) -> Optional[float]:
    if r.get("gflops_per_s") and ceilings.get(f"matmul_{r['dtype']}"):
        return 100.0 * r["gflops_per_s"] / ceilings[f"matmul_{r['dtype']}"]
    if r.get("gb_per_s") and ceilings.get("copy"):
        return 100.0 * r["gb_per_s"] / ceilings["copy"]
    return None


# ----------------------------------------------------------------------------- formatting
def fmt(x: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}{suffix}"
    return f"{x:.{digits}f}{suffix}"


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def throughput(r: dict) -> str:
    if r.get("gflops_per_s") is not None:
        return f"{fmt(r['gflops_per_s'])} GFLOP/s"
    if r.get("gb_per_s") is not None:
        return f"{fmt(r['gb_per_s'], 2)} GB/s"
    return "—"


def order_key(r: dict, order) -> tuple:
    impl = r.get("impl", "")
    return (order.index(impl) if impl in order else len(order), impl,
            0 if r.get("dtype") == "fp32" else 1)


def grouped(rows: List[dict], kind: str) -> "OrderedDict[tuple, List[dict]]":
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in rows:
        if r["kind"] != kind:
            continue
        key = (r.get("op"), r.get("mode"), r.get("config"), r.get("batch"))
        groups.setdefault(key, []).append(r)
    return groups


def isa_summary(flags: List[str]) -> str:
    """'AVX-512 (bf16)', 'AVX2 + FMA, no AVX-512' ...: what the figures' CPU could run."""
    f = set(flags)
    if "avx512f" in f:
        return "AVX-512" + (" with bf16" if "avx512_bf16" in f else ", no bf16")
    if "avx2" in f:
        return "AVX2" + (" + FMA" if "fma" in f else "") + ", no AVX-512"
    return "no AVX2" if f else "unknown"


def machine_lines(data: dict) -> List[str]:
    mi = data.get("machine_info", {})
    fb = mi.get("fastbert", {})
    versions = fb.get("versions", {})
    lengths = fb.get("lengths", {})
    when = data.get("datetime", "")
    try:
        when = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass
    commit = (data.get("commit_info") or {}).get("id", "")[:10] or fb.get("git_commit", "")
    lines = [
        f"- **Run**: {when}, fastbert commit `{commit}`"
        + (" (quick: one round per benchmark, not a measurement)" if fb.get("quick_run") else "")
        + (" (long set)" if fb.get("long_run") else " (default set)"),
        f"- **Machine**: {fb.get('cpu_model', mi.get('processor', '?'))}, "
        f"{fb.get('logical_cpus', '?')} logical CPUs, torch threads {fb.get('torch_threads', '?')}"
        + (f", GPU {fb['cuda']}" if fb.get("cuda") else ", no GPU")
        + (f"; vector ISA: {isa_summary(fb['cpu_flags'])}" if fb.get("cpu_flags") else ""),
        *([f"- **CPU kernels**: {fb['cpu_kernel_variant']}"] if fb.get("cpu_kernel_variant")
          else []),
        f"- **Software**: Python {mi.get('python_version', '?')}, torch {versions.get('torch')}, "
        f"transformers {versions.get('transformers')}, triton {versions.get('triton')}",
        "- **Backends**: " + ", ".join(f"{k}: {v}" for k, v in fb.get("backends", {}).items()),
        *([f"- **Machine load** (1/5/15-min load average at the end of the run, "
            f"{fb.get('logical_cpus', '?')} CPUs): "
            + "/".join(f"{x:.1f}" for x in fb["load_average_1_5_15min_at_end"])
            + load_verdict(fb)] if fb.get("load_average_1_5_15min_at_end") else []),
        f"- **Lengths**: {lengths.get('source', '?')} ({lengths.get('pairs', '?')} pairs, mean "
        f"{lengths.get('mean', '?')} valid tokens, padded to {lengths.get('padded_to', '?')})",
    ]
    return lines


def load_verdict(fb: dict) -> str:
    """The benchmark's own threads make a load of about their number; only more than the CPU
    count means other processes competed."""
    load1 = fb["load_average_1_5_15min_at_end"][0]
    cpus = fb.get("logical_cpus")
    if isinstance(cpus, int) and load1 <= cpus + 0.5:
        return f" — about the benchmark's own {fb.get('torch_threads', '?')} threads: no other load"
    return " — above the CPU count, other processes competed for the cores and timings are noisy"


def markdown(data: dict, rows: List[dict], png_name: Optional[str]) -> str:
    ceilings = ceilings_of(rows)
    out = ["# fastbert benchmarks", "",
           "Generated by `benchmarks/report.py` from `pytest benchmarks/ --benchmark-only "
           "--benchmark-json out.json`. Everything below was measured in one run, side by side; "
           "**ratio** = d2l 0.17.6 eager fp32 time / this time for the same job (> 1 is faster "
           "than the book's code). GFLOP/s count useful work only (matmuls on valid tokens; "
           "padding excluded; backward = 2x forward); GB/s count the minimal tensor traffic. "
           "% of ceiling compares with the largest matmul (same dtype) or copy measured in this "
           "run; the copy ceiling is main-memory bandwidth (256 MiB buffers), so a small op "
           "whose tensors stay in cache can pass 100%. Rows are medians of a few rounds on "
           "the machine below; compare ratios within one run, not across runs.", ""]
    out += machine_lines(data) + [""]
    if ceilings:
        out += ["## Ceilings (this run)", "", "| limit | value |", "| --- | --- |"]
        for name, value in sorted(ceilings.items()):
            unit = "GB/s" if name == "copy" else "GFLOP/s"
            label = "memory copy (read + write)" if name == "copy" else \
                f"matmul {name.split('_')[1]} (best of torch.matmul, oneDNN linear)"
            out.append(f"| {label} | {fmt(value)} {unit} |")
        out.append("")
    if png_name:
        out += [f"![ratio to d2l eager fp32]({png_name})", ""]

    skipped = data.get("machine_info", {}).get("fastbert", {}).get("skipped", [])
    e2e = grouped(rows, "e2e")
    if e2e:
        out += ["## Fastbert and its peers at a glance", ""] + peer_table(rows, skipped)
    lat = latency_table(rows, skipped)
    if lat:
        out += ["## Batch-1 latency: one SNLI pair per call", "",
                "`benchmarks/bench_latency.py`: each call classifies one premise/hypothesis "
                "pair at its own length (no padding), eval + `torch.inference_mode`, fp32; "
                "every implementation runs each pair in turn (order rotated per pair), each "
                "call timed alone. p50/p99 over the pairs; ratios > 1 are faster than the "
                "other side.", ""] + lat
    if e2e or lat:
        out += ["## How each peer is set up", "", PEER_SETUP]
    if e2e:
        out += ["## Summary (best row of each family, ratio to d2l eager fp32)", ""]
        for (op, mode, config, batch), group in e2e.items():
            best = []
            for family, title in (("fastbert-cpp", "fastbert"),
                                  ("fastbert-triton", "fastbert triton"),
                                  ("d2l-compile", "torch.compile(d2l)"),
                                  ("hf-sdpa", "transformers"),
                                  ("hf-compile", "torch.compile(transformers)"),
                                  ("torch-nested", "nn.TransformerEncoder nested"),
                                  ("ort", "ONNX Runtime"), ("d2l-eager", "d2l eager")):
                mine = [r for r in group if r["impl"].startswith(family) and r.get("ratio")]
                if mine:
                    top = max(mine, key=lambda r: r["ratio"])
                    best.append(f"{title} {top['ratio']:.2f}x ({top['impl']} {top['dtype']})")
            out.append(f"- {'train step' if mode == 'train' else 'inference'}, {config}, batch "
                       f"{batch}: " + "; ".join(best))
        out.append("")
        out += ["## End to end: SNLI fine-tuning train step and inference", "",
                "Train step = forward + CrossEntropyLoss(reduction='none').sum() + backward + "
                "Adam (the book's `train_batch_ch13`, dropout 0.2); inference = eval + no_grad. "
                "bf16 = `torch.autocast` bf16. hf-sdpa = transformers "
                "BertForSequenceClassification, same dims, SDPA attention. fastbert rows list "
                "the ops that fell back to the reference backend.", ""]
        for (op, mode, config, batch), group in e2e.items():
            out += [f"### {'train step' if mode == 'train' else 'inference'} — {config}, "
                    f"batch {batch}, padded length {group[0].get('seq_len')}", "",
                    "| implementation | precision | median | examples/s | tokens/s | GFLOP/s "
                    "| % of ceiling | ratio to d2l fp32 | ratio to best peer | notes |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in sorted(group, key=lambda r: order_key(r, E2E_ORDER)):
                notes = ""
                if r.get("falls_back"):
                    notes = "reference for: " + ", ".join(r["falls_back"])
                if r.get("layout") and r.get("layout") != "pad128":
                    notes = (notes + "; " if notes else "") + f"layout: {r['layout']}"
                out.append(
                    f"| {r['impl']} | {r['dtype']} | {fmt_time(r['median_s'])} | "
                    f"{fmt(r['examples_per_s'])} | {fmt(r['tokens_per_s'], 0)} | "
                    f"{fmt(r['gflops_per_s'])} | {fmt(pct_of_ceiling(r, ceilings), 1, '%')} | "
                    f"{fmt(r['ratio'], 2, 'x')} | {fmt(r.get('ratio_to_best_peer'), 2, 'x')} "
                    f"| {notes} |")
            out.append("")

    ops = grouped(rows, "op")
    if ops:
        out += ["## Ops (fastbert.ops front door, one call)", "",
                "fwd = forward under no_grad; bwd = backward alone (retained graph); fwd+bwd = "
                "both. Skipped backends (cannot run the op here, e.g. triton without a GPU) "
                "have no row. varlen_attention's ratio is against d2l's padded attention on the "
                "same batch; pack/unpack have no d2l counterpart.", ""]
        by_op: "OrderedDict[tuple, List[dict]]" = OrderedDict()
        for (op, mode, config, batch), group in ops.items():
            by_op.setdefault((op, config, batch), []).extend(group)
        for (op, config, batch), group in by_op.items():
            out += [f"### {op} — {config}, batch {batch}", "",
                    "| mode | implementation | dtype | median | GFLOP/s or GB/s | % of ceiling "
                    "| ratio to d2l fp32 |", "| --- | --- | --- | --- | --- | --- | --- |"]
            group = sorted(group, key=lambda r: (MODE_ORDER.index(r["mode"]),)
                           + order_key(r, OP_ORDER))
            for r in group:
                out.append(f"| {r['mode']} | {r['impl']} | {r['dtype']} | "
                           f"{fmt_time(r['median_s'])} | {throughput(r)} | "
                           f"{fmt(pct_of_ceiling(r, ceilings), 1, '%')} | "
                           f"{fmt(r['ratio'], 2, 'x')} |")
            out.append("")
    others = [r for r in rows if r["kind"] not in ("ceiling", "e2e", "op", "latency")]
    if others:
        out += ["## Other benchmarks of the suite", "",
                "Rows from further bench_*.py files (e.g. bench_pretrain.py: the book's "
                "pretraining step); ratio as above, against the d2l eager fp32 time its "
                "benchmark measured in this run.", ""]
        kinds: "OrderedDict[str, List[dict]]" = OrderedDict()
        for r in others:
            kinds.setdefault(r["kind"], []).append(r)
        for kind, group in kinds.items():
            memory = any(r.get("peak_step_rss_mb") is not None for r in group)
            out += [f"### {kind}", "",
                    "| implementation | dtype | batch | median | examples/s | tokens/s "
                    "| ratio to d2l fp32 |" + (" peak step RSS (MB) |" if memory else ""),
                    "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if memory else "")]
            for r in group:
                line = (f"| {r.get('impl')} | {r.get('dtype')} | {r.get('batch')} | "
                        f"{fmt_time(r['median_s'])} | {fmt(r.get('examples_per_s'))} | "
                        f"{fmt(r.get('tokens_per_s'), 0)} | {fmt(r.get('ratio'), 2, 'x')} |")
                if memory:
                    line += f" {fmt(r.get('peak_step_rss_mb'), 0)} |"
                out.append(line)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def chart(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    e2e = [r for r in rows if r["kind"] == "e2e" and r.get("ratio")]
    if e2e:
        panels.append(("end to end", sorted(e2e, key=lambda r: (
            MODE_ORDER.index(r["mode"]), r.get("config"), r.get("batch"))
            + order_key(r, E2E_ORDER)), lambda r: f"{r['mode']} {r['config']} b{r['batch']} "
            f"{r['impl']} {r['dtype']}"))
    ops = [r for r in rows if r["kind"] == "op" and r.get("ratio") and r["mode"] == "fwd+bwd"]
    if ops:
        panels.append(("ops, forward+backward", sorted(ops, key=lambda r: (
            r["op"], r.get("config"), r.get("batch")) + order_key(r, OP_ORDER)),
            lambda r: f"{r['op']} {r['config']} b{r['batch']} {r['impl']} {r['dtype']}"))
    others = [r for r in rows if r["kind"] not in ("ceiling", "e2e", "op", "latency")
              and r.get("ratio")]
    if others:
        panels.append(("other benchmarks", others,
                       lambda r: f"{r['kind']} b{r.get('batch')} {r['impl']} {r.get('dtype')}"))
    if not panels:
        return
    heights = [max(2.0, 0.22 * len(p[1]) + 1.0) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, items, label) in zip(axes[:, 0], panels):
        ratios = [r["ratio"] for r in items]
        colors = ["#999999" if r["impl"] in BASELINE_IMPLS or r["impl"].startswith("d2l")
                  else "#d62728" if r["impl"].startswith("hf") else "#1f77b4" for r in items]
        y = list(range(len(items)))[::-1]
        ax.barh(y, ratios, color=colors)
        ax.set_yticks(y)
        ax.set_yticklabels([label(r) for r in items], fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("speed relative to d2l 0.17.6 eager fp32 (log scale, > 1 is faster)")
        ax.set_title(title)
        for yi, ratio in zip(y, ratios):
            ax.text(ratio, yi, f" {ratio:.2f}x", va="center", fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json); "
                        "several files of one sitting are merged (machine info: the first)")
    parser.add_argument("--note", default="", help="a caveat printed under the title")
    parser.add_argument("--md", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--png", default=os.path.join(REPO, "docs", "benchmarks.png"))
    args = parser.parse_args(argv)
    data = load(args.json[0])
    for extra in args.json[1:]:
        data.setdefault("benchmarks", []).extend(load(extra).get("benchmarks", []))
    rows = rows_of(data)
    if not rows:
        raise SystemExit(f"{', '.join(args.json)}: no benchmark of this suite in it")
    attach_ratios(rows)
    attach_best_peer(rows)
    png_name = None
    if args.png:
        chart(rows, args.png)
        if os.path.exists(args.png):
            png_name = os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.md)))
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as fh:
        text = markdown(data, rows, png_name)
        if args.note:
            head, rest = text.split("\n\n", 1)
            text = f"{head}\n\n> **Note.** {args.note}\n\n{rest}"
        fh.write(text)
    print(f"wrote {args.md}" + (f" and {args.png}" if png_name else ""))


if __name__ == "__main__":
    main()
