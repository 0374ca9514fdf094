// Torch bindings and CPU loops for the multi-resolution hash encoding
// (math in include/avatar/hashgrid.h, CUDA launchers in hashgrid.cu).
//
// CPU strategy (details at each loop):
// - forward: tasks of (level, chunk of points), finest level first, into a
//   level-major scratch that is transposed at the end;
// - backward: the upstream gradient is first transposed to the same level-major
//   layout, so every level reads its slice contiguously;
// - backward to the table: one task per level. Levels own disjoint row ranges,
//   so accumulation is race-free without atomics or per-thread table copies,
//   and bitwise deterministic for any thread count;
// - backward to the points: tasks of chunks of points, all levels each;
// - large outputs and scratch buffers ask for transparent huge pages.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "avatar/checks.h"
#include "avatar/hashgrid.h"

#ifdef AVATAR_WITH_CUDA
// c10's stream and guard headers only: <ATen/cuda/CUDAContext.h> pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a toolkit with just nvcc and cudart lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace avatar {
namespace {

// Points per task of the forward and point-gradient loops: large, so that one
// level's slice of the table (a few MiB) serves many points from the caches (and
// the TLB) before another level's evicts it.
constexpr int64_t kTaskPoints = 1 << 15;

HashGridLevels make_levels(at::IntArrayRef offsets, at::ArrayRef<double> scales,
                           at::IntArrayRef resolutions, int64_t table_rows) {
  const int64_t n_levels = static_cast<int64_t>(scales.size());
  TORCH_CHECK(n_levels >= 1 && n_levels <= kHashGridMaxLevels,
              "hashgrid: the number of levels must be in [1, ", kHashGridMaxLevels, "], got ",
              n_levels);
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == n_levels + 1,
              "hashgrid: offsets must have n_levels + 1 = ", n_levels + 1, " entries, got ",
              offsets.size());
  TORCH_CHECK(static_cast<int64_t>(resolutions.size()) == n_levels,
              "hashgrid: resolutions must have n_levels = ", n_levels, " entries, got ",
              resolutions.size());
  TORCH_CHECK(offsets[0] == 0, "hashgrid: offsets[0] must be 0");
  TORCH_CHECK(offsets[n_levels] == table_rows, "hashgrid: the layout needs a table of ",
              offsets[n_levels], " rows, got ", table_rows);
  TORCH_CHECK(table_rows <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()),
              "hashgrid: table too large (rows must fit 32 bits)");
  HashGridLevels lv{};
  lv.n_levels = static_cast<int32_t>(n_levels);
  for (int64_t l = 0; l < n_levels; ++l) {
    TORCH_CHECK(offsets[l + 1] > offsets[l], "hashgrid: offsets must increase, got ", offsets);
    TORCH_CHECK(resolutions[l] >= 2 && scales[l] > 0.0 && scales[l] < 1048576.0 &&
                    resolutions[l] <= static_cast<int64_t>(scales[l]) + 2,
                "hashgrid: level ", l, " needs 0 < scale < 2^20 and 2 <= resolution <= scale + 2, got ",
                scales[l], " and ", resolutions[l]);
    const int64_t size = offsets[l + 1] - offsets[l];
    const bool hashed = resolutions[l] * resolutions[l] * resolutions[l] > size;
    TORCH_CHECK(!hashed || (size & (size - 1)) == 0, "hashgrid: hashed level ", l,
                " must have a power-of-two row count (2^log2_hashmap_size), got ", size);
    lv.scale[l] = static_cast<float>(scales[l]);
    lv.resolution[l] = static_cast<uint32_t>(resolutions[l]);
    lv.offset[l] = static_cast<uint32_t>(offsets[l]);
  }
  lv.offset[n_levels] = static_cast<uint32_t>(offsets[n_levels]);
  return lv;
}

