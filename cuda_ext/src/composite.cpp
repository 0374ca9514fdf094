// Torch bindings and CPU loops for ray compositing (math in
// include/avatar/composite.h, CUDA launchers in composite.cu). Rays are
// independent, so the CPU loop is a parallel_for over rays; each ray is walked
// sequentially with double accumulators.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "avatar/checks.h"
#include "avatar/composite.h"

#ifdef AVATAR_WITH_CUDA
// c10's stream and guard headers only: <ATen/cuda/CUDAContext.h> pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a toolkit with just nvcc and cudart lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace avatar {
namespace {

constexpr int64_t kRayGrain = 64;

// Checks the packed-sample inputs; returns the number of colour channels.
int64_t check_samples(const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& deltas,
                      const at::Tensor& ts, const at::Tensor& offsets) {
  AVATAR_CHECK_DIM(sigmas, 1);
  AVATAR_CHECK_DIM(deltas, 1);
  AVATAR_CHECK_DIM(ts, 1);
  AVATAR_CHECK_DIM(rgbs, 2);
  AVATAR_CHECK_DIM(offsets, 1);
  const int64_t n = sigmas.size(0);
  TORCH_CHECK(deltas.size(0) == n && ts.size(0) == n && rgbs.size(0) == n,
              "composite: sigmas, deltas, ts (S,) and rgbs (S, C) must have one sample count, got ",
              sigmas.sizes(), ", ", deltas.sizes(), ", ", ts.sizes(), ", ", rgbs.sizes());
  TORCH_CHECK(rgbs.size(1) >= 1 && rgbs.size(1) <= kCompositeMaxChannels,
              "composite: rgbs must have 1 to ", kCompositeMaxChannels, " channels, got ",
              rgbs.size(1));
  TORCH_CHECK(offsets.size(0) >= 1, "composite: offsets must be (R + 1,), got ", offsets.sizes());
  AVATAR_CHECK_DTYPE(offsets, at::kLong);
  const auto dtype = sigmas.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "composite: samples must be float32 or float64, got ", dtype);
  for (const at::Tensor* t : {&sigmas, &rgbs, &deltas, &ts, &offsets}) {
    TORCH_CHECK(t->is_contiguous(), "composite: inputs must be contiguous");
    TORCH_CHECK(t->device() == sigmas.device(), "composite: inputs must be on one device");
  }
  for (const at::Tensor* t : {&rgbs, &deltas, &ts}) {
    TORCH_CHECK(t->scalar_type() == dtype, "composite: sigmas, rgbs, deltas and ts must share a dtype");
  }
  return rgbs.size(1);
}

// Offsets index raw memory, so the CPU path verifies them (O(R); the CUDA path
// relies on the Python wrapper, which checks them before any launch).
void check_offsets_cpu(const at::Tensor& offsets, int64_t n_samples) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t n_rays = offsets.size(0) - 1;
  TORCH_CHECK(off[0] == 0 && off[n_rays] == n_samples,
              "composite: offsets must start at 0 and end at the sample count ", n_samples,
              ", got ", off[0], " and ", off[n_rays]);
  for (int64_t r = 0; r < n_rays; ++r) {
    TORCH_CHECK(off[r + 1] >= off[r], "composite: offsets must be non-decreasing (ray ", r, ")");
  }
}

}  // namespace

