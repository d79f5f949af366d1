// CUDA kernels of the lorafusion ops (schemas in ops.cpp, math in lorafusion/reference.py).
//
// Every memory-bound op is one skinny GEMM, C (+)= alpha * L R, with one side or the output of rank r, so a single
// tiled kernel serves them all: operands are read through arbitrary strides (non-contiguous inputs need no copy) and
// converted to float on the way into shared memory, the dropout mask is regenerated from Philox where the op needs it
// (on L, on R, or on the output; one Philox block per four masked elements), accumulation is float32, and the long
// reductions of dA and dB (over the tokens) split K over blocks with float atomics, so dA and dB may differ in the
// last bits run to run (S, dS, Y and dX are not split and are deterministic). The composites use cuBLAS (at::addmm / at::mm) for the two large GEMMs.
// Only c10/cuda headers are used, not ATen/cuda/CUDAContext.h (which needs the cuBLAS / cuSPARSE headers), so the
// file compile-checks against a bare nvcc; per-operator ATen headers rather than ATen/ATen.h keep compiles short.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "lora_gemm.cuh"
#include "philox.h"

namespace lorafusion {
namespace {

using at::Tensor;

using namespace gemm;  // GemmArgs, the mask modes and the tile constants

// C (+)= alpha * L R, one 64 x 64 tile of C per block over blockIdx.z's share of K (lora_gemm.cuh).
template <typename TL, typename TR, typename TC>
__global__ void __launch_bounds__(kThreads) lora_gemm_kernel(const TL* __restrict__ L, const TR* __restrict__ R,
                                                              TC* __restrict__ C, GemmArgs a) {
  __shared__ gemm::TileSmem sm;
  const int k_begin = blockIdx.z * a.k_per_split;
  gemm::gemm_tile<TL, TR, TC>(L, R, C, a, blockIdx.x * kBM, blockIdx.y * kBN, 0, a.M, k_begin,
                              min(a.K, k_begin + a.k_per_split), gridDim.z > 1, sm);
}

struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  float keep_scale;
  bool active;
};

Dropout make_dropout(int64_t seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lorafusion: dropout p must be in [0, 1), got ", p);
  return {static_cast<uint64_t>(seed), dropout_threshold(p), static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
}

// C (+)= alpha * L R for L (M x K) and R (K x N) given as 2-D views (any strides). split_k: reduce K over blocks
// with atomics (C must be float32 and hold the initial value, normally zeros).
template <typename TL, typename TR, typename TC>
void launch_gemm(const Tensor& L, const Tensor& R, const Tensor& C, float alpha, bool accumulate, int mask_on,
                 const Dropout& d, bool split_k) {
  const int M = static_cast<int>(L.size(0)), K = static_cast<int>(L.size(1)), N = static_cast<int>(R.size(1));
  if (M == 0 || N == 0) return;
  GemmArgs a{L.stride(0), L.stride(1), R.stride(0), R.stride(1), C.stride(0), C.stride(1), M, N, K, K,
             alpha, accumulate, d.active ? mask_on : kMaskNone, d.seed, d.threshold, d.keep_scale};
  const int gm = (M + kBM - 1) / kBM, gn = (N + kBN - 1) / kBN;
  int splits = 1;
  if (split_k && K > 0) {
    // Enough blocks to fill the device twice over, each still reducing several K tiles.
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int want = std::max(1, (2 * sms + gm * gn - 1) / (gm * gn));
    const int max_splits = std::max(1, K / (4 * kBK));
    splits = std::min(want, max_splits);
    a.k_per_split = ((K + splits - 1) / splits + kBK - 1) / kBK * kBK;
    splits = (K + a.k_per_split - 1) / a.k_per_split;
  }
  if (K == 0) {  // an empty sum: C keeps its initial value when accumulating, else is zero (it may be at::empty)
    if (!accumulate) C.zero_();
    return;
  }
  dim3 grid(gm, gn, splits);
  lora_gemm_kernel<TL, TR, TC><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      L.data_ptr<TL>(), R.data_ptr<TR>(), C.data_ptr<TC>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_2d_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "lorafusion: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_cuda(), "lorafusion: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "lorafusion: ", name, " must be float32, float16 or bfloat16 on CUDA, got ", t.scalar_type());
}

// t on the device of the op's first operand: the kernels launch there (its guard), and a tensor on another GPU would
// hand them a pointer into another device's memory.
void check_2d_cuda(const Tensor& t, const char* name, const Tensor& first) {
  check_2d_cuda(t, name);
  TORCH_CHECK(t.device() == first.device(), "lorafusion: ", name, " is on ", t.device(), " but the op runs on ",
              first.device());
}

#define LORAFUSION_DISPATCH(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ------------------------------------------------------------------------------------------------------------------

Tensor dropout_keep_mask_cuda(const Tensor& x, int64_t seed, double p) {
  // Rare (tests, debugging): reuse the GEMM kernel's mask path on a ones matrix times an identity.
  TORCH_CHECK(x.dim() == 2 && x.is_cuda(), "lorafusion: x must be a 2-D CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  const Dropout d = make_dropout(seed, p);
  Tensor ones = at::ones({x.size(0), 1}, x.options().dtype(at::kFloat));
  Tensor row = at::ones({1, x.size(1)}, x.options().dtype(at::kFloat));
  Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  launch_gemm<float, float, float>(ones, row, out, 1.f, false, kMaskOut, d, false);
  return out.ne(0);
}

Tensor lora_shrink_cuda(const Tensor& x, const Tensor& A, int64_t seed, double p) {
  check_2d_cuda(x, "x");
  check_2d_cuda(A, "A", x);
  TORCH_CHECK(A.size(1) == x.size(1), "lorafusion: A must be (r, ", x.size(1), "), got ", A.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const Dropout d = make_dropout(seed, p);
  Tensor Af = A.to(at::kFloat);
  Tensor S = at::empty({x.size(0), A.size(0)}, x.options().dtype(at::kFloat));
  LORAFUSION_DISPATCH(x.scalar_type(), "lora_shrink", [&] {
    launch_gemm<scalar_t, float, float>(x, Af.t(), S, 1.f, false, kMaskL, d, false);
  });
  return S;
}

std::tuple<Tensor, Tensor> lora_dy_shrink_cuda(const Tensor& dy, const Tensor& B, const Tensor& S, double scale) {
  check_2d_cuda(dy, "dy");
  check_2d_cuda(B, "B", dy);
  check_2d_cuda(S, "S", dy);
  TORCH_CHECK(B.size(0) == dy.size(1) && S.size(0) == dy.size(0) && S.size(1) == B.size(1), "lorafusion: dy ",
              dy.sizes(), ", B ", B.sizes(), ", S ", S.sizes(), " do not chain");
  c10::cuda::CUDAGuard guard(dy.device());
  const Dropout none = make_dropout(0, 0.0);
  Tensor Bf = B.to(at::kFloat), Sf = S.to(at::kFloat);
  Tensor dS = at::empty({dy.size(0), B.size(1)}, dy.options().dtype(at::kFloat));
  Tensor dB = at::zeros({dy.size(1), B.size(1)}, dy.options().dtype(at::kFloat));
  LORAFUSION_DISPATCH(dy.scalar_type(), "lora_dy_shrink", [&] {
    launch_gemm<scalar_t, float, float>(dy, Bf, dS, static_cast<float>(scale), false, kMaskNone, none, false);
    launch_gemm<scalar_t, float, float>(dy.t(), Sf, dB, static_cast<float>(scale), true, kMaskNone, none, true);
  });
  return {dS, dB};
}

Tensor lora_dropout_grad_A_cuda(const Tensor& x, const Tensor& dS, int64_t seed, double p) {
  check_2d_cuda(x, "x");
  check_2d_cuda(dS, "dS", x);
  TORCH_CHECK(dS.size(0) == x.size(0), "lorafusion: dS must have ", x.size(0), " rows, got ", dS.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const Dropout d = make_dropout(seed, p);
  Tensor dSf = dS.to(at::kFloat);
  Tensor dA = at::zeros({dS.size(1), x.size(1)}, x.options().dtype(at::kFloat));
  LORAFUSION_DISPATCH(x.scalar_type(), "lora_dropout_grad_A", [&] {
    launch_gemm<float, scalar_t, float>(dSf.t(), x, dA, 1.f, true, kMaskR, d, true);
  });
  return dA;
}

void lora_dropout_expand_add_cuda(const Tensor& dx, const Tensor& dS, const Tensor& A, int64_t seed, double p) {
  check_2d_cuda(dx, "dx");
  check_2d_cuda(dS, "dS", dx);
  check_2d_cuda(A, "A", dx);
  TORCH_CHECK(dS.size(0) == dx.size(0) && A.size(0) == dS.size(1) && A.size(1) == dx.size(1), "lorafusion: dx ",
              dx.sizes(), ", dS ", dS.sizes(), ", A ", A.sizes(), " do not chain");
  c10::cuda::CUDAGuard guard(dx.device());
  const Dropout d = make_dropout(seed, p);
  Tensor dSf = dS.to(at::kFloat), Af = A.to(at::kFloat);
  LORAFUSION_DISPATCH(dx.scalar_type(), "lora_dropout_expand_add_", [&] {
    launch_gemm<float, float, scalar_t>(dSf, Af, dx, 1.f, true, kMaskOut, d, false);
  });
}

std::tuple<Tensor, Tensor> lora_linear_forward_cuda(const Tensor& x, const Tensor& W, const std::optional<Tensor>& b,
                                                    const Tensor& A, const Tensor& B, double scale, int64_t seed,
                                                    double p) {
  check_2d_cuda(x, "x");
  check_2d_cuda(W, "W", x);
  check_2d_cuda(A, "A", x);
  check_2d_cuda(B, "B", x);
  TORCH_CHECK(W.scalar_type() == x.scalar_type() && W.size(1) == x.size(1) && A.size(1) == x.size(1) &&
                  B.size(0) == W.size(0) && B.size(1) == A.size(0),
              "lorafusion: x ", x.sizes(), " ", x.scalar_type(), ", W ", W.sizes(), " ", W.scalar_type(), ", A ",
              A.sizes(), ", B ", B.sizes(), " do not chain");
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == W.size(0) && b->scalar_type() == x.scalar_type() &&
                    b->device() == x.device(),
                "lorafusion: bias must be (", W.size(0), ") of x's dtype and device, got ", b->sizes(), " ",
                b->scalar_type(), " on ", b->device());
  }
  c10::cuda::CUDAGuard guard(x.device());
  Tensor Y = (b.has_value() && b->defined()) ? at::addmm(*b, x, W.t()) : at::mm(x, W.t());
  Tensor S = lora_shrink_cuda(x, A, seed, p);
  // Y += s S B^T with float accumulation and one rounding to Y's dtype.
  Tensor Bf = B.to(at::kFloat);
  const Dropout none = make_dropout(0, 0.0);
  LORAFUSION_DISPATCH(x.scalar_type(), "lora_linear_forward", [&] {
    launch_gemm<float, float, scalar_t>(S, Bf.t(), Y, static_cast<float>(scale), true, kMaskNone, none, false);
  });
  return {Y, S};
}

std::tuple<std::optional<Tensor>, Tensor, Tensor> lora_linear_backward_cuda(
    const Tensor& dy, const Tensor& x, const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& S,
    double scale, int64_t seed, double p, bool need_dx) {
  check_2d_cuda(dy, "dy");
  check_2d_cuda(x, "x", dy);
  check_2d_cuda(W, "W", dy);
  TORCH_CHECK(W.scalar_type() == dy.scalar_type() && dy.size(0) == x.size(0) && W.size(0) == dy.size(1) &&
                  W.size(1) == x.size(1),
              "lorafusion: dy ", dy.sizes(), ", x ", x.sizes(), ", W ", W.sizes(), " do not match");
  c10::cuda::CUDAGuard guard(x.device());
  auto [dS, dB] = lora_dy_shrink_cuda(dy, B, S, scale);
  Tensor dA = lora_dropout_grad_A_cuda(x, dS, seed, p);
  std::optional<Tensor> dX;
  if (need_dx) {
    Tensor dx = at::mm(dy, W);
    lora_dropout_expand_add_cuda(dx, dS, A, seed, p);
    dX = dx;
  }
  return {dX, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorafusion, CUDA, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask_cuda);
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_dy_shrink", &lora_dy_shrink_cuda);
  m.impl("lora_dropout_grad_A", &lora_dropout_grad_A_cuda);
  m.impl("lora_dropout_expand_add_", &lora_dropout_expand_add_cuda);
  m.impl("lora_linear_forward", &lora_linear_forward_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace lorafusion
