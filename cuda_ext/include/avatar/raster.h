// Triangle rasterisation, attribute interpolation and antialiasing analysis with
// nvdiffrast's conventions (Laine et al. 2020, "Modular Primitives for
// High-Performance Differentiable Rendering"). Per-element math shared by the CPU
// loops (raster.cpp) and the CUDA kernels (raster.cu).
//
// Conventions (identical to nvdiffrast, so engines can be swapped):
// - Input positions are clip space (x, y, z, w). Pixel (px, py) of a W x H image
//   samples the NDC point fx = (2 px + 1) / W - 1, fy = (2 py + 1) / H - 1: pixel
//   centres at half-integers, row 0 at clip y = -1 (OpenGL's lower-left origin).
// - Output per pixel: (u, v, z/w, triangle_id + 1), 0 where no triangle covers the
//   pixel. u and v are the perspective-correct barycentric weights of the
//   triangle's vertices 0 and 1 (vertex 2 gets 1 - u - v).
// - Clipping: a pixel is covered where the interpolated w > 0 and -1 <= z/w <= 1
//   (OpenGL's view volume). Both faces are drawn (no culling). The closest z/w
//   wins, ties go to the lower triangle id.
//
// Coverage uses 2D homogeneous edge functions (Olano and Greer 1997): edge i,
// opposite vertex i, is E_i(p) = (v_j x v_k) . (fx, fy, 1) with v = (x, y, w), so
// triangles crossing w = 0 need no clipping. The barycentrics are E_i / sum(E).
// Evaluated in double from float32 inputs (products of floats are exact in
// double), in a fixed order that the PyTorch reference repeats operation by
// operation, every multiply and add rounded on its own (mul_rn / add_rn: no fused
// multiply-adds on the GPU; raster.cpp turns contraction off on the CPU), so the
// CPU engine, the CUDA kernels and the reference agree bit for bit. A pixel
// exactly on an edge (E_i == 0) is decided by the sign of the edge's gradient
// (a "top-left" rule: the sample is nudged by (eps, eps^2)); the two triangles
// sharing an edge compute exactly negated edge functions, so such a pixel belongs
// to exactly one of them.
#pragma once

#include <cmath>
#include <cstring>

#include "avatar/common.h"