void check_inputs(const at::Tensor& points, const at::Tensor& table) {
  AVATAR_CHECK_DIM(points, 2);
  TORCH_CHECK(points.size(1) == 3, "hashgrid: points must be (N, 3), got ", points.sizes());
  AVATAR_CHECK_CONTIGUOUS(points);
  AVATAR_CHECK_DIM(table, 2);
  AVATAR_CHECK_CONTIGUOUS(table);
  AVATAR_CHECK_SAME_DEVICE(points, table);
  const int64_t f = table.size(1);
  TORCH_CHECK(f == 1 || f == 2 || f == 4 || f == 8,
              "hashgrid: features per level (table.shape[1]) must be 1, 2, 4 or 8, got ", f);
  const auto pt = points.scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kDouble,
              "hashgrid: points must be float32 or float64, got ", pt);
  const auto tt = table.scalar_type();
  if (tt == at::kHalf) {
    TORCH_CHECK(table.is_cuda() && pt == at::kFloat,
                "hashgrid: a float16 table is supported on CUDA with float32 points only "
                "(got device ", table.device(), ", points ", pt, ")");
  } else {
    TORCH_CHECK(tt == pt, "hashgrid: table dtype (", tt, ") must match points dtype (", pt, ")");
  }
}

// The big buffers of a call (the (N, L*F) output, the level-major scratch, the
// table gradient: ~140 MiB per forward+backward at 2^18 points, L=16, F=2, T=19)
// are fresh memory, faulted in on first touch: with 4 KiB pages, one page fault
// per 4 KiB, a large share of the call's time (more in a VM), and the rows
// scattered over a level's slice miss the TLB. Asking for transparent huge pages
// on the 2 MiB-aligned interior makes it one fault per 2 MiB; torch's own CPU
// allocator does the same under THP_MEM_ALLOC_ENABLE=1.
// It is advice: results never depend on it, and where THP is off (or not Linux)
// nothing changes. Buffers below kHugePageMinBytes are left alone, as they may
// share heap pages with other allocations.
constexpr int64_t kHugePageBytes = int64_t(2) << 20;
constexpr int64_t kHugePageMinBytes = int64_t(8) << 20;

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (!t.is_cpu() || bytes < kHugePageMinBytes) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + kHugePageBytes - 1) & ~uintptr_t(kHugePageBytes - 1);
  const uintptr_t last = (start + bytes) & ~uintptr_t(kHugePageBytes - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

template <typename Fn>
void dispatch_features(int64_t f, Fn&& fn) {
  switch (f) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "hashgrid: unsupported features per level ", f);
  }
}

// The hashed levels are far larger than the caches and their rows are scattered,
// so the CPU loops are bound by memory latency. Per level they work in small
// batches of points: the corners of the next batch are computed and their rows
// prefetched while the current batch is consumed (a two-stage software pipeline),
// which keeps many cache misses in flight instead of one at a time. Levels whose
// slice fits the L2 cache skip the pipeline (it would only cost instructions).
#if defined(__GNUC__) || defined(__clang__)
#define AVATAR_PREFETCH_READ(ptr) __builtin_prefetch((ptr), 0, 1)
#define AVATAR_PREFETCH_WRITE(ptr) __builtin_prefetch((ptr), 1, 1)
#else
#define AVATAR_PREFETCH_READ(ptr) ((void)(ptr))
#define AVATAR_PREFETCH_WRITE(ptr) ((void)(ptr))
#endif

constexpr int64_t kBatch = 16;
constexpr int64_t kCachedLevelBytes = 256 * 1024;

// Corners of points [i0, i1) in `level` into `buf`, prefetching their table rows.
template <int F, bool kWrite, typename T, typename TT>
inline void corners_batch(const T* points, int64_t i0, int64_t i1, const HashGridLevels& lv,
                          int level, const TT* table, HashGridCorners<T>* buf) {
  for (int64_t i = i0; i < i1; ++i) {
    HashGridCorners<T>& c = buf[i - i0];
    hashgrid_corners(points + 3 * i, lv, level, c);
    for (int corner = 0; corner < 8; ++corner) {
      const TT* row = table + static_cast<int64_t>(c.row[corner]) * F;
      if (kWrite) {
        AVATAR_PREFETCH_WRITE(row);
      } else {
        AVATAR_PREFETCH_READ(row);
      }
    }
  }
}

