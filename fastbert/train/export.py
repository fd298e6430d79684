"""Export a run (``python -m fastbert export RUN --to hf|book OUT``).

* ``hf``: a Hugging Face folder (config.json, model.safetensors, vocab.txt) that
  ``transformers.AutoModelForSequenceClassification`` loads (fine-tuned runs; see
  :func:`fastbert.hf.export_hf_classifier`), or ``AutoModel`` / ``BertForPreTraining`` for a
  pretraining run with BERT's layout.
* ``book``: the d2l book's pretrained format, ``vocab.json`` (``idx_to_token``) +
  ``pretrained.params`` (a ``torch.save``'d ``d2l.BERTModel`` state_dict), which the fine-tuning
  chapter's ``load_pretrained_model`` and ``python -m fastbert finetune --pretrained OUT`` read.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import torch

from ..data.vocab import Vocab
from .use import LABEL_NAMES, Run, bert_options, build_bert

__all__ = ["export_run", "export_hf", "export_book"]

_BOOK_TOKENIZER_NOTE = """# {name}

A fastbert {kind} run exported for Hugging Face `transformers` from `{run}`.

## The tokenizer is the d2l book's, not WordPiece

This model was trained from scratch with the book's vocabulary: text is **lowercased and
split on whitespace** (punctuation as separate, space-separated tokens, as in SNLI's
tokenized text), each token looked up in `vocab.txt` (one token per line, line number = id;
unknown tokens are `<unk>` = 0). `vocab.txt` is *not* a WordPiece vocabulary: do not load
it with `BertTokenizer` / `AutoTokenizer`. Build the inputs as the book does:
`<cls> premise <sep> hypothesis <sep>` (segment 0 up to and including the first `<sep>`,
1 after it), at most {max_len} tokens, padding `<pad>` (id {pad}) masked out.

## The model is the book's BERT

The book's encoder has no LayerNorm after the embedding sum (BERT has one). The folder
carries `modeling_fastbert_book.py`, which removes it, so load with

```python
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(PATH, trust_remote_code=True)
logits = model(input_ids=ids, token_type_ids=segments, attention_mask=mask).logits
```

