// CUDA launcher for axpy. Depends only on the CUDA runtime and our headers.
#include <cuda_runtime.h>

#include "avatar/axpy.h"

namespace avatar {

__global__ void axpy_kernel(float alpha, const float* __restrict__ x,
                            const float* __restrict__ y, float* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = axpy_element(alpha, x[i], y[i]);
}

int axpy_cuda(float alpha, const float* x, const float* y, float* out, int64_t n, void* stream) {
  if (n == 0) return static_cast<int>(cudaSuccess);
  axpy_kernel<<<static_cast<unsigned int>(num_blocks(n)), kThreadsPerBlock, 0,
                static_cast<cudaStream_t>(stream)>>>(alpha, x, y, out, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace avatar
