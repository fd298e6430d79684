"""The ops front door: one function per hot op, one contract each (see DESIGN.md).

Every function checks its inputs once (clear ``TypeError``/``ValueError`` naming the
argument), normalizes ``valid_lens`` (float or integer, as the book stores them, to int32
on the data's device), picks a backend through :mod:`fastbert.backends` and calls it.
Backends receive checked inputs and implement exactly these semantics.

Shapes: B batch, H heads, L padded length, D head size, C hidden, T total valid tokens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends

__all__ = [
    "masked_softmax", "attention", "pack", "unpack", "varlen_attention", "add_layernorm",
    "ffn", "linear", "gather_positions", "mlm_loss", "dropout_seed", "normalize_valid_lens",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACTIVATIONS = ("relu", "gelu")


# ----------------------------------------------------------------------------- checks
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_tensor(name: str, t, ndim=None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype in {dtypes}, got {t.dtype}")


def _check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def _check_dropout(p) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    return float(p)


def normalize_valid_lens(valid_lens, n: int, n_queries: Optional[int], n_keys: int,
                         device: torch.device, name: str = "valid_lens"):
    """Check ``valid_lens`` (None, [n] or [n, n_queries]; int or float) and return it as
    int32 on ``device``.  A float length counts keys j < length, as d2l's mask does, so it
    rounds up.  Values must lie in [0, n_keys]."""
    if valid_lens is None:
        return None
    if not isinstance(valid_lens, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor, got {type(valid_lens).__name__}")
    if valid_lens.dtype == torch.bool or valid_lens.is_complex():
        raise TypeError(f"{name} must hold integer or float lengths, got {valid_lens.dtype}")
    device = torch.device(device)  # "cpu" / "cuda" (no index) name the same place as cpu / cuda:0
    if valid_lens.device.type != device.type or (
            device.index is not None and valid_lens.device.index != device.index):
        raise ValueError(f"{name} is on {valid_lens.device} but the data is on {device}")
    if valid_lens.dim() == 1:
        if valid_lens.shape[0] != n:
            raise ValueError(f"{name} of shape {tuple(valid_lens.shape)} must have {n} entries "
                             f"(one per sequence)")
    elif valid_lens.dim() == 2 and n_queries is not None:
        if tuple(valid_lens.shape) != (n, n_queries):
            raise ValueError(f"2-D {name} must have shape ({n}, {n_queries}) (one per query), "
                             f"got {tuple(valid_lens.shape)}")
    else:
        allowed = "1-D" if n_queries is None else "1-D or 2-D"
        raise ValueError(f"{name} must be {allowed}, got shape {tuple(valid_lens.shape)}")
    if valid_lens.is_floating_point():
        valid_lens = torch.ceil(valid_lens)
    lens = valid_lens.to(torch.int32)
    if not _compiling() and lens.numel() and lens.device.type != "meta":
        lo, hi = map(int, torch.aminmax(lens))  # one reduction (min and max: two)
        if lo < 0 or hi > n_keys:
            raise ValueError(f"{name} must lie in [0, {n_keys}] (the sequence length), "
                             f"got values in [{lo}, {hi}]")
    return lens.contiguous()


def dropout_seed(dropout_p: float) -> Optional[torch.Tensor]:
    """A fresh seed for a fused dropout kernel, drawn from torch's CPU generator (so
    ``torch.manual_seed`` makes runs reproducible), or None when no dropout applies."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _impl(op: str, t: torch.Tensor):
    return backends.resolve(op, t.device.type, t.dtype)


# ----------------------------------------------------------------------------- ops
def masked_softmax(X: torch.Tensor, valid_lens=None) -> torch.Tensor:
    """Softmax over the last axis of ``X[N, Lq, Lk]``; keys at or past the valid length get
    probability 0; a valid length of 0 gives a uniform row (d2l semantics, never NaN).
    Never mutates ``X``."""
    _check_tensor("X", X, ndim=3)
    vl = normalize_valid_lens(valid_lens, X.shape[0], X.shape[1], X.shape[2], X.device)
    return _impl("masked_softmax", X)(X, vl)


