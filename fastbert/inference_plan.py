"""The unpadded encoder's forward without autograd, in as few calls as possible.

Why: at batch 1 (one SNLI pair per call, ~27 tokens, bert.small) the module path's GEMMs
take ~1.3 ms and everything else (nn.Module calls, the ops front door's argument checks,
backend resolution, kernel-call wrappers, ~250 small ATen calls) about as much again.  The
plan runs the same kernels straight: one ``torch.ops.fastbert`` call per fused op, ``addmm``
on weights prepared once (the QKV concatenation, transposed views), the last block for the
wanted rows only.  It is the same arithmetic as the module path (the cpp glue runs GEMMs of at most
``SMALL_GEMM_ROWS`` rows on ``F.linear``, i.e. ``addmm``), not a second model.

When it runs (``BERTEncoder._encode`` asks it first; otherwise the module path runs,
unchanged): grad off (``no_grad`` / ``inference_mode``), not under torch.compile or
autocast, CPU, fp32, the backend for every op it calls is ``cpp``, valid_lens None or 1-D,
at most ``SMALL_GEMM_ROWS`` valid tokens (above that the module path's oneDNN GEMMs win and
the overhead is a small share; see benchmarks/README.md), the module tree as the model
builds it (exact types, 1-D LayerNorms, no hooks anywhere, no ``keep_attention_weights``,
no lazy parameters, eval mode or dropout 0).  :func:`why_not` says why it would not run;
:data:`RUNS` counts its runs; ``FASTBERT_INFERENCE_PLAN=0`` (or ``ENABLED = False``) turns
it off.

The prepared weights are kept per encoder (a weak reference: no state_dict entry, nothing
pickled) and rebuilt when any parameter's ``(data_ptr, _version)`` or the module tree
changes: ``load_state_dict``, ``.to()``, optimizer steps and in-place updates all bump one
of those (writes through ``param.data`` do not bump ``_version``: as for
``MultiHeadAttention._cat``, whose QKV copy the plan shares).
"""
from __future__ import annotations

import math
import operator
import os
import weakref
from itertools import chain
from typing import Optional

import torch
from torch import nn

from . import backends
from .backends.kernel_call import SMALL_GEMM_ROWS

__all__ = ["why_not", "RUNS", "ENABLED"]

ENABLED = os.environ.get("FASTBERT_INFERENCE_PLAN", "1") != "0"
RUNS = 0  # encoder forwards the plan ran (tests and benchmarks read it)
# The cpp ops the plan calls, whose backend must resolve to "cpp".
OPS = ("pack", "unpack", "embedding_sum", "varlen_attention", "add_layernorm", "linear", "ffn")
# At most this many valid tokens (packed rows) per call.  Up to SMALL_GEMM_ROWS the module
# path's GEMMs run on addmm too (backends/kernel_call.py): the same arithmetic, in fewer
# calls.  Above it the module path's oneDNN GEMMs are faster than addmm and the overhead the
# plan saves is a small share: measured 2026-12-03 (bert.small, 1 thread, SNLI lengths,
# interleaved), plan forced / module path: see benchmarks/README.md.
MAX_ROWS = SMALL_GEMM_ROWS
_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Plan]" = weakref.WeakKeyDictionary()
_CU_ONE = torch.tensor([0, 1], dtype=torch.int32)  # cu_seqlens_q of one <cls> query
_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")
_HOOK_GLOBALS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> bool:
    mod = nn.modules.module
    return any(getattr(mod, name) for name in _HOOK_GLOBALS)


class _Unsupported(Exception):
    pass


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise _Unsupported(why)


def _plain_linear(m, name: str, in_features: int) -> None:
    _require(type(m) is nn.Linear, f"{name} is {type(m).__name__}, not nn.Linear")
    _require(not isinstance(m.weight, nn.parameter.UninitializedParameter),
             f"{name} is not initialized (lazy)")
    _require(m.in_features == in_features, f"{name} takes {m.in_features} features, not "
                                           f"{in_features}")


def _plain_norm(m, name: str, C: int) -> None:
    _require(type(m) is nn.LayerNorm, f"{name} is {type(m).__name__}, not nn.LayerNorm")
    _require(tuple(m.normalized_shape) == (C,), f"{name} normalizes {m.normalized_shape}, "
                                                f"not ({C},)")


