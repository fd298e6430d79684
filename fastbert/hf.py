"""Hugging Face BERT checkpoints in fastbert: import (and export) every tensor.

Interface (stable; the CLI calls the first two)::

    from fastbert import hf
    hf.is_hf_checkpoint(path) -> bool          # a folder with config.json (model_type bert)
                                               # + model.safetensors or pytorch_model.bin
    model, tokenizer = hf.load_hf_bert(path, **overrides)
        # model:     fastbert.BERTModel (eval mode) with BERT's options: ffn_activation,
        #            layer_norm_eps, embedding_layer_norm=True, train_pos_embedding=True
        # tokenizer: fastbert.data.wordpiece.WordPieceTokenizer, from the folder's vocab.txt
        tokens, segments, valid_lens = tokenizer.encode_pairs(premises, hypotheses,
                                                              max_len=128)
        #            int64 [B, L], [B, L], [B]; [CLS] a [SEP] b [SEP], longest-first
        #            truncation, L = longest pair (pad_to_max_len=True: L = max_len)
        encoded, mlm_logits, nsp_logits = model(tokens, segments, valid_lens)
        classifier = fastbert.BERTClassifier(model, num_classes=3)   # fine-tuning
    hf.export_hf_bert(model, path, tokenizer=None)   # the reverse: a folder HF can load

``overrides`` are ``BERTModel`` keyword options: ``dropout`` (default: the config's
``hidden_dropout_prob``), ``max_len`` (at most ``max_position_embeddings``: the positional
table is cut) and ``unpadded``.

Mapping (HF ``BertModel`` / ``BertForPreTraining`` names, with or without ``bert.``):

===============================================  ========================================
``embeddings.word_embeddings``                   ``encoder.token_embedding``
``embeddings.position_embeddings`` [P, C]        ``encoder.pos_embedding`` [1, P, C]
``embeddings.token_type_embeddings`` [2, C]      ``encoder.segment_embedding``
``embeddings.LayerNorm``                         ``encoder.embedding_norm``
``encoder.layer.i.attention.self.query/key/value``  ``encoder.blks.i.attention.W_q/W_k/W_v``
``encoder.layer.i.attention.output.dense``       ``encoder.blks.i.attention.W_o``
``encoder.layer.i.attention.output.LayerNorm``   ``encoder.blks.i.addnorm1.ln``
``encoder.layer.i.intermediate.dense``           ``encoder.blks.i.ffn.dense1``
``encoder.layer.i.output.dense``                 ``encoder.blks.i.ffn.dense2``
``encoder.layer.i.output.LayerNorm``             ``encoder.blks.i.addnorm2.ln``
``pooler.dense``                                 ``hidden.0``
``cls.predictions.transform.dense``              ``mlm.mlp.0``
``cls.predictions.transform.LayerNorm``          ``mlm.mlp.2``
``cls.predictions.decoder`` (+ ``.bias``)        ``mlm.mlp.3`` (the weight: tied to the
                                                 word embeddings when the file omits it)
``cls.seq_relationship``                         ``nsp.output``
===============================================  ========================================

The math is the same: HF's ``BertLayer`` is post-LN, ``LN(dense(attn) + x)`` then
``LN(dense2(act(dense1(h))) + h)``, which is d2l's ``AddNorm(X, Y) = LN(dropout(Y) + X)``
order; both scale scores by ``1/sqrt(head_size)``; the embedding is
``dropout(LN(word + position + token_type))``.  HF's MLM transform uses ``hidden_act``
(d2l's uses ReLU) and the config's LayerNorm eps: an imported model's ``mlm.mlp`` gets
those, so imported heads compute what HF computes.  A checkpoint without heads (e.g.
sentence-transformers' MiniLM), or without a pooler (``BertForMaskedLM``), leaves those
parts freshly initialized (a warning says so).  Anything that cannot be mapped is refused
with an error naming the tensors or config fields: unknown or unused tensors, wrong shapes, ``hidden_act`` other
than ``gelu``/``relu``, relative position embeddings, decoder/cross-attention models,
``type_vocab_size`` other than 2.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .bert import BERTModel
from .data.wordpiece import WordPieceTokenizer

__all__ = ["is_hf_checkpoint", "load_hf_bert", "load_hf_config", "hf_to_fastbert_state_dict",
           "export_hf_bert", "export_hf_classifier", "HFCheckpointError"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}  # HF "gelu" is the exact (erf) GELU, as ours


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint fastbert cannot represent exactly."""