def attention(q, k, v, valid_lens=None, dropout_p: float = 0.0, scale: Optional[float] = None):
    """``softmax(q k^T * scale, masked) v`` for ``q[N, Lq, D]``, ``k[N, Lk, D]``,
    ``v[N, Lk, Dv]``; ``scale`` defaults to ``1/sqrt(D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=3)
    _check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    N, Lq, D = q.shape
    if k.shape[0] != N or v.shape[0] != N or k.shape[2] != D or v.shape[1] != k.shape[1]:
        raise ValueError(f"attention shapes do not agree: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    vl = normalize_valid_lens(valid_lens, N, Lq, k.shape[1], q.device)
    return _impl("attention", q)(q, k, v, vl, _check_dropout(dropout_p), scale)


def pack(X: torch.Tensor, valid_lens) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the first ``valid_lens[b]`` positions of each sequence of ``X[B, L, ...]``:
    returns ``(packed[T, ...], cu_seqlens[B+1] int32, max_len)``.

    ``max_len`` is an upper bound of the longest sequence, exact in eager: under
    ``torch.compile`` a fast backend returns the padded length L (no data-dependent int,
    so no graph break).  T is data-dependent (an unbacked size under compile)."""
    _check_tensor("X", X, ndim=None, dtypes=None)
    if X.dim() < 2:
        raise ValueError(f"X must be [B, L, ...], got shape {tuple(X.shape)}")
    vl = normalize_valid_lens(valid_lens, X.shape[0], None, X.shape[1], X.device)
    if vl is None:
        raise ValueError("pack needs valid_lens (a [B] tensor), got None")
    return _impl("pack", X)(X, vl)


def embedding_sum(ids: torch.Tensor, token_weight: torch.Tensor, segment_weight: torch.Tensor,
                  position_weight: torch.Tensor) -> torch.Tensor:
    """``token_weight[ids[:, 0]] + segment_weight[ids[:, 1]] + position_weight[ids[:, 2]]``
    for ``ids[T, 3]`` (int64: token, segment and position of each packed token) and tables
    ``[rows, C]`` of one dtype: the unpadded encoder's embedding, ``[T, C]``.  Each table gets
    the dense gradient ``nn.Embedding`` gives it (detach a table that must not train)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2 \
            or ids.shape[1] != 3:
        raise TypeError("ids must be an int64 tensor [T, 3] (token, segment, position ids), got "
                        + (f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                           else type(ids).__name__))
    tables = (("token_weight", token_weight), ("segment_weight", segment_weight),
              ("position_weight", position_weight))
    for name, t in tables:
        _check_tensor(name, t, ndim=2)
        if t.shape[1] != token_weight.shape[1] or t.dtype != token_weight.dtype:
            raise ValueError(f"{name} must be [rows, {token_weight.shape[1]}] in "
                             f"{token_weight.dtype} like token_weight, got {tuple(t.shape)} {t.dtype}")
    _check_same_device(ids=ids, token_weight=token_weight, segment_weight=segment_weight,
                       position_weight=position_weight)
    if not _compiling() and ids.numel() and ids.device.type != "meta":
        lo, hi = ids.min(0).values.tolist(), ids.max(0).values.tolist()
        for col, (name, t) in enumerate(tables):
            if lo[col] < 0 or hi[col] >= t.shape[0]:
                raise ValueError(f"ids[:, {col}] index {name}: they must lie in "
                                 f"[0, {t.shape[0] - 1}], got values in [{lo[col]}, {hi[col]}]")
    return _impl("embedding_sum", token_weight)(ids, token_weight, segment_weight, position_weight)


def _check_offsets(name: str, offsets, device, n_rows: int, rows: str,
                   max_len: Optional[int] = None, max_len_name: str = "max_len") -> None:
    """``offsets`` (cu_seqlens-like): a 1-D int32 tensor of B+1 entries on ``device`` that
    starts at 0, never decreases and ends at most at ``n_rows`` (the rows of the data it
    indexes; fewer is row padding), each sequence at most ``max_len`` long.  Kernels read
    rows through these offsets, so a bad one would read out of bounds (silently on a GPU).

    O(B): on CPU tensors a ``tolist`` and a Python pass: per call 3.8 us at B = 8, 9.7 us at
    B = 64, 25 us at B = 256 (best of 15 x 2000 calls, AVX2 EPYC, idle machine); the cpp
    varlen_attention it guards takes about 0.9 ms (backward, bf16) at B = 64's T = 1654.
    On a GPU a ``tolist`` would be a host sync per call, so there it is
    ``torch._assert_async`` on one fused condition: no sync (a bad offset fails at the next
    sync, as a device-side assert).  Skipped while torch.compile traces (the data-dependent
    reads would break the graph) and on the meta device."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int32 \
            or offsets.dim() != 1 or offsets.numel() < 1:
        got = (f"{offsets.dtype} of shape {tuple(offsets.shape)}"
               if isinstance(offsets, torch.Tensor) else type(offsets).__name__)
        raise TypeError(f"{name} must be a 1-D int32 tensor of B+1 offsets, got {got}")
    if offsets.device != device:
        raise ValueError(f"{name} is on {offsets.device} but the data is on {device}")
    if _compiling() or device.type == "meta":
        return
    if device.type != "cpu":
        _assert_offsets_async(name, offsets, n_rows, rows, max_len, max_len_name)
        return
    cu = offsets.tolist()
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {cu[0]}")
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if lens and min(lens) < 0:
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name} must be non-decreasing, got {name}[{i}] = {cu[i]} > "
                         f"{name}[{i + 1}] = {cu[i + 1]}")
    if cu[-1] > n_rows:
        raise ValueError(f"{name} must end at most at {rows} = {n_rows} (the data's rows), got "
                         f"{name}[-1] = {cu[-1]}")
    if max_len is not None and lens and max(lens) > max_len:
        raise ValueError(f"{name} holds a sequence of {max(lens)} rows, longer than "
                         f"{max_len_name} = {max_len}")


