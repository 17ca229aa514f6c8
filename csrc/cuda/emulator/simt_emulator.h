// Our SIMT emulator: runs the CUDA kernels of csrc/cuda/ on the CPU, compiled by the host compiler
// (-std=c++20 -DFASTBIND_SIMT_EMULATOR), so that `make test` executes the very same kernel source
// without a GPU (issue 11). Include it only through csrc/cuda/simt.cuh.
//
// Model (chosen so that the bugs a GPU would punish are caught, not hidden):
// * One OS thread per CUDA thread: a kernel is ordinary straight-line C++ per thread, so warps
//   diverge and reconverge exactly as the source says, and ThreadSanitizer sees every data race
//   a missing __syncthreads would cause. Blocks run one after another on the same threads.
// * __syncthreads is a block barrier; a thread that returns from the kernel drops out of it (as
//   exited threads do on sm_70+). A barrier not reached by every live thread aborts after a
//   timeout (FASTBIND_SIMT_TIMEOUT_S, default 120 s) with a message instead of hanging.
// * Warp operations (shuffles, __syncwarp, mma) are a rendezvous of the lanes the mask names
//   through a per-warp exchange buffer. A lane calling with a mask that does not name it, lanes
//   of one warp calling with different masks, reading a lane outside the mask, and a mask naming
//   lanes that exited or never arrive are errors: abort with a message (UB on the hardware).
// * Dynamic shared memory is a heap buffer of exactly the launch's size (AddressSanitizer sees an
//   overrun), filled with 0xFF bytes (NaN as float/bf16/half, -1 as int) before every block, so a
//   read of a slot no thread wrote shows up as NaN.
// * mma.sync m16n8k16: every lane deposits its fragment registers; the matrices are assembled from
//   the PTX ISA fragment tables written out below per element (independent of simt::frag, the
//   kernels' statement of the same layout), and each lane gets exactly its own D elements.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Per CUDA thread (= per OS thread) built-ins.
inline thread_local dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim, gridDim;

namespace fastbind {
namespace simt {

using stream_t = void*;

// ---- 16-bit floating point types: bit-exact with cvt.rn.{bf16,f16}.f32 (NaN -> 0x7fff) ----------
struct bf16 {
  uint16_t x;
};
struct half {
  uint16_t x;
};

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t bits(bf16 v) { return v.x; }
inline uint16_t bits(half v) { return v.x; }
inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return f32_from_bits(uint32_t(v.x) << 16); }
inline float to_float(half v) {
  const uint32_t sign = uint32_t(v.x & 0x8000) << 16, e = (v.x >> 10) & 0x1f, m = v.x & 0x3ff;
  if (e == 0x1f) return f32_from_bits(sign | 0x7f800000u | (m << 13));                 // inf / NaN
  if (e == 0) return f32_from_bits(sign | f32_bits(std::ldexp(float(m), -24)));        // zero / subnormal (exact)
  return f32_from_bits(sign | ((e + 112) << 23) | (m << 13));                           // normal
}

template <typename T>
T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline bf16 from_float<bf16>(float v) {
  uint32_t u = f32_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (overflow carries into inf)
  return {uint16_t(u >> 16)};
}
template <>
inline half from_float<half>(float v) {
  const uint32_t u = f32_bits(v) & 0x7fffffffu;
  const uint16_t sign = uint16_t((f32_bits(v) >> 16) & 0x8000u);
  if (u > 0x7f800000u) return {0x7fff};
  if (u >= 0x477ff000u) return {uint16_t(sign | 0x7c00)};  // >= 65520 rounds to inf
  if (u < 0x38800000u) {                                   // below 2^-14: a subnormal half (units of 2^-24)
    const uint32_t e = u >> 23;
    if (e == 0) return {sign};
    const uint32_t m = (u & 0x7fffffu) | 0x800000u, shift = 126 - e;
    if (shift > 24) return {sign};
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return {uint16_t(sign | q)};
  }
  uint32_t h = (u >> 13) - (112u << 10);
  const uint32_t rem = u & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return {uint16_t(sign | h)};
}

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "fastbind SIMT emulator error (block %u,%u,%u thread %u,%u,%u): ", blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  va_end(ap);
  std::abort();
}

inline std::chrono::milliseconds timeout() {
  static const long ms = [] {
    const char* s = std::getenv("FASTBIND_SIMT_TIMEOUT_S");
    return s ? long(std::atof(s) * 1000) : 120000L;
  }();
  return std::chrono::milliseconds(ms);
}

