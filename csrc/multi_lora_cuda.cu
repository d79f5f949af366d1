// CUDA kernels of the multi-adapter (segmented) LoRA ops; schemas, layout and math in multi_lora.cpp.
// Memory-bound and simple: one block per row (shrink, expand_add_) or per (slot, column block) (grad). Each row
// finds its segment by binary search over the segment table (sorted by start row); rows with no adapter do nothing.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "philox.h"

namespace {

constexpr int kThreads = 256;
constexpr int kRankChunk = 16;

__device__ __forceinline__ uint32_t device_threshold(double p) {
  const double t = nearbyint(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Slot k's rank, offsets and per-adapter factors, as each kernel reads them from the tables.
struct SlotParams {
  int64_t r, w_off, f_off;
  double p;
  bool drop;       // dropout requested and this adapter's p > 0
  uint32_t thr;    // keep threshold of p
  float inv;       // 1 / (1 - p) when dropping, else 1
  float scale;     // the adapter's scale when requested, else 1
};

__device__ __forceinline__ SlotParams load_slot(const int64_t* slot, const double* slot_p, const float* slot_scale,
                                                int64_t k, bool dropout, bool scaled) {
  SlotParams s;
  s.r = slot[3 * k];
  s.w_off = slot[3 * k + 1];
  s.f_off = slot[3 * k + 2];
  s.p = slot_p[k];
  s.drop = dropout && s.p > 0.0;
  s.thr = device_threshold(s.p);
  s.inv = s.drop ? static_cast<float>(1.0 / (1.0 - s.p)) : 1.0f;
  s.scale = scaled ? slot_scale[k] : 1.0f;
  return s;
}

// Index of the segment holding row, or -1.
__device__ __forceinline__ int64_t find_segment(const int64_t* seg, int64_t n_seg, int64_t row) {
  int64_t lo = 0, hi = n_seg;
  while (lo < hi) {  // first segment whose end > row
    const int64_t mid = (lo + hi) / 2;
    if (seg[4 * mid + 1] <= row) lo = mid + 1; else hi = mid;
  }
  return (lo < n_seg && seg[4 * lo] <= row) ? lo : -1;
}

template <typename T>
__global__ void shrink_kernel(const T* __restrict__ x, int64_t ldx, int64_t K, const float* __restrict__ w,
                              float* __restrict__ out, const int64_t* __restrict__ seg, int64_t n_seg,
                              const int64_t* __restrict__ slot, const double* __restrict__ slot_p,
                              const float* __restrict__ slot_scale, uint64_t seed, bool dropout, bool scaled) {
  const int64_t row = blockIdx.x;
  const int64_t si = find_segment(seg, n_seg, row);
  if (si < 0) return;
  const int64_t start = seg[4 * si], k = seg[4 * si + 2], srow = seg[4 * si + 3];
  const SlotParams sp = load_slot(slot, slot_p, slot_scale, k, dropout, scaled);
  const int64_t r = sp.r, w_off = sp.w_off, f_off = sp.f_off;
  const bool drop = sp.drop;
  const uint32_t thr = sp.thr;
  const float inv = sp.inv, scale = sp.scale;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  const T* xr = x + row * ldx;
  for (int64_t j = warp; j < r; j += n_warps) {
    const float* wr = w + (w_off + j) * K;
    float acc = 0.f;
    for (int64_t c = lane; c < K; c += 32) {
      float v = static_cast<float>(xr[c]);
      if (drop) v = lorafusion::dropout_keep(seed, static_cast<uint32_t>(row), static_cast<uint32_t>(c), thr) ? v * inv : 0.f;
      acc += v * wr[c];
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[f_off + (srow + row - start) * r + j] = acc * scale;
  }
}

template <typename T>
__global__ void grad_kernel(const float* __restrict__ l, const T* __restrict__ m, int64_t ldm, int64_t N,
                            float* __restrict__ G, const int64_t* __restrict__ seg, int64_t n_seg,
                            const int64_t* __restrict__ slot, const double* __restrict__ slot_p,
                            const float* __restrict__ slot_scale, uint64_t seed, bool dropout, bool scaled) {
  const int64_t k = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= N) return;
  const SlotParams sp = load_slot(slot, slot_p, slot_scale, k, dropout, scaled);
  const int64_t r = sp.r, w_off = sp.w_off, f_off = sp.f_off;
  const bool drop = sp.drop;
  const uint32_t thr = sp.thr;
  const float inv = sp.inv, scale = sp.scale;
  for (int64_t rb = 0; rb < r; rb += kRankChunk) {
    const int nr = static_cast<int>(r - rb < kRankChunk ? r - rb : kRankChunk);
    float acc[kRankChunk];
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) acc[j] = 0.f;
    for (int64_t si = 0; si < n_seg; ++si) {
      if (seg[4 * si + 2] != k) continue;
      const int64_t start = seg[4 * si], end = seg[4 * si + 1], srow = seg[4 * si + 3];
      for (int64_t row = start; row < end; ++row) {
        float v = static_cast<float>(m[row * ldm + col]);
        if (drop) v = lorafusion::dropout_keep(seed, static_cast<uint32_t>(row), static_cast<uint32_t>(col), thr) ? v * inv : 0.f;
        const float* lr = l + f_off + (srow + row - start) * r + rb;
#pragma unroll
        for (int j = 0; j < kRankChunk; ++j)
          if (j < nr) acc[j] += lr[j] * v;
      }
    }
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j)
      if (j < nr) G[(w_off + rb + j) * N + col] = acc[j] * scale;
  }
}

template <typename T>
__global__ void expand_add_kernel(T* __restrict__ out, int64_t ldo, int64_t N, const float* __restrict__ l,
                                  const float* __restrict__ w, const int64_t* __restrict__ seg, int64_t n_seg,
                                  const int64_t* __restrict__ slot, const double* __restrict__ slot_p,
                                  const float* __restrict__ slot_scale, uint64_t seed, bool dropout, bool scaled) {
  const int64_t row = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= N) return;
  const int64_t si = find_segment(seg, n_seg, row);
  if (si < 0) return;
  const int64_t start = seg[4 * si], k = seg[4 * si + 2], srow = seg[4 * si + 3];
  const SlotParams sp = load_slot(slot, slot_p, slot_scale, k, dropout, scaled);
  if (sp.drop && !lorafusion::dropout_keep(seed, static_cast<uint32_t>(row), static_cast<uint32_t>(col), sp.thr))
    return;
  const float* lr = l + sp.f_off + (srow + row - start) * sp.r;
  float acc = 0.f;
  for (int64_t j = 0; j < sp.r; ++j) acc += lr[j] * w[(sp.w_off + j) * N + col];
  const float mul = sp.scale * sp.inv;
  T* o = out + row * ldo + col;
  *o = static_cast<T>(static_cast<float>(*o) + mul * acc);
}

