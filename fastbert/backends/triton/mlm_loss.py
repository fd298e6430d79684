"""Triton glue for ``mlm_loss`` (kernels: kernels/mlm_loss.py; reference:
fastbert.backends.reference.mlm_loss).

custom_op + register_fake + register_autograd, like the other Triton ops here.  The op
mirrors the C++ one: ``mlm_loss -> (loss, lse[B, P])`` and ``mlm_loss_backward``.  Inside
the op, the real slots (weight > 0) are compacted and the small MLP (Linear - ReLU -
LayerNorm on [S, C]) runs on PyTorch's own kernels (a GEMM library's job); the Triton
kernels do the part that matters, the vocab projection and cross-entropy in VOCAB_CHUNK
columns at a time, forward and backward, without the [S, V] logits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert.kernels import mlm_loss as kernel

from ..mlm_loss_autograd import fake_backward, make_backward, setup_context

# Vocab columns per tile (a power of two >= 16; tests shrink it to get ragged chunks).
VOCAB_CHUNK = 128


def _slots(X, positions, weights):
    """Flat indices of the real slots and the rows of X.view(B*L, C) they read."""
    flat = (weights.reshape(-1) > 0).nonzero().reshape(-1)
    tokens = torch.div(flat, positions.shape[1], rounding_mode="floor") * X.shape[1] + \
        positions.reshape(-1)[flat]
    return flat, tokens


def _mlp(X, tokens, w1, b1, ln_weight, ln_bias, eps):
    H0 = X.reshape(-1, X.shape[2])[tokens]
    Z = torch.addmm(b1, H0, w1.t())
    A = torch.relu(Z)
    Hn, mean, rstd = torch.ops.aten.native_layer_norm(A, [w1.shape[0]], ln_weight, ln_bias, eps)
    return H0, Z, A, Hn, mean, rstd


@torch.library.custom_op("fastbert_triton::mlm_loss", mutates_args=())
def mlm_loss_op(X: Tensor, positions: Tensor, weights: Tensor, labels: Tensor, w1: Tensor,
                b1: Tensor, ln_weight: Tensor, ln_bias: Tensor, w2: Tensor, b2: Tensor,
                eps: float, chunk: int) -> Tuple[Tensor, Tensor]:
    acc = torch.float32
    flat, tokens = _slots(X, positions, weights)
    lse_all = torch.zeros(positions.numel(), dtype=acc, device=X.device)
    if flat.numel() == 0:
        return X.new_zeros((), dtype=acc), lse_all.view(positions.shape)
    Hn = _mlp(X, tokens, w1, b1, ln_weight, ln_bias, eps)[3]
    lse, label_logit = kernel.logsumexp_forward(Hn, w2, b2, labels.reshape(-1)[flat], chunk)
    w = weights.reshape(-1)[flat].to(acc)
    lse_all[flat] = lse
    return ((lse - label_logit) * w).sum() / w.sum(), lse_all.view(positions.shape)


@mlm_loss_op.register_fake
def _(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps, chunk):
    return X.new_empty((), dtype=torch.float32), X.new_empty(positions.shape, dtype=torch.float32)


@torch.library.custom_op("fastbert_triton::mlm_loss_backward", mutates_args=())
def mlm_loss_backward_op(grad_loss: Tensor, grad_lse: Optional[Tensor], X: Tensor,
                         positions: Tensor, weights: Tensor, labels: Tensor, w1: Tensor,
                         b1: Tensor, ln_weight: Tensor, ln_bias: Tensor, w2: Tensor, b2: Tensor,
                         eps: float, chunk: int, lse: Tensor
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = torch.float32
    flat, tokens = _slots(X, positions, weights)
    if flat.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (X, w1, b1, ln_weight, ln_bias, w2, b2))
    H0, Z, A, Hn, mean, rstd = _mlp(X, tokens, w1, b1, ln_weight, ln_bias, eps)
    y = labels.reshape(-1)[flat]
    w = weights.reshape(-1)[flat].to(acc)
    # d loss / d CE_i = grad * w_i / sum w; d CE_i / d logits = softmax - onehot(y);
    # d lse_i / d logits = softmax.
    coef = w * (grad_loss.to(acc) / w.sum())
    p_coef = coef if grad_lse is None else coef + grad_lse.reshape(-1)[flat].to(acc)
    lse_real = lse.reshape(-1)[flat].to(acc)
    dHn = kernel.grad_hidden(Hn, w2, b2, y, lse_real, coef, p_coef, chunk)
    dw2, db2 = kernel.grad_weight(Hn, w2, b2, y, lse_real, coef, p_coef, chunk)
    dA, dln_w, dln_b = torch.ops.aten.native_layer_norm_backward(
        dHn.to(X.dtype), A, [w1.shape[0]], mean, rstd, ln_weight, ln_bias, [True, True, True])
    dZ = dA.masked_fill(Z <= 0, 0)
    dX = torch.zeros_like(X)
    dX.view(-1, X.shape[2]).index_add_(0, tokens, dZ @ w1)
    return (dX, dZ.t() @ H0, dZ.sum(0, dtype=acc).to(b1.dtype), dln_w, dln_b,
            dw2.to(w2.dtype), db2.to(b2.dtype))


mlm_loss_backward_op.register_fake(fake_backward)
mlm_loss_op.register_autograd(make_backward(mlm_loss_backward_op), setup_context=setup_context)


def mlm_loss(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps):
    return mlm_loss_op(X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, eps,
                       VOCAB_CHUNK)[0]


OPS = {"mlm_loss": mlm_loss}
