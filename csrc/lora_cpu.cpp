// CPU kernels of the lorafusion ops (schemas in ops.cpp, math in lorafusion/reference.py).
//
// Design: at::parallel_for over blocks of rows (tokens). Each block does its rank-r work while its rows are in cache:
// the dropout mask regenerated from Philox, the rank-r products (at::mm runs single-threaded inside the parallel
// region), the term written into Y / dX; then one full GEMM over all rows adds X W^T / dY W on top (beta = 1).
// Per-worker partials of dA / dB are reduced at the end. The rank-r path is accumulated in float32 (float64 for
// float64 input). The extension must be built with -fopenmp (setup.py), or every loop here runs on one thread.
//
// Philox is vectorised by hand for AVX-512 / AVX2 (philox_simd.h, picked at load time); the element-wise mask
// kernels are compiled per instruction set (row_kernels.cpp); dtype conversions go through ATen's own kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "philox.h"
#include "philox_simd.h"
#include "row_kernels.h"

namespace lorafusion {
namespace {

using at::Tensor;

void keep_row(bool* out, int64_t n, uint64_t seed, uint32_t row, uint32_t thr) {
  philox_keep(out, n, row, 0, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), thr);
}

struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  double scale;  // 1 / (1 - p)
  bool active;   // p > 0
};

Dropout make_dropout(int64_t seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lorafusion: dropout p must be in [0, 1), got ", p);
  return {static_cast<uint64_t>(seed), dropout_threshold(p), 1.0 / (1.0 - p), p > 0.0};
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A row count from the environment variable `name` (at least 16), else `fallback`; read once per name.
int64_t rows_from_env(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  const int64_t v = env ? std::atoll(env) : 0;
  return v > 0 ? std::max<int64_t>(v, 16) : fallback;
}

// Rows per block a worker takes: the rank-r GEMMs on a block stay efficient and every thread gets work. Tuned on a
// 2-core Xeon (benchmarks/cpu_ops_tuning.py); override with LORAFUSION_CPU_BLOCK_ROWS.
int64_t block_rows() {
  static const int64_t rows = rows_from_env("LORAFUSION_CPU_BLOCK_ROWS", 256);
  return rows;
}

// Rows per inner sub-block: the mask, the dropped rows and the rank-r products of a sub-block stay in L2. The
// standalone memory-bound ops use sub-blocks as their blocks. Override with LORAFUSION_CPU_SUB_ROWS.
int64_t sub_rows() {
  static const int64_t rows = rows_from_env("LORAFUSION_CPU_SUB_ROWS", 64);
  return rows;
}

// Runs fn(part, row0, nrows) for every row block. Worker `part` < at::get_num_threads() takes a fixed, contiguous run
// of blocks in order and indexes its partials (dA, dB) with `part`, so the reductions, and every result, are the same
// from run to run (for a given thread count) whichever OS thread runs which worker.
template <typename F>
void for_each_row_block(int64_t rows, const F& fn, int64_t max_block = 0) {
  // Blocks large enough to keep the GEMMs efficient, small enough to give every thread work.
  const int64_t nt = at::get_num_threads();
  const int64_t cap = max_block > 0 ? max_block : block_rows();
  const int64_t blk = std::max<int64_t>(std::min<int64_t>(cap, (rows + nt - 1) / nt), 32);
  const int64_t nblk = (rows + blk - 1) / blk;
  if (nblk <= 1 || nt == 1 || at::in_parallel_region()) {
    for (int64_t b = 0; b < nblk; ++b) fn(0, b * blk, std::min(blk, rows - b * blk));
    return;
  }
  const int64_t nw = std::min(nt, nblk);
  // Workers run ATen ops (the blocks' GEMMs): they need the caller's thread-local state, above all its dispatch
  // key set (below autograd inside an op) and grad mode, which OpenMP threads do not inherit.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t b = w * nblk / nw; b < (w + 1) * nblk / nw; ++b)
        fn(static_cast<int>(w), b * blk, std::min(blk, rows - b * blk));
  });
}

// The block's rows in the accumulation dtype with unit column stride: the block itself when it already is, else
// copied into buf (first n rows).
Tensor rows_in_acc(const Tensor& blk, const Tensor& buf) {
  if (blk.scalar_type() == buf.scalar_type() && blk.stride(1) == 1) return blk;
  Tensor dst = buf.narrow(0, 0, blk.size(0));
  dst.copy_(blk);
  return dst;
}

