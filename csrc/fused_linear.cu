// Fused DualLoRA linear in CUDA C++ (SIMT, float32 accumulation): the same two kernels as the
// Triton version in duallora_kernels/ops/fused_linear.py, whose module docstring states the
// algorithm and the pass counts (they hold here too). This is the portable, readable variant:
// shared-memory tiles and FMA, no tensor cores, so expect it to trail the Triton kernels.
//
// Layout contract (the Python side guarantees it): x2 (m, d), dy2 (m, n), w (n, d), a (r, d),
// bt = B^T (r, n) contiguous in the activation dtype; gate (m, G) float32 contiguous or absent;
// t (m, r) float32. r <= 128 (the padded rank is a template parameter).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace duallora {
namespace {

constexpr int kTile = 64;                 // a block's output tile is kTile x kTile
constexpr int kSide = 16;                 // blockDim = kSide x kSide
constexpr int kPer = kTile / kSide;       // each thread owns kPer x kPer outputs, strided by kSide
constexpr int kThreads = kSide * kSide;

// S of DESIGN §1 for one (row, rank): orth_scale on the orthogonal ranks, res_scale * gate on
// the residual ones, 0 on the padding ranks (so padded operands contribute nothing).
struct Scale {
  const float* gate;  // (m, G) or nullptr for all ones
  int64_t blocks;     // G
  int r, r_orth, r_blk;
  float orth_scale, res_scale;
  __device__ __forceinline__ float operator()(int64_t row, int q) const {
    if (q < r_orth) return orth_scale;
    if (q >= r) return 0.f;
    return gate == nullptr ? res_scale : res_scale * gate[row * blocks + (q - r_orth) / r_blk];
  }
};

struct GradRanks {  // which rows of dA / dB^T train: [0, orth_end) and [res_start, r)
  int orth_end, res_start, r;
  __device__ __forceinline__ bool operator()(int q) const { return q < orth_end || (q >= res_start && q < r); }
};

template <typename scalar_t>
__device__ __forceinline__ float load_or_zero(const scalar_t* p, bool ok) {
  return ok ? to_acc<float>(*p) : 0.f;
}

// dst[k][i] = src[(row0 + i) * ld + k0 + k] for i < ROWS, k < BK: a (ROWS x BK) slab of a row-major
// matrix, transposed into shared memory so the inner products read it along i. Zero past
// row_end / k_end. Consecutive threads read consecutive k (runs of BK elements per row).
template <int ROWS, int BK, int LD, typename scalar_t>
__device__ __forceinline__ void load_slab(float (&dst)[BK][LD], const scalar_t* __restrict__ src, int64_t ld,
                                          int64_t row0, int64_t row_end, int64_t k0, int64_t k_end, int tid) {
  for (int e = tid; e < ROWS * BK; e += kThreads) {
    const int i = e / BK, k = e % BK;
    dst[k][i] = load_or_zero(src + (row0 + i) * ld + k0 + k, row0 + i < row_end && k0 + k < k_end);
  }
}

// Stage this thread's (rows x ranks) accumulator, scaled by S, into the block's (kTile x R)
// shared tile; rows past m become 0. The caller syncs before anyone reads `tile`.
template <int R>
__device__ __forceinline__ void stage_scaled(float (&tile)[kTile][R + 1], const float (&vals)[kPer][R / kSide],
                                             const Scale& s, int64_t m0, int64_t m, int tx, int ty) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t row = m0 + ty + i * kSide;
#pragma unroll
    for (int q = 0; q < R / kSide; ++q) {
      const int rank = tx + q * kSide;
      tile[ty + i * kSide][rank] = row < m ? vals[i][q] * s(row, rank) : 0.f;
    }
  }
}

// acc += tile (kTile x r, shared) @ mat[:, col0 : col0 + kTile] for a row-major mat (r, ld)
// whose columns stop at `limit`: the low-rank term of Y (mat = B^T) and of dX (mat = A).
template <typename scalar_t, int R>
__device__ __forceinline__ void add_low_rank(float (&acc)[kPer][kPer], const float (&tile)[kTile][R + 1],
                                             const scalar_t* __restrict__ mat, int64_t ld, int64_t col0, int64_t limit,
                                             int r, int tx, int ty) {
  for (int q = 0; q < r; ++q) {
    float mv[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t col = col0 + tx + j * kSide;
      mv[j] = load_or_zero(mat + int64_t(q) * ld + col, col < limit);
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const float tv = tile[ty + i * kSide][q];
#pragma unroll
      for (int j = 0; j < kPer; ++j) acc[i][j] += tv * mv[j];
    }
  }
}

