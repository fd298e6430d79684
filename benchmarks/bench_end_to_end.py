"""End-to-end: the book's SNLI fine-tuning train step and inference, side by side.

Rows per (job, shape, precision):
  ``d2l-eager``        the real d2l 0.17.6 ``BERTModel`` + the chapter's ``BERTClassifier``:
                       the baseline (its fp32 time is the denominator of every ratio);
  ``d2l-compile``      ``torch.compile`` of that same d2l model;
  ``hf-sdpa``          transformers ``BertForSequenceClassification`` with the same dims and
                       SDPA attention (the peer most users would pick; an optional dependency);
  ``fastbert-<name>``  fastbert's ``BERTClassifier`` with ``fastbert.use_backend(name)``, for
                       reference, cpp and triton (CUDA only).  ``extra_info["ops"]`` says which
                       backend really ran each op (a partial backend falls back per op).
Peer rows (d2l, compile, HF) run with fastbert's CPU allocator cache paused
(``harness.peer_conditions``), as they run without fastbert; fastbert rows with its defaults.
Precision: fp32, or bf16 autocast (``torch.autocast(device, torch.bfloat16)``; the loss and
backward as the user would write them around it).

The train step is the chapter's ``train_batch_ch13``: forward, ``CrossEntropyLoss(reduction=
'none')``, ``l.sum().backward()``, ``Adam(lr=1e-4).step()``, with dropout 0.2 (the book's
``load_pretrained_model``).  Inference is ``eval()`` + ``no_grad`` (``evaluate_accuracy_gpu``).
Batches: SNLI-length pairs padded to 128, token ids random in the 20,256-token vocabulary;
each call takes the next of E2E_BATCHES batches with their own lengths (as training does).
Useful FLOPs count the matmuls on valid tokens only (padding is waste, not work); the train
step counts 3x the forward.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch
from torch import nn

import fastbert

import harness

IMPLS = ("d2l-eager", "d2l-compile", "hf-sdpa", "fastbert-reference", "fastbert-cpp",
         "fastbert-triton")
PRECISIONS = ("fp32", "bf16")
PAD, CLS = 1, 2  # the book's vocabulary: '<unk>' 0, '<pad>' 1, '<mask>' ..., '<cls>', '<sep>'
E2E_TIMING = dict(budget_s=3.0, min_rounds=3, max_rounds=10, round_s=0.0, warmup=8)
# Each call takes the next of this many batches, each with its own SNLI lengths (so its own
# token count), as a training loop does: a fixed batch would hide what a new shape costs
# (oneDNN's per-shape kernels, the allocator's reuse).  The warm-up calls cover a few.
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


def build_model(impl: str, dims, d2l, dev):
    """(model, forward(model, batch) -> logits, the backend to run under or None)."""
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
    if family == "hf":
        try:
            from transformers import BertConfig, BertForSequenceClassification
        except ImportError as exc:
            pytest.skip(f"transformers (optional benchmark peer) is not installed: {exc}")
        cfg = BertConfig(vocab_size=harness.VOCAB_SIZE, hidden_size=dims.num_hiddens,
                         num_hidden_layers=dims.num_layers, num_attention_heads=dims.num_heads,
                         intermediate_size=dims.ffn_num_hiddens, hidden_act="relu",
                         hidden_dropout_prob=harness.DROPOUT,
                         attention_probs_dropout_prob=harness.DROPOUT,
                         max_position_embeddings=harness.MODEL_MAX_LEN, type_vocab_size=2,
                         num_labels=harness.NUM_CLASSES, pad_token_id=PAD)
        cfg._attn_implementation = "sdpa"
        net = BertForSequenceClassification(cfg).to(dev)
        assert net.config._attn_implementation == "sdpa"

        def hf_forward(m, inputs):
            tokens, segments, lens = inputs
            mask = (torch.arange(tokens.shape[1], device=tokens.device)[None, :]
                    < lens[:, None]).long()
            return m(input_ids=tokens, token_type_ids=segments, attention_mask=mask).logits
        return net, hf_forward, None
    backend = variant
    bert = fastbert.BERTModel(*args, **kwargs)
    if d2l is not None:  # the same initial weights as the d2l rows (state_dict names match)
        torch.manual_seed(0)
        bert.load_state_dict(d2l.BERTModel(*args, **kwargs).state_dict())
    net = fastbert.BERTClassifier(bert, harness.NUM_CLASSES).to(dev)
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
    net, forward, backend = build_model(impl, dims, d2l, dev)
    batches = [make_batch(lens, dev) for lens in lens_list]
    if job == "train":
        return train_step_fn(net, forward, batches, precision, dev), backend
    return inference_fn(net, forward, batches, precision, dev), backend


def run_e2e(benchmark, job, impl, precision, e2e_case, d2l_or_none, lengths, baseline,
            ceilings, timing, bench_device):
    config, batch_size = e2e_case
    dims = harness.CONFIGS[config]
    lens_list = batch_lengths(lengths, batch_size)
    dtype = harness.DTYPES[precision]
    labels = {}
    if impl.startswith("fastbert-"):
        backend = impl.split("-", 1)[1]
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
    fn, backend = make_callable(job, impl, dims, d2l_or_none, bench_device, lens_list, precision)
    policy = timing if timing.max_rounds == 1 else harness.TimingPolicy(**E2E_TIMING)
    benchmark.group = f"e2e {job} {harness.case_id(config, batch_size)}"
    with warnings.catch_warnings(), harness.peer_conditions(not impl.startswith("fastbert-")), \
            (fastbert.use_backend(backend) if backend else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        out = fn()
        assert torch.isfinite(out.float()).all(), f"{impl} {precision}: non-finite output"
        seconds = harness.measure(benchmark, fn, policy, bench_device)

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
    # Per call: the mean over the batches.
    flops = sum(harness.encoder_forward_flops(dims, lens) for lens in lens_list) / len(lens_list) \
        * (3.0 if job == "train" else 1.0)
    tokens = round(sum(int(lens.sum()) for lens in lens_list) / len(lens_list))
    harness.record(benchmark, seconds, kind="e2e", impl=impl, dtype=precision,
                   batch=batch_size, tokens=tokens, flops=flops, ceilings=ceilings,
                   baseline_s=baseline_s, op=f"e2e {job}", mode=job, config=config,
                   seq_len=harness.SEQ_LEN, baseline_key="/".join(map(str, key)), **labels)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_finetune_train_step(benchmark, impl, precision, e2e_case, d2l_or_none, lengths,
                             baseline, ceilings, timing, bench_device):
    run_e2e(benchmark, "train", impl, precision, e2e_case, d2l_or_none, lengths, baseline,
            ceilings, timing, bench_device)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_inference(benchmark, impl, precision, e2e_case, d2l_or_none, lengths, baseline,
                   ceilings, timing, bench_device):
    run_e2e(benchmark, "infer", impl, precision, e2e_case, d2l_or_none, lengths, baseline,
            ceilings, timing, bench_device)
