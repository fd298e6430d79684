"""BERT with the d2l 0.17.x API (the book's BERT chapters and its SNLI fine-tuning).

Model options beyond d2l (keyword-only, d2l behaviour by default):

* ``ffn_activation``: ``"relu"`` (d2l) or ``"gelu"`` (BERT checkpoints);
* ``layer_norm_eps``: 1e-5 (d2l; BERT checkpoints use 1e-12);
* ``embedding_layer_norm``: LayerNorm + dropout after the embedding sum (BERT checkpoints);
* ``train_pos_embedding``: d2l 0.17 adds ``pos_embedding.data``, so the positional
  embedding never trains (False, the default here); d2l 1.x trains it (True);
* ``unpadded``: run the encoder on packed tokens (None: whenever the backend picked for
  ``varlen_attention`` is not the reference and valid_lens is None or 1-D).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import backends, encoded_rows, head_logits, inference_plan, layers, ops
from .backends.kernel_call import SMALL_GEMM_ROWS
from .layers import DotProductAttention, EncoderBlock

__all__ = ["get_tokens_and_segments", "BERTEncoder", "MaskLM", "NextSentencePred", "BERTModel",
           "BERTClassifier"]


def get_tokens_and_segments(tokens_a, tokens_b=None):
    """``<cls> a <sep> [b <sep>]`` and its segment ids (d2l)."""
    tokens = ["<cls>"] + tokens_a + ["<sep>"]
    segments = [0] * (len(tokens_a) + 2)
    if tokens_b is not None:
        tokens += tokens_b + ["<sep>"]
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


def _check_ids(name: str, ids, upper: int, like: Optional[torch.Tensor] = None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq_len], got shape {tuple(ids.shape)}")
    if like is not None:
        if ids.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(ids.shape)} differs from tokens shape "
                             f"{tuple(like.shape)}")
        if ids.device != like.device:
            raise ValueError(f"{name} is on {ids.device} but tokens are on {like.device}")
    if not torch.compiler.is_compiling() and ids.numel() and ids.device.type != "meta":
        lo, hi = map(int, torch.aminmax(ids))  # one reduction (min and max: two)
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must lie in [0, {upper - 1}], got values in [{lo}, {hi}]")


# The cpp backend's GEMMs run on oneDNN, which compiles a kernel per GEMM shape and caches
# it.  The unpadded encoder's row count T (the batch's valid tokens) changes with every
# batch, and a shape seen for the first time costs ~0.3-0.6 ms per GEMM: measured ~15% of a
# bert.small train step on fresh batches.  So on that path T is rounded up to a multiple of
# ROW_BUCKET with rows that belong to no sequence (ops.varlen_attention's row padding): a
# handful of shapes recur, for at most ROW_BUCKET - 1 extra rows of GEMM work.  A small
# batch (T < SMALL_ROWS: batch-1 inference, T ~ 27 on SNLI) rounds to SMALL_BUCKET instead:
# rounding 27 rows up to 64 more than doubled every GEMM of a batch-1 call (measured 6-9 ms
# -> see benchmarks/bench_latency.py), while at most SMALL_ROWS / SMALL_BUCKET shapes recur.
ROW_BUCKET = 64
SMALL_BUCKET = 8
SMALL_ROWS = 8 * ROW_BUCKET


def bucket_rows(rows: int, bucket: int) -> int:
    """The multiple ``rows`` packed rows are rounded up to under ``row_bucket() == bucket``.
    None (1) for inference on at most SMALL_GEMM_ROWS rows: those GEMMs run on ATen's addmm,
    which compiles nothing per shape (fastbert/backends/kernel_call.py).  Under
    torch.compile ``rows`` is unbacked (a function of the data): ``bucket`` as it is."""
    if torch.compiler.is_compiling():
        return bucket
    if bucket > 1 and rows <= SMALL_GEMM_ROWS and not torch.is_grad_enabled():
        return 1
    if bucket > SMALL_BUCKET and rows < SMALL_ROWS:
        return SMALL_BUCKET
    return bucket


class BERTEncoder(nn.Module):
    """BERT encoder (d2l 0.17 signature)."""

    def __init__(self, vocab_size, num_hiddens, norm_shape, ffn_num_input, ffn_num_hiddens,
                 num_heads, num_layers, dropout, max_len=1000, key_size=768, query_size=768,
                 value_size=768, *, ffn_activation="relu", layer_norm_eps=1e-5,
                 embedding_layer_norm=False, train_pos_embedding=False,
                 unpadded: Optional[bool] = None, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.max_len = vocab_size, max_len
        self.train_pos_embedding = train_pos_embedding
        self.unpadded = unpadded
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        if embedding_layer_norm:
            self.embedding_norm = nn.LayerNorm(num_hiddens, eps=layer_norm_eps)
            self.embedding_dropout = nn.Dropout(dropout)
        else:
            self.embedding_norm = None
        self.blks = nn.Sequential()
        for i in range(num_layers):
            self.blks.add_module(f"{i}", EncoderBlock(
                key_size, query_size, value_size, num_hiddens, norm_shape, ffn_num_input,
                ffn_num_hiddens, num_heads, dropout, True, ffn_activation=ffn_activation,
                layer_norm_eps=layer_norm_eps))
        # Learnable positional embeddings, long enough for max_len.
        self.pos_embedding = nn.Parameter(torch.randn(1, max_len, num_hiddens))

    def embed(self, tokens, segments):
        return self._embedding_sum(tokens, segments, self.pos_embedding[:, :tokens.shape[1], :])

    def embed_packed(self, tokens, segments, valid_lens, row_multiple: int = 1):
        """The embedding of the valid tokens only: ``(X[T, C], cu_seqlens, max_len)``, equal to
        ``ops.pack(self.embed(tokens, segments), valid_lens)`` without embedding the pads.
        With ``row_multiple`` > 1, X gets rows (token, segment and position 0) up to the next
        multiple (``bucket_rows``: SMALL_BUCKET for a small batch): row padding for the packed
        ops, past ``cu_seqlens[-1]``."""
        B, L = tokens.shape
        positions = torch.arange(L, device=tokens.device).expand(B, L)
        ids, cu_seqlens, max_len = ops.pack(
            torch.stack([tokens.long(), segments.long(), positions], -1), valid_lens)
        row_multiple = bucket_rows(ids.shape[0], row_multiple)
        # Compiled, T is unbacked: pad by its (symbolic) remainder, which may be 0 rows.
        if row_multiple > 1 and (torch.compiler.is_compiling() or ids.shape[0] % row_multiple):
            ids = torch.cat([ids, ids.new_zeros(-ids.shape[0] % row_multiple, ids.shape[1])])
        # One fused lookup-and-add (ops.embedding_sum), the same sum as embed()'s.
        pos_table = self.pos_embedding[0]
        X = ops.embedding_sum(ids, self.token_embedding.weight, self.segment_embedding.weight,
                              pos_table if self.train_pos_embedding else pos_table.detach())
        return self._embedding_norm(X), cu_seqlens, max_len

    def _embedding_sum(self, tokens, segments, pos):
        """token + segment + positional vectors ``pos``, then the optional LayerNorm/dropout."""
        X = self.token_embedding(tokens) + self.segment_embedding(segments)
        # d2l 0.17 adds `pos_embedding.data`: no gradient ever reaches it.
        X = X + (pos if self.train_pos_embedding else pos.detach())
        return self._embedding_norm(X)

    def _embedding_norm(self, X):
        if self.embedding_norm is not None:
            X = self.embedding_dropout(self.embedding_norm(X))
        return X

    def uses_unpadded(self, X: torch.Tensor, valid_lens) -> bool:
        if valid_lens is not None and valid_lens.dim() != 1:
            return False  # per-query lengths need the padded attention
        if layers.keep_weights_ever_set() and any(
                isinstance(m, DotProductAttention) and m.keep_weights for m in self.modules()):
            return False  # attention weights are defined on the padded layout
        if self.unpadded is not None:
            return self.unpadded
        return backends.resolve_name("varlen_attention", X.device.type, X.dtype) != "reference"

    def row_bucket(self) -> int:
        """The packed row count's rounding (see ROW_BUCKET): runs with the cpp backend's GEMMs
        on the CPU, eager or compiled (oneDNN builds a kernel per shape either way); 1 (no row
        padding) otherwise."""
        weight = self.token_embedding.weight
        if weight.device.type != "cpu":
            return 1
        return ROW_BUCKET if backends.resolve_name("linear", "cpu", weight.dtype) == "cpp" else 1

    def forward(self, tokens, segments, valid_lens):
        return self._encode(tokens, segments, valid_lens, None)

    def forward_rows(self, tokens, segments, valid_lens, positions):
        """``self(tokens, segments, valid_lens)[b, positions[b, p]]`` as ``[B, P, C]``, for heads
        that read a few rows (``<cls>`` for the classifier, ``<cls>`` and the MLM positions
        for pretraining).  The unpadded encoder runs its last block for those rows only: their
        queries attend to every valid key, and nothing else of that block is needed.  Rows at
        pad positions are zeros, as in the unpadded ``encoded_X``."""
        ops.check_positions(positions, tokens.shape[0], tokens.shape[1], tokens.device,
                            name="positions")
        return self._encode(tokens, segments, valid_lens, positions.long())

    def _encode(self, tokens, segments, valid_lens, positions, cls: bool = False):
        """The encoder's rows: all (``positions`` None), those of ``positions`` (forward_rows),
        or with ``cls`` each sequence's ``<cls>`` row as ``[B, 1, C]`` (BERTClassifier)."""
        _check_ids("tokens", tokens, self.vocab_size)
        _check_ids("segments", segments, 2, like=tokens)
        B, L = tokens.shape
        if L > self.max_len:
            raise ValueError(f"tokens have length {L} but the model's max_len is {self.max_len}")
        valid_lens = ops.normalize_valid_lens(valid_lens, B, L, L, tokens.device)
        # Inference (grad off) on a few tokens: the same math in few calls, or None
        # (fastbert/inference_plan.py; inference_plan.why_not(model) says why not).
        out = inference_plan.encode(self, tokens, segments, valid_lens, positions, cls)
        if out is not None:
            return out
        if cls:
            positions = tokens.new_zeros(B, 1, dtype=torch.long)
        if not self.uses_unpadded(self.token_embedding.weight, valid_lens):
            X = self.embed(tokens, segments)
            for blk in self.blks:
                X = blk(X, valid_lens)
            return X if positions is None else ops.gather_positions(X, positions)
        if valid_lens is None:
            valid_lens = torch.full((B,), L, dtype=torch.int32, device=tokens.device)
        # Embed and pack the valid tokens once, run every block on [T, C], unpack once: pads
        # come back 0.  Rows past cu_seqlens[-1] (row_bucket) belong to no sequence.
        bucket = self.row_bucket()
        packed, cu_seqlens, max_len = self.embed_packed(tokens, segments, valid_lens, bucket)
        blks = list(self.blks)
        if positions is None:
            for blk in blks:
                packed = blk.forward_packed(packed, cu_seqlens, max_len)
            # While training, encoded_X[:, p] reads these packed rows (encoded_rows.py).
            return encoded_rows.attach(ops.unpack(packed, cu_seqlens, L), packed, cu_seqlens,
                                       valid_lens)
        for blk in blks[:-1]:
            packed = blk.forward_packed(packed, cu_seqlens, max_len)
        Xq, cu_seqlens_q, inside = _query_rows(packed, cu_seqlens, valid_lens, positions)
        if blks:
            Xq = blks[-1].forward_packed(packed, cu_seqlens, max_len, queries=Xq,
                                         cu_seqlens_q=cu_seqlens_q)
        return _rows_out(Xq, inside)


