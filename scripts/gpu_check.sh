#!/usr/bin/env bash
# fastbert's GPU check: one command that tells everything on a CUDA machine with no network
# (docs/gpu.md).  Run from anywhere; it works in the repository root.
#
#   bash scripts/gpu_check.sh [--quick | --dry-run] [--out DIR] [--steps env,deps,...]
#
# Steps, in order, each under its own timeout taken from one time budget:
#   env    python / torch / CUDA / triton versions, nvidia-smi -L, nvcc, GPU count
#   deps   the wheels in .wheelhouse/ (scripts/gpu_wheelhouse.sh, carried here): d2l 0.17.6
#          and 1.0.3 into .deps/d2l-<v> (where tests/d2l_loader.py looks), the others that
#          this Python lacks into .deps/gpu-site (put on PYTHONPATH for the later steps)
#   build  the C++ extension in place against this torch: the CUDA twins (TORCH_CUDA_ARCH_LIST
#          8.0;9.0+PTX) and the CPU kernels for this CPU's best variant only; then
#          pip install --no-build-isolation --no-deps -e .; then an import check
#   tests  FASTBERT_REQUIRE_BACKENDS=cpp,triton pytest tests/ (pytest-xdist -n 8 when there);
#          --quick: the kernel test files only
#   bench  benchmarks/bench_end_to_end.py --benchmark-only: bert.small (and bert.base unless
#          --quick), train and inference, fp32 and bf16, d2l vs HF vs fastbert
#   ddp    a 2-process torchrun fine-tune when 2+ GPUs are visible (one GPU: a skip)
# It never stops at a failure: every step runs, and OUTDIR/gpu_report.md and gpu_report.json
# list each step's status, rc, duration and reason.  Exit status: 0 when no step failed.
#
# Options
#   --quick       kernel tests and a couple of benchmark rows (budget 230 s)
#   --dry-run     the same plumbing on a CPU machine (python: .venv/bin/python): the build is
#                 only an import check, a tiny test selection, one quick benchmark row, deps
#                 into a temp folder, no DDP; no GPU is not a failure
#   --out DIR     where the report goes (default: $OUT if set, else ./gpu_out); at most 8 files
#   --steps LIST  run only these steps (the others are recorded as skipped)
# Environment
#   PYTHON                        the interpreter (default python3; --dry-run: .venv/bin/python)
#   FASTBERT_GPU_CHECK_BUDGET_S   the whole run's time budget (default 530; quick 230; dry 300)
#   FASTBERT_GPU_CHECK_TESTS      pytest arguments replacing the test selection (split on spaces)
#   FASTBERT_GPU_CHECK_BENCH_K    a pytest -k expression replacing the benchmark selection
#   FASTBERT_GPU_CHECK_XDIST      0: no pytest-xdist; N: -n N (default 8 when importable)
#   FASTBERT_CPU_VARIANTS         build these CPU variants (default: the best this CPU runs)
# Files in OUTDIR: gpu_check.log, gpu_report.md, gpu_report.json, build.log, pytest.log,
# pytest.xml, bench.json, bench_report.md.
set -uo pipefail   # no -e, on purpose: a failing step is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

MODE=full
OUTDIR=""
STEPS_SELECTED="env,deps,build,tests,bench,ddp"
usage() { sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry-run ;;
        --quick) [ "$MODE" = dry-run ] || MODE=quick ;;
        --out) OUTDIR=${2:?--out needs a folder}; shift ;;
        --out=*) OUTDIR=${1#--out=} ;;
        --steps) STEPS_SELECTED=${2:?--steps needs a list}; shift ;;
        --steps=*) STEPS_SELECTED=${1#--steps=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[ -n "$OUTDIR" ] || OUTDIR=${OUT:-./gpu_out}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)

if [ "$MODE" = dry-run ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
case "$PYTHON" in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac
case "$MODE" in
    full) BUDGET_S=${FASTBERT_GPU_CHECK_BUDGET_S:-530} ;;
    quick) BUDGET_S=${FASTBERT_GPU_CHECK_BUDGET_S:-230} ;;
    dry-run) BUDGET_S=${FASTBERT_GPU_CHECK_BUDGET_S:-300} ;;
