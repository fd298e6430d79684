"""Helpers of scripts/gpu_check.sh (standard library only, so it runs on any Python there).

    gpu_report.py junit PYTEST_XML [--line]     counts and failing ids of a pytest junit XML
                                                (JSON; --line: one line for a step's reason)
    gpu_report.py step STEPS NAME STATUS RC T0 T1 REASON
                                                append one step's record to STEPS (JSON lines)
    gpu_report.py missing-wheels WHEELDIR [--skip NAME ...]
                                                the wheels in WHEELDIR whose top-level modules
                                                this Python cannot import (one path a line)
    gpu_report.py report --steps STEPS --out OUTDIR --mode MODE [--env ENV_JSON]
                                                write OUTDIR/gpu_report.json and gpu_report.md;
                                                exit 1 when a step failed, else 0

A step's status is "ok", "fail" or "skip"; a skip is never a failure.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import zipfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

STEP_ORDER = ("env", "deps", "build", "tests", "bench", "ddp")
STATUSES = ("ok", "fail", "skip")
MAX_FAILING_LISTED = 200


# ----------------------------------------------------------------------------- junit
def parse_junit(path: str) -> Dict:
    """``{"tests", "passed", "failed", "errors", "skipped", "failing": [ids], "time_s"}`` of a
    pytest junit XML.  A test id is ``classname::name`` (pytest writes the module's dotted
    path, plus the class, as classname).  A test with an <error> (a fixture, setup, teardown
    or collection error) counts as an error, also when it has a <failure> too (a failed test
    whose teardown failed as well); one with a <failure> as failed; one with <skipped> (skip
    or xfail) as skipped; the rest passed."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": [],
           "time_s": 0.0}
    for suite in suites:
        try:
            out["time_s"] += float(suite.get("time") or 0.0)
        except ValueError:
            pass
        for case in suite.iter("testcase"):
            cls, name = case.get("classname") or "", case.get("name") or ""
            test_id = f"{cls}::{name}" if cls else name
            out["tests"] += 1
            if case.find("error") is not None:
                out["errors"] += 1
                node = case.find("error")
            elif case.find("failure") is not None:
                out["failed"] += 1
                node = case.find("failure")
            elif case.find("skipped") is not None:
                out["skipped"] += 1
                continue
            else:
                out["passed"] += 1
                continue
            message = (node.get("message") or (node.text or "")).strip().splitlines()
            out["failing"].append({"id": test_id, "kind": node.tag,
                                   "message": message[0][:300] if message else ""})
    out["time_s"] = round(out["time_s"], 2)
    return out


def junit_line(summary: Dict) -> str:
    line = (f"{summary['passed']} passed, {summary['failed']} failed, {summary['errors']} errors, "
            f"{summary['skipped']} skipped of {summary['tests']}")
    if summary["failing"]:
        line += f"; first: {summary['failing'][0]['id']}"
    return line


# ----------------------------------------------------------------------------- steps
def append_step(path: str, name: str, status: str, rc: int, t0: float, t1: float,
                reason: str) -> Dict:
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    record = {"name": name, "status": status, "rc": rc, "duration_s": round(t1 - t0, 1),
              "started": time.strftime("%H:%M:%S", time.gmtime(t0)),
              "reason": " ".join(reason.split())[:500]}
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def read_steps(path: str) -> List[Dict]:
    steps = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        steps.append(json.loads(line))
                    except json.JSONDecodeError:
                        steps.append({"name": "?", "status": "fail", "rc": -1, "duration_s": 0,
                                      "reason": f"unreadable step record: {line[:200]}"})
    return steps


# ----------------------------------------------------------------------------- wheels
def wheel_modules(wheel: str) -> List[str]:
    """The top-level importable names a wheel installs (packages and modules)."""
    names = set()
    with zipfile.ZipFile(wheel) as z:
        for entry in z.namelist():
            top = entry.split("/", 1)[0]
            if top.endswith((".dist-info", ".data")):
                continue
            if "/" in entry:
                names.add(top)
            elif top.endswith(".py"):
                names.add(top[:-3])
            elif top.endswith(".so"):
                names.add(top.split(".", 1)[0])
    return sorted(n for n in names if n.isidentifier())


def wheel_distribution(wheel: str) -> str:
    return os.path.basename(wheel).split("-", 1)[0].lower().replace("-", "_")


def missing_wheels(wheel_dir: str, skip: List[str]) -> List[str]:
    skip = {s.lower().replace("-", "_") for s in skip}
    missing, provided = [], set()
    for wheel in sorted(os.path.join(wheel_dir, w) for w in os.listdir(wheel_dir)
                        if w.endswith(".whl")):
        if wheel_distribution(wheel) in skip:
            continue
        modules = wheel_modules(wheel)
        if not modules:
            continue
        # Two wheels providing the same module (py-cpuinfo and its fork py-cpuinfo2 both
        # install `cpuinfo`): the first is enough.
        if all(m in provided or importlib.util.find_spec(m) is not None for m in modules):
            continue
        provided.update(modules)
        missing.append(wheel)
    return missing


# ----------------------------------------------------------------------------- report
def _load_json(path: Optional[str]):
    if path and os.path.exists(path):
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            return {"error": f"unreadable {path}: {exc}"}
    return None


def bench_rows(path: str) -> List[Dict]:
    data = _load_json(path) or {}
    rows = []
    for b in data.get("benchmarks", []) if isinstance(data, dict) else []:
        stats, info = b.get("stats") or {}, b.get("extra_info") or {}
        row = {"name": b.get("name"), "median_ms": round(1e3 * stats["median"], 3)
               if "median" in stats else None, "rounds": stats.get("rounds")}
        for key in ("examples_per_s", "ratio_to_d2l_fp32", "ops"):
            if key in info:
                row[key] = info[key]
        rows.append(row)
    return rows


