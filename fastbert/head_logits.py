"""MLM logits that know the Linear layer they came from, so that the book's own loss on them
runs fused.

Why: the book's pretraining loop (d2l ``_get_batch_loss_bert``) takes the full
``mlm_Y_hat[B, P, vocab]`` from ``net(...)`` and applies its own ``nn.CrossEntropyLoss()`` to
``mlm_Y_hat.reshape(-1, vocab_size)``.  PyTorch's cross-entropy then writes a
``log_softmax`` copy of the logits, a zero-filled ``[slots, vocab]`` gradient for
``nll_loss``, the ``log_softmax`` backward's ``[slots, vocab]`` gradient, and the head's
Linear reads that back for its two backward GEMMs: four passes over (at batch 512, vocab
20,256) 415 MB tensors, each freshly page-faulted, ~25% of the chapter's step.

What: :class:`HeadLogits` is the logits tensor itself (the same values, storage and autograd
history; every op sees a plain tensor), plus a reference to the head's last Linear layer and
its input.  Only ``F.cross_entropy`` (which ``nn.CrossEntropyLoss`` calls) on the logits, or
on their ``reshape``/``view`` to ``[slots, vocab]``, is handled here: the loss is
``logsumexp(row) - row[target]`` read from the stored logits, and its backward walks the vocab
in column chunks, ``p = softmax - onehot`` scaled per row, straight into the Linear's GEMMs
(``dH += p @ W_chunk``, ``dW_chunk = p^T H``, ``db_chunk = sum p``): the ``[slots, vocab]``
gradient never exists.  The same math as autograd through ``F.linear`` + ``F.cross_entropy``,
one chunk-sized buffer instead of three full-size tensors.

Anything else falls back to PyTorch's own ``cross_entropy`` on the plain logits (so nothing is
ever wrong, only not fused): class weights, label smoothing, probability targets, a
``[B, vocab, ...]`` layout, grad off, autocast on, or logits changed in place since the head
wrote them.  :func:`why_not_fused` says which.

The reference is PyTorch's ``F.cross_entropy`` on the plain logits (autograd through the
Linear layer); tests/test_head_logits.py checks the fused path against it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import ops
from .routed_tensor import RoutedTensor

__all__ = ["HeadLogits", "head_logits", "attach_head", "why_not_fused"]

# Vocab columns per backward chunk: [slots, 1024] fp32 is 21 MB at 5,120 slots, one buffer
# reused across chunks (glibc keeps blocks under its 32 MB mmap ceiling, so it is not
# page-faulted anew each step), and each chunk's three GEMMs have K or N = 1024.
CHUNK_COLUMNS = 1024
# Rows per logsumexp call in the forward: its temporaries stay at 256 x vocab.
LSE_ROWS = 256

_RESHAPES = (torch.Tensor.reshape, torch.Tensor.view, torch.reshape)

# Logits of at least this size are written into a buffer the head keeps between steps.  glibc
# maps a block that large afresh on every allocation and unmaps it on free, so a new logits
# tensor is page-faulted in each step: [5120, 20256] fp32 (the book's batch) took 0.45-0.53 s
# to compute fresh and 0.23-0.29 s into a reused buffer (AVX2 EPYC, 2 threads), ~10% of the
# book's pretraining step.
POOL_BYTES = 64 << 20
# head module -> its buffer (an UntypedStorage), keyed weakly (no state_dict entry, nothing
# pickled or deep-copied), freed with the module; one lock guards the use-count check.
_POOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_POOLS_LOCK = threading.Lock()


def head_logits(owner, hidden: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``ops.linear(hidden, weight, bias)``: the MLM head's ``[..., vocab]`` logits, as
    :class:`HeadLogits` where the fused loss may apply (:func:`attach_head`), written into
    ``owner``'s reused buffer when they are large and nothing else holds the previous ones
    (grad on, eager, CPU float32, no autocast: the training step)."""
    rows = hidden.numel() // max(1, hidden.shape[-1])
    n_bytes = rows * weight.shape[0] * hidden.element_size()
    if (n_bytes < POOL_BYTES or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or hidden.device.type != "cpu" or hidden.dtype != torch.float32
            or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)
            or torch.is_autocast_enabled("cpu")):
        return attach_head(ops.linear(hidden, weight, bias), hidden, weight, bias)
    x2d = hidden.reshape(-1, hidden.shape[-1])
    out = _pooled_output(owner, (rows, weight.shape[0]), hidden.dtype, n_bytes)
    logits = _LinearInto.apply(x2d, weight, bias, out)
    return attach_head(logits.view(tuple(hidden.shape[:-1]) + (weight.shape[0],)), hidden,
                       weight, bias)


