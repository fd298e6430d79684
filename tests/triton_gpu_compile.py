"""Compile every Triton kernel for real GPU targets (sm_80, sm_90) without a GPU.

The interpreter runs the kernels' math on CPU but never lowers them: this script runs the
real compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) on each
kernel with the constexpr combinations and block sizes the launchers use on a GPU, and checks
the shared memory each needs against the smallest per-block limit of those targets.
It must run with TRITON_INTERPRET unset (under the interpreter, triton.jit returns
interpreted functions that cannot be compiled): tests/test_triton_kernels.py runs it in a
subprocess.  Exit status 0 and one line per compiled variant on success.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastbert.kernels import (add_layernorm, dropout, ffn, gather_positions,  # noqa: E402
                              masked_softmax, pack_unpack, varlen_attention)
from fastbert.kernels._utils import next_pow2  # noqa: E402

TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}
SHARED_LIMIT = 99 * 1024  # sm_86/sm_89 allow ~99 KB per block; sm_80 164 KB, sm_90 227 KB
DT = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
PREC = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}  # dot_precision() off the interpreter


def signature(fn, types, constexprs):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


FLASH_CONFIGS = (  # (D, DV, varlen, vl_mode, dropout): head sizes 32..128, padded mode
    (64, 64, True, 0, True), (48, 48, True, 0, False), (128, 128, True, 0, True),
    (96, 96, True, 0, True), (32, 32, True, 0, False), (48, 24, False, 2, True),
    (64, 64, False, 1, False))


def variants(full: bool):
    """Every kernel in bf16; the dtype-dependent paths (tl.dot precision) in fp32 and fp16
    too.  ``full``: every dtype x every configuration."""
    for dt in DT:
        p = f"*{dt}"
        every = full or dt == "bf16"
        for mode in (0, 1, 2) if every else ():
            c = dict(VL_MODE=mode, BLOCK_R=16, BLOCK_K=512)
            yield "masked_softmax_fwd", masked_softmax._masked_softmax_fwd_kernel, dict(
                X=p, VL="*i32", Y=p, n_rows="i32", Lq="i32", Lk="i32"), c
            yield "masked_softmax_bwd", masked_softmax._masked_softmax_bwd_kernel, dict(
                Y=p, DY=p, VL="*i32", DX=p, n_rows="i32", Lq="i32", Lk="i32"), c
        for D, DV, varlen, vl_mode, drop in FLASH_CONFIGS if every else FLASH_CONFIGS[:1]:
            d_pad, dv_pad = next_pow2(D, 16), next_pow2(DV, 16)
            elem = 4 if dt == "fp32" else 2
            block, _ = varlen_attention._blocks(512, 512, max(d_pad, dv_pad), elem)
            c = dict(D=D, DV=DV, D_PAD=d_pad, DV_PAD=dv_pad, VARLEN=varlen, VL_MODE=vl_mode,
                     DROPOUT=drop, PREC=PREC[dt], BLOCK_M=block, BLOCK_N=block)
            scal = dict(CU="*i32", VL="*i32", seed="i64", dropout_p="fp32", scale="fp32",
                        H="i32", Lq="i32", Lk="i32", TQ="i32", TK="i32")
            tag = f"D{D} varlen={varlen} vl={vl_mode} dropout={drop}"
            yield f"flash_fwd {tag}", varlen_attention._flash_fwd_kernel, dict(
                Q=p, K=p, V=p, O=p, STATS="*fp32", **scal), c
            yield f"flash_bwd_dq {tag}", varlen_attention._flash_bwd_dq_kernel, dict(
                Q=p, K=p, V=p, O=p, DO=p, STATS="*fp32", DELTA="*fp32", DQ=p, **scal), dict(
                c, EXACT_DELTA=dt == "fp32")
            yield f"flash_bwd_dkdv {tag}", varlen_attention._flash_bwd_dkdv_kernel, dict(
                Q=p, K=p, V=p, DO=p, STATS="*fp32", DELTA="*fp32", DK=p, DV_OUT=p, **scal), c
        bm, bn, bk = ffn._blocks(4096, 4096, 4096)  # the launcher's GPU blocks
        for epi in range(5) if every else (0, 2):
            c = dict(HAS_BIAS=epi < 3, EPILOGUE=epi, STORE_PRE=epi == 2, PREC=PREC[dt],
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
            yield f"linear epilogue={epi}", ffn._linear_kernel, dict(
                A=p, B=p, BIAS=p, AUX=p, C=p, PRE=p, M="i32", N="i32", K="i32",
                stride_am="i32", stride_ak="i32", stride_bk="i32", stride_bn="i32"), c
        if not every:
            continue
        for C in (768,):
            block_c = next_pow2(C)
            c = dict(HAS_W=True, HAS_B=True, DROPOUT=True, BLOCK_R=max(1, 8192 // block_c),
                     BLOCK_C=block_c)
            yield f"add_layernorm_fwd C{C}", add_layernorm._add_layernorm_fwd_kernel, dict(
                X=p, Y=p, W=p, B=p, OUT=p, MEAN="*fp32", RSTD="*fp32", R="i32", C="i32",
                eps="fp32", seed="i64", dropout_p="fp32"), c
            c = {k: v for k, v in c.items() if k != "HAS_B"}
            yield f"add_layernorm_bwd C{C}", add_layernorm._add_layernorm_bwd_kernel, dict(
                DOUT=p, X=p, Y=p, W=p, MEAN="*fp32", RSTD="*fp32", DX=p, DY=p,
                DW_PART="*fp32", DB_PART="*fp32", R="i32", C="i32", seed="i64",
                dropout_p="fp32"), c
        yield "gather", gather_positions._gather_kernel, dict(
            X=p, POS="*i64", OUT=p, P="i32", L="i32", C="i32"), dict(BLOCK_P=8, BLOCK_C=1024)
        yield "scatter_add", gather_positions._scatter_add_kernel, dict(
            DOUT=p, POS="*i64", DX=p, P="i32", L="i32", C="i32"), dict(BLOCK_L=32, BLOCK_C=256)
        yield "pack", pack_unpack._pack_kernel, dict(
            X=p, CU="*i32", OUT=p, L="i32", NF="i32"), dict(BLOCK_L=8, BLOCK_F=1024)
        yield "unpack", pack_unpack._unpack_kernel, dict(
            PACKED=p, CU="*i32", OUT=p, L="i32", NF="i32"), dict(BLOCK_L=8, BLOCK_F=1024)
    yield "keep_mask", dropout._keep_mask_kernel, dict(
        seed="i64", OFFS="*i64", KEEP="*i8", n="i32", p="fp32"), dict(BLOCK=4096)


def main() -> int:
    """``--all``: every dtype x configuration on both targets (slow); by default all of
    sm_80's representative set and the flash and matmul kernels on sm_90.  Other arguments:
    substrings selecting variants by name."""
    full = "--all" in sys.argv
    only = [a for a in sys.argv[1:] if a != "--all"]
    failures = 0
    for target_name, target in TARGETS.items():
        for name, fn, types, constexprs in variants(full):
            if only and not any(s in name for s in only):
                continue
            if target_name != "sm80" and not full and not (
                    name.startswith(("flash_fwd D64", "flash_bwd_dkdv D64", "linear epilogue=2"))
                    and types.get("Q", types.get("A")) == "*bf16"):
                continue
            label = f"{target_name} {name} {types.get('Q', types.get('X', ''))}"
            try:
                src = ASTSource(fn=fn, signature=signature(fn, types, constexprs),
                                constexprs=constexprs)
                kernel = triton.compile(src, target=target)
                shared = kernel.metadata.shared
                status = "ok" if shared <= SHARED_LIMIT else "TOO MUCH SHARED MEMORY"
                failures += status != "ok"
                print(f"{status}: {label} shared={shared}", flush=True)
            except Exception as exc:  # report every failure, not just the first
                failures += 1
                print(f"FAILED: {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
