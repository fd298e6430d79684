"""Shared pytest setup.

Triton kernels are verified on the CPU through Triton's interpreter, which must be switched
on before Triton is imported: it is set here, first, for every test process that has no GPU.
On a machine with a GPU the same tests run the compiled kernels natively, on CUDA tensors:
tests take their device from the ``device`` fixture (op_testing.device_for).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for tests/op_testing.py and friends

import pytest  # noqa: E402


@pytest.fixture
def device(request):
    """The device the test runs on: CPU here (Triton through its interpreter), CUDA on a GPU
    machine where the backend under test serves it (op_testing.device_for).  The backend is
    the test's ``backend`` parameter (none: ``reference``); the op, a module's ``DEVICE_OP``
    (for ``cpp``, whose CUDA twins cover some ops only)."""
    from op_testing import device_for

    params = getattr(getattr(request.node, "callspec", None), "params", {})
    return device_for(params.get("backend", "reference"), getattr(request.module, "DEVICE_OP", None))


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield
