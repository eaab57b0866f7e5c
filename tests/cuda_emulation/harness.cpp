// Runs csrc/'s fused forward / backward kernels on the CPU (tests/test_cuda_emulation.py builds and
// drives it): every CUDA thread of a block is a host thread, __syncthreads a barrier of the block's
// 256, the warp instructions those of warp_emulation.h; blocks run one after another. Shared memory
// starts each block filled with NaN bit patterns and the 16-bit outputs start as NaN, so a read of
// unwritten shared memory or an unwritten output shows up in the results.
//
//   harness DIR    reads DIR/params.txt (key value lines) and DIR/<tensor>.bin (raw little-endian),
//                  writes DIR/<output>.bin
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim emu_thread_idx, emu_block_idx;
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define threadIdx emu_thread_idx
#define blockIdx emu_block_idx
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH__ 800
using std::min;

inline std::barrier<>* emu_block_barrier = nullptr;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline float __uint_as_float(uint32_t v) { return std::bit_cast<float>(v); }

// The kernels' `extern __shared__ uint16_t smem[]` (declared in a function of the .cu files'
// unnamed namespace inside duallora) names this array: one block runs at a time.
constexpr size_t kSmemElems = 128 * 1024 / 2;
namespace duallora {
namespace {
alignas(16) uint16_t smem[kSmemElems];
}  // namespace
}  // namespace duallora
using duallora::smem;

#include "fused_backward.cu"
#include "fused_forward.cu"

namespace {

using duallora::GradRanks;
using duallora::Scale;

std::map<std::string, double> read_params(const std::string& dir) {
  std::ifstream in(dir + "/params.txt");
  std::map<std::string, double> p;
  std::string key;
  double value;
  while (in >> key >> value) p[key] = value;
  return p;
}

template <typename T>
std::vector<T> read(const std::string& dir, const std::string& name, size_t count) {
  std::vector<T> v(count);
  if (count == 0) return v;
  std::ifstream in(dir + "/" + name + ".bin", std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(v.data()), count * sizeof(T))) throw std::runtime_error("cannot read " + name);
  return v;
}

