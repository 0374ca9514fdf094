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

// IEEE round-to-nearest arithmetic that is never fused into a multiply-add.
// nvcc contracts a * b + c into one FMA by default (-fmad=true, even without
// --use_fast_math), which rounds once instead of twice; a kernel whose CUDA and
// CPU results must agree bit for bit (raster.h) writes its float math with these.
// On the device they are the __*_rn intrinsics (PTX mul.rn / add.rn / sub.rn /
// div.rn, which ptxas never fuses); on the host the plain operators, in
// translation units that turn contraction off (raster.cpp).
#if defined(__CUDA_ARCH__)
AVATAR_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
AVATAR_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
AVATAR_HD double sub_rn(double a, double b) { return __dsub_rn(a, b); }
AVATAR_HD double div_rn(double a, double b) { return __ddiv_rn(a, b); }
AVATAR_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
AVATAR_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
AVATAR_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
AVATAR_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
#else
AVATAR_HD double mul_rn(double a, double b) { return a * b; }
AVATAR_HD double add_rn(double a, double b) { return a + b; }
AVATAR_HD double sub_rn(double a, double b) { return a - b; }
AVATAR_HD double div_rn(double a, double b) { return a / b; }
AVATAR_HD float mul_rn(float a, float b) { return a * b; }
AVATAR_HD float add_rn(float a, float b) { return a + b; }
AVATAR_HD float sub_rn(float a, float b) { return a - b; }
AVATAR_HD float div_rn(float a, float b) { return a / b; }
#endif

// Threads per block used by our CUDA launchers; kernels are memory bound, 256 is a
// good default on every architecture since Pascal.
constexpr int kThreadsPerBlock = 256;

inline int64_t num_blocks(int64_t n, int64_t threads = kThreadsPerBlock) {
  return (n + threads - 1) / threads;
}

}  // namespace avatar
