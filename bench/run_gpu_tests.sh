#!/usr/bin/env bash
# The Triton kernel tests compiled on a CUDA GPU (an H100/H200), not in Triton's CPU interpreter:
# the same test files, assertions and tolerances as CI's interpreter run, on CUDA tensors, plus the
# CUDA-backend tests (backend="cuda", csrc/) that the CPU skips. Everything it prints goes to
# bench/results/<device-slug>-<YYYY-MM-DD>-kernel-tests.txt, with the device, the torch/triton
# versions and the git commit on top. Sized for a ~15-minute device lease (machine start included):
#   1. build or load the CUDA extension (limit EXT_LIMIT s); if that fails, its tests are
#      deselected, not retried test by test (each retry would rebuild);
#   2. pytest on the kernel test files (limit TESTS_LIMIT s, then SIGINT, so pytest still prints
#      what passed and failed so far), over WORKERS pytest-xdist processes where xdist is installed
#      (compiling the kernels' many specializations is CPU work), with DUALLORA_AUTOTUNE=0: one fixed
#      config per kernel (duallora_kernels/ops/_kernel_utils.py), not the Hopper autotuning lists.
#
#   bash bench/run_gpu_tests.sh                               # from the repository root
#   PY=/path/to/python bash bench/run_gpu_tests.sh            # default: python, else python3
#   DUALLORA_GIT_COMMIT=<sha> bash bench/run_gpu_tests.sh     # where the copy has no .git
#   DUALLORA_TEST_SEED=<seed> bash bench/run_gpu_tests.sh     # replay a run's inputs (the seed is in the log)
#   EXT_LIMIT=180 TESTS_LIMIT=330 WORKERS=8 bash bench/run_gpu_tests.sh   # the defaults (WORKERS=0: no xdist)
# At most about 9 minutes (both limits, plus 30 s for pytest to stop). Exit status: pytest's
# (124 when it hit TESTS_LIMIT), or 1 when there is no CUDA device.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python || command -v python3)}
EXT_LIMIT=${EXT_LIMIT:-180}
TESTS_LIMIT=${TESTS_LIMIT:-330}
WORKERS=${WORKERS:-8}
TEST_FILES=(tests/test_fused_linear.py tests/test_gram.py tests/test_task_scores.py tests/test_stability.py)

export DUALLORA_TEST_DEVICE=cuda TRITON_INTERPRET=0 DUALLORA_AUTOTUNE=${DUALLORA_AUTOTUNE:-0} PYTHONUNBUFFERED=1
# One seed for every xdist worker (each would draw its own), printed below for a replay.
export DUALLORA_TEST_SEED=${DUALLORA_TEST_SEED:-$(( (RANDOM << 16) | RANDOM ))}

if ! SLUG=$($PY -c "import torch; from duallora_kernels.benchmark import device_slug; print(device_slug(torch.cuda.get_device_name()))"); then
    echo "run_gpu_tests.sh: no CUDA device to name with $PY (error above); the CPU suite is TRITON_INTERPRET=1 $PY -m pytest -q" >&2
    exit 1
fi
LOG=bench/results/$SLUG-$(date +%F)-kernel-tests.txt
mkdir -p bench/results

if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
    [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT (tree dirty)"
else
    COMMIT="${DUALLORA_GIT_COMMIT:-unknown} (no .git here; DUALLORA_GIT_COMMIT)"
fi

XDIST=()
if [ "$WORKERS" != 0 ] && $PY -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$WORKERS")
fi

{
    echo "# duallora kernel tests, compiled on a GPU: bash bench/run_gpu_tests.sh"
    echo "# date: $(date -u '+%F %T') UTC"
    echo "# git commit: $COMMIT"
    $PY -c "
import platform, torch, triton
print(f'# device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})')
print(f'# torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, python {platform.python_version()}')"
    command -v nvidia-smi >/dev/null && echo "# driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
    echo "# env: DUALLORA_TEST_DEVICE=cuda TRITON_INTERPRET=0 DUALLORA_AUTOTUNE=$DUALLORA_AUTOTUNE DUALLORA_TEST_SEED=$DUALLORA_TEST_SEED"
    echo "# limits: EXT_LIMIT=${EXT_LIMIT}s TESTS_LIMIT=${TESTS_LIMIT}s; xdist: ${XDIST[*]:-off}"
    echo

    echo "== 1. the CUDA extension (backend='cuda'): prebuilt duallora_kernels._C or JIT-built from csrc/"
    SECONDS=0
    timeout -k 10 "$EXT_LIMIT" $PY -c "from duallora_kernels.ops import cuda; print('loaded:', cuda.load_extension().__file__)"
    ext_rc=$?
    echo "CUDA extension: exit $ext_rc after ${SECONDS}s"
    KFILTER=()
    if [ "$ext_rc" != 0 ]; then
        KFILTER=(-k "not cuda_backend and not (gpu_backends and cuda)")
        echo "the CUDA-backend tests are deselected: the extension did not build or load (above)"
    fi
    echo

    echo "== 2. pytest ${TEST_FILES[*]}"
    SECONDS=0
    timeout -s INT -k 30 "$TESTS_LIMIT" $PY -m pytest -rs --tb=short --durations=15 \
        ${XDIST[@]+"${XDIST[@]}"} ${KFILTER[@]+"${KFILTER[@]}"} "${TEST_FILES[@]}"
    rc=$?
    echo "pytest: exit $rc after ${SECONDS}s$([ "$rc" = 124 ] && echo " (stopped at TESTS_LIMIT=${TESTS_LIMIT}s)")"
    exit "$rc"
} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "log: $LOG"
exit "$rc"
