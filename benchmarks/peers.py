"""The peers a user would pick instead of fastbert, each set up the way its users run it.

One job: build the non-fastbert models of the end-to-end and latency benchmarks and say why
one cannot run here (every builder raises ``PeerUnavailable`` with the reason, which the
bench turns into a skip).

* ``build_hf``: transformers ``BertForSequenceClassification`` with the book's dims, the
  book's dropout and ReLU, SDPA attention (transformers' default on torch >= 2.1).
* ``NestedTensorBert``: PyTorch's own inference fast path, ``nn.TransformerEncoder(...,
  enable_nested_tensor=True)`` run in eval + no_grad with a ``src_key_padding_mask`` (it
  packs the padded batch into a nested tensor and calls the fused
  ``_transformer_encoder_layer_fwd``), with the HF model's weights loaded into it, plus HF's
  embeddings, pooler and classifier, so it computes the same function as the HF model
  (``check_same_logits``).
* ``OrtBert``: ONNX Runtime on the CPU: the HF model exported with dynamic batch and
  sequence axes, then ``onnxruntime.transformers.optimizer.optimize_model(model_type='bert')``
  (fused EmbedLayerNormalization, Attention, SkipLayerNormalization), as ORT's BERT guide
  does.  The export is taken from the eager-attention twin of the HF model (same weights):
  ORT's fusion recognizes the MatMul-Softmax-MatMul pattern, not SDPA's single op (an SDPA
  export keeps unfused attention).  The files are cached under a temp dir per shape.
* ``length_grouped_indices``: ``Trainer(group_by_length=True)``'s LengthGroupedSampler order.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from typing import List, Optional, Sequence

import torch
from torch import nn

import harness

PAD = 1  # the book's '<pad>' id (also the HF config's pad_token_id here)
ORT_BF16_REASON = ("ONNX Runtime's CPU execution provider runs this model in fp32: its fused "
                   "BERT kernels (Attention, SkipLayerNormalization, EmbedLayerNormalization) "
                   "are registered for float only on CPU, so there is no bf16 row")
NESTED_BF16_REASON = ("PyTorch's nested-tensor fast path turns itself off under autocast "
                      "('autocast is enabled' in nn.TransformerEncoder's fast-path checks), so a "
                      "bf16-autocast row would time the slow path, not the fast one")


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says why (it becomes the skip reason)."""


# ----------------------------------------------------------------------------- HF
def hf_config(dims: harness.BertDims, attn: str = "sdpa"):
    try:
        from transformers import BertConfig
    except ImportError as exc:
        raise PeerUnavailable(f"transformers (optional benchmark peer) is not installed: "
                              f"{exc}") from exc
    cfg = BertConfig(vocab_size=harness.VOCAB_SIZE, hidden_size=dims.num_hiddens,
                     num_hidden_layers=dims.num_layers, num_attention_heads=dims.num_heads,
                     intermediate_size=dims.ffn_num_hiddens, hidden_act="relu",
                     hidden_dropout_prob=harness.DROPOUT,
                     attention_probs_dropout_prob=harness.DROPOUT,
                     max_position_embeddings=harness.MODEL_MAX_LEN, type_vocab_size=2,
                     num_labels=harness.NUM_CLASSES, pad_token_id=PAD)
    cfg._attn_implementation = attn
    return cfg


def build_hf(dims: harness.BertDims, dev: torch.device, attn: str = "sdpa"):
    """``BertForSequenceClassification`` with the book's dims (seeded weights: torch's RNG)."""
    from transformers import BertForSequenceClassification
    net = BertForSequenceClassification(hf_config(dims, attn)).to(dev)
    assert net.config._attn_implementation == attn, net.config._attn_implementation
    return net


def hf_forward(m, inputs):
    """The HF call a user writes: the collator's attention_mask from the valid lengths."""
    tokens, segments, lens = inputs
    mask = (torch.arange(tokens.shape[1], device=tokens.device)[None, :]
            < lens[:, None]).long()
    return m(input_ids=tokens, token_type_ids=segments, attention_mask=mask).logits


