"""Use what you trained: load a run back (:func:`load_run`), classify sentence pairs
(:func:`classify`), evaluate on an SNLI split or file (:func:`evaluate_run`) and read pair
files for ``python -m fastbert predict`` (:func:`read_pairs`).

A *run* is what ``python -m fastbert finetune|pretrain --out-dir DIR`` wrote: ``DIR`` (its
newest verified checkpoint is used) or one checkpoint file (``checkpoint.pt`` or
``checkpoint-<step>.pt``), a ``torch.save`` dict with the keys ``model`` (state_dict),
``config`` (the run's options), ``vocab`` (``idx_to_token``; None when a Hugging Face
WordPiece tokenizer was used) and ``kind`` (``finetune`` / ``pretrain``).

Library use::

    from fastbert.train import load_run, classify
    run = load_run("runs/snli")                       # Run(model, vocab, config, kind)
    rows = classify(run, [("A man sleeps .", "A person rests .")])
    rows[0]["label"], rows[0]["probs"]                # 'entailment', [p_e, p_c, p_n]
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..bert import BERTClassifier, BERTModel
from ..data.snli import LABELS, SNLIBERTDataset, _extract_text
from ..data.vocab import Vocab
from .checkpoint import load_checkpoint

__all__ = ["Run", "RunError", "load_run", "bert_options", "build_bert", "classify",
           "predict_logits", "encode_pairs", "evaluate_run", "read_pairs", "LABEL_NAMES",
           "is_run"]

# Class ids of the readers (fastbert.data.snli.LABELS): entailment=0, contradiction=1,
# neutral=2.
LABEL_NAMES = [name for name, _ in sorted(LABELS.items(), key=lambda kv: kv[1])]


class RunError(ValueError):
    """A path that is not a fastbert run (folder or checkpoint); the message names it."""


class Run(NamedTuple):
    """A loaded run: ``model`` (``BERTClassifier`` for fine-tuning, ``BERTModel`` for
    pretraining; eval mode, on the device asked for), ``vocab`` (the book's
    :class:`~fastbert.data.vocab.Vocab` or a ``WordPieceTokenizer``), ``config`` (the run's
    options, a dict), ``kind`` (``"finetune"`` or ``"pretrain"``) and ``path``."""
    model: torch.nn.Module
    vocab: Any
    config: Dict[str, Any]
    kind: str
    path: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_len(self) -> int:
        return int(self.config.get("max_len") or self.bert_encoder.pos_embedding.shape[1])

    @property
    def bert_encoder(self):
        return self.model.encoder

    @property
    def uses_wordpiece(self) -> bool:
        return not isinstance(self.vocab, Vocab)


def bert_options(bert: BERTModel) -> Dict[str, Any]:
    """The ``BERTModel`` keyword arguments that rebuild ``bert``'s architecture (stored in
    checkpoints as ``bert_options``; read back by :func:`build_bert`)."""
    enc = bert.encoder
    blk = enc.blks[0]
    opts = dict(vocab_size=enc.token_embedding.num_embeddings,
                num_hiddens=enc.token_embedding.embedding_dim,
                ffn_num_hiddens=blk.ffn.dense1.out_features,
                num_heads=blk.attention.num_heads, num_layers=len(enc.blks),
                dropout=blk.addnorm1.dropout.p, max_len=enc.pos_embedding.shape[1],
                ffn_activation=blk.ffn.activation, layer_norm_eps=blk.addnorm1.ln.eps,
                embedding_layer_norm=enc.embedding_norm is not None,
                train_pos_embedding=bool(enc.train_pos_embedding))
    mlm = getattr(bert, "mlm", None)
    if mlm is not None:
        opts["mlm_activation"] = "gelu" if isinstance(mlm.mlp[1], torch.nn.GELU) else "relu"
        opts["mlm_eps"] = mlm.mlp[2].eps
    return opts


def build_bert(opts: Dict[str, Any]) -> BERTModel:
    """A fresh ``BERTModel`` with the architecture ``opts`` (from :func:`bert_options`)."""
    o = dict(opts)
    mlm_act, mlm_eps = o.pop("mlm_activation", "relu"), o.pop("mlm_eps", 1e-5)
    h = o.pop("num_hiddens")
    bert = BERTModel(o.pop("vocab_size"), h, norm_shape=[h], ffn_num_input=h,
                     ffn_num_hiddens=o.pop("ffn_num_hiddens"), num_heads=o.pop("num_heads"),
                     num_layers=o.pop("num_layers"), dropout=o.pop("dropout"),
                     max_len=o.pop("max_len"), key_size=h, query_size=h, value_size=h,
                     hid_in_features=h, mlm_in_features=h, nsp_in_features=h, **o)
    if mlm_act == "gelu":
        bert.mlm.mlp[1] = torch.nn.GELU()
    bert.mlm.mlp[2].eps = mlm_eps
    return bert


def _options_from_state(state: Dict[str, torch.Tensor], config: Dict[str, Any],
                        path: str) -> Dict[str, Any]:
    """Architecture of a checkpoint written before ``bert_options`` was stored: sizes from
    the tensors, the head count from the run's config (the book's layout otherwise)."""
    try:
        vocab_size, h = state["encoder.token_embedding.weight"].shape
        max_len = state["encoder.pos_embedding"].shape[1]
        ffn = state["encoder.blks.0.ffn.dense1.weight"].shape[0]
    except KeyError as e:
        raise RunError(f"{path}: the checkpoint's model has no {e} (not a fastbert BERT)")
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.blks.")})
    heads = config.get("num_heads") if config.get("num_hiddens") == h else None
    opts = dict(vocab_size=vocab_size, num_hiddens=h, ffn_num_hiddens=ffn,
                num_heads=heads or max(1, h // 64), num_layers=layers,
                dropout=float(config.get("dropout") or 0.1), max_len=max_len,
                embedding_layer_norm="encoder.embedding_norm.weight" in state)
    if opts["embedding_layer_norm"]:
        # Fine-tuned from a Hugging Face folder: its config.json has what the tensors lack.
        from .. import hf
        from .finetune import resolve_pretrained_name
        try:
            src = resolve_pretrained_name(config.get("pretrained"))
        except ValueError as e:
            raise RunError(f"{path}: an older checkpoint of a run fine-tuned from "
                           f"{config.get('pretrained')!r}: {e}") from e
        if not src or not hf.is_hf_checkpoint(src):
            raise RunError(f"{path}: an older checkpoint (no bert_options) of a run "
                           f"fine-tuned from the Hugging Face folder {src!r}, which is not "
                           f"here: its config.json is needed to rebuild the model")
        c = hf.load_hf_config(src)
        act, eps = hf.ACTIVATIONS[c.get("hidden_act", "gelu")], c.get("layer_norm_eps", 1e-12)
        opts.update(num_heads=c["num_attention_heads"], ffn_activation=act,
                    layer_norm_eps=eps, train_pos_embedding=True, mlm_activation=act,
                    mlm_eps=eps)
    return opts


def is_run(path: str) -> bool:
    """Whether ``path`` is a run folder (holds a checkpoint) or a checkpoint file."""
    if os.path.isdir(path):
        from .checkpoint import LATEST_NAME, find_checkpoints
        return bool(find_checkpoints(path)) or os.path.isfile(os.path.join(path, LATEST_NAME))
    return os.path.isfile(path) and path.endswith(".pt")


def _tokenizer_for(ckpt: Dict[str, Any], config: Dict[str, Any], path: str):
    """The WordPiece tokenizer of a run fine-tuned from a Hugging Face folder."""
    from ..data.wordpiece import WordPieceTokenizer
    from .finetune import resolve_pretrained_name
    try:
        src = resolve_pretrained_name(config.get("pretrained"))
    except ValueError as e:
        raise RunError(f"{path}: the run's tokenizer comes with its --pretrained model: {e}")
    if not src or not os.path.isdir(src):
        raise RunError(f"{path}: the run used a WordPiece tokenizer (no book vocabulary in the "
                       f"checkpoint) read from --pretrained {src!r}, which is not a folder "
                       f"here; its vocab.txt is needed to tokenize")
    return WordPieceTokenizer.from_pretrained(src)


def load_run(path, device="cpu") -> Run:
    """Load a fine-tuning or pretraining run (its ``--out-dir``, or one checkpoint file)
    into a :class:`Run` whose model is in eval mode on ``device``.

    Raises ``FileNotFoundError`` when ``path`` does not exist and :class:`RunError` (a
    ``ValueError``) naming ``path`` when it is not a fastbert run."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"run {path} not found (expected a --out-dir of "
                                f"'python -m fastbert finetune|pretrain' or a checkpoint .pt)")
    if os.path.isdir(path) and not is_run(path):
        raise RunError(f"{path} is not a fastbert run folder: it holds no checkpoint.pt or "
                       f"checkpoint-<step>.pt")
    try:
        ckpt = load_checkpoint(path)
    except (ValueError, OSError) as e:
        raise RunError(f"{path} is not a usable fastbert run: {e}") from e
    kind = ckpt.get("kind")
    if kind not in ("finetune", "pretrain"):
        raise RunError(f"{path}: unknown checkpoint kind {kind!r} (expected 'finetune' or "
                       f"'pretrain')")
    config = dict(ckpt.get("config") or {})
    state = ckpt["model"]
    opts = ckpt.get("bert_options") or _options_from_state(state, config, path)
    if ckpt.get("vocab") is not None:
        vocab = Vocab.from_idx_to_token(ckpt["vocab"])
    else:
        vocab = _tokenizer_for(ckpt, config, path)
    bert = build_bert(opts)
    if kind == "finetune":
        num_classes = state["output.weight"].shape[0] if "output.weight" in state else \
            config.get("num_classes", 3)
        model = BERTClassifier(bert, num_classes=num_classes)
    else:
        model = bert
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunError(f"{path}: the checkpoint's weights do not fit the model rebuilt from "
                       f"it: {e}") from e
    model.to(torch.device(device)).eval()
    return Run(model, vocab, config, kind, path)


