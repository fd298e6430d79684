"""The d2l book's two BERT chapters as benchmarks, run verbatim: the real d2l 0.17.6 code
drives both rows, only the model class differs (``d2l.BERTModel`` vs ``fastbert.BERTModel``),
as for a reader who changed one import (issue 15, item 2).

    pytest benchmarks/bench_book_chapters.py --benchmark-only   # rows + ratios to d2l
    python benchmarks/bench_book_chapters.py [--rounds 5] [--chapter pretrain|finetune|both]
        [--profile]                                            # interleaved, ratios per round

``pretrain``: "Pretraining BERT" (d2l 0.17.6): ``d2l.train_bert``'s loop body, i.e.
``trainer.zero_grad()``, the real ``d2l._get_batch_loss_bert(net, loss, vocab_size, *batch)``
(``net(tokens_X, segments_X, valid_lens_x.reshape(-1), pred_positions_X)`` returning the full
``mlm_Y_hat[batch, slots, vocab]``, the book's ``nn.CrossEntropyLoss()`` times the slot
weights), ``l.backward()``, ``trainer.step()`` with ``torch.optim.Adam(lr=0.01)``; batch 512,
max_len 64, 128 hidden, 2 heads, FFN 256, 2 layers, dropout 0.2.  Data: the book's pipeline
(``fastbert.data.wiki``) on real WikiText-2 ``train`` when ``FASTBERT_DATA`` (or the cache)
has it, else the packaged ``valid`` split (a smaller vocabulary: the head is smaller; the row
records ``vocab_size`` and ``data_source``).  Each call takes the next of a few batches.

``finetune``: "Natural Language Inference: Fine-Tuning BERT": the chapter's ``BERTClassifier``
(its class, as the book writes it: ``self.encoder(tokens_X, segments_X, valid_lens_x)``, then
``<cls>``) on a bert.small-shaped ``BERTModel`` (256 hidden, 4 heads, FFN 512, 2 layers,
dropout 0.2, max_len 512, vocab 20,256 as ``load_pretrained_model`` builds it), one step of
``train_ch13`` = the real ``d2l.train_batch_ch13`` (``CrossEntropyLoss(reduction='none')``,
``l.sum().backward()``, ``Adam(lr=1e-4)``, accuracy); batch 512, max_len 128, real SNLI
pairs (``FASTBERT_DATA`` else the packaged test split) through the chapter's dataset.

Neither row installs fastbert's caching CPU allocator: the book's code never calls
``fastbert.enable_cpu_cache()``, so both rows run as the reader's would.
``--bench-quick``: batch 64 and one timed round each (checks the rows run, measures nothing).
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import time

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

PRETRAIN = dict(batch=512, max_len=64, hidden=128, ffn=256, heads=2, layers=2, dropout=0.2,
                lr=0.01)
FINETUNE = dict(batch=512, max_len=128, hidden=256, ffn=512, heads=4, layers=2, dropout=0.2,
                lr=1e-4, vocab=harness.VOCAB_SIZE)
QUICK_BATCH = 64
N_BATCHES = 4            # each call takes the next of these (new token counts, as in training)
IMPLS = ("d2l", "fastbert")
CHAPTER_TIMING = dict(budget_s=20.0, min_rounds=2, max_rounds=8, round_s=0.0, warmup=2)


# ----------------------------------------------------------------------------- the book's code
class BookBERTClassifier(nn.Module):
    """The fine-tuning chapter's ``BERTClassifier``, as the book writes it (it is not in the
    d2l package); the output layer reads 256 as the book hard-codes it."""

    def __init__(self, bert):
        super(BookBERTClassifier, self).__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.output = nn.Linear(256, 3)

    def forward(self, inputs):
        tokens_X, segments_X, valid_lens_x = inputs
        encoded_X = self.encoder(tokens_X, segments_X, valid_lens_x)
        return self.output(self.hidden(encoded_X[:, 0, :]))


def model_module(impl: str, d2l):
    if impl == "d2l":
        return d2l
    import fastbert
    return fastbert


def pretrain_bert(module, vocab_size: int, cfg=PRETRAIN) -> nn.Module:
    """The pretraining chapter's ``net = d2l.BERTModel(len(vocab), ...)``."""
    h = cfg["hidden"]
    return module.BERTModel(vocab_size, num_hiddens=h, norm_shape=[h], ffn_num_input=h,
                            ffn_num_hiddens=cfg["ffn"], num_heads=cfg["heads"],
                            num_layers=cfg["layers"], dropout=cfg["dropout"], key_size=h,
                            query_size=h, value_size=h, hid_in_features=h,
                            mlm_in_features=h, nsp_in_features=h)


