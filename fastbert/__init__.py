"""fastbert: the d2l book's BERT, on fast kernels.  Change one import:

    from fastbert import BERTModel      # instead of d2l.BERTModel

The classes and functions keep the d2l 0.17.x signatures and state_dict names; the d2l 1.x
forms live in :mod:`fastbert.v1`.  Hot ops run on the backend chosen by
:func:`set_backend` / :func:`use_backend` / ``FASTBERT_BACKEND`` (``auto`` by default).
"""
from . import backends, cpu_cache, ops
from .backends import available_backends, explain, get_backend, set_backend, use_backend
from .cpu_cache import (cpu_cache_disabled, cpu_cache_info, empty_cpu_cache, enable_cpu_cache,
                        set_cpu_cache_mb)
from .bert import (BERTClassifier, BERTEncoder, BERTModel, MaskLM, NextSentencePred,
                   get_tokens_and_segments)
from .layers import (AddNorm, DotProductAttention, EncoderBlock, MultiHeadAttention,
                     PositionWiseFFN, keep_attention_weights, masked_softmax, transpose_output,
                     transpose_qkv)

__version__ = "0.1.0"

backends.preload()  # load the kernels now, not inside a torch.compile trace

__all__ = [
    "BERTClassifier", "BERTEncoder", "BERTModel", "MaskLM", "NextSentencePred",
    "get_tokens_and_segments", "AddNorm", "DotProductAttention", "EncoderBlock",
    "MultiHeadAttention", "PositionWiseFFN", "keep_attention_weights", "masked_softmax",
    "transpose_output", "transpose_qkv", "set_backend", "get_backend", "use_backend",
    "available_backends", "explain", "backends", "ops", "cpu_cache", "enable_cpu_cache", "set_cpu_cache_mb",
    "empty_cpu_cache", "cpu_cache_disabled", "cpu_cache_info",
]