# ----------------------------------------------------------------------------- inference
def encode_pairs(run_or_vocab, premises: Sequence[str], hypotheses: Sequence[str],
                 labels: Optional[Sequence[int]] = None, max_len: Optional[int] = None):
    """The dataset fine-tuning builds for these pairs (the book's ``SNLIBERTDataset`` with
    a book vocabulary, WordPiece ids with a tokenizer); ``labels`` default to 0."""
    from .finetune import PairDataset
    vocab = run_or_vocab.vocab if isinstance(run_or_vocab, Run) else run_or_vocab
    if max_len is None:
        if not isinstance(run_or_vocab, Run):
            raise ValueError("encode_pairs needs max_len with a bare vocabulary")
        max_len = run_or_vocab.max_len
    labels = list(labels) if labels is not None else [0] * len(premises)
    if isinstance(vocab, Vocab):
        return SNLIBERTDataset((list(premises), list(hypotheses), labels), max_len, vocab,
                               verbose=False)
    t, s, v = vocab.encode_pairs(list(premises), list(hypotheses), max_len=max_len,
                                 pad_to_max_len=True)
    return PairDataset(t, s, v, labels)


def predict_logits(model, dataset, batch_size: int = 256, device=None, amp: str = "off",
                   progress: bool = False) -> torch.Tensor:
    """Logits ``[N, classes]`` (float32, CPU) for every example of ``dataset``, in the
    dataset's order, computed in length-bucketed batches trimmed to their longest pair
    (fine-tuning's evaluation loader and loop, :func:`fastbert.train.finetune.eval_batches`)."""
    from .finetune import eval_batches, eval_loader
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = len(dataset)
    out = torch.empty(n, model.output.out_features, dtype=torch.float32)
    if n == 0:
        return out
    loader, order = eval_loader(dataset, batch_size, bucket=True)
    done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="pair", dynamic_ncols=True, leave=False, file=sys.stderr)
    for logits, _ in eval_batches(model, loader, device, amp):
        k = logits.shape[0]
        out[torch.as_tensor(order[done:done + k])] = logits.float().cpu()
        done += k
        if bar is not None:
            bar.update(k)
    if bar is not None:
        bar.close()
    return out


