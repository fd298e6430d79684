"""Pretraining BERT on WikiText-2 (MLM + NSP), as the book's ``train_bert`` does it: the
book's data pipeline and model sizes, Adam lr 0.01, a fixed number of steps, the losses of
``_get_batch_loss_bert`` (through :func:`fastbert.losses.bert_pretrain_loss`), plus DDP,
AMP, torch.compile, exact checkpoints/resume, a JSON log and curves.

Library use::

    from fastbert.train import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(max_steps=50, out_dir="runs/wiki"))
"""
from __future__ import annotations

import dataclasses
import functools
import os
import random
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..bert import BERTModel
from ..data.batching import GlobalBatchSampler, trim_collate
from ..data.download import download_data_once
from ..data.paths import locate_wiki
from ..data.wiki import WikiTextDataset, read_wiki
from . import engine
from .common import (RunConfig, all_reduce_sum, make_adam, make_grad_scaler, resolve_device,
                     run_training, seed_everything)

__all__ = ["PretrainConfig", "pretrain", "PretrainLoss", "batch_loss_bert"]


@dataclasses.dataclass
class PretrainConfig(RunConfig):
    data_dir: Optional[str] = None     # None: FASTBERT_DATA, the cache, the packaged split
    split: Optional[str] = None        # None: train, else (said so) the packaged valid
    download: bool = False             # fetch the full WikiText-2 into the cache first
    max_paragraphs: Optional[int] = None
    max_len: int = 64                  # the book's pretraining recipe ...
    num_hiddens: int = 128
    ffn_num_hiddens: int = 256
    num_heads: int = 2
    num_layers: int = 2
    dropout: float = 0.2
    batch_size: int = 512
    lr: float = 0.01
    max_steps: Optional[int] = 50
    epochs: int = 1000                 # an upper bound: the book counts steps
    mlm_loss: str = "book"             # book: _get_batch_loss_bert's numbers; real-slots: fused


def batch_loss_bert(net, vocab_size, tokens_X, segments_X, valid_lens_x, pred_positions_X,
                    mlm_weights_X, mlm_Y, nsp_y, book_compatible: bool = True):
    """``(mlm_l, nsp_l, l)``: :func:`fastbert.losses.bert_pretrain_loss` when present, else
    the book's ``_get_batch_loss_bert`` formula."""
    try:
        from ..losses import bert_pretrain_loss
    except ImportError:
        bert_pretrain_loss = None
    if bert_pretrain_loss is not None:
        return bert_pretrain_loss(net, vocab_size, tokens_X, segments_X, valid_lens_x,
                                  pred_positions_X, mlm_weights_X, mlm_Y, nsp_y,
                                  book_compatible=book_compatible)
    if not book_compatible:
        raise RuntimeError("the real-slots MLM loss needs fastbert.losses")
    loss = nn.CrossEntropyLoss()
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens_x.reshape(-1),
                                  pred_positions_X)
    mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size).float(), mlm_Y.reshape(-1)) * \
        mlm_weights_X.reshape(-1, 1)
    mlm_l = mlm_l.sum() / (mlm_weights_X.sum() + 1e-8)
    nsp_l = loss(nsp_Y_hat.float(), nsp_y)
    return mlm_l, nsp_l, mlm_l + nsp_l


class PretrainLoss(nn.Module):
    """The whole pretraining forward (model + losses) as one module, so DDP and
    torch.compile see every parameter, the fused MLM head's included."""

    def __init__(self, bert: BERTModel, vocab_size: int, book_compatible: bool):
        super().__init__()
        self.bert, self.vocab_size, self.book_compatible = bert, vocab_size, book_compatible

    def forward(self, tokens, segments, valid_lens, pred_positions, mlm_weights, mlm_Y, nsp_y):
        mlm_l, nsp_l, _ = batch_loss_bert(self.bert, self.vocab_size, tokens, segments,
                                          valid_lens, pred_positions, mlm_weights, mlm_Y,
                                          nsp_y, self.book_compatible)
        return mlm_l.float(), nsp_l.float()


class _PretrainTask(engine.Task):
    """The book's pretraining step (_get_batch_loss_bert) over DDP shards."""
    kind, curves, num_stats = "pretrain", ("mlm_loss", "nsp_loss"), 3
    vocab_hint = "different data, --max-paragraphs or --seed"

    def forward(self, model, batch, dist):
        n_local = batch[0].shape[0]
        w_local = batch[4].sum()
        counts = torch.tensor([float(n_local), float(w_local)], dtype=torch.float64)
        all_reduce_sum(counts, dist)
        mlm_l, nsp_l = model(*batch)
        # Each rank's losses are means over its shard; weighting them by the shard's
        # share (x world size, as DDP averages) gives exactly the global-batch means.
        nsp_share = n_local * dist.world_size / counts[0].item()
        mlm_share = (nsp_share if self.book
                     else float(w_local) * dist.world_size / max(counts[1].item(), 1e-8))
        total = mlm_l * mlm_share + nsp_l * nsp_share
        stats = torch.tensor([mlm_l.item() * mlm_share / dist.world_size,
                              nsp_l.item() * nsp_share / dist.world_size, float(n_local)],
                             dtype=torch.float64)
        return total, stats

    def record(self, v):
        return {"mlm_loss": float(v[0]), "nsp_loss": float(v[1]), "examples": int(v[2])}

    def postfix(self, sums, v):
        return {"mlm": f"{v[0]:.3f}", "nsp": f"{v[1]:.3f}"}

    def progress_total(self, sampler, cfg, global_step):
        return min(len(sampler), cfg.max_steps - global_step) if cfg.max_steps else None

    def epoch_row(self, eng, epoch, sums):
        rows = [r for r in eng.log.steps if epoch < r["epoch_float"] <= epoch + 1]
        if not rows:
            return None
        return {"epoch": epoch + 1, "epoch_float": epoch + 1.0, "steps": eng.global_step,
                "mlm_loss": sum(r["mlm_loss"] for r in rows) / len(rows),
                "nsp_loss": sum(r["nsp_loss"] for r in rows) / len(rows)}