# ----------------------------------------------------------------------------- nested tensors
class NestedTensorBert(nn.Module):
    """HF's BERT classifier with its encoder run by ``nn.TransformerEncoder`` (post-LN, ReLU,
    batch_first, eps 1e-12): inference only, through PyTorch's nested-tensor fast path."""

    def __init__(self, hf_net):
        super().__init__()
        cfg = hf_net.config
        self.embeddings = hf_net.bert.embeddings
        layer = nn.TransformerEncoderLayer(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            dropout=cfg.hidden_dropout_prob, activation="relu", batch_first=True,
            norm_first=False, layer_norm_eps=cfg.layer_norm_eps)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_hidden_layers,
                                             enable_nested_tensor=True)
        for mine, theirs in zip(self.encoder.layers, hf_net.bert.encoder.layer):
            att = theirs.attention
            with torch.no_grad():
                mine.self_attn.in_proj_weight.copy_(torch.cat(
                    [att.self.query.weight, att.self.key.weight, att.self.value.weight]))
                mine.self_attn.in_proj_bias.copy_(torch.cat(
                    [att.self.query.bias, att.self.key.bias, att.self.value.bias]))
                mine.self_attn.out_proj.load_state_dict(att.output.dense.state_dict())
                mine.norm1.load_state_dict(att.output.LayerNorm.state_dict())
                mine.linear1.load_state_dict(theirs.intermediate.dense.state_dict())
                mine.linear2.load_state_dict(theirs.output.dense.state_dict())
                mine.norm2.load_state_dict(theirs.output.LayerNorm.state_dict())
        self.pooler = hf_net.bert.pooler
        self.classifier = hf_net.classifier
        self.to(next(hf_net.parameters()).device)

    def forward(self, inputs):
        tokens, segments, lens = inputs
        pad = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= lens[:, None]
        x = self.embeddings(input_ids=tokens, token_type_ids=segments)
        # Fast path: eval + no_grad + a padding mask -> nested tensor, fused layers; the
        # output comes back padded with zeros.
        x = self.encoder(x, src_key_padding_mask=pad)
        return self.classifier(self.pooler(x))


def fast_path_off_reason(model: NestedTensorBert, inputs) -> Optional[str]:
    """Why the fast path did not run on ``inputs`` (None when it ran).  The nested path hands
    back ``to_padded_tensor(0.)``: exact zeros at every padded position, which the regular
    path (whose padded rows attend to the valid tokens) never gives."""
    tokens, segments, lens = inputs
    pad = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= lens[:, None]
    if not bool(pad.any()):
        return None  # no padding to look at: nothing to tell either way
    with torch.no_grad():
        x = model.embeddings(input_ids=tokens, token_type_ids=segments)
        out = model.encoder(x, src_key_padding_mask=pad)
    if not bool((out[pad] == 0).all()):
        return "nn.TransformerEncoder did not take its nested-tensor fast path"
    return None


def check_same_logits(reference, ref_forward, peer, peer_forward, inputs, what: str,
                      atol: float = 2e-4) -> None:
    """Assert the peer computes the reference's function (eval, no_grad) on ``inputs``."""
    reference.eval()
    peer.eval()
    with torch.no_grad():
        want = ref_forward(reference, inputs).float()
        got = peer_forward(peer, inputs).float()
    err = (want - got).abs().max().item()
    assert err <= atol * max(1.0, want.abs().max().item()), \
        f"{what}: logits differ from the HF model's by {err:.3g}"


