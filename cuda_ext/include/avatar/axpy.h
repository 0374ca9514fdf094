// axpy: out = alpha * x + y. The smallest op that proves the native path end to
// end (header math -> CPU loop / CUDA kernel -> torch binding -> Python autograd);
// new kernels copy its layout.
#pragma once

#include "avatar/common.h"

namespace avatar {

AVATAR_HD float axpy_element(float alpha, float x, float y) { return alpha * x + y; }

#if defined(AVATAR_WITH_CUDA) || defined(__CUDACC__)
// Launches the CUDA kernel on `stream` (a cudaStream_t passed as void* so that
// callers need not include the CUDA headers). Returns a cudaError_t as int.
int axpy_cuda(float alpha, const float* x, const float* y, float* out, int64_t n, void* stream);
#endif

}  // namespace avatar
