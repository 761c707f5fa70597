#!/usr/bin/env bash
# One-call GPU check: install xsam from this working tree (building the CUDA extension), then, most
# important first: `xsam selftest` (when the command exists), `xsam info`, the CUDA tests (the GPU
# review checks of tests/test_cuda_kernels.py among them: launch boundaries, odd offsets, determinism of
# both GPU backends in four dtypes, mixed CPU/CUDA lists behind queued GPU work, streams, graph
# capture, Triton's side-stream test), compute-sanitizer memcheck and racecheck over the review cases,
# bandwidth at 1e9 elements, the benchmarks at full size, and the rest of the normal tests.
#
#   bash bench/device_check.sh            # from the repository root
#
# Everything goes to $OUT (default ./results/device), at most 8 files, no sub-folders:
#   summary.log    each step's status, time and last line (pytest's counts), `xsam info`, the environment
#   install.log    venv / pip / extension build output
#   tests.log      selftest, pytest -m cuda, and at the end the fast non-CUDA tests
#   sanitizer.log  compute-sanitizer memcheck and racecheck
#   bench.log      bandwidth at 1e9 elements, xsam bench at full size, the curvature products against a
#                  gradient (ResNet-18, batch 128 and 512), the pytest-benchmark wrappers
#   bench_results.csv, bench_table.txt, bench_gbps.png   written by xsam bench
# Every step runs under `timeout` with its own cap and against one deadline (the whole script ends
# within 9 minutes); a failing step is recorded and the script goes on.
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
# left before the deadline, appending its output to LOGFILE, and its status, time and last output
# line to the summary.
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
    local part
    part=$(mktemp)
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >"$part" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    { echo "===== $name (limit ${limit}s, exit $rc, ${dt}s): $*"; cat "$part"; } >>"$log"
    local last
    last=$(grep -v '^[[:space:]]*$' "$part" | tail -n 1 | cut -c1-160)
    rm -f "$part"
    if [ $rc -eq 0 ]; then
        note "[ ok ] $name (${dt}s)${last:+: $last}"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "[TIME] $name: stopped after ${dt}s (limit ${limit}s); see $(basename "$log")"
        FAILED=1
    else
        note "[FAIL] $name: exit $rc after ${dt}s${last:+: $last}; see $(basename "$log")"
        FAILED=1
    fi
    return $rc
}

note "xsam device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), in $(pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$SUMMARY" 2>&1 || true

# ---- Python: the one that has torch (installing into it: the machine is thrown away), else a venv ----
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
VENV="${XSAM_DEVICE_VENV:-${TMPDIR:-/tmp}/xsam-device-venv}"
INSTALL_LOG="$OUT/install.log"
PIP_EXTRA=()
if [ -n "${XSAM_DEVICE_PYTHON:-}" ]; then
    # An interpreter where xsam is already installed (used to try this script without a GPU).
    PY="$XSAM_DEVICE_PYTHON"
    note "python: $PY as given by XSAM_DEVICE_PYTHON (nothing installed)"
elif python3 -c "import torch, sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)" >/dev/null 2>&1; then
    # python3 is a virtual environment with torch: a venv made from it would not see its packages.
    PY=python3
    note "python: $(command -v python3), a venv with torch $(python3 -c 'import torch; print(torch.__version__)')"
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
    # Only what is missing (the machine may have no network: pip would spend minutes on retries).
    if ! "$PY" -c "import pytest, pytest_benchmark, ninja, setuptools, matplotlib" >/dev/null 2>&1; then
        run_step "pip install test tools" 45 "$INSTALL_LOG" "$PY" -m pip install -q --retries 0 --timeout 10 \
            ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} pytest pytest-benchmark ninja setuptools wheel matplotlib
    fi
    run_step "build and install xsam (CUDA extension, sm_90)" 200 "$INSTALL_LOG" \
        "$PY" -m pip install -v --no-build-isolation --no-deps ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} -e .
fi

TESTS_LOG="$OUT/tests.log"
SAN_LOG="$OUT/sanitizer.log"
BENCH_LOG="$OUT/bench.log"
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)

# ---- the self-test, when this version has one ---------------------------------------------------------
if "$PY" -m xsam selftest --help >/dev/null 2>&1; then
    run_step "xsam selftest" 60 "$TESTS_LOG" "$PY" -m xsam selftest
else
    note "[skip] xsam selftest: this version has no 'python -m xsam selftest'"
fi
run_step "xsam info" 30 "$SUMMARY" "$PY" -c "import sys; from xsam.cli import main; sys.exit(main(['info']))"

# ---- CUDA tests: op tests on cuda, tests/test_cuda_kernels.py, Triton's CUDA tests ----------------------
run_step "pytest -m cuda (review checks, op tests, triton side stream)" 150 "$TESTS_LOG" \
    "${PYTEST[@]}" -m "cuda and not gpu_bench and not slow" --durations=10 tests

# ---- compute-sanitizer over the review cases: >1 launch of tensors, >320 chunks, odd offsets, >8 pairs --
# No caching allocator, so that every tensor is its own allocation and a stray access leaves it.
SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer \
                 /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$candidate" ] && SANITIZER="$candidate"
done
if [ -z "$SANITIZER" ]; then
    note "[skip] compute-sanitizer: not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
elif ! run_step "compute-sanitizer probe" 40 "$SAN_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 99 "$PY" -c "import torch; print(torch.ones(3, device='cuda').sum().item())"; then
    note "[skip] memcheck and racecheck: compute-sanitizer cannot run here (gVisor refuses it: 'Device not supported')"
else
    run_step "compute-sanitizer memcheck (review cases, float32 and bfloat16)" 110 "$SAN_LOG" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 20 \
        "${PYTEST[@]}" -x -m cuda -k "sanitize and (float32 or bfloat16)" tests/test_cuda_kernels.py
    run_step "compute-sanitizer racecheck (reductions, float32)" 70 "$SAN_LOG" \
        "$SANITIZER" --tool racecheck --error-exitcode 99 --print-limit 20 \
        "${PYTEST[@]}" -x -m cuda -k "sanitize and reductions and float32" tests/test_cuda_kernels.py
fi

# ---- bandwidth at 1e9 elements (aligned and odd offset), then the benchmarks at full size ----------------
run_step "bandwidth (native at 1e9 elements, Triton over 1,000 tensors)" 60 "$BENCH_LOG" "${PYTEST[@]}" -s -m gpu_bench bench/test_bandwidth.py
run_step "xsam bench (full size)" 110 "$BENCH_LOG" "$PY" -m xsam.bench --device cuda --blocks 5 --out "$OUT"
run_step "curvature products against a gradient, ResNet-18 at batch 128 and 512" 150 "$BENCH_LOG" \
    "$PY" -m xsam.bench.products_bench --device cuda --models resnet18_cifar --batches 128,512 --rounds 7 \
    --out "$(mktemp -d)"  # its table is printed into bench.log

# ---- the rest, with what time is left ----------------------------------------------------------------
run_step "pytest -m 'not slow and not cuda'" 90 "$TESTS_LOG" "${PYTEST[@]}" -m "not slow and not cuda and not gpu_bench" tests
run_step "pytest-benchmark wrappers (cuda)" 40 "$BENCH_LOG" \
    "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_ops.py -k "cuda and resnet18" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name

note "total $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ "$FAILED" -eq 0 ] && note "device check: all steps passed" || note "device check: some steps failed (see above)"
exit "$FAILED"
