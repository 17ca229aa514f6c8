// Python module of the emulated build (tests/test_cuda_emulated.py): the emulator's self-tests on
// CPU tensors. The fused ops of csrc/cuda/<family>.cu register themselves under fastbind_emu.
#include <torch/extension.h>

#include "selftest.cuh"

namespace {

using namespace fastbind;

at::Tensor tiled_matmul(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.size(1) == b.size(0));
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  at::Tensor C = at::empty({a.size(0), b.size(1)}, a.options());
  simt_selftest::tiled_matmul(A.data_ptr<float>(), B.data_ptr<float>(), C.data_ptr<float>(), int(a.size(0)),
                              int(b.size(1)), int(a.size(1)), nullptr);
  return C;
}

at::Tensor warp_ops(const at::Tensor& x) {
  const at::Tensor X = x.contiguous();
  at::Tensor out = at::empty({x.numel(), 4}, x.options());
  simt_selftest::warp_ops(X.data_ptr<float>(), out.data_ptr<float>(), int(x.numel()), nullptr);
  return out;
}

at::Tensor bad_shuffle(int64_t mode) {
  at::Tensor out = at::zeros({32}, at::kFloat);
  simt_selftest::bad_shuffle(out.data_ptr<float>(), int(mode), nullptr);
  return out;
}

at::Tensor atomics(const at::Tensor& x, int64_t nbins) {
  const at::Tensor X = x.contiguous();
  at::Tensor out = at::zeros({nbins}, x.options());
  simt_selftest::atomics(X.data_ptr<float>(), out.data_ptr<float>(), int(x.numel()), int(nbins), nullptr);
  return out;
}

// a [16, 16], b [16, 8] (float16 or bfloat16), c [16, 8] float32 -> a·b + c through the emulated mma.
at::Tensor mma_layout(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t wrong) {
  const at::Tensor A = a.contiguous(), B = b.contiguous(), C = c.contiguous();
  at::Tensor D = at::empty({16, 8}, c.options());
  if (a.scalar_type() == at::kBFloat16) {
    simt_selftest::mma_layout(reinterpret_cast<const simt::bf16*>(A.data_ptr()),
                              reinterpret_cast<const simt::bf16*>(B.data_ptr()), C.data_ptr<float>(),
                              D.data_ptr<float>(), int(wrong), nullptr);
  } else {
    simt_selftest::mma_layout(reinterpret_cast<const simt::half*>(A.data_ptr()),
                              reinterpret_cast<const simt::half*>(B.data_ptr()), C.data_ptr<float>(),
                              D.data_ptr<float>(), int(wrong), nullptr);
  }
  return D;
}

// a [M, D] (or aᵀ stored as [D, M] when a_cols), b likewise -> a·bᵀ [M, N] float32 through
// tile::Gemm with compute type `compute` ("float" or the 16-bit dtype of the inputs).
at::Tensor tile_gemm(const at::Tensor& a, const at::Tensor& b, bool a_cols, bool b_cols, bool tensor_cores) {
  TORCH_CHECK(a.stride(-1) == 1 && b.stride(-1) == 1 && a.scalar_type() == b.scalar_type());
  const int64_t M = a_cols ? a.size(1) : a.size(0), D = a_cols ? a.size(0) : a.size(1);
  const int64_t N = b_cols ? b.size(1) : b.size(0);
  at::Tensor C = at::empty({M, N}, a.options().dtype(at::kFloat));
  auto run = [&](auto tc, auto t) {
    using TC = decltype(tc);
    using T = decltype(t);
    simt_selftest::tile_gemm<TC>(reinterpret_cast<const T*>(a.data_ptr()), a.stride(0), a_cols,
                                 reinterpret_cast<const T*>(b.data_ptr()), b.stride(0), b_cols, C.data_ptr<float>(),
                                 int(M), int(N), int(D), nullptr);
  };
  if (a.scalar_type() == at::kFloat) {
    run(float{}, float{});
  } else if (a.scalar_type() == at::kBFloat16) {
    tensor_cores ? run(simt::bf16{}, simt::bf16{}) : run(float{}, simt::bf16{});
  } else {
    tensor_cores ? run(simt::half{}, simt::half{}) : run(float{}, simt::half{});
  }
  return C;
}

// float32 -> the bits of simt::from_float<bf16 / half> (int16), for the bit-exactness test.
at::Tensor round16(const at::Tensor& x, bool is_bf16) {
  const at::Tensor X = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kShort));
  const float* p = X.data_ptr<float>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    o[i] = int16_t(is_bf16 ? simt::bits(simt::from_float<simt::bf16>(p[i])) : simt::bits(simt::from_float<simt::half>(p[i])));
  }
  return out;
}

// int16 bits -> float32 through simt::to_float.
at::Tensor widen16(const at::Tensor& bits, bool is_bf16) {
  const at::Tensor B = bits.contiguous();
  at::Tensor out = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  const int16_t* p = B.data_ptr<int16_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < bits.numel(); ++i) {
    const uint16_t h = uint16_t(p[i]);
    o[i] = is_bf16 ? simt::to_float(simt::bf16{h}) : simt::to_float(simt::half{h});
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tiled_matmul", &tiled_matmul);
  m.def("warp_ops", &warp_ops);
  m.def("bad_shuffle", &bad_shuffle);
  m.def("atomics", &atomics);
  m.def("mma_layout", &mma_layout);
  m.def("round16", &round16);
  m.def("tile_gemm", &tile_gemm);
  m.def("widen16", &widen16);
}
