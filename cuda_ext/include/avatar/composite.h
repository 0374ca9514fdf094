// Volume rendering by alpha compositing of packed ray samples (Max 1995; the
// quadrature of NeRF, Mildenhall et al. 2020, Eq. 3), per-ray math.
//
// Ray r owns samples [offsets[r], offsets[r+1]). For its samples in order:
//   s_i = sigma_i * delta_i,  alpha_i = 1 - exp(-s_i),
//   T_i = exp(-sum_{j<i} s_j)  (transmittance before sample i),
//   w_i = T_i * alpha_i,
//   opacity = sum_i w_i,  depth = sum_i w_i t_i,  colour = sum_i w_i c_i.
// Early termination: the first sample with T_i < threshold and all later ones
// get w = 0 (Instant-NGP stops marching there); they do not contribute to any
// output or gradient. The sums are accumulated in `Acc`: double on the CPU (like
// torch.cumsum there) and on CUDA.
//
// CUDA against the CPU engine (same inputs): not bit for bit. The per-sample
// float math is the same code, but CUDA's expf is within 2 ulp where the host
// libm's is correctly rounded, and nvcc fuses multiply-adds (-fmad=true). The
// difference is a few float32 ulps per sample: weights, opacity, depth, colour
// and all gradients agree to rtol 1e-5, atol 1e-6 (float32 samples) and rtol
// 1e-12 (float64), the tolerance the CUDA checks use.
//
// Backward (per ray, with g_i = dL/dw_i + dL/dopacity + dL/ddepth * t_i
// + dL/dcolour . c_i the total derivative of the loss with respect to w_i):
//   dw_i/ds_j = T_{i+1} (i = j),  -w_i (i > j),  0 (i < j),
//   so dL/ds_j = g_j T_{j+1} - sum_{i>j} g_i w_i;
//   dL/dsigma_j = dL/ds_j delta_j, dL/ddelta_j = dL/ds_j sigma_j,
//   dL/dc_j = dL/dcolour w_j, dL/dt_j = dL/ddepth w_j.
#pragma once

#include <cmath>
#include <type_traits>

#include "avatar/common.h"

