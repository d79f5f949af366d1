// CPU (host only) batched dropout draws for one row segment, shared by lora_cpu.cpp and multi_lora.cpp:
//
//   philox_draws(out, n, row, col0, k0, k1):      out[j] = dropout_draw((k1 << 32) | k0, row, col0 + j), j < n
//   philox_keep(keep, n, row, col0, k0, k1, thr): keep[j] = that draw >= thr (the bool keep mask)
//
// bit for bit the philox.h definition. Columns [64b, 64b + 64) come from the 16 Philox blocks of counters
// 16b .. 16b + 15 (row, key as in philox.h): counter 16b + l yields columns 64b + 16w + l as its words w = 0..3, so
// a 16-lane vector of counters gives the 64 columns as four contiguous 16-lane stores (AVX2: two 8-lane halves).
// Whole 64-column blocks are written in place; a ragged head (col0 not a multiple of 64) or tail (n not a multiple
// of 64) is computed as a whole block into a scratch buffer and the needed columns copied out, so callers should
// start their chunks at multiples of 64 columns.
//
// x86-64 picks AVX-512 / AVX2 at run time (the 32x32->64-bit multiply-high Philox needs is not something
// at::vec::Vectorized offers, and GCC's auto-vectoriser turns it into 64-bit multiply emulation); everything else uses
// the scalar philox4x32_10. LORAFUSION_PHILOX_ISA=scalar|avx2|avx512 (read once) restricts the choice, so every path
// can be tested on one machine.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LORAFUSION_PHILOX_X86_SIMD 1
#endif

#include "philox.h"

namespace lorafusion {
namespace philox_simd {

// One 64-column block: out[0..63] = draws of columns 64 * blk .. 64 * blk + 63.
inline void block_scalar(uint32_t* out, uint32_t blk, uint32_t row, uint32_t k0, uint32_t k1) {
  for (uint32_t l = 0; l < 16; ++l) {
    uint32_t w[4];
    philox4x32_10(blk * 16u + l, row, k0, k1, w);
    out[l] = w[0];
    out[16 + l] = w[1];
    out[32 + l] = w[2];
    out[48 + l] = w[3];
  }
}

// Runs block(out64, blk, row, k0, k1) over the 64-column blocks covering [col0, col0 + n).
template <typename Block>
inline void draws_by_block(uint32_t* out, int64_t n, uint32_t row, uint32_t col0, uint32_t k0, uint32_t k1,
                           Block block) {
  if (n <= 0) return;
  alignas(64) uint32_t tmp[64];
  int64_t j = 0;
  if (const uint32_t off = col0 & 63u) {  // ragged head
    block(tmp, col0 >> 6, row, k0, k1);
    j = std::min<int64_t>(64 - off, n);
    std::memcpy(out, tmp + off, j * sizeof(uint32_t));
  }
  for (; j + 64 <= n; j += 64) block(out + j, (col0 + static_cast<uint32_t>(j)) >> 6, row, k0, k1);
  if (j < n) {  // ragged tail
    block(tmp, (col0 + static_cast<uint32_t>(j)) >> 6, row, k0, k1);
    std::memcpy(out + j, tmp, (n - j) * sizeof(uint32_t));
  }
}

inline void draws_scalar(uint32_t* out, int64_t n, uint32_t row, uint32_t col0, uint32_t k0, uint32_t k1) {
  draws_by_block(out, n, row, col0, k0, k1, &block_scalar);
}

#ifdef LORAFUSION_PHILOX_X86_SIMD
// GCC 12 false positives on its own AVX-512 headers (__Y = __Y "undefined" operands, GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

__attribute__((target("avx512f"))) inline __m512i mulhilo_avx512(__m512i a, __m512i m, __m512i* hi) {
  const __m512i even = _mm512_mul_epu32(a, m);                         // 64-bit products of the even lanes
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // ... and of the odd lanes
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Two 64-column blocks (blk, blk + 1) interleaved, so the two multiply chains overlap: v[w] (v[4 + w]) holds word w
// of block blk (blk + 1), i.e. its columns 16w .. 16w + 15.
__attribute__((target("avx512f"), always_inline)) inline void philox2_avx512(__m512i v[8], uint32_t blk, uint32_t row,
                                                                            uint32_t k0, uint32_t k1) {
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(blk * 16u)), lane);
  __m512i y0 = _mm512_add_epi32(x0, _mm512_set1_epi32(16));
  __m512i x1 = _mm512_set1_epi32(static_cast<int>(row)), y1 = x1;
  __m512i x2 = _mm512_setzero_si512(), x3 = x2, y2 = x2, y3 = x2;
  uint32_t key0 = k0, key1 = k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i kk0 = _mm512_set1_epi32(static_cast<int>(key0));
    const __m512i kk1 = _mm512_set1_epi32(static_cast<int>(key1));
    __m512i xhb, xha, yhb, yha;
    const __m512i xlb = mulhilo_avx512(x2, mb, &xhb);
    const __m512i xla = mulhilo_avx512(x0, ma, &xha);
    const __m512i ylb = mulhilo_avx512(y2, mb, &yhb);
    const __m512i yla = mulhilo_avx512(y0, ma, &yha);
    x0 = _mm512_ternarylogic_epi32(xhb, x1, kk0, 0x96);  // a ^ b ^ c
    x2 = _mm512_ternarylogic_epi32(xha, x3, kk1, 0x96);
    x1 = xlb;
    x3 = xla;
    y0 = _mm512_ternarylogic_epi32(yhb, y1, kk0, 0x96);
    y2 = _mm512_ternarylogic_epi32(yha, y3, kk1, 0x96);
    y1 = ylb;
    y3 = yla;
    key0 += kPhiloxKeyA;
    key1 += kPhiloxKeyB;
  }
  v[0] = x0;
  v[1] = x1;
  v[2] = x2;
  v[3] = x3;
  v[4] = y0;
  v[5] = y1;
  v[6] = y2;
  v[7] = y3;
}