def build_report(steps_path: str, out_dir: str, mode: str, env_path: Optional[str]) -> Dict:
    steps = read_steps(steps_path)
    seen = {s["name"] for s in steps}
    # Every step is listed, also one the script never reached (killed, or a bug in it).
    for name in STEP_ORDER:
        if name not in seen:
            steps.append({"name": name, "status": "fail", "rc": None, "duration_s": 0,
                          "reason": "never recorded (the script stopped before it?)"})
    junit = os.path.join(out_dir, "pytest.xml")
    tests = None
    if os.path.exists(junit):
        try:
            tests = parse_junit(junit)
        except (ET.ParseError, OSError) as exc:
            tests = {"error": f"unreadable {junit}: {exc}"}
    if tests and "failing" in tests and len(tests["failing"]) > MAX_FAILING_LISTED:
        tests["failing_total"] = len(tests["failing"])
        tests["failing"] = tests["failing"][:MAX_FAILING_LISTED]
    failures = [{"step": s["name"], "reason": s.get("reason", "")}
                for s in steps if s["status"] == "fail"]
    report = {
        "mode": mode,
        "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "ok": not failures,
        "total_s": round(sum(float(s.get("duration_s") or 0) for s in steps), 1),
        "steps": steps,
        "failures": failures,
        "env": _load_json(env_path),
        "tests": tests,
        "bench": bench_rows(os.path.join(out_dir, "bench.json")),
    }
    with open(os.path.join(out_dir, "gpu_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(out_dir, "gpu_report.md"), "w") as fh:
        fh.write(markdown(report))
    return report


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(r: Dict) -> str:
    lines = [f"# fastbert GPU check ({r['mode']})", "",
             f"Finished {r['finished_utc']} UTC; steps took {r['total_s']} s in all. "
             + ("**No step failed.**" if r["ok"] else f"**{len(r['failures'])} step(s) failed.**"),
             ""]
    env = r.get("env") or {}
    if env:
        keys = ("python", "torch", "torch_cuda", "triton", "gpu_count", "gpus", "nvcc",
                "cpu_model", "nproc")
        lines += ["## Machine", ""] + [f"- {k}: {_cell(env[k])}" for k in keys if k in env] + [""]
    lines += ["## Steps", "", "| step | status | rc | seconds | reason |", "|---|---|---|---|---|"]
    for s in r["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('rc')} | {s.get('duration_s')} | "
                     f"{_cell(s.get('reason', ''))} |")
    lines.append("")
    if r["failures"]:
        lines += ["## Failures", ""] + [f"- **{f['step']}**: {_cell(f['reason'])}"
                                        for f in r["failures"]] + [""]
    t = r.get("tests")
    if t:
        lines += ["## Tests (pytest.xml)", ""]
        if "error" in t:
            lines += [t["error"], ""]
        else:
            lines += [junit_line(t) + f" ({t['time_s']} s)", ""]
            for f in t["failing"]:
                lines.append(f"- {f['kind']}: `{f['id']}`: {_cell(f['message'])}")
            if t.get("failing_total"):
                lines.append(f"- ... {t['failing_total'] - len(t['failing'])} more")
            lines.append("")
    if r.get("bench"):
        lines += ["## Benchmark rows (bench.json)", "",
                  "| row | median ms | examples/s | ratio to d2l fp32 |", "|---|---|---|---|"]
        for b in r["bench"]:
            eps = b.get("examples_per_s")
            ratio = b.get("ratio_to_d2l_fp32")
            lines.append(f"| {_cell(b['name'])} | {b.get('median_ms')} | "
                         f"{'' if eps is None else round(eps)} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="helpers of scripts/gpu_check.sh")
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("junit")
    j.add_argument("xml")
    j.add_argument("--line", action="store_true")
    s = sub.add_parser("step")
    for name in ("steps", "name", "status"):
        s.add_argument(name)
    s.add_argument("rc", type=int)
    s.add_argument("t0", type=float)
    s.add_argument("t1", type=float)
    s.add_argument("reason", nargs="?", default="")
    m = sub.add_parser("missing-wheels")
    m.add_argument("wheel_dir")
    m.add_argument("--skip", nargs="*", default=[])
    r = sub.add_parser("report")
    r.add_argument("--steps", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--mode", required=True)
    r.add_argument("--env", default=None)
    a = p.parse_args(argv)
    if a.cmd == "junit":
        if not os.path.exists(a.xml):
            print(f"no junit XML at {a.xml}" if a.line else json.dumps({"error": "missing"}))
            return 1
        try:
            summary = parse_junit(a.xml)
        except ET.ParseError as exc:
            print(f"unreadable junit XML {a.xml}: {exc}")
            return 1
        print(junit_line(summary) if a.line else json.dumps(summary, indent=1))
        return 0
    if a.cmd == "step":
        append_step(a.steps, a.name, a.status, a.rc, a.t0, a.t1, a.reason)
        return 0
    if a.cmd == "missing-wheels":
        for w in missing_wheels(a.wheel_dir, a.skip):
            print(w)
        return 0
    report = build_report(a.steps, a.out, a.mode, a.env)
    for s in report["steps"]:
        print(f"gpu_check: {s['name']:<6} {s['status']:<4} {s.get('duration_s')} s  {s.get('reason', '')}")
    print(f"gpu_check: report in {os.path.join(a.out, 'gpu_report.md')} and gpu_report.json; "
          + ("no step failed" if report["ok"] else f"{len(report['failures'])} step(s) failed"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
