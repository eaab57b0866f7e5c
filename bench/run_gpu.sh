#!/usr/bin/env bash
# The GPU run of bench/README.md as ONE command that fits a lent GPU machine: at most 600 s for
# the command, a fresh machine (python3, torch and triton, timm/peft/pytest-benchmark, no internet,
# this package NOT installed: it runs from the tree through PYTHONPATH), and only the files
# written under $OUT come back (at most 8), plus the last 12,000 characters of output.
#
# In priority order, each step under its own `timeout`, each writing under $OUT as it goes (the
# commands rewrite their JSON after every variant, so a step cut off at its limit still returns
# what finished, marked "complete": false):
#   1. setup         the device, versions and commit; the device slug that names the files; one line
#                    of warning when torch/triton/numpy lie outside the tested range (README)
#   2. kernel-tests  the Triton kernel tests compiled on the GPU, and the drop-in under autocast and
#                    Inductor (tests/test_gpu_dropin.py) (fixed configs, DUALLORA_AUTOTUNE=0;
#                    the backend="cuda" tests deselected: the CUDA extension has its own issue)
#   3. headline      bf16, the four ViT-B/16 layers, ranks 16 and 64, batch 64: frozen, the three
#                    Triton designs side by side (single-loop, split, split with TMA; the first run decides
#                    ops/fused_linear.py's MEASURED), fused as `auto` picks, torch.compile'd unfused,
#                    PEFT, unfused, with device-op counts and each row's floor; the first kept
#                    config of each kernel (DUALLORA_AUTOTUNE=1: the tile lists are ordered by preference)
#   4. memory        saved bytes (the four layers, a whole ViT-B/16)
#   5. plan-check    the memory planner against the GPU: ViT-B/16 training steps (float32 parameters,
#                    bf16 autocast, AdamW) of fused / fused with A fixed (B-only training) / unfused /
#                    PEFT / full fine-tuning / frozen at
#                    batches 32 and 64, torch.cuda.max_memory_allocated and max_memory_reserved beside
#                    the prediction and its error; also the device's CUDA context (the step's peak
#                    memory that step 4 measured before, now measured here with the prediction)
# The limits add up to under 8 minutes (the dry run prints the sum). At the end: one summary line
# per step, also in $OUT/summary.txt. Exit status: 0 when every step exited 0, else 1.
#   6. cuda-backend  NOT in the default run (its build alone may take minutes): a second lease
#                    command, STEPS=cuda-backend bash bench/run_gpu.sh, builds the CUDA C++ extension
#                    for the device's arch only (needs nvcc there), runs the backend="cuda" tests,
#                    and benches frozen / fused / cuda on the headline's layers
#
#   OUT=/some/dir bash bench/run_gpu.sh                   # from anywhere; default OUT: <repo>/runs/gpu-<UTC time>
#   DRY_RUN=1 bash bench/run_gpu.sh   (or --dry-run)      # print the plan: steps, limits, commands, outputs
#   STEPS=setup,kernel-tests bash bench/run_gpu.sh        # a subset (the order stays the priority order)
#   DUALLORA_GIT_COMMIT=<sha> bash bench/run_gpu.sh       # where the copy has no .git: the commit for the files
#   bash bench/run_gpu.sh --collect DIR                   # back home: copy DIR's results into bench/results/,
#                                                         # regenerate the README table and the designs
#                                                         # measured fastest (ops/fused_linear_measured.py)
# Limits (seconds): SETUP_LIMIT TESTS_LIMIT HEADLINE_LIMIT MEMORY_LIMIT PLAN_LIMIT CUDA_LIMIT; WORKERS (pytest-xdist
# processes when xdist imports; 0: none); PY (default python3); DUALLORA_TEST_SEED.
set -u
START=$PWD  # relative OUT and --collect paths are relative to where the script was started
cd "$(dirname "$0")/.."
ROOT=$PWD
abs() { case $1 in /*) echo "$1" ;; *) echo "$START/$1" ;; esac; }

DRY_RUN=${DRY_RUN:-0}
COLLECT=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run|-n) DRY_RUN=1 ;;
        --collect) COLLECT=${2:?--collect needs the folder the files came back in}; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run_gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# ----------------------------------------------------------------------------- back home: collect
# RESULTS_DIR (default bench/results) and README_FILE (default README.md) are for tests.
if [ -n "$COLLECT" ]; then
    if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
    COLLECT=$(abs "$COLLECT")
    RESULTS_DIR=${RESULTS_DIR:-bench/results}
    README_FILE=${README_FILE:-README.md}
    shopt -s nullglob
    files=("$COLLECT"/*.json "$COLLECT"/*-kernel-tests.txt)
    if [ ${#files[@]} = 0 ]; then
        echo "run_gpu.sh --collect: no *.json or *-kernel-tests.txt in $COLLECT" >&2
        exit 1
    fi
    mkdir -p "$RESULTS_DIR"
    for f in "${files[@]}"; do
        cp -v "$f" "$RESULTS_DIR/" || exit 1
    done
    "$PY" -m duallora_kernels.readme --section perf-table --section memory-plan --bench-results "$RESULTS_DIR" --readme "$README_FILE" || exit 1
    # the designs the headline measured fastest become design="auto"'s choice (ops/fused_linear_measured.py)
    if [ "$RESULTS_DIR" = bench/results ]; then
        "$PY" -m duallora_kernels.harness.design_choice --write || exit 1
        MEASURED_FILE=duallora_kernels/ops/fused_linear_measured.py
    fi
    echo "then: git add ${files[*]/#$COLLECT/$RESULTS_DIR} $README_FILE ${MEASURED_FILE:-}"
    exit 0
fi

PY=${PY:-python3}
DATE=$(date -u +%F)
OUT=${OUT:-$ROOT/runs/gpu-$(date -u +%Y%m%dT%H%M%S)}
OUT=$(abs "$OUT")
STEPS=${STEPS:-setup,kernel-tests,headline,memory,plan-check}
SETUP_LIMIT=${SETUP_LIMIT:-30}
TESTS_LIMIT=${TESTS_LIMIT:-140}
HEADLINE_LIMIT=${HEADLINE_LIMIT:-195}
MEMORY_LIMIT=${MEMORY_LIMIT:-35}
PLAN_LIMIT=${PLAN_LIMIT:-40}
CUDA_LIMIT=${CUDA_LIMIT:-540}
CAP=${CAP:-<capability>}       # the device's compute capability (9.0), set by the setup step
WORKERS=${WORKERS:-8}
SLUG=${SLUG:-<device-slug>}   # set by the setup step from the device's name
XDIST=                         # "-n $WORKERS " once the setup step found pytest-xdist
XDIST_KNOWN=0
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DUALLORA_TEST_SEED=${DUALLORA_TEST_SEED:-$(( (RANDOM << 16) | RANDOM ))}

LAYERS=vit_b.proj,vit_b.qkv,vit_b.fc1,vit_b.fc2
TEST_FILES="tests/test_fused_linear.py tests/test_gram.py tests/test_task_scores.py tests/test_stability.py tests/test_gpu_dropin.py"
CUDA_BUILD_PY='import time; t = time.time(); from duallora_kernels.ops.cuda import load_extension; load_extension(); print(f"CUDA extension built/loaded in {time.time() - t:.0f} s")'
SETUP_PY='import platform, numpy, torch, triton
from duallora_kernels._versions import range_warning
from duallora_kernels.harness.devices import device_slug
name = torch.cuda.get_device_name()
print(f"device: {name} (capability {torch.cuda.get_device_capability()}), {torch.cuda.device_count()} GPU(s)")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, numpy {numpy.__version__}, python {platform.python_version()}")
warning = range_warning()
if warning:
    print(warning)
print("slug:", device_slug(name))'

# The steps: name, limit, seconds to stop after the limit's signal, signal, outputs, command.
# Commands are built from $SLUG, known after the setup step, hence a function.
plan() {
    local p=$OUT/$SLUG-$DATE xdist=$XDIST
    [ "$XDIST_KNOWN" = 0 ] && [ "$WORKERS" != 0 ] && xdist="[-n $WORKERS if pytest-xdist imports] "
    STEP_NAMES=(setup kernel-tests headline memory plan-check cuda-backend)
    STEP_LIMITS=("$SETUP_LIMIT" "$TESTS_LIMIT" "$HEADLINE_LIMIT" "$MEMORY_LIMIT" "$PLAN_LIMIT" "$CUDA_LIMIT")
    STEP_GRACE=(5 10 5 5 5 10)
    STEP_SIGNAL=(TERM INT TERM TERM TERM TERM)
    STEP_OUTPUTS=("$OUT/run_gpu.log" "$p-kernel-tests.txt" "$p-headline.json" "$p-memory.json"
                  "$OUT/plan-check-$SLUG-$DATE.json" "$p-cuda.json")
    STEP_CMDS=(
        "$PY -c '<the device, versions and slug: SETUP_PY in this script>'"
        "DUALLORA_TEST_DEVICE=cuda TRITON_INTERPRET=0 DUALLORA_AUTOTUNE=0 $PY -m pytest -q -rs --tb=short --durations=10 $xdist-k 'not cuda_backend and not (gpu_backends and cuda)' $TEST_FILES"
        "DUALLORA_AUTOTUNE=1 $PY -m duallora_kernels.commands.bench --no-progress --dtype bfloat16 --shapes $LAYERS --ranks 16,64 --batch 64 --variants frozen,fused_single,fused_split,fused_tma,fused,unfused_compiled,peft,unfused --out $p-headline.json"
        "DUALLORA_AUTOTUNE=2 $PY -m duallora_kernels.commands.profile_memory --no-progress --scope layer,vit --dtype bfloat16 --rank 16 --shapes $LAYERS --batch 64 --vit-batch 64 --step-batch 64 --out $p-memory.json"
        "DUALLORA_AUTOTUNE=0 $PY -m duallora_kernels.harness.plan_check --batches 32,64 --variants fused,fused_fixed_a,unfused,peft,full_ft,frozen --out $OUT/plan-check-$SLUG-$DATE.json"
        "export TORCH_CUDA_ARCH_LIST=$CAP MAX_JOBS=16; $PY -c '$CUDA_BUILD_PY' || exit 3; DUALLORA_TEST_DEVICE=cuda TRITON_INTERPRET=0 $PY -m pytest -q -rs --tb=short -k 'cuda_backend or (gpu_backends and cuda)' tests/test_fused_linear.py tests/test_gram.py tests/test_task_scores.py; rc=\$?; DUALLORA_AUTOTUNE=2 $PY -m duallora_kernels.commands.bench --no-progress --dtype bfloat16 --shapes $LAYERS --ranks 16 --batch 64 --variants frozen,fused,cuda --out $p-cuda.json || rc=1; exit \$rc"
    )
}

selected() { case ",setup,$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }  # setup always runs

print_plan() {
    plan
    local i total=0 grace=0
    local what="run_gpu.sh plan"
    [ "$DRY_RUN" = 1 ] && what="$what (dry run: nothing runs)"
    echo "$what"
    echo "OUT=$OUT"
    echo "python: $PY; PYTHONPATH=$PYTHONPATH; date $DATE (UTC)"
    for i in "${!STEP_NAMES[@]}"; do
        selected "${STEP_NAMES[$i]}" || continue
        echo "step $((i + 1)) ${STEP_NAMES[$i]}: limit ${STEP_LIMITS[$i]} s (+${STEP_GRACE[$i]} s to stop), signal ${STEP_SIGNAL[$i]}"
        echo "  command: ${STEP_CMDS[$i]}"
        echo "  writes: ${STEP_OUTPUTS[$i]}"
        total=$((total + STEP_LIMITS[$i])); grace=$((grace + STEP_GRACE[$i]))
    done
    echo "also writes: $OUT/run_gpu.log (everything printed), $OUT/summary.txt (one line per step)"
    echo "total: $total s of limits + $grace s to stop = $((total + grace)) s"
}

if [ "$DRY_RUN" = 1 ]; then
    print_plan
    exit 0
fi

SUMMARY=()
FAILED=0
note() {  # one summary line per step
    SUMMARY+=("$1")
}

run_step() {  # index: run step i of the plan under its limit; output to the log (and its file for tests)
    local i=$1 name=${STEP_NAMES[$1]} limit=${STEP_LIMITS[$1]} rc
    echo
    echo "== step $((i + 1)) $name (limit ${limit} s): ${STEP_CMDS[$i]}"
    SECONDS=0
    if [ "$name" = kernel-tests ]; then  # the log file: the header, then pytest's output as it comes
        cat "$HEADER" >"${STEP_OUTPUTS[$i]}"
        timeout -s "${STEP_SIGNAL[$i]}" -k "${STEP_GRACE[$i]}" "$limit" bash -c "${STEP_CMDS[$i]}" 2>&1 | tee -a "${STEP_OUTPUTS[$i]}"
        rc=${PIPESTATUS[0]}
        echo "pytest: exit $rc after ${SECONDS} s (limit ${limit} s)" >>"${STEP_OUTPUTS[$i]}"
    else
        timeout -s "${STEP_SIGNAL[$i]}" -k "${STEP_GRACE[$i]}" "$limit" bash -c "${STEP_CMDS[$i]}"
        rc=$?
    fi
    local how="exit $rc"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && how="cut off at its limit (exit $rc)"
    local got=-
    [ -e "${STEP_OUTPUTS[$i]}" ] && got=${STEP_OUTPUTS[$i]}
    [ "$rc" = 0 ] || FAILED=1
    note "$name: $how after ${SECONDS} s (limit ${limit} s) -> $got"
}

main() {
    HEADER=$(mktemp)
    if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
        [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT (tree dirty)"
    else
        COMMIT="${DUALLORA_GIT_COMMIT:-unknown} (no .git here; DUALLORA_GIT_COMMIT)"
    fi
    print_plan
    echo
    echo "== step 1 setup (limit ${SETUP_LIMIT} s)"
    SECONDS=0
    local setup rc
    setup=$(timeout -k 5 "$SETUP_LIMIT" "$PY" -c "$SETUP_PY" 2>&1)
    rc=$?
    echo "$setup"
    if [ "$rc" != 0 ]; then
        note "setup: exit $rc after ${SECONDS} s: no CUDA device or no torch/triton for $PY (above); nothing else ran"
        finish
        return 1
    fi
    SLUG=$(printf '%s\n' "$setup" | sed -n 's/^slug: //p')
    CAP=$(printf '%s\n' "$setup" | sed -n 's/.*(capability (\([0-9]*\), \([0-9]*\))).*/\1.\2/p')
    if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n $WORKERS "; fi
    XDIST_KNOWN=1
    plan
    {
        echo "# duallora kernel tests, compiled on a GPU: bash bench/run_gpu.sh (step kernel-tests)"
        echo "# date: $(date -u '+%F %T') UTC"
        echo "# git commit: $COMMIT"
        printf '%s\n' "$setup" | grep -v '^slug: ' | sed 's/^/# /'
        command -v nvidia-smi >/dev/null && echo "# driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
        echo "# env: DUALLORA_TEST_SEED=$DUALLORA_TEST_SEED; xdist: ${XDIST:-off}"
        echo "# command: ${STEP_CMDS[1]}"
        echo
    } >"$HEADER"
    cat "$HEADER"
    note "setup: exit 0 after ${SECONDS} s (limit ${SETUP_LIMIT} s) -> $SLUG, commit $COMMIT"
    local i
    for i in 1 2 3 4 5; do
        if selected "${STEP_NAMES[$i]}"; then run_step "$i"; else note "${STEP_NAMES[$i]}: not run (STEPS=$STEPS)"; fi
    done
    rm -f "$HEADER"
    finish
    return "$FAILED"
}

finish() {
    echo
    echo "== summary (files under $OUT: copy them home with: bash bench/run_gpu.sh --collect <that folder>)"
    printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
}

mkdir -p "$OUT" || exit 1
main 2>&1 | tee "$OUT/run_gpu.log"
exit "${PIPESTATUS[0]}"