namespace avatar {

// Triangle setup: edge functions E_i(fx, fy) = a_i * fx + (b_i * fy + c_i),
// multiplied by the orientation (the sign of det [v0 v1 v2]) so that inside means
// E_i >= 0 (negating is exact: the barycentrics E_i / sum(E) are unchanged bit for
// bit), and the depth plane z/w = dz[0] * fx + (dz[1] * fy + dz[2]): z/w is affine
// in screen space, sum_i z_i E_i / sum_i w_i E_i with sum_i w_i E_i = |det|.
struct RasterTri {
  double a[3], b[3], c[3];
  double dz[3];
  double span1[3], span0[3];  // edge i crosses row fy at pixel index span1 * fy + span0
  int on_edge[3];             // whether a sample with E_i == 0 is inside (top-left rule)
  int span_edges;             // bit i: edge i narrows row spans (a_i != 0, well conditioned)
  int drawn;                  // 0 for culled (degenerate, behind the eye, non-finite)
  int x0, x1, y0, y1;         // inclusive pixel bounding box; empty when x0 > x1
};

// Rows per band of the CPU rasteriser: bands own disjoint rows, so the depth test
// needs no synchronisation.
constexpr int kRasterBandRows = 16;

// Rows of bounding boxes narrower than this are tested whole, without computing
// the span between the edges (cheaper for the few-pixel triangles of dense meshes).
constexpr int kRasterSpanMinWidth = 4;

AVATAR_HD bool raster_finite(double v) { return sub_rn(v, v) == 0.0; }

AVATAR_HD double raster_pixel_ndc(int p, int size) {
  return sub_rn(div_rn(add_rn(mul_rn(2.0, static_cast<double>(p)), 1.0), static_cast<double>(size)), 1.0);
}

// (u0 * v0 + u1 * v1) + u2 * v2, each operation rounded on its own.
AVATAR_HD double raster_dot3(const double* u, const double* v) {
  return add_rn(add_rn(mul_rn(u[0], v[0]), mul_rn(u[1], v[1])), mul_rn(u[2], v[2]));
}

// Inside test of one oriented edge: E > 0, or E == 0 with the edge's gradient
// (a, b) pointing to +x (or to +y when a == 0), i.e. the sample nudged by
// (eps, eps^2) is inside.
AVATAR_HD bool raster_edge_inside(double e, double a, double b) {
  return e > 0.0 || (e == 0.0 && (a > 0.0 || (a == 0.0 && b > 0.0)));
}

// ceil and floor of a value known to be in int range (no libm call).
AVATAR_HD int raster_ceil(double v) {
  const int i = static_cast<int>(v);
  return i < v ? i + 1 : i;
}
AVATAR_HD int raster_floor(double v) {
  const int i = static_cast<int>(v);
  return i > v ? i - 1 : i;
}

// A pixel index clamped to [-2, size + 2] (NaN -> -2), rounded up or down.
AVATAR_HD int raster_clamp_index(double v, int size, bool up) {
  if (!(v > -2.0)) v = -2.0;
  const double high = add_rn(static_cast<double>(size), 2.0);
  if (v > high) v = high;
  return up ? raster_ceil(v) : raster_floor(v);
}

// p0, p1, p2: clip-space (x, y, z, w) of the triangle's vertices.
AVATAR_HD void raster_setup(const float* p0, const float* p1, const float* p2, int height, int width,
                            RasterTri& t) {
  const float* p[3] = {p0, p1, p2};
  double x[3], y[3], z[3], w[3];
  bool any_front = false, all_front = true;
  double sum = 0.0;  // finite iff every coordinate is (twelve floats cannot overflow a double)
  for (int i = 0; i < 3; ++i) {
    x[i] = p[i][0];
    y[i] = p[i][1];
    z[i] = p[i][2];
    w[i] = p[i][3];
    sum = add_rn(sum, add_rn(add_rn(x[i], y[i]), add_rn(z[i], w[i])));
    any_front = any_front || w[i] > 0.0;
    all_front = all_front && w[i] > 0.0;
  }
  for (int i = 0; i < 3; ++i) {
    const int j = i == 2 ? 0 : i + 1;
    const int k = j == 2 ? 0 : j + 1;
    t.a[i] = sub_rn(mul_rn(y[j], w[k]), mul_rn(w[j], y[k]));
    t.b[i] = sub_rn(mul_rn(w[j], x[k]), mul_rn(x[j], w[k]));
    t.c[i] = sub_rn(mul_rn(x[j], y[k]), mul_rn(y[j], x[k]));
  }
  const double det = raster_dot3(w, t.c);
  t.drawn = raster_finite(sum) && any_front && det != 0.0 && raster_finite(det);
  t.x0 = 0;
  t.x1 = width - 1;
  t.y0 = 0;
  t.y1 = height - 1;
  if (!t.drawn) {
    t.x0 = 1;
    t.x1 = 0;
    return;
  }
  for (int i = 0; i < 3; ++i) {
    if (det < 0.0) {
      t.a[i] = -t.a[i];
      t.b[i] = -t.b[i];
      t.c[i] = -t.c[i];
    }
    t.on_edge[i] = raster_edge_inside(0.0, t.a[i], t.b[i]);
  }
  const double inv_area = div_rn(1.0, det < 0.0 ? -det : det);
  t.dz[0] = mul_rn(raster_dot3(z, t.a), inv_area);
  t.dz[1] = mul_rn(raster_dot3(z, t.b), inv_area);
  t.dz[2] = mul_rn(raster_dot3(z, t.c), inv_area);
  if (all_front) {
    // Projected bounding box in continuous pixel indices (pixel px is centred at
    // px), widened by 1/1000 pixel against rounding: a conservative cull only, the
    // edge functions decide coverage.
    double lx = 1e300, hx = -1e300, ly = 1e300, hy = -1e300;
    for (int i = 0; i < 3; ++i) {
      const double iw = div_rn(1.0, w[i]);
      const double sx = sub_rn(mul_rn(add_rn(mul_rn(x[i], iw), 1.0), mul_rn(0.5, static_cast<double>(width))), 0.5);
      const double sy = sub_rn(mul_rn(add_rn(mul_rn(y[i], iw), 1.0), mul_rn(0.5, static_cast<double>(height))), 0.5);
      lx = sx < lx ? sx : lx;
      hx = sx > hx ? sx : hx;
      ly = sy < ly ? sy : ly;
      hy = sy > hy ? sy : hy;
    }
    const int bx0 = raster_clamp_index(sub_rn(lx, 1e-3), width, true);
    const int bx1 = raster_clamp_index(add_rn(hx, 1e-3), width, false);
    const int by0 = raster_clamp_index(sub_rn(ly, 1e-3), height, true);
    const int by1 = raster_clamp_index(add_rn(hy, 1e-3), height, false);
    t.x0 = bx0 > 0 ? bx0 : 0;
    t.x1 = bx1 < width - 1 ? bx1 : width - 1;
    t.y0 = by0 > 0 ? by0 : 0;
    t.y1 = by1 < height - 1 ? by1 : height - 1;
  }
  // Row spans (raster_row_span) only pay off for boxes wider than a few pixels.
  // Edge i crosses row fy where E_i = 0: fx = -(b_i fy + c_i) / a_i, in pixels.
  t.span_edges = 0;
  if (t.x1 - t.x0 < kRasterSpanMinWidth) return;
  for (int i = 0; i < 3; ++i) {
    if (t.a[i] == 0.0) continue;
    const double inv_a = div_rn(1.0, t.a[i]);
    const double k1 = mul_rn(-t.b[i], inv_a), k0 = mul_rn(-t.c[i], inv_a);
    if (k1 > -1e6 && k1 < 1e6 && k0 > -1e6 && k0 < 1e6) {  // else rounding could exceed the margin
      t.span1[i] = mul_rn(k1, mul_rn(0.5, static_cast<double>(width)));
      t.span0[i] = sub_rn(mul_rn(add_rn(k0, 1.0), mul_rn(0.5, static_cast<double>(width))), 0.5);
      t.span_edges |= 1 << i;
    }
  }
}

// Setup of triangle i of a batch (i = b * num_faces + f): a face with an index outside
// [0, num_vertices) is not drawn (an empty box), so bad faces never read out of bounds.
AVATAR_HD void raster_setup_face(const float* pos, const int32_t* faces, int64_t i, int64_t num_vertices,
                                 int64_t num_faces, int height, int width, RasterTri& t) {
  const int64_t b = i / num_faces, f = i % num_faces;
  const int32_t* tri = faces + 3 * f;
  bool ok = true;
  for (int k = 0; k < 3; ++k) ok = ok && tri[k] >= 0 && tri[k] < num_vertices;
  if (!ok) {
    t.drawn = 0;
    t.x0 = t.y0 = 1;
    t.x1 = t.y1 = 0;
    return;
  }
  const float* base = pos + b * num_vertices * 4;
  raster_setup(base + 4 * tri[0], base + 4 * tri[1], base + 4 * tri[2], height, width, t);
}

// The NDC depth z/w at fx on a row whose dz[1] * fy + dz[2] is rowz, as float32;
// -0 becomes +0 so that equal depths compare equal everywhere.
AVATAR_HD float raster_depth(const RasterTri& t, double fx, double rowz) {
  return add_rn(static_cast<float>(add_rn(mul_rn(t.dz[0], fx), rowz)), 0.0f);
}

// Coverage of the sample at NDC x = fx on a row whose b_i * fy + c_i are rowc[i]
// and dz[1] * fy + dz[2] is rowz. On success writes the depth z/w (in [-1, 1]).
AVATAR_HD bool raster_sample(const RasterTri& t, double fx, const double rowc[3], double rowz, float& zf) {
  const double e0 = add_rn(mul_rn(t.a[0], fx), rowc[0]);
  const double e1 = add_rn(mul_rn(t.a[1], fx), rowc[1]);
  const double e2 = add_rn(mul_rn(t.a[2], fx), rowc[2]);
  // One branch instead of three: pixels of small triangles are unpredictable.
  const bool inside = ((e0 > 0.0) | ((e0 == 0.0) & (t.on_edge[0] != 0))) &
                      ((e1 > 0.0) | ((e1 == 0.0) & (t.on_edge[1] != 0))) &
                      ((e2 > 0.0) | ((e2 == 0.0) & (t.on_edge[2] != 0)));
  if (!inside) return false;
  const float z = raster_depth(t, fx, rowz);
  if (!(z >= -1.0f && z <= 1.0f)) return false;
  zf = z;
  return true;
}

// Narrows [xs, xe] on row fy (whose b_i * fy + c_i are rowc[i]) to the pixels
// that can pass raster_sample: the span between the edges' crossings of the row,
// widened by 1/1000 pixel. A cull only (every pixel left is still tested exactly).
// Returns false if the row is empty.
AVATAR_HD bool raster_row_span(const RasterTri& t, double fy, const double rowc[3], int& xs, int& xe) {
  if (t.x1 - t.x0 < kRasterSpanMinWidth) return true;
  for (int i = 0; i < 3; ++i) {
    if (t.a[i] == 0.0) {  // E_i = rowc_i on the whole row, exactly
      if (rowc[i] < 0.0 || (rowc[i] == 0.0 && !t.on_edge[i])) return false;
      continue;
    }
    if (!((t.span_edges >> i) & 1)) continue;
    const double cross = add_rn(mul_rn(t.span1[i], fy), t.span0[i]);
    if (t.a[i] > 0.0) {
      const double lo = sub_rn(cross, 1e-3);
      if (lo > xe) return false;
      if (lo > xs) xs = raster_ceil(lo);
    } else {
      const double hi = add_rn(cross, 1e-3);
      if (hi < xs) return false;
      if (hi < xe) xe = raster_floor(hi);
    }
  }
  return xs <= xe;
}

// Output (u, v, z/w, tri + 1) of a covered sample.
AVATAR_HD void raster_resolve(const RasterTri& t, double fx, double fy, int64_t tri, float* out) {
  double e[3];
  for (int i = 0; i < 3; ++i) e[i] = add_rn(mul_rn(t.a[i], fx), add_rn(mul_rn(t.b[i], fy), t.c[i]));
  const double inv_at = div_rn(1.0, add_rn(add_rn(e[0], e[1]), e[2]));
  out[0] = static_cast<float>(mul_rn(e[0], inv_at));
  out[1] = static_cast<float>(mul_rn(e[1], inv_at));
  out[2] = raster_depth(t, fx, add_rn(mul_rn(t.dz[1], fy), t.dz[2]));
  out[3] = static_cast<float>(tri + 1);
}

// ---------------------------------------------------------------------------
// The CUDA rasteriser's per-pixel algorithm (raster.cu), also run on the CPU by
// the test-only op `rasterize_fwd_tiled` (raster.cpp) so that CPU-only CI checks
// the code the GPU runs against the band rasteriser and the reference.
//
// Image tiles of kRasterTile x kRasterTile pixels (one CUDA block, one thread per
// pixel) walk the triangles in chunks; a triangle whose bounding box misses the
// tile is skipped for the whole block, and each pixel tests the rest against its
// own bounding box, then exactly (raster_sample, in double). The double work is
// therefore per (pixel, triangle) pair inside the triangle's box, which is the
// covered area times a small factor, not per pixel times triangles. The depth test
// keeps the smallest (z/w, triangle id) pair in registers: the same winner as the
// band rasteriser (strictly closer wins, ties to the lower id), in any order.

constexpr int kRasterTile = 16;  // kRasterTile^2 == kThreadsPerBlock

// Whether triangle t's (inclusive) pixel box meets the tile [tx0, tx1] x [ty0, ty1].
AVATAR_HD bool raster_tile_overlaps(const RasterTri& t, int tx0, int ty0, int tx1, int ty1) {
  return t.x0 <= t.x1 && t.y0 <= t.y1 && t.x0 <= tx1 && t.x1 >= tx0 && t.y0 <= ty1 && t.y1 >= ty0;
}

// Depth test of pixel (x, y) at NDC (fx, fy) against triangle f: keeps the
// smallest (z, f) in (best_z, best_f). Initialise best_z = +inf, best_f = -1.
AVATAR_HD void raster_pixel_update(const RasterTri& t, int32_t f, int x, int y, double fx, double fy,
                                   float& best_z, int32_t& best_f) {
  if (x < t.x0 || x > t.x1 || y < t.y0 || y > t.y1) return;
  // Row terms exactly as the band rasteriser computes them once per row.
  const double rowc[3] = {add_rn(mul_rn(t.b[0], fy), t.c[0]), add_rn(mul_rn(t.b[1], fy), t.c[1]),
                          add_rn(mul_rn(t.b[2], fy), t.c[2])};
  const double rowz = add_rn(mul_rn(t.dz[1], fy), t.dz[2]);
  float z;
  if (raster_sample(t, fx, rowc, rowz, z) && (z < best_z || (z == best_z && f < best_f))) {
    best_z = z;
    best_f = f;
  }
}

// Output of a pixel whose winner is best_f (-1: empty) among tris (this image's).
AVATAR_HD void raster_pixel_output(const RasterTri* tris, int32_t best_f, double fx, double fy, float* out) {
  if (best_f < 0) {
    out[0] = out[1] = out[2] = out[3] = 0.0f;
  } else {
    raster_resolve(tris[best_f], fx, fy, best_f, out);
  }
}

// ---------------------------------------------------------------------------
// interpolate: out = u * a0 + v * a1 + (1 - u - v) * a2, zero where empty.

// The triangle's vertex indices for a rasterised pixel, or false if empty/invalid.
AVATAR_HD bool raster_pixel_vertices(const float* r, const int32_t* faces, int64_t num_faces, int64_t num_vertices,
                                     int64_t& i0, int64_t& i1, int64_t& i2) {
  const int64_t tri = static_cast<int64_t>(r[3]) - 1;
  if (tri < 0 || tri >= num_faces) return false;
  i0 = faces[3 * tri];
  i1 = faces[3 * tri + 1];
  i2 = faces[3 * tri + 2];
  return i0 >= 0 && i0 < num_vertices && i1 >= 0 && i1 < num_vertices && i2 >= 0 && i2 < num_vertices;
}

// r: the pixel's 4 rast values; attr: (V, C) of this image; out: C values.
AVATAR_HD void interpolate_pixel(const float* r, const int32_t* faces, int64_t num_faces, const float* attr,
                                 int64_t num_vertices, int channels, float* out) {
  int64_t i0, i1, i2;
  if (!raster_pixel_vertices(r, faces, num_faces, num_vertices, i0, i1, i2)) {
    for (int c = 0; c < channels; ++c) out[c] = 0.0f;
    return;
  }
  const float u = r[0], v = r[1];
  const float w = sub_rn(sub_rn(1.0f, u), v);
  const float* a0 = attr + i0 * channels;
  const float* a1 = attr + i1 * channels;
  const float* a2 = attr + i2 * channels;
  for (int c = 0; c < channels; ++c) out[c] = add_rn(add_rn(mul_rn(u, a0[c]), mul_rn(v, a1[c])), mul_rn(w, a2[c]));
}

// Gradient of interpolate with respect to the pixel's (u, v); channels 2, 3 get 0.
AVATAR_HD void interpolate_grad_rast_pixel(const float* r, const int32_t* faces, int64_t num_faces, const float* attr,
                                           int64_t num_vertices, int channels, const float* grad, float* grad_r) {
  grad_r[0] = grad_r[1] = grad_r[2] = grad_r[3] = 0.0f;
  int64_t i0, i1, i2;
  if (!raster_pixel_vertices(r, faces, num_faces, num_vertices, i0, i1, i2)) return;
  const float* a0 = attr + i0 * channels;
  const float* a1 = attr + i1 * channels;
  const float* a2 = attr + i2 * channels;
  float gu = 0.0f, gv = 0.0f;
  for (int c = 0; c < channels; ++c) {
    gu = add_rn(gu, mul_rn(grad[c], sub_rn(a0[c], a2[c])));
    gv = add_rn(gv, mul_rn(grad[c], sub_rn(a1[c], a2[c])));
  }
  grad_r[0] = gu;
  grad_r[1] = gv;
}

// ---------------------------------------------------------------------------
// antialias: discontinuity analysis of nvdiffrast's analytic antialiasing
// (Laine et al. 2020, section 3.4). For the pair of pixel (px, py) and its right
// (d = 0) or lower-row (d = 1) neighbour with different triangles, take the
// closer triangle; if one of its silhouette edges crosses the segment between
// the two pixel centres, return its code (edge index | triangle-of-neighbour << 2),
// else -1. The blend itself (differentiable in colour and vertex positions) is
// computed in PyTorch from this code. float32 throughout, as in nvdiffrast.

AVATAR_HD bool aa_same_sign(float a, float b) {
  uint32_t ua, ub;
  memcpy(&ua, &a, sizeof(ua));
  memcpy(&ub, &b, sizeof(ub));
  return ((ua ^ ub) & 0x80000000u) == 0u;
}

AVATAR_HD bool aa_rational_gt(float n0, float n1, float d0, float d1) {
  return (mul_rn(n0, d1) > mul_rn(n1, d0)) == aa_same_sign(d0, d1);
}

AVATAR_HD int aa_max_idx3(float n0, float n1, float n2, float d0, float d1, float d2) {
  const bool g10 = aa_rational_gt(n1, n0, d1, d0);
  const bool g20 = aa_rational_gt(n2, n0, d2, d0);
  const bool g21 = aa_rational_gt(n2, n1, d2, d1);
  if (g20 && g21) return 2;
  if (g10) return 1;
  return 0;
}

// (xa - px) * (yb - py) - (xb - px) * (ya - py): twice the signed area of the
// triangle (a, b, p), each operation rounded on its own.
AVATAR_HD float aa_cross(float xa, float xb, float ya, float yb, float px, float py) {
  return sub_rn(mul_rn(sub_rn(xa, px), sub_rn(yb, py)), mul_rn(sub_rn(xb, px), sub_rn(ya, py)));
}

AVATAR_HD void aa_swap(float& a, float& b) {
  const float t = a;
  a = b;
  b = t;
}

// rast: (H, W, 4) of this image; pos: (V, 4) of this image; opposite: (F, 3) the
// vertex across each triangle edge (edge i is opposite vertex i), -1 if none.
AVATAR_HD int aa_analyse_pair(const float* rast, const float* pos, const int32_t* faces, const int32_t* opposite,
                              int64_t num_faces, int64_t num_vertices, int height, int width, int px, int py, int d) {
  if (d == 0 ? px >= width - 1 : py >= height - 1) return -1;
  const int64_t pixel0 = static_cast<int64_t>(py) * width + px;
  const int64_t pixel1 = pixel0 + (d ? width : 1);
  const int64_t tri0 = static_cast<int64_t>(rast[4 * pixel0 + 3]) - 1;
  const int64_t tri1 = static_cast<int64_t>(rast[4 * pixel1 + 3]) - 1;
  if (tri0 == tri1) return -1;
  int64_t tri = tri0 >= 0 ? tri0 : tri1;
  if (tri0 >= 0 && tri1 >= 0) tri = rast[4 * pixel0 + 2] < rast[4 * pixel1 + 2] ? tri0 : tri1;
  const bool use1 = tri == tri1;
  if (use1) {
    px += 1 - d;
    py += d;
  }
  if (tri < 0 || tri >= num_faces) return -1;
  int64_t vi[3], op[3];
  for (int i = 0; i < 3; ++i) {
    vi[i] = faces[3 * tri + i];
    if (vi[i] < 0 || vi[i] >= num_vertices) return -1;
  }
  for (int i = 0; i < 3; ++i) {
    op[i] = opposite[3 * tri + i];
    if (op[i] >= num_vertices) op[i] = -1;
  }
  const float xh = mul_rn(static_cast<float>(width), 0.5f);
  const float yh = mul_rn(static_cast<float>(height), 0.5f);
  const float fx = sub_rn(add_rn(static_cast<float>(px), 0.5f), xh);
  const float fy = sub_rn(add_rn(static_cast<float>(py), 0.5f), yh);
  float x[3], y[3], ox[3], oy[3];
  for (int i = 0; i < 3; ++i) {
    const float* p = pos + 4 * vi[i];
    const float* o = op[i] < 0 ? p : pos + 4 * op[i];
    const float iw = div_rn(1.0f, p[3]);
    const float ow = div_rn(1.0f, o[3]);
    x[i] = sub_rn(mul_rn(mul_rn(p[0], iw), xh), fx);
    y[i] = sub_rn(mul_rn(mul_rn(p[1], iw), yh), fy);
    ox[i] = sub_rn(mul_rn(mul_rn(o[0], ow), xh), fx);
    oy[i] = sub_rn(mul_rn(mul_rn(o[1], ow), yh), fy);
  }
  // Silhouette test: the opposite vertex lies on the same side of the edge as the
  // triangle's own third vertex (or there is no neighbour across the edge).
  const float bb = aa_cross(x[1], x[2], y[1], y[2], x[0], y[0]);
  const float a0 = aa_cross(x[1], x[2], y[1], y[2], ox[0], oy[0]);
  const float a1 = aa_cross(x[2], x[0], y[2], y[0], ox[1], oy[1]);
  const float a2 = aa_cross(x[0], x[1], y[0], y[1], ox[2], oy[2]);
  if (!(aa_same_sign(a0, bb) || aa_same_sign(a1, bb) || aa_same_sign(a2, bb))) return -1;
  if (d) {
    for (int i = 0; i < 3; ++i) aa_swap(x[i], y[i]);
  }
  const float dx0 = sub_rn(x[2], x[1]), dx1 = sub_rn(x[0], x[2]), dx2 = sub_rn(x[1], x[0]);
  float dy0 = sub_rn(y[2], y[1]), dy1 = sub_rn(y[0], y[2]), dy2 = sub_rn(y[1], y[0]);
  const float ds = use1 ? -1.0f : 1.0f;
  const float kMax = 3.402823466e+38f;
  float d0 = mul_rn(ds, sub_rn(mul_rn(x[1], dy0), mul_rn(y[1], dx0)));
  float d1 = mul_rn(ds, sub_rn(mul_rn(x[2], dy1), mul_rn(y[2], dx1)));
  float d2 = mul_rn(ds, sub_rn(mul_rn(x[0], dy2), mul_rn(y[0], dx2)));
  if (aa_same_sign(y[1], y[2])) d0 = -kMax, dy0 = 1.0f;
  if (aa_same_sign(y[2], y[0])) d1 = -kMax, dy1 = 1.0f;
  if (aa_same_sign(y[0], y[1])) d2 = -kMax, dy2 = 1.0f;
  const int di = aa_max_idx3(d0, d1, d2, dy0, dy1, dy2);
  float dc = -kMax;
  if (di == 0 && aa_same_sign(a0, bb) && fabsf(dy0) >= fabsf(dx0)) dc = div_rn(d0, dy0);
  if (di == 1 && aa_same_sign(a1, bb) && fabsf(dy1) >= fabsf(dx1)) dc = div_rn(d1, dy1);
  if (di == 2 && aa_same_sign(a2, bb) && fabsf(dy2) >= fabsf(dx2)) dc = div_rn(d2, dy2);
  const float eps = 0.0625f;  // no more than 1/16 pixel inaccuracy expected
  if (!(dc > -eps && dc < add_rn(1.0f, eps))) return -1;
  return di | (use1 ? 4 : 0);
}

#if defined(AVATAR_WITH_CUDA) || defined(__CUDACC__)
// CUDA launchers (streams passed as void*; return a cudaError_t as int).
// tris: scratch of batch * num_faces RasterTri; batch <= 65535 (grid z).
int rasterize_cuda(const float* pos, const int32_t* faces, int64_t batch, int64_t num_vertices, int64_t num_faces,
                   int height, int width, RasterTri* tris, float* out, void* stream);
// attr: (attr_batch, V, C) with attr_batch 1 (broadcast) or batch.
int interpolate_cuda(const float* attr, int64_t attr_batch, const float* rast, const int32_t* faces, int64_t batch,
                     int64_t num_vertices, int64_t num_faces, int channels, int height, int width, float* out,
                     void* stream);
int interpolate_grad_rast_cuda(const float* grad, const float* attr, int64_t attr_batch, const float* rast,
                               const int32_t* faces, int64_t batch, int64_t num_vertices, int64_t num_faces,
                               int channels, int height, int width, float* grad_rast, void* stream);
int antialias_analysis_cuda(const float* rast, const float* pos, const int32_t* faces, const int32_t* opposite,
                            int64_t batch, int64_t num_vertices, int64_t num_faces, int height, int width,
                            int32_t* codes, void* stream);
#endif

}  // namespace avatar
