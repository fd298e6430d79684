"""BERT with the d2l 1.0.x API (the English edition), as ``from fastbert.v1 import BERTModel``.

d2l 1.x builds the same network with shorter signatures (``num_blks``, no explicit input
sizes) and lazy layers.  Here every size of a BERT model is known from ``num_hiddens``, so the
layers are concrete: the state_dict exists at once and uses d2l 1.x's names (which are the
0.17 names).  Behaviour differences from 0.17 that 1.x has, and this module keeps:
the positional embedding trains (1.x adds ``pos_embedding`` itself, not ``.data``), and the
encoder block is called ``TransformerEncoderBlock``.  The standalone ``PositionWiseFFN`` and
``MultiHeadAttention`` stay lazy, as in d2l 1.x, because their input sizes are not given.
"""
from __future__ import annotations

from torch import nn

from . import bert as _bert
from . import layers as _layers
from .bert import get_tokens_and_segments
from .layers import AddNorm, DotProductAttention, masked_softmax

__all__ = ["masked_softmax", "DotProductAttention", "MultiHeadAttention", "PositionWiseFFN",
           "AddNorm", "TransformerEncoderBlock", "get_tokens_and_segments", "BERTEncoder",
           "MaskLM", "NextSentencePred", "BERTModel"]


class MultiHeadAttention(_layers.MultiHeadAttention):
    """``MultiHeadAttention(num_hiddens, num_heads, dropout, bias=False)`` (d2l 1.x).
    ``num_inputs`` (ours) makes the projections concrete instead of lazy."""

    def __init__(self, num_hiddens, num_heads, dropout, bias=False, num_inputs=None, **kwargs):
        n = num_inputs if num_inputs is not None else num_hiddens
        super().__init__(n, n, n, num_hiddens, num_heads, dropout, bias, **kwargs)
        if num_inputs is None:
            for name in ("W_q", "W_k", "W_v", "W_o"):
                setattr(self, name, nn.LazyLinear(num_hiddens, bias=bias))

    def transpose_qkv(self, X):
        return _layers.transpose_qkv(X, self.num_heads)

    def transpose_output(self, X):
        return _layers.transpose_output(X, self.num_heads)


class PositionWiseFFN(_layers.PositionWiseFFN):
    """``PositionWiseFFN(ffn_num_hiddens, ffn_num_outputs)`` (d2l 1.x, lazy unless
    ``ffn_num_input`` is given)."""

    def __init__(self, ffn_num_hiddens, ffn_num_outputs, ffn_num_input=None, activation="relu"):
        super().__init__(ffn_num_input, ffn_num_hiddens, ffn_num_outputs, activation=activation)


class TransformerEncoderBlock(_layers.EncoderBlock):
    """``TransformerEncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout,
    use_bias=False)`` (d2l 1.x); concrete layers, since every input is ``num_hiddens`` wide."""

    def __init__(self, num_hiddens, ffn_num_hiddens, num_heads, dropout, use_bias=False,
                 **options):
        super().__init__(num_hiddens, num_hiddens, num_hiddens, num_hiddens, num_hiddens,
                         num_hiddens, ffn_num_hiddens, num_heads, dropout, use_bias, **options)


class BERTEncoder(_bert.BERTEncoder):
    """``BERTEncoder(vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
    max_len=1000)`` (d2l 1.x): the positional embedding trains."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
                 max_len=1000, **options):
        options.setdefault("train_pos_embedding", True)
        super().__init__(vocab_size, num_hiddens, num_hiddens, num_hiddens, ffn_num_hiddens,
                         num_heads, num_blks, dropout, max_len=max_len, key_size=num_hiddens,
                         query_size=num_hiddens, value_size=num_hiddens, **options)


class MaskLM(_bert.MaskLM):
    """``MaskLM(vocab_size, num_hiddens)`` (d2l 1.x); input width ``num_inputs`` (ours,
    default ``num_hiddens``)."""

    def __init__(self, vocab_size, num_hiddens, num_inputs=None, **kwargs):
        super().__init__(vocab_size, num_hiddens,
                         num_inputs if num_inputs is not None else num_hiddens, **kwargs)


class NextSentencePred(_bert.NextSentencePred):
    """``NextSentencePred()`` (d2l 1.x, lazy unless ``num_inputs`` is given)."""

    def __init__(self, num_inputs=None, **kwargs):
        super().__init__(num_inputs if num_inputs is not None else 1, **kwargs)
        if num_inputs is None:
            self.output = nn.LazyLinear(2)


class BERTModel(_bert.BERTModel):
    """``BERTModel(vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
    max_len=1000)`` (d2l 1.x), with concrete layers and d2l 1.x state_dict names."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
                 max_len=1000, **options):
        options.setdefault("train_pos_embedding", True)
        n = num_hiddens
        super().__init__(vocab_size, n, n, n, ffn_num_hiddens, num_heads, num_blks, dropout,
                         max_len=max_len, key_size=n, query_size=n, value_size=n,
                         hid_in_features=n, mlm_in_features=n, nsp_in_features=n, **options)