# ----------------------------------------------------------------------------- discovery
def _weights_file(path: str) -> Optional[str]:
    for name in WEIGHT_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return f
    return None


def is_hf_checkpoint(path) -> bool:
    """True for a folder holding a Hugging Face BERT checkpoint: ``config.json`` with
    ``model_type`` ``bert`` and ``model.safetensors`` or ``pytorch_model.bin``."""
    try:
        path = os.fspath(path)
    except TypeError:
        return False
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(cfg) and _weights_file(path)):
        return False
    try:
        with open(cfg, "r", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "bert"


def load_hf_config(path: str) -> dict:
    """``config.json``, checked: every field fastbert needs, and nothing it cannot run."""
    with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as f:
        config = json.load(f)
    problems = []
    if config.get("model_type") != "bert":
        problems.append(f"model_type is {config.get('model_type')!r}, not 'bert'")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            problems.append(f"{key} must be a positive int, got {config.get(key)!r}")
    act = config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        problems.append(f"hidden_act {act!r} is not supported (fastbert runs 'gelu' (exact "
                        f"erf) or 'relu')")
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
        problems.append(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
    if config.get("type_vocab_size", 2) != 2:
        problems.append(f"type_vocab_size is {config.get('type_vocab_size')}, fastbert's "
                        f"segment embedding has exactly 2 rows")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        problems.append("decoder / cross-attention BERT (is_decoder, add_cross_attention) is "
                        "not supported: fastbert's encoder is bidirectional")
    if not problems and config["hidden_size"] % config["num_attention_heads"]:
        problems.append(f"hidden_size {config['hidden_size']} is not divisible by "
                        f"num_attention_heads {config['num_attention_heads']}")
    if problems:
        raise HFCheckpointError(f"{path}/config.json: " + "; ".join(problems))
    return config


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    f = _weights_file(path)
    if f is None:
        raise FileNotFoundError(f"{path}: no {' or '.join(WEIGHT_FILES)}")
    if f.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{f} needs the 'safetensors' package: pip install safetensors "
                              f"(or fastbert[hf])") from None
        return load_file(f)
    state = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise HFCheckpointError(f"{f} does not hold a state_dict")
    return state


# ----------------------------------------------------------------------------- mapping
_LAYER = {
    "attention.self.query": "attention.W_q",
    "attention.self.key": "attention.W_k",
    "attention.self.value": "attention.W_v",
    "attention.output.dense": "attention.W_o",
    "attention.output.LayerNorm": "addnorm1.ln",
    "intermediate.dense": "ffn.dense1",
    "output.dense": "ffn.dense2",
    "output.LayerNorm": "addnorm2.ln",
}
_FIXED = {
    "embeddings.word_embeddings": "encoder.token_embedding",
    "embeddings.token_type_embeddings": "encoder.segment_embedding",
    "embeddings.LayerNorm": "encoder.embedding_norm",
    "pooler.dense": "hidden.0",
    "cls.predictions.transform.dense": "mlm.mlp.0",
    "cls.predictions.transform.LayerNorm": "mlm.mlp.2",
    "cls.predictions.decoder": "mlm.mlp.3",
    "cls.seq_relationship": "nsp.output",
}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# Buffers HF writes into some checkpoints; they carry no weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Parts a checkpoint may lack (BertModel has no heads, BertForMaskedLM no pooler): they stay
# freshly initialized, with a warning.  Everything else must be present.
OPTIONAL_PARTS = {"hidden": "pooler (hidden)", "mlm": "MLM head (mlm)", "nsp": "NSP head (nsp)"}


def _canonical(key: str) -> str:
    """Strip ``bert.`` and rename TF-era ``LayerNorm.gamma/beta`` to ``weight/bias``."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if ".LayerNorm." in key or key.startswith("LayerNorm."):
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
    return key


def _target(key: str) -> Optional[str]:
    """The fastbert name of a canonical HF key, or None when there is none."""
    if key == "embeddings.position_embeddings.weight":
        return "encoder.pos_embedding"
    if key == "cls.predictions.bias":
        return "mlm.mlp.3.bias"
    stem, _, leaf = key.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if stem in _FIXED:
        return f"{_FIXED[stem]}.{leaf}"
    m = _LAYER_RE.fullmatch(stem)
    if m and m.group(2) in _LAYER:
        return f"encoder.blks.{m.group(1)}.{_LAYER[m.group(2)]}.{leaf}"
    return None


def hf_to_fastbert_state_dict(hf_state: Dict[str, torch.Tensor], model: BERTModel,
                              ignore_unused: bool = False) -> Tuple[Dict[str, torch.Tensor],
                                                                    list]:
    """Map an HF BERT state_dict onto ``model``'s names.  Returns ``(state, missing)``:
    ``missing`` lists the optional parameters (pooler ``hidden.``, heads ``mlm.``/``nsp.``)
    the checkpoint does
    not provide.  Raises :class:`HFCheckpointError` naming every unknown or unused tensor
    (unless ``ignore_unused``), every shape mismatch and every missing encoder/pooler
    tensor."""
    expected = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    unknown, bad_shape, conflicts = [], [], []
    max_len = model.encoder.pos_embedding.shape[1]
    for key, value in hf_state.items():
        canon = _canonical(key)
        if canon in _BUFFERS:
            if canon == "embeddings.position_ids" and not torch.equal(
                    value.reshape(-1), torch.arange(value.numel(), dtype=value.dtype)):
                raise HFCheckpointError(f"{key} is not 0, 1, 2, ...: custom position ids "
                                        f"cannot be represented")
            continue
        target = _target(canon)
        if target is None or target not in expected:
            unknown.append(key)
            continue
        if target == "encoder.pos_embedding":
            if value.dim() != 2 or value.shape[0] < max_len:
                bad_shape.append(f"{key} {tuple(value.shape)} (need [>= {max_len}, C])")
                continue
            value = value[:max_len].unsqueeze(0)
        if tuple(value.shape) != tuple(expected[target].shape):
            bad_shape.append(f"{key} {tuple(value.shape)} -> {target} "
                             f"{tuple(expected[target].shape)}")
            continue
        if target in out and not torch.equal(out[target], value):
            conflicts.append(f"{key} differs from the other source of {target}")
            continue
        out[target] = value
    # HF ties the MLM decoder to the word embeddings and often omits it from the file.
    if "mlm.mlp.0.weight" in out and "mlm.mlp.3.weight" not in out:
        out["mlm.mlp.3.weight"] = out["encoder.token_embedding.weight"]
    problems = []
    if unknown and not ignore_unused:
        problems.append(f"tensors with no fastbert counterpart: {sorted(unknown)}")
    if bad_shape:
        problems.append(f"shape mismatches: {bad_shape}")
    if conflicts:
        problems.append("; ".join(conflicts))
    missing = [k for k in expected if k not in out]
    for part in OPTIONAL_PARTS:
        have = [k for k in expected if k.startswith(part + ".") and k in out]
        lack = [k for k in missing if k.startswith(part + ".")]
        if have and lack:  # half a layer would compute garbage
            problems.append(f"the {OPTIONAL_PARTS[part]} is incomplete: no tensors for {lack}")
    missing_core = [k for k in missing if k.split(".")[0] not in OPTIONAL_PARTS]
    if missing_core:
        problems.append(f"the checkpoint lacks tensors for {missing_core}")
    if problems:
        raise HFCheckpointError("cannot map this checkpoint onto fastbert.BERTModel: "
                                + "; ".join(problems))
    if unknown:
        warnings.warn(f"fastbert: ignored checkpoint tensors {sorted(unknown)}", stacklevel=3)
    return out, missing


def _model_options(config: dict, overrides: dict) -> dict:
    allowed = {"dropout", "max_len", "unpadded"}
    extra = set(overrides) - allowed
    if extra:
        raise TypeError(f"load_hf_bert got unsupported overrides {sorted(extra)}; allowed: "
                        f"{sorted(allowed)} (the rest comes from config.json)")
    C, P = config["hidden_size"], config["max_position_embeddings"]
    max_len = overrides.get("max_len", P)
    if not isinstance(max_len, int) or not 0 < max_len <= P:
        raise ValueError(f"max_len must be an int in [1, {P}] (max_position_embeddings), "
                         f"got {max_len!r}")
    hidden_p = config.get("hidden_dropout_prob", 0.1)
    attn_p = config.get("attention_probs_dropout_prob", hidden_p)
    dropout = overrides.get("dropout")
    if dropout is None:
        dropout = hidden_p
        if attn_p != hidden_p:
            warnings.warn(f"fastbert: one dropout rate serves attention and hidden layers; "
                          f"using hidden_dropout_prob={hidden_p} (the config's attention rate "
                          f"is {attn_p}); pass dropout=... to choose", stacklevel=3)
    return dict(vocab_size=config["vocab_size"], num_hiddens=C, norm_shape=[C],
                ffn_num_input=C, ffn_num_hiddens=config["intermediate_size"],
                num_heads=config["num_attention_heads"], num_layers=config["num_hidden_layers"],
                dropout=dropout, max_len=max_len, key_size=C, query_size=C, value_size=C,
                hid_in_features=C, mlm_in_features=C, nsp_in_features=C,
                ffn_activation=ACTIVATIONS[config.get("hidden_act", "gelu")],
                layer_norm_eps=config.get("layer_norm_eps", 1e-12), embedding_layer_norm=True,
                train_pos_embedding=True, unpadded=overrides.get("unpadded"))


def _bert_mlm_head(model: BERTModel, activation: str, eps: float) -> None:
    # HF's MLM transform: dense -> hidden_act -> LayerNorm(eps); d2l's uses ReLU and 1e-5.
    model.mlm.mlp[1] = nn.GELU() if activation == "gelu" else nn.ReLU()
    model.mlm.mlp[2].eps = eps


def load_hf_bert(path, ignore_unused: bool = False, **overrides):
    """Load a Hugging Face BERT folder into ``(fastbert.BERTModel, WordPieceTokenizer)``.

    The model is in eval mode, float32, on the CPU.  ``overrides``: ``dropout``, ``max_len``,
    ``unpadded`` (see the module docstring).  ``ignore_unused=True`` drops tensors fastbert
    has no place for (e.g. a ``classifier.*`` head) with a warning instead of refusing."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    config = load_hf_config(path)
    tokenizer = WordPieceTokenizer.from_pretrained(path)
    if len(tokenizer) > config["vocab_size"]:
        raise HFCheckpointError(f"{path}: vocab.txt has {len(tokenizer)} tokens but the model "
                                f"has vocab_size {config['vocab_size']}")
    model = BERTModel(**_model_options(config, overrides))
    _bert_mlm_head(model, config.get("hidden_act", "gelu"), config.get("layer_norm_eps", 1e-12))
    state, missing = hf_to_fastbert_state_dict(_read_weights(path), model, ignore_unused)
    if missing:
        parts = [OPTIONAL_PARTS[p] for p in OPTIONAL_PARTS if any(
            k.startswith(p + ".") for k in missing)]
        warnings.warn(f"fastbert: {path} has no weights for the {', '.join(parts)}: "
                      f"{'it stays' if len(parts) == 1 else 'they stay'} freshly initialized ("
                      f"fine for fine-tuning, which trains the pooler and ignores the "
                      f"heads)", stacklevel=2)
    model.load_state_dict(state, strict=False)  # strict on all but the absent optional parts
    return model.float().eval(), tokenizer


# ----------------------------------------------------------------------------- export
def export_hf_bert(model: BERTModel, path, tokenizer: Optional[WordPieceTokenizer] = None,
                   heads: Optional[bool] = None) -> None:
    """Write ``model`` as a Hugging Face BERT folder (config.json, model.safetensors, and
    vocab.txt when ``tokenizer`` is given).  Needs BERT's layout: ``embedding_layer_norm``,
    biases, one LayerNorm eps, gelu or relu.  ``heads`` (default: when the MLM head uses
    the encoder's activation and eps, as HF requires) adds ``cls.*`` and writes the
    ``BertForPreTraining`` layout with the ``bert.`` prefix."""
    from safetensors.torch import save_file

    enc = model.encoder
    if getattr(enc, "embedding_norm", None) is None:
        raise HFCheckpointError("HF BERT normalizes the embeddings: export needs a model built "
                                "with embedding_layer_norm=True (the d2l book's has none)")
    blk0 = enc.blks[0]
    if blk0.attention.W_q.bias is None:
        raise HFCheckpointError("HF BERT has attention biases; this model has none")
    act = blk0.ffn.activation
    eps = blk0.addnorm1.ln.eps
    eps_all = {enc.embedding_norm.eps} | {b.addnorm1.ln.eps for b in enc.blks} | {
        b.addnorm2.ln.eps for b in enc.blks}
    if len(eps_all) != 1:
        raise HFCheckpointError(f"HF BERT has one layer_norm_eps; this model uses {eps_all}")
    if {b.ffn.activation for b in enc.blks} != {act}:
        raise HFCheckpointError("HF BERT has one hidden_act; this model's blocks differ")
    mlm_act = {nn.GELU: "gelu", nn.ReLU: "relu"}.get(type(model.mlm.mlp[1]))
    heads_match = mlm_act == act and model.mlm.mlp[2].eps == eps
    if heads is None:
        heads = heads_match
        if not heads:
            warnings.warn(f"fastbert: the MLM head uses {mlm_act} / eps {model.mlm.mlp[2].eps}"
                          f" but HF applies hidden_act={act} / eps {eps}: exporting the "
                          f"encoder and pooler only", stacklevel=2)
    elif heads and not heads_match:
        raise HFCheckpointError(f"the MLM head uses {mlm_act} / eps {model.mlm.mlp[2].eps}; "
                                f"HF would apply hidden_act={act} / eps {eps}")
    C = enc.token_embedding.embedding_dim
    reverse = {}
    for hf_stem, ours in _FIXED.items():
        for leaf in ("weight", "bias"):
            reverse[f"{ours}.{leaf}"] = f"{hf_stem}.{leaf}"
    for i in range(len(enc.blks)):
        for hf_stem, ours in _LAYER.items():
            for leaf in ("weight", "bias"):
                reverse[f"encoder.blks.{i}.{ours}.{leaf}"] = f"encoder.layer.{i}.{hf_stem}.{leaf}"
    reverse["mlm.mlp.3.bias"] = "cls.predictions.bias"
    out = {}
    for name, value in model.state_dict().items():
        if name == "encoder.pos_embedding":
            out["embeddings.position_embeddings.weight"] = value[0]
            continue
        if name.startswith(("mlm.", "nsp.")) and not heads:
            continue
        if name not in reverse:
            raise HFCheckpointError(f"no HF name for {name}")
        out[reverse[name]] = value
    if heads:
        # HF ties cls.predictions.decoder.bias to cls.predictions.bias; write both names,
        # as HF does, so every transformers version finds the one it looks for.
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
        out = {(k if k.startswith("cls.") else "bert." + k): v for k, v in out.items()}
    out = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}
    num_heads = blk0.attention.num_heads
    config = {
        "architectures": ["BertForPreTraining" if heads else "BertModel"],
        "model_type": "bert", "vocab_size": enc.vocab_size, "hidden_size": C,
        "num_hidden_layers": len(enc.blks), "num_attention_heads": num_heads,
        "intermediate_size": blk0.ffn.dense1.out_features, "hidden_act": act,
        "hidden_dropout_prob": blk0.addnorm1.dropout.p,
        "attention_probs_dropout_prob": blk0.attention.attention.dropout.p,
        "max_position_embeddings": enc.pos_embedding.shape[1], "type_vocab_size": 2,
        "layer_norm_eps": eps, "position_embedding_type": "absolute", "pad_token_id": 0,
        "tie_word_embeddings": False,  # fastbert's MLM decoder is its own matrix
    }
    if tokenizer is not None:
        config["pad_token_id"] = tokenizer.pad_id
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in tokenizer.idx_to_token))
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"do_lower_case": tokenizer.lowercase, "tokenizer_class": "BertTokenizer"},
                      f, indent=2)