at::Tensor rowmajor(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor multi_lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& w_cat_in, const at::Tensor& seg,
                                  const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale,
                                  int64_t numel, int64_t seed, bool dropout, bool scaled) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = rowmajor(x_in);
  const auto w = w_cat_in.to(at::kFloat).contiguous();
  auto out = at::empty({numel}, x.options().dtype(at::kFloat));
  const int64_t T = x.size(0), n_seg = seg.size(0);
  if (T == 0 || n_seg == 0 || numel == 0) return out;
  const auto sp = slot_p.to(at::kDouble).contiguous();
  const auto sc = slot_scale.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_shrink_cuda", [&] {
    shrink_kernel<scalar_t><<<T, 128, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.size(1), w.data_ptr<float>(), out.data_ptr<float>(),
        seg.data_ptr<int64_t>(), n_seg, slot.data_ptr<int64_t>(), sp.data_ptr<double>(), sc.data_ptr<float>(),
        static_cast<uint64_t>(seed), dropout, scaled);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor multi_lora_grad_cuda(const at::Tensor& l_flat_in, const at::Tensor& m_in, const at::Tensor& seg,
                                const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale,
                                int64_t total_rank, int64_t seed, bool dropout, bool scaled) {
  const c10::cuda::CUDAGuard guard(m_in.device());
  const auto m = rowmajor(m_in);
  const auto l = l_flat_in.to(at::kFloat).contiguous();
  const int64_t N = m.size(1), n_slot = slot.size(0);
  auto G = at::zeros({total_rank, N}, m.options().dtype(at::kFloat));
  if (n_slot == 0 || N == 0) return G;
  const auto sp = slot_p.to(at::kDouble).contiguous();
  const auto sc = slot_scale.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(n_slot), static_cast<unsigned>((N + kThreads - 1) / kThreads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "multi_lora_grad_cuda", [&] {
    grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        l.data_ptr<float>(), m.data_ptr<scalar_t>(), m.stride(0), N, G.data_ptr<float>(), seg.data_ptr<int64_t>(),
        seg.size(0), slot.data_ptr<int64_t>(), sp.data_ptr<double>(), sc.data_ptr<float>(),
        static_cast<uint64_t>(seed), dropout, scaled);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return G;
}

void multi_lora_expand_add_cuda(at::Tensor& out, const at::Tensor& l_flat_in, const at::Tensor& w_cat_in,
                                const at::Tensor& seg, const at::Tensor& slot, const at::Tensor& slot_p,
                                const at::Tensor& slot_scale, int64_t seed, bool dropout, bool scaled) {
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "multi_lora_expand_add_: out must be 2-D with unit col stride");
  const c10::cuda::CUDAGuard guard(out.device());
  const auto l = l_flat_in.to(at::kFloat).contiguous();
  const auto w = w_cat_in.to(at::kFloat).contiguous();
  const int64_t T = out.size(0), N = out.size(1), n_seg = seg.size(0);
  if (T == 0 || N == 0 || n_seg == 0) return;
  const auto sp = slot_p.to(at::kDouble).contiguous();
  const auto sc = slot_scale.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((N + kThreads - 1) / kThreads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "multi_lora_expand_add_cuda", [&] {
    expand_add_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), out.stride(0), N, l.data_ptr<float>(), w.data_ptr<float>(),
        seg.data_ptr<int64_t>(), n_seg, slot.data_ptr<int64_t>(), sp.data_ptr<double>(), sc.data_ptr<float>(),
        static_cast<uint64_t>(seed), dropout, scaled);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lorafusion, CUDA, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_cuda);
  m.impl("multi_lora_grad", &multi_lora_grad_cuda);
  m.impl("multi_lora_expand_add_", &multi_lora_expand_add_cuda);
}
