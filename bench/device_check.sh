#!/usr/bin/env bash
# The one script to run on a GPU device machine (shared/DEVICE.md), in one device call:
#   1. env      GPU, driver and versions (no GPU: say so, run the build check, exit 3)
#   2. build    the extension in place: TORCH_CUDA_ARCH_LIST=<this GPU> python setup.py build_ext --inplace
#   3. import   which backends load on CUDA tensors, and why the others do not
#   4. gpu-tests  pytest -m gpu over tests/, up to 25 failures (log and junit XML under $OUT)
#   5. report   python bench/report.py --quick --out $OUT (results.json, results.md, ratios.png, ratios.txt)
#   6. models   python bench/models.py --quick --out $OUT (models.json, models.txt): MiniLM-L6 (when its
#               weights package is installed) and a small LLaMA, converted vs plain / PEFT LoRA / poly
# then prints each stage's status and wall time, writes $OUT/summary.txt and prints the short
# ratio table last.
#
# Usage:  bash bench/device_check.sh          ($OUT defaults to bench/out)
# Budget: DEVICE_CHECK_BUDGET_S (default 400 s, under the 7 minutes one device call allows on an
# H100). Each stage runs under `timeout` with min(its cap, what is left after the time reserved
# for the later stages), and a failed or timed-out stage never stops the later ones.
# DEVICE_CHECK_BUILD=0 skips the build check when there is no GPU (it compiles the CUDA sources,
# about 2 minutes on 2 cores).
set -u

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-bench/out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
PY="${PYTHON:-python}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-400}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
FAILED=0
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # logs complete even when a stage is killed; no hub access
: > "$SUMMARY"
rm -f "$OUT"/results.json "$OUT"/results.md "$OUT"/ratios.txt "$OUT"/ratios.png "$OUT"/models.json "$OUT"/models.txt  # never report a stale run

note() { echo "$*" | tee -a "$SUMMARY"; }

# run_stage NAME CAP_S RESERVE_S CMD...: run CMD, output to $OUT/NAME.log, under a timeout of
# min(CAP_S, budget left - RESERVE_S). RESERVE_S keeps the least useful time for the stages after
# it (at the default budget: build <= 180 s, gpu-tests <= 120 s, and the report gets the rest).
run_stage() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - START) - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    note "stage $name: NOT RUN (only ${left}s of the ${BUDGET_S}s budget left)"
    FAILED=1
    return 1
  fi
  echo "=== stage $name (limit ${limit}s)"
  local t0 rc dt
  t0=$(date +%s)
  printf '$ %s\n' "$*" > "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  tail -n 20 "$OUT/$name.log"
  if ((rc != 0)); then  # the first errors say more than a traceback's tail (a compiler error, a test)
    echo "--- first error lines of $name.log:"
    grep -n -m 8 -E "error|Error|FAILED|Traceback" "$OUT/$name.log"
  fi
  if ((rc == 124 || rc == 137)); then
    note "stage $name: TIMEOUT after ${dt}s (limit ${limit}s); log $OUT/$name.log"
  elif ((rc != 0)); then
    note "stage $name: FAILED (exit $rc) in ${dt}s; log $OUT/$name.log"
  else
    note "stage $name: ok in ${dt}s"
  fi
  return $rc
}

finish() {  # finish EXIT_CODE: stage summary, then the short ratio table last
  note "total: $(($(date +%s) - START))s of a ${BUDGET_S}s budget; outputs in $OUT"
  if [[ -s "$OUT/ratios.txt" ]]; then
    { echo; cat "$OUT/ratios.txt"; } | tee -a "$SUMMARY"
  else
    note "no ratio table: the report did not run or produced nothing (see $OUT/report.log)"
  fi
  exit "$1"
}

# A copy without .git can name its commit for the report: CPKERNELS_COMMIT=<hash> bash bench/device_check.sh
COMMIT="${CPKERNELS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
note "device check $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), commit $COMMIT"

