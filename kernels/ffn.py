"""The position-wise FFN ``dense2(act(dense1(x)))`` on one Triton matmul kernel whose
epilogue fuses the bias and the activation (forward) or the activation's derivative
(backward), so no separate elementwise pass touches the [M, F] hidden activations.

Reference: fastbert.backends.reference.ffn (``nn.Linear`` layouts: w1 [F, C], w2 [C2, F];
act = relu (d2l) or exact-erf gelu).

Forward:  a = act(x w1^T + b1)          (EPILOGUE relu/gelu; gelu also stores h = x w1^T + b1)
          out = a w2^T + b2
Backward: dh = (dout w2) * act'(h)      (EPILOGUE relu_grad reads a, gelu_grad reads h)
          dw2 = dout^T a, dw1 = dh^T x, dx = dh w1, db = column sums (torch, fp32)
All products accumulate in fp32; any operand is read through strides, so no transposes copy.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import cast, INTERPRETER, dot_precision, mma, next_pow2

EPI_NONE, EPI_RELU, EPI_GELU, EPI_RELU_GRAD, EPI_GELU_GRAD = 0, 1, 2, 3, 4
ACTIVATION_EPILOGUE = {"relu": EPI_RELU, "gelu": EPI_GELU}
SQRT1_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _linear_kernel(A, B, BIAS, AUX, C, PRE, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """C[M, N] = epilogue(A[M, K] @ B[K, N] (+ bias[N])); C, PRE, AUX contiguous [M, N]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += mma(a, b, PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if STORE_PRE:
        tl.store(PRE + c_offs, cast(acc, PRE.dtype.element_ty), mask=c_mask)
    if EPILOGUE == 1:
        acc = tl.maximum(acc, 0.0)
    elif EPILOGUE == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif EPILOGUE == 3:  # aux = relu output: relu'(h) = [h > 0] = [a > 0]
        aux = tl.load(AUX + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        acc = tl.where(aux > 0.0, acc, 0.0)
    elif EPILOGUE == 4:  # aux = h: gelu'(h) = Phi(h) + h * phi(h)
        h = tl.load(AUX + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        acc = acc * (cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h))
    tl.store(C + c_offs, cast(acc, C.dtype.element_ty), mask=c_mask)


def _blocks(M: int, N: int, K: int):
    cap_mn, cap_k = (128, 128) if INTERPRETER else (64, 32)
    return (min(cap_mn, next_pow2(M, 16)), min(cap_mn, next_pow2(N, 16)),
            min(cap_k, next_pow2(K, 16)))


def linear(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
           epilogue: int = EPI_NONE, aux: Optional[torch.Tensor] = None,
           store_pre: bool = False, out_dtype: Optional[torch.dtype] = None):
    """epilogue(a[M, K] @ b[K, N] + bias) as a new contiguous [M, N] tensor (and the
    pre-activation when ``store_pre``).  ``a`` and ``b`` may be any strided views."""
    M, K = a.shape
    N = b.shape[1]
    dtype = out_dtype or a.dtype
    c = torch.empty((M, N), dtype=dtype, device=a.device)
    pre = torch.empty((M, N), dtype=dtype, device=a.device) if store_pre else c
    if M and N:
        if K == 0:
            c.zero_()  # an empty product; only the bias-free no-epilogue path reaches here
        else:
            bm, bn, bk = _blocks(M, N, K)
            grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
            _linear_kernel[grid](a, b, bias if bias is not None else c, aux.contiguous()
                                 if aux is not None else c, c, pre, M, N, K, a.stride(0),
                                 a.stride(1), b.stride(0), b.stride(1), HAS_BIAS=bias is not None,
                                 EPILOGUE=epilogue, STORE_PRE=store_pre,
                                 PREC=dot_precision(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return (c, pre) if store_pre else c


def forward(x2d, w1, b1, w2, b2, activation: str):
    """(out[M, C2], a[M, F], h[M, F] or an empty tensor for relu) for x2d [M, C]."""
    gelu = activation == "gelu"
    res = linear(x2d, w1.t(), b1, ACTIVATION_EPILOGUE[activation], store_pre=gelu)
    a, h = res if gelu else (res, x2d.new_empty((0,)))
    return linear(a, w2.t(), b2), a, h


def backward(dout, x2d, w1, w2, a, h, activation: str, has_b1: bool, has_b2: bool):
    """(dx, dw1, db1, dw2, db2); the bias grads are fp32 column sums (empty when absent)."""
    dout = dout.contiguous()
    gelu = activation == "gelu"
    dh = linear(dout, w2, None, EPI_GELU_GRAD if gelu else EPI_RELU_GRAD, aux=h if gelu else a)
    dw2 = linear(dout.t(), a, out_dtype=w2.dtype)
    dw1 = linear(dh.t(), x2d, out_dtype=w1.dtype)
    dx = linear(dh, w1)
    db1 = dh.sum(0, dtype=torch.float32) if has_b1 else dh.new_empty((0,), dtype=torch.float32)
    db2 = dout.sum(0, dtype=torch.float32) if has_b2 else dh.new_empty((0,), dtype=torch.float32)
    return dx, dw1, db1, dw2, db2