def _pooled_output(owner, shape, dtype, need: int) -> torch.Tensor:
    """An uninitialized ``shape`` tensor on ``owner``'s buffer when no tensor still uses it
    (storage use count 1: only the pool), else on a new buffer that becomes the pool's;
    ``need`` is the tensor's size in bytes."""
    with _POOLS_LOCK:
        entry = _POOLS.get(owner)
        if entry is None or torch._C._storage_Use_Count(entry._cdata) != 1 \
                or not need <= entry.nbytes() <= 2 * need:
            entry = torch.empty(need, dtype=torch.uint8).untyped_storage()
            _POOLS[owner] = entry
        # The view is made under the lock: from here the use count is 2 and no other thread
        # can take the same buffer.
        return torch.empty(0, dtype=dtype).set_(entry, 0, shape)


class _LinearInto(torch.autograd.Function):
    """``x @ w^T + b`` written into ``out`` (a buffer, not an autograd input).  The backward
    is F.linear's (it runs only when something other than the fused cross-entropy reads the
    logits)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out):
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (grad @ weight if need_x else None, grad.t() @ x if need_w else None,
                grad.sum(0) if need_b and ctx.has_bias else None, None)


class HeadLogits(RoutedTensor):
    """The ``[..., vocab]`` output of ``hidden @ weight^T + bias``, with (hidden, weight, bias)
    attached.  See the module docstring."""

    ROUTES = {F.cross_entropy: "_cross_entropy"}
    KEEPS = _RESHAPES

    @staticmethod
    def _cross_entropy(args, kwargs):
        reason, prepared = _fused_call(args, kwargs)
        return NotImplemented if reason is not None else _LinearCrossEntropy.apply(*prepared)

    def _keep(self, out):
        """``out`` (a reshape of self) as HeadLogits when it is still the whole logits with
        the vocab last, so the loss can find the head; else the plain tensor."""
        if (isinstance(out, torch.Tensor) and type(out) is torch.Tensor and out.dim() >= 1
                and out.shape[-1] == self.shape[-1] and out.data_ptr() == self.data_ptr()
                and out.is_contiguous() and self.is_contiguous()):
            return HeadLogits.wrap(out, self._fastbert_attached)
        return out


def attach_head(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``logits`` (``= hidden @ weight^T + bias``, just computed) as :class:`HeadLogits`: the
    same tensor for every op, its cross-entropy fused.  Returns ``logits`` unchanged where the
    fused loss would not apply anyway (see :func:`why_not_fused`)."""
    if torch.compiler.is_compiling() or not logits.requires_grad or not logits.is_contiguous():
        return logits
    return HeadLogits.wrap(logits, (hidden, weight, bias, logits._version, logits.data_ptr()))


def why_not_fused(logits, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0) -> Optional[str]:
    """Why ``F.cross_entropy(logits, target, ...)`` would run unfused (None: it runs fused)."""
    return _fused_call((logits, target, weight, size_average, ignore_index, reduce, reduction,
                        label_smoothing), {})[0]


_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
            "label_smoothing")
_CE_DEFAULTS = {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
                "reduction": "mean", "label_smoothing": 0.0}