// Draws of block blk (and blk + 1 when two) into out[0..63] (out[64..127]).
__attribute__((target("avx512f"))) inline void block2_avx512(uint32_t* out, uint32_t blk, uint32_t row, uint32_t k0,
                                                             uint32_t k1, bool two) {
  __m512i v[8];
  philox2_avx512(v, blk, row, k0, k1);
  const int nv = two ? 8 : 4;
  for (int i = 0; i < nv; ++i) _mm512_storeu_si512(reinterpret_cast<void*>(out + 16 * i), v[i]);
}

__attribute__((target("avx512f"))) inline void draws_avx512(uint32_t* out, int64_t n, uint32_t row, uint32_t col0,
                                                            uint32_t k0, uint32_t k1) {
  if (n <= 0) return;
  alignas(64) uint32_t tmp[64];
  int64_t j = 0;
  if (const uint32_t off = col0 & 63u) {  // ragged head
    block2_avx512(tmp, col0 >> 6, row, k0, k1, false);
    j = std::min<int64_t>(64 - off, n);
    std::memcpy(out, tmp + off, j * sizeof(uint32_t));
  }
  for (; j + 128 <= n; j += 128) block2_avx512(out + j, (col0 + static_cast<uint32_t>(j)) >> 6, row, k0, k1, true);
  if (j + 64 <= n) {
    block2_avx512(out + j, (col0 + static_cast<uint32_t>(j)) >> 6, row, k0, k1, false);
    j += 64;
  }
  if (j < n) {  // ragged tail
    block2_avx512(tmp, (col0 + static_cast<uint32_t>(j)) >> 6, row, k0, k1, false);
    std::memcpy(out + j, tmp, (n - j) * sizeof(uint32_t));
  }
}

// keep[j] = draw(row, col0 + j) >= thr, compared in registers for whole 64-column blocks.
__attribute__((target("avx512f"))) inline void keep_avx512(bool* out, int64_t n, uint32_t row, uint32_t col0,
                                                           uint32_t k0, uint32_t k1, uint32_t thr) {
  if (n <= 0) return;
  alignas(64) uint32_t tmp[128];
  int64_t j = 0;
  if (const uint32_t off = col0 & 63u) {  // ragged head
    j = std::min<int64_t>(64 - off, n);
    draws_avx512(tmp, j, row, col0, k0, k1);
    for (int64_t i = 0; i < j; ++i) out[i] = tmp[i] >= thr;
  }
  const __m512i thrv = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512i one = _mm512_set1_epi32(1);
  for (; j + 128 <= n; j += 128) {
    __m512i v[8];
    philox2_avx512(v, (col0 + static_cast<uint32_t>(j)) >> 6, row, k0, k1);
    for (int i = 0; i < 8; ++i) {
      const __m128i b = _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(v[i], thrv), one));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j + 16 * i), b);  // bytes 0 / 1, as bool
    }
  }
  if (j < n) {  // fewer than 128 left
    draws_avx512(tmp, n - j, row, col0 + static_cast<uint32_t>(j), k0, k1);
    for (int64_t i = 0; i < n - j; ++i) out[j + i] = tmp[i] >= thr;
  }
}

