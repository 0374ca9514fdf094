// CUDA launchers for rasterize / interpolate / antialias analysis. Depends only on
// the CUDA runtime and our headers; the per-element math is in avatar/raster.h.
//
// The GPU engine of choice is nvdiffrast; these kernels are the portable fallback
// when our extension is built with CUDA: setup per triangle, one thread per
// triangle walking its bounding box with a 64-bit atomicMin depth test (depth bits
// then triangle id, so ties go to the lower id as on the CPU), and a per-pixel
// resolve. nvcc contracts multiply-adds, so pixels exactly on an edge may be
// decided differently from the CPU engine (consistently between neighbours).
#include <cuda_runtime.h>

#include "avatar/raster.h"

namespace avatar {

namespace {

__global__ void raster_setup_kernel(const float* __restrict__ pos, const int32_t* __restrict__ faces, int64_t batch,
                                    int64_t num_vertices, int64_t num_faces, int height, int width,
                                    RasterTri* __restrict__ tris) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * num_faces) return;
  const int64_t b = i / num_faces, f = i % num_faces;
  const int32_t* tri = faces + 3 * f;
  RasterTri t;
  bool ok = true;
  for (int k = 0; k < 3; ++k) ok = ok && tri[k] >= 0 && tri[k] < num_vertices;
  if (!ok) {
    t.drawn = 0;
    t.x0 = 1;
    t.x1 = 0;
    t.y0 = 0;
    t.y1 = -1;
  } else {
    const float* base = pos + b * num_vertices * 4;
    raster_setup(base + 4 * tri[0], base + 4 * tri[1], base + 4 * tri[2], height, width, t);
  }
  tris[i] = t;
}

__global__ void raster_clear_kernel(unsigned long long* __restrict__ keys, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) keys[i] = kRasterEmptyKey;
}

__global__ void raster_cover_kernel(const RasterTri* __restrict__ tris, int64_t batch, int64_t num_faces, int height,
                                    int width, unsigned long long* __restrict__ keys) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * num_faces) return;
  const RasterTri t = tris[i];
  if (t.x0 > t.x1 || t.y0 > t.y1) return;
  const int64_t b = i / num_faces, f = i % num_faces;
  unsigned long long* image = keys + b * static_cast<int64_t>(height) * width;
  for (int y = t.y0; y <= t.y1; ++y) {
    const double fy = raster_pixel_ndc(y, height);
    const double rowc[3] = {t.b[0] * fy + t.c[0], t.b[1] * fy + t.c[1], t.b[2] * fy + t.c[2]};
    const double rowz = t.dz[1] * fy + t.dz[2];
    int xs = t.x0, xe = t.x1;
    if (!raster_row_span(t, fy, rowc, xs, xe)) continue;
    for (int x = xs; x <= xe; ++x) {
      float z;
      if (raster_sample(t, raster_pixel_ndc(x, width), rowc, rowz, z))
        atomicMin(image + static_cast<int64_t>(y) * width + x, raster_depth_key(z, f));
    }
  }
}

__global__ void raster_resolve_kernel(const RasterTri* __restrict__ tris, const unsigned long long* __restrict__ keys,
                                      int64_t batch, int64_t num_faces, int height, int width, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pixels = static_cast<int64_t>(height) * width;
  if (i >= batch * pixels) return;
  float* o = out + 4 * i;
  const unsigned long long key = keys[i];
  if (key == kRasterEmptyKey) {
    o[0] = o[1] = o[2] = o[3] = 0.0f;
    return;
  }
  const int64_t b = i / pixels, p = i % pixels;
  const int y = static_cast<int>(p / width), x = static_cast<int>(p % width);
  const int64_t f = static_cast<int64_t>(key & 0xffffffffull);
  raster_resolve(tris[b * num_faces + f], raster_pixel_ndc(x, width), raster_pixel_ndc(y, height), f, o);
}

__global__ void interpolate_kernel(const float* __restrict__ attr, int64_t attr_batch, const float* __restrict__ rast,
                                   const int32_t* __restrict__ faces, int64_t n, int64_t pixels, int64_t num_vertices,
                                   int64_t num_faces, int channels, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t b = attr_batch == 1 ? 0 : i / pixels;
  interpolate_pixel(rast + 4 * i, faces, num_faces, attr + b * num_vertices * channels, num_vertices, channels,
                    out + i * channels);
}