esac
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STEPS_FILE=$WORK/steps.jsonl
ENV_JSON=$WORK/env.json
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export REPO OUTDIR MODE PYTHON WORK ENV_JSON
# Files of earlier runs in OUTDIR would be read as this run's.
rm -f "$OUTDIR"/{gpu_check.log,gpu_report.md,gpu_report.json,build.log,pytest.log,pytest.xml,bench.json,bench_report.md}
exec 3>&1 4>&2 > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
TEE_PID=$!
T0=$(date +%s)
echo "gpu_check: mode $MODE, python $PYTHON, out $OUTDIR, budget ${BUDGET_S}s, started $(date -u '+%F %T') UTC"

now() { date +%s.%N; }
record() {  # name status rc t0 t1 reason
    "$PYTHON" scripts/gpu_report.py step "$STEPS_FILE" "$@" \
        || printf '{"name": "%s", "status": "%s", "rc": %s, "duration_s": 0, "reason": "recorded by the shell: %s"}\n' \
            "$1" "$2" "$3" "gpu_report.py step failed" >> "$STEPS_FILE"
}
selected() { case ",$STEPS_SELECTED," in *",$1,"*) return 0 ;; esac; return 1; }

# run_step NAME CAP_S RESERVE_S: runs step_NAME under `timeout` (min of CAP_S and what the
# budget leaves after RESERVE_S for the later steps), its output in the log and in
# $WORK/NAME.out.  The step writes its one-line reason to $WORK/note; "SKIP: why" there
# makes a step that exits 0 a skip.  rc 124 (or 137, killed after ignoring the SIGINT): it
# ran out of time.
run_step() {
    local name=$1 cap=$2 reserve=$3 t0 t1 rc left limit status reason
    t0=$(now)
    if ! selected "$name"; then
        record "$name" skip 0 "$t0" "$t0" "not selected (--steps $STEPS_SELECTED)"
        return
    fi
    left=$(( BUDGET_S - ($(date +%s) - T0) - reserve ))
    limit=$(( cap < left ? cap : left ))
    echo
    echo "=== [$name] $(date -u +%T) UTC, timeout ${limit}s"
    if (( limit < 10 )); then
        record "$name" fail -1 "$t0" "$(now)" "not run: the ${BUDGET_S}s budget is spent (${left}s left after the reserve for later steps)"
        return
    fi
    : > "$WORK/note"
    # SIGINT first (pytest then writes its junit XML and summary), SIGKILL 20 s later.
    timeout -s INT -k 20 "$limit" bash -c "step_$name" 2>&1 | tee -i "$WORK/$name.out"
    rc=${PIPESTATUS[0]}
    t1=$(now)
    reason=$(cat "$WORK/note" 2>/dev/null)
    # 137: still running 20 s after the SIGINT, killed (or killed by something else: then
    # it ended before its limit)
    if (( rc == 124 )) || { (( rc == 137 )) && awk "BEGIN{exit !($t1 - $t0 >= $limit)}"; }; then
        status=fail; reason="timed out after ${limit}s${reason:+; $reason}"
    elif (( rc != 0 )); then
        status=fail
        [ -n "$reason" ] || reason="rc $rc: $(grep -v '^[[:space:]]*$' "$WORK/$name.out" | tail -n 1)"
    elif [[ "$reason" == SKIP:* ]]; then
        status=skip; reason=${reason#SKIP: }
    else
        status=ok
    fi
    record "$name" "$status" "$rc" "$t0" "$t1" "$reason"
    echo "=== [$name] $status (rc $rc, $(awk "BEGIN{printf \"%.1f\", $t1-$t0}")s) $reason"
}
note() { echo "$*" > "$WORK/note"; }
skip() { echo "SKIP: $*" > "$WORK/note"; echo "skipped: $*"; exit 0; }
export -f note skip

# ----------------------------------------------------------------------------- env
step_env() {
    "$PYTHON" - <<'PY'
import json, os, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "nproc": os.cpu_count(),
        "machine": platform.machine()}
def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (p.stdout + p.stderr).strip()
    except Exception as exc:  # noqa: BLE001
        return f"not run: {exc}"
try:
    with open("/proc/cpuinfo") as fh:
        info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