namespace avatar {

// Channels of the composited colour (rgb, or e.g. latent features) at most.
constexpr int kCompositeMaxChannels = 32;

AVATAR_HD float exp_value(float x) { return expf(x); }
AVATAR_HD double exp_value(double x) { return exp(x); }

// alpha = 1 - exp(-s) = -expm1(-s), accurate for small s where 1 - exp(-s) cancels.
// float: a Taylor polynomial below s = 1/4 (truncation < 2e-9 relative) and
// 1 - expf(-s) above (a few ulp), several times cheaper than libm's expm1f,
// which dominated the CPU forward. double: libm's expm1 (gradcheck path).
AVATAR_HD float alpha_value(float s) {
  if (s >= 0.0f && s < 0.25f) {
    return s * (1.0f - s * (1.0f / 2.0f) *
                           (1.0f - s * (1.0f / 3.0f) *
                                       (1.0f - s * (1.0f / 4.0f) *
                                                   (1.0f - s * (1.0f / 5.0f) *
                                                               (1.0f - s * (1.0f / 6.0f) *
                                                                           (1.0f - s * (1.0f / 7.0f)))))));
  }
  return 1.0f - expf(-s);
}
AVATAR_HD double alpha_value(double s) { return -expm1(-s); }

// Composites one ray's samples [begin, end) with `channels` colour channels
// (kChannels > 0 fixes the count at compile time for the common 1, 3 and 4).
// Writes weights[begin:end] (0 after termination) and the ray's opacity, depth and
// colour[channels]; returns the number of samples before termination.
template <typename T, typename Acc, int kChannels = 0>
AVATAR_HD int64_t composite_ray_forward(const T* __restrict__ sigmas, const T* __restrict__ rgbs,
                                        const T* __restrict__ deltas, const T* __restrict__ ts,
                                        int64_t begin, int64_t end, int channels_, T threshold,
                                        T* __restrict__ weights, T* __restrict__ opacity,
                                        T* __restrict__ depth, T* __restrict__ colour) {
  const int channels = kChannels > 0 ? kChannels : channels_;
  Acc optical = Acc(0);  // sum of s_j before the current sample
  Acc acc_opacity = Acc(0);
  Acc acc_depth = Acc(0);
  Acc acc_colour[kCompositeMaxChannels];
  for (int k = 0; k < channels; ++k) acc_colour[k] = Acc(0);
  int64_t i = begin;
  for (; i < end; ++i) {
    const T trans = exp_value(-static_cast<T>(optical));
    if (trans < threshold) break;
    const T s = sigmas[i] * deltas[i];
    const T w = trans * alpha_value(s);
    weights[i] = w;
    acc_opacity += w;
    acc_depth += w * ts[i];
    const T* c = rgbs + i * channels;
    for (int k = 0; k < channels; ++k) acc_colour[k] += w * c[k];
    optical += s;
  }
  const int64_t n_active = i - begin;
  for (; i < end; ++i) weights[i] = T(0);
  *opacity = static_cast<T>(acc_opacity);
  *depth = static_cast<T>(acc_depth);
  for (int k = 0; k < channels; ++k) colour[k] = static_cast<T>(acc_colour[k]);
  return n_active;
}

// Upstream gradients of one ray; a null pointer stands for zeros (an output the
// loss does not use), so callers need not materialise them.
template <typename T>
struct CompositeRayGrads {
  const T* weights;  // (S,) indexed by sample, or null
  T opacity;
  T depth;
  const T* colour;  // (C,) or null
};

// Total derivative of the loss with respect to w_i (see the header comment).
template <typename T, typename Acc, int kChannels = 0>
AVATAR_HD Acc composite_weight_grad(const CompositeRayGrads<T>& g, int64_t i, const T* c,
                                    int channels_, T t) {
  const int channels = kChannels > 0 ? kChannels : channels_;
  Acc total = Acc(g.opacity) + Acc(g.depth) * Acc(t);
  if (g.weights != nullptr) total += Acc(g.weights[i]);
  if (g.colour != nullptr) {
    for (int k = 0; k < channels; ++k) total += Acc(g.colour[k]) * Acc(c[k]);
  }
  return total;
}

// Backward of one ray. `weights` are the forward's, `n_active` its return value.
// Writes grad_sigmas[begin:end] and, where not null, grad_rgbs rows, grad_deltas
// and grad_ts. T_{i+1} is recomputed exactly as the forward computes T of the
// next sample, so each sample costs one exponential.
template <typename T, typename Acc, int kChannels = 0>
AVATAR_HD void composite_ray_backward(const CompositeRayGrads<T>& grads,
                                      const T* __restrict__ sigmas, const T* __restrict__ rgbs,
                                      const T* __restrict__ deltas, const T* __restrict__ ts,
                                      const T* __restrict__ weights, int64_t begin, int64_t end,
                                      int64_t n_active, int channels_, T* __restrict__ grad_sigmas,
                                      T* __restrict__ grad_rgbs, T* __restrict__ grad_deltas,
                                      T* __restrict__ grad_ts) {
  const int channels = kChannels > 0 ? kChannels : channels_;
  const int64_t stop = begin + n_active;
  // Reverse pass: -sum_{i>j} g_i w_i, parked in grad_sigmas.
  Acc suffix = Acc(0);
  for (int64_t i = stop - 1; i >= begin; --i) {
    grad_sigmas[i] = static_cast<T>(-suffix);
    const Acc g = composite_weight_grad<T, Acc, kChannels>(grads, i, rgbs + i * channels, channels, ts[i]);
    suffix += g * Acc(weights[i]);
  }
  // Forward pass: + g_j T_{j+1}, then the chain rule to sigma, delta, colour, t.
  Acc optical = Acc(0);
  for (int64_t i = begin; i < stop; ++i) {
    const T s = sigmas[i] * deltas[i];
    optical += s;
    const T trans_next = exp_value(-static_cast<T>(optical));
    const Acc g = composite_weight_grad<T, Acc, kChannels>(grads, i, rgbs + i * channels, channels, ts[i]);
    const T ds = static_cast<T>(Acc(grad_sigmas[i]) + g * Acc(trans_next));
    grad_sigmas[i] = ds * deltas[i];
    if (grad_deltas != nullptr) grad_deltas[i] = ds * sigmas[i];
    if (grad_ts != nullptr) grad_ts[i] = grads.depth * weights[i];
    if (grad_rgbs != nullptr) {
      for (int k = 0; k < channels; ++k) {
        grad_rgbs[i * channels + k] = grads.colour != nullptr ? grads.colour[k] * weights[i] : T(0);
      }
    }
  }
  for (int64_t i = stop; i < end; ++i) {
    grad_sigmas[i] = T(0);
    if (grad_deltas != nullptr) grad_deltas[i] = T(0);
    if (grad_ts != nullptr) grad_ts[i] = T(0);
    if (grad_rgbs != nullptr) {
      for (int k = 0; k < channels; ++k) grad_rgbs[i * channels + k] = T(0);
    }
  }
}

// Calls fn(std::integral_constant<int, K>) with K = channels for 1, 3 and 4, else 0.
// Host side only: it picks which kernel instantiation to run.
template <typename Fn>
inline void composite_dispatch_channels(int channels, Fn&& fn) {
  switch (channels) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

#if defined(AVATAR_WITH_CUDA) || defined(__CUDACC__)
// CUDA launchers (one thread per ray; raw pointers of `is_double ? double : float`,
// cudaStream_t as void*; return a cudaError_t as int). offsets: (n_rays + 1) int64.
int composite_forward_cuda(bool is_double, const void* sigmas, const void* rgbs,
                           const void* deltas, const void* ts, const int64_t* offsets,
                           int64_t n_rays, int channels, double threshold, void* weights,
                           void* opacity, void* depth, void* colour, int64_t* n_active,
                           void* stream);

// grad_weights and grad_colour may be null (zeros); grad_opacity, grad_depth are
// (n_rays) or null (zeros); grad_rgbs, grad_deltas, grad_ts may be null (not wanted).
int composite_backward_cuda(bool is_double, const void* grad_weights, const void* grad_opacity,
                            const void* grad_depth, const void* grad_colour, const void* sigmas,
                            const void* rgbs, const void* deltas, const void* ts,
                            const void* weights, const int64_t* offsets, const int64_t* n_active,
                            int64_t n_rays, int channels, void* grad_sigmas, void* grad_rgbs,
                            void* grad_deltas, void* grad_ts, void* stream);
#endif

}  // namespace avatar
