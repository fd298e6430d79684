"""Backend selection: process, environment, block; auto; fallback with one clear warning."""
import asyncio
import contextvars
import subprocess
import sys
import threading
import types
import warnings

import pytest
import torch

import fastbert
from fastbert import backends
from op_testing import require_extension


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


@pytest.fixture
def stand_in():
    """Register stand-in backends for one test (the real ones come back after it), with a
    clean warning memory."""
    saved, warned = dict(backends._registry), set(backends._warned)
    backends._warned.clear()

    def register(name, ops, devices=("cpu",), dtypes=(torch.float32, torch.bfloat16), **kw):
        backends.register_backend(backends.Backend(name, dict(ops), frozenset(devices),
                                                   frozenset(dtypes), **kw))
    yield register
    backends._registry.clear()
    backends._registry.update(saved)
    backends._resolve_cache.clear()
    backends._warned.clear()
    backends._warned.update(warned)


def _marker(tag):
    def op(*args, **kwargs):
        return tag
    return op


def test_auto_picks_the_first_backend_that_serves_and_skips_the_interpreter(stand_in):
    """auto's order on stand-ins whose ops say who ran: cpp on CPU when it serves; never
    Triton's CPU interpreter, even when it would serve; the reference otherwise."""
    stand_in("cpp", {"masked_softmax": _marker("cpp")})
    stand_in("triton", {"masked_softmax": _marker("triton"), "attention": _marker("triton")},
             devices=("cpu", "cuda"))
    X, vl = torch.randn(2, 3, 4), torch.tensor([1, 2])
    assert fastbert.ops.masked_softmax(X, vl) == "cpp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cpp lacks attention: a warning, tested below
        out = fastbert.ops.attention(X, X, X, vl)
    assert isinstance(out, torch.Tensor)  # the reference, not the interpreter's marker
    # float64 has no fast kernel anywhere: the reference, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(fastbert.ops.masked_softmax(X.double(), vl), torch.Tensor)
    # On CUDA tensors auto puts Triton first.
    assert backends.resolve_name("masked_softmax", "cuda", torch.float32) == "triton"