// Runs consume(i, corners_of_i) for i in [begin, end) of one level, in order.
template <int F, bool kWrite, typename T, typename TT, typename Consume>
inline void for_each_corners(const T* points, int64_t begin, int64_t end, const HashGridLevels& lv,
                             int level, const TT* table, Consume&& consume) {
  const int64_t level_bytes =
      static_cast<int64_t>(lv.offset[level + 1] - lv.offset[level]) * F * sizeof(TT);
  if (level_bytes <= kCachedLevelBytes) {
    for (int64_t i = begin; i < end; ++i) {
      HashGridCorners<T> c;
      hashgrid_corners(points + 3 * i, lv, level, c);
      consume(i, c);
    }
    return;
  }
  HashGridCorners<T> buf[2][kBatch];
  int cur = 0;
  int64_t b0 = begin;
  int64_t b1 = std::min(end, begin + kBatch);
  if (b0 < b1) corners_batch<F, kWrite>(points, b0, b1, lv, level, table, buf[cur]);
  while (b0 < b1) {
    const int64_t n0 = b1;
    const int64_t n1 = std::min(end, b1 + kBatch);
    if (n0 < n1) corners_batch<F, kWrite>(points, n0, n1, lv, level, table, buf[cur ^ 1]);
    for (int64_t i = b0; i < b1; ++i) consume(i, buf[cur][i - b0]);
    cur ^= 1;
    b0 = n0;
    b1 = n1;
  }
}

// Runs task(k) for k in [0, n_tasks) on the intra-op threads, handing tasks out
// in order from a shared counter (so threads finish together however uneven the
// tasks). Which thread runs a task never changes its result.
template <typename Task>
void run_tasks(int64_t n_tasks, Task&& task) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < n_tasks; k = next.fetch_add(1)) task(k);
  });
}

// Between the (N, L*F) layout of the op's input/output and the level-major (L, N, F)
// layout the level loops stream (for L=16, F=2 a point-major read of one level pulls
// 64 bytes to use 8), in cache-sized tiles of points. kToLevelMajor: (N, L*F) -> (L, N, F),
// else the reverse.
template <int F, bool kToLevelMajor, typename T>
void transpose_levels(const T* src, T* dst, int64_t n, int n_levels) {
  const int64_t stride = static_cast<int64_t>(n_levels) * F;
  constexpr int64_t kTile = 256;
  at::parallel_for(0, (n + kTile - 1) / kTile, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kTile;
      const int64_t i1 = std::min(n, i0 + kTile);
      for (int l = 0; l < n_levels; ++l) {
        const int64_t level = static_cast<int64_t>(l) * n * F;
        for (int64_t i = i0; i < i1; ++i) {
          for (int f = 0; f < F; ++f) {
            if constexpr (kToLevelMajor) {
              dst[level + i * F + f] = src[i * stride + l * F + f];
            } else {
              dst[i * stride + l * F + f] = src[level + i * F + f];
            }
          }
        }
      }
    }
  });
}

// Forward. Tasks are (level, chunk of points), finest level first, so threads
// share one level's slice of the table in the caches at a time; each writes its
// outputs contiguously into a level-major scratch (L, N, F), which is then
// transposed to the (N, L*F) result in cache-sized tiles.
template <int F, typename T>
void forward_cpu(const T* points, const T* table, T* out, T* level_major, int64_t n,
                 const HashGridLevels& lv) {
  const int n_levels = lv.n_levels;
  const int64_t chunks = (n + kTaskPoints - 1) / kTaskPoints;
  run_tasks(n_levels * chunks, [&](int64_t k) {
    const int l = n_levels - 1 - static_cast<int>(k / chunks);
    const int64_t begin = (k % chunks) * kTaskPoints;
    const int64_t end = std::min(n, begin + kTaskPoints);
    T* dst = level_major + static_cast<int64_t>(l) * n * F;
    for_each_corners<F, false>(points, begin, end, lv, l, table,
                               [&](int64_t i, const HashGridCorners<T>& c) {
                                 hashgrid_gather<F>(c, table, dst + i * F);
                               });
  });
  transpose_levels<F, false>(level_major, out, n, n_levels);
}

