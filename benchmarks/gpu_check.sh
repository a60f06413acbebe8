#!/usr/bin/env bash
# The GPU check, in one command on a fresh GPU machine (docs/GPU.md):
#   1. a venv over the machine's CUDA torch (--system-site-packages), shardckpt
#      installed offline from wheels/py312 (so shardckpt._cuda is built by nvcc)
#   2. the CUDA tests: tests/test_cuda_build.py, tests/test_cuda_staging.py
#   3. the stall benchmark, benchmarks/gpu_stall.py: one table, JSON in
#      benchmarks/results/ (and in $OUT when set)
# in under 8 minutes; no network. --no-gpu runs only what needs no GPU (the
# wheel set, the install, the build test), e.g. here: VENV=.venv bash
# benchmarks/gpu_check.sh --no-gpu. Env: PY (python3.12), VENV, BENCH_BUDGET (s).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPU=1
[ "${1:-}" = "--no-gpu" ] && GPU=0
PY=${PY:-$(command -v python3.12 || command -v python3)}
VENV=${VENV:-/tmp/shardckpt-gpu-venv}
BENCH_BUDGET=${BENCH_BUDGET:-270}
WHEELS=$ROOT/wheels/py312
T0=$SECONDS
FAILED=()
step() { echo; echo "== [$((SECONDS - T0))s] $*"; }
fail() { echo "!! $*"; FAILED+=("$*"); }

step "wheel set: every dependency of shardckpt (but torch) resolves from wheels/py312 for cp312"
rm -rf /tmp/shardckpt-wheel-check
"$PY" -m pip download -q --no-index --find-links "$WHEELS" -d /tmp/shardckpt-wheel-check \
    --python-version 3.12 --implementation cp --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    numpy "zstandard==0.25.0" safetensors tqdm xxhash pytest setuptools wheel \
    || fail "wheels/py312 is incomplete"

step "venv $VENV over the machine's torch"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV" || { fail "venv"; exit 1; }
fi
V=$VENV/bin/python
"$V" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())" || { fail "no torch in $VENV"; exit 1; }
if [ $GPU = 1 ]; then
    "$V" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { fail "torch sees no GPU (run with --no-gpu for the rest)"; exit 1; }
    command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ] || fail "no nvcc on PATH and no CUDA_HOME"
fi

step "install shardckpt offline (builds shardckpt._native and, with nvcc, shardckpt._cuda)"
"$V" -m pip install -q --no-index --find-links "$WHEELS" "setuptools>=64" wheel pytest \
    || fail "pip install of the build/test tools"
"$V" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e . \
    > /tmp/shardckpt-gpu-install.log 2>&1 || { tail -30 /tmp/shardckpt-gpu-install.log; fail "install"; }
grep -E "shardckpt:|WARNING" /tmp/shardckpt-gpu-install.log | grep -v "^  /" | head -20
"$V" -c "import shardckpt.codec as c; print('codec path:', c.active_path())" || fail "import shardckpt"
"$V" -c "
from shardckpt.gpu import staging as s
import shardckpt._cuda as m
print('shardckpt._cuda', m.version(), 'CUDA runtime', m.runtime_version(), 'devices', m.device_count(),
      '| GPU path:', s.unavailable_reason() or 'active')" || fail "shardckpt._cuda did not build/import"

step "CUDA tests"
TESTS=(tests/test_cuda_build.py)
[ $GPU = 1 ] && TESTS+=(tests/test_cuda_staging.py)
timeout 240 "$V" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" || fail "CUDA tests"

if [ $GPU = 1 ]; then
    step "stall benchmark (time box ${BENCH_BUDGET}s)"
    RES=$ROOT/benchmarks/results/gpu_stall-$(date +%Y%m%d-%H%M%S).json
    timeout $((BENCH_BUDGET + 45)) "$V" benchmarks/gpu_stall.py --budget "$BENCH_BUDGET" --out "$RES" \
        || fail "benchmark"
    if [ -n "${OUT:-}" ] && [ -f "$RES" ]; then cp "$RES" "$OUT/"; fi
    [ -n "${OUT:-}" ] && cp /tmp/shardckpt-gpu-install.log "$OUT/" 2>/dev/null
fi

step "done"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check: all steps passed"
