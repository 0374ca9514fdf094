// Occupancy-grid ray marching (Instant-NGP, Muller et al. 2022, Sec. 5.3 / App. E.2):
// a bitfield over a res^3 grid of the unit cube [0,1]^3 marks cells that may hold
// density; marching places samples only in marked cells and jumps over empty ones.
//
// Cell (ix, iy, iz) = floor(p * res), clamped to res - 1 so that p = 1 belongs to
// the last cell; its bit is flat = (ix * res + iy) * res + iz, stored in byte
// flat >> 3 at bit flat & 7 (the order of a (res, res, res) tensor indexed
// [ix, iy, iz]). Points outside the closed unit cube are empty.
//
// Samples of a ray are the fixed lattice t_k = near + (k + u) * step, k >= 0,
// t_k < far (u in [0, 1) a per-ray jitter); a sample is kept if its point
// o + t_k d is in an occupied cell, at most max_samples per ray. Skipping empty
// space only decides which lattice points to test: a jump never passes a sample
// less than one step before the empty cell's exit, and that sample is tested, so
// the kept samples are exactly those of testing every lattice point (what the
// PyTorch reference does).
#pragma once

#include <cmath>

#include "avatar/common.h"

namespace avatar {

AVATAR_HD float march_floor(float x) { return floorf(x); }
AVATAR_HD double march_floor(double x) { return floor(x); }
AVATAR_HD float march_ceil(float x) { return ceilf(x); }
AVATAR_HD double march_ceil(double x) { return ceil(x); }

template <typename T>
AVATAR_HD bool occupancy_cell(const uint8_t* __restrict__ bits, int32_t res, T px, T py, T pz,
                              int32_t& ix, int32_t& iy, int32_t& iz) {
  if (!(px >= T(0) && px <= T(1) && py >= T(0) && py <= T(1) && pz >= T(0) && pz <= T(1))) {
    ix = iy = iz = -1;
    return false;
  }
  const T r = static_cast<T>(res);
  ix = static_cast<int32_t>(px * r);  // floor: the coordinate is >= 0
  iy = static_cast<int32_t>(py * r);
  iz = static_cast<int32_t>(pz * r);
  ix = ix < res ? ix : res - 1;
  iy = iy < res ? iy : res - 1;
  iz = iz < res ? iz : res - 1;
  const int64_t flat = (static_cast<int64_t>(ix) * res + iy) * res + iz;
  return (bits[flat >> 3] >> (flat & 7)) & 1;
}

// Ray parameter where the ray leaves cell (ix, iy, iz) (slab test on the cell box).
template <typename T>
AVATAR_HD T occupancy_cell_exit(int32_t res, T ox, T oy, T oz, T dx, T dy, T dz, int32_t ix,
                                int32_t iy, int32_t iz) {
  const T r = static_cast<T>(res);
  T t_exit = T(INFINITY);
  const T o[3] = {ox, oy, oz};
  const T d[3] = {dx, dy, dz};
  const int32_t c[3] = {ix, iy, iz};
  for (int a = 0; a < 3; ++a) {
    if (d[a] > T(0)) {
      const T t = (static_cast<T>(c[a] + 1) / r - o[a]) / d[a];
      t_exit = t < t_exit ? t : t_exit;
    } else if (d[a] < T(0)) {
      const T t = (static_cast<T>(c[a]) / r - o[a]) / d[a];
      t_exit = t < t_exit ? t : t_exit;
    }
  }
  return t_exit;
}

// Parameter interval [t0, t1] of the ray inside the unit cube; false if it misses.
template <typename T>
AVATAR_HD bool occupancy_unit_box(T ox, T oy, T oz, T dx, T dy, T dz, T& t0, T& t1) {
  const T o[3] = {ox, oy, oz};
  const T d[3] = {dx, dy, dz};
  t0 = T(-INFINITY);
  t1 = T(INFINITY);
  for (int a = 0; a < 3; ++a) {
    if (d[a] == T(0)) {
      if (o[a] < T(0) || o[a] > T(1)) return false;
      continue;
    }
    T ta = (T(0) - o[a]) / d[a];
    T tb = (T(1) - o[a]) / d[a];
    if (ta > tb) {
      const T tmp = ta;
      ta = tb;
      tb = tmp;
    }
    t0 = ta > t0 ? ta : t0;
    t1 = tb < t1 ? tb : t1;
  }
  return t0 <= t1;
}

// Marches one ray. Writes the kept sample parameters to ts_out (if not null) and
// returns how many were kept.
template <typename T>
AVATAR_HD int64_t occupancy_march_ray(T ox, T oy, T oz, T dx, T dy, T dz, T near, T far, T jitter,
                                      const uint8_t* __restrict__ bits, int32_t res, T step,
                                      int64_t max_samples, T* __restrict__ ts_out) {
  T box0, box1;
  if (max_samples <= 0 || !(far > near) ||
      !occupancy_unit_box(ox, oy, oz, dx, dy, dz, box0, box1)) {
    return 0;
  }
  // Lattice range that can meet the cube, widened by a sample each side; every
  // sample in it is still tested, so the widening only costs a few tests.
  const T k_lo = march_floor((box0 - near) / step - jitter) - T(1);
  T k_hi = march_ceil((box1 - near) / step - jitter) + T(1);
  const T k_far = march_ceil((far - near) / step - jitter) + T(1);  // finite: checked at the door
  k_hi = k_far < k_hi ? k_far : k_hi;
  if (!(k_hi >= T(0))) return 0;
  int64_t k = k_lo > T(0) ? static_cast<int64_t>(k_lo) : 0;
  const int64_t k_end = static_cast<int64_t>(k_hi);
  int64_t kept = 0;
  while (k <= k_end) {
    const T t = (static_cast<T>(k) + jitter) * step + near;
    if (!(t < far)) break;
    const T px = ox + t * dx;
    const T py = oy + t * dy;
    const T pz = oz + t * dz;
    int32_t ix, iy, iz;
    if (occupancy_cell(bits, res, px, py, pz, ix, iy, iz)) {
      if (ts_out != nullptr) ts_out[kept] = t;
      if (++kept >= max_samples) break;
      ++k;
      continue;
    }
    int64_t next = k + 1;
    if (ix >= 0) {
      // Empty cell: jump to one sample before the first lattice point past its exit.
      const T t_exit = occupancy_cell_exit(res, ox, oy, oz, dx, dy, dz, ix, iy, iz);
      const T k_exit = march_ceil((t_exit - near) / step - jitter) - T(1);
      if (k_exit > static_cast<T>(next)) {
        next = k_exit < static_cast<T>(k_end) ? static_cast<int64_t>(k_exit) : k_end + 1;
      }
    }
    k = next;
  }
  return kept;
}

#if defined(AVATAR_WITH_CUDA) || defined(__CUDACC__)
// CUDA launchers (one thread per ray; float32 rays; cudaStream_t as void*; return a
// cudaError_t as int). Count pass: counts (n_rays) int64. Fill pass: ts at offsets.
int occupancy_march_count_cuda(const float* rays_o, const float* rays_d, const float* near,
                               const float* far, const float* jitter, const uint8_t* bits,
                               int32_t res, float step, int64_t max_samples, int64_t n_rays,
                               int64_t* counts, void* stream);

int occupancy_march_fill_cuda(const float* rays_o, const float* rays_d, const float* near,
                              const float* far, const float* jitter, const uint8_t* bits,
                              int32_t res, float step, int64_t max_samples, int64_t n_rays,
                              const int64_t* offsets, float* ts, void* stream);
#endif

}  // namespace avatar