def finetune_bert(module, cfg=FINETUNE) -> nn.Module:
    """``load_pretrained_model('bert.small', ...)``'s model (weights random here)."""
    h = cfg["hidden"]
    return module.BERTModel(cfg["vocab"], num_hiddens=h, norm_shape=[h], ffn_num_input=h,
                            ffn_num_hiddens=cfg["ffn"], num_heads=cfg["heads"],
                            num_layers=cfg["layers"], dropout=cfg["dropout"], max_len=512,
                            key_size=h, query_size=h, value_size=h, hid_in_features=h,
                            mlm_in_features=h, nsp_in_features=h)


# ----------------------------------------------------------------------------- data
def wiki_batches(batch_size: int, max_len: int = PRETRAIN["max_len"], n: int = N_BATCHES,
                 seed: int = 0):
    """``n`` batches of the book's WikiText-2 pipeline (``load_data_wiki``'s items), the vocab
    size and a description of the source."""
    from fastbert.data.paths import locate_wiki
    from fastbert.data.wiki import WikiTextDataset, read_wiki
    source, _ = locate_wiki()
    split, path = next(iter(source.files.items()))
    rng = random.Random(seed)
    dataset = WikiTextDataset(read_wiki(path, rng=rng), max_len, rng=rng)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, generator=g,
                                         drop_last=True)
    batches = list(itertools.islice(loader, n))
    return batches, len(dataset.vocab), f"wikitext-2 {split} ({source.source}, " \
                                        f"{len(dataset)} examples)"


def snli_batches(batch_size: int, max_len: int = FINETUNE["max_len"], n: int = N_BATCHES,
                 seed: int = 0):
    """``n`` batches of the chapter's ``SNLIBERTDataset`` items ``((tokens, segments,
    valid_lens), labels)`` on real SNLI pairs; ids from an SNLI vocabulary (all below the
    model's 20,256)."""
    from fastbert.data.paths import locate
    from fastbert.data.snli import SNLIBERTDataset, read_snli_file, snli_vocab
    source = locate("snli", ["test"])
    data = read_snli_file(source.files["test"])
    vocab = snli_vocab(data)
    assert len(vocab) <= FINETUNE["vocab"], len(vocab)
    dataset = SNLIBERTDataset(data, max_len, vocab, verbose=False)
    g = torch.Generator().manual_seed(seed)
    items = torch.utils.data.TensorDataset(dataset.all_token_ids, dataset.all_segments,
                                           dataset.valid_lens, dataset.labels)
    loader = torch.utils.data.DataLoader(items, batch_size, shuffle=True, generator=g,
                                         drop_last=True)
    batches = [((t, s, v), y) for t, s, v, y in itertools.islice(loader, n)]
    return batches, f"snli test ({source.source}, {len(dataset)} pairs)"


