"""The BERT pretraining loss (the book's ``_get_batch_loss_bert``), on the fused MLM head.

Two definitions of the masked-LM loss, chosen by ``book_compatible``:

* ``False`` (the default): the weighted mean of the cross-entropy over the **real**
  prediction slots, ``sum_i w_i CE_i / sum_i w_i`` (the book's padding slots have weight 0
  and take no part).  This is what the book's code is meant to compute.  It runs on
  :func:`fastbert.ops.mlm_loss`, which gathers only the real slots and never builds the
  ``[slots, vocab]`` logits (on the ``cpp`` and ``triton`` backends).
* ``True``: exactly the book's numbers.  ``_get_batch_loss_bert`` multiplies an already
  averaged ``nn.CrossEntropyLoss()`` by the slot weights and divides by their sum, so its
  "MLM loss" is the plain mean over **all** slots, padding slots (label 0, ~31% of them on
  WikiText-2) included.  This mode runs the book's formula as written: the model's MaskLM
  head on every slot, full logits, the same arithmetic.

The NSP loss is the mean cross-entropy of the ``<cls>`` classifier in both modes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .bert import BERTEncoder

__all__ = ["bert_pretrain_loss", "mlm_head_parameters"]


def mlm_head_parameters(net: nn.Module):
    """``(w1, b1, ln_weight, ln_bias, w2, b2, eps)`` of ``net.mlm.mlp`` (d2l's MaskLM:
    Linear - ReLU - LayerNorm - Linear), with a clear error for any other head."""
    mlp = getattr(getattr(net, "mlm", None), "mlp", None)
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 4
            and isinstance(mlp[0], nn.Linear) and isinstance(mlp[1], nn.ReLU)
            and isinstance(mlp[2], nn.LayerNorm) and isinstance(mlp[3], nn.Linear)
            and mlp[0].bias is not None and mlp[3].bias is not None
            and mlp[2].weight is not None and len(mlp[2].normalized_shape) == 1):
        raise TypeError("bert_pretrain_loss needs a BERT model whose MLM head is d2l's "
                        "MaskLM: net.mlm.mlp = Sequential(Linear, ReLU, LayerNorm, Linear)")
    return (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias, mlp[3].weight,
            mlp[3].bias, mlp[2].eps)


def bert_pretrain_loss(net, vocab_size, tokens_X, segments_X, valid_lens_x, pred_positions_X,
                       mlm_weights_X, mlm_Y, nsp_y, book_compatible: bool = False):
    """``(mlm_l, nsp_l, l)`` for one pretraining batch, ``l = mlm_l + nsp_l``.

    The arguments are those of the book's ``_get_batch_loss_bert(net, loss, vocab_size,
    tokens_X, segments_X, valid_lens_x, pred_positions_X, mlm_weights_X, mlm_Y, nsp_y)``
    without ``loss`` (always ``nn.CrossEntropyLoss()``).  ``net`` is a fastbert or d2l
    ``BERTModel`` (anything with ``encoder``/``hidden``/``nsp`` and d2l's ``mlm.mlp``).

    ``book_compatible=False`` (default): ``mlm_l`` is the weighted mean over the real slots
    (weight > 0), on the fused head :func:`fastbert.ops.mlm_loss`; the encoder runs with the
    book's 1-D valid lengths (the unpadded path on fast backends).
    ``book_compatible=True``: the book's own formula, whose ``mlm_l`` is the plain mean over
    all slots including padding; use it to reproduce the book's printed losses.
    Under autocast the head runs in the autocast dtype and the losses come back in float32.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    valid_lens = valid_lens_x.reshape(-1)
    if book_compatible:
        # The book's _get_batch_loss_bert, operation for operation.
        loss = nn.CrossEntropyLoss()
        _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens, pred_positions_X)
        mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1)) * \
            mlm_weights_X.reshape(-1, 1)
        mlm_l = mlm_l.sum() / (mlm_weights_X.sum() + 1e-8)
        nsp_l = loss(nsp_Y_hat, nsp_y)
        return mlm_l, nsp_l, mlm_l + nsp_l
    w1, b1, ln_weight, ln_bias, w2, b2, eps = mlm_head_parameters(net)
    if w2.shape[0] != vocab_size:
        raise ValueError(f"vocab_size is {vocab_size} but the MLM head predicts "
                         f"{w2.shape[0]} tokens")
    encoder = getattr(net, "encoder", None)
    if isinstance(encoder, BERTEncoder) and isinstance(pred_positions_X, torch.Tensor) \
            and pred_positions_X.dim() == 2:
        # The heads read <cls> and the prediction positions only: the encoder's last block
        # runs for those rows (forward_rows), the MLM op then reads them in order.
        B, P = pred_positions_X.shape
        rows = encoder.forward_rows(tokens_X, segments_X, valid_lens, torch.cat(
            [pred_positions_X.new_zeros(B, 1), pred_positions_X], 1))
        nsp_Y_hat = net.nsp(net.hidden(rows[:, 0, :]))
        encoded_X = rows[:, 1:, :]
        pred_positions_X = torch.arange(P, device=rows.device).expand(B, P)
    else:
        # pred_positions=None: the model skips its MaskLM (the fused op replaces it).
        encoded_X, _, nsp_Y_hat = net(tokens_X, segments_X, valid_lens, None)
    mlm_l = ops.mlm_loss(encoded_X, pred_positions_X, mlm_weights_X, mlm_Y, w1, b1,
                         ln_weight, ln_bias, w2, b2, eps=eps)
    nsp_l = F.cross_entropy(nsp_Y_hat.float() if nsp_Y_hat.dtype != torch.float64
                            else nsp_Y_hat, nsp_y)
    return mlm_l, nsp_l, mlm_l + nsp_l
