// Runs the multi-adapter CUDA kernels (csrc/multi_lora_kernels.cuh, with the tile of csrc/lora_gemm.cuh) on the CPU:
// the kernel source itself, compiled by the host compiler, one std::thread per CUDA thread, blocks one after another,
// __syncthreads as a std::barrier over the block's threads, atomicAdd as an atomic float add, __shared__ as one
// static per kernel (blocks never run at once). The grids repeat multi_lora_cuda.cu's host code; the grad chunking is
// the header's grad_row_chunk, which that code calls too. This checks the kernels' indexing, masks, segment walk and
// barrier placement without a GPU (a missing barrier races here too); it does not check the GPU memory model or the
// 16-bit conversions, which test_multi_gpu.py does.
//
//   cuda_emulation DIR T K N TOTAL_RANK NUMEL SEED DROPOUT SCALED SMS
// reads DIR/{x,wa,wb,dy,lf} (float32), DIR/{seg,slot} (int64), DIR/sp (float64), DIR/sc (float32); writes
// DIR/o_shrink = shrink(x, wa), DIR/o_grad = grad(lf, x), DIR/o_expand = dy + expand(lf, wb).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
thread_local dim3 threadIdx, blockIdx;
dim3 gridDim, blockDim;
static std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
template <class T>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

#include "multi_lora_kernels.cuh"

using namespace lorafusion::multi_cuda;

template <class F>
void launch(dim3 grid, unsigned threads, F kernel) {
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        g_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(bx, by, bz);
            kernel();
          });
        for (auto& th : pool) th.join();
      }
}

template <class T>
std::vector<T> read(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) {
    fprintf(stderr, "cannot read %s\n", path.c_str());
    exit(2);
  }
  const size_t n = static_cast<size_t>(f.tellg());
  f.seekg(0);
  std::vector<T> v(n / sizeof(T));
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n));
  return v;
}

template <class T>
void write(const std::string& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

int main(int argc, char** argv) {
  if (argc != 11) {
    fprintf(stderr, "usage: %s DIR T K N TOTAL_RANK NUMEL SEED DROPOUT SCALED SMS\n", argv[0]);
    return 2;
  }
  const std::string d = argv[1];
  const int64_t T = atoll(argv[2]), K = atoll(argv[3]), N = atoll(argv[4]), total = atoll(argv[5]),
                numel = atoll(argv[6]);
  const uint64_t seed = strtoull(argv[7], nullptr, 10);
  const bool dropout = atoi(argv[8]) != 0, scaled = atoi(argv[9]) != 0;
  const int64_t sms = atoll(argv[10]);
  auto x = read<float>(d + "/x"), wa = read<float>(d + "/wa"), wb = read<float>(d + "/wb"), dy = read<float>(d + "/dy"),
       lf = read<float>(d + "/lf"), sc = read<float>(d + "/sc");
  auto seg = read<int64_t>(d + "/seg"), slot = read<int64_t>(d + "/slot");
  auto sp = read<double>(d + "/sp");
  const Tables tables{seg.data(), static_cast<int64_t>(seg.size() / 4), slot.data(), sp.data(), sc.data(), seed,
                      dropout, scaled};

  // shrink: the output starts as NaN, so an element no block writes shows
  std::vector<float> S(static_cast<size_t>(numel), NAN);
  launch(dim3(static_cast<unsigned>((T + kBM - 1) / kBM), kShrinkRankBlocks), kThreads, [&] {
    shrink_kernel<float>(x.data(), K, static_cast<int>(K), static_cast<int>(T), wa.data(), S.data(), tables);
  });
  write(d + "/o_shrink", S);

  // grad of x's columns (as dA): G zeroed, the row chunk as multi_lora_grad_cuda picks it for `sms` SMs
  std::vector<float> G(static_cast<size_t>(total * K), 0.f);
  const int64_t chunk = grad_row_chunk(T, K, sms);
  const dim3 grad_grid(static_cast<unsigned>((T + chunk - 1) / chunk), static_cast<unsigned>((K + kBN - 1) / kBN));
  launch(grad_grid, kThreads, [&] {
    grad_kernel<float>(lf.data(), x.data(), K, static_cast<int>(K), static_cast<int>(T), static_cast<int>(chunk),
                       G.data(), tables);
  });
  write(d + "/o_grad", G);

  // expand_add onto dy
  launch(dim3(static_cast<unsigned>((T + kBM - 1) / kBM), static_cast<unsigned>((N + kBN - 1) / kBN)), kThreads, [&] {
    expand_add_kernel<float>(dy.data(), N, static_cast<int>(N), static_cast<int>(T), lf.data(), wb.data(), tables);
  });
  write(d + "/o_expand", dy);
  printf("grad chunk %lld\n", static_cast<long long>(chunk));
  return 0;
}