def test_auto_warns_once_per_reason_when_a_fast_backend_cannot_serve(stand_in):
    stand_in("cpp", {"masked_softmax": _marker("cpp")}, dtypes=(torch.float32,))
    X, vl = torch.randn(2, 3, 4), torch.tensor([1, 2])
    with pytest.warns(RuntimeWarning, match=r"has no kernel for op 'attention'.*auto runs "
                      r"'attention' on cpu torch.float32 on the reference backend \(pure "
                      r"PyTorch, many times slower\)"):
        fastbert.ops.attention(X, X, X, vl)
    with pytest.warns(RuntimeWarning, match=r"op 'masked_softmax' does not take torch.bfloat16"):
        fastbert.ops.masked_softmax(X.bfloat16(), vl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reasons again: silent
        fastbert.ops.attention(X, X, X, vl)
        fastbert.ops.masked_softmax(X.bfloat16(), vl)
        backends._resolve_cache.clear()  # even when resolved afresh
        fastbert.ops.attention(X, X, X, vl)


def test_auto_warns_once_for_an_unavailable_backend_and_names_skipped_glue(stand_in,
                                                                          monkeypatch):
    stand_in("cpp", {}, available=False, reason="ImportError: libfoo.so (test stand-in)")
    X, vl = torch.randn(2, 3, 4), torch.tensor([1, 2])
    with pytest.warns(RuntimeWarning, match="not available: ImportError: libfoo.so"):
        fastbert.ops.masked_softmax(X, vl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one reason for every op: said once
        fastbert.ops.attention(X, X, X, vl)
    # A glue module skipped at import is named in the missing op's reason.
    glue = types.SimpleNamespace(SKIPPED={"attention": "ImportError: undefined symbol"})
    monkeypatch.setitem(sys.modules, "fastbert.backends.cpp", glue)
    stand_in("cpp", {"masked_softmax": _marker("cpp")})
    with pytest.warns(RuntimeWarning, match="glue modules skipped at import: attention: "
                                            "ImportError: undefined symbol"):
        fastbert.ops.attention(X, X, X, vl)


def test_auto_is_quiet_about_a_backend_turned_off_on_purpose(stand_in):
    stand_in("cpp", {}, available=False, reason="FASTBERT_NO_EXT=1 (stand-in)", deliberate=True)
    X, vl = torch.randn(2, 3, 4), torch.tensor([1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastbert.ops.masked_softmax(X, vl)
    # Asked for by name it still warns: the two settings contradict each other.
    with fastbert.use_backend("cpp"), pytest.warns(RuntimeWarning, match="falling back"):
        fastbert.ops.masked_softmax(X, vl)


def test_explain_says_what_runs_and_why_the_others_do_not(stand_in, monkeypatch, capsys):
    stand_in("cpp", {"masked_softmax": _marker("cpp")})
    stand_in("triton", {"masked_softmax": _marker("triton")}, devices=("cpu", "cuda"))
    monkeypatch.setitem(sys.modules, "fastbert.backends.cpp", types.SimpleNamespace(
        CPU_VARIANT="avx2", CPU_VARIANT_REASON="the CPU has AVX2 but not AVX-512"))
    report = fastbert.explain()
    printed = capsys.readouterr().out
    ms, att = report["ops"]["masked_softmax"], report["ops"]["attention"]
    assert (report["device"], report["dtype"], report["selection"]) == \
        ("cpu", torch.float32, "auto")
    assert set(report["ops"]) == set(backends._registry["reference"].ops)
    assert ms["backend"] == "cpp"
    assert "interpreter" in ms["rejected"]["triton"]
    assert "prefers 'cpp'" in ms["rejected"]["reference"]
    assert att["backend"] == "reference"
    assert "no kernel for op 'attention'" in att["rejected"]["cpp"]
    assert report["cpu_variant"] == "cpp CPU kernels: avx2 (the CPU has AVX2 but not AVX-512)"
    assert report["cpu_variant"] in printed and "masked_softmax: cpp" in printed
    assert "not cpp: backend 'cpp' has no kernel for op 'attention'" in printed
    # A selection by name, another dtype; no CPU variant reported: no line for it.
    monkeypatch.setitem(sys.modules, "fastbert.backends.cpp", types.SimpleNamespace())
    with fastbert.use_backend("reference"):
        report = fastbert.explain("cpu", torch.bfloat16)
    assert report["selection"] == "reference" and report["cpu_variant"] is None
    assert report["ops"]["masked_softmax"]["backend"] == "reference"
    assert "not selected" in report["ops"]["masked_softmax"]["rejected"]["cpp"]


def test_dispatch_log_records_the_backend_that_ran(stand_in):
    stand_in("cpp", {"masked_softmax": _marker("cpp")})
    X, vl = torch.randn(2, 3, 4), torch.tensor([1, 2])
    with backends.dispatch_log() as log:
        fastbert.ops.masked_softmax(X, vl)
        with fastbert.use_backend("reference"):
            fastbert.ops.masked_softmax(X, vl)
    fastbert.ops.masked_softmax(X, vl)  # after the block: not recorded
    assert log == [("masked_softmax", "cpp"), ("masked_softmax", "reference")]


def test_unavailable_backend_falls_back_with_one_warning():
    fake = backends.Backend("triton", {}, frozenset(), frozenset(), available=False,
                            reason="no driver (test stand-in)")
    saved = backends._registry.get("triton")
    backends.register_backend(fake)
    backends._warned.clear()
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
    require_extension()
    cpp = backends._load("cpp")
    built = bool(getattr(torch.ops.fastbert, "_cuda_built", None))
    for op in cpp.ops:
        try:
            has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{op}", "CUDA")
        except RuntimeError:
            has_kernel = False
        assert (cpp.supports(op, "cuda", torch.float32) is None) == (built and has_kernel), op
        assert cpp.supports(op, "cpu", torch.float32) is None, op


def _run_python(code, **env):
    import os
    full_env = {k: v for k, v in os.environ.items() if k != "FASTBERT_NO_EXT"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=full_env)


# A tiny model forward under auto, recording every warning (import's included).
_FORWARD_UNDER_AUTO = (
    "import sys, warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    {before}\n"
    "    import fastbert\n"
    "    m = fastbert.BERTModel(50, 16, [16], 16, 32, 2, 1, 0.0, max_len=8, key_size=16,"
    " query_size=16, value_size=16, hid_in_features=16, mlm_in_features=16, nsp_in_features=16)\n"
    "    m(torch.randint(0, 50, (2, 8)), torch.zeros(2, 8, dtype=torch.long), torch.tensor([3, 8]))\n"
    "msgs = [str(x.message) for x in w if 'fastbert' in str(x.message)]\n"
    "print('MSGS', repr(msgs))\n"
    "print('LOADED', 'fastbert._C' in sys.modules and sys.modules['fastbert._C'] is not None)\n"
    "print('CPP', fastbert.available_backends()['cpp'])\n")


def test_import_says_once_that_the_extension_did_not_load():
    """Extension missing: one warning, at import, naming the reason and the consequence;
    the model then runs on the reference under auto without repeating it."""
    out = _run_python(_FORWARD_UNDER_AUTO.format(
        before="sys.modules['fastbert._C'] = None  # as if it had not been built"))
    assert out.returncode == 0, out.stderr
    msgs = eval(out.stdout.split("MSGS ", 1)[1].splitlines()[0])
    assert len(msgs) == 1, msgs
    assert "C++ extension did not load" in msgs[0] and "fastbert._C" in msgs[0]
    assert "many times slower" in msgs[0] and "FASTBERT_NO_EXT=1" in msgs[0]


def test_no_ext_leaves_the_extension_unloaded_and_says_nothing():
    """FASTBERT_NO_EXT=1: the extension is never imported, nothing warns (a choice made on
    purpose), available_backends says why cpp is off."""
    out = _run_python(_FORWARD_UNDER_AUTO.format(before="pass"), FASTBERT_NO_EXT="1")
    assert out.returncode == 0, out.stderr
    assert "MSGS []" in out.stdout, out.stdout
    assert "LOADED False" in out.stdout
    assert "CPP FASTBERT_NO_EXT=1" in out.stdout


def test_use_backend_is_local_to_each_thread():
    """Two threads in different blocks at the same time each see their own; a thread with
    no block sees set_backend's process-wide choice."""
    fastbert.set_backend("reference")
    both_inside, seen = threading.Barrier(3), {}

    def worker(name):
        with fastbert.use_backend(name):
            both_inside.wait(timeout=60)  # all blocks open at once
            seen[name] = fastbert.get_backend()
            both_inside.wait(timeout=60)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("cpp", "auto")]
    for t in threads:
        t.start()
    both_inside.wait(timeout=60)
    seen["main"] = fastbert.get_backend()
    both_inside.wait(timeout=60)
    for t in threads:
        t.join()
    assert seen == {"cpp": "cpp", "auto": "auto", "main": "reference"}


def test_use_backend_is_local_to_each_asyncio_task_and_context():
    async def task(name, started, other_started):
        with fastbert.use_backend(name):
            started.set()
            await other_started.wait()  # the other task's block is open now too
            return fastbert.get_backend()

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task("cpp", a, b), task("reference", b, a))

    assert asyncio.run(main()) == ["cpp", "reference"]
    assert fastbert.get_backend() == "auto"
    with fastbert.use_backend("reference"):
        ctx = contextvars.copy_context()  # a copied context keeps the block it was taken in
    assert ctx.run(fastbert.get_backend) == "reference"
    assert fastbert.get_backend() == "auto"


def test_compiled_code_follows_the_block():
    """Dynamo cannot read a ContextVar: under torch.compile the choice comes from the
    per-thread mirror, which must follow the block (and recompile when it changes)."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1 if fastbert.get_backend() == "reference" else 2)

    x = torch.zeros(1)
    with fastbert.use_backend("reference"):
        assert f(x).item() == 1
    assert f(x).item() == 2
    with fastbert.use_backend("cpp"):
        assert f(x).item() == 2
        with fastbert.use_backend("reference"):
            assert f(x).item() == 1
