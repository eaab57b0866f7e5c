// Fused DualLoRA backward on tensor cores (mma.sync, sm_80 and later), one kernel: each block owns a
// 128 x 128 tile of dX (rows m0.., columns c0.. of d). Its N-loop streams the dY slab, the W0 slab
// and the B^T slab through a multi-stage cp.async pipeline and accumulates dY W0 (the warps' 64 x 32
// tiles) and dY B (split by rows over the warps) from the same dY slab. Then U = (dY B) .* S, staged
// in shared memory, gives dX = dY W0 + U A, and dA += U^T X (the block loads the X tile at its own
// (rows, columns), float32 atomics, trainable ranks only). dB^T += (T .* S)^T dY and dbias +=
// colsum(dY) are computed inside the N-loop from the dY slab already in shared memory, for the
// chunks dealt to this block (chunk j of a row block goes to the block of column tile
// j mod tiles_d, as in the Triton kernel), so each dY element is counted once and dY is read once.
// Frozen blocks take part in dX and get no gradient atomics. W0 is not read when dX is not needed.
#include "fused_common.cuh"

namespace duallora {
namespace {

struct BackwardArgs {
  const uint16_t *dy, *w, *a, *bt, *t_in, *x;  // a, bt: nullptr without an adapter; t_in, x when dB, dA
  uint16_t* dx;                                // nullptr when dX is not needed
  float *da, *dbt, *dbias;                     // float32 sums (zeroed), or nullptr when not needed
  Scale s;
  GradRanks da_ranks, db_ranks;
  int64_t m, n, d, d_span;                     // d_span: d, or 1 when only dB / dbias are needed
  bool dy_vec, w_vec, a_vec, bt_vec, x_vec;
};

// dB^T[:, n0 : n0 + 32] += (T .* S)^T dY_slab (tss: the (128 x R) T .* S tile; dys: the stage's dY
// slab) and dbias[n0 : n0 + 32] += its column sums, with float32 atomics.
template <bool kBf16, int R>
__device__ __forceinline__ void chunk_sums(const BackwardArgs& p, const uint16_t* tss, const uint16_t* dys, int64_t n0,
                                           int tid) {
  constexpr int kLdr = kBlockK + kPad, kColTiles = kBlockK / 8;
  const int lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  if (p.dbt != nullptr) {
#pragma unroll
    for (int tile = warp; tile < (R / 16) * kColTiles; tile += kThreads / 32) {
      const int mt = tile / kColTiles, nt = tile % kColTiles;
      float acc[4] = {};
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        uint32_t a[4], b0, b1;
        mma::load_a_trans<R + kPad>(a, tss + kk * 16 * (R + kPad) + mt * 16, lane);
        mma::ldmatrix_x2_trans(b0, b1, dys + (kk * 16 + lane % 16) * kLdr + nt * 8);
        mma::mma16816<kBf16>(acc, a, b0, b1);
      }
      const int64_t col = n0 + nt * 8 + 2 * c;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int q = mt * 16 + g + h * 8;
        if (!p.db_ranks(q)) continue;
        if (col < p.n) atomicAdd(p.dbt + q * p.n + col, acc[2 * h]);
        if (col + 1 < p.n) atomicAdd(p.dbt + q * p.n + col + 1, acc[2 * h + 1]);
      }
    }
  }
  if (p.dbias != nullptr) {
    constexpr int kGroups = kThreads / kBlockK, kRows = kBlockM / kGroups;
    const int col = tid % kBlockK, group = tid / kBlockK;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kRows; ++i) sum += mma::to_float<kBf16>(dys[(group * kRows + i) * kLdr + col]);
    if (n0 + col < p.n) atomicAdd(p.dbias + n0 + col, sum);
  }
}

// dA[:, c0 : c0 + 128] += U^T X_tile over the block's 128 rows (us: (128 x R) U; xs: (128 x 128) X
// tile); warp w owns columns 16w..16w+15 for every rank.
template <bool kBf16, int R>
__device__ __forceinline__ void add_da(const BackwardArgs& p, const uint16_t* us, const uint16_t* xs, int64_t c0,
                                       int tid) {
  constexpr int kLdw = kBlockN + kPad;
  const int lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  float acc[R / 16][2][4] = {};
#pragma unroll
  for (int kk = 0; kk < kBlockM / 16; ++kk) {
    uint32_t b[4];
    mma::load_b2<true, kLdw>(b, xs + kk * 16 * kLdw + warp * 16, lane);
#pragma unroll
    for (int mt = 0; mt < R / 16; ++mt) {
      uint32_t a[4];
      mma::load_a_trans<R + kPad>(a, us + kk * 16 * (R + kPad) + mt * 16, lane);
      mma::mma16816<kBf16>(acc[mt][0], a, b[0], b[1]);
      mma::mma16816<kBf16>(acc[mt][1], a, b[2], b[3]);
    }
  }
#pragma unroll
  for (int mt = 0; mt < R / 16; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t col = c0 + warp * 16 + nt * 8 + 2 * c;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int q = mt * 16 + g + h * 8;
        if (!p.da_ranks(q)) continue;
        if (col < p.d) atomicAdd(p.da + q * p.d + col, acc[mt][nt][2 * h]);
        if (col + 1 < p.d) atomicAdd(p.da + q * p.d + col + 1, acc[mt][nt][2 * h + 1]);
      }
    }
  }
}

