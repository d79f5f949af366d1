// CUDA kernels of the multi-adapter (segmented) LoRA ops; schemas, layout and math in multi_lora.cpp.
// Each op is the single-adapter ops' tiled skinny GEMM (lora_gemm.cuh) applied per row segment: a block takes a
// range of token rows, finds the segments overlapping it by binary search over the segment table (sorted by start
// row), and runs each one's tiles with that adapter's rank, offsets, scale and dropout. Rows with no adapter are in no
// segment and cost nothing. grad splits the token rows over blocks and adds into G with float atomics, so dA / dB
// may differ in the last bits run to run; S and the expand outputs are deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "multi_lora_kernels.cuh"
#include "multi_tables.h"

namespace {

using namespace lorafusion::multi_cuda;  // the kernels, GemmArgs and the tile constants

at::Tensor rowmajor(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The layout tables as the kernels read them: (n_seg x 4) and (n_slot x 3) contiguous int64, one p and scale per
// slot, all on the operands' device (the kernels dereference them there). Their numbers are checked against the
// tensors on the host, before the launch, by the Python wrapper (SegmentTables.check_operands).
void check_tables_cuda(const at::Tensor& seg, const at::Tensor& slot, const at::Tensor& slot_p,
                       const at::Tensor& slot_scale, const at::Tensor& like, const char* op) {
  lorafusion::check_table_shapes(seg, slot, slot_p, slot_scale, op);
  TORCH_CHECK(seg.is_contiguous() && slot.is_contiguous(), op, ": seg and slot must be contiguous (the kernels "
              "index them as raw arrays)");
  for (const at::Tensor* t : {&seg, &slot, &slot_p, &slot_scale})
    TORCH_CHECK(t->device() == like.device(), op, ": the layout tables must be on ", like.device(), ", got ",
                t->device());
}

// The tables as the kernels take them, with the converted per-slot factors they point into kept alive.
struct HostTables {
  at::Tensor sp, sc;
  Tables t;
  HostTables(const at::Tensor& seg, const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale,
             int64_t seed, bool dropout, bool scaled)
      : sp(slot_p.to(at::kDouble).contiguous()),
        sc(slot_scale.to(at::kFloat).contiguous()),
        t{seg.data_ptr<int64_t>(), seg.size(0), slot.data_ptr<int64_t>(), sp.data_ptr<double>(), sc.data_ptr<float>(),
          static_cast<uint64_t>(seed), dropout, scaled} {}
};

at::Tensor multi_lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& w_cat_in, const at::Tensor& seg,
                                  const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale,
                                  int64_t numel, int64_t seed, bool dropout, bool scaled) {
  // host-side shape checks (the layout's own numbers live on the device; the Python wrapper checks them against
  // the tensors before the launch)
  TORCH_CHECK(x_in.dim() == 2 && w_cat_in.dim() == 2 && x_in.size(1) == w_cat_in.size(1),
              "multi_lora_shrink: x (T x K) and w_cat (R x K) must agree on K, got ", x_in.sizes(), " and ",
              w_cat_in.sizes());
  TORCH_CHECK(numel >= 0, "multi_lora_shrink: numel must be >= 0, got ", numel);
  TORCH_CHECK(w_cat_in.device() == x_in.device(), "multi_lora_shrink: x and w_cat must be on one device");
  check_tables_cuda(seg, slot, slot_p, slot_scale, x_in, "multi_lora_shrink");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = rowmajor(x_in);
  const auto w = w_cat_in.to(at::kFloat).contiguous();
  auto out = at::empty({numel}, x.options().dtype(at::kFloat));
  const int64_t T = x.size(0), n_seg = seg.size(0);
  if (T == 0 || n_seg == 0 || numel == 0) return out;
  const HostTables tables(seg, slot, slot_p, slot_scale, seed, dropout, scaled);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_shrink_cuda", [&] {
    shrink_kernel<scalar_t><<<dim3(static_cast<unsigned>((T + kBM - 1) / kBM), kShrinkRankBlocks), kThreads, 0,
                               stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), static_cast<int>(x.size(1)), static_cast<int>(T), w.data_ptr<float>(),
        out.data_ptr<float>(), tables.t);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor multi_lora_grad_cuda(const at::Tensor& l_flat_in, const at::Tensor& m_in, const at::Tensor& seg,
                                const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale,
                                int64_t total_rank, int64_t seed, bool dropout, bool scaled) {
  TORCH_CHECK(m_in.dim() == 2 && l_flat_in.dim() == 1, "multi_lora_grad: m must be 2-D and l_flat 1-D, got ",
              m_in.sizes(), " and ", l_flat_in.sizes());
  TORCH_CHECK(total_rank >= 0, "multi_lora_grad: total_rank must be >= 0, got ", total_rank);
  TORCH_CHECK(l_flat_in.device() == m_in.device(), "multi_lora_grad: m and l_flat must be on one device");
  check_tables_cuda(seg, slot, slot_p, slot_scale, m_in, "multi_lora_grad");
  const c10::cuda::CUDAGuard guard(m_in.device());
  const auto m = rowmajor(m_in);
  const auto l = l_flat_in.to(at::kFloat).contiguous();
  const int64_t T = m.size(0), N = m.size(1), n_seg = seg.size(0);
  auto G = at::zeros({total_rank, N}, m.options().dtype(at::kFloat));
  if (T == 0 || n_seg == 0 || N == 0) return G;
  const HostTables tables(seg, slot, slot_p, slot_scale, seed, dropout, scaled);
  auto stream = c10::cuda::getCurrentCUDAStream();
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t chunk = grad_row_chunk(T, N, sms);
  const dim3 grid(static_cast<unsigned>((T + chunk - 1) / chunk), static_cast<unsigned>((N + kBN - 1) / kBN));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "multi_lora_grad_cuda", [&] {
    grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        l.data_ptr<float>(), m.data_ptr<scalar_t>(), m.stride(0), static_cast<int>(N), static_cast<int>(T),
        static_cast<int>(chunk), G.data_ptr<float>(), tables.t);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return G;
}