def classify(run: Run, pairs: Iterable[Tuple[str, str]], batch_size: int = 256,
             progress: bool = False) -> List[Dict[str, Any]]:
    """Classify ``(premise, hypothesis)`` pairs with a fine-tuned run: one dict per pair, in
    input order: ``{"label": "entailment"|"contradiction"|"neutral", "label_id": int,
    "probs": [p_entailment, p_contradiction, p_neutral]}``.  Text is tokenized as the run's
    training data was (the book: lowercased, split on whitespace, so punctuation should be
    space-separated as in SNLI; WordPiece: raw text)."""
    if run.kind != "finetune":
        raise ValueError(f"{run.path} is a {run.kind} run: classify needs a fine-tuned one")
    pairs = list(pairs)
    if not pairs:
        return []
    premises = [p for p, _ in pairs]
    hypotheses = [h for _, h in pairs]
    ds = encode_pairs(run, premises, hypotheses)
    probs = torch.softmax(predict_logits(run.model, ds, batch_size, progress=progress), dim=1)
    ids = probs.argmax(dim=1).tolist()
    names = _label_names(probs.shape[1])
    return [{"label": names[i], "label_id": i, "probs": p}
            for i, p in zip(ids, probs.tolist())]


def _label_names(k: int) -> List[str]:
    return LABEL_NAMES if k == len(LABEL_NAMES) else [str(i) for i in range(k)]


