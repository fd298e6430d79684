"""End-to-end: the book's SNLI fine-tuning train step and inference, side by side with the
implementations a user would pick instead (issue 15).

Rows per (job, shape, precision); the name ends with the batch layout when it is not the
book's (``LAYOUTS``):
  ``d2l-eager``             the real d2l 0.17.6 ``BERTModel`` + the chapter's
                            ``BERTClassifier`` on the book's input (padded to 128): the
                            baseline (its fp32 time is the denominator of every ratio);
  ``d2l-compile``           ``torch.compile`` of that same d2l model, same input;
  ``hf-sdpa-pad128``        transformers ``BertForSequenceClassification``, same dims, SDPA
                            attention, fed the book's batches padded to 128 (what a port of
                            the book's data pipeline would feed it; no HF user pads so);
  ``hf-sdpa-longest``       the same model, each batch padded to its longest pair
                            (``DataCollatorWithPadding``'s default);
  ``hf-sdpa-grouped``       the same model on length-grouped batches
                            (``Trainer(group_by_length=True)``'s LengthGroupedSampler: the pool
                            of pairs cut into megabatches, each sorted by length and split),
                            each padded to its longest;
  ``hf-compile-grouped``    ``torch.compile(model, dynamic=True)`` of it, grouped batches;
  ``torch-nested-longest``  inference only: PyTorch's nested-tensor fast path
                            (``nn.TransformerEncoder(enable_nested_tensor=True)``, eval +
                            no_grad + src_key_padding_mask) with the HF model's weights,
                            embeddings, pooler and head (same logits, checked before timing);
  ``ort-longest`` / ``ort-grouped``  inference only, fp32: ONNX Runtime (CPU) on the HF model
                            exported with dynamic axes and optimized for BERT (fused attention,
                            SkipLayerNormalization; outputs checked against PyTorch's);
  ``fastbert-<backend>``    fastbert's ``BERTClassifier`` with ``fastbert.use_backend(name)``
                            on the book's input, for reference, cpp and triton (CUDA only);
                            ``extra_info["ops"]`` says which backend ran each op;
  ``fastbert-cpp-grouped``  the same on the grouped batches, each trimmed to its longest
                            rounded up to 8 (``fastbert.data.trim_collate``, the CLI default);
  ``fastbert-cpp-compile-grouped``  ``torch.compile`` of that model as ``python -m fastbert
                            finetune --compile`` does it (``fastbert.train.compiling``:
                            dynamic shapes, one graph through ``pack``), same batches.
Every layout holds the same pairs (the grouped batches regroup the random batches' pairs), so
tokens, examples and useful FLOPs per call are equal across rows: only padding and grouping
differ.  benchmarks/README.md says how each peer is set up.
Peer rows run with fastbert's CPU allocator cache paused (``harness.peer_conditions``), as
they run without fastbert; fastbert rows with its defaults.
Precision: fp32, or bf16 autocast (``torch.autocast(device, torch.bfloat16)``; the loss and
backward as the user would write them around it).  ORT and the nested-tensor path have no
bf16 row (the skip says why).

The train step is the chapter's ``train_batch_ch13``: forward, ``CrossEntropyLoss(reduction=
'none')``, ``l.sum().backward()``, ``Adam(lr=1e-4).step()``, with dropout 0.2 (the book's
``load_pretrained_model``; HF's dropouts set to the same).  Inference is ``eval()`` +
``no_grad`` (``evaluate_accuracy_gpu``).
Batches: E2E_BATCHES batches of SNLI-length pairs, token ids random in the 20,256-token
vocabulary.  Timing: after E2E_TIMING's warm-up calls, each timed round is one pass over the
whole cycle of batches (every row, every layout), so a row's median round is its mean time
per batch over the cycle (examples/s over an epoch); compiled rows first run the whole cycle
once (compilation is a one-time cost).  Useful FLOPs count the matmuls on valid tokens only
(padding is waste, not work); the train step counts 3x the forward.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Optional

import pytest
import torch
from torch import nn

import fastbert
from fastbert.train import compiling

import harness
import peers

# impl -> the batch layout it is fed (LAYOUTS)
ROWS = {
    "d2l-eager": "pad128", "d2l-compile": "pad128",
    "hf-sdpa-pad128": "pad128", "hf-sdpa-longest": "longest", "hf-sdpa-grouped": "grouped",
    "hf-compile-grouped": "grouped",
    "torch-nested-longest": "longest", "ort-longest": "longest", "ort-grouped": "grouped",
    "fastbert-reference": "pad128", "fastbert-cpp": "pad128", "fastbert-triton": "pad128",
    "fastbert-cpp-grouped": "grouped8", "fastbert-cpp-compile-grouped": "grouped8",
}
INFERENCE_ONLY = ("torch-nested-longest", "ort-longest", "ort-grouped")
TRAIN_IMPLS = tuple(i for i in ROWS if i not in INFERENCE_ONLY)
INFER_IMPLS = tuple(ROWS)
LAYOUTS = {
    "pad128": "random batches padded to 128 (the book's input)",
    "longest": "the same batches, each padded to its longest pair (DataCollatorWithPadding)",
    "grouped": "the same pairs regrouped by length (LengthGroupedSampler), each batch padded "
               "to its longest",
    "grouped8": "the grouped batches, each trimmed to its longest rounded up to 8 "
                "(fastbert.data.trim_collate)",
}
PRECISIONS = ("fp32", "bf16")
PAD, CLS = 1, 2  # the book's vocabulary: '<unk>' 0, '<pad>' 1, '<mask>' ..., '<cls>', '<sep>'
E2E_TIMING = dict(budget_s=3.0, min_rounds=2, max_rounds=10, round_s=0.0, warmup=8)
# Each call takes the next of this many batches, each with its own SNLI lengths (so its own
# token count), as a training loop does: a fixed batch would hide what a new shape costs
# (oneDNN's per-shape kernels, the allocator's reuse).  A timed round is one pass over all.
# They also form the grouped layout's one megabatch (HF's LengthGroupedSampler takes 50
# batches per megabatch on SNLI's 550k training pairs; 32 is the closest a 32-batch pool gets).
E2E_BATCHES = 32


def pytest_generate_tests(metafunc):
    if "e2e_case" in metafunc.fixturenames:
        long_run = metafunc.config.getoption("--bench-long", default=False) or \
            harness.env_flag("FASTBERT_BENCH_LONG")
        cases = harness.E2E_LONG_CASES if long_run else harness.DEFAULT_CASES
        metafunc.parametrize("e2e_case", cases, ids=[harness.case_id(*c) for c in cases])


class BookBERTClassifier(nn.Module):
    """The fine-tuning chapter's classifier (it is not in the d2l package), with the output
    layer's width read from the config instead of the book's hard-coded 256."""

    def __init__(self, bert, num_hiddens: int):
        super().__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.output = nn.Linear(num_hiddens, harness.NUM_CLASSES)

    def forward(self, inputs):
        tokens_X, segments_X, valid_lens_x = inputs
        encoded_X = self.encoder(tokens_X, segments_X, valid_lens_x)
        return self.output(self.hidden(encoded_X[:, 0, :]))


def bert_args(dims: harness.BertDims):
    C = dims.num_hiddens
    args = (harness.VOCAB_SIZE, C, [C], C, dims.ffn_num_hiddens, dims.num_heads,
            dims.num_layers, harness.DROPOUT)
    kwargs = dict(max_len=harness.MODEL_MAX_LEN, key_size=C, query_size=C, value_size=C,
                  hid_in_features=C, mlm_in_features=C, nsp_in_features=C)
    return args, kwargs


def batch_lengths(lengths, batch_size: int):
    """The valid lengths of the E2E_BATCHES batches of a case (the same for every row)."""
    return [lengths.sample(batch_size, seed=batch_size * 1000 + i) for i in range(E2E_BATCHES)]


def make_batch(lens: torch.Tensor, dev: torch.device):
    """A padded SNLI-shaped batch: <cls> first, segment 1 on the second half of each pair."""
    B, L = lens.numel(), harness.SEQ_LEN
    g = torch.Generator().manual_seed(B + int(lens.sum()))  # the same batch for every row
    pos = torch.arange(L)[None, :]
    valid = pos < lens[:, None]
    tokens = torch.randint(5, harness.VOCAB_SIZE, (B, L), generator=g)
    tokens[:, 0] = CLS
    tokens = torch.where(valid, tokens, torch.full_like(tokens, PAD))
    segments = (valid & (pos >= (lens[:, None] // 2))).long()
    labels = torch.randint(0, harness.NUM_CLASSES, (B,), generator=g)
    return (tokens.to(dev), segments.to(dev), lens.to(dev)), labels.to(dev)


def trim(batch, multiple: int = 1):
    """Cut the padding columns past the batch's longest pair (rounded up to ``multiple``)."""
    (tokens, segments, lens), labels = batch
    keep = min(tokens.shape[1], -(-int(lens.max()) // multiple) * multiple)
    return (tokens[:, :keep], segments[:, :keep], lens), labels


def grouped(batches, batch_size: int):
    """The pairs of ``batches`` in LengthGroupedSampler's order, cut into batches again (one
    megabatch holding them all), each padded to its longest pair."""
    tokens = torch.cat([b[0][0] for b in batches])
    segments = torch.cat([b[0][1] for b in batches])
    lens = torch.cat([b[0][2] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    order = torch.tensor(peers.length_grouped_indices(
        lens.tolist(), batch_size, mega_batch_mult=len(batches), seed=batch_size))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size].to(tokens.device)
        out.append(trim(((tokens[idx], segments[idx], lens[idx]), labels[idx])))
    return out


def layout_batches(layout: str, lens_list, dev):
    """The cycle of batches of a layout (LAYOUTS); the same pairs in every layout."""
    batches = [make_batch(lens, dev) for lens in lens_list]
    if layout == "pad128":
        return batches
    if layout == "longest":
        return [trim(b) for b in batches]
    if layout == "grouped":
        return grouped(batches, batches[0][1].numel())
    if layout == "grouped8":
        return [trim(b, 8) for b in grouped(batches, batches[0][1].numel())]
    raise ValueError(layout)


def build_model(impl: str, dims, d2l, dev, check_batch=None):
    """(model, forward(model, batch) -> logits, the backend to run under or None).
    ``check_batch``: a batch on which a peer that re-implements the HF model (nested
    tensors, ONNX Runtime) must give the HF model's logits before it is timed."""
    family, variant = impl.split("-", 1)
    args, kwargs = bert_args(dims)
    if family == "d2l":
        if d2l is None:
            pytest.skip(f"d2l {harness.D2L_VERSION} peer is not installed")
        net = BookBERTClassifier(d2l.BERTModel(*args, **kwargs), dims.num_hiddens).to(dev)
        fwd = lambda m, inputs: m(inputs)  # noqa: E731
        if variant == "compile":
            torch._dynamo.reset()
            compiled = torch.compile(net)
            return net, (lambda m, inputs: compiled(inputs)), None
        return net, fwd, None
    if family in ("hf", "torch", "ort"):
        try:
            net = peers.build_hf(dims, dev)
            if family == "hf" and variant.startswith("compile"):
                torch._dynamo.reset()
                compiled = torch.compile(net, dynamic=True)
                return net, (lambda m, inputs: peers.hf_forward(compiled, inputs)), None
            if family == "hf":
                return net, peers.hf_forward, None
            if family == "torch":   # torch-nested-*
                nested = peers.NestedTensorBert(net)
                if check_batch is not None:
                    nested.eval()
                    why = peers.fast_path_off_reason(nested, check_batch)
                    assert why is None, why
                    peers.check_same_logits(net, peers.hf_forward, nested,
                                            lambda m, i: m(i), check_batch, impl)
                return nested, (lambda m, inputs: m(inputs)), None
            if dev.type != "cpu":
                pytest.skip("the ONNX Runtime row runs its CPU execution provider only")
            session = peers.OrtBert(net, torch.get_num_threads())
            if check_batch is not None:
                peers.check_same_logits(net, peers.hf_forward, session, peers.ort_forward,
                                        check_batch, impl)
            return session, peers.ort_forward, None
        except peers.PeerUnavailable as exc:
            pytest.skip(str(exc))
    backend = variant.split("-")[0]
    bert = fastbert.BERTModel(*args, **kwargs)
    if d2l is not None:  # the same initial weights as the d2l rows (state_dict names match)
        torch.manual_seed(0)
        bert.load_state_dict(d2l.BERTModel(*args, **kwargs).state_dict())
    net = fastbert.BERTClassifier(bert, harness.NUM_CLASSES).to(dev)
    if "compile" in variant:
        torch._dynamo.reset()
        compiled = compiling.compile_module(net)

        def compiled_forward(m, inputs):
            with compiling.scope(True):
                return compiled(inputs)
        return net, compiled_forward, backend
    return net, (lambda m, inputs: m(inputs)), backend


def autocast(precision: str, dev: torch.device):
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(net, forward, batches, precision, dev):
    """One step of the chapter's train_batch_ch13 (Adam as in the fine-tuning chapter), on
    the next of ``batches``."""
    loss = nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.Adam(net.parameters(), lr=harness.LEARNING_RATE)
    net.train()
    batches = itertools.cycle(batches)

    def step():
        batch, labels = next(batches)
        trainer.zero_grad()
        with autocast(precision, dev):
            l = loss(forward(net, batch), labels)
        l.sum().backward()
        trainer.step()
        return l
    return step


def inference_fn(net, forward, batches, precision, dev):
    net.eval()
    batches = itertools.cycle(batches)

    def infer():
        batch, _ = next(batches)
        with torch.no_grad(), autocast(precision, dev):
            return forward(net, batch)
    return infer


def make_callable(job, impl, dims, d2l, dev, lens_list, precision):
    """(the call to time, the fastbert backend or None, the cycle of batches it runs, the
    model)."""
    batches = layout_batches(ROWS[impl], lens_list, dev)
    net, forward, backend = build_model(impl, dims, d2l, dev, check_batch=batches[0][0])
    if job == "train":
        return train_step_fn(net, forward, batches, precision, dev), backend, batches, net
    return inference_fn(net, forward, batches, precision, dev), backend, batches, net


def skip_reason(job: str, impl: str, precision: str) -> Optional[str]:
    if precision == "bf16" and impl.startswith("ort-"):
        return peers.ORT_BF16_REASON
    if precision == "bf16" and impl.startswith("torch-nested"):
        return peers.NESTED_BF16_REASON
    return None


def run_e2e(benchmark, job, impl, precision, e2e_case, d2l_or_none, lengths, baseline,
            ceilings, timing, bench_device):
    why = skip_reason(job, impl, precision)
    if why:
        pytest.skip(why)
    config, batch_size = e2e_case
    dims = harness.CONFIGS[config]
    lens_list = batch_lengths(lengths, batch_size)
    dtype = harness.DTYPES[precision]
    labels = {}
    if impl.startswith("fastbert-"):
        backend = impl.split("-")[1]
        model_ops = ("masked_softmax", "attention", "pack", "unpack", "varlen_attention",
                     "add_layernorm", "ffn")
        if backend == "triton" and bench_device.type != "cuda":
            pytest.skip(harness.backend_skip_reason("triton", model_ops, bench_device, dtype))
        resolved = harness.resolved_ops(backend, bench_device, dtype)
        served = [op for op in model_ops if resolved[op] == backend]
        if not served:
            pytest.skip(f"fastbert backend '{backend}' runs none of the model's ops here: "
                        f"{harness.backend_skip_reason(backend, model_ops, bench_device, dtype)}")
        labels["ops"] = {op: resolved[op] for op in model_ops}
        labels["falls_back"] = [op for op in model_ops if resolved[op] != backend]

    torch.manual_seed(0)
    fn, backend, batches, net = make_callable(job, impl, dims, d2l_or_none, bench_device,
                                              lens_list, precision)
    if impl.startswith("ort-"):
        labels["ort_fused_ops"] = dict(net.fused or {})
    policy = timing if timing.max_rounds == 1 else harness.TimingPolicy(**E2E_TIMING)
    warmup = len(batches) if "compile" in impl else None
    benchmark.group = f"e2e {job} {harness.case_id(config, batch_size)}"
    with warnings.catch_warnings(), harness.peer_conditions(not impl.startswith("fastbert-")), \
            (fastbert.use_backend(backend) if backend else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        out = fn()
        assert torch.isfinite(out.float()).all(), f"{impl} {precision}: non-finite output"
        seconds = harness.measure(benchmark, fn, policy, bench_device,
                                  iterations=len(batches), warmup=warmup)

    key = ("e2e", job, config, batch_size)
    if impl == "d2l-eager" and precision == "fp32":
        baseline.put(key, seconds)
    baseline_s = None
    if d2l_or_none is not None:
        def make_baseline():
            torch.manual_seed(0)
            return make_callable(job, "d2l-eager", dims, d2l_or_none, bench_device, lens_list,
                                 "fp32")[0]
        baseline_s = baseline.get(key, make_baseline, reps=3)
    # Per call: the mean over the batches (the same pairs in every layout).
    flops = sum(harness.encoder_forward_flops(dims, lens) for lens in lens_list) / len(lens_list) \
        * (3.0 if job == "train" else 1.0)
    tokens = round(sum(int(lens.sum()) for lens in lens_list) / len(lens_list))
    padded = round(sum(b[0][0].numel() for b in batches) / len(batches))
    harness.record(benchmark, seconds, kind="e2e", impl=impl, dtype=precision,
                   batch=batch_size, tokens=tokens, flops=flops, ceilings=ceilings,
                   baseline_s=baseline_s, op=f"e2e {job}", mode=job, config=config,
                   seq_len=harness.SEQ_LEN, layout=ROWS[impl], padded_tokens=padded,
                   baseline_key="/".join(map(str, key)), **labels)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_finetune_train_step(benchmark, impl, precision, e2e_case, d2l_or_none, lengths,
                             baseline, ceilings, timing, bench_device):
    run_e2e(benchmark, "train", impl, precision, e2e_case, d2l_or_none, lengths, baseline,
            ceilings, timing, bench_device)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", INFER_IMPLS)
def test_inference(benchmark, impl, precision, e2e_case, d2l_or_none, lengths, baseline,
                   ceilings, timing, bench_device):
    run_e2e(benchmark, "infer", impl, precision, e2e_case, d2l_or_none, lengths, baseline,
            ceilings, timing, bench_device)
