"""Run-time CPU dispatch of the C++ kernels (fastbert/cpu_variants.py): the loader picks the
best variant this CPU executes, says which and why, refuses a forced one the CPU lacks, and
every variant this machine runs matches the reference (tests/cpu_variant_check.py, in a
fresh process each).  Under qemu-user's Haswell (AVX2, no AVX-512) and SandyBridge (AVX, no
AVX2: the lowest CPU torch 2.13's wheel runs on) CPU models, `import fastbert` and a model
forward + backward work, match the reference and report the variant they ran; CI installs
qemu-user and sets FASTBERT_REQUIRE_QEMU=1, so there a missing qemu fails instead of skipping.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastbert import cpu_variants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "tests", "cpu_variant_check.py")
REQUIRED = {b for b in os.environ.get("FASTBERT_REQUIRE_BACKENDS", "").split(",") if b}


def _cpp():
    """The loaded cpp backend module, or skip / fail (CI requires it) when it is not built."""
    try:
        import fastbert.backends.cpp as cpp
        return cpp
    except ImportError as exc:
        if "cpp" in REQUIRED:
            pytest.fail(f"the C++ extension is required here and did not load: {exc}")
        pytest.skip(f"the C++ extension is not built here: {exc}")


def _built():
    return [v.name for v in cpu_variants.VARIANTS
            if importlib.util.find_spec(cpu_variants.module_name(v.name)) is not None]


def _proc_cpu_flags():
    """The kernel's view of the CPU (Linux): an independent witness for the probe."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- the choice
FULL = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
ALL = ("avx512", "avx2", "default")


@pytest.mark.parametrize("features, built, requested, want", [
    (FULL, ALL, None, "avx512"),
    (FULL - {"avx512vl"}, ALL, None, "avx2"),          # Xeon Phi-like: AVX-512F without VL
    ({"avx", "avx2", "fma", "f16c"}, ALL, None, "avx2"),
    ({"avx", "avx2", "f16c"}, ALL, None, "default"),   # AVX2 without FMA
    ({"avx", "f16c"}, ALL, None, "default"),           # Sandy/Ivy Bridge
    (set(), ALL, None, "default"),                     # another architecture
    (FULL, ("avx2", "default"), None, "avx2"),         # avx512 not built
    (FULL, ALL, "avx2", "avx2"),                       # asked for a lower one
    (FULL, ALL, "DEFAULT", "default"),
    ({"avx", "avx2", "fma", "f16c"}, ALL, "avx512", "avx2"),   # refused: the CPU lacks it
    (FULL, ("avx2", "default"), "avx512", "avx2"),     # refused: not built
    (FULL, ALL, "sse9", "avx512"),                     # not a variant
    (FULL, (), None, None),                            # nothing built
])
def test_select_variant(features, built, requested, want):
    name, why, rejected = cpu_variants.select_variant(features, built, requested)
    assert name == want, (name, why)
    if requested and requested.lower() != want:
        assert cpu_variants.ENV in why and "refused" in why or "not a variant" in why
    if requested and requested.lower() == want:
        return  # taken as asked: nothing better was considered
    for better in ALL[:ALL.index(want) if want else len(ALL)]:
        assert better in rejected, f"no reason given for not taking {better}: {rejected}"


def test_select_variant_says_what_is_missing():
    _, why, rejected = cpu_variants.select_variant({"avx", "avx2", "fma", "f16c"}, ALL, "avx512")
    assert "avx512f" in rejected["avx512"] and "avx512bw" in rejected["avx512"]
    assert "refused" in why and "avx512f" in why


def test_build_table():
    assert [v.name for v in cpu_variants.variants_to_build("x86_64")] == ["avx512", "avx2", "default"]
    assert [v.name for v in cpu_variants.variants_to_build("aarch64")] == ["default"]
    assert [v.name for v in cpu_variants.variants_to_build("x86_64", only="avx2,default")] == ["avx2", "default"]
    with pytest.raises(ValueError, match="FASTBERT_CPU_VARIANTS.*avx3"):
        cpu_variants.variants_to_build("x86_64", only="avx3")


# --------------------------------------------------------------------------- this machine
def test_loader_takes_the_best_variant_this_cpu_runs():
    cpp = _cpp()
    features = set(torch.ops.fastbert._cpu_features())
    flags = _proc_cpu_flags()
    if flags is not None and "avx" in flags:  # the probe agrees with the kernel's view
        for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"):
            assert (f in features) == (f in flags), f
    want, _, _ = cpu_variants.select_variant(features, _built())
    if os.environ.get(cpu_variants.ENV):
        pytest.skip(f"{cpu_variants.ENV} is set for this run")
    assert cpp.CPU_VARIANT == want
    # The kernels that registered are that variant's (compiled-in name and at::vec flavour).
    name, capability, width = torch.ops.fastbert._cpu_kernel_variant().split()
    assert name == want
    assert capability == {"avx512": "AVX512", "avx2": "AVX2", "default": "DEFAULT"}[want]
    assert int(width) == {"avx512": 16, "avx2": 8}.get(want, int(width))
    assert "best variant" in cpp.CPU_VARIANT_REASON


