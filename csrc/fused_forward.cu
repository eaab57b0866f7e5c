// Fused DualLoRA forward on tensor cores (mma.sync, sm_80 and later): Y = X W0^T + b + (T .* S) B^T
// with T = X A^T, in one kernel. The algorithm and pass counts are those of the Triton kernel
// (duallora_kernels/ops/fused_linear.py's module docstring): each block owns a 128 x 128 tile of Y;
// its K-loop streams the X and W0 slabs, and the A slab beside them, through a multi-stage cp.async
// pipeline, and feeds the same X slab to X W0^T and to T = X A^T (split by rows over the 8 warps,
// so T is computed once per block). After the loop T .* S is staged in shared memory in the
// activation dtype and multiplied by the B^T slab into the same accumulators; the bias is added
// and Y stored. T (unscaled, in x's dtype) is stored by the column-tile-0 blocks when dB will be
// needed. X is read once (per column tile, as in any tiled GEMM), Y written once.
#include "fused_common.cuh"

namespace duallora {
namespace {

struct ForwardArgs {
  const uint16_t *x, *w, *bias, *a, *bt;  // a, bt: nullptr without an adapter
  uint16_t *y, *t_out;                    // t_out: nullptr unless T is kept
  Scale s;
  int64_t m, n, d;
  bool x_vec, w_vec, a_vec, bt_vec;       // rows may be read 16 bytes at a time
};

template <bool kBf16, int R>
__global__ void __launch_bounds__(kThreads, 1) fused_forward_kernel(const ForwardArgs p) {
  constexpr int kStages = stages(R), kLdr = kBlockK + kPad;
  constexpr int kStageElems = (2 * kRowSlab + rank_slab(R)) / 2;
#if defined(__CUDA_ARCH__)
  static_assert(forward_smem(R) <= kArchSmemLimit, "the forward tile does not fit this arch's shared memory");
#endif
  extern __shared__ __align__(16) uint16_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int tile_m, tile_n;
  tile_ids(p.m, p.n, tile_m, tile_n);
  const int64_t m0 = int64_t(tile_m) * kBlockM, n0 = int64_t(tile_n) * kBlockN;
  const bool lora = p.a != nullptr;
  const int k_tiles = int((p.d + kBlockK - 1) / kBlockK);

  auto load_stage = [&](int stage, int kt) {
    uint16_t* base = smem + stage * kStageElems;
    const int64_t k0 = int64_t(kt) * kBlockK;
    mma::load_tile<kBlockM, kBlockK, kLdr>(base, p.x, p.d, m0, p.m, k0, p.d, p.x_vec, tid);
    mma::load_tile<kBlockN, kBlockK, kLdr>(base + kRowSlab / 2, p.w, p.d, n0, p.n, k0, p.d, p.w_vec, tid);
    if (lora) mma::load_tile<R, kBlockK, kLdr>(base + kRowSlab, p.a, p.d, 0, p.s.r, k0, p.d, p.a_vec, tid);
  };

  float acc[4][4][4] = {};
  float tacc[R / 8][4] = {};
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < k_tiles) load_stage(stage, stage);
    mma::cp_async_commit();  // one group per stage, empty or not: the wait count below stays exact
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    mma::cp_async_wait<kStages - 2>();  // stage kt has landed
    __syncthreads();                    // ... for every thread, and stage kt-1 is no longer read
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    mma::cp_async_commit();
    const uint16_t* base = smem + (kt % kStages) * kStageElems;
    stage_products<kBf16, false, R>(acc, tacc, base, base + kRowSlab / 2, base + kRowSlab, true, lora, warp, lane);
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // the stages are free: the epilogue reuses their shared memory

  if (lora) {
    uint16_t* ts = smem;                        // (128 x R): T .* S
    uint16_t* bts = smem + rank_tile(R) / 2;    // (R x 128): B^T[:, n0 : n0 + 128]
    mma::load_tile<R, kBlockN, kBlockN + kPad>(bts, p.bt, p.n, 0, p.s.r, n0, p.n, p.bt_vec, tid);
    mma::cp_async_commit();
    if (p.t_out != nullptr && tile_n == 0) {
      const int g = lane / 4, c = lane % 4;
#pragma unroll
      for (int j = 0; j < R / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = m0 + warp * 16 + g + h * 8;
          const int q = j * 8 + 2 * c;
          if (row >= p.m) continue;
          if (q < p.s.r) p.t_out[row * p.s.r + q] = mma::from_float<kBf16>(tacc[j][2 * h]);
          if (q + 1 < p.s.r) p.t_out[row * p.s.r + q + 1] = mma::from_float<kBf16>(tacc[j][2 * h + 1]);
        }
      }
    }
    stage_scaled<kBf16, R>(ts, tacc, p.s, m0, warp, lane);
    mma::cp_async_wait<0>();
    __syncthreads();
    add_rank_product<kBf16, R>(acc, ts, bts, warp / 4, warp % 4, lane);
  }
  store_tile<kBf16>(p.y, acc, p.bias, m0, n0, p.m, p.n, warp, lane);
}

// Every kernel the host code launches (DUALLORA_FOR_EACH_CONFIG, fused_tiles.h).
#define DUALLORA_INSTANTIATE(BF16, R) template __global__ void fused_forward_kernel<BF16, R>(const ForwardArgs);
DUALLORA_FOR_EACH_CONFIG(DUALLORA_INSTANTIATE)
#undef DUALLORA_INSTANTIATE

}  // namespace
}  // namespace duallora

#if !defined(__CUDA_ARCH__)
#include "fused_host.h"

namespace duallora {

std::vector<at::Tensor> dual_lora_forward(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& bt,
                                          const std::optional<at::Tensor>& gate, int64_t r_orth, int64_t r_blk,
                                          double orth_scale, double res_scale, bool store_t) {
  TORCH_CHECK(x2.is_cuda() && x2.dim() == 2 && x2.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  check_operand(w, x2, "weight");
  const c10::cuda::CUDAGuard guard(x2.device());
  const int64_t m = x2.size(0), d = x2.size(1), n = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == d, "weight must be (n, d) with d = x's last dimension");
  const int64_t r = adapter_rank(a, bt, x2);
  const bool lora = r > 0;
  if (bias.has_value() && bias->defined()) check_operand(*bias, x2, "bias");
  at::Tensor y = at::empty({m, n}, x2.options());
  at::Tensor t = lora && store_t ? at::empty({m, r}, x2.options()) : at::Tensor();
  if (m == 0 || n == 0) return {y, t};
  ForwardArgs p{raw(x2), raw(w), raw_or_null(bias), lora ? raw(*a) : nullptr, lora ? raw(*bt) : nullptr,
                raw_out(y), t.defined() ? raw_out(t) : nullptr,
                make_scale(gate, m, r, r_orth, r_blk, orth_scale, res_scale), m, n, d,
                vec_ok(x2, d), vec_ok(w, d), lora && vec_ok(a, d), lora && vec_ok(bt, n)};
  const int64_t blocks = ((m + kBlockM - 1) / kBlockM) * ((n + kBlockN - 1) / kBlockN);
  with_dtype(x2, [&](auto bf16) {
    constexpr bool kBf16 = decltype(bf16)::value;
    with_rank(lora ? r : 1, [&](auto rank) {  // without an adapter the R = 16 kernel skips the rank work
      constexpr int R = decltype(rank)::value;
      launch(fused_forward_kernel<kBf16, R>, blocks, forward_smem(R), p);
    });
  });
  return {y, t};
}

}  // namespace duallora
#endif  // !__CUDA_ARCH__
