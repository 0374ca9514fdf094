// CUDA launchers for ray compositing (math in include/avatar/composite.h).
// Depends only on the CUDA runtime and our headers. One thread per ray: rays
// are short (tens to hundreds of samples) and independent, as in Instant-NGP's
// composite kernels. The running sums (optical depth, opacity, depth, colour and
// the backward's suffix sum) accumulate in double, as on the CPU: a float sum
// over hundreds of samples drifts in its last bits (~1e-5 relative), and one
// double add per sample is cheap next to the memory traffic even at consumer
// GPUs' FP64 rate. The result matches the CPU engine within the tolerance
// stated in composite.h, not bit for bit.
#include <cuda_runtime.h>

#include "avatar/composite.h"

namespace avatar {
namespace {

template <typename T, int K>
__global__ void composite_forward_kernel(const T* __restrict__ sigmas, const T* __restrict__ rgbs,
                                         const T* __restrict__ deltas, const T* __restrict__ ts,
                                         const int64_t* __restrict__ offsets, int64_t n_rays,
                                         int channels, T threshold, T* __restrict__ weights,
                                         T* __restrict__ opacity, T* __restrict__ depth,
                                         T* __restrict__ colour, int64_t* __restrict__ n_active) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  n_active[r] = composite_ray_forward<T, double, K>(sigmas, rgbs, deltas, ts, offsets[r], offsets[r + 1],
                                            channels, threshold, weights, opacity + r, depth + r,
                                            colour + r * channels);
}

template <typename T, int K>
__global__ void composite_backward_kernel(
    const T* __restrict__ grad_weights, const T* __restrict__ grad_opacity,
    const T* __restrict__ grad_depth, const T* __restrict__ grad_colour,
    const T* __restrict__ sigmas, const T* __restrict__ rgbs, const T* __restrict__ deltas,
    const T* __restrict__ ts, const T* __restrict__ weights, const int64_t* __restrict__ offsets,
    const int64_t* __restrict__ n_active, int64_t n_rays, int channels,
    T* __restrict__ grad_sigmas, T* __restrict__ grad_rgbs, T* __restrict__ grad_deltas,
    T* __restrict__ grad_ts) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  CompositeRayGrads<T> grads{grad_weights, grad_opacity != nullptr ? grad_opacity[r] : T(0),
                             grad_depth != nullptr ? grad_depth[r] : T(0),
                             grad_colour != nullptr ? grad_colour + r * channels : nullptr};
  composite_ray_backward<T, double, K>(grads, sigmas, rgbs, deltas, ts, weights, offsets[r], offsets[r + 1],
                               n_active[r], channels, grad_sigmas, grad_rgbs, grad_deltas, grad_ts);
}

template <typename T>
void launch_forward(const void* sigmas, const void* rgbs, const void* deltas, const void* ts,
                    const int64_t* offsets, int64_t n_rays, int channels, double threshold,
                    void* weights, void* opacity, void* depth, void* colour, int64_t* n_active,
                    cudaStream_t stream) {
  composite_dispatch_channels(channels, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    composite_forward_kernel<T, K><<<static_cast<unsigned int>(num_blocks(n_rays)),
                                     kThreadsPerBlock, 0, stream>>>(
        static_cast<const T*>(sigmas), static_cast<const T*>(rgbs), static_cast<const T*>(deltas),
        static_cast<const T*>(ts), offsets, n_rays, channels, static_cast<T>(threshold),
        static_cast<T*>(weights), static_cast<T*>(opacity), static_cast<T*>(depth),
        static_cast<T*>(colour), n_active);
  });
}

template <typename T>
void launch_backward(const void* grad_weights, const void* grad_opacity, const void* grad_depth,
                     const void* grad_colour, const void* sigmas, const void* rgbs,
                     const void* deltas, const void* ts, const void* weights,
                     const int64_t* offsets, const int64_t* n_active, int64_t n_rays, int channels,
                     void* grad_sigmas, void* grad_rgbs, void* grad_deltas, void* grad_ts,
                     cudaStream_t stream) {
  composite_dispatch_channels(channels, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    composite_backward_kernel<T, K><<<static_cast<unsigned int>(num_blocks(n_rays)),
                                      kThreadsPerBlock, 0, stream>>>(
        static_cast<const T*>(grad_weights), static_cast<const T*>(grad_opacity),
        static_cast<const T*>(grad_depth), static_cast<const T*>(grad_colour),
        static_cast<const T*>(sigmas), static_cast<const T*>(rgbs), static_cast<const T*>(deltas),
        static_cast<const T*>(ts), static_cast<const T*>(weights), offsets, n_active, n_rays,
        channels, static_cast<T*>(grad_sigmas), static_cast<T*>(grad_rgbs),
        static_cast<T*>(grad_deltas), static_cast<T*>(grad_ts));
  });
}

}  // namespace

int composite_forward_cuda(bool is_double, const void* sigmas, const void* rgbs,
                           const void* deltas, const void* ts, const int64_t* offsets,
                           int64_t n_rays, int channels, double threshold, void* weights,
                           void* opacity, void* depth, void* colour, int64_t* n_active,
                           void* stream) {
  if (n_rays == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  if (is_double) {
    launch_forward<double>(sigmas, rgbs, deltas, ts, offsets, n_rays, channels, threshold, weights,
                           opacity, depth, colour, n_active, s);
  } else {
    launch_forward<float>(sigmas, rgbs, deltas, ts, offsets, n_rays, channels, threshold, weights,
                          opacity, depth, colour, n_active, s);
  }
  return static_cast<int>(cudaGetLastError());
}

int composite_backward_cuda(bool is_double, const void* grad_weights, const void* grad_opacity,
                            const void* grad_depth, const void* grad_colour, const void* sigmas,
                            const void* rgbs, const void* deltas, const void* ts,
                            const void* weights, const int64_t* offsets, const int64_t* n_active,
                            int64_t n_rays, int channels, void* grad_sigmas, void* grad_rgbs,
                            void* grad_deltas, void* grad_ts, void* stream) {
  if (n_rays == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  if (is_double) {
    launch_backward<double>(grad_weights, grad_opacity, grad_depth, grad_colour, sigmas, rgbs,
                            deltas, ts, weights, offsets, n_active, n_rays, channels, grad_sigmas,
                            grad_rgbs, grad_deltas, grad_ts, s);
  } else {
    launch_backward<float>(grad_weights, grad_opacity, grad_depth, grad_colour, sigmas, rgbs,
                           deltas, ts, weights, offsets, n_active, n_rays, channels, grad_sigmas,
                           grad_rgbs, grad_deltas, grad_ts, s);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace avatar