def _query_rows(packed, cu_seqlens, valid_lens, positions):
    """The packed rows of ``positions[B, P]`` (each sequence's own positions), the last
    block's queries: ``(Xq[B*P, C], cu_seqlens_q, inside[B, P])``.  A pad position reads row
    cu_seqlens[-1], a padding row or an appended zero row (any finite input does: its result
    is zeroed by ``_rows_out``), so even T = 0 needs no special case."""
    B, P = positions.shape
    inside = positions < valid_lens.long()[:, None]
    rows = torch.where(inside, cu_seqlens[:-1].long()[:, None] + positions,
                       cu_seqlens[-1].long())
    Xq = torch.cat([packed, packed.new_zeros(1, packed.shape[1])]).index_select(
        0, rows.reshape(-1))
    cu_seqlens_q = torch.arange(0, (B + 1) * P, P, dtype=torch.int32, device=packed.device)
    return Xq, cu_seqlens_q, inside


def _rows_out(Xq, inside):
    """The queries' rows as ``[B, P, C]``, rows at pad positions zero."""
    return Xq.reshape(inside.shape[0], inside.shape[1], -1) * inside[..., None].to(Xq.dtype)


def _plain_masklm_mlp(mlp: nn.Module) -> bool:
    """``mlp`` is d2l's ``Sequential(Linear, ReLU, LayerNorm, Linear)`` as built, with no hooks
    on it or its layers (a hook or a swapped layer must see the module calls run)."""
    if type(mlp) is not nn.Sequential or len(mlp) != 4:
        return False
    lin1, act, ln, lin2 = mlp
    if not (type(lin1) is nn.Linear and type(act) is nn.ReLU and type(ln) is nn.LayerNorm
            and type(lin2) is nn.Linear and ln.elementwise_affine):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks for m in (mlp, lin1, act, ln, lin2)) and \
        not (nn.modules.module._global_forward_hooks
             or nn.modules.module._global_forward_pre_hooks
             or nn.modules.module._global_backward_hooks
             or nn.modules.module._global_backward_pre_hooks)


