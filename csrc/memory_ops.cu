// Memory ops of DESIGN §2 in CUDA C++: streaming Gram x^T x and batched task scores.
//
// Both accumulate in at::acc_type (float for half/bfloat16/float, double for double) and return
// that type, the rule of gram_reference / task_scores_reference. Inputs arrive contiguous from
// duallora_kernels/ops/cuda.py (a copy only when the caller's tensor was not).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace duallora {
namespace {

constexpr int kGramTile = 32;   // output tile edge
constexpr int kGramRows = 32;   // rows of x staged per step
constexpr int kGramTy = 8;      // blockDim.y: each thread owns kGramTile / kGramTy outputs

// One block per (upper-triangle tile, row chunk). Lower tiles are the transposes of upper ones,
// so only blockIdx.x >= blockIdx.y computes and an off-diagonal tile is written twice.
template <typename scalar_t, typename acc_t>
__global__ void gram_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ g, int64_t m, int64_t d,
                            int64_t chunk, bool accumulate) {
  const int ti = blockIdx.y, tj = blockIdx.x;
  if (tj < ti) return;
  __shared__ acc_t xi[kGramRows][kGramTile];
  __shared__ acc_t xj[kGramRows][kGramTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t ci0 = int64_t(ti) * kGramTile, cj0 = int64_t(tj) * kGramTile;
  const int64_t start = int64_t(blockIdx.z) * chunk;
  const int64_t stop = start + chunk < m ? start + chunk : m;
  constexpr int kPer = kGramTile / kGramTy;
  acc_t acc[kPer] = {};
  for (int64_t r0 = start; r0 < stop; r0 += kGramRows) {
    // Coalesced: tx runs along a row of x.
    for (int k = ty; k < kGramRows; k += kGramTy) {
      const int64_t row = r0 + k;
      const bool ok = row < stop;
      xi[k][tx] = (ok && ci0 + tx < d) ? to_acc<acc_t>(x[row * d + ci0 + tx]) : acc_t(0);
      xj[k][tx] = (ok && cj0 + tx < d) ? to_acc<acc_t>(x[row * d + cj0 + tx]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kGramRows; ++k) {
      const acc_t b = xj[k][tx];
#pragma unroll
      for (int p = 0; p < kPer; ++p) acc[p] += xi[k][ty + p * kGramTy] * b;  // xi: a warp-wide broadcast
    }
    __syncthreads();
  }
  const int64_t col = cj0 + tx;
  if (col >= d) return;
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    const int64_t row = ci0 + ty + p * kGramTy;
    if (row >= d) continue;
    if (accumulate) {
      atomicAdd(&g[row * d + col], acc[p]);
      if (ti != tj) atomicAdd(&g[col * d + row], acc[p]);
    } else {
      g[row * d + col] = acc[p];
      if (ti != tj) g[col * d + row] = acc[p];
    }
  }
}

// One block per (summary row, task): z_b is staged in shared memory once, each thread projects
// it onto its basis vectors (consecutive threads read consecutive columns of U_t: coalesced).
template <typename acc_t>
__global__ void task_scores_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ bases,
                                   acc_t* __restrict__ out, int64_t d, int64_t u, int64_t n_tasks, double eps) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_raw[];
  acc_t* zs = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t b = blockIdx.x, t = blockIdx.y;
  acc_t norm = 0;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    const acc_t v = z[b * d + k];
    zs[k] = v;
    norm += v * v;
  }
  __syncthreads();
  const acc_t* ut = bases + t * d * u;
  acc_t energy = 0;
  for (int64_t j = threadIdx.x; j < u; j += blockDim.x) {
    acc_t p = 0;
    for (int64_t k = 0; k < d; ++k) p += zs[k] * ut[k * u + j];
    energy += p * p;
  }
  norm = block_sum(norm);
  energy = block_sum(energy);
  if (threadIdx.x == 0) out[b * n_tasks + t] = energy / (norm > acc_t(eps) ? norm : acc_t(eps));
}

}  // namespace

at::Tensor gram(const at::Tensor& x2, int64_t chunk) {
  TORCH_CHECK(x2.is_cuda() && x2.dim() == 2 && x2.is_contiguous(), "gram: x must be a contiguous 2-D CUDA tensor");
  const c10::cuda::CUDAGuard guard(x2.device());
  const int64_t m = x2.size(0), d = x2.size(1);
  const auto acc_dtype = at::toAccumulateType(x2.scalar_type(), /*is_cuda=*/true);
  TORCH_CHECK(chunk >= 1, "gram: chunk must be >= 1");
  const int64_t splits = m > 0 ? (m + chunk - 1) / chunk : 0;
  at::Tensor g = at::zeros({d, d}, x2.options().dtype(acc_dtype));
  if (splits == 0 || d == 0) return g;
  const int64_t tiles = (d + kGramTile - 1) / kGramTile;
  TORCH_CHECK(tiles <= 65535 && splits <= 65535, "gram: d or the number of row chunks is too large");
  const dim3 grid(tiles, tiles, splits), block(kGramTile, kGramTy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "duallora_gram", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    gram_kernel<scalar_t, acc_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        x2.data_ptr<scalar_t>(), g.data_ptr<acc_t>(), m, d, chunk, splits > 1);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

at::Tensor task_scores(const at::Tensor& z, const at::Tensor& bases, double eps) {
  TORCH_CHECK(z.is_cuda() && bases.is_cuda(), "task_scores: tensors must be on CUDA");
  TORCH_CHECK(z.dim() == 2 && bases.dim() == 3 && bases.size(1) == z.size(1), "task_scores: shapes (b, d), (T, d, u)");
  TORCH_CHECK(z.scalar_type() == bases.scalar_type() && z.is_contiguous() && bases.is_contiguous(),
              "task_scores: z and bases must be contiguous and of one (accumulation) dtype");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t b = z.size(0), d = z.size(1), n_tasks = bases.size(0), u = bases.size(2);
  at::Tensor out = at::empty({b, n_tasks}, z.options());
  if (b == 0 || n_tasks == 0) return out;
  TORCH_CHECK(n_tasks <= 65535, "task_scores: at most 65535 tasks");
  const int threads = 128;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "duallora_task_scores", [&] {
    const size_t smem = size_t(d) * sizeof(scalar_t);
    TORCH_CHECK(smem <= 48 * 1024, "task_scores: d too large for one shared-memory row");
    task_scores_kernel<scalar_t><<<dim3(b, n_tasks), threads, smem, at::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), bases.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d, u, n_tasks, eps);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace duallora