# ----------------------------------------------------------------------------- evaluation
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """``m[i, j]``: examples of true class i predicted as j."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def per_class(m: np.ndarray, names: List[str]) -> Dict[str, Dict[str, float]]:
    out = {}
    for i, name in enumerate(names):
        tp = int(m[i, i])
        pred, true = int(m[:, i].sum()), int(m[i, :].sum())
        p = tp / pred if pred else 0.0
        r = tp / true if true else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[name] = {"precision": p, "recall": r, "f1": f1, "support": true}
    return out


def evaluate_run(run: Run, data: Tuple[List[str], List[str], List[int]],
                 batch_size: int = 256, progress: bool = False) -> Dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, the confusion matrix and examples/s of a
    fine-tuned run on ``(premises, hypotheses, labels)``."""
    if run.kind != "finetune":
        raise ValueError(f"{run.path} is a {run.kind} run: evaluate needs a fine-tuned one")
    premises, hypotheses, labels = data
    if not labels:
        raise ValueError("no labelled examples to evaluate")
    ds = encode_pairs(run, premises, hypotheses, labels)
    start = time.perf_counter()
    logits = predict_logits(run.model, ds, batch_size, progress=progress)
    seconds = time.perf_counter() - start
    k = logits.shape[1]
    names = _label_names(k)
    y = np.asarray(labels, dtype=np.int64)
    pred = logits.argmax(dim=1).numpy()
    m = confusion_matrix(y, pred, k)
    classes = per_class(m, names)
    return {"examples": int(len(y)), "accuracy": float((pred == y).mean()),
            "macro_f1": float(np.mean([c["f1"] for c in classes.values()])),
            "per_class": classes, "labels": names,
            "confusion_matrix": m.tolist(),
            "examples_per_sec": float(len(y) / seconds) if seconds > 0 else 0.0,
            "seconds": seconds, "device": str(run.device)}


