#!/usr/bin/env bash
# The one command to run on a lent GPU machine (from the repository root):
#
#     bash benchmarks/device_check.sh
#
# 1. installs the project offline (wheels from .whl/ if carried, then
#    `pip install --no-deps --no-build-isolation -e .`, else PYTHONPATH),
# 2. runs the CUDA test subset (`pytest tests -m cuda`),
# 3. runs the benchmarks (`pytest benchmarks --benchmark-only`) on CUDA, the feature
#    extraction one (bench_extract.py: images/s in bf16 and fp32, against the same detector
#    run one image at a time as the public ports run it) included,
# 4. turns the results into PNG plots and a markdown table, printed last.
#
# Everything goes to $OUT when set (the device tool's folder; at most 8 files
# come back: device_check.log, cuda_tests.log, the results JSON, table.md,
# two PNGs, and ipot_float32_range/ with the IPOT range search's .json/.md:
# copy those to results/ipot_float32_range/), else to benchmarks/results/device_check_<time>/ (git-ignored).
# After a run, copy the JSON and PNGs into benchmarks/results/ and commit them
# (`python benchmarks/report.py --doc docs/performance.md` then updates the table).
# Each stage is
# bounded with `timeout` so that the whole script ends within
# DEVICE_CHECK_BUDGET seconds (default 470, i.e. under 8 minutes).  Results
# are flushed after every benchmark, so a stage cut short keeps its numbers.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
START=$SECONDS
BUDGET=${DEVICE_CHECK_BUDGET:-470}
OUT_DIR=${OUT:-$ROOT/benchmarks/results/device_check_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT_DIR/device_check.log") 2>&1

PY=${PYTHON:-python3}
left() { echo $(( BUDGET - (SECONDS - START) )); }
stage() { echo; echo "=== [$(( SECONDS - START ))s] $* ==="; }
# cap "$1" seconds by what is left minus a reserve "$2" for later stages
cap() { local l; l=$(( $(left) - $2 )); (( l < $1 )) && echo $(( l > 10 ? l : 10 )) || echo "$1"; }

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi unavailable"
$PY - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available:", torch.cuda.is_available(), "| cpus", os.cpu_count())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
EOF

stage "install (offline)"
if compgen -G ".whl/*.whl" >/dev/null; then
  timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$ROOT/.site" .whl/*.whl && export PYTHONPATH=$ROOT/.site:${PYTHONPATH:-} \
    || echo "WARNING: carried wheels did not install"
fi
# build the CUDA extension for this card only, with all cores
CAP=$($PY -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
[ -n "$CAP" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "${DEVICE_CHECK_NO_INSTALL:-0}" = 1 ]; then
  echo "DEVICE_CHECK_NO_INSTALL=1: not installing, using PYTHONPATH"
elif timeout "$(cap 200 300)" $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
  echo "installed uniter_fast (editable)"
else
  echo "WARNING: pip install -e . failed or timed out; using PYTHONPATH (extensions JIT on use)"
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-}
$PY -c "import uniter_fast.ops as o; [print(f'{op:>10}: registered {o.registered_backends(op)}, available on cuda {o.available_backends(op, \"cuda\")}') for op in ('attention','ipot','layer_norm','gelu')]" \
  || { echo "FATAL: uniter_fast does not import"; exit 1; }

stage "CUDA tests (pytest tests -m cuda)"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
timeout "$(cap 150 240)" $PY -m pytest tests -m cuda -k "not benchmarks_smoke" -q -p no:cacheprovider -p no:benchmark $XDIST \
  -rfE --durations=5 2>&1 | tee "$OUT_DIR/cuda_tests.log" | tail -n 60
TESTS_RC=$?
echo "CUDA tests exit status: $TESTS_RC"

stage "float32 IPOT range on the GPU kernels (benchmarks/ipot_float32_range.py --device cuda)"
if $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  timeout "$(cap 90 200)" $PY benchmarks/ipot_float32_range.py --device cuda --seeds 3 \
    --out-dir "$OUT_DIR/ipot_float32_range" 2>&1 | tail -n 40
  echo "IPOT range search exit status: ${PIPESTATUS[0]}"
else
  echo "no CUDA GPU: skipped"
fi

stage "benchmarks (pytest benchmarks --benchmark-only)"
# 0.6 s of timed rounds per benchmark (>= 10 rounds for anything under 60 ms)
UNITER_FAST_BENCH_BUDGET=${UNITER_FAST_BENCH_BUDGET:-0.6} UNITER_FAST_BENCH_DEVICE=cuda timeout "$(cap 300 40)" $PY -m pytest benchmarks --benchmark-only \
  -q -p no:cacheprovider --results-dir "$OUT_DIR" --benchmark-columns=median,iqr,rounds \
  --benchmark-sort=name 2>&1
BENCH_RC=$?
echo "benchmarks exit status: $BENCH_RC"

stage "report"
shopt -s nullglob
RESULTS=("$OUT_DIR"/*.json)
echo "CUDA tests: exit $TESTS_RC | benchmarks: exit $BENCH_RC | elapsed $(( SECONDS - START ))s"
if (( ${#RESULTS[@]} )); then
  timeout 60 $PY benchmarks/report.py "${RESULTS[@]}" --plots-dir "$OUT_DIR" \
    --table-out "$OUT_DIR/table.md"
else
  echo "no results were written"
fi
(( TESTS_RC == 0 && BENCH_RC == 0 ))
