// Philox-4x32-10 and the dropout keep-test of lorafusion/reference.py, bit for bit, on host and device.
//
// Element (row, col) draws word w = (col >> 4) & 3 of philox4x32_10(counter = (q, row, 0, 0), key = (seed lo, seed hi))
// with q = (col >> 6) * 16 + (col & 15), so one Philox block feeds four elements (columns 64b + 16w + l for counter
// 16b + l), and is kept iff draw >= threshold, an unsigned 32-bit comparison with
// threshold = min(round_half_even(p * 2^32), 2^32 - 1) (computed on the host). CPU SIMD versions: philox_simd.h.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LORAFUSION_HD __host__ __device__ __forceinline__
#else
#define LORAFUSION_HD inline
#endif

namespace lorafusion {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

LORAFUSION_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
#endif
}

// Philox-4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1): the four output words into out[0..3].
LORAFUSION_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_b, hi_a;
    const uint32_t lo_b = philox_mulhilo(c2, kPhiloxRoundB, &hi_b);
    const uint32_t lo_a = philox_mulhilo(c0, kPhiloxRoundA, &hi_a);
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The Philox counter of column col: 16 consecutive counters serve each block of 64 columns.
LORAFUSION_HD uint32_t dropout_counter(uint32_t col) { return ((col >> 6) << 4) | (col & 15u); }

// Which of the block's four output words column col takes.
LORAFUSION_HD uint32_t dropout_word(uint32_t col) { return (col >> 4) & 3u; }

// The raw 32-bit draw for element (row, col).
LORAFUSION_HD uint32_t dropout_draw(uint64_t seed, uint32_t row, uint32_t col) {
  uint32_t w[4];
  philox4x32_10(dropout_counter(col), row, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), w);
  const uint32_t k = dropout_word(col);
  // Selects rather than w[k], so the words stay in registers on the device.
  return k == 0 ? w[0] : k == 1 ? w[1] : k == 2 ? w[2] : w[3];
}

LORAFUSION_HD bool dropout_keep(uint64_t seed, uint32_t row, uint32_t col, uint32_t threshold) {
  return dropout_draw(seed, row, col) >= threshold;
}

// The threshold of reference.dropout_threshold (Python's round() is round-half-to-even, as nearbyint).
LORAFUSION_HD uint32_t dropout_threshold(double p) {
  using std::nearbyint;  // the host's; CUDA's device overload where compiled for the device
  const double t = nearbyint(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace lorafusion