class MaskLM(nn.Module):
    """The masked language model head (d2l 0.17 signature).

    ``forward`` returns the full ``[B, P, vocab]`` logits, as the book's pretraining chapter
    needs them (its loss runs on them).  With the plain d2l ``mlp`` it runs the layers through
    fastbert ops (the same parameters, so ``state_dict`` is d2l's): both Linear layers on
    :func:`fastbert.ops.linear` (cpp backend: oneDNN GEMMs, the bias added in the GEMM's
    epilogue, so the ``[B*P, vocab]`` logits are written once; the backward is one op,
    ``linear_backward``, that feeds the incoming logits gradient straight to the two GEMMs
    and the bias sum, with no autograd nodes between them).  The reference backend's
    ``linear`` is ``F.linear``: d2l's arithmetic.  The ReLU + LayerNorm between the Linear
    layers work on ``[B*P, num_hiddens]`` (about 1% of the book's pretraining step in its
    profile, benchmarks/README.md) and stay PyTorch's.

    On a fast backend, with grad on and eager, the logits come back as
    :class:`fastbert.head_logits.HeadLogits`: the same tensor to every op, except that the
    book's ``nn.CrossEntropyLoss`` on them (or on their ``reshape(-1, vocab)``) runs fused
    into this layer's backward GEMMs, without PyTorch's ``[slots, vocab]`` log-softmax and
    gradient tensors (docs/DESIGN.md, "The book's loss on the MLM logits, fused")."""

    def __init__(self, vocab_size, num_hiddens, num_inputs=768, **kwargs):
        super().__init__(**kwargs)
        self.mlp = nn.Sequential(nn.Linear(num_inputs, num_hiddens), nn.ReLU(),
                                 nn.LayerNorm(num_hiddens), nn.Linear(num_hiddens, vocab_size))

    def forward(self, X, pred_positions):
        rows = ops.gather_positions(X, pred_positions)
        if not _plain_masklm_mlp(self.mlp):
            return self.mlp(rows)
        lin1, _, ln, lin2 = self.mlp
        h = torch.relu(ops.linear(rows, lin1.weight, lin1.bias))
        h = torch.nn.functional.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        if backends.resolve_name("linear", h.device.type, h.dtype) == "reference":
            # The reference path stays PyTorch's arithmetic end to end.
            return ops.linear(h, lin2.weight, lin2.bias)
        # The logits carry their Linear layer: the book's CrossEntropyLoss on them then runs
        # fused (fastbert/head_logits.py); every other use sees the plain logits.
        return head_logits.head_logits(self, h, lin2.weight, lin2.bias)


