"""Shared pytest setup.

Triton kernels are verified on the CPU through Triton's interpreter, which must be switched
on before Triton is imported: it is set here, first, for every test process that has no GPU.
On a machine with a GPU the same tests run the compiled kernels natively.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for tests/op_testing.py and friends

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield
