// Multi-adapter (segmented) LoRA ops: schemas and CPU kernels. CUDA kernels are in multi_lora_cuda.cu; fake impls are
// registered from lorafusion/multi/ops.py. The math and the layout are documented in lorafusion/multi/segments.py:
//
//   seg   (n_seg x 4) int64: [start row, end row, slot, first row of the segment inside its slot's block]
//   slot  (n_slot x 3) int64: [rank r, row offset into the concatenated weights, element offset into the flat buffer]
//   slot_p (n_slot) float64 dropout probability, slot_scale (n_slot) float32 scale per slot
//   flat buffers (S, dS): float32, slot k's block is (rows of k x r_k) row-major at its element offset.
//
// Three ops cover forward and backward (dropout masks: philox.h, keyed by (seed, global row, col)):
//   multi_lora_shrink(x, w_cat)        flat[seg rows] = [scale] * D?(x[rows]) w_k^T          (S = D(X)A^T, dS = s dY B)
//   multi_lora_grad(l_flat, m)         G[k] = [scale] * sum_rows l[rows]^T D?(m[rows])        (dA = dS^T D(X), dB^T)
//   multi_lora_expand_add_(out, l, w)  out[rows] += [scale] * D'?(l[rows] w_k)               (Y += s S B^T, dX += D'(dS A))
//   multi_lora_grad_a_expand_dx_      CPU only: the last two of backward in one pass over the mask
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "philox.h"
#include "philox_simd.h"
#include "multi_tables.h"
#include "row_kernels.h"

namespace {

using lorafusion::philox_draws;  // philox_simd.h: fastest with chunks starting at multiples of 64 columns
constexpr int64_t kDrawChunk = 512;  // draws buffered on the stack, consumed while in L1
static_assert(kDrawChunk % 64 == 0, "draw chunks must start at multiples of 64 columns");


struct Seg {
  int64_t start, end, slot, srow;
};
struct Slot {
  int64_t r, w_off, f_off;
  double p;  // float64: 1 / (1 - p) from a float32 p is off by 1.3e-5 relative at p = 0.999
  float scale;
  uint32_t threshold;
};

std::vector<Seg> read_segs(const at::Tensor& seg) {
  auto s = seg.contiguous();
  const int64_t* d = s.data_ptr<int64_t>();
  std::vector<Seg> out(s.size(0));
  for (int64_t i = 0; i < s.size(0); ++i) out[i] = {d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]};
  return out;
}

std::vector<Slot> read_slots(const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale) {
  auto s = slot.contiguous();
  auto p = slot_p.to(at::kDouble).contiguous();  // float64 so the threshold matches reference.dropout_threshold
  auto sc = slot_scale.to(at::kFloat).contiguous();
  const int64_t* d = s.data_ptr<int64_t>();
  std::vector<Slot> out(s.size(0));
  for (int64_t k = 0; k < s.size(0); ++k) {
    const double pk = p.data_ptr<double>()[k];
    TORCH_CHECK(pk >= 0.0 && pk < 1.0, "lorafusion multi: slot ", k, " dropout p must be in [0, 1), got ", pk);
    out[k] = {d[3 * k], d[3 * k + 1], d[3 * k + 2], pk, sc.data_ptr<float>()[k], lorafusion::dropout_threshold(pk)};
  }
  return out;
}

// Every segment's rows lie in [0, rows), its slot exists, and every slot's rank-r block lies inside w_rows rows of the
// stacked weights and its rows of the flat buffer inside flat_numel elements (w_rows / flat_numel < 0: not checked).
// The kernels index raw pointers with these numbers: a layout that does not fit the tensors is an error, not a
// read or write past their ends.
void check_layout(const std::vector<Seg>& segs, const std::vector<Slot>& slots, int64_t rows, int64_t w_rows,
                  int64_t flat_numel, const char* op) {
  const int64_t n_slot = static_cast<int64_t>(slots.size());
  for (int64_t k = 0; k < n_slot; ++k) {
    const Slot& sl = slots[k];
    TORCH_CHECK(sl.r >= 1 && sl.w_off >= 0 && sl.f_off >= 0, op, ": slot ", k, " has r ", sl.r, ", w_off ", sl.w_off,
                ", f_off ", sl.f_off);
    TORCH_CHECK(w_rows < 0 || sl.w_off + sl.r <= w_rows, op, ": slot ", k, " needs rows [", sl.w_off, ", ",
                sl.w_off + sl.r, ") of the stacked adapter weights, which have ", w_rows);
  }
  for (size_t i = 0; i < segs.size(); ++i) {
    const Seg& sg = segs[i];
    TORCH_CHECK(0 <= sg.start && sg.start <= sg.end && sg.end <= rows, op, ": segment ", i, " covers rows [", sg.start,
                ", ", sg.end, ") of a tensor with ", rows, " rows");
    TORCH_CHECK(0 <= sg.slot && sg.slot < n_slot, op, ": segment ", i, " names slot ", sg.slot, " of ", n_slot);
    const Slot& sl = slots[sg.slot];
    TORCH_CHECK(sg.srow >= 0 && (flat_numel < 0 || sl.f_off + (sg.srow + sg.end - sg.start) * sl.r <= flat_numel), op,
                ": segment ", i, " needs elements up to ", sl.f_off + (sg.srow + sg.end - sg.start) * sl.r,
                " of a flat buffer of ", flat_numel);
  }
}

// dst (rows x ncols, float32, row-major) = D?(src[r0:r1, c0:c0+ncols]) with the mask of (seed, global row, col).
template <typename T>
void load_rows(float* dst, const T* src, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t ncols, bool drop,
               const Slot& sl, uint64_t seed) {
  const float inv = drop ? static_cast<float>(1.0 / (1.0 - sl.p)) : 1.0f;
  for (int64_t i = r0; i < r1; ++i) {
    const T* s = src + i * ld + c0;
    float* d = dst + (i - r0) * ncols;
    if (!drop) {
      for (int64_t j = 0; j < ncols; ++j) d[j] = static_cast<float>(s[j]);
      continue;
    }
    if constexpr (std::is_same_v<T, float>) {  // the per-ISA row kernel, for rows whose columns start at 0
      if (c0 == 0) {
        lorafusion::dropout_row(s, d, ncols, seed, static_cast<uint32_t>(i), sl.threshold, inv);
        continue;
      }
    }
    uint32_t draws[kDrawChunk];
    for (int64_t j0 = 0; j0 < ncols; j0 += kDrawChunk) {
      const int64_t m = std::min(kDrawChunk, ncols - j0);
      philox_draws(draws, m, static_cast<uint32_t>(i), static_cast<uint32_t>(c0 + j0), static_cast<uint32_t>(seed),
                   static_cast<uint32_t>(seed >> 32));
      for (int64_t j = 0; j < m; ++j) {
        const float v = static_cast<float>(s[j0 + j]) * inv;  // unconditional, so the select vectorises
        d[j0 + j] = draws[j] >= sl.threshold ? v : 0.0f;
      }
    }
  }
}

// The per-ISA row kernels (row_kernels.h) where the data is float32; false (the caller's generic loop runs) else.
inline bool axpy_row_kernel(float* d, const float* s, int64_t n, bool drop, uint64_t seed, uint32_t row, uint32_t thr,
                            float mul) {
  lorafusion::masked_axpy_row(d, s, n, drop, seed, row, thr, mul);
  return true;
}
template <typename T>
inline bool axpy_row_kernel(T*, const float*, int64_t, bool, uint64_t, uint32_t, uint32_t, float) {
  return false;
}
inline bool dropout_axpy_row_kernel(const float* x, float* xo, float* d, const float* t, int64_t n, bool drop,
                                    uint64_t seed, uint32_t row, uint32_t thr, float scale, bool accumulate) {
  lorafusion::dropout_axpy_row(x, xo, d, t, n, drop, seed, row, thr, scale, accumulate);
  return true;
}
template <typename T>
inline bool dropout_axpy_row_kernel(const T*, float*, T*, const float*, int64_t, bool, uint64_t, uint32_t, uint32_t,
                                    float, bool) {
  return false;
}

at::Tensor rowmajor(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Segments are processed one after another. In shrink, grad and the fused dA / dX op, where a mask (or a conversion
// to float32) has to be applied first, a segment is cut into chunks of at most kChunk rows, and each worker thread
// takes a fixed, contiguous run of chunks (expand_add_ still runs its chunks in turn, each parallelised inside):
// it writes a chunk's masked rows into its own float32 scratch (kept in its L2) and runs the chunk's rank-r GEMMs on
// them itself (at::mm runs single-threaded inside the parallel region), with no hand-over between threads per chunk.
constexpr int64_t kChunk = 256;

// Workers for rows [start, end): min(threads, chunks), or 1 inside a parallel region or for a single chunk.
int64_t chunk_workers(int64_t start, int64_t end) {
  const int64_t nchunk = (end - start + kChunk - 1) / kChunk;
  if (nchunk <= 1 || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunk));
}

// Runs fn(w, r0, r1, first) over the kChunk-row chunks of [start, end) with nw = chunk_workers(start, end) workers:
// worker w takes chunks [w * n / nw, (w + 1) * n / nw) in order (first: the worker's first chunk), so partials
// indexed by w add up the same way on every run (for a given thread count). With one worker everything runs in the
// caller (whose GEMMs then use every thread).
template <typename F>
void for_each_chunk(int64_t start, int64_t end, int64_t nw, const F& fn) {
  const int64_t nchunk = (end - start + kChunk - 1) / kChunk;
  auto chunk = [&](int64_t w, int64_t c) {
    fn(w, start + c * kChunk, std::min(start + (c + 1) * kChunk, end), c == w * nchunk / nw);
  };
  if (nw <= 1) {
    for (int64_t c = 0; c < nchunk; ++c) chunk(0, c);
    return;
  }
  // Workers run ATen ops: they need the caller's thread-local state (its dispatch key set, below autograd inside an
  // op, and grad mode), which OpenMP threads do not inherit.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t c = w * nchunk / nw; c < (w + 1) * nchunk / nw; ++c) chunk(w, c);
  });
}

// Per-worker partials (nw x r x cols, uninitialised: each worker's first chunk writes its slice with beta = 0), or
// an undefined tensor when one worker accumulates straight into the result.
at::Tensor worker_partials(int64_t nw, int64_t r, int64_t cols, const at::TensorOptions& opt) {
  return nw > 1 ? at::empty({nw, r, cols}, opt) : at::Tensor();
}

// g += the workers' partials in worker order (nw == 1 wrote straight into g).
void reduce_partials(at::Tensor& g, const at::Tensor& parts, int64_t nw) {
  for (int64_t w = 0; w < nw; ++w) g.add_(parts[w]);
}

// Scratch kept across calls (per calling thread): a fresh multi-MB allocation is mmap'ed and page-faulted on every
// call, which costs as much as the work on it (measured ~1 us per 4 KiB page here).
std::vector<float>& scratch_floats(int which) {
  thread_local std::vector<float> bufs[2];
  return bufs[which];
}

// A (rows x cols) float32 view of a scratch tensor kept across calls, grown when too small. Allocated with
// inference mode off: made under torch.inference_mode() it would be an inference tensor, which a later call outside
// that mode may not write to.
at::Tensor scratch_tensor(int64_t rows, int64_t cols) {
  thread_local at::Tensor b;
  if (!b.defined() || b.numel() < rows * cols) {
    c10::InferenceMode normal(false);
    b = at::empty({rows * cols}, at::TensorOptions().dtype(at::kFloat));
  }
  return b.narrow(0, 0, rows * cols).view({rows, cols});
}

// float32 (rows x ncols) block of D?(src[r0:r1, :]) (a view of src itself when no conversion or mask is needed).
at::Tensor masked_rows(const at::Tensor& src, int64_t r0, int64_t r1, bool drop, const Slot& sl, uint64_t seed,
                       std::vector<float>& buf) {
  const int64_t rows = r1 - r0, N = src.size(1), ld = src.stride(0);
  if (!drop && src.scalar_type() == at::kFloat) return src.narrow(0, r0, rows);
  buf.resize(rows * N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "multi_lora_masked_rows", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
      load_rows(buf.data() + (b - r0) * N, sp, ld, b, e, 0, N, drop, sl, seed);
    });
  });
  return at::from_blob(buf.data(), {rows, N}, at::TensorOptions().dtype(at::kFloat));
}

// With no mask to apply and float32 data, an op's GEMM reads the tensor in place: one call per segment then runs
// faster than kChunk-row calls (measured here, 2048-row segments, r = 8..64: the four segments' S = X A^T in
// 2.6 ms against 3.8 ms in 256-row calls), which exist to keep a masked or converted float32 copy in L2.
inline bool whole_segment(const at::Tensor& t, bool drop) { return !drop && t.scalar_type() == at::kFloat; }

at::Tensor flat_block(const at::Tensor& flat, const Seg& sg, const Slot& sl, int64_t r0, int64_t r1) {
  return flat.narrow(0, sl.f_off + (sg.srow + r0 - sg.start) * sl.r, (r1 - r0) * sl.r).view({r1 - r0, sl.r});
}

at::Tensor multi_lora_shrink_cpu(const at::Tensor& x_in, const at::Tensor& w_cat_in, const at::Tensor& seg,
                                 const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale,
                                 int64_t numel, int64_t seed, bool dropout, bool scaled) {
  lorafusion::check_table_shapes(seg, slot, slot_p, slot_scale, "multi_lora_shrink");
  TORCH_CHECK(x_in.dim() == 2 && w_cat_in.dim() == 2 && x_in.size(1) == w_cat_in.size(1),
              "multi_lora_shrink: x (T x K) and w_cat (R x K) must agree on K");
  const auto x = rowmajor(x_in);
  const auto w = w_cat_in.to(at::kFloat).contiguous();
  const auto segs = read_segs(seg);
  const auto slots = read_slots(slot, slot_p, slot_scale);
  check_layout(segs, slots, x.size(0), w.size(0), numel, "multi_lora_shrink");
  auto out = at::empty({numel}, x.options().dtype(at::kFloat));
  for (const Seg& sg : segs) {
    const Slot& sl = slots[sg.slot];
    const bool drop = dropout && sl.p > 0.0;
    const auto wk = w.narrow(0, sl.w_off, sl.r).t();
    auto rows = [&](int64_t r0, int64_t r1) {  // the chunk's rows of the flat output (no two chunks share one)
      auto xb = masked_rows(x, r0, r1, drop, sl, static_cast<uint64_t>(seed), scratch_floats(0));
      auto ob = flat_block(out, sg, sl, r0, r1);
      if (scaled)  // beta = 0: ob is uninitialised and never read
        at::addmm_out(ob, ob, xb, wk, 0.0, sl.scale);
      else
        at::mm_out(ob, xb, wk);
    };
    if (whole_segment(x, drop)) {
      if (sg.end > sg.start) rows(sg.start, sg.end);
      continue;
    }
    for_each_chunk(sg.start, sg.end, chunk_workers(sg.start, sg.end),
                   [&](int64_t, int64_t r0, int64_t r1, bool) { rows(r0, r1); });
  }
  return out;
}