# 1. env ---------------------------------------------------------------------------------------
run_stage env 60 0 bash -c "
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo 'nvidia-smi: not available'
  nvcc --version 2>&1 | tail -n 2 || echo 'nvcc: not found'
  $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| cuda\", torch.version.cuda, \"| GPU available:\", torch.cuda.is_available())'
  $PY -c 'import triton; print(\"triton\", triton.__version__)' 2>&1 | tail -n 1
  $PY -c 'import peft; print(\"peft\", peft.__version__)' 2>&1 | tail -n 1
"
GPU_ARCH=$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "none")' 2>/dev/null | tail -n 1)

if [[ -z "$GPU_ARCH" ]]; then
  note "ERROR: '$PY' cannot import torch (set PYTHON=/path/to/python); nothing else was run."
  finish 2
fi
if [[ "$GPU_ARCH" == "none" ]]; then
  note "NO GPU: torch.cuda.is_available() is False here, so the GPU tests and GPU benchmarks did NOT run."
  note "Nothing in this run counts as a GPU check. Use a device machine (shared/DEVICE.md)."
  # The in-place build is skipped on purpose: without a GPU this is a shared dev machine whose
  # in-place extension other processes are using. Compile into $OUT instead, as a build check.
  if [[ "${DEVICE_CHECK_BUILD:-1}" != "0" ]]; then
    run_stage build-check 300 0 "$PY" setup.py build_ext -b "$OUT/build-check/lib" -t "$OUT/build-check/tmp"
  fi
  finish 3
fi

# 2. build in place ----------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}"
run_stage build $((BUDGET_S * 45 / 100)) 130 env MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace || FAILED=1

# 3. import: which backends run on CUDA tensors here, and why not the others -------------------
run_stage import 60 110 "$PY" -c "
import torch, cpkernels
from cpkernels.ops import _why_unavailable
x = torch.empty(1, device='cuda')
for name in cpkernels.BACKENDS:
    print(f'{name:10s}', _why_unavailable(name, 'cuda') or 'available')
print('automatic choice:', cpkernels.explain_backend(x))
" || FAILED=1

# 4. GPU tests ---------------------------------------------------------------------------------
# No -x: the first runs on a device are where most failures show up, and one device call should
# report all of them. --maxfail bounds the time a broken build can burn; -rfE lists every failure.
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=90)  # one hung test must not eat the budget
run_stage gpu-tests $((BUDGET_S * 30 / 100)) 100 "$PY" -m pytest tests -m gpu -q -rfE --maxfail=25 \
  "${TIMEOUT_OPT[@]}" -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
rc=$?
if ((rc == 5)); then
  note "gpu-tests: pytest collected no GPU test (exit 5)"
  FAILED=1
elif ((rc != 0)); then
  FAILED=1
elif ! grep -qE "[0-9]+ passed" "$OUT/gpu-tests.log"; then  # all skipped on a GPU machine is a failure
  note "gpu-tests: no GPU test passed (all skipped: see the reasons in $OUT/gpu-tests.log)"
  FAILED=1
fi

# 4b. AOT claims: the gate's configs against what this device's triton picks when it autotunes ---
run_stage aot 150 60 "$PY" -m cpkernels._triton.aot --arch "${GPU_ARCH/./}" --shapes decode,bert,llm,odd \
  --dtypes bf16 --modes tuned --device || FAILED=1

# 5. benchmark report --------------------------------------------------------------------------
run_stage report "$BUDGET_S" 100 "$PY" bench/report.py --quick --out "$OUT" || FAILED=1
if [[ -s "$OUT/results.json" ]] && ! grep -q '"complete": true' "$OUT/results.json"; then
  # Cut short: render the tables and chart from the cases that finished.
  run_stage report-partial 30 0 "$PY" bench/report.py --from-json "$OUT/results.json" --out "$OUT"
fi

# 6. end-to-end models -------------------------------------------------------------------------
run_stage models 120 0 "$PY" bench/models.py --quick --out "$OUT" || FAILED=1
[[ -s "$OUT/models.txt" ]] && { echo; cat "$OUT/models.txt"; } | tee -a "$SUMMARY"

finish "$FAILED"