// Counting barrier with drop-out and a deadlock timeout (std::barrier has neither a timeout nor a
// way to tell which barrier hung). `on_complete` runs on the last arriving thread before release.
class Barrier {
 public:
  void reset(int n) {
    expected_ = n;
    arrived_ = 0;
  }
  template <typename F>
  void arrive_and_wait(const char* what, F&& on_complete) {
    std::unique_lock<std::mutex> lk(mu_);
    if (++arrived_ == expected_) {
      on_complete();
      release();
      return;
    }
    const uint64_t g = gen_;
    if (!cv_.wait_for(lk, timeout(), [&] { return gen_ != g; }))
      fail("%s: deadlock, %d of %d threads arrived (a barrier inside divergent code?)", what, arrived_, expected_);
  }
  void arrive_and_wait(const char* what) {
    arrive_and_wait(what, [] {});
  }
  void drop() {  // a thread leaves for good (returned from the kernel)
    std::lock_guard<std::mutex> lk(mu_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  std::mutex mu;
  std::condition_variable cv;
  unsigned arrived = 0, mask = 0, exited = 0;
  uint64_t gen = 0;
  const char* op = nullptr;
  uint64_t slot[32];  // shuffle payloads
  uint32_t a[32][4], b[32][2];
  float c[32][4];

  // All lanes named by `mask` meet here (the calling lane must be one of them).
  void rendezvous(unsigned m, int lane, const char* what) {
    std::unique_lock<std::mutex> lk(mu);
    if (!((m >> lane) & 1u)) fail("%s: lane %d calls it with mask 0x%08x, which does not name the lane", what, lane, m);
    if (m & exited) fail("%s: mask 0x%08x names lanes 0x%08x that have exited", what, m, m & exited);
    if (arrived == 0) {
      mask = m;
      op = what;
    } else if (mask != m || std::strcmp(op, what) != 0) {
      fail("%s with mask 0x%08x meets %s with mask 0x%08x in one warp (divergent warp operations)", what, m, op,
           mask);
    }
    arrived |= 1u << lane;
    if (arrived == m) {
      arrived = 0;
      ++gen;
      cv.notify_all();
      return;
    }
    const uint64_t g = gen;
    if (!cv.wait_for(lk, timeout(), [&] { return gen != g; }))
      fail("%s: mask 0x%08x names lanes 0x%08x that never called it", what, m, m & ~arrived);
  }
  void exit_lane(int lane) {
    std::lock_guard<std::mutex> lk(mu);
    if (arrived != 0 && ((mask >> lane) & 1u))
      fail("lane %d returned while lanes 0x%08x wait for it in %s (mask 0x%08x)", lane, arrived, op, mask);
    exited |= 1u << lane;
  }
};

// The state of one launch, shared by its threads.
struct Launch {
  dim3 grid, block;
  unsigned nthreads = 0, nwarps = 0;
  size_t smem_bytes = 0;
  std::unique_ptr<unsigned char[]> smem;
  Barrier sync, block_done;
  std::unique_ptr<Warp[]> warps;

  void start_block() {  // called while no thread of the launch runs kernel code
    if (smem_bytes) std::memset(smem.get(), 0xff, smem_bytes);
    sync.reset(int(nthreads));
    for (unsigned w = 0; w < nwarps; ++w) {
      const unsigned lanes = std::min(32u, nthreads - 32 * w);
      warps[w].arrived = 0;
      warps[w].exited = lanes == 32 ? 0u : ~((1u << lanes) - 1);  // lanes past the block never call
    }
  }
};

struct Self {
  Launch* launch;
  unsigned tid;
  int lane;
  Warp& warp() const { return launch->warps[tid / 32]; }
};
inline thread_local Self* self = nullptr;

inline Self& current() {
  if (!self) {
    std::fprintf(stderr, "fastbind SIMT emulator: device function called outside a kernel launch\n");
    std::abort();
  }
  return *self;
}

template <typename T>
T shuffle(unsigned mask, T v, int src, bool valid, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Self& s = current();
  Warp& w = s.warp();
  uint64_t payload = 0;
  std::memcpy(&payload, &v, sizeof(T));
  w.slot[s.lane] = payload;
  w.rendezvous(mask, s.lane, what);
  T out = v;
  if (valid) {
    if (!((mask >> src) & 1u)) fail("%s: lane %d reads lane %d, which mask 0x%08x does not name", what, s.lane, src, mask);
    std::memcpy(&out, &w.slot[src], sizeof(T));
  }
  w.rendezvous(mask, s.lane, what);  // no lane overwrites a slot before every lane has read
  return out;
}

// The PTX ISA tables ("Matrix Fragments for mma.m16n8k16 with floating point type"), element by
// element, with groupID = lane >> 2 and threadID_in_group = lane % 4:
//   A: a_i, i = 0..7 (register i/2, low half for even i)
//      row = groupID for i in {0,1,4,5}, groupID + 8 otherwise; col = 2·tig + (i & 1) (+ 8 for i >= 4)
//   B: b_i, i = 0..3 (register i/2): row (k) = 2·tig + (i & 1) (+ 8 for i >= 2); col (n) = groupID
//   C, D: c_i, i = 0..3: row = groupID (+ 8 for i >= 2); col = 2·tig + (i & 1)
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         bool is_bf16) {
  Self& s = current();
  Warp& w = s.warp();
  std::memcpy(w.a[s.lane], a, sizeof(a));
  std::memcpy(w.b[s.lane], b, sizeof(b));
  std::memcpy(w.c[s.lane], c, sizeof(c));
  w.rendezvous(0xffffffffu, s.lane, "mma.sync.aligned.m16n8k16");
  auto element = [is_bf16](uint32_t reg, int i) {
    const uint16_t h = uint16_t((i & 1) ? reg >> 16 : reg & 0xffff);
    return is_bf16 ? to_float(bf16{h}) : to_float(half{h});
  };
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = element(w.a[lane][i / 2], i);
    }
    for (int i = 0; i < 4; ++i) B[tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)][group] = element(w.b[lane][i / 2], i);
    for (int i = 0; i < 4; ++i) C[group + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)] = w.c[lane][i];
  }
  const int group = s.lane >> 2, tig = s.lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = group + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
    // Products of 16-bit values are exact in fp32; the hardware's adder order is unspecified, so
    // we sum in double and round once (within the tests' tolerances of any fp32 accumulation).
    double acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
    d[i] = float(acc);
  }
  w.rendezvous(0xffffffffu, s.lane, "mma.sync.aligned.m16n8k16");  // buffers stay until all have read
}

}  // namespace emu

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(emu::current().launch->smem.get());
}

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma_m16n8k16(d, a, b, c, true);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma_m16n8k16(d, a, b, c, false);
}

