// CUDA launchers for rasterize / interpolate / antialias analysis. Depends only on
// the CUDA runtime and our headers; the per-element math is in avatar/raster.h.
//
// The GPU engine of choice is nvdiffrast; these kernels are the portable fallback
// when our extension is built with CUDA. Rasterisation is tiled: a setup kernel
// (one thread per triangle, double precision as on the CPU) writes each
// triangle's edge functions, depth plane and pixel box; then one block per
// kRasterTile^2 tile of one image, one thread per pixel, walks the triangles in
// chunks of kThreadsPerBlock: each thread tests one triangle's box against the
// tile, the survivors go to a shared list, and every pixel runs the exact test on
// the list (raster_pixel_update), keeping its closest (z/w, id) in registers. No
// atomics on the image, no sorting, no host synchronisation; the resolve is done
// by the thread that owns the pixel. The exact test stays in double (float32 edge
// functions would decide pixels near edges unlike the CPU engine); it runs only
// for (pixel, triangle) pairs inside the triangle's pixel box, about the covered
// area, so even consumer GPUs' 1/64-rate FP64 is not what limits it: the tile
// walk over the triangle boxes (integers) is.
//
// Exactness: all floating-point math in raster.h is written with mul_rn / add_rn /
// div_rn (never fused into multiply-adds), and the extension is compiled without
// --use_fast_math, so every kernel here gives bit for bit the CPU engine's output
// (and the reference's): tests/test_cuda_compile.py checks the PTX for fused or
// contractible float operations. Triangles with a vertex index outside [0, V) are
// not drawn (interpolate and antialias skip them too), so bad indices cannot read
// out of bounds; the Python wrapper does not check index values on CUDA, as that
// would synchronise the device.
#include <cuda_runtime.h>

#include "avatar/raster.h"

namespace avatar {

namespace {

static_assert(kRasterTile * kRasterTile == kThreadsPerBlock, "one thread per pixel of a tile");

__global__ void raster_setup_kernel(const float* __restrict__ pos, const int32_t* __restrict__ faces, int64_t batch,
                                    int64_t num_vertices, int64_t num_faces, int height, int width,
                                    RasterTri* __restrict__ tris) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * num_faces) return;
  RasterTri t;
  raster_setup_face(pos, faces, i, num_vertices, num_faces, height, width, t);
  tris[i] = t;
}

// grid (tiles along x, tiles along y, batch), kThreadsPerBlock threads: thread k
// owns pixel (k % kRasterTile, k / kRasterTile) of its tile.
__global__ void raster_tile_kernel(const RasterTri* __restrict__ tris, int64_t num_faces, int height, int width,
                                   float* __restrict__ out) {
  __shared__ int32_t candidates[kThreadsPerBlock];
  __shared__ int n_candidates;
  const int64_t b = blockIdx.z;
  const int tx0 = static_cast<int>(blockIdx.x) * kRasterTile;
  const int ty0 = static_cast<int>(blockIdx.y) * kRasterTile;
  const int tx1 = min(tx0 + kRasterTile, width) - 1;
  const int ty1 = min(ty0 + kRasterTile, height) - 1;
  const int x = tx0 + static_cast<int>(threadIdx.x) % kRasterTile;
  const int y = ty0 + static_cast<int>(threadIdx.x) / kRasterTile;
  const bool inside = x <= tx1 && y <= ty1;
  const double fx = raster_pixel_ndc(x, width);
  const double fy = raster_pixel_ndc(y, height);
  const RasterTri* image_tris = tris + b * num_faces;
  float best_z = INFINITY;
  int32_t best_f = -1;
  for (int64_t chunk = 0; chunk < num_faces; chunk += kThreadsPerBlock) {
    if (threadIdx.x == 0) n_candidates = 0;
    __syncthreads();
    const int64_t f = chunk + threadIdx.x;
    if (f < num_faces && raster_tile_overlaps(image_tris[f], tx0, ty0, tx1, ty1)) {
      candidates[atomicAdd(&n_candidates, 1)] = static_cast<int32_t>(f);
    }
    __syncthreads();
    if (inside) {
      const int n = n_candidates;
      for (int k = 0; k < n; ++k) {
        const int32_t c = candidates[k];
        raster_pixel_update(image_tris[c], c, x, y, fx, fy, best_z, best_f);
      }
    }
    __syncthreads();  // the list is rebuilt for the next chunk
  }
  if (inside) {
    raster_pixel_output(image_tris, best_f, fx, fy, out + 4 * ((b * height + y) * static_cast<int64_t>(width) + x));
  }
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
                   int height, int width, RasterTri* tris, float* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (batch * static_cast<int64_t>(height) * width == 0) return static_cast<int>(cudaSuccess);
  if (batch > 65535) return static_cast<int>(cudaErrorInvalidValue);
  if (num_faces > 0) {
    raster_setup_kernel<<<grid_for(batch * num_faces), kThreadsPerBlock, 0, s>>>(pos, faces, batch, num_vertices,
                                                                                 num_faces, height, width, tris);
  }
  const dim3 tiles(static_cast<unsigned int>((width + kRasterTile - 1) / kRasterTile),
                   static_cast<unsigned int>((height + kRasterTile - 1) / kRasterTile),
                   static_cast<unsigned int>(batch));
  raster_tile_kernel<<<tiles, kThreadsPerBlock, 0, s>>>(tris, num_faces, height, width, out);
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
