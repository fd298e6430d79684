"""scripts/gpu_check.sh --dry-run (the GPU check's plumbing, on this CPU machine) and the
report helper scripts/gpu_report.py.

The dry run is given a planted test file with one failing test (FASTBERT_GPU_CHECK_TESTS):
the tests step must be reported as failed, with the failing id, while the steps after it
still run and the report lists every step."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
sys.path.insert(0, os.path.join(REPO, "scripts"))
import gpu_report  # noqa: E402

STEPS = ["env", "deps", "build", "tests", "bench", "ddp"]

PLANTED = textwrap.dedent("""
    import pytest

    def test_planted_pass():
        assert 1 + 1 == 2

    def test_planted_failure():
        assert 1 + 1 == 3, "planted failure"

    def test_planted_skip():
        pytest.skip("planted skip")
""")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run_check(out_dir, tests_args, *extra, timeout=240, **env_extra):
    env = dict(os.environ, PYTHON=sys.executable, FASTBERT_GPU_CHECK_TESTS=tests_args,
               **env_extra)
    env.pop("OUT", None)
    # Under pytest-xdist (.ci/run: -n 2) this process is a worker, and the dry run's own
    # pytest runs would inherit PYTEST_XDIST_WORKER: pytest-benchmark then disables itself
    # and rejects --benchmark-only.  The dry run is a top-level run, as on the GPU machine.
    for key in [k for k in env if k.startswith("PYTEST_XDIST_")]:
        del env[key]
    return subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out_dir), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _report(out_dir):
    with open(os.path.join(out_dir, "gpu_report.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """One whole dry run (every step), its tests step pointed at the planted file."""
    root = tmp_path_factory.mktemp("gpu_check")
    planted = root / "test_planted.py"
    planted.write_text(PLANTED)
    out = root / "out"
    proc = _run_check(out, str(planted))
    return proc, str(out)


@needs_bash
def test_dry_run_writes_a_report_listing_every_step(planted_run):
    proc, out = planted_run
    for name in ("gpu_report.json", "gpu_report.md", "gpu_check.log", "pytest.xml", "pytest.log"):
        assert os.path.isfile(os.path.join(out, name)), (name, proc.stdout[-3000:])
    report = _report(out)
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] in ("ok", "fail", "skip"), step
        assert isinstance(step["duration_s"], (int, float)), step
    by_name = {s["name"]: s for s in report["steps"]}
    # Plumbing that must work here: the environment probe, the import check of the in-place
    # build, the benchmark row (or its skip, without pytest-benchmark), the DDP skip.
    assert by_name["env"]["status"] == "ok", by_name["env"]
    assert by_name["build"]["status"] == "ok", by_name["build"]
    assert by_name["deps"]["status"] in ("ok", "skip"), by_name["deps"]  # no .wheelhouse: skip
    assert by_name["ddp"]["status"] == "skip" and "dry run" in by_name["ddp"]["reason"]
    md = open(os.path.join(out, "gpu_report.md")).read()
    for name in STEPS:
        assert f"| {name} |" in md
    # At most 8 files come back from a GPU run's $OUT: the script keeps to that.
    assert len(os.listdir(out)) <= 8, os.listdir(out)


@needs_bash
def test_a_failing_step_is_reported_and_later_steps_still_run(planted_run):
    proc, out = planted_run
    assert proc.returncode == 1, proc.stdout[-3000:]
    report = _report(out)
    by_name = {s["name"]: s for s in report["steps"]}
    tests = by_name["tests"]
    assert tests["status"] == "fail" and tests["rc"] == 1, tests
    assert "1 passed, 1 failed, 0 errors, 1 skipped of 3" in tests["reason"], tests
    assert report["ok"] is False
    assert [f["step"] for f in report["failures"]] == ["tests"], report["failures"]
    assert report["tests"]["failed"] == 1 and report["tests"]["passed"] == 1
    # The id's module part is the planted file's path from pytest's rootdir, which depends on
    # where the clone and the temporary folder are (a clone under /tmp prefixes the folders).
    failing = [f["id"] for f in report["tests"]["failing"]]
    assert len(failing) == 1 and failing[0].endswith("test_planted::test_planted_failure"), \
        failing
    assert "planted failure" in report["tests"]["failing"][0]["message"]
    # The steps after the failure ran: the benchmark step did its work (or skipped with a
    # reason), and the log shows it started after the tests step ended.
    assert by_name["bench"]["status"] in ("ok", "skip"), by_name["bench"]
    if by_name["bench"]["status"] == "ok":
        assert report["bench"] and report["bench"][0]["median_ms"] > 0
    log = open(os.path.join(out, "gpu_check.log")).read()
    assert log.index("=== [tests] fail") < log.index("=== [bench]") < log.index("=== [ddp]")
    assert "test_planted_failure" in open(os.path.join(out, "pytest.log")).read()


@needs_bash
def test_selected_steps_pass_with_exit_0(tmp_path):
    planted = tmp_path / "test_planted_ok.py"
    planted.write_text("def test_ok():\n    assert True\n")
    proc = _run_check(tmp_path / "out", str(planted), "--steps", "env,tests", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = _report(tmp_path / "out")
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"env": "ok", "deps": "skip", "build": "skip", "tests": "ok",
                      "bench": "skip", "ddp": "skip"}, report["steps"]
    assert report["ok"] is True and report["failures"] == []


@needs_bash
def test_a_hanging_step_times_out_within_the_budget(tmp_path):
    planted = tmp_path / "test_planted_hang.py"
    planted.write_text("import time\n\ndef test_ok():\n    pass\n\n"
                       "def test_hangs():\n    time.sleep(600)\n")
    proc = _run_check(tmp_path / "out", str(planted), "--steps", "env,tests", timeout=120,
                      FASTBERT_GPU_CHECK_BUDGET_S="40")
    assert proc.returncode == 1, proc.stdout[-3000:]
    report = _report(tmp_path / "out")
    tests = {s["name"]: s for s in report["steps"]}["tests"]
    assert tests["status"] == "fail" and tests["rc"] == 124, tests
    assert tests["reason"].startswith("timed out after"), tests
    assert tests["duration_s"] < 60, tests  # the 40 s budget, not the test's 600 s sleep
    # SIGINT let pytest write its junit XML on the way out.
    assert report["tests"] and report["tests"]["tests"] >= 1, report["tests"]


# ----------------------------------------------------------------------------- gpu_report.py
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests">
  <testsuite name="pytest" errors="1" failures="2" skipped="2" tests="7" time="3.25">
    <testcase classname="tests.test_a" name="test_ok" time="0.1"/>
    <testcase classname="tests.test_a" name="test_ok2[cpu-float32]" time="0.1"/>
    <testcase classname="tests.test_a" name="test_bad[cuda-bfloat16]" time="0.2">
      <failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched elements: 3">trace</failure>
    </testcase>
    <testcase classname="tests.test_b.TestX" name="test_fixture" time="0.0">
      <error message="failed on setup with &quot;RuntimeError: CUDA error&quot;">trace</error>
    </testcase>
    <testcase classname="tests.test_b" name="test_skipped" time="0.0">
      <skipped type="pytest.skip" message="no GPU">skip</skipped>
    </testcase>
    <testcase classname="tests.test_b" name="test_xfail" time="0.0">
      <skipped type="pytest.xfail" message="known"/>
    </testcase>
    <testcase classname="tests.test_c" name="test_also_bad" time="0.0">
      <failure message="">a bare failure</failure>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_junit_counts_and_failing_ids(tmp_path):
    path = tmp_path / "pytest.xml"
    path.write_text(JUNIT)
    s = gpu_report.parse_junit(str(path))
    assert (s["tests"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (7, 2, 2, 1, 2)
    assert [f["id"] for f in s["failing"]] == ["tests.test_a::test_bad[cuda-bfloat16]",
                                               "tests.test_b.TestX::test_fixture",
                                               "tests.test_c::test_also_bad"]
    assert [f["kind"] for f in s["failing"]] == ["failure", "error", "failure"]
    assert s["failing"][0]["message"] == "AssertionError: Tensor-likes are not close!"
    assert s["failing"][2]["message"] == "a bare failure"
    assert s["time_s"] == 3.25
    assert gpu_report.junit_line(s) == ("2 passed, 2 failed, 1 errors, 2 skipped of 7; "
                                        "first: tests.test_a::test_bad[cuda-bfloat16]")


def test_junit_single_testsuite_root(tmp_path):
    path = tmp_path / "one.xml"
    path.write_text('<testsuite tests="1"><testcase classname="m" name="t"/></testsuite>')
    assert gpu_report.parse_junit(str(path))["passed"] == 1


def test_report_lists_a_step_never_recorded_as_failed(tmp_path):
    steps = tmp_path / "steps.jsonl"
    gpu_report.append_step(str(steps), "env", "ok", 0, 100.0, 101.5, "1 GPU(s)")
    gpu_report.append_step(str(steps), "deps", "skip", 0, 101.5, 101.5, "no wheels")
    with pytest.raises(ValueError):
        gpu_report.append_step(str(steps), "build", "passed", 0, 0.0, 0.0, "")
    rc = gpu_report.main(["report", "--steps", str(steps), "--out", str(tmp_path),
                          "--mode", "full"])
    assert rc == 1
    report = _report(tmp_path)
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["steps"][0]["duration_s"] == 1.5
    assert {f["step"] for f in report["failures"]} == {"build", "tests", "bench", "ddp"}
    assert "never recorded" in report["steps"][2]["reason"]


def test_missing_wheels_lists_only_what_does_not_import(tmp_path):
    def wheel(name, files):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for f in files:
                z.writestr(f, "")
            z.writestr(name.split("-")[0] + "-1.0.dist-info/METADATA", "Name: x\n")
    wheel("fastbert_absent_pkg-1.0-py3-none-any.whl", ["fastbert_absent_pkg/__init__.py"])
    wheel("fastbert_absent_mod-1.0-py3-none-any.whl", ["fastbert_absent_mod.py"])
    wheel("fastbert_absent_fork-1.0-py3-none-any.whl", ["fastbert_absent_mod.py"])  # same module
    wheel("present-1.0-py3-none-any.whl", ["json/__init__.py"])                     # importable
    wheel("d2l-1.0-py3-none-any.whl", ["d2l/__init__.py"])                          # --skip
    got = [os.path.basename(w) for w in gpu_report.missing_wheels(str(tmp_path), ["d2l"])]
    assert got == ["fastbert_absent_fork-1.0-py3-none-any.whl",
                   "fastbert_absent_pkg-1.0-py3-none-any.whl"]