at::Tensor multi_lora_grad_cpu(const at::Tensor& l_flat_in, const at::Tensor& m_in, const at::Tensor& seg,
                               const at::Tensor& slot, const at::Tensor& slot_p, const at::Tensor& slot_scale,
                               int64_t total_rank, int64_t seed, bool dropout, bool scaled) {
  lorafusion::check_table_shapes(seg, slot, slot_p, slot_scale, "multi_lora_grad");
  TORCH_CHECK(m_in.dim() == 2, "multi_lora_grad: m must be 2-D");
  const auto m = rowmajor(m_in);
  const auto l_flat = l_flat_in.to(at::kFloat).contiguous();
  const auto segs = read_segs(seg);
  const auto slots = read_slots(slot, slot_p, slot_scale);
  check_layout(segs, slots, m.size(0), total_rank, l_flat.numel(), "multi_lora_grad");
  auto G = at::zeros({total_rank, m.size(1)}, m.options().dtype(at::kFloat));
  for (const Seg& sg : segs) {
    const Slot& sl = slots[sg.slot];
    auto g = G.narrow(0, sl.w_off, sl.r);
    const bool drop = dropout && sl.p > 0.0;
    const double alpha = scaled ? sl.scale : 1.0;
    if (whole_segment(m, drop)) {
      if (sg.end > sg.start)
        g.addmm_(flat_block(l_flat, sg, sl, sg.start, sg.end).t(), m.narrow(0, sg.start, sg.end - sg.start), 1.0,
                 alpha);
      continue;
    }
    const int64_t nw = chunk_workers(sg.start, sg.end);
    const at::Tensor parts = worker_partials(nw, sl.r, m.size(1), G.options());
    for_each_chunk(sg.start, sg.end, nw, [&](int64_t wk, int64_t r0, int64_t r1, bool first) {
      auto mb = masked_rows(m, r0, r1, drop, sl, static_cast<uint64_t>(seed), scratch_floats(0));
      auto lt = flat_block(l_flat, sg, sl, r0, r1).t();
      if (nw > 1)
        parts[wk].addmm_(lt, mb, first ? 0.0 : 1.0, alpha);  // beta = 0: the uninitialised slice is not read
      else
        g.addmm_(lt, mb, 1.0, alpha);
    });
    if (nw > 1) reduce_partials(g, parts, nw);
  }
  return G;
}

void multi_lora_expand_add_cpu(at::Tensor& out, const at::Tensor& l_flat_in, const at::Tensor& w_cat_in,
                               const at::Tensor& seg, const at::Tensor& slot, const at::Tensor& slot_p,
                               const at::Tensor& slot_scale, int64_t seed, bool dropout, bool scaled) {
  lorafusion::check_table_shapes(seg, slot, slot_p, slot_scale, "multi_lora_expand_add_");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "multi_lora_expand_add_: out must be 2-D with unit col stride");
  TORCH_CHECK(w_cat_in.dim() == 2 && w_cat_in.size(1) == out.size(1), "multi_lora_expand_add_: w_cat is R x N");
  const auto l_flat = l_flat_in.to(at::kFloat).contiguous();
  const auto w = w_cat_in.to(at::kFloat).contiguous();
  const auto segs = read_segs(seg);
  const auto slots = read_slots(slot, slot_p, slot_scale);
  check_layout(segs, slots, out.size(0), w.size(0), l_flat.numel(), "multi_lora_expand_add_");
  const int64_t N = out.size(1), ld = out.stride(0);
  const uint64_t useed = static_cast<uint64_t>(seed);
  for (const Seg& sg : segs) {
    const Slot& sl = slots[sg.slot];
    const bool drop = dropout && sl.p > 0.0;
    const double mul = (scaled ? sl.scale : 1.0) * (drop ? 1.0 / (1.0 - sl.p) : 1.0);
    const int64_t step = whole_segment(out, drop) ? std::max<int64_t>(sg.end - sg.start, 1) : kChunk;
    for (int64_t r0 = sg.start; r0 < sg.end; r0 += step) {
      const int64_t r1 = std::min(r0 + step, sg.end);
      auto lb = flat_block(l_flat, sg, sl, r0, r1);
      auto wk = w.narrow(0, sl.w_off, sl.r);
      if (!drop && out.scalar_type() == at::kFloat) {  // straight into the output block
        out.narrow(0, r0, r1 - r0).addmm_(lb, wk, 1.0, mul);
        continue;
      }
      at::Tensor tmp = scratch_tensor(r1 - r0, N);
      at::mm_out(tmp, lb, wk);
      const float* tp = tmp.data_ptr<float>();
      const float fmul = static_cast<float>(mul);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "multi_lora_expand_add_", [&] {
        scalar_t* op = out.data_ptr<scalar_t>();
        at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const float* s = tp + (i - r0) * N;
            scalar_t* d = op + i * ld;
            if (axpy_row_kernel(d, s, N, drop, useed, static_cast<uint32_t>(i), sl.threshold, fmul)) continue;
            uint32_t draws[kDrawChunk];
            for (int64_t j0 = 0; j0 < N; j0 += kDrawChunk) {
              const int64_t m = std::min(kDrawChunk, N - j0);
              if (drop)
                philox_draws(draws, m, static_cast<uint32_t>(i), static_cast<uint32_t>(j0), static_cast<uint32_t>(useed),
                          static_cast<uint32_t>(useed >> 32));
              for (int64_t j = 0; j < m; ++j) {
                const float add = (!drop || draws[j] >= sl.threshold) ? fmul * s[j0 + j] : 0.0f;
                d[j0 + j] = static_cast<scalar_t>(static_cast<float>(d[j0 + j]) + add);
              }
            }
          }
        });
      });
    }
  }
}


