"""The reference backend: pure PyTorch, the truth every kernel is tested against.

Each function implements one op contract of :mod:`fastbert.ops` with the arithmetic of the
d2l book (same operation order, same -1e6 fill), so an fp32 model on this backend matches
d2l to the last bit where d2l's own code is deterministic.  Inputs arrive already checked
and normalized by :mod:`fastbert.ops` (valid_lens as int32 on the right device).
Autograd gives every backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import Backend, register_backend

# d2l fills masked scores with -1e6.  In fp16 that overflows to -inf and a valid_len-0 row
# becomes NaN; the most negative finite value keeps the row uniform (documented difference).
D2L_MASK_VALUE = -1e6


def mask_value(dtype: torch.dtype) -> float:
    return max(D2L_MASK_VALUE, torch.finfo(dtype).min)


def key_mask(valid_lens: torch.Tensor, n_queries: int, n_keys: int) -> torch.Tensor:
    """Bool [N, Lq, Lk]: True where key j is visible (j < valid length) for each query."""
    keys = torch.arange(n_keys, device=valid_lens.device)
    if valid_lens.dim() == 1:
        return (keys[None, None, :] < valid_lens[:, None, None]).expand(-1, n_queries, -1)
    return keys[None, None, :] < valid_lens[:, :, None]


def masked_softmax(X: torch.Tensor, valid_lens: Optional[torch.Tensor]) -> torch.Tensor:
    if valid_lens is None:
        return F.softmax(X, dim=-1)
    mask = key_mask(valid_lens, X.shape[1], X.shape[2])
    return F.softmax(X.masked_fill(~mask, mask_value(X.dtype)), dim=-1)


def attention_with_weights(q, k, v, valid_lens, dropout_p: float, scale: Optional[float]):
    """Padded attention as d2l's DotProductAttention computes it; returns (out, weights)."""
    scores = torch.bmm(q, k.transpose(1, 2))
    # d2l divides by sqrt(d); keep that exact operation when no scale is given.
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    weights = masked_softmax(scores, valid_lens)
    return torch.bmm(F.dropout(weights, dropout_p, training=dropout_p > 0), v), weights


def attention(q, k, v, valid_lens, dropout_p: float = 0.0, scale: Optional[float] = None):
    return attention_with_weights(q, k, v, valid_lens, dropout_p, scale)[0]


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def pack(X: torch.Tensor, valid_lens: torch.Tensor):
    B, L = X.shape[:2]
    lengths = valid_lens.long()
    mask = torch.arange(L, device=X.device)[None, :] < lengths[:, None]
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    max_len = int(lengths.max()) if B else 0
    return X[mask], cu_seqlens, max_len


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    B = lengths.shape[0]
    mask = torch.arange(L, device=packed.device)[None, :] < lengths[:, None]
    out = packed.new_zeros((B, L) + tuple(packed.shape[1:]))
    return out.masked_scatter(mask.view((B, L) + (1,) * (packed.dim() - 1)), packed)


def varlen_attention(q, k, v, cu_seqlens, max_len: int, dropout_p: float = 0.0,
                     scale: Optional[float] = None, seed=None, cu_seqlens_q=None):
    """Attention within each packed sequence: unpack, padded attention, pack.

    With ``cu_seqlens_q`` the queries unpack by their own offsets (to their longest count)
    and each sequence's query rows see its ``cu_seqlens`` keys.  A sequence with no keys has
    valid length 0: d2l's uniform row over the zero padding, i.e. output 0, and the fill cuts
    the scores' gradient."""
    T, H, D = q.shape
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    B = lengths.shape[0]
    L = max(int(max_len), 1)
    q_cu, q_lengths, Lq = cu_seqlens, lengths, L
    if cu_seqlens_q is not None:
        q_cu, q_lengths = cu_seqlens_q, lengths_from_cu_seqlens(cu_seqlens_q)
        Lq = max(int(q_lengths.max()) if B else 0, 1)

    def to_heads(x, cu, n):  # [T, H, D] -> [B*H, n, D]
        return unpack(x, cu, n).permute(0, 2, 1, 3).reshape(B * H, n, D)

    vl = lengths.repeat_interleave(H)
    out = attention(to_heads(q, q_cu, Lq), to_heads(k, cu_seqlens, L),
                    to_heads(v, cu_seqlens, L), vl, dropout_p, scale)
    out = out.reshape(B, H, Lq, D).permute(0, 2, 1, 3)
    return pack(out, q_lengths)[0]


def embedding_sum(ids, token_weight, segment_weight, position_weight):
    """The packed tokens' embedding: token + segment + position rows, added in that order
    (d2l's BERTEncoder)."""
    tok, seg, pos = ids.unbind(-1)
    return (F.embedding(tok, token_weight) + F.embedding(seg, segment_weight)
            + F.embedding(pos, position_weight))


def add_layernorm(x, y, weight, bias, eps: float, dropout_p: float = 0.0, seed=None):
    # d2l AddNorm(X, Y) = ln(dropout(Y) + X), in that operation order.
    z = F.dropout(y, dropout_p, training=dropout_p > 0) + x
    return F.layer_norm(z, (z.shape[-1],), weight, bias, eps)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def ffn(x, w1, b1, w2, b2, activation: str = "relu"):
    return F.linear(ACTIVATIONS[activation](F.linear(x, w1, b1)), w2, b2)


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def gather_positions(X: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    batch_idx = torch.arange(X.shape[0], device=X.device)[:, None]
    return X[batch_idx, positions.long()]


def mlm_head(H: torch.Tensor, w1, b1, ln_weight, ln_bias, eps: float) -> torch.Tensor:
    """d2l's MaskLM.mlp without its output layer: LayerNorm(relu(Linear(H)))."""
    return F.layer_norm(F.relu(F.linear(H, w1, b1)), (w1.shape[0],), ln_weight, ln_bias, eps)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * v) / sum(w)``, 0 (with zero gradients) when the weights sum to 0."""
    total = weights.sum()
    return (values * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


def mlm_loss(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps: float):
    """Unfused MLM head + loss on the real slots (weight > 0): gather them, run the head,
    build their full logits, cross-entropy in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling():
        # The same sum without data-dependent shapes: every slot, padding weighted 0.
        H = mlm_head(gather_positions(X, positions), w1, b1, ln_weight, ln_bias, eps)
        logits = F.linear(H, w2, b2).to(acc).flatten(0, 1)
        ce = F.cross_entropy(logits, labels.flatten().clamp(0, w2.shape[0] - 1),
                             reduction="none")
        return weighted_mean(ce, weights.flatten().to(acc))
    rows, slots = (weights > 0).nonzero(as_tuple=True)
    H = mlm_head(X[rows, positions[rows, slots]], w1, b1, ln_weight, ln_bias, eps)
    logits = F.linear(H, w2, b2).to(acc)
    ce = F.cross_entropy(logits, labels[rows, slots], reduction="none")
    return weighted_mean(ce, weights[rows, slots].to(acc))


OPS = {
    "masked_softmax": masked_softmax,
    "attention": attention,
    "pack": pack,
    "unpack": unpack,
    "varlen_attention": varlen_attention,
    "embedding_sum": embedding_sum,
    "add_layernorm": add_layernorm,
    "ffn": ffn,
    "linear": linear,
    "gather_positions": gather_positions,
    "mlm_loss": mlm_loss,
}

register_backend(Backend(
    "reference", dict(OPS), device_types=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
    dtypes=frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16}),
    # pack/unpack move elements unchanged: the unpadded encoder packs token ids too.
    op_dtypes={op: frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16,
                              torch.int32, torch.int64}) for op in ("pack", "unpack")}))