// Y tile = X W0^T (+ T.*S B^T) (+ bias); the K-loop feeds the same X tile to both products.
template <typename scalar_t, int R, int BK>
__global__ void __launch_bounds__(kThreads) fused_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ bt, Scale s, scalar_t* __restrict__ y,
    float* __restrict__ t_out, int64_t m, int64_t n, int64_t d) {
  __shared__ float xs[BK][kTile + 1];
  __shared__ float ws[BK][kTile + 1];
  __shared__ float as[BK][R];
  __shared__ float ts[kTile][R + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kSide + tx;
  const int64_t m0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const bool lora = a != nullptr;
  const int r = s.r;
  float acc[kPer][kPer] = {};
  float tacc[kPer][R / kSide] = {};

  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    load_slab<kTile>(xs, x, d, m0, m, k0, d, tid);
    load_slab<kTile>(ws, w, d, n0, n, k0, d, tid);
    if (lora) load_slab<R>(as, a, d, 0, r, k0, d, tid);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float xv[kPer], wv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        xv[i] = xs[k][ty + i * kSide];
        wv[i] = ws[k][tx + i * kSide];
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += xv[i] * wv[j];
      if (lora) {
#pragma unroll
        for (int q = 0; q < R / kSide; ++q) {
          const float av = as[k][tx + q * kSide];
#pragma unroll
          for (int i = 0; i < kPer; ++i) tacc[i][q] += xv[i] * av;
        }
      }
    }
    __syncthreads();
  }

  if (lora) {
    if (t_out != nullptr && blockIdx.y == 0) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t row = m0 + ty + i * kSide;
#pragma unroll
        for (int q = 0; q < R / kSide; ++q) {
          const int rank = tx + q * kSide;
          if (row < m && rank < r) t_out[row * r + rank] = tacc[i][q];
        }
      }
    }
    stage_scaled<R>(ts, tacc, s, m0, m, tx, ty);
    __syncthreads();
    add_low_rank<scalar_t, R>(acc, ts, bt, n, n0, n, r, tx, ty);
  }

#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t col = n0 + tx + j * kSide;
    if (col >= n) continue;
    const float b = bias != nullptr ? to_acc<float>(bias[col]) : 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t row = m0 + ty + i * kSide;
      if (row < m) y[row * n + col] = static_cast<scalar_t>(acc[i][j] + b);
    }
  }
}