// sigmas, deltas, ts: (S,); rgbs: (S, C); offsets: (R + 1,) int64, non-decreasing,
// offsets[0] = 0, offsets[R] = S (not re-checked per element: the Python wrapper
// validates them). Returns weights (S,), opacity (R,), depth (R,), colour (R, C),
// n_active (R,) int64 (samples before early termination).
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_forward(
    const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& deltas,
    const at::Tensor& ts, const at::Tensor& offsets, double threshold) {
  const int64_t channels = check_samples(sigmas, rgbs, deltas, ts, offsets);
  const int64_t n_rays = offsets.size(0) - 1;
  at::Tensor weights = at::empty_like(sigmas);
  at::Tensor opacity = at::empty({n_rays}, sigmas.options());
  at::Tensor depth = at::empty({n_rays}, sigmas.options());
  at::Tensor colour = at::empty({n_rays, channels}, sigmas.options());
  at::Tensor n_active = at::empty({n_rays}, offsets.options());
  if (n_rays == 0) {
    TORCH_CHECK(sigmas.size(0) == 0, "composite: no rays but ", sigmas.size(0), " samples");
    return {weights, opacity, depth, colour, n_active};
  }
  if (sigmas.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(sigmas));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = composite_forward_cuda(
        sigmas.scalar_type() == at::kDouble, sigmas.data_ptr(), rgbs.data_ptr(), deltas.data_ptr(),
        ts.data_ptr(), offsets.data_ptr<int64_t>(), n_rays, static_cast<int>(channels), threshold,
        weights.data_ptr(), opacity.data_ptr(), depth.data_ptr(), colour.data_ptr(),
        n_active.data_ptr<int64_t>(), stream);
    TORCH_CHECK(err == 0, "composite_forward: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "composite: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return {weights, opacity, depth, colour, n_active};
  }
  check_offsets_cpu(offsets, sigmas.size(0));
  const int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* active = n_active.data_ptr<int64_t>();
  const int c = static_cast<int>(channels);
  AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_forward", [&] {
    const scalar_t* sp = sigmas.data_ptr<scalar_t>();
    const scalar_t* cp = rgbs.data_ptr<scalar_t>();
    const scalar_t* dp = deltas.data_ptr<scalar_t>();
    const scalar_t* tp = ts.data_ptr<scalar_t>();
    scalar_t* wp = weights.data_ptr<scalar_t>();
    scalar_t* op = opacity.data_ptr<scalar_t>();
    scalar_t* zp = depth.data_ptr<scalar_t>();
    scalar_t* rp = colour.data_ptr<scalar_t>();
    const scalar_t thr = static_cast<scalar_t>(threshold);
    composite_dispatch_channels(c, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      at::parallel_for(0, n_rays, kRayGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          active[r] = composite_ray_forward<scalar_t, double, K>(
              sp, cp, dp, tp, off[r], off[r + 1], c, thr, wp, op + r, zp + r, rp + r * c);
        }
      });
    });
  });
  return {weights, opacity, depth, colour, n_active};
}