// dst = D(src) for rows [row0, row0 + n) of the full input; src has unit column stride, dst is contiguous.
void dropout_rows(const Tensor& src, const Tensor& dst, const Dropout& d, int64_t row0) {
  const int64_t n = src.size(0), cols = src.size(1);
  if (src.scalar_type() == at::kDouble) {
    for (int64_t i = 0; i < n; ++i)
      dropout_row(src.data_ptr<double>() + i * src.stride(0), dst.data_ptr<double>() + i * cols, cols, d.seed,
                  static_cast<uint32_t>(row0 + i), d.threshold, d.scale);
  } else {
    for (int64_t i = 0; i < n; ++i)
      dropout_row(src.data_ptr<float>() + i * src.stride(0), dst.data_ptr<float>() + i * cols, cols, d.seed,
                  static_cast<uint32_t>(row0 + i), d.threshold, static_cast<float>(d.scale));
  }
}

// D(X) for the block [r0, r0 + n): xbuf is per-thread scratch (rows x in, accumulation dtype).
Tensor dropped_block(const Tensor& x, int64_t r0, int64_t n, const Dropout& d, const Tensor& xbuf) {
  Tensor src = rows_in_acc(x.narrow(0, r0, n), xbuf);
  if (!d.active) return src;
  Tensor dst = xbuf.narrow(0, 0, n);
  dropout_rows(src, dst, d, r0);
  return dst;
}

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "lorafusion: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), "lorafusion: ", name, " must be floating point, got ", t.scalar_type());
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lorafusion: ", name, " must be a CPU tensor, got ", t.device());
}

// Scratch outlives the call: made under torch.inference_mode() it would be an inference tensor, which a later call
// outside that mode may not write to. Allocated with the mode off, it is a normal tensor, writable in both.
Tensor scratch(int64_t rows, int64_t cols, at::ScalarType dt) {
  c10::InferenceMode normal(false);
  return at::empty({rows, cols}, at::TensorOptions().dtype(dt));
}

// A per-thread scratch buffer of at least rows x cols of dtype dt, reallocated only when too small.
Tensor& ensure(Tensor& buf, int64_t rows, int64_t cols, at::ScalarType dt) {
  if (!buf.defined() || buf.size(0) < rows || buf.size(1) != cols || buf.scalar_type() != dt)
    buf = scratch(rows, cols, dt);
  return buf;
}

// One block of rows of dS = s dY B and dB^T += s S^T dY, from one read of the dY block (in L2 for the second GEMM).
void dy_shrink_block(const Tensor& dy_blk, const Tensor& B, const Tensor& S_blk, double scale, Tensor dS_blk,
                     Tensor dBt_part) {
  at::mm_out(dS_blk, dy_blk, B);
  dS_blk.mul_(scale);
  dBt_part.addmm_(S_blk.t(), dy_blk, 1.0, scale);
}

// dB (out x r) from per-worker partials of dB^T (r x out): S_blk^T dY_blk runs about twice as fast in MKL as
// dY_blk^T S_blk (measured at 64 x 1024 x 16).
Tensor dB_from_parts(const Tensor& dBt_parts) { return dBt_parts.sum(0).t().contiguous(); }

// --------------------------------------------------------------------------------------------------------------
// Ops
// --------------------------------------------------------------------------------------------------------------

Tensor dropout_keep_mask_cpu(const Tensor& x, int64_t seed, double p) {
  check_2d(x, "x");
  const Dropout d = make_dropout(seed, p);
  Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t cols = x.size(1);
  bool* ptr = out.data_ptr<bool>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) keep_row(ptr + i * cols, cols, d.seed, static_cast<uint32_t>(i), d.threshold);
  });
  return out;
}