class _Plan:
    """The encoder's modules as checked, and its weights as the plan's calls take them."""

    def __init__(self, enc: nn.Module):
        from .bert import BERTEncoder
        from .layers import (AddNorm, DotProductAttention, EncoderBlock, MultiHeadAttention,
                             PositionWiseFFN)
        _require(type(enc) is BERTEncoder, f"the encoder is {type(enc).__name__}")
        te, se = enc.token_embedding, enc.segment_embedding
        _require(type(te) is nn.Embedding and type(se) is nn.Embedding,
                 "an embedding is not nn.Embedding")
        C = te.embedding_dim
        self.modules = list(enc.modules())
        # Registering a hook fills one of these dicts in place.
        self.hook_dicts = [d for m in self.modules for d in (
            m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)]
        # The tree as built: a submodule swapped or added anywhere makes a new plan.
        self.tree = [(m._modules, tuple(map(id, m._modules.values())))
                     for m in self.modules if m._modules]
        self.params = [(m._parameters, n) for m in self.modules for n in m._parameters]
        _require(len(enc.blks) > 0, "the encoder has no blocks")
        for d, n in self.params:
            p = d[n]
            _require(p is None or not isinstance(p, nn.parameter.UninitializedParameter),
                     "a parameter is not initialized (lazy)")
            _require(p is None or (p.dtype == torch.float32 and p.device.type == "cpu"),
                     "a parameter is not a float32 CPU tensor")
        self.dropouts = []  # (module whose `training` decides, its dropout)
        self.attention = []
        self.embed = (te.weight, se.weight, enc.pos_embedding[0])
        self.positions = torch.arange(enc.pos_embedding.shape[1])
        self.embed_norm = None
        if enc.embedding_norm is not None:
            _plain_norm(enc.embedding_norm, "embedding_norm", C)
            _require(type(enc.embedding_dropout) is nn.Dropout, "embedding_dropout is not "
                                                                "nn.Dropout")
            self.dropouts.append((enc.embedding_dropout, enc.embedding_dropout))
            n = enc.embedding_norm
            self.embed_norm = ((C,), n.weight, n.bias, n.eps)
        self.layers = []
        blks = enc.blks
        _require(type(blks) is nn.Sequential, "blks is not nn.Sequential")
        for i, blk in enumerate(blks):
            _require(type(blk) is EncoderBlock, f"block {i} is {type(blk).__name__}")
            a, an1, ffn, an2 = blk.attention, blk.addnorm1, blk.ffn, blk.addnorm2
            _require(type(a) is MultiHeadAttention and type(a.attention) is DotProductAttention
                     and type(an1) is AddNorm and type(an2) is AddNorm
                     and type(ffn) is PositionWiseFFN, f"block {i} holds a replaced layer")
            projections = (a.W_q, a.W_k, a.W_v, a.W_o)
            for name, m in zip(("W_q", "W_k", "W_v", "W_o"), projections):
                _plain_linear(m, f"block {i} {name}", C)
                _require(m.out_features == C, f"block {i} {name} gives {m.out_features} "
                                              f"features, not {C}")
            _require(len({m.bias is None for m in projections[:3]}) == 1,
                     f"block {i}: W_q, W_k, W_v do not all have (or lack) a bias")
            _plain_linear(ffn.dense1, f"block {i} ffn.dense1", C)
            _plain_linear(ffn.dense2, f"block {i} ffn.dense2", ffn.dense1.out_features)
            _require(ffn.dense2.out_features == C, f"block {i} ffn.dense2 gives "
                                                   f"{ffn.dense2.out_features} features")
            _require(ffn.activation in ("relu", "gelu"), f"block {i} activation "
                                                         f"{ffn.activation!r}")
            _plain_norm(an1.ln, f"block {i} addnorm1.ln", C)
            _plain_norm(an2.ln, f"block {i} addnorm2.ln", C)
            self.dropouts += [(a, a.attention.dropout), (an1, an1.dropout),
                              (an2, an2.dropout)]
            self.attention.append(a.attention)
            H = a.num_heads
            _require(C % H == 0, f"block {i}: {H} heads do not divide {C}")
            # Weights: transposed views of the nn.Linear layout ([N, K].t()), the QKV one of
            # the module path's cached concatenation (one copy serves both paths).  Contiguous
            # [K, N] copies measured 0.91-1.00x the call's time (2026-12-03, bert.small, 1
            # thread, whole plan call, 24 interleaved A/B pairs over L = 20/27/40, quartiles
            # 0.96-1.04) for one more copy of every weight: not worth the memory.
            wqkv = a._cat("qkv", [a.W_q.weight, a.W_k.weight, a.W_v.weight]).t()
            bqkv = None if a.W_q.bias is None else a._cat(
                "qkv_bias", [a.W_q.bias, a.W_k.bias, a.W_v.bias])
            self.layers.append(dict(
                H=H, scale=1.0 / math.sqrt(C // H),
                wqkv=wqkv, bqkv=bqkv,
                # The last block's <cls>-only path: q for the wanted rows, k, v for all.
                wq=wqkv[:, :C], bq=None if bqkv is None else bqkv[:C],
                wkv=wqkv[:, C:], bkv=None if bqkv is None else bqkv[C:],
                wo=a.W_o.weight.t(), bo=a.W_o.bias,
                ln1=(an1.ln.weight, an1.ln.bias, float(an1.ln.eps)),
                w1=ffn.dense1.weight.t(), b1=ffn.dense1.bias,
                gelu=ffn.activation == "gelu",
                w2=ffn.dense2.weight.t(), b2=ffn.dense2.bias,
                ln2=(an2.ln.weight, an2.ln.bias, float(an2.ln.eps))))
        # The staleness check (current()), at C speed: every child and parameter slot holds
        # the object it held, and every parameter its (data_ptr, _version).
        self.child_dicts = [d for d, _ in self.tree]
        self.children = list(chain.from_iterable(map(dict.values, self.child_dicts)))
        self.param_dicts = [m._parameters for m in self.modules]
        self.slots = list(chain.from_iterable(map(dict.values, self.param_dicts)))
        self.tensors = [p for p in self.slots if p is not None]
        self.key = self.weights_key()

    def weights_key(self):
        # (data_ptrs, _versions): ~2 us for bert.small's 35 parameters (a list comprehension
        # of (data_ptr, _version) pairs over the dicts took 7-17 us).
        return (list(map(_DATA_PTR, self.tensors)), list(map(_VERSION, self.tensors)))

    def current(self) -> bool:
        """The tree and every weight are what the plan was built from."""
        slots, children = self.slots, self.children
        return (sum(map(len, self.child_dicts)) == len(children)
                and all(map(operator.is_, chain.from_iterable(
                    map(dict.values, self.child_dicts)), children))
                and sum(map(len, self.param_dicts)) == len(slots)
                and all(map(operator.is_, chain.from_iterable(
                    map(dict.values, self.param_dicts)), slots))
                and self.weights_key() == self.key)

    def reason(self) -> Optional[str]:
        """Why the (current) plan must not run now, or None."""
        if any(self.hook_dicts):
            m = next(m for m in self.modules if _hooked(m))
            return f"a hook is registered on {type(m).__name__}"
        for owner, d in self.dropouts:
            if owner.training and d.p > 0:
                return f"{type(owner).__name__} is in training mode with dropout {d.p}"
        from .layers import keep_weights_ever_set
        if keep_weights_ever_set() and any(m.keep_weights for m in self.attention):
            return "keep_attention_weights is on (the weights need the padded path)"
        return None


def _plan(enc: nn.Module):
    """``(plan, None)`` or ``(None, why not)`` for the encoder as it is now."""
    plan = _PLANS.get(enc)
    if plan is None or not plan.current():
        try:
            with torch.no_grad():  # the shared QKV cache fills only with grad off
                plan = _Plan(enc)
        except _Unsupported as exc:
            _PLANS.pop(enc, None)
            return None, str(exc)
        _PLANS[enc] = plan
    why = plan.reason()
    return (None, why) if why else (plan, None)


def _call_reason(enc: nn.Module, device: torch.device) -> Optional[str]:
    """The checks that do not depend on the tree: mode, device, backends."""
    if not ENABLED:
        return "turned off (FASTBERT_INFERENCE_PLAN=0 or inference_plan.ENABLED = False)"
    if torch.is_grad_enabled():
        return "grad mode is on (the plan records no graph)"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (it compiles the module path)"
    if device.type != "cpu":
        return f"the data is on {device}, not the CPU"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    if _global_hooks():
        return "a global module hook is registered"
    if enc.unpadded is False:
        return "the encoder was built with unpadded=False"
    choice = backends.get_backend()
    for op in OPS:
        name = backends._resolve_choice(choice, op, "cpu", torch.float32)
        if name != "cpp":
            return f"the backend for '{op}' is '{name}', not 'cpp'"
    return None


def _encoder_of(model: nn.Module) -> nn.Module:
    return model if hasattr(model, "blks") else model.encoder


def why_not(model: nn.Module, inputs=None) -> Optional[str]:
    """Why a call of ``model`` (a BERTEncoder, BERTModel or BERTClassifier) here, in the
    current grad mode and backend selection, would not run the inference plan; None when it
    would.  With ``inputs`` (``(tokens, segments, valid_lens)``), their checks too."""
    enc = _encoder_of(model)
    why = _call_reason(enc, enc.token_embedding.weight.device)
    if why is None:
        why = _plan(enc)[1]
    if why is None and inputs is not None:
        tokens, _, valid_lens = inputs
        if tokens.device.type != "cpu":
            return f"the tokens are on {tokens.device}, not the CPU"
        if valid_lens is not None and valid_lens.dim() != 1:
            return "valid_lens is not 1-D (per-query lengths need the padded attention)"
        T = tokens.numel() if valid_lens is None else int(valid_lens.float().ceil().sum())
        if not 0 < T <= MAX_ROWS:
            return f"{T} valid tokens, not in [1, MAX_ROWS = {MAX_ROWS}]"
    return why


def _mm(bias, x, w_t):
    return torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)