# ----------------------------------------------------------------------------- ONNX Runtime
ORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def ort_cache_dir() -> str:
    path = os.environ.get("FASTBERT_ORT_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                "fastbert-bench-ort")
    os.makedirs(path, exist_ok=True)
    return path


class OrtBert:
    """An ORT InferenceSession of the HF model, optimized for BERT; called like hf_forward."""

    def __init__(self, hf_net, threads: int):
        try:
            import onnxruntime as ort
            from onnxruntime.transformers.optimizer import optimize_model
        except ImportError as exc:
            raise PeerUnavailable(f"onnxruntime (optional benchmark peer) is not installed: "
                                  f"{exc}") from exc
        try:
            import onnx  # noqa: F401  (the exporter and the optimizer need it)
        except ImportError as exc:
            raise PeerUnavailable(f"onnx (needed to export for onnxruntime) is not installed: "
                                  f"{exc}") from exc
        cfg = hf_net.config
        state = {k: v.detach().cpu() for k, v in hf_net.state_dict().items()}
        digest = hashlib.sha1()
        for k in sorted(state):
            digest.update(k.encode())
            digest.update(state[k].float().numpy().tobytes())
        stem = os.path.join(ort_cache_dir(), f"bert-{cfg.hidden_size}-{cfg.num_hidden_layers}-"
                                             f"{digest.hexdigest()[:12]}")
        raw, optimized = stem + ".onnx", stem + ".opt.onnx"
        if not os.path.exists(optimized):
            # The eager-attention twin (same weights): ORT fuses its attention pattern.
            from transformers import BertForSequenceClassification
            dims = harness.BertDims(cfg.hidden_size, cfg.num_attention_heads,
                                    cfg.intermediate_size, cfg.num_hidden_layers)
            twin = BertForSequenceClassification(hf_config(dims, "eager")).eval()
            twin.load_state_dict(state)
            B, L = 2, 16
            example = (torch.randint(5, 100, (B, L)), torch.ones(B, L, dtype=torch.long),
                       torch.zeros(B, L, dtype=torch.long))
            axes = {n: {0: "batch", 1: "seq"} for n in ORT_INPUTS}
            axes["logits"] = {0: "batch"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(twin, example, raw, input_names=list(ORT_INPUTS),
                                  output_names=["logits"], dynamic_axes=axes, opset_version=17,
                                  dynamo=False)
                opt = optimize_model(raw, model_type="bert", num_heads=cfg.num_attention_heads,
                                     hidden_size=cfg.hidden_size)
            self.fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            opt.save_model_to_file(optimized + ".tmp")
            os.replace(optimized + ".tmp", optimized)
        else:
            self.fused = None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads   # the same threads as every other row
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(optimized, so, providers=["CPUExecutionProvider"])
        self.path = optimized
        if self.fused is None:
            import onnx as _onnx
            ops = [n.op_type for n in _onnx.load(optimized).graph.node]
            self.fused = {k: ops.count(k) for k in ("EmbedLayerNormalization", "Attention",
                                                    "SkipLayerNormalization") if k in ops}

    def __call__(self, inputs):
        tokens, segments, lens = inputs
        mask = (torch.arange(tokens.shape[1])[None, :] < lens[:, None].cpu()).long()
        feed = {"input_ids": tokens.cpu().numpy(), "attention_mask": mask.numpy(),
                "token_type_ids": segments.cpu().long().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])

    # same signature as hf_forward (so the benches treat every peer alike); no grad, no train
    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise PeerUnavailable("ONNX Runtime (inference package) does not train")
        return self

    def parameters(self):
        return iter(())


def ort_forward(m, inputs):
    return m(inputs)


# ----------------------------------------------------------------------------- grouping
def length_grouped_indices(lengths: Sequence[int], batch_size: int, mega_batch_mult: int,
                           seed: int = 0) -> List[int]:
    """The order ``Trainer(group_by_length=True)`` feeds (transformers'
    ``trainer_pt_utils.get_length_grouped_indices``): a random permutation cut into
    megabatches of ``mega_batch_mult`` batches, each sorted by length, longest first, and
    the longest example of all moved to the very first batch.  HF takes
    ``mega_batch_mult = min(len(dataset) // (4 * batch_size), 50)``: 50 on SNLI's training
    set."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(lengths), generator=g)
    size = mega_batch_mult * batch_size
    megabatches = [indices[i:i + size].tolist() for i in range(0, len(lengths), size)]
    megabatches = [sorted(mb, key=lambda i: lengths[i], reverse=True) for mb in megabatches]
    maxima = [lengths[mb[0]] for mb in megabatches]
    top = int(torch.argmax(torch.tensor(maxima)).item())
    megabatches[0][0], megabatches[top][0] = megabatches[top][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]