Tensor lora_shrink_cpu(const Tensor& x, const Tensor& A, int64_t seed, double p) {
  check_2d(x, "x");
  check_2d(A, "A");
  TORCH_CHECK(A.size(1) == x.size(1), "lorafusion: A must be (r, ", x.size(1), "), got ", A.sizes());
  const Dropout d = make_dropout(seed, p);
  const auto acc = acc_type(x.scalar_type());
  const int64_t T = x.size(0), in = x.size(1);
  Tensor At = A.to(acc).t();
  Tensor S = at::empty({T, A.size(0)}, x.options().dtype(acc));
  for_each_row_block(T, [&](int, int64_t r0, int64_t n) {
    thread_local Tensor xbuf;
    Tensor S_blk = S.narrow(0, r0, n);
    at::mm_out(S_blk, dropped_block(x, r0, n, d, ensure(xbuf, n, in, acc)), At);
  }, sub_rows());
  return S;
}

std::tuple<Tensor, Tensor> lora_dy_shrink_cpu(const Tensor& dy, const Tensor& B, const Tensor& S, double scale) {
  check_2d(dy, "dy");
  check_2d(B, "B");
  check_2d(S, "S");
  TORCH_CHECK(B.size(0) == dy.size(1), "lorafusion: B must be (", dy.size(1), ", r), got ", B.sizes());
  TORCH_CHECK(S.size(0) == dy.size(0) && S.size(1) == B.size(1), "lorafusion: S must be (", dy.size(0), ", ",
              B.size(1), "), got ", S.sizes());
  const auto acc = acc_type(dy.scalar_type());
  const int64_t T = dy.size(0), out = dy.size(1), r = B.size(1);
  Tensor Bacc = B.to(acc).contiguous();
  Tensor Sacc = S.to(acc);
  Tensor dS = at::empty({T, r}, dy.options().dtype(acc));
  const int nt = at::get_num_threads();
  Tensor dBt_parts = at::zeros({nt, r, out}, dy.options().dtype(acc));
  for_each_row_block(T, [&](int part, int64_t r0, int64_t n) {
    thread_local Tensor ybuf;
    Tensor dy_blk = rows_in_acc(dy.narrow(0, r0, n), ensure(ybuf, n, out, acc));
    dy_shrink_block(dy_blk, Bacc, Sacc.narrow(0, r0, n), scale, dS.narrow(0, r0, n), dBt_parts[part]);
  }, sub_rows());
  return {dS, dB_from_parts(dBt_parts)};
}

Tensor lora_dropout_grad_A_cpu(const Tensor& x, const Tensor& dS, int64_t seed, double p) {
  check_2d(x, "x");
  check_2d(dS, "dS");
  TORCH_CHECK(dS.size(0) == x.size(0), "lorafusion: dS must have ", x.size(0), " rows, got ", dS.sizes());
  const Dropout d = make_dropout(seed, p);
  const auto acc = acc_type(x.scalar_type());
  const int64_t T = x.size(0), in = x.size(1), r = dS.size(1);
  Tensor dSacc = dS.to(acc);
  const int nt = at::get_num_threads();
  Tensor dA_parts = at::zeros({nt, r, in}, x.options().dtype(acc));
  for_each_row_block(T, [&](int part, int64_t r0, int64_t n) {
    thread_local Tensor xbuf;
    dA_parts[part].addmm_(dSacc.narrow(0, r0, n).t(), dropped_block(x, r0, n, d, ensure(xbuf, n, in, acc)));
  }, sub_rows());
  return dA_parts.sum(0);
}

void lora_dropout_expand_add_cpu(const Tensor& dx, const Tensor& dS, const Tensor& A, int64_t seed, double p) {
  check_2d(dx, "dx");
  check_2d(dS, "dS");
  check_2d(A, "A");
  TORCH_CHECK(dS.size(0) == dx.size(0) && A.size(0) == dS.size(1) && A.size(1) == dx.size(1),
              "lorafusion: dx ", dx.sizes(), ", dS ", dS.sizes(), ", A ", A.sizes(), " do not chain");
  const Dropout d = make_dropout(seed, p);
  const auto acc = acc_type(dx.scalar_type());
  const int64_t T = dx.size(0), in = dx.size(1);
  Tensor Aacc = A.to(acc).contiguous();
  Tensor dSacc = dS.to(acc);
  for_each_row_block(T, [&](int, int64_t r0, int64_t n) {
    thread_local Tensor lbuf;
    Tensor dx_blk = dx.narrow(0, r0, n);
    if (!d.active && dx.scalar_type() == acc) {
      dx_blk.addmm_(dSacc.narrow(0, r0, n), Aacc);
      return;
    }
    Tensor L = ensure(lbuf, n, in, acc).narrow(0, 0, n);
    at::mm_out(L, dSacc.narrow(0, r0, n), Aacc);
    if (d.active) dropout_rows(L, L, d, r0);
    dx_blk.add_(L);
  }, sub_rows());
}

