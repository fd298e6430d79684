#!/usr/bin/env bash
# A real install, as a user gets it: build a wheel of this checkout, install it into a fresh
# virtual environment (torch==2.13.0 CPU, the wheel, nothing else), and from an empty folder
# outside the repository, with no ../shared and FASTBERT_DATA unset, check that the wheel
# carries the extension (the CPU variant this machine runs), the Triton kernels and the
# packaged data, then run short forms of the main job (fine-tuning on the packaged SNLI) and
# of pretraining (on the packaged WikiText-2 split).  Run by .ci/run; takes a few minutes.
#
#   bash scripts/check_wheel.sh            # uses .venv's python to build (after setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
QUIET() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

echo "== wheel: building from $REPO"
# --no-build-isolation: build against .venv's torch 2.13.0 (isolation would fetch a CUDA torch).
MAX_JOBS=${MAX_JOBS:-2} QUIET .venv/bin/python -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/fastbert-*.whl)
echo "== wheel: $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
.venv/bin/python - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["fastbert/_C", "fastbert/_C_cpu_default", "fastbert/kernels/varlen_attention.py",
        "fastbert/data/packaged/snli/snli_1.0_dev.tokenized.tsv.gz",
        "fastbert/data/packaged/snli/snli_1.0_test.tokenized.tsv.gz",
        "fastbert/data/packaged/wikitext-2/wiki.valid.tokens.gz", "fastbert/data/packaged/LICENSE"]
missing = [n for n in need if not any(x.startswith(n) for x in names)]
assert not missing, f"the wheel lacks {missing}"
print("== wheel: carries", ", ".join(sorted(x for x in names if x.endswith(".so"))))
EOF

echo "== fresh venv"
"$PY" -m venv "$WORK/venv"
QUIET "$WORK/venv/bin/python" -m pip install -q "torch==2.13.0"
QUIET "$WORK/venv/bin/python" -m pip install -q -c <(echo "torch==2.13.0") "$WHEEL"

mkdir "$WORK/empty"
cd "$WORK/empty"
unset FASTBERT_DATA FASTBERT_HOME FASTBERT_CACHE PYTHONPATH
export FASTBERT_HOME="$WORK/home"   # an empty cache: the packaged data must serve
export FASTBERT_REQUIRE_BACKENDS=
"$WORK/venv/bin/python" - <<'EOF'
import os, warnings
warnings.filterwarnings("error", message="fastbert")   # no fallback warning may fire in a good install
import fastbert, fastbert.backends.cpp as cpp
assert fastbert.__file__.startswith(os.environ["FASTBERT_HOME"].rsplit("/", 1)[0]), fastbert.__file__
assert fastbert.available_backends()["cpp"] == "available", fastbert.available_backends()
print(f"== smoke: fastbert from {os.path.dirname(fastbert.__file__)}; CPU kernels {cpp.CPU_VARIANT} "
      f"({cpp.CPU_VARIANT_REASON})")
import torch
m = fastbert.BERTModel(100, 32, [32], 32, 64, 2, 2, 0.1, max_len=16, key_size=32, query_size=32,
                       value_size=32, hid_in_features=32, mlm_in_features=32, nsp_in_features=32)
tokens = torch.randint(0, 100, (3, 10))
enc, _, nsp = m(tokens, torch.zeros_like(tokens), torch.tensor([10, 4, 1]))
(enc.sum() + nsp.sum()).backward()
assert fastbert.cpu_cache_info()["installed"] == 0, "import/model use must leave the allocator alone"
print("== smoke: model forward/backward on the cpp backend ok")
EOF
echo "== main job (short): python -m fastbert finetune"
"$WORK/venv/bin/python" -m fastbert finetune --epochs 1 --train-limit 1024 --test-limit 512 \
    --no-progress --out-dir "$WORK/run-finetune" | tee "$WORK/finetune.log"
grep -q "packaged" "$WORK/finetune.log" || { echo "finetune did not report the packaged data"; exit 1; }
test -s "$WORK/run-finetune/metrics.json"
echo "== pretraining (short): python -m fastbert pretrain"
"$WORK/venv/bin/python" -m fastbert pretrain --max-steps 3 --batch-size 32 --no-progress \
    --out-dir "$WORK/run-pretrain" | tee "$WORK/pretrain.log"
grep -q "packaged" "$WORK/pretrain.log" || { echo "pretrain did not report the packaged data"; exit 1; }
echo "== wheel check passed"
