#!/usr/bin/env bash
# The prepared GPU check (issue 3): GPU tests, then the compiled-DeepCache benchmark on CUDA.
#
#   bash benchmarks/gpu_check.sh OUTDIR        # from the repository root, on the GPU machine
#
# The GPU machine has torch + triton + pytest + transformers + matplotlib but neither diffusers nor
# DeepCache, and no network: both come as wheels in .whl/ (fetched beforehand with
# `pip download --no-deps -d .whl diffusers==0.42.1 DeepCache==0.1.1`) and are installed into /tmp/site.
#
# OUTDIR receives at most 6 files: env.txt, gpu_tests.txt, bench.txt and the benchmark's JSON, CSV and PNG.
# The whole script keeps within TOTAL_S seconds (default 570, under the device runner's 600 s per command): the
# benchmark gets what the tests left. It skips its second branch when that would not fit (--budget-s, 60 s
# before its deadline), and at the deadline it is interrupted (SIGINT): it then prints what it measured and
# keeps the JSON/CSV it writes after every stage.
# Exit status: the benchmark's (0: every measurement ran; the targets' PASS/FAIL are in its output).
set -euo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-570}
SECONDS=0

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: download them first (pip download --no-deps -d .whl diffusers==0.42.1 DeepCache==0.1.1)" \
        "and carry .whl to this machine (it is git-ignored)" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi || echo "nvidia-smi failed"
    python3 - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}")
for dist in ("triton", "diffusers", "DeepCache", "transformers", "matplotlib", "pytest", "numpy"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
} > "$OUT/env.txt" 2>&1 || echo "(the environment probe above failed; going on)" >> "$OUT/env.txt"
cat "$OUT/env.txt"

# Keep going when tests fail: their exit status is recorded (5 means no test carries the gpu marker).
set +e
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

bench_timeout=$((TOTAL_S - SECONDS - 15))
echo "benchmark: ${bench_timeout} s left (budget for its branches: $((bench_timeout - 60)) s)"
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=10 "$bench_timeout" \
    python3 benchmarks/bench_compile.py --device cuda --out "$OUT" --budget-s "$((bench_timeout - 60))" 2>&1 \
    | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
set -e

echo "gpu tests exit status: $tests_rc (5 = no test selected); benchmark exit status: $bench_rc" \
    "(124/130: cut at its deadline); ${SECONDS} s in all" | tee -a "$OUT/env.txt"
exit "$bench_rc"
