// Row kernels declared in row_kernels.h. Each is a thin non-template wrapper around one inline template body, so the
// target clones below vectorise the same code for each instruction set (GCC / Clang function multi-versioning).
#include "row_kernels.h"

#include <algorithm>

#include "philox_simd.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define LORAFUSION_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORAFUSION_CLONES
#endif

namespace lorafusion {
namespace {

// Draws are buffered per chunk on the stack and consumed while in L1; chunks start at multiples of 64 columns,
// where philox_simd.h writes whole blocks in place.
constexpr int64_t kDrawChunk = 512;
static_assert(kDrawChunk % 64 == 0, "draw chunks must start at multiples of 64 columns");

// Calls body(j0, m, draws) for each chunk [j0, j0 + m) of the row's n columns.
template <typename Body>
inline __attribute__((always_inline)) void for_each_draw_chunk(int64_t n, uint64_t seed, uint32_t row,
                                                                const Body& body) {
  alignas(64) uint32_t draws[kDrawChunk];
  for (int64_t j0 = 0; j0 < n; j0 += kDrawChunk) {
    const int64_t m = std::min(kDrawChunk, n - j0);
    philox_draws(draws, m, row, static_cast<uint32_t>(j0), static_cast<uint32_t>(seed),
                 static_cast<uint32_t>(seed >> 32));
    body(j0, m, draws);
  }
}

template <typename T>
inline __attribute__((always_inline)) void dropout_row_body(const T* src, T* dst, int64_t n, uint64_t seed,
                                                            uint32_t row, uint32_t thr, T scale) {
  for_each_draw_chunk(n, seed, row, [&](int64_t j0, int64_t m, const uint32_t* draws) {
    const T* s = src + j0;
    T* d = dst + j0;
    for (int64_t j = 0; j < m; ++j) {
      const T v = s[j] * scale;  // unconditional, so the select vectorises
      d[j] = draws[j] >= thr ? v : T(0);
    }
  });
}

template <typename T>
inline __attribute__((always_inline)) void dropout_pair_row_body(const T* x, T* xo, T* d, int64_t n, uint64_t seed,
                                                                 uint32_t row, uint32_t thr, T scale) {
  for_each_draw_chunk(n, seed, row, [&](int64_t j0, int64_t m, const uint32_t* draws) {
    const T* xs = x + j0;
    T* xd = xo + j0;
    T* dd = d + j0;
    for (int64_t j = 0; j < m; ++j) {
      const bool keep = draws[j] >= thr;
      const T xv = xs[j] * scale, dv = dd[j] * scale;
      xd[j] = keep ? xv : T(0);
      dd[j] = keep ? dv : T(0);
    }
  });
}

}  // namespace

#define LORAFUSION_ROW_KERNELS(T)                                                                                   \
  LORAFUSION_CLONES void dropout_row(const T* src, T* dst, int64_t n, uint64_t seed, uint32_t row, uint32_t thr,    \
                                     T scale) {                                                                     \
    dropout_row_body(src, dst, n, seed, row, thr, scale);                                                           \
  }                                                                                                                 \
  LORAFUSION_CLONES void dropout_pair_row(const T* x, T* xo, T* d, int64_t n, uint64_t seed, uint32_t row,          \
                                          uint32_t thr, T scale) {                                                  \
    dropout_pair_row_body(x, xo, d, n, seed, row, thr, scale);                                                      \
  }

LORAFUSION_CLONES void masked_axpy_row(float* dst, const float* src, int64_t n, bool drop, uint64_t seed,
                                       uint32_t row, uint32_t thr, float mul) {
  if (!drop) {
    for (int64_t j = 0; j < n; ++j) dst[j] += mul * src[j];
    return;
  }
  for_each_draw_chunk(n, seed, row, [&](int64_t j0, int64_t m, const uint32_t* draws) {
    const float* s = src + j0;
    float* d = dst + j0;
    for (int64_t j = 0; j < m; ++j) {
      const float add = mul * s[j];
      d[j] += draws[j] >= thr ? add : 0.0f;
    }
  });
}

LORAFUSION_CLONES void dropout_axpy_row(const float* x, float* xo, float* d, const float* t, int64_t n, bool drop,
                                        uint64_t seed, uint32_t row, uint32_t thr, float scale, bool accumulate) {
  if (!drop) {
    for (int64_t j = 0; j < n; ++j) xo[j] = x[j];
    if (accumulate) {
      for (int64_t j = 0; j < n; ++j) d[j] += t[j];
    } else {
      for (int64_t j = 0; j < n; ++j) d[j] = t[j];
    }
    return;
  }
  for_each_draw_chunk(n, seed, row, [&](int64_t j0, int64_t m, const uint32_t* draws) {
    float* dd = d + j0;
    for (int64_t j = 0; j < m; ++j) {
      const float xv = x[j0 + j] * scale;
      xo[j0 + j] = draws[j] >= thr ? xv : 0.0f;
    }
    if (accumulate) {
      for (int64_t j = 0; j < m; ++j) {
        const float tv = t[j0 + j] * scale;
        dd[j] += draws[j] >= thr ? tv : 0.0f;
      }
    } else {
      for (int64_t j = 0; j < m; ++j) {
        const float tv = t[j0 + j] * scale;
        dd[j] = draws[j] >= thr ? tv : 0.0f;
      }
    }
  });
}

LORAFUSION_ROW_KERNELS(float)
LORAFUSION_ROW_KERNELS(double)

#undef LORAFUSION_ROW_KERNELS

}  // namespace lorafusion
