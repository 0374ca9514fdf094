// CUDA launchers for occupancy-grid ray marching (math in include/avatar/occupancy.h).
// Depends only on the CUDA runtime and our headers. One thread per ray, two
// passes (count, then fill at the prefix-summed offsets) as on the CPU.
#include <cuda_runtime.h>

#include "avatar/occupancy.h"

namespace avatar {
namespace {

__global__ void occupancy_march_kernel(const float* __restrict__ rays_o,
                                       const float* __restrict__ rays_d,
                                       const float* __restrict__ near, const float* __restrict__ far,
                                       const float* __restrict__ jitter,
                                       const uint8_t* __restrict__ bits, int32_t res, float step,
                                       int64_t max_samples, int64_t n_rays,
                                       int64_t* __restrict__ counts,
                                       const int64_t* __restrict__ offsets, float* __restrict__ ts) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  const float* o = rays_o + 3 * r;
  const float* d = rays_d + 3 * r;
  const int64_t kept = occupancy_march_ray<float>(o[0], o[1], o[2], d[0], d[1], d[2], near[r],
                                                  far[r], jitter[r], bits, res, step, max_samples,
                                                  ts != nullptr ? ts + offsets[r] : nullptr);
  if (counts != nullptr) counts[r] = kept;
}

}  // namespace

int occupancy_march_count_cuda(const float* rays_o, const float* rays_d, const float* near,
                               const float* far, const float* jitter, const uint8_t* bits,
                               int32_t res, float step, int64_t max_samples, int64_t n_rays,
                               int64_t* counts, void* stream) {
  if (n_rays == 0) return static_cast<int>(cudaSuccess);
  occupancy_march_kernel<<<static_cast<unsigned int>(num_blocks(n_rays)), kThreadsPerBlock, 0,
                           static_cast<cudaStream_t>(stream)>>>(
      rays_o, rays_d, near, far, jitter, bits, res, step, max_samples, n_rays, counts, nullptr,
      nullptr);
  return static_cast<int>(cudaGetLastError());
}

int occupancy_march_fill_cuda(const float* rays_o, const float* rays_d, const float* near,
                              const float* far, const float* jitter, const uint8_t* bits,
                              int32_t res, float step, int64_t max_samples, int64_t n_rays,
                              const int64_t* offsets, float* ts, void* stream) {
  if (n_rays == 0) return static_cast<int>(cudaSuccess);
  occupancy_march_kernel<<<static_cast<unsigned int>(num_blocks(n_rays)), kThreadsPerBlock, 0,
                           static_cast<cudaStream_t>(stream)>>>(
      rays_o, rays_d, near, far, jitter, bits, res, step, max_samples, n_rays, nullptr, offsets,
      ts);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace avatar
