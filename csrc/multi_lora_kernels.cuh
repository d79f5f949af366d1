// Device code of the multi-adapter CUDA ops (host launchers in multi_lora_cuda.cu): each op is the single-adapter
// ops' tiled skinny GEMM (lora_gemm.cuh) applied per row segment. A header so that
// tests/lorafusion/cuda_emulation.cpp can run this very code on the CPU, one thread per CUDA thread.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lora_gemm.cuh"
#include "philox.h"

namespace lorafusion {
namespace multi_cuda {

using namespace gemm;  // GemmArgs, the mask modes and the tile constants

// Slot k's rank, offsets and per-adapter factors, as each kernel reads them from the tables.
struct SlotParams {
  int64_t r, w_off, f_off;
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
  const double p = slot_p[k];
  s.drop = dropout && p > 0.0;
  s.thr = dropout_threshold(p);
  s.inv = s.drop ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  s.scale = scaled ? slot_scale[k] : 1.0f;
  return s;
}

// The first segment (sorted by start row) that ends after `row`; n_seg if none.
__device__ __forceinline__ int64_t first_ending_after(const int64_t* seg, int64_t n_seg, int64_t row) {
  int64_t lo = 0, hi = n_seg;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (seg[4 * mid + 1] <= row) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The tables every kernel reads (multi_lora.cpp: seg rows [start, end, slot, row in the slot's S block], sorted by
// start; slot rows [rank, row offset into the stacked weights, element offset into S_flat]).
struct Tables {
  const int64_t* seg;
  int64_t n_seg;
  const int64_t* slot;
  const double* slot_p;
  const float* slot_scale;
  uint64_t seed;
  bool dropout, scaled;
};

// A segment's part inside a block's token rows [r0, r1).
struct SegPart {
  int lo, hi;            // its token rows there
  int64_t start, srow;   // its first token row, and that row's row in its slot's S block
  SlotParams sp;
};

// Calls f(part) for each segment overlapping token rows [r0, r1), in row order: the same calls in every thread of
// the block (f may synchronise it).
template <typename F>
__device__ __forceinline__ void for_each_segment(const Tables& t, int r0, int r1, F&& f) {
  for (int64_t si = first_ending_after(t.seg, t.n_seg, r0); si < t.n_seg && t.seg[4 * si] < r1; ++si) {
    SegPart part;
    part.start = t.seg[4 * si];
    part.srow = t.seg[4 * si + 3];
    part.lo = static_cast<int>(max(part.start, static_cast<int64_t>(r0)));
    part.hi = static_cast<int>(min(t.seg[4 * si + 1], static_cast<int64_t>(r1)));
    part.sp = load_slot(t.slot, t.slot_p, t.slot_scale, t.seg[4 * si + 2], t.dropout, t.scaled);
    f(part);
  }
}

// A segment's GEMM arguments: its scale and its dropout on the op's operand (mask_on), the operands' strides
// (L (m, k) at m lsm + k lsk, R (k, n) at k rsk + n rsn, C (m, n) at m csm + n) and C's column count N.
__device__ __forceinline__ GemmArgs seg_args(const SlotParams& sp, uint64_t seed, int mask_on, int64_t lsm,
                                             int64_t lsk, int64_t rsk, int64_t rsn, int64_t csm, int N) {
  GemmArgs a{};
  a.lsm = lsm;
  a.lsk = lsk;
  a.rsk = rsk;
  a.rsn = rsn;
  a.csm = csm;
  a.csn = 1;
  a.N = N;
  a.alpha = sp.scale;
  a.mask_on = sp.drop ? mask_on : kMaskNone;
  a.seed = seed;
  a.threshold = sp.thr;
  a.keep_scale = sp.inv;
  return a;
}

// Rank blocks of shrink's grid: ranks up to 256 (AdapterSpec's limit) take one tile per block; larger ones loop.
constexpr unsigned kShrinkRankBlocks = 4;

// grad's token rows per block for T rows, N columns and `sms` SMs: about four blocks per SM over the column blocks,
// each still reducing several 16-row steps (fewer, longer chunks mean fewer atomics into G). Host code.
inline int64_t grad_row_chunk(int64_t T, int64_t N, int64_t sms) {
  const int64_t gn = (N + kBN - 1) / kBN;
  const int64_t chunks = std::max<int64_t>(1, (4 * sms + gn - 1) / gn);
  return std::max<int64_t>(4 * kBK, ((T + chunks - 1) / chunks + kBK - 1) / kBK * kBK);
}

// out[slot block rows] = scale * D(x[rows]) w_k^T: block (b, c) takes token rows [64 b, 64 b + 64) and, of each
// segment overlapping them (usually one), the 64-rank tiles c, c + 4, ..., with the mask on x at absolute
// (row, column). Blocks past a segment's rank skip it.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) shrink_kernel(const T* __restrict__ x, int64_t ldx, int K, int rows,
                                                          const float* __restrict__ w, float* __restrict__ out,
                                                          const Tables t) {
  __shared__ gemm::TileSmem sm;
  const int m0 = blockIdx.x * kBM;
  for_each_segment(t, m0, min(m0 + kBM, rows), [&](const SegPart& s) {
    // L = x (T x K); R(k, j) = w[(w_off + j) K + k]; C(m, j) = out[f_off + (srow + m - start) r + j]
    GemmArgs a = seg_args(s.sp, t.seed, kMaskL, ldx, 1, 1, K, s.sp.r, static_cast<int>(s.sp.r));
    a.c_m0 = s.start - s.srow;
    for (int n0 = blockIdx.y * kBN; n0 < s.sp.r; n0 += gridDim.y * kBN)
      gemm::gemm_tile<T, float, float>(x, w + s.sp.w_off * K, out + s.sp.f_off, a, m0, n0, s.lo, s.hi, 0, K, false,
                                       sm);
  });
}

// G[w_off + j, col] += scale * sum over slot k's rows of l[row, j] D(m[row, col]): block (c, b) takes the token rows
// of chunk c (`chunk` rows, a multiple of 16) and columns [64 b, 64 b + 64); each segment part in the chunk adds its
// 64-rank tiles into G with float atomics (G starts at zero).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) grad_kernel(const float* __restrict__ l, const T* __restrict__ m,
                                                        int64_t ldm, int N, int rows, int chunk,
                                                        float* __restrict__ G, const Tables t) {
  __shared__ gemm::TileSmem sm;
  const int c0 = blockIdx.x * chunk, n0 = blockIdx.y * kBN;
  for_each_segment(t, c0, min(c0 + chunk, rows), [&](const SegPart& s) {
    // L(j, row) = l[f_off + (srow + row - start) r + j]; R = m (T x N); C(j, col) = G[(w_off + j) N + col]
    GemmArgs a = seg_args(s.sp, t.seed, kMaskR, 1, s.sp.r, ldm, 1, N, N);
    a.l_k0 = s.start - s.srow;
    for (int j0 = 0; j0 < s.sp.r; j0 += kBM)
      gemm::gemm_tile<float, T, float>(l + s.sp.f_off, m, G + s.sp.w_off * N, a, j0, n0, 0,
                                       static_cast<int>(s.sp.r), s.lo, s.hi, true, sm);
  });
}

// out[rows] += scale * D'(l[rows] w_k): block (b, c) takes token rows [64 b, 64 b + 64) and columns
// [64 c, 64 c + 64), one tile per segment overlapping them, with the mask on the output at absolute (row, column).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) expand_add_kernel(T* __restrict__ out, int64_t ldo, int N, int rows,
                                                              const float* __restrict__ l,
                                                              const float* __restrict__ w, const Tables t) {
  __shared__ gemm::TileSmem sm;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  for_each_segment(t, m0, min(m0 + kBM, rows), [&](const SegPart& s) {
    // L(row, j) = l[f_off + (srow + row - start) r + j]; R(j, col) = w[(w_off + j) N + col]; C = out (T x N)
    GemmArgs a = seg_args(s.sp, t.seed, kMaskOut, s.sp.r, 1, N, 1, ldo, N);
    a.l_m0 = s.start - s.srow;
    a.accumulate = true;
    gemm::gemm_tile<float, float, T>(l + s.sp.f_off, w + s.sp.w_off * N, out, a, m0, n0, s.lo, s.hi, 0,
                                     static_cast<int>(s.sp.r), false, sm);
  });
}

}  // namespace multi_cuda
}  // namespace lorafusion
