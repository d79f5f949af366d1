// The tiled skinny GEMM every CUDA memory-bound LoRA op is made of (lora_cuda.cu: one adapter; multi_lora_cuda.cu:
// one adapter per row segment): C (+)= alpha * L R on a 64 x 64 tile of C, operands read through arbitrary strides
// and converted to float on the way into shared memory, float accumulation, and the dropout mask regenerated from
// Philox on L, on R or on the output (one Philox block per four masked elements). Mask coordinates are the operands'
// own row and column indices (absolute token rows and feature columns), so any caller gets the reference mask.
#pragma once

#include <cstdint>
#include <type_traits>

#include "philox.h"

namespace lorafusion {
namespace gemm {

enum MaskOn : int { kMaskNone = 0, kMaskL = 1, kMaskR = 2, kMaskOut = 3 };

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

// Element (m, k) of L is L[(m - l_m0) * lsm + (k - l_k0) * lsk], (k, n) of R is R[(k - r_k0) * rsk + n * rsn], and
// (m, n) of C is C[(m - c_m0) * csm + n * csn]: the base offsets let a caller index by absolute rows (the mask's
// coordinates) while its pointers point at a segment's own storage. They are 0 for plain 2-D views.
struct GemmArgs {
  int64_t lsm, lsk, rsk, rsn, csm, csn;
  int M, N, K, k_per_split;
  float alpha;
  bool accumulate;
  int mask_on;
  uint64_t seed;
  uint32_t threshold;
  float keep_scale;
  int64_t l_m0 = 0, l_k0 = 0, r_k0 = 0, c_m0 = 0;
};

__device__ __forceinline__ float masked(float v, const GemmArgs& a, int row, int col) {
  return dropout_keep(a.seed, static_cast<uint32_t>(row), static_cast<uint32_t>(col), a.threshold) ? v * a.keep_scale
                                                                                                  : 0.f;
}

// The four draws of `row` at columns col0 + 16 w (w = 0..3) for col0 = 64 b + l, l < 16: one Philox block serves them
// (philox.h: column 64 b + 16 w + l takes word w of counter 16 b + l).
__device__ __forceinline__ void dropout_words(const GemmArgs& a, int row, int col0, uint32_t w[4]) {
  philox4x32_10(dropout_counter(static_cast<uint32_t>(col0)), static_cast<uint32_t>(row),
                static_cast<uint32_t>(a.seed), static_cast<uint32_t>(a.seed >> 32), w);
}

__device__ __forceinline__ float keep_scaled(float v, const GemmArgs& a, uint32_t draw) {
  return draw >= a.threshold ? v * a.keep_scale : 0.f;
}

// w[k] for a k known only at run time, as selects (the words stay in registers).
__device__ __forceinline__ uint32_t word_at(const uint32_t w[4], int k) {
  return k == 0 ? w[0] : k == 1 ? w[1] : k == 2 ? w[2] : w[3];
}

// The dropout mask shares each Philox block among the four elements it serves: the output tile's columns are dealt
// to threads 16 apart (thread tx holds n0 + tx + 16 j), a masked R tile is loaded the same way, and a masked L tile
// keeps its words over the four k steps of a 64-column block.
static_assert(kBN == 64 && kThreads == 16 * kBK && kThreads == 16 * (kBM / 4), "tile layout of gemm_tile");

struct TileSmem {
  float Ls[kBK][kBM + 4];
  float Rs[kBK][kBN + 4];
};

// One tile: rows m0 .. m0 + 63 of C, of which those in [m_lo, m_hi) are computed and written; columns n0 .. n0 + 63
// (< N); the reduction over k in [k_begin, k_end), k_begin a multiple of kBK when L is masked. atomic: add into C
// with float atomics (C float, holding its initial value), for reductions split over blocks. Called by all kThreads
// threads of the block; it may be called again at once (the shared tiles are released by its last barrier).
template <typename TL, typename TR, typename TC>
__device__ __forceinline__ void gemm_tile(const TL* __restrict__ L, const TR* __restrict__ R, TC* __restrict__ C,
                                          const GemmArgs& a, int m0, int n0, int m_lo, int m_hi, int k_begin,
                                          int k_end, bool atomic, TileSmem& sm) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  // Load mapping: consecutive threads walk the operand's unit-stride dimension, so loads coalesce.
  const bool l_k_fast = a.lsk == 1, r_n_fast = a.rsn == 1 || a.rsk != 1;
  // A masked L read along k: this thread loads column k0 + tid % kBK of rows tid / kBK + 16 i at every step, and k0
  // is a multiple of kBK, so the four steps of one 64-column block take words 0..3 of the same four Philox blocks.
  const bool l_words = a.mask_on == kMaskL && l_k_fast;
  uint32_t lw[4][4] = {};
  int l_block = -1;
  float acc[4][4] = {};
  for (int k0 = k_begin; k0 < k_end; k0 += kBK) {
    if (l_words && (k0 >> 6) != l_block) {
      l_block = k0 >> 6;
#pragma unroll
      for (int i = 0; i < 4; ++i) dropout_words(a, m0 + tid / kBK + i * (kThreads / kBK), (l_block << 6) + tid % kBK,
                                                lw[i]);
    }
#pragma unroll
    for (int i = 0; i < (kBM * kBK) / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int kk = l_k_fast ? idx % kBK : idx / kBM, mm = l_k_fast ? idx / kBK : idx % kBM;
      const int m = m0 + mm, k = k0 + kk;
      float v = 0.f;
      if (m >= m_lo && m < m_hi && k < k_end) {
        v = static_cast<float>(L[(m - a.l_m0) * a.lsm + (k - a.l_k0) * a.lsk]);
        if (a.mask_on == kMaskL) v = l_words ? keep_scaled(v, a, word_at(lw[i], (k0 >> 4) & 3)) : masked(v, a, m, k);
      }
      sm.Ls[kk][mm] = v;
    }
    if (a.mask_on == kMaskR) {  // rows k0 + tid / 16, columns n0 + tid % 16 + 16 j: one Philox block per thread
      const int kk = tid / 16, lane = tid % 16, k = k0 + kk;
      uint32_t w[4];
      dropout_words(a, k, n0 + lane, w);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int nn = lane + 16 * j, n = n0 + nn;
        sm.Rs[kk][nn] = (n < a.N && k < k_end)
                            ? keep_scaled(static_cast<float>(R[(k - a.r_k0) * a.rsk + n * a.rsn]), a, w[j])
                            : 0.f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < (kBN * kBK) / kThreads; ++i) {
        const int idx = tid + i * kThreads;
        const int kk = r_n_fast ? idx / kBN : idx % kBK, nn = r_n_fast ? idx % kBN : idx / kBK;
        const int n = n0 + nn, k = k0 + kk;
        sm.Rs[kk][nn] = (n < a.N && k < k_end) ? static_cast<float>(R[(k - a.r_k0) * a.rsk + n * a.rsn]) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float lv[4], rv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) lv[i] = sm.Ls[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) rv[j] = sm.Rs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(lv[i], rv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty * 4 + i;
    if (m < m_lo || m >= m_hi) continue;
    uint32_t w[4] = {};
    if (a.mask_on == kMaskOut) dropout_words(a, m, n0 + tx, w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n >= a.N) continue;
      float v = a.alpha * acc[i][j];
      if (a.mask_on == kMaskOut) v = keep_scaled(v, a, w[j]);
      TC* out = C + (m - a.c_m0) * a.csm + n * a.csn;
      if constexpr (std::is_same<TC, float>::value) {
        if (atomic) {
          atomicAdd(out, v);
          continue;
        }
      }
      *out = static_cast<TC>(a.accumulate ? static_cast<float>(*out) + v : v);
    }
  }
}

}  // namespace gemm
}  // namespace lorafusion