// Backward to the table. Levels own disjoint row ranges, so each level is one
// task: accumulated by one thread, in point order. No atomics, no per-thread
// copies of the table, and bitwise the same result for any thread count.
// grad_lm: the upstream gradient, level-major (L, N, F).
template <int F, typename T>
void backward_table_cpu(const T* grad_lm, const T* points, T* grad_table, int64_t n,
                        const HashGridLevels& lv) {
  const int n_levels = lv.n_levels;
  run_tasks(n_levels, [&](int64_t k) {
    const int l = n_levels - 1 - static_cast<int>(k);
    // The worker zeroes its own level's rows (the caller passes uninitialised
    // memory), so the slice is faulted in and hot in cache when accumulation starts.
    std::fill(grad_table + static_cast<int64_t>(lv.offset[l]) * F,
              grad_table + static_cast<int64_t>(lv.offset[l + 1]) * F, T(0));
    const T* grad_level = grad_lm + static_cast<int64_t>(l) * n * F;
    for_each_corners<F, true>(points, 0, n, lv, l, static_cast<const T*>(grad_table),
                              [&](int64_t i, const HashGridCorners<T>& c) {
                                T g[F];
                                for (int f = 0; f < F; ++f) g[f] = grad_level[i * F + f];
                                for (int corner = 0; corner < 8; ++corner) {
                                  T* dst = grad_table + static_cast<int64_t>(c.row[corner]) * F;
                                  const T w = c.weight[corner];
                                  for (int f = 0; f < F; ++f) dst[f] += w * g[f];
                                }
                              });
  });
}

// Backward to the points: a sum over levels per point, so tasks are chunks of
// points, each walking the levels in turn. grad_lm: level-major (L, N, F).
template <int F, typename T>
void backward_points_cpu(const T* grad_lm, const T* points, const T* table, T* grad_points,
                         int64_t n, const HashGridLevels& lv) {
  const int n_levels = lv.n_levels;
  const int64_t chunks = (n + kTaskPoints - 1) / kTaskPoints;
  run_tasks(chunks, [&](int64_t k) {
    const int64_t begin = k * kTaskPoints;
    const int64_t end = std::min(n, begin + kTaskPoints);
    std::fill(grad_points + 3 * begin, grad_points + 3 * end, T(0));
    for (int l = 0; l < n_levels; ++l) {
      const T scale = static_cast<T>(lv.scale[l]);
      const T* grad_level = grad_lm + static_cast<int64_t>(l) * n * F;
      for_each_corners<F, false>(
          points, begin, end, lv, l, table, [&](int64_t i, const HashGridCorners<T>& c) {
            hashgrid_point_grad<F>(points + 3 * i, c, scale, table, grad_level + i * F,
                                   grad_points + 3 * i);
          });
    }
  });
}

#ifdef AVATAR_WITH_CUDA
HashGridDtype table_kind(const at::Tensor& table) {
  switch (table.scalar_type()) {
    case at::kHalf: return HashGridDtype::kFloat16;
    case at::kDouble: return HashGridDtype::kFloat64;
    default: return HashGridDtype::kFloat32;
  }
}
#endif

}  // namespace

// points: (N, 3) in [0,1]^3; table: (offsets[L], F). Returns (N, L*F), level-major.
static at::Tensor hashgrid_forward(const at::Tensor& points, const at::Tensor& table,
                                   at::IntArrayRef offsets, at::ArrayRef<double> scales,
                                   at::IntArrayRef resolutions) {
  check_inputs(points, table);
  const HashGridLevels lv = make_levels(offsets, scales, resolutions, table.size(0));
  const int64_t n = points.size(0);
  const int64_t f = table.size(1);
  at::Tensor out = points.is_cuda() ? at::empty({n, lv.n_levels * f}, points.options())
                                    : empty_large({n, lv.n_levels * f}, points.options());
  if (n == 0) return out;
  if (points.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(points));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = hashgrid_forward_cuda(
        points.data_ptr(), points.scalar_type() == at::kDouble, table.data_ptr(),
        table_kind(table), out.data_ptr(), n, static_cast<int>(f), lv,
        stream);
    TORCH_CHECK(err == 0, "hashgrid_forward: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "hashgrid: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return out;
  }
  // Level-major (L, N, F) scratch, transposed into `out` at the end.
  at::Tensor scratch = empty_large({lv.n_levels, n, f}, points.options());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "hashgrid_forward", [&] {
    dispatch_features(f, [&](auto fc) {
      forward_cpu<decltype(fc)::value>(points.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
                                       out.data_ptr<scalar_t>(), scratch.data_ptr<scalar_t>(), n,
                                       lv);
    });
  });
  return out;
}