// dX tile = dY W0 + U A with U = (dY B) .* S; the N-loop feeds the same dY tile to both, and to
// dB^T += (T.*S)^T dY and dbias in the blocks of d-tile 0. dA += U^T X for this tile's columns.
template <typename scalar_t, int R, int BK>
__global__ void __launch_bounds__(kThreads) fused_backward_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ w, const scalar_t* __restrict__ a,
    const scalar_t* __restrict__ bt, Scale s, const float* __restrict__ t_in, const scalar_t* __restrict__ x,
    scalar_t* __restrict__ dx, float* __restrict__ da, float* __restrict__ dbt, float* __restrict__ dbias,
    GradRanks da_ranks, GradRanks db_ranks, int64_t m, int64_t n, int64_t d) {
  __shared__ float dys[BK][kTile + 1];
  __shared__ float ws[BK][kTile + 1];
  __shared__ float bs[BK][R];
  __shared__ float us[kTile][R + 1];  // T.*S during the N-loop (for dB), then U
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kSide + tx;
  const int64_t m0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const bool lora = a != nullptr, need_dx = dx != nullptr;
  const bool owns_db = blockIdx.y == 0;  // each dY tile adds into dB / dbias exactly once
  const int r = s.r;
  float acc[kPer][kPer] = {};
  float uacc[kPer][R / kSide] = {};

  if (dbt != nullptr && owns_db) {
    for (int e = tid; e < kTile * R; e += kThreads) {
      const int i = e / R, q = e % R;
      const int64_t row = m0 + i;
      us[i][q] = (row < m && q < r) ? t_in[row * r + q] * s(row, q) : 0.f;
    }
  }
  for (int64_t n0 = 0; n0 < n; n0 += BK) {
    load_slab<kTile>(dys, dy, n, m0, m, n0, n, tid);
    if (need_dx) {
      for (int e = tid; e < kTile * BK; e += kThreads) {  // consecutive threads: consecutive columns
        const int k = e / kTile, j = e % kTile;
        ws[k][j] = load_or_zero(w + (n0 + k) * d + c0 + j, n0 + k < n && c0 + j < d);
      }
    }
    if (lora) load_slab<R>(bs, bt, n, 0, r, n0, n, tid);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float dv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) dv[i] = dys[k][ty + i * kSide];
      if (need_dx) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const float wv = ws[k][tx + j * kSide];
#pragma unroll
          for (int i = 0; i < kPer; ++i) acc[i][j] += dv[i] * wv;
        }
      }
      if (lora) {
#pragma unroll
        for (int q = 0; q < R / kSide; ++q) {
          const float bv = bs[k][tx + q * kSide];
#pragma unroll
          for (int i = 0; i < kPer; ++i) uacc[i][q] += dv[i] * bv;
        }
      }
    }
    if (owns_db) {
      if (dbt != nullptr) {
        for (int e = tid; e < R * BK; e += kThreads) {
          const int q = e / BK, k = e % BK;
          if (!db_ranks(q) || n0 + k >= n) continue;
          float sum = 0.f;
          for (int i = 0; i < kTile; ++i) sum += us[i][q] * dys[k][i];
          atomicAdd(dbt + int64_t(q) * n + n0 + k, sum);
        }
      }
      if (dbias != nullptr) {
        for (int k = tid; k < BK; k += kThreads) {
          if (n0 + k >= n) continue;
          float sum = 0.f;
          for (int i = 0; i < kTile; ++i) sum += dys[k][i];
          atomicAdd(dbias + n0 + k, sum);
        }
      }
    }
    __syncthreads();
  }

  if (lora) {
    stage_scaled<R>(us, uacc, s, m0, m, tx, ty);
    __syncthreads();
    if (need_dx) add_low_rank<scalar_t, R>(acc, us, a, d, c0, d, r, tx, ty);
    if (da != nullptr) {
      // U^T X for this block's rows and columns; the X tile is read through L1 (one pass over X).
      for (int e = tid; e < R * kTile; e += kThreads) {  // consecutive threads: consecutive columns
        const int q = e / kTile, j = e % kTile;
        const int64_t col = c0 + j;
        if (!da_ranks(q) || col >= d) continue;
        float sum = 0.f;
        for (int i = 0; i < kTile && m0 + i < m; ++i) sum += us[i][q] * to_acc<float>(x[(m0 + i) * d + col]);
        atomicAdd(da + int64_t(q) * d + col, sum);
      }
    }
  }

  if (need_dx) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t row = m0 + ty + i * kSide;
      if (row >= m) continue;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t col = c0 + tx + j * kSide;
        if (col < d) dx[row * d + col] = static_cast<scalar_t>(acc[i][j]);
      }
    }
  }
}

// Calls f.template operator()<R, BK>() for the smallest padded rank R >= r.
template <typename F>
void with_rank(int64_t r, F&& f) {
  TORCH_CHECK(r <= 128, "the CUDA DualLoRA kernels support a total adapter rank up to 128, got ", r,
              " (use backend='triton')");
  if (r <= 16) f(std::integral_constant<int, 16>{}, std::integral_constant<int, 16>{});
  else if (r <= 32) f(std::integral_constant<int, 32>{}, std::integral_constant<int, 16>{});
  else if (r <= 64) f(std::integral_constant<int, 64>{}, std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 128>{}, std::integral_constant<int, 8>{});  // BK 8: stay under 48 KiB
}

#define DUALLORA_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_operand(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
}

// The stacked adapter's rank (0 without one), after checking A and B^T against `like`.
int64_t adapter_rank(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& bt, const at::Tensor& like) {
  if (!(a.has_value() && a->defined())) return 0;
  TORCH_CHECK(bt.has_value() && bt->defined(), "B^T must be given with A");
  check_operand(*a, like, "A");
  check_operand(*bt, like, "B^T");
  TORCH_CHECK(a->dim() == 2 && bt->dim() == 2 && bt->size(0) == a->size(0), "A (r, d) and B^T (r, n) must agree on r");
  return a->size(0);
}

Scale make_scale(const std::optional<at::Tensor>& gate, int64_t r, int64_t r_orth, int64_t r_blk, double orth_scale,
                 double res_scale) {
  Scale s{nullptr, 0, int(r), int(r_orth), int(r_blk > 0 ? r_blk : 1), float(orth_scale), float(res_scale)};
  if (gate.has_value() && gate->defined()) {
    TORCH_CHECK(gate->scalar_type() == at::kFloat && gate->is_contiguous() && gate->dim() == 2,
                "gate must be a contiguous float32 (m, G) tensor");
    s.gate = gate->data_ptr<float>();
    s.blocks = gate->size(1);
  }
  return s;
}

}  // namespace

