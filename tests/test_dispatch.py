"""Backend selection: process, environment, block; auto; fallback with one clear warning."""
import subprocess
import sys
import warnings

import pytest
import torch

import fastbert
from fastbert import backends


@pytest.fixture(autouse=True)
def _restore():
    yield
    backends._process_choice = None


def test_default_is_auto_and_reference_always_available():
    assert fastbert.get_backend() == "auto"
    assert fastbert.available_backends()["reference"] == "available"


def test_set_backend_and_block_nesting():
    fastbert.set_backend("reference")
    assert fastbert.get_backend() == "reference"
    with fastbert.use_backend("cpp"):
        assert fastbert.get_backend() == "cpp"
        with fastbert.use_backend("auto"):
            assert fastbert.get_backend() == "auto"
        assert fastbert.get_backend() == "cpp"
    assert fastbert.get_backend() == "reference"


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastbert.set_backend("cuda-magic")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastbert.use_backend("nope"):
            pass


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert fastbert.get_backend() == "reference"
    monkeypatch.setenv("FASTBERT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND"):
        fastbert.get_backend()


def test_auto_picks_the_fastest_available_backend_for_cpu():
    expected = "cpp" if backends._load("cpp").supports("masked_softmax", "cpu", torch.float32) is None \
        else "reference"
    assert backends.resolve_name("masked_softmax", "cpu", torch.float32) == expected
    # Triton on CPU tensors is the interpreter, a correctness tool: auto never picks it.
    assert backends.resolve_name("masked_softmax", "cpu", torch.float32) != "triton"
    # float64 has no fast kernel anywhere: auto uses the reference for it.
    assert backends.resolve_name("masked_softmax", "cpu", torch.float64) == "reference"


def test_unavailable_backend_falls_back_with_one_warning():
    fake = backends.Backend("triton", {}, frozenset(), frozenset(), available=False,
                            reason="no driver (test stand-in)")
    saved = backends._registry.get("triton")
    backends.register_backend(fake)
    backends._warned.discard(("triton",))
    try:
        X = torch.randn(2, 3, 4)
        with fastbert.use_backend("triton"):
            with pytest.warns(RuntimeWarning, match="not available: no driver.*falling back"):
                out = fastbert.masked_softmax(X, torch.tensor([1, 2]))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a second call must not warn again
                fastbert.masked_softmax(X, torch.tensor([1, 2]))
        with fastbert.use_backend("reference"):
            torch.testing.assert_close(out, fastbert.masked_softmax(X, torch.tensor([1, 2])))
    finally:
        if saved is not None:
            backends.register_backend(saved)
        else:
            backends._registry.pop("triton")
        backends._resolve_cache.clear()


def test_package_imports_and_runs_without_the_extension(tmp_path):
    """A machine where the C++ extension was not built: import works, the model runs on the
    reference backend, and asking for cpp warns once."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['fastbert._C'] = None  # as if the extension had not been built\n"
        "import fastbert\n"
        "assert fastbert.available_backends()['cpp'] != 'available'\n"
        "fastbert.set_backend('cpp')\n"
        "m = fastbert.BERTModel(50, 16, [16], 16, 32, 2, 1, 0.0, max_len=8, key_size=16,"
        " query_size=16, value_size=16, hid_in_features=16, mlm_in_features=16, nsp_in_features=16)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m(torch.randint(0, 50, (2, 8)), torch.zeros(2, 8, dtype=torch.long), torch.tensor([3, 8]))\n"
        "msgs = [str(x.message) for x in w if 'fastbert' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'cpp' in msgs[0] and 'falling back' in msgs[0], msgs\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_per_op_device_types_narrow_a_backend():
    """An op a backend lists for fewer devices (a CPU-only kernel in a CUDA build) is not
    claimed on the others, so it falls back instead of failing to dispatch."""
    b = backends.Backend("demo", {"a": len, "b": len}, device_types=frozenset({"cpu", "cuda"}),
                         dtypes=frozenset({torch.float32}),
                         op_device_types={"b": frozenset({"cpu"})})
    assert b.supports("a", "cuda", torch.float32) is None
    assert b.supports("b", "cpu", torch.float32) is None
    assert "does not run 'b' on cuda" in b.supports("b", "cuda", torch.float32)


def test_cpp_claims_cuda_only_where_a_cuda_kernel_is_registered():
    pytest.importorskip("fastbert.backends.cpp")
    cpp = backends._load("cpp")
    built = bool(getattr(torch.ops.fastbert, "_cuda_built", None))
    for op in cpp.ops:
        try:
            has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{op}", "CUDA")
        except RuntimeError:
            has_kernel = False
        assert (cpp.supports(op, "cuda", torch.float32) is None) == (built and has_kernel), op
        assert cpp.supports(op, "cpu", torch.float32) is None, op