// Gradients with respect to sigmas, rgbs, deltas and ts given the gradients of
// the forward's weights (S,), opacity (R,), depth (R,) and colour (R, C). An
// empty upstream gradient stands for zeros (an output the loss does not use);
// a gradient not asked for (need_*) is returned empty.
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_backward(
    const at::Tensor& grad_weights, const at::Tensor& grad_opacity, const at::Tensor& grad_depth,
    const at::Tensor& grad_colour, const at::Tensor& sigmas, const at::Tensor& rgbs,
    const at::Tensor& deltas, const at::Tensor& ts, const at::Tensor& offsets,
    const at::Tensor& weights, const at::Tensor& n_active, bool need_rgbs, bool need_deltas,
    bool need_ts) {
  const int64_t channels = check_samples(sigmas, rgbs, deltas, ts, offsets);
  const int64_t n_rays = offsets.size(0) - 1;
  const int64_t n = sigmas.size(0);
  TORCH_CHECK(weights.sizes() == sigmas.sizes(), "composite_backward: weights must be (S,)");
  TORCH_CHECK(grad_weights.numel() == 0 || grad_weights.sizes() == sigmas.sizes(),
              "composite_backward: grad_weights must be (S,) or empty");
  TORCH_CHECK(grad_opacity.numel() == 0 || (grad_opacity.dim() == 1 && grad_opacity.size(0) == n_rays),
              "composite_backward: grad_opacity must be (R,) or empty");
  TORCH_CHECK(grad_depth.numel() == 0 || (grad_depth.dim() == 1 && grad_depth.size(0) == n_rays),
              "composite_backward: grad_depth must be (R,) or empty");
  TORCH_CHECK(grad_colour.numel() == 0 || (grad_colour.dim() == 2 && grad_colour.size(0) == n_rays &&
                                           grad_colour.size(1) == channels),
              "composite_backward: grad_colour must be (R, C) or empty");
  TORCH_CHECK(n_active.dim() == 1 && n_active.size(0) == n_rays,
              "composite_backward: n_active must be (R,)");
  AVATAR_CHECK_DTYPE(n_active, at::kLong);
  for (const at::Tensor* t : {&grad_weights, &grad_opacity, &grad_depth, &grad_colour, &weights}) {
    TORCH_CHECK(t->scalar_type() == sigmas.scalar_type() && t->is_contiguous() &&
                    t->device() == sigmas.device(),
                "composite_backward: gradients must be contiguous, of the samples' dtype and device");
  }
  TORCH_CHECK(n_active.is_contiguous() && n_active.device() == sigmas.device(),
              "composite_backward: n_active must be contiguous on the samples' device");
  at::Tensor grad_sigmas = at::empty_like(sigmas);
  at::Tensor grad_rgbs = need_rgbs ? at::empty_like(rgbs) : at::empty({0}, rgbs.options());
  at::Tensor grad_deltas = need_deltas ? at::empty_like(deltas) : at::empty({0}, deltas.options());
  at::Tensor grad_ts = need_ts ? at::empty_like(ts) : at::empty({0}, ts.options());
  if (n_rays == 0 || n == 0) return {grad_sigmas, grad_rgbs, grad_deltas, grad_ts};
  const auto ptr_or_null = [](const at::Tensor& t) -> const void* {
    return t.numel() > 0 ? t.data_ptr() : nullptr;
  };
  if (sigmas.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(sigmas));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = composite_backward_cuda(
        sigmas.scalar_type() == at::kDouble, ptr_or_null(grad_weights), ptr_or_null(grad_opacity),
        ptr_or_null(grad_depth), ptr_or_null(grad_colour), sigmas.data_ptr(), rgbs.data_ptr(),
        deltas.data_ptr(), ts.data_ptr(), weights.data_ptr(), offsets.data_ptr<int64_t>(),
        n_active.data_ptr<int64_t>(), n_rays, static_cast<int>(channels), grad_sigmas.data_ptr(),
        need_rgbs ? grad_rgbs.data_ptr() : nullptr, need_deltas ? grad_deltas.data_ptr() : nullptr,
        need_ts ? grad_ts.data_ptr() : nullptr, stream);
    TORCH_CHECK(err == 0, "composite_backward: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "composite: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return {grad_sigmas, grad_rgbs, grad_deltas, grad_ts};
  }
  check_offsets_cpu(offsets, n);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* active = n_active.data_ptr<int64_t>();
  const int c = static_cast<int>(channels);
  AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_backward", [&] {
    const auto* gw = static_cast<const scalar_t*>(ptr_or_null(grad_weights));
    const auto* go = static_cast<const scalar_t*>(ptr_or_null(grad_opacity));
    const auto* gd = static_cast<const scalar_t*>(ptr_or_null(grad_depth));
    const auto* gc = static_cast<const scalar_t*>(ptr_or_null(grad_colour));
    const scalar_t* sp = sigmas.data_ptr<scalar_t>();
    const scalar_t* cp = rgbs.data_ptr<scalar_t>();
    const scalar_t* dp = deltas.data_ptr<scalar_t>();
    const scalar_t* tp = ts.data_ptr<scalar_t>();
    const scalar_t* wp = weights.data_ptr<scalar_t>();
    scalar_t* gs = grad_sigmas.data_ptr<scalar_t>();
    scalar_t* grgb = need_rgbs ? grad_rgbs.data_ptr<scalar_t>() : nullptr;
    scalar_t* gdel = need_deltas ? grad_deltas.data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = need_ts ? grad_ts.data_ptr<scalar_t>() : nullptr;
    composite_dispatch_channels(c, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      at::parallel_for(0, n_rays, kRayGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const CompositeRayGrads<scalar_t> grads{gw, go != nullptr ? go[r] : scalar_t(0),
                                                  gd != nullptr ? gd[r] : scalar_t(0),
                                                  gc != nullptr ? gc + r * c : nullptr};
          composite_ray_backward<scalar_t, double, K>(grads, sp, cp, dp, tp, wp, off[r],
                                                      off[r + 1], active[r], c, gs, grgb, gdel, gt);
        }
      });
    });
  });
  return {grad_sigmas, grad_rgbs, grad_deltas, grad_ts};
}

}  // namespace avatar

TORCH_LIBRARY_FRAGMENT(avatar, m) {
  m.def(
      "composite_forward(Tensor sigmas, Tensor rgbs, Tensor deltas, Tensor ts, Tensor offsets, "
      "float threshold) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "composite_backward(Tensor grad_weights, Tensor grad_opacity, Tensor grad_depth, "
      "Tensor grad_colour, Tensor sigmas, Tensor rgbs, Tensor deltas, Tensor ts, Tensor offsets, "
      "Tensor weights, Tensor n_active, bool need_rgbs, bool need_deltas, bool need_ts) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(avatar, CPU, m) {
  m.impl("composite_forward", &avatar::composite_forward);
  m.impl("composite_backward", &avatar::composite_backward);
}

#ifdef AVATAR_WITH_CUDA
TORCH_LIBRARY_IMPL(avatar, CUDA, m) {
  m.impl("composite_forward", &avatar::composite_forward);
  m.impl("composite_backward", &avatar::composite_backward);
}
#endif
