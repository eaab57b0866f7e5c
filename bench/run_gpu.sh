#!/usr/bin/env bash
# The GPU results of bench/README.md in one go, on an H100/H200 (or any CUDA GPU), most important
# first, each step under a time limit so a slow step cannot eat the others' time (every command
# rewrites its JSON as it goes; a cut-short file has "complete": false and keeps its rows):
#   1. the goal's cases: bfloat16, the four ViT-B/16 layers, rank 16, batch 64   -> <slug>-<date>-headline.json
#   2. the memory profile (saved bytes, training step, largest batch per budget) -> <slug>-<date>-memory.json
#   3. the full matrix: six shapes, ranks 4..64, float32 and bfloat16           -> <slug>-<date>.json
#   4. the README table
#
#   bash bench/run_gpu.sh                              # from the repository root
#   PY=/path/to/python bash bench/run_gpu.sh
#   DUALLORA_GIT_COMMIT=<sha> bash bench/run_gpu.sh    # where the copy has no .git: the commit for the JSON
# `python -m duallora_kernels.commands.bench ...` is `duallora bench ...` without importing the other
# subcommands (and so without their dependencies).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
DATE=$(date +%F)
SLUG=$($PY -c "import torch; from duallora_kernels.benchmark import device_slug; print(device_slug(torch.cuda.get_device_name()))")
HEADLINE_LIMIT=${HEADLINE_LIMIT:-150}
MEMORY_LIMIT=${MEMORY_LIMIT:-240}
MATRIX_LIMIT=${MATRIX_LIMIT:-420}

$PY -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"

timeout "$HEADLINE_LIMIT" $PY -m duallora_kernels.commands.bench --no-progress \
    --dtype bfloat16 --shapes vit_b.proj,vit_b.qkv,vit_b.fc1,vit_b.fc2 --ranks 16 --batch 64 \
    --out "bench/results/$SLUG-$DATE-headline.json"
echo "bench (headline): exit $?"

timeout "$MEMORY_LIMIT" $PY -m duallora_kernels.commands.profile_memory --no-progress \
    --dtype bfloat16 --rank 16 --batch 64 --vit-batch 64 --step-batch 64 --budgets 8,12,16,24 \
    --out "bench/results/$SLUG-$DATE-memory.json"
echo "profile-memory: exit $?"

timeout "$MATRIX_LIMIT" $PY -m duallora_kernels.commands.bench --no-progress \
    --dtype bfloat16,float32 --ranks 4,8,16,32,64 --batch 64 \
    --out "bench/results/$SLUG-$DATE.json"
echo "bench (full matrix): exit $?"

$PY bench/render_table.py
