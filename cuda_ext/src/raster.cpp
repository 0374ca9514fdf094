// Torch bindings and CPU loops for rasterize / interpolate / antialias analysis
// (see include/avatar/raster.h for the conventions and the per-element math).
//
// CPU rasteriser: triangles are set up in parallel, binned (in id order) into
// bands of kRasterBandRows rows, then bands run in parallel, each with its own
// depth buffer: the depth test needs no locks and ties resolve to the lowest
// triangle id deterministically. Only the winner's barycentrics are computed
// (deferred resolve).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "avatar/checks.h"

#ifdef AVATAR_WITH_CUDA
// c10's stream and guard headers only: <ATen/cuda/CUDAContext.h> pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a toolkit with just nvcc and cudart lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Bit-exact agreement with the PyTorch reference needs every multiply and add
// rounded on its own: no contraction into fused multiply-adds (which GCC would do
// on targets with FMA, e.g. aarch64).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "avatar/raster.h"

namespace avatar {

namespace {

void check_faces(const at::Tensor& faces) {
  AVATAR_CHECK_DTYPE(faces, at::kInt);
  AVATAR_CHECK_CONTIGUOUS(faces);
  AVATAR_CHECK_DIM(faces, 2);
  TORCH_CHECK(faces.size(1) == 3, "faces must have shape (F, 3), got ", faces.sizes());
  TORCH_CHECK(faces.size(0) < (int64_t{1} << 24),
              "at most 2^24 - 1 triangles (ids are stored exactly in float32), got ", faces.size(0));
}

void check_rast(const at::Tensor& rast) {
  AVATAR_CHECK_FLOAT_CONTIGUOUS(rast);
  AVATAR_CHECK_DIM(rast, 4);
  TORCH_CHECK(rast.size(3) == 4, "rast must have shape (B, H, W, 4), got ", rast.sizes());
}

void check_pos(const at::Tensor& pos) {
  AVATAR_CHECK_FLOAT_CONTIGUOUS(pos);
  AVATAR_CHECK_DIM(pos, 3);
  TORCH_CHECK(pos.size(2) == 4, "pos must have shape (B, V, 4) (clip-space x, y, z, w), got ", pos.sizes());
}

void check_attr(const at::Tensor& attr, const at::Tensor& rast) {
  AVATAR_CHECK_FLOAT_CONTIGUOUS(attr);
  AVATAR_CHECK_DIM(attr, 3);
  TORCH_CHECK(attr.size(0) == 1 || attr.size(0) == rast.size(0), "attr must have shape (1 or B, V, C) with B = ",
              rast.size(0), ", got ", attr.sizes());
}

void rasterize_cpu(const float* pos, const int32_t* faces, int64_t batch, int64_t num_vertices, int64_t num_faces,
                   int height, int width, float* out) {
  std::unique_ptr<RasterTri[]> tris(new RasterTri[static_cast<size_t>(batch * num_faces)]);  // uninitialised
  at::parallel_for(0, batch * num_faces, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      raster_setup_face(pos, faces, i, num_vertices, num_faces, height, width, tris[i]);
    }
  });