class NextSentencePred(nn.Module):
    """The next sentence prediction head (d2l 0.17 signature)."""

    def __init__(self, num_inputs, **kwargs):
        super().__init__(**kwargs)
        self.output = nn.Linear(num_inputs, 2)

    def forward(self, X):
        return self.output(X)


class BERTModel(nn.Module):
    """The BERT model (d2l 0.17 signature; model options: see the module docstring)."""

    def __init__(self, vocab_size, num_hiddens, norm_shape, ffn_num_input, ffn_num_hiddens,
                 num_heads, num_layers, dropout, max_len=1000, key_size=768, query_size=768,
                 value_size=768, hid_in_features=768, mlm_in_features=768,
                 nsp_in_features=768, **options):
        super().__init__()
        self.encoder = BERTEncoder(vocab_size, num_hiddens, norm_shape, ffn_num_input,
                                   ffn_num_hiddens, num_heads, num_layers, dropout,
                                   max_len=max_len, key_size=key_size, query_size=query_size,
                                   value_size=value_size, **options)
        self.hidden = nn.Sequential(nn.Linear(hid_in_features, num_hiddens), nn.Tanh())
        self.mlm = MaskLM(vocab_size, num_hiddens, mlm_in_features)
        self.nsp = NextSentencePred(nsp_in_features)

    def forward(self, tokens, segments, valid_lens=None, pred_positions=None):
        encoded_X = self.encoder(tokens, segments, valid_lens)
        mlm_Y_hat = self.mlm(encoded_X, pred_positions) if pred_positions is not None else None
        # The NSP classifier reads the '<cls>' token (position 0).
        nsp_Y_hat = self.nsp(self.hidden(encoded_X[:, 0, :]))
        return encoded_X, mlm_Y_hat, nsp_Y_hat