except OSError:
    pass
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), gpu_count=torch.cuda.device_count())
    info["gpus"] = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                    for i in range(info["gpu_count"])]
    from torch.utils.cpp_extension import CUDA_HOME
    info["cuda_home"] = CUDA_HOME
except Exception as exc:  # noqa: BLE001
    info["torch_error"] = repr(exc)
    info["gpu_count"] = 0
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    info["triton"] = f"not importable: {exc!r}"
nvcc = shutil.which("nvcc") or (os.path.join(info["cuda_home"], "bin", "nvcc") if info.get("cuda_home") else None)
info["nvcc"] = run([nvcc, "--version"]).splitlines()[-1] if nvcc and os.path.exists(nvcc) else "not found"
info["nvidia_smi"] = run(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else "nvidia-smi not found"
json.dump(info, open(os.environ["ENV_JSON"], "w"), indent=1)
for k, v in info.items():
    print(f"{k}: {v}")
PY
    local rc=$? gpus
    (( rc == 0 )) || { note "the environment probe failed (rc $rc)"; exit "$rc"; }
    gpus=$("$PYTHON" -c "import json,os; print(json.load(open(os.environ['ENV_JSON'])).get('gpu_count', 0))")
    if [ "$MODE" = dry-run ]; then
        note "dry run: $gpus GPU(s) visible (none needed here)"
    elif (( gpus < 1 )); then
        note "no CUDA GPU visible to torch"; exit 1
    else
        note "$gpus GPU(s)"
    fi
}