  // Bin triangles into row bands (counting sort, keeps id order within a band).
  const int num_bands = (height + kRasterBandRows - 1) / kRasterBandRows;
  std::vector<int64_t> offsets(static_cast<size_t>(batch * num_bands + 1), 0);
  for (int64_t i = 0; i < batch * num_faces; ++i) {
    const RasterTri& t = tris[i];
    if (t.x0 > t.x1 || t.y0 > t.y1) continue;
    const int64_t b = i / num_faces;
    for (int band = t.y0 / kRasterBandRows; band <= t.y1 / kRasterBandRows; ++band)
      ++offsets[b * num_bands + band + 1];
  }
  for (size_t k = 1; k < offsets.size(); ++k) offsets[k] += offsets[k - 1];
  std::vector<int32_t> binned(static_cast<size_t>(offsets.back()));
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < batch * num_faces; ++i) {
      const RasterTri& t = tris[i];
      if (t.x0 > t.x1 || t.y0 > t.y1) continue;
      const int64_t b = i / num_faces;
      for (int band = t.y0 / kRasterBandRows; band <= t.y1 / kRasterBandRows; ++band)
        binned[cursor[b * num_bands + band]++] = static_cast<int32_t>(i % num_faces);
    }
  }

  std::vector<double> fxs(width), fys(height);
  for (int x = 0; x < width; ++x) fxs[x] = raster_pixel_ndc(x, width);
  for (int y = 0; y < height; ++y) fys[y] = raster_pixel_ndc(y, height);

  at::parallel_for(0, batch * num_bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> depth(static_cast<size_t>(kRasterBandRows) * width);
    std::vector<int32_t> winner(static_cast<size_t>(kRasterBandRows) * width);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / num_bands;
      const int band = static_cast<int>(job % num_bands);
      const int row0 = band * kRasterBandRows;
      const int row1 = std::min(height, row0 + kRasterBandRows) - 1;
      std::fill(depth.begin(), depth.end(), std::numeric_limits<float>::infinity());
      std::fill(winner.begin(), winner.end(), -1);
      const RasterTri* batch_tris = tris.get() + b * num_faces;
      for (int64_t k = offsets[job]; k < offsets[job + 1]; ++k) {
        const int32_t f = binned[k];
        const RasterTri& t = batch_tris[f];
        const int y0 = std::max(t.y0, row0), y1 = std::min(t.y1, row1);
        for (int y = y0; y <= y1; ++y) {
          const double fy = fys[y];
          const double rowc[3] = {t.b[0] * fy + t.c[0], t.b[1] * fy + t.c[1], t.b[2] * fy + t.c[2]};
          const double rowz = t.dz[1] * fy + t.dz[2];
          int xs = t.x0, xe = t.x1;
          if (!raster_row_span(t, fy, rowc, xs, xe)) continue;
          float* zrow = depth.data() + static_cast<size_t>(y - row0) * width;
          int32_t* wrow = winner.data() + static_cast<size_t>(y - row0) * width;
          for (int x = xs; x <= xe; ++x) {
            float z;
            if (raster_sample(t, fxs[x], rowc, rowz, z) && z < zrow[x]) {
              zrow[x] = z;
              wrow[x] = f;
            }
          }
        }
      }
      for (int y = row0; y <= row1; ++y) {
        float* orow = out + ((b * height + y) * static_cast<int64_t>(width)) * 4;
        const int32_t* wrow = winner.data() + static_cast<size_t>(y - row0) * width;
        for (int x = 0; x < width; ++x) {
          float* o = orow + 4 * x;
          if (wrow[x] < 0) {
            o[0] = o[1] = o[2] = o[3] = 0.0f;
          } else {
            raster_resolve(batch_tris[wrow[x]], fxs[x], fys[y], wrow[x], o);
          }
        }
      }
    }
  });
}

// The CUDA rasteriser (raster.cu) run on the CPU: the same setup, tile walk and
// per-pixel functions from raster.h, one tile after another. Only for tests: it
// lets CPU-only CI compare the GPU algorithm with the band rasteriser above.
void rasterize_tiled_cpu(const float* pos, const int32_t* faces, int64_t batch, int64_t num_vertices,
                         int64_t num_faces, int height, int width, float* out) {
  std::unique_ptr<RasterTri[]> tris(new RasterTri[static_cast<size_t>(std::max<int64_t>(1, batch * num_faces))]);
  for (int64_t i = 0; i < batch * num_faces; ++i) {  // raster_setup_kernel
    raster_setup_face(pos, faces, i, num_vertices, num_faces, height, width, tris[i]);
  }
  const int tiles_x = (width + kRasterTile - 1) / kRasterTile;
  const int tiles_y = (height + kRasterTile - 1) / kRasterTile;
  at::parallel_for(0, batch * tiles_y * tiles_x, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> candidates;
    for (int64_t job = begin; job < end; ++job) {  // one raster_tile_kernel block
      const int64_t b = job / (static_cast<int64_t>(tiles_y) * tiles_x);
      const int tx0 = static_cast<int>(job % tiles_x) * kRasterTile;
      const int ty0 = static_cast<int>((job / tiles_x) % tiles_y) * kRasterTile;
      const int tx1 = std::min(tx0 + kRasterTile, width) - 1;
      const int ty1 = std::min(ty0 + kRasterTile, height) - 1;
      const RasterTri* image_tris = tris.get() + b * num_faces;
      float best_z[kThreadsPerBlock];
      int32_t best_f[kThreadsPerBlock];
      std::fill(best_z, best_z + kThreadsPerBlock, std::numeric_limits<float>::infinity());
      std::fill(best_f, best_f + kThreadsPerBlock, -1);
      for (int64_t chunk = 0; chunk < num_faces; chunk += kThreadsPerBlock) {
        candidates.clear();
        // Reversed, as the GPU's shared list comes in any order.
        for (int64_t f = std::min<int64_t>(num_faces, chunk + kThreadsPerBlock) - 1; f >= chunk; --f) {
          if (raster_tile_overlaps(image_tris[f], tx0, ty0, tx1, ty1)) candidates.push_back(static_cast<int32_t>(f));
        }
        for (int k = 0; k < kThreadsPerBlock; ++k) {
          const int x = tx0 + k % kRasterTile, y = ty0 + k / kRasterTile;
          if (x > tx1 || y > ty1) continue;
          const double fx = raster_pixel_ndc(x, width), fy = raster_pixel_ndc(y, height);
          for (const int32_t c : candidates) raster_pixel_update(image_tris[c], c, x, y, fx, fy, best_z[k], best_f[k]);
        }
      }
      for (int k = 0; k < kThreadsPerBlock; ++k) {
        const int x = tx0 + k % kRasterTile, y = ty0 + k / kRasterTile;
        if (x > tx1 || y > ty1) continue;
        raster_pixel_output(image_tris, best_f[k], raster_pixel_ndc(x, width), raster_pixel_ndc(y, height),
                            out + 4 * ((b * height + y) * static_cast<int64_t>(width) + x));
      }
    }
  });
}

}  // namespace