# ------------------------------------------------------------------ export: the classifier
# A d2l-book model (no LayerNorm after the embedding sum) is not a stock BertModel: the
# exported folder carries this module and names it in config.json's auto_map, so
# ``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` builds
# BERT with that LayerNorm removed.  Its own model_type makes a load without
# trust_remote_code fail instead of silently running a LayerNorm the model never had.
BOOK_MODEL_TYPE = "fastbert_book_bert"
BOOK_MODELING_FILE = "modeling_fastbert_book.py"
_BOOK_MODELING_SOURCE = '''"""The d2l book's BERT for Hugging Face transformers (written by fastbert's export).

The book's encoder is BERT without the LayerNorm after the embedding sum; everything else
(post-LN blocks, biases, learned positions, segment embeddings, the tanh pooler on the
first token) is BERT's.  Load with trust_remote_code=True."""
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel


class FastbertBookBertConfig(BertConfig):
    model_type = "fastbert_book_bert"


def _drop_embedding_norm(bert):
    bert.embeddings.LayerNorm = nn.Identity()


class FastbertBookBertModel(BertModel):
    config_class = FastbertBookBertConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _drop_embedding_norm(self)


class FastbertBookBertForSequenceClassification(BertForSequenceClassification):
    config_class = FastbertBookBertConfig

    def __init__(self, config):
        super().__init__(config)
        _drop_embedding_norm(self.bert)
'''


