// Multi-resolution hash encoding (Muller et al. 2022, "Instant Neural Graphics
// Primitives with a Multiresolution Hash Encoding", Sec. 3), per-element math.
//
// The layout follows tiny-cuda-nn's HashGrid exactly, so a table trained by one
// engine is valid for the other:
//   scale_l      = 2^(l * log2(per_level_scale)) * base_resolution - 1   (float32)
//   resolution_l = ceil(scale_l) + 1                                       (vertices per axis)
//   size_l       = min(next_multiple(resolution_l^3, 8), 2^log2_hashmap_size)  (table rows)
//   offset_l     = sum of size_k for k < l; the table is (offset_L, F), level-major.
// A point x in [0,1]^3 sits at pos = x * scale_l + 0.5 in level l's grid (the
// 0.5 staggers the levels, paper appendix A); its cell is floor(pos) and the 8
// corners are interpolated trilinearly. A corner's row is dense (x + y*res +
// z*res^2) while resolution_l^3 fits size_l, the spatial hash of the paper's
// Eq. 4 otherwise (xor of coordinate * {1, 2654435761, 805459861}, uint32
// wrap-around), always modulo size_l. Inputs outside [0,1] are clamped.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "avatar/common.h"

namespace avatar {

constexpr int kHashGridMaxLevels = 32;

// Per-level constants, passed by value to kernels (fits the kernel parameter space).
struct HashGridLevels {
  int32_t n_levels;
  float scale[kHashGridMaxLevels];
  uint32_t resolution[kHashGridMaxLevels];
  uint32_t offset[kHashGridMaxLevels + 1];  // table rows; offset[n_levels] = total rows
};

// Dtypes the CUDA launchers accept for the table (the `.cu` side cannot see at::ScalarType).
enum class HashGridDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2 };

// A table entry as the compute type T. float16 entries convert through the
// documented cuda_fp16 intrinsic only: torch's JIT build defines
// __CUDA_NO_HALF_CONVERSIONS__ (and __CUDA_NO_HALF_OPERATORS__), which removes
// __half's implicit conversions and operators, so a static_cast does not compile.
template <typename T>
AVATAR_HD T hashgrid_entry(float v) {
  return static_cast<T>(v);
}
template <typename T>
AVATAR_HD T hashgrid_entry(double v) {
  return static_cast<T>(v);
}
#if defined(__CUDACC__)
template <typename T>
AVATAR_HD T hashgrid_entry(__half v) {
  return static_cast<T>(__half2float(v));
}
#endif

// Position of coordinate x in a level of float scale `scale`: cell index and fraction.
// x is clamped to [0, 1] (NaN counts as 0) so every row stays inside the table.
template <typename T>
AVATAR_HD void hashgrid_cell(T x, T scale, T& frac, uint32_t& cell) {
  if (!(x >= T(0))) x = T(0);
  if (x > T(1)) x = T(1);
  const T pos = x * scale + T(0.5);
  // pos >= 0.5, so truncation is floor (one instruction; floorf can be a libm
  // call on baseline x86-64 without SSE4.1).
  const int32_t fl = static_cast<int32_t>(pos);
  cell = static_cast<uint32_t>(fl);
  frac = pos - static_cast<T>(fl);
}

// d clamp(x) / dx as torch.clamp defines it: 1 on the closed interval [0, 1].
template <typename T>
AVATAR_HD T hashgrid_clamp_grad(T x) {
  return (x >= T(0) && x <= T(1)) ? T(1) : T(0);
}

// The 8 corners of point p's cell in one level: table rows (including the level
// offset) and trilinear weights. Corner c takes the upper vertex along axis d
// when bit d of c is set; weights multiply in axis order, as tcnn does.
template <typename T>
struct HashGridCorners {
  uint32_t row[8];
  T weight[8];
  T frac[3];
};

template <typename T>
AVATAR_HD void hashgrid_corners(const T* p, const HashGridLevels& lv, int level,
                                HashGridCorners<T>& out) {
  const T scale = static_cast<T>(lv.scale[level]);
  const uint32_t res = lv.resolution[level];
  const uint32_t base = lv.offset[level];
  const uint32_t size = lv.offset[level + 1] - base;
  uint32_t cell[3];
#pragma unroll
  for (int d = 0; d < 3; ++d) hashgrid_cell(p[d], scale, out.frac[d], cell[d]);
  // Rows as tcnn's grid_index, with the per-axis terms computed once per cell:
  // dense x + y*res + z*res^2, or the hash's xor of per-axis products. A hashed
  // level's size is 2^T, so its modulo is a mask. A dense index exceeds the size
  // only where the 0.5 offset reaches one vertex past the grid (tcnn wraps it);
  // coordinates are <= res, so index <= res^3 + res^2 + res < 2 * size and one
  // conditional subtraction is the modulo.
  const bool dense = static_cast<uint64_t>(res) * res * res <= static_cast<uint64_t>(size);
  uint32_t ax[2], ay[2], az[2];
  if (dense) {
    ax[0] = cell[0];
    ax[1] = cell[0] + 1;
    ay[0] = cell[1] * res;
    ay[1] = ay[0] + res;
    az[0] = cell[2] * res * res;
    az[1] = az[0] + res * res;
  } else {
    ax[0] = cell[0];
    ax[1] = cell[0] + 1;
    ay[0] = cell[1] * 2654435761u;
    ay[1] = (cell[1] + 1) * 2654435761u;
    az[0] = cell[2] * 805459861u;
    az[1] = (cell[2] + 1) * 805459861u;
  }
  T wx[2] = {T(1) - out.frac[0], out.frac[0]};
  T wy[2] = {T(1) - out.frac[1], out.frac[1]};
  T wz[2] = {T(1) - out.frac[2], out.frac[2]};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int bx = c & 1, by = (c >> 1) & 1, bz = (c >> 2) & 1;
    // Axis factors multiply in axis order, as tcnn does.
    out.weight[c] = wx[bx] * wy[by] * wz[bz];
    uint32_t index;
    if (dense) {
      index = ax[bx] + ay[by] + az[bz];
      index -= index >= size ? size : 0u;
    } else {
      index = (ax[bx] ^ ay[by] ^ az[bz]) & (size - 1);
    }
    out.row[c] = base + index;
  }
}