// Test-only: the CUDA kernel's algorithm on CPU tensors (see rasterize_tiled_cpu).
static at::Tensor rasterize_fwd_tiled(const at::Tensor& pos, const at::Tensor& faces, int64_t height, int64_t width) {
  check_pos(pos);
  check_faces(faces);
  TORCH_CHECK(pos.is_cpu() && faces.is_cpu(), "rasterize_fwd_tiled: CPU tensors only (it emulates the CUDA kernel)");
  TORCH_CHECK(height > 0 && width > 0 && height <= 16384 && width <= 16384,
              "resolution must be in [1, 16384], got ", height, " x ", width);
  at::Tensor out = at::empty({pos.size(0), height, width, 4}, pos.options());
  if (out.numel() == 0) return out;
  rasterize_tiled_cpu(pos.data_ptr<float>(), faces.data_ptr<int32_t>(), pos.size(0), pos.size(1), faces.size(0),
                      static_cast<int>(height), static_cast<int>(width), out.data_ptr<float>());
  return out;
}

// pos: (B, V, 4) float32 clip space; faces: (F, 3) int32 -> rast (B, H, W, 4).
static at::Tensor rasterize_fwd(const at::Tensor& pos, const at::Tensor& faces, int64_t height, int64_t width) {
  check_pos(pos);
  check_faces(faces);
  AVATAR_CHECK_SAME_DEVICE(pos, faces);
  TORCH_CHECK(height > 0 && width > 0 && height <= 16384 && width <= 16384,
              "resolution must be in [1, 16384], got ", height, " x ", width);
  const int64_t batch = pos.size(0), num_vertices = pos.size(1), num_faces = faces.size(0);
  at::Tensor out = at::empty({batch, height, width, 4}, pos.options());
  if (out.numel() == 0) return out;
  if (pos.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    TORCH_CHECK(batch <= 65535, "rasterize: at most 65535 images per call on CUDA, got ", batch);
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(pos));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    at::Tensor scratch = at::empty({std::max<int64_t>(1, batch * num_faces * int64_t(sizeof(RasterTri)))},
                                   pos.options().dtype(at::kByte));
    const int err = rasterize_cuda(pos.data_ptr<float>(), faces.data_ptr<int32_t>(), batch, num_vertices,
                                   num_faces, static_cast<int>(height), static_cast<int>(width),
                                   reinterpret_cast<RasterTri*>(scratch.data_ptr<uint8_t>()), out.data_ptr<float>(),
                                   stream);
    TORCH_CHECK(err == 0, "rasterize: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "rasterize: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return out;
  }
  rasterize_cpu(pos.data_ptr<float>(), faces.data_ptr<int32_t>(), batch, num_vertices, num_faces,
                static_cast<int>(height), static_cast<int>(width), out.data_ptr<float>());
  return out;
}

