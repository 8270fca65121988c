#!/usr/bin/env bash
# GPU acceptance run on one CUDA GPU, from a bare machine: set-up (make setup) if the venv is missing, `pytest -m gpu`,
# the sampler benchmark (B = 64 ... 8192) and the step benchmark (ResNet-18 96 px b = 256 bf16: EMC² default and the
# Algorithm-1 stale/drop variant vs SimCLR), then a summary against the goals (scripts/gpu_check_summary.py).
#
#   bash scripts/gpu_check.sh OUT            # or: make gpu-check OUT=dir   (OUT default gpu_check_out)
#   bash scripts/gpu_check.sh --smoke OUT    # or GPU_CHECK_SMOKE=1: the benchmarks' --smoke sizes, on CPU if no GPU
#
# OUT receives pytest_gpu.xml, bench_sampler.json, bench_step.json, environment.txt, stages.tsv (seconds and exit
# status per stage), the logs of every stage and summary.json.  Exits non-zero if a stage failed (a missed goal is
# reported, not an error).  VENV (default .venv) names the virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${GPU_CHECK_SMOKE:-0}
OUT=""
for arg in "$@"; do
  case "$arg" in
    --smoke|--dry-run) SMOKE=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg (usage: scripts/gpu_check.sh [--smoke] OUT)" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "error: one OUT folder, got $OUT and $arg" >&2; exit 2; }; OUT=$arg ;;
  esac
done
OUT=${OUT:-gpu_check_out}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
T0=$SECONDS
FAILED=0

log() { echo "[gpu-check $(date -u +%H:%M:%S) +$((SECONDS - T0))s] $*"; }

# stage NAME CMD...: runs CMD with its output shown and kept in OUT/NAME.log; records seconds and exit status
stage() {
  local name=$1 start=$SECONDS rc
  shift
  log "$name: $*"
  set +e
  "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  printf '%s\t%d\t%d\n' "$name" "$((SECONDS - start))" "$rc" >> "$OUT/stages.tsv"
  log "$name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || FAILED=1
  return 0
}

if [ ! -x "$PY" ] || ! "$PY" -c "import dual_emc2, torch" 2>/dev/null; then
  stage setup make setup VENV="$VENV"
  [ "$FAILED" -eq 0 ] || { log "set-up failed: see $OUT/setup.log"; exit 1; }
fi

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
{
  "$PY" -c "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__,
    'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  command -v nvidia-smi >/dev/null && nvidia-smi || true
} > "$OUT/environment.txt" 2>&1
if [ "$CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then
  echo "error: torch sees no CUDA GPU ($OUT/environment.txt); GPU_CHECK_SMOKE=1 (or --smoke) runs the CPU smoke version" >&2
  exit 1
fi

if [ "$SMOKE" = 1 ]; then
  DEVICE=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
  stage pytest_gpu "$PY" -m pytest -p no:cacheprovider -q -m gpu tests/test_mh_triton.py --junitxml "$OUT/pytest_gpu.xml"
  stage bench_sampler "$PY" experiments/bench_sampler.py --smoke --device "$DEVICE" --out "$OUT/bench_sampler.json"
  stage bench_step "$PY" experiments/bench_step.py --smoke --device "$DEVICE" --no-trainer \
    --estimators simclr,emc2,emc2_q025,emc2_stale_drop --out "$OUT/bench_step.json"
else
  stage pytest_gpu "$PY" -m pytest -p no:cacheprovider -q -m gpu --junitxml "$OUT/pytest_gpu.xml"
  stage bench_sampler "$PY" experiments/bench_sampler.py --device cuda --sizes 64,128,256,512,1024,2048,4096,8192 \
    --out "$OUT/bench_sampler.json"
  stage bench_step "$PY" experiments/bench_step.py --device cuda --arch resnet18 --size 96 --batch 256 --amp bf16 \
    --estimators simclr,emc2,emc2_q025,emc2_stale_drop --no-trainer --out "$OUT/bench_step.json"
fi
stage summary "$PY" scripts/gpu_check_summary.py "$OUT"
log "done in $((SECONDS - T0)) s; summary: $OUT/summary.json"
exit "$FAILED"
