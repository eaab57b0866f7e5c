// Tensor-core building blocks of the fused DualLoRA kernels: inline PTX for mma.sync m16n8k16
// (bf16 / fp16 in, float32 accumulators), ldmatrix (shared -> fragments) and cp.async (global ->
// shared, 16 bytes, zero-fill), plus the shared-memory tile loader and fragment loaders.
//
// Why inline PTX and not CUTLASS/CuTe or WMMA: mma.sync.m16n8k16 is the instruction CUTLASS emits on
// sm_80-sm_89 (and a valid one on sm_90), and the kernels need only three instructions and two
// fragment layouts, so the whole dependency is these ~150 lines -- no package to install, nothing
// that breaks the compile on a CUDA or CUTLASS update, and a few instantiations that compile in
// seconds. WMMA would hide the fragment layout, but the kernels need it: the epilogue scales the
// T / U accumulators per (row, rank) by S and stages them for the next product, which with WMMA
// means a round trip through shared memory per fragment. (Hopper's wgmma is not used: on sm_90
// the Triton path is the default, see duallora_kernels/ops/cuda.py.)
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), with g = lane / 4 and c = lane % 4:
//   A (16 x 16, row): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 8+2c..), a3 = (g+8, 8+2c..)
//   B (16 x 8, col):  b0 = (k 2c..2c+1, n g), b1 = (k 8+2c.., n g)
//   C (16 x 8):       c0, c1 = (g, 2c), (g, 2c+1); c2, c3 = (g+8, 2c), (g+8, 2c+1)
// Elements travel as raw 16-bit words (uint16_t): the kernels template on kBf16 instead of on
// at::BFloat16 / at::Half, which keeps ATen's types out of device code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "fused_tiles.h"

namespace duallora {
namespace mma {

using tiles::kThreads;

#if defined(DUALLORA_WARP_EMULATION)
// tests/test_cuda_emulation.py runs these kernels on the CPU: its header emulates the four
// instructions below lane by lane (tests/cuda_emulation/warp_emulation.h).
#include DUALLORA_WARP_EMULATION
#else
template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
  }
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_addr(p)));
}

// 16 bytes global -> shared without passing through registers; src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16(uint16_t* dst, const uint16_t* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }
#endif  // DUALLORA_WARP_EMULATION

template <bool kBf16>
__device__ __forceinline__ float to_float(uint16_t bits) {
  if constexpr (kBf16) return __uint_as_float(uint32_t(bits) << 16);
  else return __half2float(__ushort_as_half(bits));
}
template <bool kBf16>
__device__ __forceinline__ uint16_t from_float(float v) {
  if constexpr (kBf16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else return __half_as_ushort(__float2half_rn(v));
}
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return uint32_t(from_float<kBf16>(lo)) | (uint32_t(from_float<kBf16>(hi)) << 16);
}

// dst[i][j] = src[(row0 + i) * ld + col0 + j] for a (ROWS x COLS) tile, zero outside
// [0, row_end) x [0, col_end); dst rows are LDS elements apart. A 16-byte chunk that lies inside
// the columns goes by cp.async (rows past the end by its zero-fill) when `vec` says rows are
// 16-byte aligned (ld % 8 == 0 and an aligned base); the column tail and unaligned operands are
// copied element by element (plain stores: visible to the other threads after the caller's
// __syncthreads, like the cp.async data after its wait).
template <int ROWS, int COLS, int LDS>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* __restrict__ src, int64_t ld, int64_t row0,
                                          int64_t row_end, int64_t col0, int64_t col_end, bool vec, int tid) {
  constexpr int kChunks = COLS / 8, kPerThread = (ROWS * kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kPerThread; ++it) {
    const int e = tid + it * kThreads;
    if (e >= ROWS * kChunks) break;
    const int i = e / kChunks, j = (e % kChunks) * 8;
    const int64_t row = row0 + i, col = col0 + j;
    uint16_t* s = dst + i * LDS + j;
    const bool row_ok = row < row_end;
    if (vec && col + 8 <= col_end) {
      cp_async16(s, row_ok ? src + row * ld + col : src, row_ok ? 16 : 0);
    } else {
      uint16_t v[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) v[q] = (row_ok && col + q < col_end) ? src[row * ld + col + q] : uint16_t(0);
      *reinterpret_cast<uint4*>(s) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

// The A fragment of rows [0, 16) x k [0, 16) of a row-major (rows x k) shared tile at `p`.
template <int LDS>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* p, int lane) {
  ldmatrix_x4<false>(a, p + (lane % 16) * LDS + (lane / 16) * 8);
}

// The A fragment of rows [0, 16) x k [0, 16) of an operand stored transposed, (k x rows) with
// rows fastest (the (T .* S) and U tiles when they are the left factor of dB^T and dA).
template <int LDS>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const uint16_t* p, int lane) {
  const int i = lane / 8;
  ldmatrix_x4<true>(a, p + ((i / 2) * 8 + lane % 8) * LDS + (i % 2) * 8);
}

// B fragments of two n8 tiles (n [0, 16)) x k [0, 16): b[0..1] for n [0, 8), b[2..3] for n [8, 16).
// kKn = false: the shared tile is (n x k), k fastest (W in forward; A and B^T slabs as right
// factors of T and U). kKn = true: it is (k x n), n fastest (W in backward; B^T, A, X, dY in the
// epilogue products).
template <bool kKn, int LDS>
__device__ __forceinline__ void load_b2(uint32_t (&b)[4], const uint16_t* p, int lane) {
  if constexpr (kKn) {
    ldmatrix_x4<true>(b, p + (((lane / 8) % 2) * 8 + lane % 8) * LDS + (lane / 16) * 8);
  } else {
    ldmatrix_x4<false>(b, p + ((lane / 16) * 8 + lane % 8) * LDS + ((lane / 8) % 2) * 8);
  }
}

}  // namespace mma
}  // namespace duallora
