// Shared macros for kernels that compile for both the CPU (host) and CUDA (device).
//
// Per-element math lives in headers as `AVATAR_HD` inline functions, so a CPU
// translation unit (looping with at::parallel_for) and a CUDA translation unit
// (launching a kernel) run exactly the same code. Headers in this folder must not
// include torch or ATen: `.cu` files include them and are compiled with plain
// `nvcc -c`, depending only on the CUDA runtime.
#pragma once

#if defined(__CUDACC__)
#define AVATAR_HD __host__ __device__ __forceinline__
#else
#define AVATAR_HD inline
#endif

#include <cstdint>

namespace avatar {

// Threads per block used by our CUDA launchers; kernels are memory bound, 256 is a
// good default on every architecture since Pascal.
constexpr int kThreadsPerBlock = 256;

inline int64_t num_blocks(int64_t n, int64_t threads = kThreadsPerBlock) {
  return (n + threads - 1) / threads;
}

}  // namespace avatar
