// Memory op of DESIGN §2 in CUDA C++: batched task scores, all tasks in one launch (the Gram
// x^T x of the memory bases is one cuBLAS GEMM: duallora_kernels/ops/cuda.py's gram_cuda).
//
// Accumulates in the input's dtype (float32 or float64: the caller promotes), the rule of
// task_scores_reference. Inputs arrive contiguous from duallora_kernels/ops/cuda.py.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace duallora {
namespace {

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
