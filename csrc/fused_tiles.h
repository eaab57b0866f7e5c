// Tile shapes and shared-memory budgets of the tensor-core DualLoRA kernels (fused_forward.cu,
// fused_backward.cu). Plain C++ (no CUDA): duallora_kernels/compiled/cuda_aot.py compiles a tiny host
// program against this header to report the dynamic shared memory of every instantiation, and
// the kernels static_assert the same numbers against the limit of the arch being compiled.
#pragma once

#if defined(__CUDACC__)
#define DUALLORA_HD __host__ __device__  // the budgets are used in kernels and in host code
#else
#define DUALLORA_HD
#endif

namespace duallora {
namespace tiles {

constexpr int kThreads = 256;  // 8 warps: 2 (rows) x 4 (columns) of 64 x 32 warp tiles
constexpr int kBlockM = 128;   // rows of X / dY per block
constexpr int kBlockN = 128;   // output columns per block (n in forward, d in backward)
constexpr int kBlockK = 32;    // reduction slab per pipeline stage (d in forward, n in backward)
constexpr int kPad = 8;        // 16 bytes of padding per shared row: ldmatrix reads 8 rows conflict-free
constexpr int kGroupM = 8;     // row blocks visited together so their X / dY slabs stay in L2
constexpr int kMaxRank = 128;  // largest padded rank R_PAD (16, 32, 64, 128)

// Three stages hide global latency on all four archs; R_PAD = 128 drops to two so that its
// operand slabs (and, in backward, the (T .* S) tile) still fit the 99 KB of sm_86 / sm_89.
DUALLORA_HD constexpr int stages(int r_pad) { return r_pad <= 64 ? 3 : 2; }

constexpr int kRowSlab = kBlockM * (kBlockK + kPad) * 2;   // X or dY: (128 x 32) bf16/fp16, row-major
constexpr int kKnSlab = kBlockK * (kBlockN + kPad) * 2;    // W in backward: (32 x 128), column index fastest
DUALLORA_HD constexpr int rank_slab(int r_pad) { return r_pad * (kBlockK + kPad) * 2; }           // A or B^T: (R x 32)
DUALLORA_HD constexpr int rank_tile(int r_pad) { return kBlockM * (r_pad + kPad) * 2; }           // T.*S or U: (128 x R)
DUALLORA_HD constexpr int wide_slab(int rows) { return rows * (kBlockN + kPad) * 2; }             // (rows x 128) epilogue tiles

DUALLORA_HD constexpr int max_of(int a, int b) { return a > b ? a : b; }

// Forward: stages of (X slab, W slab, A slab); epilogue reuses them for (T.*S) and the B^T slab.
DUALLORA_HD constexpr int forward_smem(int r_pad) {
  return max_of(stages(r_pad) * (2 * kRowSlab + rank_slab(r_pad)), rank_tile(r_pad) + wide_slab(r_pad));
}

// Backward: stages of (dY slab, W slab, B^T slab) plus the (T .* S) tile that the dB product reads
// during the N-loop; the epilogue reuses everything for U, then the A slab or the X tile.
DUALLORA_HD constexpr int backward_smem(int r_pad) {
  return max_of(stages(r_pad) * (kRowSlab + kKnSlab + rank_slab(r_pad)) + rank_tile(r_pad),
                rank_tile(r_pad) + max_of(wide_slab(r_pad), wide_slab(kBlockM)));
}

constexpr int kSmemLimitSm86 = 99 * 1024;  // the smallest opt-in limit of the four archs (sm_86, sm_89)

// Every (bf16?, R_PAD) pair a kernel is instantiated for, applied to X: bf16 / fp16 x R_PAD in
// (16, 32, 64, 128); no other template parameter (gate, bias, frozen blocks, dX/dA/dB are runtime
// flags, uniform branches outside the inner products). Both kernel files expand it, so that the
// device passes (which do not see the host code) compile every kernel the host code launches.
#define DUALLORA_FOR_EACH_CONFIG(X) \
  X(true, 16) X(true, 32) X(true, 64) X(true, 128) X(false, 16) X(false, 32) X(false, 64) X(false, 128)

}  // namespace tiles
}  // namespace duallora
