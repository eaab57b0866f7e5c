// Host emulation of the four warp instructions of csrc/mma_sm80.cuh (mma.sync m16n8k16, ldmatrix
// x4 / x2.trans, cp.async), included by that header in place of its inline PTX when
// DUALLORA_WARP_EMULATION names this file. Each CUDA thread of a block is a host thread
// (harness.cpp); a warp's collective instruction is two barriers of its 32 lanes: every lane posts
// its operands, then every lane computes its own registers from all the posts, as the PTX ISA's
// fragment layouts define them (g = lane / 4, c = lane % 4):
//   A (16 x 16): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 8+2c..), a3 = (g+8, 8+2c..)
//   B (16 x 8):  b0 = (k 2c..2c+1, n g), b1 = (k 8+2c.., n g);  C: c0,c1 = (g, 2c..), c2,c3 = (g+8, 2c..)
//   ldmatrix: lanes 8j..8j+7 give the row addresses of matrix j; register j of lane L holds row L/4,
//   columns 2(L%4), +1 of matrix j (.trans: rows 2(L%4), +1 of column L/4).
// cp.async copies when its thread waits for it (below). What is not emulated: the hardware's
// timing, i.e. races that only some interleavings show. This is test code: csrc/ never includes
// it unless a test asks.

namespace detail {

struct WarpPost {
  const uint16_t* addr;
  uint32_t a[4];
  uint32_t b[2];
};

struct Warp {
  Warp() : barrier(32) {}
  std::barrier<> barrier;
  WarpPost post[32];
};

inline Warp* warps = nullptr;  // the current block's 8 warps (harness.cpp)

inline int lane() { return int(emu_thread_idx.x % 32); }
inline Warp& warp() { return warps[emu_thread_idx.x / 32]; }

template <bool kBf16>
inline float half_to_float(uint16_t bits) {
  if constexpr (kBf16) return std::bit_cast<float>(uint32_t(bits) << 16);
  else return __half2float(__ushort_as_half(bits));
}

inline uint16_t lo(uint32_t v) { return uint16_t(v & 0xffffu); }
inline uint16_t hi(uint32_t v) { return uint16_t(v >> 16); }

}  // namespace detail

template <bool kBf16>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::Warp& w = detail::warp();
  const int me = detail::lane();
  w.post[me] = {nullptr, {a[0], a[1], a[2], a[3]}, {b0, b1}};
  w.barrier.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, q = l % 4;
    const detail::WarpPost& p = w.post[l];
    for (int h = 0; h < 2; ++h) {  // h: low / high half of a register
      auto get = [&](uint32_t v) { return detail::half_to_float<kBf16>(h ? detail::hi(v) : detail::lo(v)); };
      A[g][2 * q + h] = get(p.a[0]);
      A[g + 8][2 * q + h] = get(p.a[1]);
      A[g][8 + 2 * q + h] = get(p.a[2]);
      A[g + 8][8 + 2 * q + h] = get(p.a[3]);
      B[2 * q + h][g] = get(p.b[0]);
      B[8 + 2 * q + h][g] = get(p.b[1]);
    }
  }
  const int g = me / 4, q = me % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i / 2) * 8, col = 2 * q + i % 2;
    float sum = c[i];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[i] = sum;
  }
  w.barrier.arrive_and_wait();  // the posts may be overwritten after this
}

template <int kMatrices, bool kTrans>
inline void ldmatrix(uint32_t* r, const uint16_t* p) {
  detail::Warp& w = detail::warp();
  const int me = detail::lane();
  w.post[me].addr = p;
  w.barrier.arrive_and_wait();
  const int g = me / 4, q = me % 4;
  for (int j = 0; j < kMatrices; ++j) {
    const uint16_t* const* rows = nullptr;
    const uint16_t* row_addr[8];
    for (int i = 0; i < 8; ++i) row_addr[i] = w.post[8 * j + i].addr;
    rows = row_addr;
    uint16_t e0, e1;
    if (kTrans) {
      e0 = rows[2 * q][g];
      e1 = rows[2 * q + 1][g];
    } else {
      e0 = rows[g][2 * q];
      e1 = rows[g][2 * q + 1];
    }
    r[j] = uint32_t(e0) | (uint32_t(e1) << 16);
  }
  w.barrier.arrive_and_wait();
}

template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  ldmatrix<4, kTrans>(r, p);
}

inline void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const uint16_t* p) {
  uint32_t r[2];
  ldmatrix<2, true>(r, p);
  r0 = r[0];
  r1 = r[1];
}

// cp.async lands as late as the PTX rules allow: a copy is made only when its thread waits for
// its group (cp.async.wait_group N completes all but the newest N committed groups), so a read of
// a stage before its wait, or a prefetch that overwrites a stage still being read, changes results.
namespace detail {
struct AsyncCopy {
  uint16_t* dst;
  const uint16_t* src;  // nullptr: zero-fill
};
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::deque<std::vector<AsyncCopy>> committed;
}  // namespace detail

inline void cp_async16(uint16_t* dst, const uint16_t* src, int src_bytes) {
  detail::open_group.push_back({dst, src_bytes == 16 ? src : nullptr});
}
inline void cp_async_commit() {
  detail::committed.push_back(std::move(detail::open_group));
  detail::open_group.clear();
}
template <int kPending>
inline void cp_async_wait() {
  while (detail::committed.size() > size_t(kPending)) {
    for (const detail::AsyncCopy& c : detail::committed.front()) {
      if (c.src != nullptr) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    detail::committed.pop_front();
  }
}