class BERTClassifier(nn.Module):
    """The fine-tuning chapter's classifier: the pretrained encoder and ``hidden`` layer plus
    a new output layer.  The book hard-codes ``nn.Linear(256, 3)``; its input width here is
    read from ``bert.hidden`` (256 for bert.small, 768 for bert.base)."""

    def __init__(self, bert, num_classes: int = 3):
        super().__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.output = nn.Linear(bert.hidden[0].out_features, num_classes)

    def forward(self, inputs):
        tokens_X, segments_X, valid_lens_x = inputs
        enc = self.encoder
        if isinstance(enc, BERTEncoder):
            # Only the <cls> row is read: the last block runs for it alone (forward_rows at
            # position 0, without building and checking the positions).
            if type(enc).forward_rows is BERTEncoder.forward_rows:
                cls = enc._encode(tokens_X, segments_X, valid_lens_x, None, cls=True)
            else:
                cls = enc.forward_rows(tokens_X, segments_X, valid_lens_x,
                                       tokens_X.new_zeros(tokens_X.shape[0], 1))
            cls = cls[:, 0, :]
        else:
            cls = self.encoder(tokens_X, segments_X, valid_lens_x)[:, 0, :]
        # The head stays modules.  Run warm and alone it cost ~45 us either way; right after
        # a batch-1 encoder call it measured 98-175 us as modules vs 56-98 us as 2 direct
        # addmm (1-2 threads, benchmarks/README.md): 2-3% of the call, not taken yet, since
        # skipping the modules would need the plan's hook and type checks for them too.
        return self.output(self.hidden(cls))