Labels: {labels}.
"""


def _id2label(run: Run) -> Dict[int, str]:
    k = run.model.output.out_features
    names = LABEL_NAMES if k == len(LABEL_NAMES) else [f"LABEL_{i}" for i in range(k)]
    return dict(enumerate(names))


def export_hf(run: Run, out: str) -> str:
    """Write ``run`` as a Hugging Face folder at ``out``; returns ``out``."""
    from .. import hf
    if run.kind == "finetune":
        wordpiece = run.uses_wordpiece
        pad = 0 if wordpiece else run.vocab.token_to_idx.get("<pad>", 0)
        config = hf.export_hf_classifier(
            run.model, out, tokenizer=run.vocab if wordpiece else None,
            vocab_tokens=None if wordpiece else run.vocab.idx_to_token,
            id2label=_id2label(run), pad_token_id=pad)
        if not wordpiece:
            with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
                f.write(_BOOK_TOKENIZER_NOTE.format(
                    name=os.path.basename(os.path.abspath(out)), kind=run.kind, run=run.path,
                    max_len=run.max_len, pad=pad,
                    labels=", ".join(f"{i} = {n}" for i, n in _id2label(run).items())))
        return out
    # A pretraining run with BERT's layout: the whole BERTModel (encoder, pooler, MLM and NSP
    # heads, BertForPreTraining).  The book's (no embedding LayerNorm): encoder + pooler as
    # the modeling file's BertModel (AutoModel, trust_remote_code=True).
    if run.model.encoder.embedding_norm is not None:
        hf.export_hf_bert(run.model, out, tokenizer=run.vocab if run.uses_wordpiece else None)
        if not run.uses_wordpiece:
            with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
                f.write("".join(t + "\n" for t in run.vocab.idx_to_token))
        return out
    pad = run.vocab.token_to_idx.get("<pad>", 0)
    hf.export_hf_classifier(run.model, out, vocab_tokens=run.vocab.idx_to_token,
                            pad_token_id=pad)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(_BOOK_TOKENIZER_NOTE.format(
            name=os.path.basename(os.path.abspath(out)), kind=run.kind, run=run.path,
            max_len=run.max_len, pad=pad, labels="none (the encoder and pooler only; the "
            "MLM and NSP heads are not exported)").replace(
                "AutoModelForSequenceClassification", "AutoModel").replace(
                "logits = model(input_ids=ids, token_type_ids=segments, attention_mask=mask)"
                ".logits", "out = model(input_ids=ids, token_type_ids=segments, "
                "attention_mask=mask)  # last_hidden_state, pooler_output"))
    return out


def export_book(run: Run, out: str) -> str:
    """Write the run's encoder in the d2l book's pretrained format (``vocab.json`` +
    ``pretrained.params``, a full ``d2l.BERTModel`` state_dict that the book's
    ``load_pretrained_model`` loads with ``strict`` matching).  A fine-tuned run has no MLM
    / NSP heads: they are written freshly initialized (seed 0), which fine-tuning never
    reads; README.md in ``out`` says so."""
    if run.uses_wordpiece:
        raise ValueError(f"{run.path} uses a WordPiece tokenizer: the book's format holds a "
                         f"book vocabulary (vocab.json); export it with --to hf instead")
    opts = bert_options(run.model)
    if run.kind == "pretrain":
        bert = run.model
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            bert = build_bert(opts)
        missing, unexpected = bert.load_state_dict(run.model.state_dict(), strict=False)
        if unexpected != ["output.weight", "output.bias"] or any(
                not k.startswith(("mlm.", "nsp.")) for k in missing):
            raise ValueError(f"{run.path}: the classifier does not map onto a BERTModel "
                             f"(missing {missing}, unexpected {unexpected})")
    if (opts.get("embedding_layer_norm") or opts.get("ffn_activation") != "relu"
            or opts.get("layer_norm_eps") != 1e-5):
        raise ValueError(f"{run.path} is not the book's architecture (embedding LayerNorm "
                         f"{opts.get('embedding_layer_norm')}, activation "
                         f"{opts.get('ffn_activation')}, eps {opts.get('layer_norm_eps')}): "
                         f"d2l.BERTModel cannot load it; export it with --to hf")
    os.makedirs(out, exist_ok=True)
    Vocab.from_idx_to_token(run.vocab.idx_to_token).save_json(os.path.join(out, "vocab.json"))
    state = {k: v.detach().cpu().clone() for k, v in bert.state_dict().items()}
    torch.save(state, os.path.join(out, "pretrained.params"))
    sizes = dict(num_hiddens=opts["num_hiddens"], ffn_num_hiddens=opts["ffn_num_hiddens"],
                 num_heads=opts["num_heads"], num_layers=opts["num_layers"],
                 max_len=opts["max_len"])
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(f"# {os.path.basename(os.path.abspath(out))}\n\nThe encoder of the fastbert "
                f"{run.kind} run `{run.path}` in the d2l book's pretrained format: "
                f"`vocab.json` (idx_to_token) and `pretrained.params` (a `d2l.BERTModel` "
                f"state_dict). Load it with the fine-tuning chapter's `load_pretrained_model`"
                f" and these sizes (the book hard-codes bert.small's 256/4/2; pass these "
                f"instead): `{json.dumps(sizes)}`, vocabulary of {len(run.vocab)} tokens, "
                f"or with `python -m fastbert finetune --pretrained {out}`.\n"
                + ("\nA fine-tuned run has no MLM/NSP heads: `mlm.*` and `nsp.*` in "
                   "pretrained.params are freshly initialized (seed 0); fine-tuning never "
                   "reads them.\n" if run.kind == "finetune" else ""))
    with open(os.path.join(out, "sizes.json"), "w", encoding="utf-8") as f:
        json.dump(sizes, f, indent=1)
    return out


def export_run(run: Run, to: str, out: str) -> str:
    if to == "hf":
        return export_hf(run, out)
    if to == "book":
        return export_book(run, out)
    raise ValueError(f"--to must be hf or book, got {to!r}")
