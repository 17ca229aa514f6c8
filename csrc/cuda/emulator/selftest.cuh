// Self-test kernels of the SIMT emulator (tests/test_cuda_emulated.py, the sanitizer drivers):
// each exercises one emulated CUDA feature the fused kernels rely on. Torch-free.
#pragma once

#include "../simt.cuh"
#include "../tile.cuh"

namespace fastbind {
namespace simt_selftest {

using namespace fastbind::simt;

// C [M, N] = A [M, K] · B [K, N] (row-major, fp32) with 16×16 shared-memory tiles, every load and
// store masked: the classic kernel whose missing barrier or mask the sanitizers must catch.
constexpr int kTile = 16;

__global__ void tiled_matmul_kernel(const float* A, const float* B, float* C, int M, int N, int K) {
  float* As = dynamic_shared<float>();
  float* Bs = As + kTile * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * kTile + ty, col = blockIdx.x * kTile + tx;
  float acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += kTile) {
    As[ty * kTile + tx] = (row < M && k0 + tx < K) ? A[row * K + k0 + tx] : 0.f;
    Bs[ty * kTile + tx] = (col < N && k0 + ty < K) ? B[(k0 + ty) * N + col] : 0.f;
    __syncthreads();
    for (int k = 0; k < kTile; ++k) acc += As[ty * kTile + k] * Bs[k * kTile + tx];
    __syncthreads();
  }
  if (row < M && col < N) C[row * N + col] = acc;
}

inline void tiled_matmul(const float* A, const float* B, float* C, int M, int N, int K, stream_t stream) {
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile), block(kTile, kTile);
  launch(tiled_matmul_kernel, grid, block, 2 * kTile * kTile * sizeof(float), stream, A, B, C, M, N, K);
}

// Warp collectives on x [blocks·threads]: out[0] the warp's xor-butterfly sum (every lane), out[1]
// lane 0's value broadcast by __shfl_sync, out[2] the __shfl_down_sync tree sum (lane 0 only
// meaningful, others get their partial), out[3] the sum over the lower half-warp with a 16-lane
// mask (lanes >= 16 write 0: they do not take part).
__global__ void warp_ops_kernel(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const float v = i < n ? x[i] : 0.f;
  float s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
  const float b = __shfl_sync(kFullMask, v, 0);
  float t = v;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(kFullMask, t, o);
  float h = 0.f;
  if (lane < 16) {
    h = v;
    for (int o = 8; o > 0; o >>= 1) h += __shfl_xor_sync(0x0000ffffu, h, o);
  }
  if (i < n) {
    out[4 * i + 0] = s;
    out[4 * i + 1] = b;
    out[4 * i + 2] = t;
    out[4 * i + 3] = h;
  }
}

inline void warp_ops(const float* x, float* out, int n, stream_t stream) {
  launch(warp_ops_kernel, dim3((n + 63) / 64), dim3(64), 0, stream, x, out, n);
}

// Misuse of a warp operation, for the error tests (each aborts the emulator with a message):
// mode 1: a lane outside the mask calls; 2: the mask names lanes that never call;
// 3: a lane reads a lane outside the mask.
__global__ void bad_shuffle_kernel(float* out, int mode) {
  const int lane = threadIdx.x % 32;
  float v = float(lane);
  if (mode == 1) v = __shfl_xor_sync(0x0000ffffu, v, 1);
  if (mode == 2 && lane < 16) v = __shfl_xor_sync(kFullMask, v, 1);
  if (mode == 3 && lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);
  out[threadIdx.x] = v;
}

inline void bad_shuffle(float* out, int mode, stream_t stream) {
  launch(bad_shuffle_kernel, dim3(1), dim3(32), 0, stream, out, mode);
}

// out[j] += Σ of x[i] over i ≡ j (mod nbins), from every thread of every block.
__global__ void atomics_kernel(const float* x, float* out, int n, int nbins) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(out + i % nbins, x[i]);
}

inline void atomics(const float* x, float* out, int n, int nbins, stream_t stream) {
  launch(atomics_kernel, dim3((n + 127) / 128), dim3(128), 0, stream, x, out, n, nbins);
}

