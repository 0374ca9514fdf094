// Torch binding and CPU loop for axpy (see include/avatar/axpy.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avatar/axpy.h"
#include "avatar/checks.h"

#ifdef AVATAR_WITH_CUDA
// c10's stream and guard headers only: <ATen/cuda/CUDAContext.h> pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a toolkit with just nvcc and cudart lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace avatar {

static at::Tensor axpy(const at::Tensor& x, const at::Tensor& y, double alpha) {
  AVATAR_CHECK_FLOAT_CONTIGUOUS(x);
  AVATAR_CHECK_FLOAT_CONTIGUOUS(y);
  TORCH_CHECK(x.sizes() == y.sizes(), "axpy: x and y must have the same shape, got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(x.device() == y.device(), "axpy: x and y must be on one device");
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  const float a = static_cast<float>(alpha);
  if (x.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    // Launch on x's device and its current stream (not device 0's).
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(x));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = axpy_cuda(a, x.data_ptr<float>(), y.data_ptr<float>(), out.data_ptr<float>(), n, stream);
    TORCH_CHECK(err == 0, "axpy: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "axpy: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return out;
  }
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = axpy_element(a, xp[i], yp[i]);
  });
  return out;
}

}  // namespace avatar

TORCH_LIBRARY_FRAGMENT(avatar, m) {
  m.def("axpy(Tensor x, Tensor y, float alpha) -> Tensor");
}

TORCH_LIBRARY_IMPL(avatar, CPU, m) { m.impl("axpy", &avatar::axpy); }

#ifdef AVATAR_WITH_CUDA
TORCH_LIBRARY_IMPL(avatar, CUDA, m) { m.impl("axpy", &avatar::axpy); }
#endif
