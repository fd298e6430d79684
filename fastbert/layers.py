"""The book's Transformer layers with d2l 0.17.x signatures, running on fastbert ops.

Parameters live under d2l's names (``W_q``, ``addnorm1.ln``, ``ffn.dense1`` ...) so d2l
state_dicts load with ``strict=True``.  The modules hold no kernel code: they call
:mod:`fastbert.ops`, which picks a backend.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import backends, ops

__all__ = [
    "masked_softmax", "transpose_qkv", "transpose_output", "DotProductAttention",
    "MultiHeadAttention", "PositionWiseFFN", "AddNorm", "EncoderBlock", "keep_attention_weights",
]

masked_softmax = ops.masked_softmax


def transpose_qkv(X: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B*H, L, D] (d2l)."""
    X = X.reshape(X.shape[0], X.shape[1], num_heads, -1)
    X = X.permute(0, 2, 1, 3)
    return X.reshape(-1, X.shape[2], X.shape[3])


def transpose_output(X: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B*H, L, D] -> [B, L, H*D], the inverse of :func:`transpose_qkv` (d2l)."""
    X = X.reshape(-1, num_heads, X.shape[1], X.shape[2])
    X = X.permute(0, 2, 1, 3)
    return X.reshape(X.shape[0], X.shape[1], -1)


def _dropout_p(module: nn.Dropout, training: bool) -> float:
    return float(module.p) if training else 0.0


class DotProductAttention(nn.Module):
    """Scaled dot-product attention (d2l).

    ``attention_weights``: d2l stores the softmax weights on every call.  Fused kernels never
    build them, so they are kept only when ``keep_weights`` is True, or when it is None (the
    default) and the reference backend runs this op.  Use :func:`keep_attention_weights` to
    switch a whole model.
    """

    def __init__(self, dropout, keep_weights: Optional[bool] = None, **kwargs):
        super().__init__(**kwargs)
        self.dropout = nn.Dropout(dropout)
        self.keep_weights = keep_weights
        self.attention_weights = None

    @property
    def keep_weights(self) -> Optional[bool]:
        return self._keep_weights

    @keep_weights.setter
    def keep_weights(self, keep: Optional[bool]) -> None:
        global _KEEP_WEIGHTS_SET
        if keep:
            _KEEP_WEIGHTS_SET = True
        self._keep_weights = keep

    def __setstate__(self, state):
        # A module pickled before keep_weights became a property holds it under that name.
        if "keep_weights" in state:
            state["_keep_weights"] = state.pop("keep_weights")
        super().__setstate__(state)
        self.keep_weights = self.__dict__.get("_keep_weights")

    def wants_weights(self, like: torch.Tensor) -> bool:
        if self.keep_weights is not None:
            return self.keep_weights
        return backends.resolve_name("attention", like.device.type, like.dtype) == "reference"

    def forward(self, queries, keys, values, valid_lens=None):
        if self.wants_weights(queries):
            # The book's computation, with the softmax on our masked_softmax op.
            d = queries.shape[-1]
            scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(d)
            self.attention_weights = ops.masked_softmax(scores, valid_lens)
            return torch.bmm(self.dropout(self.attention_weights), values)
        self.attention_weights = None
        return ops.attention(queries, keys, values, valid_lens,
                             _dropout_p(self.dropout, self.training))


# True once any DotProductAttention was ever told to keep its weights: until then the encoder
# skips its per-call scan of every module for one (BERTEncoder.uses_unpadded).
_KEEP_WEIGHTS_SET = False


def keep_weights_ever_set() -> bool:
    return _KEEP_WEIGHTS_SET


def keep_attention_weights(model: nn.Module, keep: Optional[bool] = True) -> nn.Module:
    """Make every ``DotProductAttention`` in ``model`` store ``attention_weights`` (True),
    never store them (False) or store them on the reference backend only (None).
    Keeping weights also keeps the encoder on the padded path, where they are defined."""
    for m in model.modules():
        if isinstance(m, DotProductAttention):
            m.keep_weights = keep
    return model


class MultiHeadAttention(nn.Module):
    """Multi-head attention (d2l 0.17 signature)."""

    def __init__(self, key_size, query_size, value_size, num_hiddens, num_heads, dropout,
                 bias=False, **kwargs):
        super().__init__(**kwargs)
        if num_hiddens % num_heads:
            raise ValueError(f"num_hiddens ({num_hiddens}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.attention = DotProductAttention(dropout)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=bias)
        self.W_k = nn.Linear(key_size, num_hiddens, bias=bias)
        self.W_v = nn.Linear(value_size, num_hiddens, bias=bias)
        self.W_o = nn.Linear(num_hiddens, num_hiddens, bias=bias)

    def forward(self, queries, keys, values, valid_lens):
        queries = transpose_qkv(self.W_q(queries), self.num_heads)
        keys = transpose_qkv(self.W_k(keys), self.num_heads)
        values = transpose_qkv(self.W_v(values), self.num_heads)
        if valid_lens is not None:
            # One copy of each sequence's lengths per head, as d2l does.
            valid_lens = torch.repeat_interleave(valid_lens, repeats=self.num_heads, dim=0)
        output = self.attention(queries, keys, values, valid_lens)
        return self.W_o(transpose_output(output, self.num_heads))

    def _cat(self, name: str, tensors):
        """``torch.cat(tensors)``; when no graph is recorded (inference), the result is kept and
        reused while every tensor is the same storage at the same version (an in-place
        update, ``load_state_dict`` or ``.to()`` makes a new one): the copy of the QKV weights
        cost ~0.1 ms a block per call at batch 1.  With grad on (training) or while
        torch.compile traces, a plain cat (autograd needs it; the optimizer changes weights).
        Keeps one extra copy of the projection weights of a model used for inference."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.cat(tensors)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
        cache = self.__dict__.setdefault("_cat_cache", {})
        hit = cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = torch.cat(tensors)
        cache[name] = (key, out)
        return out

    def forward_packed(self, X: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                       queries: Optional[torch.Tensor] = None,
                       cu_seqlens_q: Optional[torch.Tensor] = None):
        """Self-attention on packed tokens ``X[T, C]`` (the unpadded encoder).  With
        ``queries[Tq, C]`` and their offsets ``cu_seqlens_q``, only those rows query (each
        sequence's keys and values are still all of its rows of ``X``)."""
        T, H = X.shape[0], self.num_heads
        projections = (self.W_q, self.W_k, self.W_v)
        if any(isinstance(m.weight, nn.parameter.UninitializedParameter)
               for m in projections + (self.W_o,)):
            # d2l 1.x lazy layers: the first call materializes them through the modules.
            q, k, v = (m(X) for m in projections)
            if queries is not None:
                q = self.W_q(queries)
            out = ops.varlen_attention(q.reshape(q.shape[0], H, -1), k.reshape(T, H, -1),
                                       v.reshape(T, H, -1), cu_seqlens, max_len,
                                       _dropout_p(self.attention.dropout, self.training),
                                       cu_seqlens_q=cu_seqlens_q)
            return self.W_o(out.reshape(q.shape[0], -1))
        bias = [None] * 3 if self.W_q.bias is None else [m.bias for m in projections]
        if queries is None:
            # One fused QKV GEMM (ops.linear: oneDNN on the cpp backend) on the concatenated
            # weights, split into views: fewer, larger GEMMs than three projections.
            weight = self._cat("qkv", [m.weight for m in projections])
            q, k, v = ops.linear(X, weight, None if bias[0] is None else
                                 self._cat("qkv_bias", bias)).split(
                [m.weight.shape[0] for m in projections], -1)
        else:
            q = ops.linear(queries, self.W_q.weight, bias[0])
            k, v = ops.linear(X, self._cat("kv", [self.W_k.weight, self.W_v.weight]),
                              None if bias[1] is None else self._cat("kv_bias", bias[1:])).split(
                [self.W_k.weight.shape[0], self.W_v.weight.shape[0]], -1)
        # unflatten, not reshape(T, H, -1): a strided view with a data-dependent T would make
        # torch.compile guard on T.
        out = ops.varlen_attention(q.unflatten(-1, (H, -1)), k.unflatten(-1, (H, -1)),
                                   v.unflatten(-1, (H, -1)), cu_seqlens, max_len,
                                   _dropout_p(self.attention.dropout, self.training),
                                   cu_seqlens_q=cu_seqlens_q)
        return ops.linear(out.flatten(-2), self.W_o.weight, self.W_o.bias)