// Backward's two uses of the input-side mask in one pass (CPU): dA = dS^T D(X) and dx[rows] += D'(dS A), drawing
// each Philox word once instead of twice. Returns dA_cat (total_rank x K, float32). accumulate = false stores the
// term instead (and zeroes the rows of no adapter), so the caller's dY W GEMM can add on top of it (beta = 1)
// instead of a separate read-modify-write pass over dX.
at::Tensor multi_lora_grad_a_expand_dx_cpu(at::Tensor& dx, const at::Tensor& ds_flat_in, const at::Tensor& x_in,
                                           const at::Tensor& a_cat_in, const at::Tensor& seg, const at::Tensor& slot,
                                           const at::Tensor& slot_p, const at::Tensor& slot_scale, int64_t total_rank,
                                           int64_t seed, bool dropout, bool accumulate) {
  lorafusion::check_table_shapes(seg, slot, slot_p, slot_scale, "multi_lora_grad_a_expand_dx_");
  TORCH_CHECK(dx.dim() == 2 && dx.stride(1) == 1 && x_in.dim() == 2 && dx.sizes() == x_in.sizes(),
              "multi_lora_grad_a_expand_dx_: dx and x must be T x K (dx with unit col stride)");
  const auto x = rowmajor(x_in);
  const auto ds = ds_flat_in.to(at::kFloat).contiguous();
  const auto a = a_cat_in.to(at::kFloat).contiguous();
  const auto segs = read_segs(seg);
  const auto slots = read_slots(slot, slot_p, slot_scale);
  TORCH_CHECK(total_rank == a.size(0), "multi_lora_grad_a_expand_dx_: total_rank ", total_rank, " != rows of A_cat ",
              a.size(0));
  check_layout(segs, slots, x.size(0), a.size(0), ds.numel(), "multi_lora_grad_a_expand_dx_");
  const int64_t K = x.size(1), ldx = x.stride(0), ldd = dx.stride(0);
  auto dA = at::zeros({total_rank, K}, x.options().dtype(at::kFloat));
  const uint64_t useed = static_cast<uint64_t>(seed);
  if (!accumulate) {  // rows outside every segment (no adapter) get no term: zero them
    int64_t covered = 0;
    std::vector<std::pair<int64_t, int64_t>> spans;
    for (const Seg& sg : segs) spans.emplace_back(sg.start, sg.end);
    std::sort(spans.begin(), spans.end());
    for (const auto& [a, b] : spans) {
      if (a > covered) dx.narrow(0, covered, a - covered).zero_();
      covered = std::max(covered, b);
    }
    if (covered < dx.size(0)) dx.narrow(0, covered, dx.size(0) - covered).zero_();
  }
  for (const Seg& sg : segs) {
    const Slot& sl = slots[sg.slot];
    const bool drop = dropout && sl.p > 0.0;
    auto ak = a.narrow(0, sl.w_off, sl.r);
    auto dak = dA.narrow(0, sl.w_off, sl.r);
    if (whole_segment(x, drop) && dx.scalar_type() == at::kFloat && sg.end > sg.start) {  // no mask: plain GEMMs
      auto dsb = flat_block(ds, sg, sl, sg.start, sg.end);
      auto dxb = dx.narrow(0, sg.start, sg.end - sg.start);
      if (accumulate)
        dxb.addmm_(dsb, ak);
      else
        at::mm_out(dxb, dsb, ak);
      dak.addmm_(dsb.t(), x.narrow(0, sg.start, sg.end - sg.start));
      continue;
    }
    const int64_t nw = chunk_workers(sg.start, sg.end);
    const at::Tensor parts = worker_partials(nw, sl.r, K, dA.options());
    const float inv = drop ? static_cast<float>(1.0 / (1.0 - sl.p)) : 1.0f;
    for_each_chunk(sg.start, sg.end, nw, [&](int64_t wk, int64_t r0, int64_t r1, bool first) {
      const int64_t rows = r1 - r0;
      auto dsb = flat_block(ds, sg, sl, r0, r1);
      at::Tensor tmp = scratch_tensor(rows, K);  // this thread's
      at::mm_out(tmp, dsb, ak);                   // dS A, rows x K
      const float* tp = tmp.data_ptr<float>();
      std::vector<float>& xbuf = scratch_floats(1);
      xbuf.resize(rows * K);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_grad_a_expand_dx_", [&] {
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* dp = dx.data_ptr<scalar_t>();
        at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {  // serial inside a worker
          uint32_t draws[kDrawChunk];
          for (int64_t i = b; i < e; ++i) {
            const scalar_t* xr = xp + i * ldx;
            scalar_t* dr = dp + i * ldd;
            float* xo = xbuf.data() + (i - r0) * K;
            const float* tr = tp + (i - r0) * K;
            if (dropout_axpy_row_kernel(xr, xo, dr, tr, K, drop, useed, static_cast<uint32_t>(i), sl.threshold, inv,
                                        accumulate))
              continue;
            for (int64_t j0 = 0; j0 < K; j0 += kDrawChunk) {
              const int64_t m = std::min(kDrawChunk, K - j0);
              if (drop)
                philox_draws(draws, m, static_cast<uint32_t>(i), static_cast<uint32_t>(j0), static_cast<uint32_t>(useed),
                          static_cast<uint32_t>(useed >> 32));
              for (int64_t j = 0; j < m; ++j) {
                const float keep = (!drop || draws[j] >= sl.threshold) ? inv : 0.0f;
                xo[j0 + j] = static_cast<float>(xr[j0 + j]) * keep;
                const float prev = accumulate ? static_cast<float>(dr[j0 + j]) : 0.0f;
                dr[j0 + j] = static_cast<scalar_t>(prev + tr[j0 + j] * keep);
              }
            }
          }
        });
      });
      auto xb = at::from_blob(xbuf.data(), {rows, K}, at::TensorOptions().dtype(at::kFloat));
      if (nw > 1)
        parts[wk].addmm_(dsb.t(), xb, first ? 0.0 : 1.0);  // beta = 0: the uninitialised slice is not read
      else
        dak.addmm_(dsb.t(), xb);
    });
    if (nw > 1) reduce_partials(dak, parts, nw);
  }
  return dA;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorafusion, m) {
  m.def("multi_lora_shrink(Tensor x, Tensor w_cat, Tensor seg, Tensor slot, Tensor slot_p, Tensor slot_scale, "
        "int numel, int seed, bool dropout, bool scaled) -> Tensor");
  m.def("multi_lora_grad(Tensor l_flat, Tensor m, Tensor seg, Tensor slot, Tensor slot_p, Tensor slot_scale, "
        "int total_rank, int seed, bool dropout, bool scaled) -> Tensor");
  m.def("multi_lora_expand_add_(Tensor(a!) out, Tensor l_flat, Tensor w_cat, Tensor seg, Tensor slot, "
        "Tensor slot_p, Tensor slot_scale, int seed, bool dropout, bool scaled) -> ()");
  // CPU fusion of backward's dA = dS^T D(X) and dx += D'(dS A): one Philox draw per element instead of two
  m.def("multi_lora_grad_a_expand_dx_(Tensor(a!) dx, Tensor ds_flat, Tensor x, Tensor a_cat, Tensor seg, "
        "Tensor slot, Tensor slot_p, Tensor slot_scale, int total_rank, int seed, bool dropout, "
        "bool accumulate=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorafusion, CPU, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_cpu);
  m.impl("multi_lora_grad", &multi_lora_grad_cpu);
  m.impl("multi_lora_expand_add_", &multi_lora_expand_add_cpu);
  m.impl("multi_lora_grad_a_expand_dx_", &multi_lora_grad_a_expand_dx_cpu);
}