def _encoder_state_to_hf(model_state: Dict[str, torch.Tensor], num_layers: int,
                         prefix: str = "bert.") -> Dict[str, torch.Tensor]:
    """fastbert encoder + ``hidden`` (pooler) tensors under HF ``BertModel`` names."""
    reverse = {}
    for hf_stem, ours in _FIXED.items():
        if ours.startswith(("mlm.", "nsp.")):
            continue
        for leaf in ("weight", "bias"):
            reverse[f"{ours}.{leaf}"] = f"{hf_stem}.{leaf}"
    for i in range(num_layers):
        for hf_stem, ours in _LAYER.items():
            for leaf in ("weight", "bias"):
                reverse[f"encoder.blks.{i}.{ours}.{leaf}"] = f"encoder.layer.{i}.{hf_stem}.{leaf}"
    out = {}
    for name, value in model_state.items():
        if name == "encoder.pos_embedding":
            out[prefix + "embeddings.position_embeddings.weight"] = value[0]
        elif name in reverse:
            out[prefix + reverse[name]] = value
    return out


def export_hf_classifier(classifier, path, tokenizer: Optional[WordPieceTokenizer] = None,
                         vocab_tokens=None, id2label: Optional[Dict[int, str]] = None,
                         pad_token_id: int = 0) -> Dict[str, object]:
    """Write a fine-tuned ``fastbert.BERTClassifier`` (encoder, ``hidden`` = Linear + Tanh,
    ``output`` Linear) as a Hugging Face ``BertForSequenceClassification`` folder:
    ``bert.*`` (the pooler is ``hidden``), ``classifier`` (``output``), config.json,
    model.safetensors, and ``vocab.txt`` (the tokenizer's, or ``vocab_tokens`` in id order).

    A model with BERT's embedding LayerNorm loads with plain
    ``AutoModelForSequenceClassification.from_pretrained(path)``; the d2l book's (without
    it) gets ``model_type`` ``fastbert_book_bert`` and a modeling file, and loads with
    ``trust_remote_code=True``.  Given a ``BERTModel`` (no ``output`` layer), the encoder and
    pooler are written as a ``BertModel`` (``AutoModel``), the MLM/NSP heads left out.
    Returns the config written."""
    from safetensors.torch import save_file

    enc = classifier.encoder
    blks = list(enc.blks)
    blk0 = blks[0]
    if blk0.attention.W_q.bias is None:
        raise HFCheckpointError("HF BERT has attention biases; this model has none")
    eps_all = {b.addnorm1.ln.eps for b in blks} | {b.addnorm2.ln.eps for b in blks}
    book = getattr(enc, "embedding_norm", None) is None
    if not book:
        eps_all.add(enc.embedding_norm.eps)
    if len(eps_all) != 1:
        raise HFCheckpointError(f"HF BERT has one layer_norm_eps; this model uses {eps_all}")
    acts = {b.ffn.activation for b in blks}
    if len(acts) != 1:
        raise HFCheckpointError("HF BERT has one hidden_act; this model's blocks differ")
    act, eps = acts.pop(), eps_all.pop()
    if not isinstance(classifier.hidden[1], nn.Tanh):
        raise HFCheckpointError("HF's pooler is Linear + Tanh; this classifier's hidden "
                                "layer differs")
    state = classifier.state_dict()
    head = getattr(classifier, "output", None)
    out = _encoder_state_to_hf(state, len(blks), prefix="bert." if head is not None else "")
    if head is not None:
        out["classifier.weight"] = state["output.weight"]
        out["classifier.bias"] = state["output.bias"]
    out = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}
    C = enc.token_embedding.embedding_dim
    if head is not None:
        arch = ("FastbertBookBertForSequenceClassification" if book
                else "BertForSequenceClassification")
    else:
        arch = "FastbertBookBertModel" if book else "BertModel"
    k = head.out_features if head is not None else 2
    id2label = id2label or {i: f"LABEL_{i}" for i in range(k)}
    config = {
        "architectures": [arch],
        "model_type": BOOK_MODEL_TYPE if book else "bert",
        "vocab_size": enc.token_embedding.num_embeddings, "hidden_size": C,
        "num_hidden_layers": len(blks), "num_attention_heads": blk0.attention.num_heads,
        "intermediate_size": blk0.ffn.dense1.out_features, "hidden_act": act,
        "hidden_dropout_prob": blk0.addnorm1.dropout.p,
        "attention_probs_dropout_prob": blk0.attention.attention.dropout.p,
        "classifier_dropout": None,
        "max_position_embeddings": enc.pos_embedding.shape[1], "type_vocab_size": 2,
        "layer_norm_eps": eps, "position_embedding_type": "absolute",
        "pad_token_id": tokenizer.pad_id if tokenizer is not None else pad_token_id,
        "id2label": {str(i): n for i, n in id2label.items()},
        "label2id": {n: i for i, n in id2label.items()},
        "problem_type": "single_label_classification",
        "tie_word_embeddings": False,
    }
    if book:
        mod = os.path.splitext(BOOK_MODELING_FILE)[0]
        config["auto_map"] = {
            "AutoConfig": f"{mod}.FastbertBookBertConfig",
            "AutoModel": f"{mod}.FastbertBookBertModel",
            "AutoModelForSequenceClassification":
                f"{mod}.FastbertBookBertForSequenceClassification"}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if book:
        with open(os.path.join(path, BOOK_MODELING_FILE), "w", encoding="utf-8") as f:
            f.write(_BOOK_MODELING_SOURCE)
    tokens = tokenizer.idx_to_token if tokenizer is not None else vocab_tokens
    if tokens is not None:
        if any("\n" in t or "\r" in t for t in tokens):
            raise HFCheckpointError("a vocabulary token holds a line break: vocab.txt would "
                                    "shift every id after it")
        with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in tokens))
    if tokenizer is not None:
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"do_lower_case": tokenizer.lowercase, "tokenizer_class": "BertTokenizer"},
                      f, indent=2)
    return config