def _run_check(prefix=(), env_extra=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != cpu_variants.ENV}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    proc = subprocess.run([*prefix, sys.executable, CHECK], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no report (exit {proc.returncode}); stderr:\n{proc.stderr[-3000:]}"
    return proc, json.loads(lines[-1])


def _runnable_here():
    _cpp()
    features = set(torch.ops.fastbert._cpu_features())
    return [v for v in _built()
            if cpu_variants.select_variant(features, _built(), v)[0] == v]


@pytest.mark.parametrize("variant", ["avx512", "avx2", "default"])
def test_each_variant_matches_the_reference(variant):
    if variant not in _runnable_here():
        pytest.skip(f"this CPU does not run the {variant} variant (or it is not built); "
                    "qemu runs the lower ones below")
    proc, report = _run_check(env_extra={cpu_variants.ENV: variant})
    assert report["variant"] == variant and report["kernels"].split()[0] == variant, report
    assert report["ok"], json.dumps(report, indent=1)
    assert proc.returncode == 0


def test_every_variant_draws_the_same_dropout_masks():
    runnable = _runnable_here()
    shas = {v: _run_check(env_extra={cpu_variants.ENV: v})[1]["dropout_mask_sha1"] for v in runnable}
    assert len(set(shas.values())) == 1, shas


def test_a_forced_variant_the_cpu_lacks_is_refused_with_a_warning():
    _cpp()
    features = set(torch.ops.fastbert._cpu_features())
    missing = [v.name for v in cpu_variants.VARIANTS if not set(v.requires) <= features]
    if not missing:
        pytest.skip("this CPU runs every variant (qemu's CPU models test the refusal)")
    proc, report = _run_check(env_extra={cpu_variants.ENV: missing[0]})
    assert report["variant"] != missing[0]
    assert "refused" in report["why"] and f"{cpu_variants.ENV}={missing[0]}" in proc.stderr


# --------------------------------------------------------------------------- other CPUs
QEMU = shutil.which("qemu-x86_64")


def _qemu():
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("qemu-user CPU models: an x86-64 Linux host only")
    if QEMU is None:
        if os.environ.get("FASTBERT_REQUIRE_QEMU"):
            pytest.fail("FASTBERT_REQUIRE_QEMU is set and qemu-x86_64 is missing "
                        "(apt-get install -y qemu-user)")
        pytest.skip("qemu-x86_64 not installed (Debian: apt-get install -y qemu-user)")
    _cpp()
    return QEMU


@pytest.mark.parametrize("cpu, forced, want", [
    # AVX2 + FMA, no AVX-512: auto picks avx2.
    ("Haswell", None, "avx2"),
    # AVX without AVX2: torch runs its DEFAULT kernels; asking for avx2 is refused, not SIGILL.
    ("SandyBridge", "avx2", "default"),
])
def test_under_qemu(cpu, forced, want):
    qemu = _qemu()
    if want not in _built():
        pytest.fail(f"the {want} variant is not built")
    env = {cpu_variants.ENV: forced} if forced else {}
    proc, report = _run_check(prefix=(qemu, "-cpu", cpu), env_extra=env, timeout=1500)
    assert proc.returncode == 0, f"{cpu}: exit {proc.returncode}\n{json.dumps(report, indent=1)}\n{proc.stderr[-2000:]}"
    assert report["variant"] == want and report["kernels"].split()[0] == want, report
    assert "avx512f" not in report["features"]
    assert report["ok"], json.dumps(report, indent=1)
    if forced:
        assert "refused" in report["why"]


def test_not_built_is_said_only_of_variants_this_cpu_runs():
    # The loader warns "this CPU runs <v>, but it is not in this install" for reasons that
    # start with "not built": a variant the CPU lacks must be rejected for that instead.
    _, _, rejected = cpu_variants.select_variant({"avx", "avx2", "fma", "f16c"}, ("avx2", "default"))
    assert rejected["avx512"].startswith("this CPU lacks"), rejected
    _, _, rejected = cpu_variants.select_variant(FULL, ("avx2", "default"))
    assert rejected["avx512"].startswith("not built"), rejected
