// What the fused forward and backward kernels share on the device: the scale S, the trainable-rank
// mask, the grouped tile order, a pipeline stage's products, the low-rank epilogue products and
// the output store. No ATen here: nvcc's device passes of fused_forward.cu / fused_backward.cu
// never parse torch's headers (their host code, in fused_host.h, is compiled by the host pass only),
// which keeps a compile for one more arch to seconds.
//
// Layout contract (duallora_kernels/ops/cuda.py guarantees it): x2 (m, d), dy2 (m, n), w (n, d),
// a (r, d), bt = B^T (r, n) and t (m, r), contiguous, all bfloat16 or all float16; gate (m, G)
// float32 contiguous or absent; bias (n,) in the activation dtype. r <= 128.
#pragma once

#include "mma_sm80.cuh"

namespace duallora {

using namespace tiles;

// The opt-in shared-memory limit of the arch being compiled (device pass only).
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870
constexpr int kArchSmemLimit = 163 * 1024;
#elif __CUDA_ARCH__ >= 900
constexpr int kArchSmemLimit = 227 * 1024;
#else
constexpr int kArchSmemLimit = 99 * 1024;
#endif
#endif

// S of DESIGN §1 for one (row, rank): orth_scale on the orthogonal ranks, res_scale * gate on the
// residual ones, 0 past m and on the padding ranks (so padded operands contribute nothing).
struct Scale {
  const float* gate;  // (m, G) or nullptr for all ones
  int64_t blocks;     // G
  int64_t m;
  int r, r_orth, r_blk;
  float orth_scale, res_scale;
  __device__ __forceinline__ float operator()(int64_t row, int q) const {
    if (row >= m || q >= r) return 0.f;
    if (q < r_orth) return orth_scale;
    return gate == nullptr ? res_scale : res_scale * gate[row * blocks + (q - r_orth) / r_blk];
  }
};

struct GradRanks {  // which rows of dA / dB^T train: [0, orth_end) and [res_start, r)
  int orth_end, res_start, r;
  __device__ __forceinline__ bool operator()(int q) const { return q < orth_end || (q >= res_start && q < r); }
};

// Row blocks are visited kGroupM at a time, column tiles inner: the blocks that share an X (or dY)
// row block run close together and find it in L2 (the order of the Triton kernels' _tile_ids).
__device__ __forceinline__ void tile_ids(int64_t m, int64_t cols, int& tile_m, int& tile_c) {
  const int tiles_m = int((m + kBlockM - 1) / kBlockM), tiles_c = int((cols + kBlockN - 1) / kBlockN);
  const int pid = blockIdx.x, per_group = kGroupM * tiles_c;
  const int first_m = (pid / per_group) * kGroupM;
  const int group_rows = min(tiles_m - first_m, kGroupM);
  const int in_group = pid % per_group;
  tile_m = first_m + in_group % group_rows;
  tile_c = in_group / group_rows;
}

// One pipeline stage's products: acc (the warp's 64 x 32) += rows (128 x 32) @ cols, where cols is
// the W slab, (128 x 32) k fastest in forward (kKn = false) or (32 x 128) in backward (kKn = true);
// and racc (the warp's 16 rows x R ranks) += its 16 rows of `rows` @ ranks^T, ranks being the
// (R x 32) A slab in forward (T = X A^T) or B^T slab in backward (dY B). The 8 warps split the
// low-rank product by rows, so the block computes it once: R/128 extra tensor-core work per tile.
template <bool kBf16, bool kKn, int R>
__device__ __forceinline__ void stage_products(float (&acc)[4][4][4], float (&racc)[R / 8][4], const uint16_t* rows,
                                               const uint16_t* cols, const uint16_t* ranks, bool main, bool low_rank,
                                               int warp, int lane) {
  constexpr int kLdr = kBlockK + kPad, kLdw = kKn ? kBlockN + kPad : kBlockK + kPad;
  const int warp_m = warp / 4, warp_n = warp % 4;
#pragma unroll
  for (int kk = 0; kk < kBlockK / 16; ++kk) {
    if (main) {
      uint32_t af[4][4], bf[2][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) mma::load_a<kLdr>(af[i], rows + (warp_m * 64 + i * 16) * kLdr + kk * 16, lane);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int col = warp_n * 32 + jj * 16;
        if constexpr (kKn) mma::load_b2<true, kLdw>(bf[jj], cols + kk * 16 * kLdw + col, lane);
        else mma::load_b2<false, kLdw>(bf[jj], cols + col * kLdw + kk * 16, lane);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          mma::mma16816<kBf16>(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
    }
    if (low_rank) {
      uint32_t ta[4];
      mma::load_a<kLdr>(ta, rows + warp * 16 * kLdr + kk * 16, lane);
#pragma unroll
      for (int jj = 0; jj < R / 16; ++jj) {
        uint32_t b[4];
        mma::load_b2<false, kLdr>(b, ranks + jj * 16 * kLdr + kk * 16, lane);
        mma::mma16816<kBf16>(racc[2 * jj], ta, b[0], b[1]);
        mma::mma16816<kBf16>(racc[2 * jj + 1], ta, b[2], b[3]);
      }
    }
  }
}

// Store this warp's 64 x 32 of a (m x cols) 16-bit output (Y or dX), plus a bias when given;
// rows past m and columns past `cols` are dropped. Pairs go as one 32-bit store when cols is even.
template <bool kBf16>
__device__ __forceinline__ void store_tile(uint16_t* out, const float (&acc)[4][4][4], const uint16_t* bias,
                                           int64_t m0, int64_t c0, int64_t m, int64_t cols, int warp, int lane) {
  const int warp_m = warp / 4, warp_n = warp % 4, g = lane / 4, c = lane % 4;
  const bool pairs = cols % 2 == 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t col = c0 + warp_n * 32 + j * 8 + 2 * c;
    if (col >= cols) continue;
    const bool second = col + 1 < cols;
    const float b0 = bias != nullptr ? mma::to_float<kBf16>(bias[col]) : 0.f;
    const float b1 = bias != nullptr && second ? mma::to_float<kBf16>(bias[col + 1]) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + warp_m * 64 + i * 16 + g + h * 8;
        if (row >= m) continue;
        const float v0 = acc[i][j][2 * h] + b0, v1 = acc[i][j][2 * h + 1] + b1;
        uint16_t* dst = out + row * cols + col;
        if (pairs) {
          *reinterpret_cast<uint32_t*>(dst) = mma::pack2<kBf16>(v0, v1);
        } else {
          dst[0] = mma::from_float<kBf16>(v0);
          if (second) dst[1] = mma::from_float<kBf16>(v1);
        }
      }
    }
  }
}