std::tuple<Tensor, Tensor> lora_linear_forward_cpu(const Tensor& x, const Tensor& W, const std::optional<Tensor>& b,
                                                   const Tensor& A, const Tensor& B, double scale, int64_t seed,
                                                   double p) {
  check_2d(x, "x");
  check_2d(W, "W");
  check_2d(A, "A");
  check_2d(B, "B");
  const int64_t T = x.size(0), in = x.size(1), out = W.size(0), r = A.size(0);
  TORCH_CHECK(W.size(1) == in && A.size(1) == in && B.size(0) == out && B.size(1) == r,
              "lorafusion: x ", x.sizes(), ", W ", W.sizes(), ", A ", A.sizes(), ", B ", B.sizes(),
              " do not chain");
  TORCH_CHECK(W.scalar_type() == x.scalar_type(), "lorafusion: W dtype ", W.scalar_type(), " != x dtype ",
              x.scalar_type());
  const bool has_bias = b.has_value() && b->defined();
  if (has_bias)
    TORCH_CHECK(b->dim() == 1 && b->size(0) == out && b->scalar_type() == x.scalar_type(),
                "lorafusion: bias must be (", out, ") of x's dtype, got ", b->sizes(), " ", b->scalar_type());
  const Dropout d = make_dropout(seed, p);
  const auto acc = acc_type(x.scalar_type());
  const bool y_is_acc = x.scalar_type() == acc;
  Tensor Wt = W.t();
  Tensor At = A.to(acc).t();
  Tensor Bt = B.to(acc).t();
  Tensor Y = at::empty({T, out}, x.options());
  Tensor S = at::empty({T, r}, x.options().dtype(acc));
  Tensor bias_acc = has_bias ? b->to(acc) : Tensor();
  // Each row block writes its rank-r term (and the bias) into Y while the block is in cache; then one GEMM over all
  // rows adds X W^T on top (beta = 1), so the term rides in the GEMM's C tiles instead of a separate pass over Y.
  // One full GEMM rather than row-blocked ones: MKL packs W once (row-blocked GEMMs measured 10-25% slower).
  for_each_row_block(T, [&](int, int64_t r0, int64_t n) {
    thread_local Tensor xbuf, ybuf;
    const int64_t sub = sub_rows();
    for (int64_t s0 = 0; s0 < n; s0 += sub) {
      const int64_t m = std::min(sub, n - s0);
      Tensor S_sub = S.narrow(0, r0 + s0, m);
      at::mm_out(S_sub, dropped_block(x, r0 + s0, m, d, ensure(xbuf, sub, in, acc)), At);
    }
    Tensor S_blk = S.narrow(0, r0, n);
    Tensor Y_blk = Y.narrow(0, r0, n);
    Tensor L = y_is_acc ? Y_blk : ensure(ybuf, n, out, acc).narrow(0, 0, n);
    if (has_bias)
      at::addmm_out(L, bias_acc, S_blk, Bt, 1.0, scale);
    else
      at::mm_out(L, S_blk, Bt).mul_(scale);
    if (!y_is_acc) Y_blk.copy_(L);
  });
  Y.addmm_(x, Wt);
  return {Y, S};
}