__attribute__((target("avx2"))) inline __m256i mulhilo_avx2(__m256i a, __m256i m, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// One 64-column block as two 8-lane halves (counters 16 blk + 0..7 and 16 blk + 8..15), interleaved.
__attribute__((target("avx2"))) inline void block_avx2(uint32_t* out, uint32_t blk, uint32_t row, uint32_t k0,
                                                       uint32_t k1) {
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(blk * 16u)), lane);
  __m256i y0 = _mm256_add_epi32(x0, _mm256_set1_epi32(8));
  __m256i x1 = _mm256_set1_epi32(static_cast<int>(row)), y1 = x1;
  __m256i x2 = _mm256_setzero_si256(), x3 = x2, y2 = x2, y3 = x2;
  uint32_t key0 = k0, key1 = k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m256i kk0 = _mm256_set1_epi32(static_cast<int>(key0));
    const __m256i kk1 = _mm256_set1_epi32(static_cast<int>(key1));
    __m256i xhb, xha, yhb, yha;
    const __m256i xlb = mulhilo_avx2(x2, mb, &xhb);
    const __m256i xla = mulhilo_avx2(x0, ma, &xha);
    const __m256i ylb = mulhilo_avx2(y2, mb, &yhb);
    const __m256i yla = mulhilo_avx2(y0, ma, &yha);
    x0 = _mm256_xor_si256(_mm256_xor_si256(xhb, x1), kk0);
    x2 = _mm256_xor_si256(_mm256_xor_si256(xha, x3), kk1);
    x1 = xlb;
    x3 = xla;
    y0 = _mm256_xor_si256(_mm256_xor_si256(yhb, y1), kk0);
    y2 = _mm256_xor_si256(_mm256_xor_si256(yha, y3), kk1);
    y1 = ylb;
    y3 = yla;
    key0 += kPhiloxKeyA;
    key1 += kPhiloxKeyB;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 0), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), y0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), x1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 24), y1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), x2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 40), y2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 48), x3);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 56), y3);
}

__attribute__((target("avx2"))) inline void draws_avx2(uint32_t* out, int64_t n, uint32_t row, uint32_t col0,
                                                       uint32_t k0, uint32_t k1) {
  draws_by_block(out, n, row, col0, k0, k1, &block_avx2);
}

#pragma GCC diagnostic pop
#endif  // LORAFUSION_PHILOX_X86_SIMD

using DrawsFn = void (*)(uint32_t*, int64_t, uint32_t, uint32_t, uint32_t, uint32_t);

inline DrawsFn pick_draws() {
  const char* env = std::getenv("LORAFUSION_PHILOX_ISA");
  const bool any = env == nullptr || *env == '\0';
  auto want = [&](const char* isa) { return any || std::strcmp(env, isa) == 0; };
#ifdef LORAFUSION_PHILOX_X86_SIMD
  __builtin_cpu_init();
  if (want("avx512") && __builtin_cpu_supports("avx512f")) return &draws_avx512;
  if (want("avx2") && __builtin_cpu_supports("avx2")) return &draws_avx2;
#endif
  (void)want;
  return &draws_scalar;
}

}  // namespace philox_simd

// out[j] = dropout_draw((k1 << 32) | k0, row, col0 + j) for j < n (fastest when col0 is a multiple of 64).
inline void philox_draws(uint32_t* out, int64_t n, uint32_t row, uint32_t col0, uint32_t k0, uint32_t k1) {
  static const philox_simd::DrawsFn fn = philox_simd::pick_draws();
  fn(out, n, row, col0, k0, k1);
}

// keep[j] = philox_draws' out[j] >= thr (the dropout keep mask of one row segment, as bool).
inline void philox_keep(bool* keep, int64_t n, uint32_t row, uint32_t col0, uint32_t k0, uint32_t k1, uint32_t thr) {
#ifdef LORAFUSION_PHILOX_X86_SIMD
  static const bool avx512 = philox_simd::pick_draws() == &philox_simd::draws_avx512;
  if (avx512) return philox_simd::keep_avx512(keep, n, row, col0, k0, k1, thr);
#endif
  constexpr int64_t kChunk = 512;
  uint32_t draws[kChunk];
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t m = std::min(kChunk, n - j0);
    philox_draws(draws, m, row, col0 + static_cast<uint32_t>(j0), k0, k1);
    for (int64_t j = 0; j < m; ++j) keep[j0 + j] = draws[j] >= thr;
  }
}

}  // namespace lorafusion