// attr: (1 or B, V, C); rast: (B, H, W, 4); faces: (F, 3) -> (B, H, W, C).
static at::Tensor interpolate_fwd(const at::Tensor& attr, const at::Tensor& rast, const at::Tensor& faces) {
  check_rast(rast);
  check_attr(attr, rast);
  check_faces(faces);
  AVATAR_CHECK_SAME_DEVICE(attr, rast);
  AVATAR_CHECK_SAME_DEVICE(rast, faces);
  const int64_t batch = rast.size(0), height = rast.size(1), width = rast.size(2);
  const int64_t attr_batch = attr.size(0), num_vertices = attr.size(1), channels = attr.size(2);
  const int64_t num_faces = faces.size(0);
  at::Tensor out = at::empty({batch, height, width, channels}, attr.options());
  if (out.numel() == 0) return out;
  if (rast.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(rast));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = interpolate_cuda(attr.data_ptr<float>(), attr_batch, rast.data_ptr<float>(),
                                     faces.data_ptr<int32_t>(), batch, num_vertices, num_faces,
                                     static_cast<int>(channels), static_cast<int>(height), static_cast<int>(width),
                                     out.data_ptr<float>(), stream);
    TORCH_CHECK(err == 0, "interpolate: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "interpolate: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return out;
  }
  const float* a = attr.data_ptr<float>();
  const float* r = rast.data_ptr<float>();
  const int32_t* f = faces.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const int64_t pixels = height * width;
  at::parallel_for(0, batch * pixels, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = attr_batch == 1 ? 0 : i / pixels;
      interpolate_pixel(r + 4 * i, f, num_faces, a + b * num_vertices * channels, num_vertices,
                        static_cast<int>(channels), o + i * channels);
    }
  });
  return out;
}

// Gradient of interpolate with respect to rast (channels u, v; z/w and id get 0).
static at::Tensor interpolate_grad_rast(const at::Tensor& grad, const at::Tensor& attr, const at::Tensor& rast,
                                        const at::Tensor& faces) {
  check_rast(rast);
  check_attr(attr, rast);
  check_faces(faces);
  AVATAR_CHECK_FLOAT_CONTIGUOUS(grad);
  AVATAR_CHECK_SAME_DEVICE(grad, rast);
  AVATAR_CHECK_SAME_DEVICE(attr, rast);
  AVATAR_CHECK_SAME_DEVICE(rast, faces);
  const int64_t batch = rast.size(0), height = rast.size(1), width = rast.size(2);
  const int64_t attr_batch = attr.size(0), num_vertices = attr.size(1), channels = attr.size(2);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == batch && grad.size(1) == height && grad.size(2) == width &&
                  grad.size(3) == channels,
              "grad must have shape (B, H, W, C) = (", batch, ", ", height, ", ", width, ", ", channels, "), got ",
              grad.sizes());
  const int64_t num_faces = faces.size(0);
  at::Tensor out = at::empty({batch, height, width, 4}, rast.options());
  if (out.numel() == 0) return out;
  if (rast.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(rast));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = interpolate_grad_rast_cuda(
        grad.data_ptr<float>(), attr.data_ptr<float>(), attr_batch, rast.data_ptr<float>(), faces.data_ptr<int32_t>(),
        batch, num_vertices, num_faces, static_cast<int>(channels), static_cast<int>(height), static_cast<int>(width),
        out.data_ptr<float>(), stream);
    TORCH_CHECK(err == 0, "interpolate_grad_rast: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "interpolate_grad_rast: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return out;
  }
  const float* g = grad.data_ptr<float>();
  const float* a = attr.data_ptr<float>();
  const float* r = rast.data_ptr<float>();
  const int32_t* f = faces.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const int64_t pixels = height * width;
  at::parallel_for(0, batch * pixels, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = attr_batch == 1 ? 0 : i / pixels;
      interpolate_grad_rast_pixel(r + 4 * i, f, num_faces, a + b * num_vertices * channels, num_vertices,
                                  static_cast<int>(channels), g + i * channels, o + 4 * i);
    }
  });
  return out;
}