std::tuple<std::optional<Tensor>, Tensor, Tensor> lora_linear_backward_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& S,
    double scale, int64_t seed, double p, bool need_dx) {
  check_2d(dy, "dy");
  check_2d(x, "x");
  check_2d(W, "W");
  check_2d(A, "A");
  check_2d(B, "B");
  check_2d(S, "S");
  const int64_t T = x.size(0), in = x.size(1), out = W.size(0), r = A.size(0);
  TORCH_CHECK(dy.size(0) == T && dy.size(1) == out && W.size(1) == in && A.size(1) == in && B.size(0) == out &&
                  B.size(1) == r && S.size(0) == T && S.size(1) == r,
              "lorafusion: dy ", dy.sizes(), ", x ", x.sizes(), ", W ", W.sizes(), ", A ", A.sizes(), ", B ",
              B.sizes(), ", S ", S.sizes(), " do not chain");
  TORCH_CHECK(W.scalar_type() == dy.scalar_type(), "lorafusion: W dtype ", W.scalar_type(), " != dy dtype ",
              dy.scalar_type());
  const Dropout d = make_dropout(seed, p);
  const auto acc = acc_type(x.scalar_type());
  Tensor Aacc = A.to(acc).contiguous();
  Tensor Bacc = B.to(acc).contiguous();
  Tensor Sacc = S.to(acc);
  const int nt = at::get_num_threads();
  Tensor dA_parts = at::zeros({nt, r, in}, x.options().dtype(acc));
  Tensor dBt_parts = at::zeros({nt, r, out}, x.options().dtype(acc));
  Tensor dS = at::empty({T, r}, x.options().dtype(acc));
  Tensor dX = need_dx ? at::empty({T, in}, dy.options()) : Tensor();
  const bool dx_is_acc = dy.scalar_type() == acc;
  for_each_row_block(T, [&](int part, int64_t r0, int64_t n) {
    thread_local Tensor xbuf, ybuf, lbuf;
    // dS = s dY B and dB += s dY^T S from one read of the dY block.
    Tensor dy_raw = dy.narrow(0, r0, n);
    Tensor dy_blk = rows_in_acc(dy_raw, ensure(ybuf, n, out, acc));
    Tensor dS_blk = dS.narrow(0, r0, n);
    dy_shrink_block(dy_blk, Bacc, Sacc.narrow(0, r0, n), scale, dS_blk, dBt_parts[part]);
    Tensor dX_blk = need_dx ? dX.narrow(0, r0, n) : Tensor();
    // Sub-blocks: the mask is regenerated once and serves dA and dX while the rows are in cache.
    const int64_t sub = sub_rows();
    for (int64_t s0 = 0; s0 < n; s0 += sub) {
      const int64_t m = std::min(sub, n - s0), row0 = r0 + s0;
      Tensor dS_sub = dS_blk.narrow(0, s0, m);
      Tensor xb = ensure(xbuf, sub, in, acc).narrow(0, 0, m);
      Tensor x_sub = rows_in_acc(x.narrow(0, row0, m), xb);
      // dX_sub = D'(dS A), in place when dX is in the accumulation dtype; the GEMM after the loop adds dY W on top
      // (see the forward).
      Tensor dX_sub = need_dx ? dX_blk.narrow(0, s0, m) : Tensor();
      Tensor L = !need_dx ? Tensor() : dx_is_acc ? dX_sub : ensure(lbuf, sub, in, acc).narrow(0, 0, m);
      if (need_dx) at::mm_out(L, dS_sub, Aacc);
      if (d.active) {  // one set of draws masks both D(X) (into xb) and dS A (in place)
        AT_DISPATCH_FLOATING_TYPES(acc, "lora_linear_backward_mask", [&] {
          const scalar_t sc = static_cast<scalar_t>(d.scale);
          for (int64_t i = 0; i < m; ++i) {
            const scalar_t* xs = x_sub.data_ptr<scalar_t>() + i * x_sub.stride(0);
            scalar_t* xd = xb.data_ptr<scalar_t>() + i * in;
            const uint32_t row = static_cast<uint32_t>(row0 + i);
            if (need_dx)
              dropout_pair_row(xs, xd, L.data_ptr<scalar_t>() + i * L.stride(0), in, d.seed, row, d.threshold, sc);
            else
              dropout_row(xs, xd, in, d.seed, row, d.threshold, sc);
          }
        });
        x_sub = xb;
      }
      dA_parts[part].addmm_(dS_sub.t(), x_sub);
      if (need_dx && !dx_is_acc) dX_sub.copy_(L);
    }
  });
  std::optional<Tensor> dX_opt;
  if (need_dx) {
    dX.addmm_(dy, W);
    dX_opt = dX;
  }
  return {dX_opt, dA_parts.sum(0), dB_from_parts(dBt_parts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorafusion, CPU, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_dy_shrink", &lora_dy_shrink_cpu);
  m.impl("lora_dropout_grad_A", &lora_dropout_grad_A_cpu);
  m.impl("lora_dropout_expand_add_", &lora_dropout_expand_add_cpu);
  m.impl("lora_linear_forward", &lora_linear_forward_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace lorafusion