// acc (this warp's 64 x 32 of the block's 128 x 128 tile) += lhs (128 x R, row-major, shared)
// @ rhs (R x 128, column index fastest, shared): the low-rank term (T .* S) B^T of Y and U A of dX.
template <bool kBf16, int R>
__device__ __forceinline__ void add_rank_product(float (&acc)[4][4][4], const uint16_t* lhs, const uint16_t* rhs,
                                                 int warp_m, int warp_n, int lane) {
#pragma unroll
  for (int kk = 0; kk < R / 16; ++kk) {
    uint32_t af[4][4], bf[2][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) mma::load_a<R + kPad>(af[i], lhs + (warp_m * 64 + i * 16) * (R + kPad) + kk * 16, lane);
#pragma unroll
    for (int jj = 0; jj < 2; ++jj)
      mma::load_b2<true, kBlockN + kPad>(bf[jj], rhs + kk * 16 * (kBlockN + kPad) + warp_n * 32 + jj * 16, lane);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) mma::mma16816<kBf16>(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
  }
}

// Store this warp's (16 x R) accumulator (rows warp*16.., C-fragment layout), times S, into the
// (128 x R) shared tile in the 16-bit dtype: T .* S in forward, U = (dY B) .* S in backward.
template <bool kBf16, int R>
__device__ __forceinline__ void stage_scaled(uint16_t* tile, const float (&acc)[R / 8][4], const Scale& s,
                                             int64_t m0, int warp, int lane) {
  const int g = lane / 4, c = lane % 4;
#pragma unroll
  for (int j = 0; j < R / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp * 16 + g + h * 8, q = j * 8 + 2 * c;
      const uint32_t v = mma::pack2<kBf16>(acc[j][2 * h] * s(m0 + row, q), acc[j][2 * h + 1] * s(m0 + row, q + 1));
      *reinterpret_cast<uint32_t*>(tile + row * (R + kPad) + q) = v;
    }
  }
}


}  // namespace duallora