def format_report(res: Dict[str, Any]) -> str:
    names = res["labels"]
    w = max(len(n) for n in names) + 2
    lines = [f"accuracy {res['accuracy']:.4f} on {res['examples']} examples "
             f"({res['examples_per_sec']:.1f} examples/s on {res['device']})", "",
             f"{'':{w}}precision  recall      f1  support"]
    for n in names:
        c = res["per_class"][n]
        lines.append(f"{n:{w}}{c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:7.4f} "
                     f"{c['support']:8d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              f"{'':{w}}" + "".join(f"{n:>15}" for n in names)]
    for n, row in zip(names, res["confusion_matrix"]):
        lines.append(f"{n:{w}}" + "".join(f"{v:15d}" for v in row))
    return "\n".join(lines)


def plot_confusion(res: Dict[str, Any], path: str) -> bool:
    """The confusion matrix as a PNG; False (nothing written) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    m = np.asarray(res["confusion_matrix"])
    names = res["labels"]
    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {res['accuracy']:.3f}")
    top = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


# ----------------------------------------------------------------------------- pair files
_HEADER_NAMES = {"premise": "p", "sentence1": "p", "hypothesis": "h", "sentence2": "h",
                 "sentence1_binary_parse": "pb", "sentence2_binary_parse": "hb"}


def read_pairs(lines: Iterable[str], source: str = "<stdin>",
               errors: Optional[List[str]] = None) -> Iterator[Tuple[int, str, str]]:
    """``(line_number, premise, hypothesis)`` for each pair in ``lines``: JSONL
    (``{"premise": .., "hypothesis": ..}``, also ``sentence1``/``sentence2``) or TSV (two
    columns ``premise<TAB>hypothesis``; SNLI's tokenized ``gold_label<TAB>sentence1<TAB>
    sentence2``; the official 14-column ``snli_1.0_*.txt``, read from its binary parses as
    the book does), told apart per line / by the header.  Blank lines are skipped; a line
    that cannot be parsed is appended to ``errors`` as ``"<source>:<n>: why"`` and skipped."""
    errors = errors if errors is not None else []
    cols: Optional[Dict[str, int]] = None
    first = True
    for n, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{source}:{n}: invalid JSON ({e.msg})")
                continue
            p = obj.get("premise", obj.get("sentence1"))
            h = obj.get("hypothesis", obj.get("sentence2"))
            if not isinstance(p, str) or not isinstance(h, str):
                errors.append(f"{source}:{n}: a JSON line needs string fields 'premise' and "
                              f"'hypothesis' (or 'sentence1'/'sentence2')")
                continue
            first = False
            yield n, p, h
            continue
        fields = line.split("\t")
        if first:
            first = False
            names = [_HEADER_NAMES.get(f.strip().lower()) for f in fields]
            if any(names):
                cols = {k: i for i, k in enumerate(names) if k}
                if not (("p" in cols or "pb" in cols) and ("h" in cols or "hb" in cols)):
                    errors.append(f"{source}:{n}: a header without both a premise and a "
                                  f"hypothesis column ({line[:60]!r})")
                    cols = None
                continue
        if cols is not None:
            pk = "pb" if "pb" in cols else "p"
            hk = "hb" if "hb" in cols else "h"
            need = max(cols[pk], cols[hk]) + 1
            if len(fields) < need:
                errors.append(f"{source}:{n}: expected at least {need} tab-separated columns, "
                              f"got {len(fields)}")
                continue
            yield n, _extract_text(fields[cols[pk]]), _extract_text(fields[cols[hk]])
        elif len(fields) == 2:
            yield n, fields[0], fields[1]
        elif len(fields) == 3 and fields[0] in (*LABELS, "-"):
            yield n, _extract_text(fields[1]), _extract_text(fields[2])
        else:
            errors.append(f"{source}:{n}: expected 'premise<TAB>hypothesis' (or SNLI's "
                          f"columns, or a JSON object), got {len(fields)} tab-separated "
                          f"column{'s' if len(fields) != 1 else ''}")
