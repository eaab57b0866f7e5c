#!/usr/bin/env bash
# The GPU results of bench/README.md in one go, on an H100/H200 (or any CUDA GPU): the full timing
# matrix, the memory profile, then the README table. Each step has a time limit so one slow step
# cannot eat the others' time; partial JSON is still written (its "complete" is false).
#
#   bash bench/run_gpu.sh            # from the repository root
#   PY=/path/to/python bash bench/run_gpu.sh
#   DUALLORA_GIT_COMMIT=<sha> bash bench/run_gpu.sh   # where the copy has no .git: the commit for the JSON
# `python -m duallora_kernels.commands.bench ...` is `duallora bench ...` without importing the other
# subcommands (and so without their dependencies).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
DATE=$(date +%F)
SLUG=$($PY -c "import torch; from duallora_kernels.benchmark import device_slug; print(device_slug(torch.cuda.get_device_name()))")
BENCH_LIMIT=${BENCH_LIMIT:-420}
MEMORY_LIMIT=${MEMORY_LIMIT:-300}

$PY -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"

timeout "$BENCH_LIMIT" $PY -m duallora_kernels.commands.bench --no-progress \
    --dtype float32,bfloat16 --ranks 4,8,16,32,64 --batch 64 \
    --out "bench/results/$SLUG-$DATE.json"
echo "bench: exit $?"

timeout "$MEMORY_LIMIT" $PY -m duallora_kernels.commands.profile_memory --no-progress \
    --dtype bfloat16 --rank 16 --batch 64 --vit-batch 64 --step-batch 64 --budgets 8,12,16,24 \
    --out "bench/results/$SLUG-$DATE-memory.json"
echo "profile-memory: exit $?"

$PY bench/render_table.py
