"""The book's pretraining run (d2l 0.17 "Pretraining BERT": load_data_wiki(512, 64), the
book's BERTModel, Adam lr 0.01, 50 steps of train_bert) on real WikiText-2, with fastbert's
model and loss or the real d2l ones, printing what the book prints.

    python benchmarks/pretrain_book_run.py --impl fastbert --loss book --seeds 0 1 2
    python benchmarks/pretrain_book_run.py --impl d2l --seeds 0

The printed "MLM loss" / "NSP loss" are train_bert's: the mean over the 50 steps of each
step's loss; "last" is the 50th step's.  Pairs/s counts, as train_bert does, only the time
of the steps (forward, loss, backward, Adam), not data loading.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_pretrain as bp  # noqa: E402
import harness  # noqa: E402


def run(impl: str, loss_mode: str, seed: int, steps: int = 50, amp: bool = False,
        dataset=None) -> dict:
    import fastbert
    from fastbert.data.paths import locate
    from fastbert.data.wiki import WikiTextDataset, read_wiki
    from fastbert.losses import bert_pretrain_loss
    random.seed(seed)
    torch.manual_seed(seed)
    if dataset is None:
        train = locate("wikitext-2", ["train"]).files["train"]  # FASTBERT_DATA or the cache
        dataset = WikiTextDataset(read_wiki(train, rng=random), bp.MAX_LEN,
                                  rng=random)
    vocab_size = len(dataset.vocab)
    train_iter = torch.utils.data.DataLoader(dataset, bp.BATCH, shuffle=True)
    d2l = harness.load_d2l_017() if impl == "d2l" else None
    net = bp.book_bert(d2l if impl == "d2l" else fastbert, vocab_size)
    loss = nn.CrossEntropyLoss()
    trainer = torch.optim.Adam(net.parameters(), lr=bp.LR)
    sums, last, seconds, pairs, step = [0.0, 0.0], None, 0.0, 0, 0
    while step < steps:
        for batch in train_iter:
            trainer.zero_grad()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                if impl == "d2l":
                    mlm_l, nsp_l, l = d2l._get_batch_loss_bert(net, loss, vocab_size, *batch)
                else:
                    mlm_l, nsp_l, l = bert_pretrain_loss(net, vocab_size, *batch,
                                                         book_compatible=loss_mode == "book")
            l.backward()
            trainer.step()
            seconds += time.perf_counter() - t0
            pairs += batch[0].shape[0]
            last = (float(mlm_l.detach()), float(nsp_l.detach()))
            sums[0] += last[0]
            sums[1] += last[1]
            step += 1
            if step == steps:
                break
    return {"impl": impl, "loss": loss_mode, "amp": amp, "seed": seed, "steps": steps,
            "mlm_loss_mean": sums[0] / steps, "nsp_loss_mean": sums[1] / steps,
            "mlm_loss_last": last[0], "nsp_loss_last": last[1],
            "pairs_per_s": pairs / seconds, "examples": len(dataset), "vocab": vocab_size}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("fastbert", "d2l"), default="fastbert")
    parser.add_argument("--loss", choices=("book", "real-slots"), default="book")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    for seed in args.seeds:
        out = run(args.impl, args.loss, seed, args.steps, args.amp)
        print(f"MLM loss {out['mlm_loss_mean']:.3f}, NSP loss {out['nsp_loss_mean']:.3f} "
              f"(last step {out['mlm_loss_last']:.3f} / {out['nsp_loss_last']:.3f}); "
              f"{out['pairs_per_s']:.1f} sentence pairs/sec", flush=True)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
