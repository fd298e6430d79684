"""Small helpers shared by the Triton kernels (block sizes, dot precision, the seed)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the interpreter every program is a Python loop over numpy blocks: fewer, larger
# programs are far faster there; on a GPU, blocks are sized for occupancy instead.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_range_fix() -> None:
    """Let ``range()`` take runtime bounds under the interpreter.

    The interpreter holds every scalar as a 1-element numpy array and converts it with
    ``int(array)``, which numpy >= 2.4 refuses for arrays with ndim > 0 ("only 0-dimensional
    arrays can be converted to Python scalars").  The kernels keep ``for ... in range(...)``
    loops, which Triton software-pipelines on a GPU (a ``while`` loop would not be), and this
    shim, active only under TRITON_INTERPRET=1, converts through ``.item()`` instead."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_fastbert_range_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._fastbert_range_fix = True


if INTERPRETER:
    _interpreter_range_fix()


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """The PREC argument of :func:`mma`.  fp32 inputs: exact IEEE products (TF32 would miss
    the fp32 reference by ~1e-3); 16-bit inputs ignore the setting.  Under the interpreter,
    Triton 3.6's tl.dot on bf16 reads the raw bits as integers (garbage): "upcast" makes mma
    multiply the (already bf16-rounded) operands in fp32 instead, which is the same math."""
    if INTERPRETER and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


# Under the interpreter, Triton 3.6 casts fp32 -> bf16 by truncation (GPUs round to nearest
# even), which doubles bf16 errors; cast() rounds first there.  A global constexpr, so the
# fix compiles away on a GPU.
_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(INTERPRETER)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even on every platform."""
    if _ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, PREC: tl.constexpr):
    """tl.dot with an fp32 result (see :func:`dot_precision` for PREC)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


def rows_per_program(row_width: int, budget: int = 8192, cap: int = 128) -> int:
    """Rows per program so one program holds about ``budget`` elements (a power of two)."""
    rows = max(1, budget // next_pow2(row_width))
    return min(cap, triton.next_power_of_2(rows) if rows & (rows - 1) else rows)


def seed_value(seed) -> int:
    """The dropout seed (a 0-d int64 CPU tensor, see fastbert.ops.dropout_seed) as an int."""
    if seed is None:
        return 0
    return int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