# ----------------------------------------------------------------------------- deps
step_deps() {
    local wh=.wheelhouse root site v fail=0 missing
    if ! ls "$wh"/*.whl >/dev/null 2>&1; then
        skip "no wheels in .wheelhouse/ (run scripts/gpu_wheelhouse.sh here and carry .wheelhouse): tests needing d2l skip with their reason"
    fi
    if [ "$MODE" = dry-run ]; then root=$WORK/deps; else root=$REPO/.deps; fi
    site=$root/gpu-site
    for v in 0.17.6 1.0.3; do
        if [ -d "$root/d2l-$v/d2l" ]; then
            echo "d2l $v: already in $root/d2l-$v"
        elif ! "$PYTHON" -m pip install -q --no-index --find-links "$wh" --no-deps --no-compile \
                --target "$root/d2l-$v" "d2l==$v"; then
            echo "d2l $v: pip install failed"; fail=1
        fi
    done
    missing=$("$PYTHON" scripts/gpu_report.py missing-wheels "$wh" --skip d2l) || fail=1
    if [ -n "$missing" ]; then
        echo "installing into $site (missing from this python):" $missing
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" $missing || fail=1
    else
        echo "every other wheel's modules are importable already"
    fi
    # d2l.torch imports IPython, matplotlib_inline, pandas, ...: load both as the tests do.
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" FASTBERT_D2L_0_17_6="$root/d2l-0.17.6" \
    FASTBERT_D2L_1_0_3="$root/d2l-1.0.3" "$PYTHON" - <<'PY' || fail=1
import sys
sys.path.insert(0, "tests")
import d2l_loader
for v in d2l_loader.VERSIONS:
    m = d2l_loader.load_d2l(v)
    print(f"d2l {v}: d2l.torch loads ({m.__file__}), BERTModel: {hasattr(m, 'BERTModel')}")
PY
    if (( fail )); then note "a wheel did not install or d2l.torch did not import (see the log)"; exit 1; fi
    note "d2l 0.17.6 and 1.0.3 in $root; $(echo "$missing" | grep -c . ) other wheel(s) installed"
}

# ----------------------------------------------------------------------------- build
import_check() {
    "$PYTHON" - <<'PY'
import json, os, sys
import torch
import fastbert
import fastbert.backends.cpp as cpp
print("fastbert.available_backends():", fastbert.available_backends())
print(f"CPU kernels: {cpp.CPU_VARIANT} ({cpp.CPU_VARIANT_REASON})")
report = os.path.join("fastbert", "_build_report.json")
problems = []
if os.path.exists(report):
    built = json.load(open(report))
    print("build report:", built)
    problems += [f"{name} failed to compile" for name in built.get("failed", {})]
print("CUDA twins built:", cpp._cuda_built)
if torch.cuda.is_available():
    print({op: sorted(d) for op, d in cpp._op_devices.items()})
    if not cpp._cuda_built:
        problems.append("torch has CUDA and a GPU, but fastbert._C has no CUDA twins")
    fastbert.explain("cuda", torch.float32)
    fastbert.explain("cuda", torch.bfloat16)
fastbert.explain("cpu", torch.float32)
if problems:
    sys.exit("; ".join(problems))
PY
}
export -f import_check

step_build() {
    if [ "$MODE" = dry-run ]; then
        echo "dry run: no compile (the extension here is built by scripts/setup.sh); import check only"
        import_check || { note "the in-place extension does not import (run scripts/setup.sh)"; exit 1; }
        note "dry run: import check only"
        return 0
    fi
    local rc nvcc_dir
    if [ -z "${FASTBERT_CPU_VARIANTS:-}" ]; then
        FASTBERT_CPU_VARIANTS=$("$PYTHON" - <<'PY'
import runpy
cv = runpy.run_path("fastbert/cpu_variants.py")
flags = set()
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
except OSError:
    pass
built = [v.name for v in cv["variants_to_build"]()]
print(cv["select_variant"](flags, built)[0] or "default")
PY
)
    fi
    export FASTBERT_CPU_VARIANTS
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # nvcc where torch looks for it (CUDA_HOME, PATH, /usr/local/cuda)
    nvcc_dir=$("$PYTHON" -c "from torch.utils.cpp_extension import CUDA_HOME as h; print(h or '')" 2>/dev/null)
    [ -n "$nvcc_dir" ] && export PATH="$PATH:$nvcc_dir/bin"
    echo "building: CPU variants '$FASTBERT_CPU_VARIANTS', TORCH_CUDA_ARCH_LIST '$TORCH_CUDA_ARCH_LIST', MAX_JOBS $MAX_JOBS, CUDA_HOME '${nvcc_dir:-none}' (log: build.log)"
    "$PYTHON" setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1
    rc=$?
    grep -A3 "^fastbert: " "$OUTDIR/build.log" | grep -v "^--" | head -n 40
    if (( rc != 0 )); then
        tail -n 40 "$OUTDIR/build.log"
        note "setup.py build_ext --inplace failed (rc $rc; build.log)"; exit 1
    fi
    echo "--- pip install --no-build-isolation --no-deps -e . (the extension is already in place)" | tee -a "$OUTDIR/build.log"
    FASTBERT_NO_EXT=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . >> "$OUTDIR/build.log" 2>&1 \
        || { tail -n 20 "$OUTDIR/build.log"; note "pip install -e . failed (build.log)"; exit 1; }
    import_check || { note "fastbert does not import as built (see the log)"; exit 1; }
    note "built: CPU variant $FASTBERT_CPU_VARIANTS, CUDA archs $TORCH_CUDA_ARCH_LIST"
}

# ----------------------------------------------------------------------------- tests
KERNEL_TESTS="test_attention test_varlen_attention test_masked_softmax test_add_layernorm test_ffn
test_mlm_loss test_pack_unpack test_gather_positions test_embedding_sum test_linear
test_triton_kernels test_model"
export KERNEL_TESTS
step_tests() {
    local sel=() xd=() f n rc
    if [ -n "${FASTBERT_GPU_CHECK_TESTS:-}" ]; then
        read -r -a sel <<< "$FASTBERT_GPU_CHECK_TESTS"
    elif [ "$MODE" = dry-run ]; then
        sel=(tests/test_pack_unpack.py -k "reference and not grad")
    elif [ "$MODE" = quick ]; then
        for f in $KERNEL_TESTS; do [ -f "tests/$f.py" ] && sel+=("tests/$f.py"); done
    else
        # tests/test_gpu_check.py runs this script's dry run: CPU plumbing, no GPU content,
        # and a minute or two of the budget.
        sel=(tests/ --ignore=tests/test_gpu_check.py)
    fi
    n=${FASTBERT_GPU_CHECK_XDIST:-8}
    if [ "$MODE" != dry-run ] && [ "$n" != 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
        xd=(-n "$n")
        # 8 workers on this machine's cores: a few threads each, not all of them each.
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / n > 1 ? $(nproc) / n : 1 ))}
    fi
    if [ "$MODE" = dry-run ]; then export FASTBERT_REQUIRE_BACKENDS=cpp
    else export FASTBERT_REQUIRE_BACKENDS=cpp,triton; fi
    echo "pytest ${sel[*]} ${xd[*]} (FASTBERT_REQUIRE_BACKENDS=$FASTBERT_REQUIRE_BACKENDS; log: pytest.log)"
    "$PYTHON" -m pytest "${sel[@]}" "${xd[@]}" -q -p no:cacheprovider -rfEs \
        --junitxml="$OUTDIR/pytest.xml" 2>&1 | tee -i "$OUTDIR/pytest.log"
    rc=${PIPESTATUS[0]}
    note "$("$PYTHON" scripts/gpu_report.py junit "$OUTDIR/pytest.xml" --line) (pytest rc $rc)"
    exit "$rc"
}

# ----------------------------------------------------------------------------- bench
step_bench() {
    local k extra=() rc rows
    "$PYTHON" -c "import pytest_benchmark" 2>/dev/null \
        || skip "pytest-benchmark is not importable by $PYTHON (not in the image, not in .wheelhouse)"
    case "$MODE" in
        # the reference backend: a row that runs on any machine the dry run may meet
        dry-run) k="bert.small-b64 and test_inference and fastbert-reference and fp32"
                 extra=(--bench-quick) ;;
        quick)   k="bert.small-b64 and fp32 and (d2l-eager or fastbert-triton)"
                 extra=(--bench-quick) ;;
        full)    k="(bert.small-b64 or bert.base-b64) and (d2l-eager or hf-sdpa-pad128 or hf-sdpa-longest or fastbert-triton)"
                 extra=(--bench-long) ;;
    esac
    k=${FASTBERT_GPU_CHECK_BENCH_K:-$k}
    echo "pytest benchmarks/bench_end_to_end.py --benchmark-only ${extra[*]} -k '$k'"
    "$PYTHON" -m pytest benchmarks/bench_end_to_end.py --benchmark-only "${extra[@]}" -k "$k" \
        -q -p no:cacheprovider -rfEs --benchmark-json="$OUTDIR/bench.json" 2>&1
    rc=${PIPESTATUS[0]}
    if [ -s "$OUTDIR/bench.json" ]; then
        "$PYTHON" benchmarks/report.py "$OUTDIR/bench.json" --md "$OUTDIR/bench_report.md" \
            --png "$WORK/bench.png" --note "scripts/gpu_check.sh, mode $MODE" >/dev/null \
            || echo "benchmarks/report.py failed (bench.json is still there)"
        rows=$("$PYTHON" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['benchmarks']))" "$OUTDIR/bench.json" 2>/dev/null)
        note "${rows:-no} rows in bench.json (pytest rc $rc)"
        # Every selected row skipped: nothing was measured, which is no success.
        if [ "${rows:-0}" = 0 ]; then note "no benchmark row ran (all skipped? see the log; pytest rc $rc)"; (( rc != 0 )) || rc=1; fi
    else
        note "no bench.json written (pytest rc $rc)"
        (( rc != 0 )) || rc=1
    fi
    exit "$rc"
}

# ----------------------------------------------------------------------------- ddp
step_ddp() {
    local gpus rc
    [ "$MODE" != dry-run ] || skip "dry run: no GPUs (DDP on 2 CPU processes is tests/test_train_ddp.py)"
    gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    (( gpus >= 2 )) || skip "skipped: $gpus GPU(s); the torchrun check needs 2"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 -m fastbert finetune \
        --epochs 1 --train-limit 4096 --test-limit 1024 --batch-size 64 --no-progress \
        --out-dir "$WORK/ddp" 2>&1 | tee -i "$WORK/ddp_run.log"
    rc=${PIPESTATUS[0]}
    (( rc == 0 )) || { note "torchrun finetune failed (rc $rc)"; exit "$rc"; }
    [ -s "$WORK/ddp/metrics.json" ] || { note "torchrun finished but wrote no metrics.json"; exit 1; }
    # fastbert prints "N examples/sec on 2 x cuda" when both ranks trained on GPUs.
    grep -q "on 2 x cuda" "$WORK/ddp_run.log" || { note "torchrun ran, but not as 2 CUDA processes (see the log)"; exit 1; }
    note "2 processes on 2 GPUs (nccl): $("$PYTHON" -c "import json,sys; m=json.load(open(sys.argv[1])); e=m['epochs'][-1]; print(f\"loss {e['loss']:.3f}, test acc {e['test_acc']:.3f}, {m['examples_per_sec']:.0f} examples/s\")" "$WORK/ddp/metrics.json" 2>/dev/null)"
}
export -f step_env step_deps step_build step_tests step_bench step_ddp

# Seconds each step may take at most; run_step also keeps back time for the steps after it.
if [ "$MODE" = quick ]; then
    CAP=(env 60 deps 60 build 240 tests 200 bench 60 ddp 60)
else
    CAP=(env 60 deps 90 build 420 tests 400 bench 180 ddp 90)
fi
cap() { local i; for ((i = 0; i < ${#CAP[@]}; i += 2)); do [ "${CAP[i]}" = "$1" ] && echo "${CAP[i+1]}"; done; }

run_step env "$(cap env)" 0
# Time kept back for a later step, while an earlier one runs: only for selected steps, and
# for DDP only where it will run (2+ GPUs, not a dry run).
GPUS=$("$PYTHON" -c "import json,sys; print(int(json.load(open(sys.argv[1])).get('gpu_count', 0)))" "$ENV_JSON" 2>/dev/null) || GPUS=0
case "$MODE" in
    full) KEEP=(tests 120 bench 90) ;;
    quick) KEEP=(tests 60 bench 30) ;;
    dry-run) KEEP=(tests 30 bench 40) ;;
esac
if [ "$MODE" != dry-run ] && [ "${GPUS:-0}" -ge 2 ]; then KEEP+=(ddp 60); fi
reserve_after() {  # the seconds kept back for the selected steps in "$@"
    local total=0 s i
    for s in "$@"; do
        selected "$s" || continue
        for ((i = 0; i < ${#KEEP[@]}; i += 2)); do
            [ "${KEEP[i]}" = "$s" ] && total=$(( total + KEEP[i+1] ))
        done
    done
    echo "$total"
}

run_step deps "$(cap deps)" "$(reserve_after tests bench ddp)"
# What deps installed, for every later step (pytest, benchmarks, torchrun).
if [ "$MODE" = dry-run ]; then DEPS_ROOT=$WORK/deps; else DEPS_ROOT=$REPO/.deps; fi
if [ -d "$DEPS_ROOT/gpu-site" ]; then export PYTHONPATH="$DEPS_ROOT/gpu-site${PYTHONPATH:+:$PYTHONPATH}"; fi
for v in 0.17.6 1.0.3; do
    if [ -d "$DEPS_ROOT/d2l-$v/d2l" ]; then export "FASTBERT_D2L_${v//./_}=$DEPS_ROOT/d2l-$v"; fi
done
run_step build "$(cap build)" "$(reserve_after tests bench ddp)"
run_step tests "$(cap tests)" "$(reserve_after bench ddp)"
run_step bench "$(cap bench)" "$(reserve_after ddp)"
run_step ddp "$(cap ddp)" 0

echo
echo "=== report $(date -u +%T) UTC, $(( $(date +%s) - T0 ))s since the start"
"$PYTHON" scripts/gpu_report.py report --steps "$STEPS_FILE" --out "$OUTDIR" --mode "$MODE" --env "$ENV_JSON"
RC=$?
if [ ! -s "$OUTDIR/gpu_report.json" ]; then
    # The helper could not run (no usable python?): a report all the same, from the shell.
    RC=1
    {
        echo "{\"mode\": \"$MODE\", \"ok\": false, \"error\": \"scripts/gpu_report.py report failed\", \"steps\": ["
        sed '$!s/$/,/' "$STEPS_FILE" 2>/dev/null
        echo "]}"
    } > "$OUTDIR/gpu_report.json"
    { echo "# fastbert GPU check ($MODE): the report helper failed"; echo; echo '```'; cat "$STEPS_FILE" 2>/dev/null; echo '```'; } > "$OUTDIR/gpu_report.md"
fi
echo "gpu_check: exit $RC after $(( $(date +%s) - T0 ))s"
exec 1>&3 2>&4 3>&- 4>&-
wait "$TEE_PID" 2>/dev/null   # the log complete before the exit
exit "$RC"
