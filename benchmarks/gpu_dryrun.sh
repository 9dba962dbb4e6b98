#!/usr/bin/env bash
# The GPU check end to end on CPU, in a venv made like the GPU machine: torch and what its image has, no diffusers
# and no DeepCache (those come from .whl/ with --no-index --no-deps --target, as there), small CPU scenario.
#
#   bash benchmarks/gpu_dryrun.sh [OUTDIR]     # also: make gpu-dryrun
#
# A broken import, a missing wheel or a budget that does not hold shows here, not on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/gpu_dryrun}
VENV=${DRYRUN_VENV:-/tmp/fxcache-gpu-dryrun}
# The GPU machine runs Python 3.12 and the carried wheels are for it (charset-normalizer is compiled): use a 3.12.
if [ -z "${BASE_PYTHON:-}" ]; then
    for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3 python3; do
        if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then BASE_PYTHON=$c; break; fi
    done
fi
BASE=${BASE_PYTHON:?no Python 3.12 found (the GPU machine runs 3.12 and the wheels are for it): set BASE_PYTHON}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import transformers" 2>/dev/null; then
    "$BASE" -m venv "$VENV"
    # What the GPU image has (see the device library's package list) that diffusers, DeepCache and the tests import,
    # minus what gpu_wheels.txt carries. torch is the local CPU build; the GPU machine has 2.11 with CUDA.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" numpy pytest packaging filelock "huggingface-hub>=1.32" \
        regex safetensors pillow pyyaml tqdm typing-extensions \
        transformers
fi
ls .whl/*.whl >/dev/null 2>&1 || bash benchmarks/gpu_check.sh --fetch-wheels
rm -rf /tmp/fxcache-dryrun-site
PYTHON="$VENV/bin/python" SITE=/tmp/fxcache-dryrun-site DEVICE=cpu SCENARIO=cpu TOTAL_S=${TOTAL_S:-300} \
    TESTS_MIN_S=${TESTS_MIN_S:-20} bash benchmarks/gpu_check.sh "$OUT"
