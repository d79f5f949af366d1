// Element-wise row kernels of the CPU ops (lora_cpu.cpp, multi_lora.cpp): the dropout mask applied to one row of
// n columns [0, n) of global row `row`, with the Philox draws of philox_simd.h (seed = (k1 << 32) | k0,
// keep iff draw >= thr) and scale = 1 / (1 - p). Defined in row_kernels.cpp, compiled for AVX-512, AVX2 and
// baseline x86-64 with the best picked at load time (the extension itself is built for baseline x86-64).
#pragma once
#include <cstdint>

namespace lorafusion {

// dst[j] = keep(row, j) ? src[j] * scale : 0. src may alias dst.
void dropout_row(const float* src, float* dst, int64_t n, uint64_t seed, uint32_t row, uint32_t thr, float scale);
void dropout_row(const double* src, double* dst, int64_t n, uint64_t seed, uint32_t row, uint32_t thr, double scale);

// xo[j] = keep(row, j) ? x[j] * scale : 0 and d[j] = keep ? d[j] * scale : 0 from one set of draws (backward's D(X)
// for dA and D'(dS A) for dX). x may alias xo.
void dropout_pair_row(const float* x, float* xo, float* d, int64_t n, uint64_t seed, uint32_t row, uint32_t thr,
                      float scale);
void dropout_pair_row(const double* x, double* xo, double* d, int64_t n, uint64_t seed, uint32_t row, uint32_t thr,
                      double scale);

// dst[j] += keep(row, j) ? mul * src[j] : 0 (every j kept when !drop; no draws are made then).
void masked_axpy_row(float* dst, const float* src, int64_t n, bool drop, uint64_t seed, uint32_t row, uint32_t thr,
                     float mul);

// With k = keep(row, j) ? scale : 0 (every j kept, scale 1, when !drop): xo[j] = k != 0 ? x[j] * k : 0 and
// d[j] (+)= k != 0 ? t[j] * k : 0 (added when accumulate, else stored), from one set of draws (backward's D(X) for
// dA and D'(dS A) into dX).
void dropout_axpy_row(const float* x, float* xo, float* d, const float* t, int64_t n, bool drop, uint64_t seed,
                      uint32_t row, uint32_t thr, float scale, bool accumulate);

}  // namespace lorafusion