# ----------------------------------------------------------------------------- steps
def make_pretrain_step(impl: str, d2l, batches, vocab_size: int, cfg=PRETRAIN):
    """One step of the book's ``train_bert`` loop on the next batch; returns (step, net)."""
    torch.manual_seed(0)
    net = pretrain_bert(model_module(impl, d2l), vocab_size, cfg)
    loss = nn.CrossEntropyLoss()
    trainer = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    cycle = itertools.cycle(batches)

    def step():
        (tokens_X, segments_X, valid_lens_x, pred_positions_X, mlm_weights_X, mlm_Y,
         nsp_y) = next(cycle)
        trainer.zero_grad()
        mlm_l, nsp_l, l = d2l._get_batch_loss_bert(
            net, loss, vocab_size, tokens_X, segments_X, valid_lens_x, pred_positions_X,
            mlm_weights_X, mlm_Y, nsp_y)
        l.backward()
        trainer.step()
        return mlm_l.detach(), nsp_l.detach()
    return step, net


def make_finetune_step(impl: str, d2l, batches, cfg=FINETUNE):
    """One step of the chapter's ``train_ch13`` (``d2l.train_batch_ch13``) on the next batch."""
    torch.manual_seed(0)
    net = BookBERTClassifier(finetune_bert(model_module(impl, d2l), cfg))
    loss = nn.CrossEntropyLoss(reduction='none')
    trainer = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    devices = [torch.device("cpu")]
    cycle = itertools.cycle(batches)

    def step():
        X, y = next(cycle)
        return d2l.train_batch_ch13(net, list(X), y, loss, trainer, devices)
    return step, net


# ----------------------------------------------------------------------------- pytest rows
@pytest.fixture(scope="module")
def chapter_data(timing):
    quick = timing.max_rounds == 1
    batch = QUICK_BATCH if quick else None
    wiki, vocab_size, wiki_src = wiki_batches(batch or PRETRAIN["batch"], n=1 if quick else
                                              N_BATCHES)
    snli, snli_src = snli_batches(batch or FINETUNE["batch"], n=1 if quick else N_BATCHES)
    return {"wiki": wiki, "vocab_size": vocab_size, "wiki_source": wiki_src, "snli": snli,
            "snli_source": snli_src}


def _policy(timing):
    return timing if timing.max_rounds == 1 else harness.TimingPolicy(**CHAPTER_TIMING)


@pytest.mark.parametrize("impl", IMPLS)
def test_pretrain_chapter(benchmark, impl, chapter_data, d2l, timing, baseline, bench_device):
    if bench_device.type != "cpu":
        pytest.skip("this benchmark drives the CPU build (the book's chapter on this machine)")
    batches, vocab_size = chapter_data["wiki"], chapter_data["vocab_size"]
    step, _ = make_pretrain_step(impl, d2l, batches, vocab_size)
    policy = _policy(timing)
    with harness.peer_conditions(True):  # the book never installs the allocator cache
        seconds = harness.measure(benchmark, step, policy, bench_device,
                                  iterations=len(batches))
    key = ("pretrain_chapter", batches[0][0].shape[0], vocab_size)
    if impl == "d2l":
        baseline.put(key, seconds)
    base = baseline.get(key, lambda: make_pretrain_step("d2l", d2l, batches, vocab_size)[0],
                        reps=len(batches))
    mlm_l, nsp_l = step()
    assert torch.isfinite(mlm_l) and torch.isfinite(nsp_l)
    B = batches[0][0].shape[0]
    harness.record(benchmark, seconds, kind="pretrain_chapter", impl=impl, dtype="fp32",
                   batch=B, tokens=int(sum(float(b[2].sum()) for b in batches) / len(batches)),
                   baseline_s=base, data_source=chapter_data["wiki_source"],
                   vocab_size=vocab_size, max_len=PRETRAIN["max_len"],
                   recipe="d2l 0.17.6 train_bert loop body, _get_batch_loss_bert verbatim")


