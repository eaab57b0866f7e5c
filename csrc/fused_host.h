// Host side of the fused kernels: argument checks, dtype / rank dispatch, the launch. Included
// by fused_forward.cu / fused_backward.cu in nvcc's host pass only (#ifndef __CUDA_ARCH__).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <type_traits>

#include "fused_common.cuh"

namespace duallora {

// Calls f(std::integral_constant<int, R_PAD>) for the smallest padded rank R_PAD >= r.
template <typename F>
void with_rank(int64_t r, F&& f) {
  TORCH_CHECK(r >= 1 && r <= kMaxRank, "the CUDA DualLoRA kernels take a total adapter rank of 1..", kMaxRank,
              ", got ", r);
  if (r <= 16) f(std::integral_constant<int, 16>{});
  else if (r <= 32) f(std::integral_constant<int, 32>{});
  else if (r <= 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

// Calls f(std::bool_constant<is bfloat16>) for a bfloat16 or float16 tensor.
template <typename F>
void with_dtype(const at::Tensor& like, F&& f) {
  if (like.scalar_type() == at::kBFloat16) f(std::true_type{});
  else if (like.scalar_type() == at::kHalf) f(std::false_type{});
  else TORCH_CHECK(false, "the CUDA DualLoRA kernels take bfloat16 or float16, got ", like.scalar_type());
}

inline const uint16_t* raw(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* raw_out(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }
inline const uint16_t* raw_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? raw(*t) : nullptr;
}

// Rows of `t` (leading dimension ld) may be read 16 bytes at a time.
inline bool vec_ok(const std::optional<at::Tensor>& t, int64_t ld) {
  return t.has_value() && t->defined() && ld % 8 == 0 && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
}

inline void check_operand(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
}

// The stacked adapter's rank (0 without one), after checking A and B^T against `like`.
inline int64_t adapter_rank(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& bt,
                            const at::Tensor& like) {
  if (!(a.has_value() && a->defined())) return 0;
  TORCH_CHECK(bt.has_value() && bt->defined(), "B^T must be given with A");
  check_operand(*a, like, "A");
  check_operand(*bt, like, "B^T");
  TORCH_CHECK(a->dim() == 2 && bt->dim() == 2 && bt->size(0) == a->size(0), "A (r, d) and B^T (r, n) must agree on r");
  return a->size(0);
}

inline Scale make_scale(const std::optional<at::Tensor>& gate, int64_t m, int64_t r, int64_t r_orth, int64_t r_blk,
                        double orth_scale, double res_scale) {
  Scale s{nullptr, 0, m, int(r), int(r_orth), int(r_blk > 0 ? r_blk : 1), float(orth_scale), float(res_scale)};
  if (gate.has_value() && gate->defined()) {
    TORCH_CHECK(gate->scalar_type() == at::kFloat && gate->is_contiguous() && gate->dim() == 2 && gate->size(0) == m,
                "gate must be a contiguous float32 (m, G) tensor");
    s.gate = gate->data_ptr<float>();
    s.blocks = gate->size(1);
  }
  return s;
}

// Launches `kernel` with `smem` bytes of dynamic shared memory (above the 48 KB default: opt in).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, int smem, Args... args) {
  TORCH_CHECK(blocks <= 2147483647LL, "too many tiles for one launch");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<dim3(unsigned(blocks)), dim3(kThreads), smem, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace duallora