def _assert_offsets_async(name, offsets, n_rows, rows, max_len, max_len_name) -> None:
    """The checks of _check_offsets as one device-side condition: no host sync."""
    lens = offsets[1:] - offsets[:-1]
    ok = (offsets[0] == 0) & (offsets[-1] <= n_rows)
    if lens.numel():
        ok = ok & (lens.min() >= 0)
        if max_len is not None:
            ok = ok & (lens.max() <= max_len)
    torch._assert_async(ok, f"{name} must start at 0, be non-decreasing, end at most at {rows} "
                            f"= {n_rows} (the data's rows)"
                        + ("" if max_len is None else f" and hold no sequence longer than "
                                                      f"{max_len_name} = {max_len}"))


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[B, L, ...]`` with zeros at pad positions."""
    _check_tensor("packed", packed, ndim=None, dtypes=None)
    if not isinstance(L, int) or L < 0:
        raise ValueError(f"L must be a non-negative int, got {L!r}")
    _check_offsets("cu_seqlens", cu_seqlens, packed.device, packed.shape[0], "packed rows",
                   max_len=L, max_len_name="L")
    return _impl("unpack", packed)(packed, cu_seqlens, L)


def _check_cu_seqlens_q(cu_seqlens_q, cu_seqlens, Tq: int, device) -> None:
    _check_offsets("cu_seqlens_q", cu_seqlens_q, device, Tq, "Tq")
    if cu_seqlens_q.shape[0] != cu_seqlens.shape[0]:
        raise ValueError(f"cu_seqlens_q must have B+1 = {cu_seqlens.shape[0]} offsets like "
                         f"cu_seqlens, got {cu_seqlens_q.shape[0]}")


# Backends whose varlen_attention kernel takes row-padded q, k, v itself (see below): the
# cpp kernel, and the Triton kernels (zero rows past the last offset, read on the device).
_ROW_PADDING_NATIVE = {"cpp", "triton"}


def _varlen_without_row_padding(impl, q, k, v, cu_seqlens, max_len, dropout_p, scale, seed,
                                cu_seqlens_q):
    """Run a backend that expects exactly the valid rows (the reference): cut q, k, v to
    them, and give the output zero rows for the queries' padding.  Reads the offsets (a host
    sync on a GPU, as the reference's own unpack does)."""
    if _compiling():
        return None
    Tk = int(cu_seqlens[-1])
    Tq = Tk if cu_seqlens_q is None else int(cu_seqlens_q[-1])
    if Tq == q.shape[0] and Tk == k.shape[0]:
        return None
    kw = {} if cu_seqlens_q is None else {"cu_seqlens_q": cu_seqlens_q}
    out = impl(q[:Tq], k[:Tk], v[:Tk], cu_seqlens, max_len, dropout_p, scale, seed, **kw)
    return torch.cat([out, out.new_zeros((q.shape[0] - Tq,) + tuple(out.shape[1:]))])