@pytest.mark.parametrize("impl", IMPLS)
def test_finetune_chapter(benchmark, impl, chapter_data, d2l, timing, baseline, bench_device):
    if bench_device.type != "cpu":
        pytest.skip("this benchmark drives the CPU build (the book's chapter on this machine)")
    batches = chapter_data["snli"]
    step, _ = make_finetune_step(impl, d2l, batches)
    policy = _policy(timing)
    with harness.peer_conditions(True):
        seconds = harness.measure(benchmark, step, policy, bench_device,
                                  iterations=len(batches))
    B = batches[0][1].numel()
    key = ("finetune_chapter", B)
    if impl == "d2l":
        baseline.put(key, seconds)
    base = baseline.get(key, lambda: make_finetune_step("d2l", d2l, batches)[0],
                        reps=len(batches))
    l, _ = step()
    assert torch.isfinite(l)
    harness.record(benchmark, seconds, kind="finetune_chapter", impl=impl, dtype="fp32",
                   batch=B, tokens=int(sum(float(b[0][2].sum()) for b in batches) /
                                       len(batches)),
                   baseline_s=base, data_source=chapter_data["snli_source"],
                   max_len=FINETUNE["max_len"],
                   recipe="d2l 0.17.6 train_batch_ch13 verbatim, the chapter's BERTClassifier")


# ----------------------------------------------------------------------------- script mode
def chapter_steps(chapter: str, d2l, batch=None):
    """(batches, {impl: one step}, data source) of a chapter, for the script modes."""
    if chapter == "pretrain":
        batches, vocab_size, src = wiki_batches(batch or PRETRAIN["batch"])
        return batches, {i: make_pretrain_step(i, d2l, batches, vocab_size)[0] for i in IMPLS}, src
    batches, src = snli_batches(batch or FINETUNE["batch"])
    return batches, {i: make_finetune_step(i, d2l, batches)[0] for i in IMPLS}, src


def interleaved(chapters=("pretrain", "finetune"), rounds: int = 5, batch=None) -> dict:
    """Every implementation of each chapter timed round by round (one step each per round, in
    turn), so machine noise hits them alike; prints medians and the per-round ratios."""
    import fastbert
    d2l = harness.load_d2l_017()
    out = {}
    for chapter in chapters:
        batches, fns, src = chapter_steps(chapter, d2l, batch)
        with fastbert.cpu_cache_disabled():
            for fn in fns.values():
                for _ in range(len(batches)):
                    fn()
            times = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(len(batches)):
                        fn()
                    times[k].append((time.perf_counter() - t0) / len(batches))
        ratios = [a / b for a, b in zip(times["d2l"], times["fastbert"])]
        print(f"{chapter}: {src}; threads {torch.get_num_threads()}; "
              f"load {os.getloadavg()}", flush=True)
        for k, ts in times.items():
            print(f"  {k:9s} median {statistics.median(ts):.3f} s/step  "
                  f"{batches[0][0].shape[0] if chapter == 'pretrain' else batches[0][1].numel()}"
                  f"-pair batches: "
                  f"{(batches[0][1].numel() if chapter == 'finetune' else batches[0][0].shape[0]) / statistics.median(ts):.0f} pairs/s",
                  flush=True)
        print(f"  fastbert vs d2l: {statistics.median(ratios):.2f}x (rounds "
              f"{min(ratios):.2f}-{max(ratios):.2f})", flush=True)
        out[chapter] = {"times": times, "ratios": ratios}
    return out


def profile(chapter: str = "pretrain", steps: int = 3, top: int = 25, batch=None) -> None:
    """torch.profiler tables (self CPU time) of the chapter's step, d2l and fastbert."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    import fastbert
    d2l = harness.load_d2l_017()
    batches, fns, src = chapter_steps(chapter, d2l, batch)
    print(f"{chapter}: {src}; threads {torch.get_num_threads()}")
    with fastbert.cpu_cache_disabled():
        for impl, fn in fns.items():
            for _ in range(len(batches)):
                fn()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    fn()
            print(f"=== {impl}: {steps} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", choices=("pretrain", "finetune", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = ("pretrain", "finetune") if args.chapter == "both" else (args.chapter,)
    if args.profile:
        for c in chosen:
            profile(c, args.steps, batch=args.batch)
    else:
        interleaved(chosen, args.rounds, args.batch)
