// CUDA launchers for the multi-resolution hash encoding (math in
// include/avatar/hashgrid.h). Depends only on the CUDA runtime and our headers.
//
// One thread per (point, level), the level in blockIdx.y as in tiny-cuda-nn, so a
// block reads a single level's slice of the table. The table gradient is
// accumulated with atomicAdd (order-dependent in the last bits, as in tcnn);
// float16 tables accumulate into a float32 buffer that the binding casts, and
// their entries are read with __half2float (torch's JIT flags disable __half's
// implicit conversions). Against the CPU engine: the same header math, but nvcc
// fuses multiply-adds, so outputs and gradients agree to a few ulps (rtol 1e-5,
// atol 1e-6 in float32), not bit for bit.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "avatar/hashgrid.h"

namespace avatar {
namespace {

template <int F, typename T, typename TT>
__global__ void hashgrid_forward_kernel(const T* __restrict__ points, const TT* __restrict__ table,
                                        T* __restrict__ out, int64_t n, HashGridLevels lv) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int level = static_cast<int>(blockIdx.y);
  hashgrid_encode_level<F>(points + 3 * i, lv, level, table,
                           out + i * static_cast<int64_t>(lv.n_levels) * F + level * F);
}

template <int F, typename T>
__global__ void hashgrid_backward_table_kernel(const T* __restrict__ grad_out,
                                               const T* __restrict__ points,
                                               T* __restrict__ grad_table, int64_t n,
                                               HashGridLevels lv) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int level = static_cast<int>(blockIdx.y);
  HashGridCorners<T> c;
  hashgrid_corners(points + 3 * i, lv, level, c);
  const T* g = grad_out + i * static_cast<int64_t>(lv.n_levels) * F + level * F;
  T gl[F];
#pragma unroll
  for (int f = 0; f < F; ++f) gl[f] = g[f];
#pragma unroll
  for (int corner = 0; corner < 8; ++corner) {
    T* dst = grad_table + static_cast<int64_t>(c.row[corner]) * F;
#pragma unroll
    for (int f = 0; f < F; ++f) atomicAdd(dst + f, c.weight[corner] * gl[f]);
  }
}

template <int F, typename T, typename TT>
__global__ void hashgrid_backward_points_kernel(const T* __restrict__ grad_out,
                                                const T* __restrict__ points,
                                                const TT* __restrict__ table,
                                                T* __restrict__ grad_points, int64_t n,
                                                HashGridLevels lv) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T gp[3] = {T(0), T(0), T(0)};
  const int64_t stride = static_cast<int64_t>(lv.n_levels) * F;
  for (int l = 0; l < lv.n_levels; ++l) {
    hashgrid_point_grad_level<F>(points + 3 * i, lv, l, table, grad_out + i * stride + l * F, gp);
  }
#pragma unroll
  for (int d = 0; d < 3; ++d) grad_points[3 * i + d] = gp[d];
}

template <int F, typename T, typename TT>
void launch_forward(const void* points, const void* table, void* out, int64_t n,
                    const HashGridLevels& lv, cudaStream_t stream) {
  const dim3 blocks(static_cast<unsigned int>(num_blocks(n)), static_cast<unsigned int>(lv.n_levels));
  hashgrid_forward_kernel<F, T, TT><<<blocks, kThreadsPerBlock, 0, stream>>>(
      static_cast<const T*>(points), static_cast<const TT*>(table), static_cast<T*>(out), n, lv);
}

template <int F, typename T, typename TT>
void launch_backward(const void* grad_out, const void* points, const void* table, void* grad_table,
                     void* grad_points, int64_t n, const HashGridLevels& lv, cudaStream_t stream) {
  if (grad_table != nullptr) {
    const dim3 blocks(static_cast<unsigned int>(num_blocks(n)),
                      static_cast<unsigned int>(lv.n_levels));
    hashgrid_backward_table_kernel<F, T><<<blocks, kThreadsPerBlock, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(points), static_cast<T*>(grad_table),
        n, lv);
  }
  if (grad_points != nullptr) {
    hashgrid_backward_points_kernel<F, T, TT>
        <<<static_cast<unsigned int>(num_blocks(n)), kThreadsPerBlock, 0, stream>>>(
            static_cast<const T*>(grad_out), static_cast<const T*>(points),
            static_cast<const TT*>(table), static_cast<T*>(grad_points), n, lv);
  }
}

// Launch closures for `dispatch` (local classes cannot have member templates).
struct ForwardLaunch {
  const void* points; const void* table; void* out; int64_t n;
  const HashGridLevels& lv; cudaStream_t stream;
  template <int F, typename T, typename TT>
  void operator()() const { launch_forward<F, T, TT>(points, table, out, n, lv, stream); }
};

struct BackwardLaunch {
  const void* grad_out; const void* points; const void* table; void* grad_table;
  void* grad_points; int64_t n; const HashGridLevels& lv; cudaStream_t stream;
  template <int F, typename T, typename TT>
  void operator()() const {
    launch_backward<F, T, TT>(grad_out, points, table, grad_table, grad_points, n, lv, stream);
  }
};

// Calls fn.template operator()<F, T, TT>() for the runtime feature count and dtypes.
template <typename Fn>
bool dispatch(int n_features, bool points_double, HashGridDtype table_dtype, Fn&& fn) {
  const auto by_features = [&](auto t_tag, auto tt_tag) {
    using T = decltype(t_tag);
    using TT = decltype(tt_tag);
    switch (n_features) {
      case 1: fn.template operator()<1, T, TT>(); return true;
      case 2: fn.template operator()<2, T, TT>(); return true;
      case 4: fn.template operator()<4, T, TT>(); return true;
      case 8: fn.template operator()<8, T, TT>(); return true;
      default: return false;
    }
  };
  if (points_double) {
    if (table_dtype != HashGridDtype::kFloat64) return false;
    return by_features(double{}, double{});
  }
  if (table_dtype == HashGridDtype::kFloat32) return by_features(float{}, float{});
  if (table_dtype == HashGridDtype::kFloat16) return by_features(float{}, __half{});
  return false;
}

}  // namespace

int hashgrid_forward_cuda(const void* points, bool points_double, const void* table,
                          HashGridDtype table_dtype, void* out, int64_t n, int n_features,
                          const HashGridLevels& levels, void* stream) {
  if (n == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  if (!dispatch(n_features, points_double, table_dtype,
                ForwardLaunch{points, table, out, n, levels, s})) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int hashgrid_backward_cuda(const void* grad_out, const void* points, bool points_double,
                           const void* table, HashGridDtype table_dtype, void* grad_table,
                           void* grad_points, int64_t n, int n_features,
                           const HashGridLevels& levels, void* stream) {
  if (n == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  if (!dispatch(n_features, points_double, table_dtype,
                BackwardLaunch{grad_out, points, table, grad_table, grad_points, n, levels, s})) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace avatar