template <bool kBf16, int R>
__global__ void __launch_bounds__(kThreads, 1) fused_backward_kernel(const BackwardArgs p) {
  constexpr int kStages = stages(R), kLdr = kBlockK + kPad, kLdw = kBlockN + kPad;
  constexpr int kStageElems = (kRowSlab + kKnSlab + rank_slab(R)) / 2;
#if defined(__CUDA_ARCH__)
  static_assert(backward_smem(R) <= kArchSmemLimit, "the backward tile does not fit this arch's shared memory");
#endif
  extern __shared__ __align__(16) uint16_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int tile_m, tile_d;
  tile_ids(p.m, p.d_span, tile_m, tile_d);
  const int tiles_d = int((p.d_span + kBlockN - 1) / kBlockN);
  const int64_t m0 = int64_t(tile_m) * kBlockM, c0 = int64_t(tile_d) * kBlockN;
  const bool lora = p.a != nullptr, need_dx = p.dx != nullptr;
  const bool sums = p.dbt != nullptr || p.dbias != nullptr;
  const int n_tiles = int((p.n + kBlockK - 1) / kBlockK);
  uint16_t* tss = smem + kStages * kStageElems;  // (128 x R): T .* S, read by the dB products

  if (p.dbt != nullptr) {
    for (int e = tid; e < kBlockM * R; e += kThreads) {
      const int i = e / R, q = e % R;
      const int64_t row = m0 + i;
      const float v = row < p.m && q < p.s.r ? mma::to_float<kBf16>(p.t_in[row * p.s.r + q]) * p.s(row, q) : 0.f;
      tss[i * (R + kPad) + q] = mma::from_float<kBf16>(v);
    }
  }

  auto load_stage = [&](int stage, int kt) {
    uint16_t* base = smem + stage * kStageElems;
    const int64_t n0 = int64_t(kt) * kBlockK;
    mma::load_tile<kBlockM, kBlockK, kLdr>(base, p.dy, p.n, m0, p.m, n0, p.n, p.dy_vec, tid);
    if (need_dx) mma::load_tile<kBlockK, kBlockN, kLdw>(base + kRowSlab / 2, p.w, p.d, n0, p.n, c0, p.d, p.w_vec, tid);
    if (lora)
      mma::load_tile<R, kBlockK, kLdr>(base + (kRowSlab + kKnSlab) / 2, p.bt, p.n, 0, p.s.r, n0, p.n, p.bt_vec, tid);
  };

  float acc[4][4][4] = {};
  float uacc[R / 8][4] = {};
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < n_tiles) load_stage(stage, stage);
    mma::cp_async_commit();
  }
  for (int kt = 0; kt < n_tiles; ++kt) {
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt has landed for every thread (and tss is written); kt-1 is free
    const int next = kt + kStages - 1;
    if (next < n_tiles) load_stage(next % kStages, next);
    mma::cp_async_commit();
    const uint16_t* base = smem + (kt % kStages) * kStageElems;
    stage_products<kBf16, true, R>(acc, uacc, base, base + kRowSlab / 2, base + (kRowSlab + kKnSlab) / 2, need_dx,
                                   lora, warp, lane);
    if (sums && kt % tiles_d == tile_d) chunk_sums<kBf16, R>(p, tss, base, int64_t(kt) * kBlockK, tid);
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // the stages and tss are free: the epilogue reuses their shared memory

  uint16_t* us = smem;                        // (128 x R): U = (dY B) .* S
  uint16_t* slab = smem + rank_tile(R) / 2;   // (R x 128) A slab, then the (128 x 128) X tile
  if (lora) {
    if (need_dx) mma::load_tile<R, kBlockN, kLdw>(slab, p.a, p.d, 0, p.s.r, c0, p.d, p.a_vec, tid);
    mma::cp_async_commit();
    stage_scaled<kBf16, R>(us, uacc, p.s, m0, warp, lane);
    mma::cp_async_wait<0>();
    __syncthreads();
    if (need_dx) add_rank_product<kBf16, R>(acc, us, slab, warp / 4, warp % 4, lane);
  }
  if (need_dx) store_tile<kBf16>(p.dx, acc, nullptr, m0, c0, p.m, p.d, warp, lane);
  if (lora && p.da != nullptr) {
    __syncthreads();  // every warp is done with the A slab
    mma::load_tile<kBlockM, kBlockN, kLdw>(slab, p.x, p.d, m0, p.m, c0, p.d, p.x_vec, tid);
    mma::cp_async_commit();
    mma::cp_async_wait<0>();
    __syncthreads();
    add_da<kBf16, R>(p, us, slab, c0, tid);
  }
}

