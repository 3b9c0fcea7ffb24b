#!/usr/bin/env bash
# The CUDA checks of the Triton path, in one run of about 3-4 minutes on one H100/H200:
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh          # from the repository root, on the GPU machine
#
# 1. tests/test_kernels_triton.py compiled on CUDA (TRITON_INTERPRET=0), the >2**31-element test included;
# 2. benchmarks/step.py on the 50.9M-param transformer set, fp32 and bf16: FAdam fused/default against AdamW fused
#    (the for-loop reference is kept for the correctness check);
# 3. benchmarks/gpu_step.py at the default launch configuration: per-kernel GPU time, host enqueue time, kernels
#    per step, sync-free check, check against the for-loop; then a cProfile of the host side of 20 fused steps;
# 4. benchmarks/step.py --host-only: the launcher's host time with the kernels stubbed, on this machine's CPU.
#
# It needs only what the GPU image has (python3 with torch, triton, pytest; pytest-xdist is used when present to
# compile the test kernels in parallel): the package runs from the checkout (PYTHONPATH), nothing is installed.
# Each step has its own time limit, and a failing step does not stop the next ones. Everything printed goes to
# $OUT/gpu_check.log; the result tables to $OUT/results.md; the CSV/JSON files to $OUT/results.tar.gz (3 files).
#
# GPU_CHECK_SMOKE=1 runs the same steps on CPU under TRITON_INTERPRET=1 with tiny sizes: a check of this script on
# a machine without a GPU, not a measurement.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SMOKE="${GPU_CHECK_SMOKE:-0}"
LOG="$OUT/gpu_check.log"
: >"$LOG"
status=0

log() { echo "$@" | tee -a "$LOG"; }

run_step() {  # run_step NAME SECONDS CMD...: time-limited, logged, failure recorded but not fatal
    local name="$1" limit="$2"
    shift 2
    log ""
    log "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
    log "=== $name: exit $rc after $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

log "gpu_check.sh at $(date -u +%FT%TZ); smoke=$SMOKE; repo $ROOT"
{ nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"; } | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
EOF

if [ "$SMOKE" = "1" ]; then
    export TRITON_INTERPRET=1 HF_FADAM_CPU_FUSED_BACKEND=triton
    run_step "kernel tests (interpreted, subset)" 600 \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_triton.py -k "errors or one_launch or nonfinite"
    for dt in float32 bfloat16; do
        run_step "step benchmark $dt (cpu, quick)" 600 "$PY" benchmarks/step.py --device cpu --dtype "$dt" --quick \
            --steps 2 --warmup 0 --variants fadam_fused,adamw_fused --out "$WORK/step_${dt}"
    done
    run_step "gpu_step (smoke)" 600 "$PY" benchmarks/gpu_step.py --smoke --steps 2 --warmup 1 \
        --configs c16k-b2k/1k/1k-w4 --dtypes float32 --extra-sets "" --out "$WORK/gpu_step"
else
    export TRITON_INTERPRET=0
    XDIST=()
    if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
    run_step "kernel tests (CUDA)" 200 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
        tests/test_kernels_triton.py
    for dt in float32 bfloat16; do
        run_step "step benchmark $dt (cuda)" 60 "$PY" benchmarks/step.py --device cuda --dtype "$dt" \
            --variants fadam_fused,fadam_default,adamw_fused --out "$WORK/step_cuda_${dt}"
    done
    run_step "gpu_step (transformer set, default config)" 60 "$PY" benchmarks/gpu_step.py \
        --configs c16k-b2k/1k/1k-w4 --extra-sets "" --steps 20 --out "$WORK/gpu_step"
    run_step "host profile of 20 fused steps" 30 "$PY" benchmarks/gpu_step.py --host-profile --out "$WORK/unused"
    run_step "hardening + 8-bit tests (CUDA)" 150 "$PY" -m pytest -q \
        -p no:cacheprovider "${XDIST[@]}" -m cuda tests/test_hardening.py tests/test_8bit.py
    run_step "FAdam8bit Triton kernel (CUDA: correctness, speed, state bytes)" 150 "$PY" benchmarks/gpu_8bit_check.py \
        --out "$WORK/gpu_8bit"
fi
run_step "launcher host time (kernels stubbed, this CPU)" 60 env TRITON_INTERPRET=1 "$PY" benchmarks/step.py \
    --host-only --dtype float32,bfloat16 --out "$WORK/host_only"

cat "$WORK"/*.md >"$OUT/results.md" 2>/dev/null || echo "(no result tables)" >"$OUT/results.md"
(cd "$WORK" && tar czf "$OUT/results.tar.gz" ./*.csv ./*.json ./*.md 2>/dev/null) || true
rm -rf "$WORK"
log ""
log "gpu_check.sh done: $([ $status -eq 0 ] && echo 'every step passed' || echo 'SOME STEP FAILED (see above)')"
exit $status