def varlen_attention(q, k, v, cu_seqlens, max_len: int, dropout_p: float = 0.0,
                     scale: Optional[float] = None, seed=None, *, cu_seqlens_q=None):
    """Attention within each packed sequence of ``q, k, v[T, H, D]``; sequence b holds rows
    ``cu_seqlens[b]:cu_seqlens[b+1]``.  A fused backward regenerates dropout from ``seed``.

    ``max_len`` bounds every sequence's length (exact in eager, the padded L under compile).
    With ``cu_seqlens_q`` (int32 [B+1], like FlashAttention's ``cu_seqlens_q``), queries and
    keys are packed separately: ``q[Tq, H, D]``, sequence b's queries are rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and attend to its keys, rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` of ``k, v[Tk, H, D]`` (e.g. only the <cls> row of each
    sequence as a query; ``max_len`` bounds the key counts, a query count may exceed it).  A
    sequence with queries but no keys outputs zeros (zero gradients).  Returns
    ``[Tq, H, D]``.

    Row padding (every backend, every device): q, k, v may hold rows past their last offset
    (``cu_seqlens[-1]``, or ``cu_seqlens_q[-1]`` for q): they belong to no sequence, get zero
    output and zero gradients, and change nothing else (dropout included).  The unpadded
    encoder uses it to round its row count up (fastbert/bert.py)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=3)
    _check_same_device(q=q, k=k, v=v)
    if cu_seqlens_q is None:
        if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v must share shape and dtype, got {tuple(q.shape)} "
                             f"{tuple(k.shape)} {tuple(v.shape)}")
    elif not (k.shape == v.shape and q.shape[1:] == k.shape[1:]) \
            or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"with cu_seqlens_q, q [Tq, H, D] and k, v [Tk, H, D] must share H, D "
                         f"and dtype, got {tuple(q.shape)} {q.dtype}, {tuple(k.shape)} "
                         f"{k.dtype}, {tuple(v.shape)} {v.dtype}")
    if isinstance(max_len, bool) or not isinstance(max_len, (int, torch.SymInt)) or max_len < 0:
        raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
    max_len = int(max_len)
    _check_offsets("cu_seqlens", cu_seqlens, q.device, k.shape[0], "Tk", max_len=max_len)
    if cu_seqlens_q is not None:
        _check_cu_seqlens_q(cu_seqlens_q, cu_seqlens, q.shape[0], q.device)
    dropout_p = _check_dropout(dropout_p)
    if dropout_p > 0 and seed is None:
        seed = dropout_seed(dropout_p)
    impl = _impl("varlen_attention", q)
    if backends.resolve_name("varlen_attention", q.device.type, q.dtype) not in _ROW_PADDING_NATIVE:
        out = _varlen_without_row_padding(impl, q, k, v, cu_seqlens, max_len, dropout_p, scale,
                                          seed, cu_seqlens_q)
        if out is not None:
            return out
    if cu_seqlens_q is None:
        return impl(q, k, v, cu_seqlens, max_len, dropout_p, scale, seed)
    return impl(q, k, v, cu_seqlens, max_len, dropout_p, scale, seed, cu_seqlens_q=cu_seqlens_q)


def add_layernorm(x, y, weight, bias, eps: float = 1e-5, dropout_p: float = 0.0, seed=None):
    """``layer_norm(dropout(y) + x)`` over the last axis (d2l's ``AddNorm(X, Y)``)."""
    _check_tensor("x", x, ndim=None)
    _check_tensor("y", y, ndim=None)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(name, t, ndim=1)
            if t.shape[0] != C:
                raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    _check_same_device(x=x, y=y, weight=weight, bias=bias)
    dropout_p = _check_dropout(dropout_p)
    if dropout_p > 0 and seed is None:
        seed = dropout_seed(dropout_p)
    return _impl("add_layernorm", x)(x, y, weight, bias, float(eps), dropout_p, seed)


def ffn(x, w1, b1, w2, b2, activation: str = "relu"):
    """``dense2(act(dense1(x)))`` with ``nn.Linear`` weight layouts (``w1[F, C]``, ``w2[C2, F]``)."""
    _check_tensor("x", x, ndim=None)
    _check_tensor("w1", w1, ndim=2)
    _check_tensor("w2", w2, ndim=2)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if w1.shape[1] != x.shape[-1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"ffn shapes do not agree: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (n,)):
            raise ValueError(f"{name} must be None or a tensor of shape ({n},)")
    _check_same_device(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    return _impl("ffn", x)(x, w1, b1, w2, b2, activation)


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` (``F.linear``): ``x[..., K]``, ``weight[N, K]``, ``bias[N]`` or None."""
    _check_tensor("x", x, ndim=None)
    _check_tensor("weight", weight, ndim=2)
    if x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear shapes do not agree: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")
    _check_same_device(x=x, weight=weight, bias=bias)
    return _impl("linear", x)(x, weight, bias)


def check_positions(positions, batch: int, length: int, device: torch.device,
                    name: str = "pred_positions") -> None:
    """``positions`` indexes ``[batch, length]`` sequences: an integer ``[batch, P]`` tensor on
    ``device`` with values in ``[0, length)`` (the range check is skipped while compiling)."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 \
            or positions.is_floating_point() or positions.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape [B, P]")
    if positions.shape[0] != batch:
        raise ValueError(f"{name} must have one row per sequence: {positions.shape[0]} rows "
                         f"for a batch of {batch}")
    if positions.device != device:
        raise ValueError(f"{name} is on {positions.device} but the data is on {device}")
    if not _compiling() and positions.numel() and positions.device.type != "meta":
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= length:
            raise ValueError(f"{name} must lie in [0, {length - 1}], got values in [{lo}, {hi}]")


def gather_positions(X: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``X[b, positions[b, p]]`` as ``[B, P, C]`` (the MLM gather); positions may repeat,
    the backward scatter-adds."""
    _check_tensor("X", X, ndim=3)
    check_positions(positions, X.shape[0], X.shape[1], X.device)
    return _impl("gather_positions", X)(X, positions)


def _check_index(name: str, t, shape, device) -> None:
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() \
            or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape {shape}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but X is on {device}")


def mlm_loss(X, pred_positions, mlm_weights, labels, w1, b1, ln_weight, ln_bias, w2, b2,
             eps: float = 1e-5) -> torch.Tensor:
    """The masked-LM head and its loss in one op, on the real prediction slots only.

    ``X[B, L, C]`` is the encoder output; ``pred_positions``, ``mlm_weights`` and ``labels``
    are ``[B, P]`` (the book's ``pred_positions_X``, ``mlm_weights_X``, ``mlm_Y``).  A slot is
    real when its weight is > 0 (the book pads with weight 0).  For each real slot ``i`` (row
    ``b``, slot ``p``), with d2l's ``MaskLM.mlp`` = Linear(C, C') - ReLU - LayerNorm(C', eps)
    - Linear(C', V) given by ``w1[C', C], b1[C'], ln_weight[C'], ln_bias[C'], w2[V, C'],
    b2[V]``::

        h_i  = LayerNorm(relu(X[b, pred_positions[b, p]] @ w1.T + b1)) * ln_weight + ln_bias
        CE_i = logsumexp(h_i @ w2.T + b2) - (h_i @ w2[labels[b, p]] + b2[labels[b, p]])

    Returns the weighted mean ``sum_i w_i CE_i / sum_i w_i`` over the real slots as a 0-d
    tensor (float32; float64 for float64 inputs), or 0 when no slot is real.  Padding slots
    cost nothing and get no gradient; fast backends never build the ``[slots, V]`` logits
    (vocab chunks, online logsumexp in float32).  Differentiable in ``X`` and every head
    parameter.  Floating inputs share one dtype; under autocast they are cast to the
    autocast dtype first (as ``nn.Linear`` would be).  Labels of padding slots are ignored.
    """
    _check_tensor("X", X, ndim=3)
    device = X.device
    autocasting = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
    if autocasting and X.dtype != torch.float64:
        lowp = torch.get_autocast_dtype(device.type)
        X, w1, b1, ln_weight, ln_bias, w2, b2 = (
            t.to(lowp) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (X, w1, b1, ln_weight, ln_bias, w2, b2))
    B, L, C = X.shape
    if not isinstance(pred_positions, torch.Tensor) or pred_positions.dim() != 2:
        raise ValueError("pred_positions must be an integer tensor of shape [B, P]")
    P = pred_positions.shape[1]
    _check_index("pred_positions", pred_positions, (B, P), device)
    _check_index("labels", labels, (B, P), device)
    _check_tensor("mlm_weights", mlm_weights, ndim=2)
    if tuple(mlm_weights.shape) != (B, P):
        raise ValueError(f"mlm_weights must have shape {(B, P)}, got {tuple(mlm_weights.shape)}")
    for name, t, ndim in (("w1", w1, 2), ("b1", b1, 1), ("ln_weight", ln_weight, 1),
                          ("ln_bias", ln_bias, 1), ("w2", w2, 2), ("b2", b2, 1)):
        _check_tensor(name, t, ndim=ndim)
        if t.dtype != X.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but X has {X.dtype}: the head's "
                            f"floating inputs must share a dtype")
    _check_same_device(X=X, mlm_weights=mlm_weights, w1=w1, b1=b1, ln_weight=ln_weight,
                       ln_bias=ln_bias, w2=w2, b2=b2)
    H, V = w1.shape[0], w2.shape[0]
    if w1.shape[1] != C or w2.shape[1] != H or b1.shape[0] != H or ln_weight.shape[0] != H \
            or ln_bias.shape[0] != H or b2.shape[0] != V:
        raise ValueError(f"MLM head shapes do not agree: X {tuple(X.shape)}, w1 "
                         f"{tuple(w1.shape)}, b1 {tuple(b1.shape)}, ln_weight "
                         f"{tuple(ln_weight.shape)}, ln_bias {tuple(ln_bias.shape)}, w2 "
                         f"{tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    positions = pred_positions.long().contiguous()
    labels = labels.long().contiguous()
    weights = mlm_weights.to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    weights = weights.contiguous()
    if not _compiling() and weights.numel() and device.type != "meta":
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("mlm_weights must be finite and >= 0 (0 marks a padding slot)")
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= L:
            raise ValueError(f"pred_positions must lie in [0, {L - 1}], got values in "
                             f"[{lo}, {hi}]")
        real_labels = labels[weights > 0]
        if real_labels.numel() and (int(real_labels.min()) < 0 or int(real_labels.max()) >= V):
            raise ValueError(f"labels of real slots must lie in [0, {V - 1}] (the vocab), got "
                             f"values in [{int(real_labels.min())}, {int(real_labels.max())}]")
    args = (X, positions, weights, labels, w1, b1, ln_weight, ln_bias, w2, b2, float(eps))
    if autocasting:  # the inputs are cast already; the kernels pick their own precision
        with torch.autocast(device.type, enabled=False):
            return _impl("mlm_loss", X)(*args)
    return _impl("mlm_loss", X)(*args)
