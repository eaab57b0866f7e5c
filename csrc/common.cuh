// Small device helpers of csrc/memory_ops.cu (block reductions).
#pragma once

#include <cuda_runtime.h>

namespace duallora {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D block; the result is valid in thread 0. Every thread of the block must call it
// (it synchronises), and it may be called repeatedly: the leading barrier guards `partial`.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = static_cast<int>(threadIdx.x) < warps ? partial[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

}  // namespace duallora