def _fused_call(args, kwargs):
    """``(None, apply-args)`` when this cross_entropy call can run fused, else
    ``(reason, None)``."""
    call = dict(_CE_DEFAULTS)
    call.update(zip(_CE_ARGS, args))
    call.update(kwargs)
    logits, target = call.get("input"), call.get("target")
    if not isinstance(logits, HeadLogits):
        return "the input is not the MLM head's logits", None
    hidden, weight, bias, version, data_ptr = logits._fastbert_attached
    if call["weight"] is not None or call["label_smoothing"] != 0.0:
        return "class weights or label smoothing", None
    if call["size_average"] is not None or call["reduce"] is not None:
        return "the deprecated size_average/reduce arguments", None
    if call["reduction"] not in ("mean", "sum", "none"):
        return f"reduction {call['reduction']!r}", None
    V = weight.shape[0]
    if logits.dim() != 2 or logits.shape[1] != V or logits.data_ptr() != data_ptr:
        return "the logits are not [slots, vocab] (reshape(-1, vocab) of the head's output)", None
    if logits._version != version:
        return "the logits were changed in place after the head wrote them", None
    if not (isinstance(target, torch.Tensor) and target.dtype == torch.int64
            and target.shape == (logits.shape[0],) and target.device == logits.device):
        return "the target is not int64 class indices [slots] on the logits' device", None
    if not torch.is_grad_enabled():
        return "grad mode is off (nothing to save)", None
    if torch.is_autocast_enabled(logits.device.type):
        return "autocast is on", None
    if logits.dtype not in (torch.float32, torch.float64) or logits.device.type != "cpu":
        return f"{logits.dtype} on {logits.device.type} (fused: float32/float64 on the CPU)", None
    if hidden.numel() != logits.shape[0] * weight.shape[1]:
        return "the attached head input does not match the logits", None
    return None, (logits.plain().detach(), hidden.reshape(-1, weight.shape[1]), weight, bias,
                  target, int(call["ignore_index"]), call["reduction"])


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight^T + bias, target) with the logits given (already
    computed): forward reads them once (row logsumexp), backward feeds softmax - onehot to the
    Linear's GEMMs chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, hidden, weight, bias, target, ignore_index, reduction):
        N, V = logits.shape
        keep = target != ignore_index
        picked_target = torch.where(keep, target, 0)
        if N and bool(((picked_target < 0) | (picked_target >= V)).any()):
            bad = target[keep & ((target < 0) | (target >= V))][0].item()
            raise IndexError(f"Target {bad} is out of bounds.")
        lse = torch.empty(N, dtype=logits.dtype, device=logits.device)
        for r0 in range(0, N, LSE_ROWS):
            torch.logsumexp(logits[r0:r0 + LSE_ROWS], 1, out=lse[r0:r0 + LSE_ROWS])
        row_loss = (lse - logits.gather(1, picked_target[:, None])[:, 0]) * keep
        ctx.save_for_backward(logits, hidden, weight, picked_target, keep, lse)
        ctx.has_bias, ctx.reduction = bias is not None, reduction
        if reduction == "none":
            return row_loss
        total = row_loss.sum()
        # PyTorch's mean is over the rows not ignored (0/0 = nan when all are).
        return total / keep.sum() if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, hidden, weight, target, keep, lse = ctx.saved_tensors
        N, V = logits.shape
        if ctx.reduction == "mean":
            coef = keep * (grad / keep.sum())
        else:  # sum: a scalar grad; none: one per row
            coef = keep * grad
        coef = coef.to(logits.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        d_hidden = torch.zeros_like(hidden) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        d_bias = torch.empty(V, dtype=weight.dtype, device=weight.device) \
            if need_b and ctx.has_bias else None
        # -coef at each row's target column: the onehot part of dlogits, applied per chunk.
        rows = torch.arange(N, device=logits.device)
        chunk = torch.empty(N, min(CHUNK_COLUMNS, V), dtype=logits.dtype, device=logits.device)
        for c0 in range(0, V, CHUNK_COLUMNS):
            c1 = min(V, c0 + CHUNK_COLUMNS)
            p = chunk[:, :c1 - c0]
            torch.sub(logits[:, c0:c1], lse[:, None], out=p).exp_().mul_(coef[:, None])
            here = (target >= c0) & (target < c1)
            p.index_put_((rows[here], target[here] - c0), -coef[here], accumulate=True)
            if d_hidden is not None:
                d_hidden.addmm_(p, weight[c0:c1])
            if d_weight is not None:
                torch.mm(p.t(), hidden, out=d_weight[c0:c1])
            if d_bias is not None:
                torch.sum(p, 0, out=d_bias[c0:c1])
        return None, d_hidden, d_weight, d_bias, None, None, None