def pretrain(cfg: Optional[PretrainConfig] = None, **overrides) -> Dict[str, Any]:
    """Pretrain on WikiText-2; returns ``{"steps": [...], "epochs": [...], "mlm_loss",
    "nsp_loss", "pairs_per_sec", "model", "vocab"}``."""
    cfg = dataclasses.replace(cfg or PretrainConfig(), **overrides)
    if cfg.mlm_loss not in ("book", "real-slots"):
        raise ValueError(f"--mlm-loss must be book or real-slots, got {cfg.mlm_loss!r}")
    return run_training(cfg, _pretrain)


def _pretrain(cfg: PretrainConfig, dist) -> Dict[str, Any]:
    device = resolve_device(cfg.device, dist)
    main = dist.is_main
    say = print if (main and cfg.verbose) else (lambda *a, **k: None)
    seed_everything(cfg.seed)
    if cfg.download:
        download_data_once("wikitext-2", progress=cfg.progress and main,
                           verbose=main and cfg.verbose)
    source, notice = locate_wiki(cfg.split, cfg.data_dir)
    if notice:
        say(notice)
    say(source.describe())
    (wiki_file,) = source.files.values()
    # The book's pipeline draws from Python's `random`; a seeded private generator makes
    # every rank build the same examples.
    rng = random.Random(cfg.seed)
    paragraphs = read_wiki(wiki_file, rng=rng, max_paragraphs=cfg.max_paragraphs)
    train_set = WikiTextDataset(paragraphs, cfg.max_len, rng=rng)
    vocab = train_set.vocab
    if len(train_set) == 0:
        raise ValueError(f"no pretraining example fits max_len={cfg.max_len}")
    say(f"{len(train_set)} pretraining examples, vocabulary of {len(vocab)} tokens")
    h = cfg.num_hiddens
    bert = BERTModel(len(vocab), h, norm_shape=[h], ffn_num_input=h,
                     ffn_num_hiddens=cfg.ffn_num_hiddens, num_heads=cfg.num_heads,
                     num_layers=cfg.num_layers, dropout=cfg.dropout, max_len=cfg.max_len,
                     key_size=h, query_size=h, value_size=h, hid_in_features=h,
                     mlm_in_features=h, nsp_in_features=h)
    if not bert.encoder.train_pos_embedding:
        bert.encoder.pos_embedding.requires_grad_(False)  # d2l 0.17 never trains it
    task = _PretrainTask()
    task.step_module = PretrainLoss(bert, len(vocab), cfg.mlm_loss == "book").to(device)
    task.net = task.bert = bert
    task.vocab, task.train_set, task.book = vocab, train_set, cfg.mlm_loss == "book"
    task.optimizer = make_adam([p for p in bert.parameters() if p.requires_grad], cfg.lr)
    task.scaler = make_grad_scaler(device, cfg.amp)
    task.collate = (functools.partial(trim_collate, valid_len_index=2, seq_fields=(0, 1))
                    if cfg.trim else torch.utils.data.default_collate)
    eng = engine.train(cfg, dist, device, task)
    log, timer, pairs, curves = eng.log, eng.timer, eng.examples, task.curves
    # The book prints the mean of the per-step losses over the run.
    steps = log.steps
    mlm = sum(r["mlm_loss"] for r in steps) / max(len(steps), 1)
    nsp = sum(r["nsp_loss"] for r in steps) / max(len(steps), 1)
    pps = pairs / timer.total if timer.total > 0 else 0.0
    say(f"MLM loss {mlm:.3f}, NSP loss {nsp:.3f}")
    say(f"{pps:.1f} sentence pairs/sec on "
        f"{f'{dist.world_size} x {device}' if dist.enabled else device}")
    log.data["pairs_per_sec"] = pps
    log.write(curves=curves)
    return {"steps": steps, "epochs": log.epochs, "mlm_loss": mlm, "nsp_loss": nsp,
            "pairs_per_sec": pps, "model": bert, "vocab": vocab, "rank": dist.rank,
            "world_size": dist.world_size, "compile": log.data.get("compile")}