// One warp: D [16, 8] = A [16, 16] · B [16, 8] + C, fragments loaded and stored with the kernels'
// index helpers (simt::frag). `wrong` breaks one index on purpose (1: A's column halves swapped,
// 2: B's registers swapped, 3: D's row halves swapped) to show the test detects it.
template <typename T>
__global__ void mma_layout_kernel(const T* A, const T* B, const float* C, float* D, int wrong) {
  const int lane = threadIdx.x;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int r = 0; r < 4; ++r) {
    const int row = frag::a_row(lane, r);
    const int h0 = wrong == 1 ? 1 : 0;
    a[r] = pack2(A[row * 16 + frag::a_col(lane, r, h0)], A[row * 16 + frag::a_col(lane, r, 1 - h0)]);
  }
  for (int r = 0; r < 2; ++r) {
    const int rr = wrong == 2 ? 1 - r : r, n = frag::b_n(lane);
    b[r] = pack2(B[frag::b_k(lane, rr, 0) * 8 + n], B[frag::b_k(lane, rr, 1) * 8 + n]);
  }
  for (int i = 0; i < 4; ++i) c[i] = C[frag::c_row(lane, i) * 8 + frag::c_col(lane, i)];
  mma_m16n8k16(d, a, b, c, T{});
  for (int i = 0; i < 4; ++i) {
    const int row = (frag::c_row(lane, i) + (wrong == 3 ? 8 : 0)) % 16;
    D[row * 8 + frag::c_col(lane, i)] = d[i];
  }
}

template <typename T>
void mma_layout(const T* A, const T* B, const float* C, float* D, int wrong, stream_t stream) {
  launch(mma_layout_kernel<T>, dim3(1), dim3(32), 0, stream, A, B, C, D, wrong);
}

// C [M, N] = A·Bᵀ through the tile skeleton (tile.cuh), compute type TC, operands of type T in
// either layout (a_cols / b_cols: stored transposed), for the skeleton's own test.

template <typename TC, tile::Layout LA, tile::Layout LB, typename T>
__global__ void tile_gemm_kernel(const T* A, int64_t lda, const T* B, int64_t ldb, float* C, int M, int N, int D) {
  using G = tile::Gemm<TC, 64, 32, 32, 2, 2>;
  G g;
  const int m0 = blockIdx.y * 64, n0 = blockIdx.x * 32;
  g.template run<LA, LB>(A, lda, M, B, ldb, N, D, m0, n0, dynamic_shared<TC>());
  g.for_each([&](int r, int c, float v) {
    if (m0 + r < M && n0 + c < N) C[int64_t(m0 + r) * N + n0 + c] = v;
  });
}

template <typename TC, typename T>
void tile_gemm(const T* A, int64_t lda, bool a_cols, const T* B, int64_t ldb, bool b_cols, float* C, int M, int N,
               int D, stream_t stream) {
  using G = tile::Gemm<TC, 64, 32, 32, 2, 2>;
  const dim3 grid((N + 31) / 32, (M + 63) / 64), block(G::kThreads);
  constexpr auto R = tile::Layout::kRows, T_ = tile::Layout::kCols;
  if (!a_cols && !b_cols) launch(tile_gemm_kernel<TC, R, R, T>, grid, block, G::kSmemBytes, stream, A, lda, B, ldb, C, M, N, D);
  if (!a_cols && b_cols) launch(tile_gemm_kernel<TC, R, T_, T>, grid, block, G::kSmemBytes, stream, A, lda, B, ldb, C, M, N, D);
  if (a_cols && !b_cols) launch(tile_gemm_kernel<TC, T_, R, T>, grid, block, G::kSmemBytes, stream, A, lda, B, ldb, C, M, N, D);
  if (a_cols && b_cols) launch(tile_gemm_kernel<TC, T_, T_, T>, grid, block, G::kSmemBytes, stream, A, lda, B, ldb, C, M, N, D);
}

}  // namespace simt_selftest
}  // namespace fastbind
