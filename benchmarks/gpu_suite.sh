#!/usr/bin/env bash
# The GPU checks in one call: CUDA tests, then the CUDA benchmarks, each writing its output
# into one folder, for a GPU session to run once and bring back (docs/benchmarks.md, "GPU
# suite"). Sized for one H100 in under 8 minutes: every step has its own timeout, and a
# total budget (SUITE_BUDGET_S, default 450 s) cuts the later steps short or skips them.
# A failed or timed-out step is recorded and the suite goes on; summary.json has each
# step's exit status, seconds and files. The suite itself exits 0 unless it could not
# start (its result is summary.json, not its exit status).
#
#   bash benchmarks/gpu_suite.sh               # on the GPU machine (OUT=gpu_results)
#   OUT=$OUT/gpu bash benchmarks/gpu_suite.sh  # e.g. under the device runner's $OUT
#   bash benchmarks/gpu_suite.sh --dry-run     # print the steps and their timeouts
#   bash benchmarks/gpu_suite.sh --cpu-smoke   # tiny CPU versions: checks the plumbing
#   (--dry-run --cpu-smoke prints the smoke steps)
#
# Environment: OUT (output folder, default gpu_results), PYTHON (default python),
# SUITE_BUDGET_S (default 450; 300 with --cpu-smoke), LIGER_WHEEL (optional path to a
# liger-kernel wheel: installed with --no-index --no-deps into a venv that sees this
# python's packages, for the Liger comparison; the GPU machine has no network, so without
# it the comparison runs only if liger_kernel is already importable, else it is skipped
# with the reason in its JSON).
set -u

MODE=gpu
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --cpu-smoke) MODE=smoke ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $arg (--dry-run, --cpu-smoke)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python}
if [ "$MODE" = smoke ]; then BUDGET=${SUITE_BUDGET_S:-300}; else BUDGET=${SUITE_BUDGET_S:-450}; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
START=$(date +%s)
STEPS_JSON=""

json_escape() {  # a string as a JSON string literal
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/ }
    printf '"%s"' "$s"
}

# step NAME TIMEOUT_S OUTPUT_FILE COMMAND...: stdout to $OUT/OUTPUT_FILE, stderr to
# $OUT/NAME.log, exit status and seconds into the summary.
step() {
    local name=$1 limit=$2 output=$3
    shift 3
    local command="$*"
    local now left status rc seconds began
    now=$(date +%s)
    left=$((BUDGET - (now - START)))
    if [ "$DRY" = 1 ]; then
        printf '%-26s timeout %4ss  > %s/%s\n    %s\n' "$name" "$limit" "$OUT" "$output" "$command"
        return 0
    fi
    if [ "$left" -lt 20 ]; then
        status="skipped"; rc=-1; seconds=0
        echo "[gpu_suite] $name: skipped (${left}s of the ${BUDGET}s budget left)" >&2
    else
        [ "$limit" -gt "$left" ] && limit=$left
        echo "[gpu_suite] $name (timeout ${limit}s): $command" >&2
        began=$(date +%s.%N)
        timeout --kill-after=15 "$limit" "$@" > "$OUT/$output" 2> "$OUT/$name.log"
        rc=$?
        seconds=$(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        case $rc in
            0) status="ok" ;;
            124|137) status="timeout" ;;
            *) status="failed" ;;
        esac
        echo "[gpu_suite] $name: $status (rc $rc, ${seconds}s)" >&2
    fi
    local entry
    entry="{\"name\": $(json_escape "$name"), \"status\": \"$status\", \"rc\": $rc"
    entry+=", \"seconds\": $seconds, \"timeout_s\": $limit"
    entry+=", \"output\": $(json_escape "$output"), \"log\": $(json_escape "$name.log")"
    entry+=", \"command\": $(json_escape "$command")}"
    STEPS_JSON+="${STEPS_JSON:+,
  }$entry"
}

if [ "$DRY" = 0 ]; then
    mkdir -p "$OUT" || exit 2
fi

# Liger-Kernel for the comparison: importable as it is, or from a carried wheel.
LIGER_PY=$PY
if [ "$DRY" = 0 ] && [ -n "${LIGER_WHEEL:-}" ] && [ -f "${LIGER_WHEEL}" ] \
        && ! "$PY" -c "import liger_kernel" 2>/dev/null; then
    VENV=${TMPDIR:-/tmp}/gpu_suite_liger_venv
    if "$PY" -m venv --system-site-packages "$VENV" > "$OUT/liger_install.log" 2>&1 \
            && "$VENV/bin/python" -m pip install --no-index --no-deps "$LIGER_WHEEL" \
                >> "$OUT/liger_install.log" 2>&1; then
        LIGER_PY=$VENV/bin/python
    fi
fi

if [ "$MODE" = smoke ]; then
    # The same scripts at tiny sizes on the CPU (the CUDA tests: deselected or skipped).
    step environment 60 environment.json "$PY" -c "import json, os, platform, torch
