"""The kernels compiled ahead of time and inspected, on a CPU: the tool behind the README's two compile
tables and the cost contract's per-arch checks (DESIGN §2: no spills in bf16/fp16, shared memory
within each arch's limit, wgmma on sm_90, mma.sync on sm_8x).

Nothing here runs in a training step; it compiles what :mod:`duallora_kernels.ops` launches and
reads the machine code, so it lives apart from the ops.

* :mod:`.aot`                 ``python -m duallora_kernels.compiled.aot``: every Triton kernel, captured
  from real launches, compiled for sm_90/89/86/80 (bench/results/compile-<triton>.json)
* :mod:`.aot_table`           that table's schema, its JSON layout and what a row breaks of the contract
* :mod:`.cubin`               reading a cubin (cuobjdump) and a kernel's Triton IR
* :mod:`.cuda_aot`            ``python -m duallora_kernels.compiled.cuda_aot``: csrc/'s tensor-core kernels
  compiled by nvcc per arch (bench/results/cuda-compile-<nvcc>.json)
* :mod:`.compile_table`, :mod:`.cuda_compile_table`  the README sections rendered from those tables
  (``python -m duallora_kernels.readme``)

Import the module you need; this package re-exports nothing.
"""