__global__ void interpolate_grad_rast_kernel(const float* __restrict__ grad, const float* __restrict__ attr,
                                             int64_t attr_batch, const float* __restrict__ rast,
                                             const int32_t* __restrict__ faces, int64_t n, int64_t pixels,
                                             int64_t num_vertices, int64_t num_faces, int channels,
                                             float* __restrict__ grad_rast) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t b = attr_batch == 1 ? 0 : i / pixels;
  interpolate_grad_rast_pixel(rast + 4 * i, faces, num_faces, attr + b * num_vertices * channels, num_vertices,
                              channels, grad + i * channels, grad_rast + 4 * i);
}

__global__ void antialias_analysis_kernel(const float* __restrict__ rast, const float* __restrict__ pos,
                                          const int32_t* __restrict__ faces, const int32_t* __restrict__ opposite,
                                          int64_t batch, int64_t num_vertices, int64_t num_faces, int height,
                                          int width, int32_t* __restrict__ codes) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pixels = static_cast<int64_t>(height) * width;
  if (i >= batch * pixels) return;
  const int64_t b = i / pixels, p = i % pixels;
  const int y = static_cast<int>(p / width), x = static_cast<int>(p % width);
  const float* rb = rast + b * pixels * 4;
  const float* pb = pos + b * num_vertices * 4;
  for (int d = 0; d < 2; ++d)
    codes[2 * i + d] = aa_analyse_pair(rb, pb, faces, opposite, num_faces, num_vertices, height, width, x, y, d);
}

inline unsigned int grid_for(int64_t n) { return static_cast<unsigned int>(num_blocks(n)); }

}  // namespace

int rasterize_cuda(const float* pos, const int32_t* faces, int64_t batch, int64_t num_vertices, int64_t num_faces,
                   int height, int width, RasterTri* tris, unsigned long long* keys, float* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t pixels = batch * static_cast<int64_t>(height) * width;
  if (pixels == 0) return static_cast<int>(cudaSuccess);
  raster_clear_kernel<<<grid_for(pixels), kThreadsPerBlock, 0, s>>>(keys, pixels);
  if (batch * num_faces > 0) {
    raster_setup_kernel<<<grid_for(batch * num_faces), kThreadsPerBlock, 0, s>>>(pos, faces, batch, num_vertices,
                                                                                 num_faces, height, width, tris);
    raster_cover_kernel<<<grid_for(batch * num_faces), kThreadsPerBlock, 0, s>>>(tris, batch, num_faces, height,
                                                                                 width, keys);
  }
  raster_resolve_kernel<<<grid_for(pixels), kThreadsPerBlock, 0, s>>>(tris, keys, batch, num_faces, height, width,
                                                                      out);
  return static_cast<int>(cudaGetLastError());
}

int interpolate_cuda(const float* attr, int64_t attr_batch, const float* rast, const int32_t* faces, int64_t batch,
                     int64_t num_vertices, int64_t num_faces, int channels, int height, int width, float* out,
                     void* stream) {
  const int64_t pixels = static_cast<int64_t>(height) * width;
  const int64_t n = batch * pixels;
  if (n == 0) return static_cast<int>(cudaSuccess);
  interpolate_kernel<<<grid_for(n), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      attr, attr_batch, rast, faces, n, pixels, num_vertices, num_faces, channels, out);
  return static_cast<int>(cudaGetLastError());
}

int interpolate_grad_rast_cuda(const float* grad, const float* attr, int64_t attr_batch, const float* rast,
                               const int32_t* faces, int64_t batch, int64_t num_vertices, int64_t num_faces,
                               int channels, int height, int width, float* grad_rast, void* stream) {
  const int64_t pixels = static_cast<int64_t>(height) * width;
  const int64_t n = batch * pixels;
  if (n == 0) return static_cast<int>(cudaSuccess);
  interpolate_grad_rast_kernel<<<grid_for(n), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      grad, attr, attr_batch, rast, faces, n, pixels, num_vertices, num_faces, channels, grad_rast);
  return static_cast<int>(cudaGetLastError());
}

int antialias_analysis_cuda(const float* rast, const float* pos, const int32_t* faces, const int32_t* opposite,
                            int64_t batch, int64_t num_vertices, int64_t num_faces, int height, int width,
                            int32_t* codes, void* stream) {
  const int64_t n = batch * static_cast<int64_t>(height) * width;
  if (n == 0) return static_cast<int>(cudaSuccess);
  antialias_analysis_kernel<<<grid_for(n), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      rast, pos, faces, opposite, batch, num_vertices, num_faces, height, width, codes);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace avatar
