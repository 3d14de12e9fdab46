#!/usr/bin/env bash
# ONE run on the GPU machine (issue 19): the CUDA tests and every GPU timing, in well under 10 minutes.
#
# 1. Here, once (copies the pure-Python packages the GPU image lacks, torch-pruning and
#    segmentation-models-pytorch, out of this checkout's venv into .gpu_site/, git-ignored by .gitignore):
#        bash benchmarks/gpu_check.sh prepare
# 2. On the GPU machine (device tool `run`, from the repository root; carry [".gpu_site"], timeout_s 600):
#        bash benchmarks/gpu_check.sh
#    Writes to $OUT (default benchmarks/results/gpu_check): gpu_check.log (steps, exit codes, times),
#    env.json (versions, GPU), one log per step (import_check.log, cuda_tests.log: the pytest output,
#    speed.log) and speed/speed.json (speed.py on cuda: resnet18, K=10, batch 256, 32x32 + 64x64 + 224x224,
#    bucketed and grouped paths side by side, channel packages both ways, peak memory with and without the
#    bounded cache, training and ticket search) and search_grouped.json + .log (sequential vs grouped ticket
#    search vs single IMP, issue 19 part 3). 8 files (the device tool returns at most 8).
# 3. Dry run here on the CPU (same steps, quick sizes; the CUDA tests skip):
#        GPU_CHECK_DEVICE=cpu OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# Step limits (seconds): import check 90, CUDA tests 210, speed 200, grouped search 100: at most ~10 minutes. A failing
# step is logged and the next one still runs; the script exits non-zero if any step failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SITE="$ROOT/.gpu_site"

if [[ "${1:-}" == "prepare" ]]; then
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    [[ -x "$PY" ]] || PY="$(command -v python3)"
    SP="$("$PY" -c 'import torch_pruning, os; print(os.path.dirname(os.path.dirname(torch_pruning.__file__)))')"
    rm -rf "$SITE" && mkdir -p "$SITE"
    for pkg in torch_pruning segmentation_models_pytorch; do
        cp -r "$SP/$pkg" "$SITE/"
        cp -r "$SP/$pkg"-*.dist-info "$SITE/" 2>/dev/null || cp -r "$SP/${pkg//_/-}"-*.dist-info "$SITE/"
    done
    find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
    git check-ignore -q "$SITE" || echo "warning: .gpu_site/ is not git-ignored (.gitignore lists it)"
    du -sh "$SITE"
    exit 0
fi

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
# the source tree maps rtl_plugin.integrations to integrations/ through a git-ignored link that does not travel
if [[ ! -e rtl_plugin/integrations ]]; then  # removed again on exit: a dry run must not leave it in a checkout
    ln -s ../integrations rtl_plugin/integrations
    trap 'rm -f "$ROOT/rtl_plugin/integrations"' EXIT
fi
LOG="$OUT/gpu_check.log"
FAILED=0

step() {  # step NAME SECONDS CMD...: run with a time limit; output to $OUT/NAME.log; exit code and time to $LOG
    local name=$1 limit=$2 rc t0
    shift 2
    t0=$(date +%s)
    echo "=== [$(date -u +%FT%TZ)] $name (limit ${limit}s): $*" >> "$LOG"
    set +e
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    set -e
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" >> "$LOG"
    echo "$name: exit $rc after $(( $(date +%s) - t0 ))s"
    [[ $rc -eq 0 ]] || FAILED=1
    return $rc
}

echo "gpu_check on $DEVICE, commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" > "$LOG"
step import_check 90 "$PY" - "$OUT/env.json" "$DEVICE" <<'EOF' || { echo "import check failed: see $LOG"; exit 1; }
import json, platform, sys
import torch, timm, torch_pruning, segmentation_models_pytorch as smp, torchaudio
import rtl_plugin
from rtl_plugin.integrations.audio import AudioUNet  # noqa: F401
out, device = sys.argv[1], sys.argv[2]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible")
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "timm": timm.__version__, "torch_pruning": getattr(torch_pruning, "__version__", "?"),
        "smp": smp.__version__, "torchaudio": torchaudio.__version__, "rtl_plugin": rtl_plugin.__file__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
json.dump(info, open(out, "w"), indent=1)
print(info)
EOF

if [[ "$DEVICE" == "cuda" ]]; then
    SPEED_ARGS=(--device cuda --image2 64,224 --train-image2 64)
else
    SPEED_ARGS=(--device cpu --quick --image2 40 --train-image2 "")
fi
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 120)
step cuda_tests 210 "$PY" -m pytest -q -p no:cacheprovider -rs "${PER_TEST[@]}" \
    tests/integrations/test_cuda.py tests/core/test_grouped.py tests/persist/test_stacked.py \
    tests/persist/test_deploy.py tests/pruning/test_grouped_search.py -k "cuda or Cuda" || true
tail -1 "$OUT/cuda_tests.log" >> "$LOG"
step speed 200 "$PY" benchmarks/speed.py "${SPEED_ARGS[@]}" --out "$OUT/speed" || true
if [[ "$DEVICE" == "cuda" ]]; then
    SEARCH_ARGS=(--device cuda --threads 4 --reps 2)
else
    SEARCH_ARGS=(--device cpu --model test_resnet --image 16 --tickets 3 --batches 2 --batch 8)
fi
step search_grouped 100 "$PY" benchmarks/search_grouped.py "${SEARCH_ARGS[@]}" --out "$OUT/search_grouped.json" || true
echo "files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')" | tee -a "$LOG"
exit $FAILED
