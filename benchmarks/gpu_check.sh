#!/usr/bin/env bash
# The GPU check (issue 10): the compiled-DeepCache benchmark first, then the GPU tests, each under its own deadline.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here (with the registry): download benchmarks/gpu_wheels.txt to .whl/
#   bash benchmarks/gpu_check.sh OUTDIR           # on the GPU machine, from the repository root, with .whl/ carried
#   bash benchmarks/gpu_dryrun.sh                 # the same script on CPU, in a venv made like the GPU machine
#
# Environment: TOTAL_S (default 420: the whole script's budget), PYTHON (python3), SITE (/tmp/site, where the
# wheels are installed), DEVICE (cuda), SCENARIO (gpu on cuda, cpu on cpu), TESTS_MIN_S (60: skip the tests with
# less left).
# OUTDIR gets env.txt, preflight.txt, bench.txt, gpu_check.json (rewritten after every benchmark stage) and
# gpu_tests.txt. The exit status is the benchmark's; the tests' status is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=benchmarks/gpu_wheels.txt
if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    grep -v '^#' "$WHEELS" | grep . | xargs "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl
    ls .whl
    exit $?
fi

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR   (or --fetch-wheels)}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-420}
SITE=${SITE:-/tmp/site}
DEVICE=${DEVICE:-cuda}
TESTS_MIN_S=${TESTS_MIN_S:-60}
SECONDS=0
left() { echo $((TOTAL_S - SECONDS)); }

# Every listed wheel must be there: a missing one would show only as an import error on the GPU.
have=$(ls .whl/ 2>/dev/null | awk -F- '/\.whl$/ {print tolower($1) "==" $2}')
for spec in $(grep -v '^#' "$WHEELS" | grep .); do
    want=$(echo "$spec" | tr 'A-Z-' 'a-z_')
    if ! echo "$have" | grep -qx "$want"; then
        echo "missing wheel for $spec in .whl/: run 'bash benchmarks/gpu_check.sh --fetch-wheels' here and carry .whl" >&2
        exit 2
    fi
done
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing the wheels into $SITE failed" >&2; exit 2; }
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; fi
    nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Pre-flight: every import, a C compiler, Python.h and the device, before any time is spent.
if ! "$PYTHON" -m benchmarks.gpu_check --preflight --device "$DEVICE" 2>&1 | tee "$OUT/preflight.txt"; then
    echo "pre-flight failed: nothing was run (see $OUT/preflight.txt)" >&2
    exit 3
fi

# 1. The benchmark: the numbers that matter. It stops starting stages at its deadline and keeps what it measured;
#    `timeout` only catches a hang, 20 s after that deadline.
bench_s=$(( $(left) - TESTS_MIN_S - 20 ))
[ "$bench_s" -lt 60 ] && bench_s=60
echo "== benchmark: deadline ${bench_s} s ($(left) s left in all)"
timeout --signal=INT --kill-after=10 $((bench_s + 20)) \
    "$PYTHON" -m benchmarks.gpu_check --out "$OUT" --device "$DEVICE" ${SCENARIO:+--scenario "$SCENARIO"} \
    --deadline-s "$bench_s" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

# 2. The GPU tests, on small models, under what is left.
tests_s=$(( $(left) - 10 ))
if [ "$tests_s" -ge "$TESTS_MIN_S" ]; then
    echo "== GPU tests: ${tests_s} s"
    timeout --signal=INT --kill-after=10 "$tests_s" \
        "$PYTHON" -m pytest -q -rA --tb=short -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
    tests_rc=${PIPESTATUS[0]}
else
    echo "GPU tests skipped: ${tests_s} s left, under TESTS_MIN_S=${TESTS_MIN_S}" | tee "$OUT/gpu_tests.txt"
    tests_rc=skipped
fi

echo "benchmark exit status: $bench_rc (124/130: cut by timeout); GPU tests: $tests_rc (5: none selected);" \
    "${SECONDS} s in all" | tee -a "$OUT/env.txt"
exit "$bench_rc"