print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda,
    cuda_available=torch.cuda.is_available(), python=platform.python_version(),
    cpu_count=os.cpu_count(), load_average=os.getloadavg())))"
    step pytest_cuda 120 pytest_cuda.log "$PY" -m pytest -q -rs -k cuda \
        --junitxml "$OUT/pytest_cuda.xml" tests/test_precision.py tests/test_engine.py
    # With Liger importable, its kernels run in Triton's interpreter at β 0.3 (a check of
    # the calls and of the β convention: every loss must equal the fp64 reference).
    LIGER_CPU=()
    if [ "$DRY" = 0 ] && "$LIGER_PY" -c "import liger_kernel" 2>/dev/null; then
        LIGER_CPU=(--liger-on-cpu --beta 0.3)
    fi
    step lm_loss_liger 120 lm_loss_liger.json "$LIGER_PY" benchmarks/lm_loss_liger.py \
        --device cpu --tiny --warmup 1 --repeats 2 --table "${LIGER_CPU[@]}"
    step lm_loss 120 lm_loss.jsonl "$PY" benchmarks/lm_loss.py --device cpu --vocab 1000 \
        --tokens 256 --hidden-student 32 --hidden-teacher 64 --chunk-size 64 --repeats 2
    step lm_distiller 150 lm_distiller.jsonl "$PY" benchmarks/lm_distiller.py --device cpu \
        --vocab 1000 --tokens 256 --length 64 --hidden-teacher 64 --hidden-student 32 \
        --layers-teacher 2 --layers-student 1 --steps 2 --warmup 1 --path fused
    step throughput_fp32 150 throughput_fp32.json "$PY" benchmarks/throughput.py \
        --device cpu --jobs logits --precisions fp32 --steps 2 --warmup 1 \
        --scratch "$OUT/scratch_throughput"
    step throughput_bf16 150 throughput_bf16.json "$PY" benchmarks/throughput.py \
        --device cpu --jobs logits --precisions bf16 --steps 2 --warmup 1 \
        --scratch "$OUT/scratch_throughput"
else
    step environment 60 environment.json "$PY" -c "import json, os, platform, subprocess, torch
smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                      '--format=csv,noheader'], capture_output=True, text=True)
try:
    import liger_kernel, importlib.metadata as m
    liger = m.version('liger-kernel')
except Exception as error:
    liger = f'unavailable: {type(error).__name__}: {error}'
print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda,
    cuda_available=torch.cuda.is_available(),
    device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    nvidia_smi=smi.stdout.strip(), python=platform.python_version(),
    cpu_count=os.cpu_count(), liger_kernel_in_python=liger,
    liger_python='$LIGER_PY')))"
    # CUDA tests are the ones whose id has 'cuda' (skipif(not torch.cuda.is_available())).
    step pytest_cuda 150 pytest_cuda.log "$PY" -m pytest -q -rs -k cuda \
        --junitxml "$OUT/pytest_cuda.xml" tests
    # Issue 19's comparison: JSD at H 4096 (student 2048), V 128,256, 8,192 tokens, bf16.
    step lm_loss_liger 150 lm_loss_liger.json "$LIGER_PY" benchmarks/lm_loss_liger.py \
        --device cuda --warmup 3 --repeats 10 --table
    step lm_loss 120 lm_loss.jsonl "$PY" benchmarks/lm_loss.py --device cuda --vocab 128256 \
        --tokens 8192 --hidden-student 2048 --hidden-teacher 4096 --dtype bfloat16 \
        --chunk-size 1024
    step lm_distiller 120 lm_distiller.jsonl "$PY" benchmarks/lm_distiller.py --device cuda \
        --vocab 128256 --tokens 8192 --length 1024 --hidden-teacher 1024 \
        --hidden-student 512 --dtype bfloat16 --path fused
    step throughput_fp32 90 throughput_fp32.json "$PY" benchmarks/throughput.py --device cuda \
        --precisions fp32 --scratch "$OUT/scratch_throughput"
    step throughput_bf16 90 throughput_bf16.json "$PY" benchmarks/throughput.py --device cuda \
        --precisions bf16 --scratch "$OUT/scratch_throughput"
    step throughput_bf16_compile 180 throughput_bf16_compile.json "$PY" \
        benchmarks/throughput.py --device cuda --precisions bf16+compile \
        --scratch "$OUT/scratch_throughput"
fi

if [ "$DRY" = 1 ]; then
    echo "(dry run: nothing executed; mode $MODE, budget ${BUDGET}s, OUT=$OUT)"
    exit 0
fi
rm -rf "$OUT/scratch_throughput"
TOTAL=$(( $(date +%s) - START ))
{
    echo "{\"suite\": \"gpu_suite\", \"mode\": \"$MODE\", \"budget_s\": $BUDGET,"
    echo " \"total_seconds\": $TOTAL, \"started_utc\": \"$(date -u -d "@$START" +%FT%TZ)\","
    echo " \"git_commit\": $(json_escape "$(git rev-parse HEAD 2>/dev/null || echo unknown)"),"
    echo " \"steps\": [$STEPS_JSON]}"
} > "$OUT/summary.json"
echo "[gpu_suite] done in ${TOTAL}s: $OUT/summary.json" >&2
exit 0
