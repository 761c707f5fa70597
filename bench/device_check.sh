#!/usr/bin/env bash
# One-call GPU check: install xsam from this working tree (building the CUDA extension), run
# `xsam info`, the GPU tests, the rest of the normal tests, and the benchmarks at full size.
#
#   bash bench/device_check.sh            # from the repository root
#
# Everything goes to $OUT (default ./results/device), at most 7 files, no sub-folders:
#   summary.log  each step's status and time, `xsam info`, the environment
#   install.log  venv / pip / extension build output
#   tests.log    pytest -m cuda, then pytest -m "not slow and not cuda" (together: "cuda or not slow")
#   bench.log    xsam bench at full size, then the pytest-benchmark wrappers
#   bench_results.csv, bench_table.txt, bench_gbps.png   written by xsam bench
# Every step runs under `timeout` against one deadline (the whole script ends within 9 minutes),
# and a failing step is recorded and the script goes on.
set -u

START=$(date +%s)
DEADLINE=$((START + ${XSAM_CHECK_SECONDS:-525}))
OUT="${OUT:-./results/device}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.log"
: >"$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND with at most CAP seconds, or what is
# left before the deadline, appending its output to LOGFILE and its status to the summary.
run_step() {
    local name="$1" cap="$2" log="$3"
    shift 3
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        note "[skip] $name: only ${left}s left before the 9-minute deadline"
        FAILED=1
        return 1
    fi
    echo "===== $name (limit ${limit}s): $*" >>"$log"
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        note "[ ok ] $name (${dt}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "[TIME] $name: stopped after ${dt}s (limit ${limit}s); see $(basename "$log")"
        FAILED=1
    else
        note "[FAIL] $name: exit $rc after ${dt}s; see $(basename "$log")"
        FAILED=1
    fi
    return $rc
}

note "xsam device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), in $(pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$SUMMARY" 2>&1 || true

# ---- Python: the system one when it has torch, else a fresh venv with torch from pip ------------
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
VENV="${XSAM_DEVICE_VENV:-${TMPDIR:-/tmp}/xsam-device-venv}"
INSTALL_LOG="$OUT/install.log"
PIP_EXTRA=()
if [ -n "${XSAM_DEVICE_PYTHON:-}" ]; then
    # An interpreter where xsam is already installed (used to try this script without a GPU).
    PY="$XSAM_DEVICE_PYTHON"
    note "python: $PY as given by XSAM_DEVICE_PYTHON (nothing installed)"
elif python3 -c "import torch" >/dev/null 2>&1; then
    # The system torch is kept (no download); the venv sees it through --system-site-packages.
    if python3 -m venv --system-site-packages "$VENV" >>"$INSTALL_LOG" 2>&1; then
        PY="$VENV/bin/python"
    else
        PY=python3
        PIP_EXTRA=(--break-system-packages)  # PEP 668 system Pythons refuse plain pip installs
    fi
    note "python: system torch ($(python3 -c 'import torch; print(torch.__version__)')), running $PY"
else
    python3 -m venv "$VENV" >>"$INSTALL_LOG" 2>&1
    PY="$VENV/bin/python"
    note "python: no system torch; installing it into $VENV"
    run_step "pip install torch" 240 "$INSTALL_LOG" "$PY" -m pip install -q torch numpy
fi
if [ -z "${XSAM_DEVICE_PYTHON:-}" ]; then
    # Test and build helpers; failures here are recorded, not fatal (pytest may already be there).
    run_step "pip install test tools" 60 "$INSTALL_LOG" "$PY" -m pip install -q ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} \
        pytest pytest-benchmark ninja setuptools wheel matplotlib
    run_step "build and install xsam (CUDA extension, sm_90)" 200 "$INSTALL_LOG" \
        "$PY" -m pip install -v --no-build-isolation --no-deps ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} -e .
fi

# ---- what runs where -------------------------------------------------------------------------------
run_step "xsam info" 45 "$SUMMARY" "$PY" -c "import sys; from xsam.cli import main; sys.exit(main(['info']))"

# ---- tests: the CUDA ones first (the reason for this machine), then the other fast ones -------------
TESTS_LOG="$OUT/tests.log"
run_step "pytest -m cuda" 110 "$TESTS_LOG" "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests
# ---- benchmarks at full size: op set, end to end (small CNN and ResNet-18), memory -----------------
BENCH_LOG="$OUT/bench.log"
run_step "xsam bench (full size)" 170 "$BENCH_LOG" "$PY" -m xsam.bench --device cuda --blocks 5 --out "$OUT"
run_step "pytest -m 'not slow and not cuda'" 90 "$TESTS_LOG" \
    "$PY" -m pytest -q -rs -p no:cacheprovider -m "not slow and not cuda" tests
run_step "pytest-benchmark wrappers (cuda)" 40 "$BENCH_LOG" \
    "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_ops.py -k "cuda and resnet18" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name

note "total $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ "$FAILED" -eq 0 ] && note "device check: all steps passed" || note "device check: some steps failed (see above)"
exit "$FAILED"