// rast: (B, H, W, 4); pos: (B, V, 4); faces, opposite: (F, 3) int32 -> codes
// (B, H, W, 2) int32: per pixel and direction (right, down) the silhouette edge
// to blend across (edge | neighbour-triangle << 2), or -1.
static at::Tensor antialias_analysis(const at::Tensor& rast, const at::Tensor& pos, const at::Tensor& faces,
                                     const at::Tensor& opposite) {
  check_rast(rast);
  check_pos(pos);
  check_faces(faces);
  AVATAR_CHECK_DTYPE(opposite, at::kInt);
  AVATAR_CHECK_CONTIGUOUS(opposite);
  TORCH_CHECK(opposite.sizes() == faces.sizes(), "opposite must have the shape of faces ", faces.sizes(), ", got ",
              opposite.sizes());
  TORCH_CHECK(pos.size(0) == rast.size(0), "pos must have one vertex set per image: ", pos.size(0), " vs ",
              rast.size(0));
  AVATAR_CHECK_SAME_DEVICE(rast, pos);
  AVATAR_CHECK_SAME_DEVICE(rast, faces);
  AVATAR_CHECK_SAME_DEVICE(rast, opposite);
  const int64_t batch = rast.size(0), height = rast.size(1), width = rast.size(2);
  const int64_t num_vertices = pos.size(1), num_faces = faces.size(0);
  at::Tensor codes = at::empty({batch, height, width, 2}, rast.options().dtype(at::kInt));
  if (codes.numel() == 0) return codes;
  if (rast.is_cuda()) {
#ifdef AVATAR_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(rast));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const int err = antialias_analysis_cuda(rast.data_ptr<float>(), pos.data_ptr<float>(), faces.data_ptr<int32_t>(),
                                            opposite.data_ptr<int32_t>(), batch, num_vertices, num_faces,
                                            static_cast<int>(height), static_cast<int>(width),
                                            codes.data_ptr<int32_t>(), stream);
    TORCH_CHECK(err == 0, "antialias_analysis: CUDA launch failed with error ", err);
#else
    TORCH_CHECK(false, "antialias_analysis: avatar._C was built without CUDA; rebuild on a machine with nvcc");
#endif
    return codes;
  }
  const float* r = rast.data_ptr<float>();
  const float* p = pos.data_ptr<float>();
  const int32_t* f = faces.data_ptr<int32_t>();
  const int32_t* op = opposite.data_ptr<int32_t>();
  int32_t* c = codes.data_ptr<int32_t>();
  const int64_t pixels = height * width;
  at::parallel_for(0, batch * height, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / height;
      const int y = static_cast<int>(row % height);
      const float* rb = r + b * pixels * 4;
      const float* pb = p + b * num_vertices * 4;
      for (int x = 0; x < width; ++x) {
        int32_t* cc = c + (row * width + x) * 2;
        for (int d = 0; d < 2; ++d)
          cc[d] = aa_analyse_pair(rb, pb, f, op, num_faces, num_vertices, static_cast<int>(height),
                                  static_cast<int>(width), x, y, d);
      }
    }
  });
  return codes;
}

}  // namespace avatar

TORCH_LIBRARY_FRAGMENT(avatar, m) {
  m.def("rasterize_fwd(Tensor pos, Tensor faces, int height, int width) -> Tensor");
  m.def("rasterize_fwd_tiled(Tensor pos, Tensor faces, int height, int width) -> Tensor");
  m.def("interpolate_fwd(Tensor attr, Tensor rast, Tensor faces) -> Tensor");
  m.def("interpolate_grad_rast(Tensor grad, Tensor attr, Tensor rast, Tensor faces) -> Tensor");
  m.def("antialias_analysis(Tensor rast, Tensor pos, Tensor faces, Tensor opposite) -> Tensor");
}

TORCH_LIBRARY_IMPL(avatar, CPU, m) {
  m.impl("rasterize_fwd", &avatar::rasterize_fwd);
  m.impl("rasterize_fwd_tiled", &avatar::rasterize_fwd_tiled);
  m.impl("interpolate_fwd", &avatar::interpolate_fwd);
  m.impl("interpolate_grad_rast", &avatar::interpolate_grad_rast);
  m.impl("antialias_analysis", &avatar::antialias_analysis);
}

#ifdef AVATAR_WITH_CUDA
TORCH_LIBRARY_IMPL(avatar, CUDA, m) {
  m.impl("rasterize_fwd", &avatar::rasterize_fwd);
  m.impl("interpolate_fwd", &avatar::interpolate_fwd);
  m.impl("interpolate_grad_rast", &avatar::interpolate_grad_rast);
  m.impl("antialias_analysis", &avatar::antialias_analysis);
}
#endif