template <typename T>
void write(const std::string& dir, const std::string& name, const std::vector<T>& v) {
  std::ofstream(dir + "/" + name + ".bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Every block of the grid, one after another, each as 256 host threads.
template <typename Args>
void run_grid(void (*kernel)(const Args), const Args& args, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b) {
    std::fill(smem, smem + kSmemElems, uint16_t(0xffff));
    std::barrier<> block(duallora::tiles::kThreads);
    std::vector<duallora::mma::detail::Warp> warps(duallora::tiles::kThreads / 32);
    emu_block_barrier = &block;
    duallora::mma::detail::warps = warps.data();
    std::vector<std::thread> threads;
    for (int t = 0; t < duallora::tiles::kThreads; ++t) {
      threads.emplace_back([&, t] {
        emu_thread_idx.x = unsigned(t);
        emu_block_idx.x = unsigned(b);
        kernel(args);
      });
    }
    for (auto& th : threads) th.join();
  }
}

template <typename F>
void with_rank_and_dtype(int r_pad, bool bf16, F&& f) {
  auto by_rank = [&](auto b) {
    switch (r_pad) {
      case 16: f(b, std::integral_constant<int, 16>{}); break;
      case 32: f(b, std::integral_constant<int, 32>{}); break;
      case 64: f(b, std::integral_constant<int, 64>{}); break;
      case 128: f(b, std::integral_constant<int, 128>{}); break;
      default: throw std::runtime_error("r_pad must be 16, 32, 64 or 128");
    }
  };
  if (bf16) by_rank(std::true_type{});
  else by_rank(std::false_type{});
}

int64_t tiles(int64_t extent, int64_t tile) { return (extent + tile - 1) / tile; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: harness DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  auto p = read_params(dir);
  const int64_t m = int64_t(p["m"]), n = int64_t(p["n"]), d = int64_t(p["d"]), r = int64_t(p["r"]);
  const int64_t groups = int64_t(p["G"]);
  const bool bf16 = p["bf16"] != 0, lora = r > 0;
  const int r_pad = int(p["r_pad"]);
  auto gate = read<float>(dir, "gate", p["has_gate"] != 0 ? size_t(m * groups) : 0);
  Scale s{gate.empty() ? nullptr : gate.data(), groups, m, int(r), int(p["r_orth"]), int(p["r_blk"]),
          float(p["orth_scale"]), float(p["res_scale"])};
  auto w = read<uint16_t>(dir, "w", size_t(n * d));
  auto a = read<uint16_t>(dir, "a", size_t(r * d));
  auto bt = read<uint16_t>(dir, "bt", size_t(r * n));
  const bool vec = p["vec"] != 0;  // 0: force the element-wise load path everywhere
  if (p["mode"] == 0) {  // forward
    auto x = read<uint16_t>(dir, "x", size_t(m * d));
    auto bias = read<uint16_t>(dir, "bias", p["has_bias"] != 0 ? size_t(n) : 0);
    std::vector<uint16_t> y(size_t(m * n), 0xffff), t(p["store_t"] != 0 ? size_t(m * r) : 0, 0xffff);
    duallora::ForwardArgs args{x.data(), w.data(), bias.empty() ? nullptr : bias.data(), lora ? a.data() : nullptr,
                               lora ? bt.data() : nullptr, y.data(), t.empty() ? nullptr : t.data(), s, m, n, d,
                               vec && d % 8 == 0, vec && d % 8 == 0, vec && d % 8 == 0, vec && n % 8 == 0};
    with_rank_and_dtype(r_pad, bf16, [&](auto b, auto rank) {
      run_grid(&duallora::fused_forward_kernel<decltype(b)::value, decltype(rank)::value>, args,
               tiles(m, duallora::tiles::kBlockM) * tiles(n, duallora::tiles::kBlockN));
    });
    write(dir, "y", y);
    write(dir, "t_out", t);
    return 0;
  }
  auto dy = read<uint16_t>(dir, "dy", size_t(m * n));
  auto x = read<uint16_t>(dir, "x", size_t(m * d));
  auto t = read<uint16_t>(dir, "t", size_t(m * r));
  const bool need_dx = p["need_dx"] != 0, need_dbias = p["need_dbias"] != 0;
  const GradRanks da_r{int(p["da_orth_end"]), int(p["da_res_start"]), int(r)};
  const GradRanks db_r{int(p["db_orth_end"]), int(p["db_res_start"]), int(r)};
  const bool need_da = lora && (da_r.orth_end > 0 || da_r.res_start < r);
  const bool need_db = lora && (db_r.orth_end > 0 || db_r.res_start < r);
  std::vector<uint16_t> dx(need_dx ? size_t(m * d) : 0, 0xffff);
  std::vector<float> da(need_da ? size_t(r * d) : 0, 0.f), dbt(need_db ? size_t(r * n) : 0, 0.f);
  std::vector<float> dbias(need_dbias ? size_t(n) : 0, 0.f);
  const int64_t d_span = (need_dx || need_da) && d > 0 ? d : 1;
  duallora::BackwardArgs args{dy.data(), w.data(), lora ? a.data() : nullptr, lora ? bt.data() : nullptr,
                              need_db ? t.data() : nullptr, need_da ? x.data() : nullptr,
                              need_dx ? dx.data() : nullptr, need_da ? da.data() : nullptr,
                              need_db ? dbt.data() : nullptr, need_dbias ? dbias.data() : nullptr, s, da_r, db_r,
                              m, n, d, d_span, vec && n % 8 == 0, vec && d % 8 == 0, vec && d % 8 == 0,
                              vec && n % 8 == 0, vec && d % 8 == 0};
  with_rank_and_dtype(r_pad, bf16, [&](auto b, auto rank) {
    run_grid(&duallora::fused_backward_kernel<decltype(b)::value, decltype(rank)::value>, args,
             tiles(m, duallora::tiles::kBlockM) * tiles(d_span, duallora::tiles::kBlockN));
  });
  write(dir, "dx", dx);
  write(dir, "da", da);
  write(dir, "dbt", dbt);
  write(dir, "dbias", dbias);
  return 0;
}