def encode(enc, tokens, segments, valid_lens, positions, cls: bool = False):
    """What ``BERTEncoder._encode`` returns (every row ``[B, L, C]``, or the rows of
    ``positions[B, P]`` as ``[B, P, C]``; ``cls``: positions is None and row 0 of each
    sequence is wanted), or None when the plan does not apply.  Inputs are checked already
    (valid_lens int32 or None, positions in range)."""
    global RUNS
    from . import bert
    if torch.is_grad_enabled() or not ENABLED or torch.compiler.is_compiling():
        return None  # training, or torch.compile tracing the module path: before any
        # data-dependent check below (int(valid_lens.sum()) would break the graph)
    B, L = tokens.shape
    if L == 0 or (valid_lens is not None and valid_lens.dim() != 1):
        return None
    if B * L > MAX_ROWS and (valid_lens is None or int(valid_lens.sum()) > MAX_ROWS):
        return None  # a big batch: declined for ~5 us
    if cls and B > 1:
        positions = tokens.new_zeros(B, 1, dtype=torch.long)
    if _call_reason(enc, tokens.device) is not None:
        return None
    plan, _ = _plan(enc)
    if plan is None:
        return None
    kernels = torch.ops.fastbert
    with torch._C._AutoDispatchBelowAutograd():
        ids = torch.stack((tokens.long(), segments.long(), plan.positions[:L].expand(B, L)), -1)
        if valid_lens is None:
            T = B * L
            ids = ids.view(T, 3)
            cu = torch.arange(0, T + 1, L, dtype=torch.int32)
        else:
            ids, cu = kernels.pack(ids, valid_lens)
            T = ids.shape[0]
            if T == 0:
                return None
        X = kernels.embedding_sum(ids, *plan.embed)
        if plan.embed_norm is not None:
            X = torch.layer_norm(X, *plan.embed_norm)
        C = X.shape[1]
        last = len(plan.layers) - 1
        for i, p in enumerate(plan.layers):
            H = p["H"]
            if i < last or (positions is None and not cls):
                q, k, v = _mm(p["bqkv"], X, p["wqkv"]).view(T, 3, H, -1).unbind(1)
                cu_q, residual = None, X
            else:  # the last block, for the wanted rows only
                if positions is None:  # <cls> of the one sequence (T > 0): row 0
                    residual, cu_q, inside = X[:1], _CU_ONE, None
                else:
                    if valid_lens is None:
                        valid_lens = torch.full((B,), L, dtype=torch.int32)
                    residual, cu_q, inside = bert._query_rows(X, cu, valid_lens, positions)
                q = _mm(p["bq"], residual, p["wq"]).view(-1, H, C // H)
                k, v = _mm(p["bkv"], X, p["wkv"]).view(T, 2, H, -1).unbind(1)
            o = kernels.varlen_attention(q, k, v, cu, 0.0, p["scale"], None, cu_q)[0]
            Y = kernels.add_layernorm(residual, _mm(p["bo"], o.view(-1, C), p["wo"]),
                                      *p["ln1"], 0.0, None)[0]
            h = _mm(p["b1"], Y, p["w1"])
            h = torch.nn.functional.gelu(h) if p["gelu"] else h.relu_()
            X = kernels.add_layernorm(Y, _mm(p["b2"], h, p["w2"]), *p["ln2"], 0.0, None)[0]
    RUNS += 1
    if backends._dispatch_logs:  # backends.dispatch_log(): the ops the plan stood for
        for log in backends._dispatch_logs:
            log.extend((op, "cpp") for op in OPS)
    if positions is not None or cls:
        return X.view(1, 1, C) if inside is None else bert._rows_out(X, inside)
    if valid_lens is None:
        return X.view(B, L, C)
    return kernels.unpack(X, cu, L)