// out[f] = sum_c weight_c * table[row_c, f], corners summed in order c = 0..7.
template <int F, typename T, typename TT>
AVATAR_HD void hashgrid_gather(const HashGridCorners<T>& k, const TT* __restrict__ table,
                               T* __restrict__ out) {
  T acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = T(0);
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const TT* v = table + static_cast<int64_t>(k.row[c]) * F;
#pragma unroll
    for (int f = 0; f < F; ++f) acc[f] += k.weight[c] * hashgrid_entry<T>(v[f]);
  }
#pragma unroll
  for (int f = 0; f < F; ++f) out[f] = acc[f];
}

// Forward for one point and one level.
template <int F, typename T, typename TT>
AVATAR_HD void hashgrid_encode_level(const T* p, const HashGridLevels& lv, int level,
                                     const TT* __restrict__ table, T* __restrict__ out) {
  HashGridCorners<T> k;
  hashgrid_corners(p, lv, level, k);
  hashgrid_gather<F>(k, table, out);
}

// Gradient of one level's output with respect to the point p, contracted with the
// upstream gradient g (F values): adds d(g . out_l)/dp to grad_p[0..2].
// d weight_c / d frac_d = (+1 or -1) * product of the other two axis factors, and
// d frac_d / d p_d = scale (times the clamp's derivative).
template <int F, typename T, typename TT>
AVATAR_HD void hashgrid_point_grad(const T* p, const HashGridCorners<T>& k, T scale,
                                   const TT* __restrict__ table, const T* g, T* grad_p) {
  T acc[3] = {T(0), T(0), T(0)};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const TT* v = table + static_cast<int64_t>(k.row[c]) * F;
    T dot = T(0);
#pragma unroll
    for (int f = 0; f < F; ++f) dot += g[f] * hashgrid_entry<T>(v[f]);
    T factor[3];
#pragma unroll
    for (int d = 0; d < 3; ++d) factor[d] = (c & (1 << d)) ? k.frac[d] : T(1) - k.frac[d];
    const T s0 = (c & 1) ? T(1) : T(-1);
    const T s1 = (c & 2) ? T(1) : T(-1);
    const T s2 = (c & 4) ? T(1) : T(-1);
    acc[0] += s0 * factor[1] * factor[2] * dot;
    acc[1] += s1 * factor[0] * factor[2] * dot;
    acc[2] += s2 * factor[0] * factor[1] * dot;
  }
#pragma unroll
  for (int d = 0; d < 3; ++d) grad_p[d] += acc[d] * scale * hashgrid_clamp_grad(p[d]);
}

template <int F, typename T, typename TT>
AVATAR_HD void hashgrid_point_grad_level(const T* p, const HashGridLevels& lv, int level,
                                         const TT* __restrict__ table, const T* g, T* grad_p) {
  HashGridCorners<T> k;
  hashgrid_corners(p, lv, level, k);
  hashgrid_point_grad<F>(p, k, static_cast<T>(lv.scale[level]), table, g, grad_p);
}

#if defined(AVATAR_WITH_CUDA) || defined(__CUDACC__)
// CUDA launchers (raw pointers, cudaStream_t as void*; return a cudaError_t as int).
// points: (n, 3) of `points_double ? double : float`; table: (offset[L], F) of
// `table_dtype` (float16 only with float points); out: (n, L*F) of the point dtype.
int hashgrid_forward_cuda(const void* points, bool points_double, const void* table,
                          HashGridDtype table_dtype, void* out, int64_t n, int n_features,
                          const HashGridLevels& levels, void* stream);

// grad_table: (offset[L], F) zero-initialised accumulator of the point dtype (float
// for float16 tables; the caller casts). grad_points: (n, 3) or null.
int hashgrid_backward_cuda(const void* grad_out, const void* points, bool points_double,
                           const void* table, HashGridDtype table_dtype, void* grad_table,
                           void* grad_points, int64_t n, int n_features,
                           const HashGridLevels& levels, void* stream);
#endif

}  // namespace avatar