class PositionWiseFFN(nn.Module):
    """Position-wise FFN (d2l); ``activation`` is ``relu`` (the book) or ``gelu`` (BERT)."""

    def __init__(self, ffn_num_input, ffn_num_hiddens, ffn_num_outputs, activation="relu",
                 **kwargs):
        super().__init__(**kwargs)
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.dense1 = (nn.LazyLinear(ffn_num_hiddens) if ffn_num_input is None
                       else nn.Linear(ffn_num_input, ffn_num_hiddens))
        self.relu = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dense2 = (nn.LazyLinear(ffn_num_outputs) if ffn_num_input is None
                       else nn.Linear(ffn_num_hiddens, ffn_num_outputs))

    def forward(self, X):
        if isinstance(self.dense1.weight, nn.parameter.UninitializedParameter):
            # d2l 1.x lazy layers: the first call materializes them through the modules.
            return self.dense2(self.relu(self.dense1(X)))
        return ops.ffn(X, self.dense1.weight, self.dense1.bias, self.dense2.weight,
                       self.dense2.bias, self.activation)


class AddNorm(nn.Module):
    """Residual connection, dropout and LayerNorm: ``ln(dropout(Y) + X)`` (d2l)."""

    def __init__(self, normalized_shape, dropout, eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(normalized_shape, eps=eps)

    def forward(self, X, Y):
        if len(self.ln.normalized_shape) != 1:  # the book only uses 1-D shapes
            return self.ln(self.dropout(Y) + X)
        return ops.add_layernorm(X, Y, self.ln.weight, self.ln.bias, self.ln.eps,
                                 _dropout_p(self.dropout, self.training))


class EncoderBlock(nn.Module):
    """Transformer encoder block (d2l 0.17 signature), plus the model options
    ``ffn_activation`` and ``layer_norm_eps`` (d2l defaults)."""

    def __init__(self, key_size, query_size, value_size, num_hiddens, norm_shape,
                 ffn_num_input, ffn_num_hiddens, num_heads, dropout, use_bias=False,
                 ffn_activation="relu", layer_norm_eps=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.attention = MultiHeadAttention(key_size, query_size, value_size, num_hiddens,
                                            num_heads, dropout, use_bias)
        self.addnorm1 = AddNorm(norm_shape, dropout, eps=layer_norm_eps)
        self.ffn = PositionWiseFFN(ffn_num_input, ffn_num_hiddens, num_hiddens,
                                   activation=ffn_activation)
        self.addnorm2 = AddNorm(norm_shape, dropout, eps=layer_norm_eps)

    def forward(self, X, valid_lens):
        Y = self.addnorm1(X, self.attention(X, X, X, valid_lens))
        return self.addnorm2(Y, self.ffn(Y))

    def forward_packed(self, X, cu_seqlens, max_len, queries=None, cu_seqlens_q=None):
        """The same block on packed tokens ``X[T, C]``; with ``queries`` (rows of X, offsets
        ``cu_seqlens_q``), the block's output for those rows only."""
        attended = self.attention.forward_packed(X, cu_seqlens, max_len, queries, cu_seqlens_q)
        Y = self.addnorm1(X if queries is None else queries, attended)
        return self.addnorm2(Y, self.ffn(Y))