// Runs kernel over the grid: blockDim OS threads, each walking through the blocks in order.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, stream_t, Args&&... args) {
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  if (nthreads == 0 || nthreads > 1024) emu::fail("launch: %u threads per block (1..1024)", nthreads);
  // The sm_80 limit of dynamic shared memory per block (163 KiB); sm_90 allows 227 KiB.
  if (smem_bytes > 163 * 1024) emu::fail("launch: %zu bytes of shared memory (sm_80 allows 163 KiB)", smem_bytes);
  if (nblocks == 0) return;
  emu::Launch L;
  L.grid = grid;
  L.block = block;
  L.nthreads = nthreads;
  L.nwarps = (nthreads + 31) / 32;
  L.smem_bytes = smem_bytes;
  L.smem.reset(new unsigned char[smem_bytes ? smem_bytes : 1]);
  L.warps.reset(new emu::Warp[L.nwarps]);
  L.block_done.reset(int(nthreads));
  L.start_block();
  const std::tuple<std::decay_t<KArgs>...> kargs(static_cast<KArgs>(args)...);
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned tid = 0; tid < nthreads; ++tid) {
    threads.emplace_back([&, tid] {
      emu::Self me{&L, tid, int(tid % 32)};
      emu::self = &me;
      blockDim = block;
      gridDim = grid;
      threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
      for (unsigned long long b = 0; b < nblocks; ++b) {
        blockIdx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (1ull * grid.x * grid.y)));
        std::apply(kernel, kargs);
        me.warp().exit_lane(me.lane);
        L.sync.drop();
        L.block_done.arrive_and_wait("end of block", [&] { L.start_block(); });
      }
      emu::self = nullptr;
    });
  }
  for (std::thread& t : threads) t.join();
}

}  // namespace simt
}  // namespace fastbind

// ---- CUDA built-ins ------------------------------------------------------------------------------

inline void __syncthreads() { fastbind::simt::emu::current().launch->sync.arrive_and_wait("__syncthreads"); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fastbind::simt::emu::Self& s = fastbind::simt::emu::current();
  s.warp().rendezvous(mask, s.lane, "__syncwarp");
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = fastbind::simt::emu::current().lane;
  return fastbind::simt::emu::shuffle(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)), true, "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = fastbind::simt::emu::current().lane, src = lane ^ lane_mask;
  // A source outside the lane's width-segment returns the lane's own value.
  const bool valid = (src & ~(width - 1)) == (lane & ~(width - 1));
  return fastbind::simt::emu::shuffle(mask, v, src, valid, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = fastbind::simt::emu::current().lane, src = lane + int(delta);
  const bool valid = (src & ~(width - 1)) == (lane & ~(width - 1));
  return fastbind::simt::emu::shuffle(mask, v, src, valid, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = fastbind::simt::emu::current().lane, src = lane - int(delta);
  const bool valid = src >= 0 && (src & ~(width - 1)) == (lane & ~(width - 1));
  return fastbind::simt::emu::shuffle(mask, v, src, valid, "__shfl_up_sync");
}

template <typename T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline unsigned __float_as_uint(float f) { return fastbind::simt::f32_bits(f); }
inline float __uint_as_float(unsigned u) { return fastbind::simt::f32_from_bits(u); }