std::vector<at::Tensor> dual_lora_forward(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& bt,
                                          const std::optional<at::Tensor>& gate, int64_t r_orth, int64_t r_blk,
                                          double orth_scale, double res_scale, bool store_t) {
  TORCH_CHECK(x2.is_cuda() && x2.dim() == 2 && x2.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  check_operand(w, x2, "weight");
  const c10::cuda::CUDAGuard guard(x2.device());
  const int64_t m = x2.size(0), d = x2.size(1), n = w.size(0);
  const int64_t r = adapter_rank(a, bt, x2);
  const bool lora = r > 0;
  if (bias.has_value() && bias->defined()) check_operand(*bias, x2, "bias");
  at::Tensor y = at::empty({m, n}, x2.options());
  at::Tensor t = lora && store_t ? at::empty({m, r}, x2.options().dtype(at::kFloat)) : at::Tensor();
  if (m == 0 || n == 0) return {y, t};
  const Scale s = make_scale(gate, r, r_orth, r_blk, orth_scale, res_scale);
  const dim3 grid((m + kTile - 1) / kTile, (n + kTile - 1) / kTile), block(kSide, kSide);
  TORCH_CHECK(grid.y <= 65535, "n too large");
  DUALLORA_DISPATCH_KERNEL_TYPES(x2.scalar_type(), "duallora_fused_forward", [&] {
    with_rank(r, [&](auto rk, auto bk) {
      fused_forward_kernel<scalar_t, decltype(rk)::value, decltype(bk)::value>
          <<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
              x2.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), ptr_or_null<scalar_t>(a),
              ptr_or_null<scalar_t>(bt), s, y.data_ptr<scalar_t>(), t.defined() ? t.data_ptr<float>() : nullptr, m, n, d);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, t};
}

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
  const int64_t r = adapter_rank(a, bt, dy2);
  const bool lora = r > 0;
  const bool need_da = lora && (da_orth_end > 0 || da_res_start < r);
  const bool need_db = lora && (db_orth_end > 0 || db_res_start < r);
  if (need_da) check_operand(*x2, dy2, "x");
  if (need_db) TORCH_CHECK(t.has_value() && t->defined() && t->scalar_type() == at::kFloat, "T must be float32");
  const auto f32 = dy2.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty({m, d}, dy2.options()) : at::Tensor();
  at::Tensor da = need_da ? at::zeros({r, d}, f32) : at::Tensor();
  at::Tensor dbt = need_db ? at::zeros({r, n}, f32) : at::Tensor();
  at::Tensor dbias = need_dbias ? at::zeros({n}, f32) : at::Tensor();
  if (m == 0 || !(need_dx || need_da || need_db || need_dbias)) return {dx, da, dbt, dbias};
  const Scale s = make_scale(gate, r, r_orth, r_blk, orth_scale, res_scale);
  const GradRanks da_r{int(da_orth_end), int(da_res_start), int(r)}, db_r{int(db_orth_end), int(db_res_start), int(r)};
  // Without dX or dA there is nothing per d-tile: one column of blocks does dB / dbias.
  const int64_t d_span = (need_dx || need_da) ? d : 1;
  const dim3 grid((m + kTile - 1) / kTile, (d_span + kTile - 1) / kTile), block(kSide, kSide);
  TORCH_CHECK(grid.y <= 65535, "d too large");
  DUALLORA_DISPATCH_KERNEL_TYPES(dy2.scalar_type(), "duallora_fused_backward", [&] {
    with_rank(r, [&](auto rk, auto bk) {
      fused_backward_kernel<scalar_t, decltype(rk)::value, decltype(bk)::value>
          <<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
              dy2.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a), ptr_or_null<scalar_t>(bt), s,
              need_db ? t->data_ptr<float>() : nullptr, need_da ? x2->data_ptr<scalar_t>() : nullptr,
              need_dx ? dx.data_ptr<scalar_t>() : nullptr, need_da ? da.data_ptr<float>() : nullptr,
              need_db ? dbt.data_ptr<float>() : nullptr, need_dbias ? dbias.data_ptr<float>() : nullptr, da_r, db_r,
              m, n, d);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, da, dbt, dbias};
}

}  // namespace duallora