// Gradients of sum(grad_out * encode(points, table)) with respect to the table
// (same shape and dtype as the table) and to the points ((N, 3)); a gradient not
// asked for is returned as an empty tensor.
static std::tuple<at::Tensor, at::Tensor> hashgrid_backward(
    const at::Tensor& grad_out, const at::Tensor& points, const at::Tensor& table,
    at::IntArrayRef offsets, at::ArrayRef<double> scales, at::IntArrayRef resolutions,
    bool need_table_grad, bool need_points_grad) {
  check_inputs(points, table);
  const HashGridLevels lv = make_levels(offsets, scales, resolutions, table.size(0));
  const int64_t n = points.size(0);
  const int64_t f = table.size(1);
  AVATAR_CHECK_DIM(grad_out, 2);
  AVATAR_CHECK_CONTIGUOUS(grad_out);
  AVATAR_CHECK_SAME_DEVICE(grad_out, points);
  TORCH_CHECK(grad_out.size(0) == n && grad_out.size(1) == lv.n_levels * f,
              "hashgrid_backward: grad_out must be (", n, ", ", lv.n_levels * f, "), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == points.scalar_type(),
              "hashgrid_backward: grad_out dtype must match points dtype");
  // On the CPU every level's rows are zeroed by the thread that accumulates them.
  at::Tensor grad_table = !need_table_grad ? at::empty({0}, table.options())
                          : points.is_cuda() || n == 0 ? at::zeros(table.sizes(), points.options())
                                                       : empty_large(table.sizes(), points.options());
  at::Tensor grad_points =
      need_points_grad ? at::empty({n, 3}, points.options()) : at::empty({0}, points.options());
  if (n == 0) {
    if (need_points_grad) grad_points.zero_();
    if (need_table_grad) grad_table = grad_table.to(table.scalar_type());
    return {grad_table, grad_points};
  }
  if (points.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(points));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = hashgrid_backward_cuda(
        grad_out.data_ptr(), points.data_ptr(), points.scalar_type() == at::kDouble,
        table.data_ptr(), table_kind(table), need_table_grad ? grad_table.data_ptr() : nullptr,
        need_points_grad ? grad_points.data_ptr() : nullptr, n, static_cast<int>(f), lv,
        stream);
    TORCH_CHECK(err == 0, "hashgrid_backward: CUDA launch failed with error ", err);
    // float16 tables accumulate their gradient in float32 (atomics on halves are slow
    // and lossy); the parameter's gradient must have its dtype.
    if (need_table_grad && table.scalar_type() != grad_table.scalar_type()) {
      grad_table = grad_table.to(table.scalar_type());
    }
#else
    TORCH_CHECK(false, "hashgrid: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return {grad_table, grad_points};
  }
  if (!need_table_grad && !need_points_grad) return {grad_table, grad_points};
  at::Tensor grad_lm = empty_large({lv.n_levels, n, f}, points.options());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "hashgrid_backward", [&] {
    dispatch_features(f, [&](auto fc) {
      constexpr int F = decltype(fc)::value;
      transpose_levels<F, true>(grad_out.data_ptr<scalar_t>(), grad_lm.data_ptr<scalar_t>(), n,
                        lv.n_levels);
      if (need_table_grad) {
        backward_table_cpu<F>(grad_lm.data_ptr<scalar_t>(), points.data_ptr<scalar_t>(),
                              grad_table.data_ptr<scalar_t>(), n, lv);
      }
      if (need_points_grad) {
        backward_points_cpu<F>(grad_lm.data_ptr<scalar_t>(), points.data_ptr<scalar_t>(),
                               table.data_ptr<scalar_t>(), grad_points.data_ptr<scalar_t>(), n,
                               lv);
      }
    });
  });
  return {grad_table, grad_points};
}

}  // namespace avatar

TORCH_LIBRARY_FRAGMENT(avatar, m) {
  m.def(
      "hashgrid_forward(Tensor points, Tensor table, int[] offsets, float[] scales, "
      "int[] resolutions) -> Tensor");
  m.def(
      "hashgrid_backward(Tensor grad_out, Tensor points, Tensor table, int[] offsets, "
      "float[] scales, int[] resolutions, bool need_table_grad, bool need_points_grad) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(avatar, CPU, m) {
  m.impl("hashgrid_forward", &avatar::hashgrid_forward);
  m.impl("hashgrid_backward", &avatar::hashgrid_backward);
}

#ifdef AVATAR_WITH_CUDA
TORCH_LIBRARY_IMPL(avatar, CUDA, m) {
  m.impl("hashgrid_forward", &avatar::hashgrid_forward);
  m.impl("hashgrid_backward", &avatar::hashgrid_backward);
}
#endif
