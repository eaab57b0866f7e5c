#!/usr/bin/env bash
# The Triton kernel tests compiled on a CUDA GPU alone: the setup and kernel-tests steps of
# bench/run_gpu.sh (same environment, limits and outputs under $OUT; see that script).
#
#   OUT=/some/dir bash bench/run_gpu_tests.sh
#   DRY_RUN=1 bash bench/run_gpu_tests.sh        # the plan
exec env STEPS=setup,kernel-tests bash "$(dirname "$0")/run_gpu.sh" "$@"
