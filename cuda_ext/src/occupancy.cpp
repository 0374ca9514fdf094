// Torch binding and CPU loop for occupancy-grid ray marching (math in
// include/avatar/occupancy.h, CUDA launchers in occupancy.cu). Two passes over
// the rays, both parallel: count the kept samples, then fill them at the offsets
// given by the prefix sum of the counts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "avatar/checks.h"
#include "avatar/occupancy.h"

#ifdef AVATAR_WITH_CUDA
// c10's stream and guard headers only: <ATen/cuda/CUDAContext.h> pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a toolkit with just nvcc and cudart lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace avatar {

// rays_o, rays_d: (R, 3); near, far, jitter: (R,), all of one float dtype (float32
// on CUDA); bitfield: (ceil(res^3 / 8),) uint8. Returns offsets (R + 1,) int64 and
// ts (S,) of the kept samples, packed ray after ray.
static std::tuple<at::Tensor, at::Tensor> occupancy_march(
    const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& near,
    const at::Tensor& far, const at::Tensor& jitter, const at::Tensor& bitfield,
    int64_t resolution, double step, int64_t max_samples) {
  AVATAR_CHECK_DIM(rays_o, 2);
  TORCH_CHECK(rays_o.size(1) == 3 && rays_d.sizes() == rays_o.sizes(),
              "occupancy_march: rays_o and rays_d must be (R, 3), got ", rays_o.sizes(), " and ",
              rays_d.sizes());
  const int64_t n_rays = rays_o.size(0);
  for (const at::Tensor* t : {&near, &far, &jitter}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n_rays, "occupancy_march: near, far and jitter must be (",
                n_rays, ",), got ", t->sizes());
  }
  const auto dtype = rays_o.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || (dtype == at::kDouble && !rays_o.is_cuda()),
              "occupancy_march: rays must be float32 (float64 on the CPU too), got ", dtype);
  for (const at::Tensor* t : {&rays_o, &rays_d, &near, &far, &jitter, &bitfield}) {
    TORCH_CHECK(t->is_contiguous() && t->device() == rays_o.device(),
                "occupancy_march: inputs must be contiguous and on one device");
  }
  for (const at::Tensor* t : {&rays_d, &near, &far, &jitter}) {
    TORCH_CHECK(t->scalar_type() == dtype, "occupancy_march: ray tensors must share a dtype");
  }
  AVATAR_CHECK_DTYPE(bitfield, at::kByte);
  AVATAR_CHECK_DIM(bitfield, 1);
  TORCH_CHECK(resolution >= 1 && resolution <= 2048, "occupancy_march: resolution must be in [1, 2048], got ",
              resolution);
  TORCH_CHECK(bitfield.numel() * 8 >= resolution * resolution * resolution,
              "occupancy_march: a ", resolution, "^3 grid needs ", (resolution * resolution * resolution + 7) / 8,
              " bitfield bytes, got ", bitfield.numel());
  TORCH_CHECK(step > 0.0, "occupancy_march: step must be > 0, got ", step);
  TORCH_CHECK(max_samples >= 0, "occupancy_march: max_samples must be >= 0");
  const int32_t res = static_cast<int32_t>(resolution);
  at::Tensor counts = at::empty({n_rays}, rays_o.options().dtype(at::kLong));
  if (rays_o.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(rays_o));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    int err = occupancy_march_count_cuda(
        rays_o.data_ptr<float>(), rays_d.data_ptr<float>(), near.data_ptr<float>(),
        far.data_ptr<float>(), jitter.data_ptr<float>(), bitfield.data_ptr<uint8_t>(), res,
        static_cast<float>(step), max_samples, n_rays, counts.data_ptr<int64_t>(), stream);
    TORCH_CHECK(err == 0, "occupancy_march: CUDA launch failed with error ", err);
    at::Tensor offsets = at::zeros({n_rays + 1}, counts.options());
    if (n_rays > 0) offsets.narrow(0, 1, n_rays).copy_(counts.cumsum(0));
    const int64_t total = n_rays > 0 ? offsets[n_rays].item<int64_t>() : 0;
    at::Tensor ts = at::empty({total}, rays_o.options());
    err = occupancy_march_fill_cuda(
        rays_o.data_ptr<float>(), rays_d.data_ptr<float>(), near.data_ptr<float>(),
        far.data_ptr<float>(), jitter.data_ptr<float>(), bitfield.data_ptr<uint8_t>(), res,
        static_cast<float>(step), max_samples, n_rays, offsets.data_ptr<int64_t>(),
        ts.data_ptr<float>(), stream);
    TORCH_CHECK(err == 0, "occupancy_march: CUDA launch failed with error ", err);
    return {offsets, ts};
#else
    TORCH_CHECK(false, "occupancy_march: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
  }
  at::Tensor offsets = at::zeros({n_rays + 1}, counts.options());
  at::Tensor ts;
  AT_DISPATCH_FLOATING_TYPES(dtype, "occupancy_march", [&] {
    const scalar_t* o = rays_o.data_ptr<scalar_t>();
    const scalar_t* d = rays_d.data_ptr<scalar_t>();
    const scalar_t* tn = near.data_ptr<scalar_t>();
    const scalar_t* tf = far.data_ptr<scalar_t>();
    const scalar_t* u = jitter.data_ptr<scalar_t>();
    const uint8_t* bits = bitfield.data_ptr<uint8_t>();
    const scalar_t st = static_cast<scalar_t>(step);
    int64_t* cnt = counts.data_ptr<int64_t>();
    at::parallel_for(0, n_rays, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        cnt[r] = occupancy_march_ray<scalar_t>(o[3 * r], o[3 * r + 1], o[3 * r + 2], d[3 * r],
                                               d[3 * r + 1], d[3 * r + 2], tn[r], tf[r], u[r], bits,
                                               res, st, max_samples, nullptr);
      }
    });
    int64_t* off = offsets.data_ptr<int64_t>();
    for (int64_t r = 0; r < n_rays; ++r) off[r + 1] = off[r] + cnt[r];
    ts = at::empty({off[n_rays]}, rays_o.options());
    scalar_t* out = ts.data_ptr<scalar_t>();
    at::parallel_for(0, n_rays, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        occupancy_march_ray<scalar_t>(o[3 * r], o[3 * r + 1], o[3 * r + 2], d[3 * r], d[3 * r + 1],
                                      d[3 * r + 2], tn[r], tf[r], u[r], bits, res, st, max_samples,
                                      out + off[r]);
      }
    });
  });
  return {offsets, ts};
}

}  // namespace avatar

TORCH_LIBRARY_FRAGMENT(avatar, m) {
  m.def(
      "occupancy_march(Tensor rays_o, Tensor rays_d, Tensor near, Tensor far, Tensor jitter, "
      "Tensor bitfield, int resolution, float step, int max_samples) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(avatar, CPU, m) { m.impl("occupancy_march", &avatar::occupancy_march); }

#ifdef AVATAR_WITH_CUDA
TORCH_LIBRARY_IMPL(avatar, CUDA, m) { m.impl("occupancy_march", &avatar::occupancy_march); }
#endif
