"""``python -m fastbert finetune|pretrain ...`` (also under ``torchrun --nproc_per_node=N``)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


DATA_HELP = ("Data is read from --data-dir if given, else FASTBERT_DATA, else a full copy in "
             "the cache (FASTBERT_HOME, default ~/.cache/fastbert; see --download), else the "
             "splits packaged with fastbert (SNLI dev/test, WikiText-2 valid; CC BY-SA).")


def _run_options(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--epochs", type=int, default=defaults.epochs)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="global batch size (split across torchrun processes)")
    g.add_argument("--lr", type=float, default=defaults.lr,
                   help="Adam learning rate" + (" (default: 1e-4 with --pretrained as in the "
                                                "book, 5e-4 for a fresh model)"
                                                if defaults.lr is None else ""))
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default=defaults.amp,
                   help="autocast dtype (fp16 uses a GradScaler and needs CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--backend", default=defaults.backend,
                   help="fastbert kernel backend: auto, reference, cpp, triton")
    g.add_argument("--out-dir", default=None,
                   help="where checkpoint.pt, metrics.json and curves.png go")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <out-dir>/checkpoint.pt)")
    g.add_argument("--max-steps", type=int, default=defaults.max_steps,
                   help="stop after this many optimizer steps (checkpointing the position)")
    g.add_argument("--bucket", action="store_true",
                   help="length-aware batching (batches of similar valid length)")
    g.add_argument("--no-trim", dest="trim", action="store_false",
                   help="keep every batch padded to --max-len")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--num-workers", type=int, default=defaults.num_workers)
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (torch.set_num_threads)")
    g.add_argument("--quiet", dest="verbose", action="store_false")


def _model_options(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--max-len", type=int, default=d.max_len)
    g.add_argument("--num-hiddens", type=int, default=d.num_hiddens)
    g.add_argument("--ffn-num-hiddens", type=int, default=d.ffn_num_hiddens)
    g.add_argument("--num-heads", type=int, default=d.num_heads)
    g.add_argument("--num-layers", type=int, default=d.num_layers)
    g.add_argument("--dropout", type=float, default=d.dropout)


def build_parser() -> argparse.ArgumentParser:
    from .train import FinetuneConfig, PretrainConfig
    parser = argparse.ArgumentParser(prog="python -m fastbert",
                                     description="The d2l book's BERT, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    fd = FinetuneConfig()
    f = sub.add_parser("finetune", help="fine-tune on SNLI (default: train on dev, test on "
                                        "test; packaged with fastbert, no download)")
    g = f.add_argument_group("data", DATA_HELP)
    g.add_argument("--data-dir", default=None,
                   help="folder with SNLI (official snli_1.0_<split>.txt or "
                        "snli_1.0_<split>.tokenized.tsv[.gz]); the only place looked when given")
    g.add_argument("--download", action="store_true",
                   help="fetch the full SNLI 1.0 (the book's DATA_HUB['SNLI'], with train) "
                        "into the cache first (FASTBERT_HOME; sha1-checked, resumable)")
    g.add_argument("--train-split", default=fd.train_split)
    g.add_argument("--test-split", default=fd.test_split)
    g.add_argument("--train-limit", type=int, default=None, help="use the first N examples")
    g.add_argument("--test-limit", type=int, default=None)
    g.add_argument("--min-freq", type=int, default=fd.min_freq,
                   help="vocabulary min frequency (fresh model)")
    g.add_argument("--eval-batch-size", type=int, default=None)
    f.add_argument("--pretrained", default=None,
                   help="bert.small, bert.base (download), a folder or .zip in the book's "
                        "format (vocab.json + pretrained.params), or a Hugging Face folder")
    _model_options(f, fd)
    f.set_defaults(dropout=None)
    _run_options(f, fd)

    pd = PretrainConfig()
    p = sub.add_parser("pretrain", help="pretrain MLM + NSP on WikiText-2 (the book's recipe)")
    g = p.add_argument_group("data", DATA_HELP)
    g.add_argument("--data-dir", default=None,
                   help="folder with wiki.<split>.tokens[.gz] (or its wikitext-2/ folder); "
                        "the only place looked when given")
    g.add_argument("--download", action="store_true",
                   help="fetch the full WikiText-2 (the book's DATA_HUB['wikitext-2']) into "
                        "the cache first (FASTBERT_HOME; sha1-checked, resumable)")
    g.add_argument("--split", default=pd.split,
                   help="train, valid or test (default: train; when no train split is "
                        "available, the packaged valid split, said so in the output)")
    g.add_argument("--max-paragraphs", type=int, default=None)
    p.add_argument("--mlm-loss", choices=["book", "real-slots"], default=pd.mlm_loss,
                   help="book: _get_batch_loss_bert's numbers (mean over all slots, padding "
                        "included); real-slots: weighted mean over real slots (fused head)")
    _model_options(p, pd)
    _run_options(p, pd)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .train import FinetuneConfig, PretrainConfig, finetune, pretrain
    config_cls, fn = ((FinetuneConfig, finetune) if args.command == "finetune"
                      else (PretrainConfig, pretrain))
    names = {f.name for f in dataclasses.fields(config_cls)}
    cfg = config_cls(**{k: v for k, v in vars(args).items() if k in names})
    try:
        fn(cfg)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