void multi_lora_expand_add_cuda(at::Tensor& out, const at::Tensor& l_flat_in, const at::Tensor& w_cat_in,
                                const at::Tensor& seg, const at::Tensor& slot, const at::Tensor& slot_p,
                                const at::Tensor& slot_scale, int64_t seed, bool dropout, bool scaled) {
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "multi_lora_expand_add_: out must be 2-D with unit col stride");
  TORCH_CHECK(w_cat_in.dim() == 2 && w_cat_in.size(1) == out.size(1) && l_flat_in.dim() == 1,
              "multi_lora_expand_add_: w_cat must be (R x N) for out (T x N) and l_flat 1-D, got ", w_cat_in.sizes(),
              ", ", out.sizes(), " and ", l_flat_in.sizes());
  TORCH_CHECK(w_cat_in.device() == out.device() && l_flat_in.device() == out.device(),
              "multi_lora_expand_add_: out, l_flat and w_cat must be on one device");
  check_tables_cuda(seg, slot, slot_p, slot_scale, out, "multi_lora_expand_add_");
  const c10::cuda::CUDAGuard guard(out.device());
  const auto l = l_flat_in.to(at::kFloat).contiguous();
  const auto w = w_cat_in.to(at::kFloat).contiguous();
  const int64_t T = out.size(0), N = out.size(1), n_seg = seg.size(0);
  if (T == 0 || N == 0 || n_seg == 0) return;
  const HostTables tables(seg, slot, slot_p, slot_scale, seed, dropout, scaled);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((T + kBM - 1) / kBM), static_cast<unsigned>((N + kBN - 1) / kBN));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "multi_lora_expand_add_cuda", [&] {
    expand_add_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), out.stride(0), static_cast<int>(N), static_cast<int>(T), l.data_ptr<float>(),
        w.data_ptr<float>(), tables.t);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lorafusion, CUDA, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_cuda);
  m.impl("multi_lora_grad", &multi_lora_grad_cuda);
  m.impl("multi_lora_expand_add_", &multi_lora_expand_add_cuda);
}