// Every kernel the host code launches (DUALLORA_FOR_EACH_CONFIG, fused_tiles.h).
#define DUALLORA_INSTANTIATE(BF16, R) template __global__ void fused_backward_kernel<BF16, R>(const BackwardArgs);
DUALLORA_FOR_EACH_CONFIG(DUALLORA_INSTANTIATE)
#undef DUALLORA_INSTANTIATE

}  // namespace
}  // namespace duallora

#if !defined(__CUDA_ARCH__)
#include "fused_host.h"

namespace duallora {

std::vector<at::Tensor> dual_lora_backward(const at::Tensor& dy2, const at::Tensor& w, const std::optional<at::Tensor>& a,
                                           const std::optional<at::Tensor>& bt, const std::optional<at::Tensor>& gate,
                                           const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& x2,
                                           int64_t r_orth, int64_t r_blk, double orth_scale, double res_scale,
                                           int64_t da_orth_end, int64_t da_res_start, int64_t db_orth_end,
                                           int64_t db_res_start, bool need_dx, bool need_dbias) {
  TORCH_CHECK(dy2.is_cuda() && dy2.dim() == 2 && dy2.is_contiguous(), "dY must be a contiguous 2-D CUDA tensor");
  check_operand(w, dy2, "weight");
  const c10::cuda::CUDAGuard guard(dy2.device());
  const int64_t m = dy2.size(0), n = dy2.size(1), d = w.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == n, "weight must be (n, d) with n = dY's last dimension");
  const int64_t r = adapter_rank(a, bt, dy2);
  const bool lora = r > 0;
  const bool need_da = lora && (da_orth_end > 0 || da_res_start < r);
  const bool need_db = lora && (db_orth_end > 0 || db_res_start < r);
  if (need_da) {
    TORCH_CHECK(x2.has_value() && x2->defined(), "x must be given when dA is needed");
    check_operand(*x2, dy2, "x");
    TORCH_CHECK(x2->dim() == 2 && x2->size(0) == m && x2->size(1) == d, "x must be (m, d)");
  }
  if (need_db) {
    TORCH_CHECK(t.has_value() && t->defined(), "T must be given when dB is needed");
    check_operand(*t, dy2, "T");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == m && t->size(1) == r, "T must be (m, r)");
  }
  const auto f32 = dy2.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty({m, d}, dy2.options()) : at::Tensor();
  at::Tensor da = need_da ? at::zeros({r, d}, f32) : at::Tensor();
  at::Tensor dbt = need_db ? at::zeros({r, n}, f32) : at::Tensor();
  at::Tensor dbias = need_dbias ? at::zeros({n}, f32) : at::Tensor();
  if (m == 0 || !(need_dx || need_da || need_db || need_dbias)) return {dx, da, dbt, dbias};
  const GradRanks da_r{int(da_orth_end), int(da_res_start), int(r)}, db_r{int(db_orth_end), int(db_res_start), int(r)};
  // Without dX or dA there is nothing per column tile: one column of blocks does dB / dbias.
  const int64_t d_span = (need_dx || need_da) && d > 0 ? d : 1;
  BackwardArgs p{raw(dy2), raw(w), lora ? raw(*a) : nullptr, lora ? raw(*bt) : nullptr,
                 need_db ? raw(*t) : nullptr, need_da ? raw(*x2) : nullptr,
                 need_dx ? raw_out(dx) : nullptr, need_da ? da.data_ptr<float>() : nullptr,
                 need_db ? dbt.data_ptr<float>() : nullptr, need_dbias ? dbias.data_ptr<float>() : nullptr,
                 make_scale(gate, m, r, r_orth, r_blk, orth_scale, res_scale), da_r, db_r, m, n, d, d_span,
                 vec_ok(dy2, n), vec_ok(w, d), lora && vec_ok(a, d), lora && vec_ok(bt, n), need_da && vec_ok(x2, d)};
  const int64_t blocks = ((m + kBlockM - 1) / kBlockM) * ((d_span + kBlockN - 1) / kBlockN);
  with_dtype(dy2, [&](auto bf16) {
    constexpr bool kBf16 = decltype(bf16)::value;
    with_rank(lora ? r : 1, [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      launch(fused_backward_kernel<kBf16, R>, blocks, backward_smem(R), p);
    });
  });
  return {dx, da, dbt, dbias};
}

}  // namespace duallora
#endif  // !__CUDA_ARCH__
