"""Pure-PyTorch reference of triangle rasterisation, interpolation and antialiasing.

Same signatures and conventions as :mod:`avatar.ops.raster` (which documents
them; they are nvdiffrast's), vectorised, meant for tests and small images. The
coverage test is written operation for operation like the native kernel in
``cuda_ext/include/avatar/raster.h`` (edge functions and depth plane in float64,
the same evaluation order; only the conservative culls differ), so the two
engines agree bit for bit on CPUs; the
differentiable parts (:func:`rast_from_triangle_ids`, :func:`antialias_blend`) are
shared by both engines. Those, and :func:`opposite_vertices`, run in the native
engine's training step, so on a GPU they use fixed-size, masked computations
only: nothing there waits for the device (tests/test_raster_no_sync.py). The
reference's own search (:func:`visible_triangles`, :func:`antialias_analysis`)
does wait: its lists of (pixel, triangle) pairs have data-dependent sizes.

How the reference rasterises: every triangle's (conservative) bounding box is
enumerated as (pixel, triangle) pairs, in chunks that bound memory; each pair is
tested with the homogeneous edge functions and clipped to -1 <= z/w <= 1; a
scatter-min per pixel keeps the closest depth, ties to the lowest triangle id.
"""

from __future__ import annotations

import torch

# Pairs (pixel, triangle) tested at once: bounds the reference's memory (~60 bytes
# per pair of float64 temporaries), not its result.
MAX_PAIRS = 1 << 21

_NEXT = (1, 2, 0)
_PREV = (2, 0, 1)


def _as_batched(pos: torch.Tensor) -> torch.Tensor:
    return pos.unsqueeze(0) if pos.dim() == 2 else pos


def _triangle_setup(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Edge functions and depth plane of triangles, as the native ``raster_setup``.

    v: (..., 3, 4) float64 clip-space vertices. Returns (..., 3) tensors a, b, c:
    E_i(fx, fy) = a_i * fx + (b_i * fy + c_i) for the edge opposite vertex i, the
    rows of the adjugate of [v0 v1 v2] with v = (x, y, w) (Olano and Greer 1997),
    times the orientation sign(det) so that inside means E_i >= 0; ``on_edge``:
    whether E_i == 0 counts as inside (top-left rule); ``dz``: the depth plane
    z/w = dz0 * fx + (dz1 * fy + dz2); and (...) tensors ``det``, ``drawn``.
    """
    x, y, z, w = v.unbind(-1)
    xj, yj, wj = x[..., _NEXT], y[..., _NEXT], w[..., _NEXT]
    xk, yk, wk = x[..., _PREV], y[..., _PREV], w[..., _PREV]
    a = yj * wk - wj * yk
    b = wj * xk - xj * wk
    c = xj * yk - yj * xk
    det = (w[..., 0] * c[..., 0] + w[..., 1] * c[..., 1]) + w[..., 2] * c[..., 2]
    finite = torch.isfinite(v).flatten(-2).all(-1)
    drawn = finite & (w > 0).any(-1) & (det != 0) & torch.isfinite(det)
    flip = (det < 0)[..., None]
    a, b, c = torch.where(flip, -a, a), torch.where(flip, -b, b), torch.where(flip, -c, c)
    on_edge = _edge_inside(torch.zeros_like(a), a, b)
    inv_area = 1.0 / det.abs()[..., None]

    def plane(k: torch.Tensor) -> torch.Tensor:
        return ((z[..., 0:1] * k[..., 0:1] + z[..., 1:2] * k[..., 1:2]) + z[..., 2:3] * k[..., 2:3]) * inv_area

    dz = torch.cat([plane(a), plane(b), plane(c)], dim=-1)
    return {"a": a, "b": b, "c": c, "dz": dz, "on_edge": on_edge, "det": det, "drawn": drawn}


def _pixel_ndc(index: torch.Tensor, size: int) -> torch.Tensor:
    """NDC of pixel centres: (2 p + 1) / size - 1 (float64), as the native kernel."""
    return (2.0 * index.double() + 1.0) / size - 1.0


def _edge_inside(e: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top-left rule: inside, or exactly on the edge with a positive gradient (a, b)."""
    return (e > 0) | ((e == 0) & ((a > 0) | ((a == 0) & (b > 0))))


def _depth(dz: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """z/w as float32 from the depth plane dz (..., 3) at (fx, fy); -0 becomes +0."""
    return (dz[..., 0] * fx + (dz[..., 1] * fy + dz[..., 2])).float() + 0.0


def _setup(pos: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """Per-triangle setup for all images: edge functions, orientation, bounding box."""
    v = pos.detach().double()[:, faces.long()]  # (B, F, 3, 4)
    setup = _triangle_setup(v)
    drawn, w = setup["drawn"], v[..., 3]
    all_front = (w > 0).all(-1)
    # Conservative bounding box (widened by 1/1000 pixel against rounding) where all
    # vertices are in front of the eye; the whole image otherwise.
    safe_w = torch.where(w > 0, w, torch.ones_like(w))
    sx = (v[..., 0] / safe_w + 1.0) * (0.5 * width) - 0.5
    sy = (v[..., 1] / safe_w + 1.0) * (0.5 * height) - 0.5

    def clamp_index(t: torch.Tensor, size: int) -> torch.Tensor:
        return torch.nan_to_num(t, nan=-2.0).clamp(-2.0, size + 2.0).long()

    x0 = clamp_index((sx.min(-1).values - 1e-3).ceil(), width).clamp(min=0)
    x1 = clamp_index((sx.max(-1).values + 1e-3).floor(), width).clamp(max=width - 1)
    y0 = clamp_index((sy.min(-1).values - 1e-3).ceil(), height).clamp(min=0)
    y1 = clamp_index((sy.max(-1).values + 1e-3).floor(), height).clamp(max=height - 1)
    x0 = torch.where(all_front, x0, 0)
    x1 = torch.where(all_front, x1, width - 1)
    y0 = torch.where(all_front, y0, 0)
    y1 = torch.where(all_front, y1, height - 1)
    nx = (x1 - x0 + 1).clamp(min=0) * drawn
    ny = (y1 - y0 + 1).clamp(min=0) * drawn
    keep = ("a", "b", "c", "dz", "on_edge")
    return {**{k: setup[k] for k in keep}, "x0": x0, "y0": y0, "nx": nx, "ny": ny}


def visible_triangles(pos: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """The triangle seen at each pixel centre: (B, H, W) int64, -1 where empty.

    pos: (B, V, 4) or (V, 4) clip space; faces: (F, 3) int; not differentiable.
    """
    height, width = int(resolution[0]), int(resolution[1])
    pos = _as_batched(pos)
    batch, num_faces = pos.shape[0], faces.shape[0]
    device = pos.device
    pixels = batch * height * width
    best_z = torch.full((pixels,), float("inf"), device=device)
    if num_faces == 0 or pixels == 0:
        return torch.full((batch, height, width), -1, dtype=torch.long, device=device)
    s = _setup(pos, faces, height, width)
    counts = (s["nx"] * s["ny"]).reshape(-1)  # pairs per (image, triangle)
    hits_pixel, hits_z, hits_tri = [], [], []
    # Chunks of whole triangles with at most MAX_PAIRS pairs (a triangle larger than
    # that is a chunk of its own).
    ends = torch.cumsum(counts, 0)
    start = 0
    total = int(ends[-1]) if ends.numel() else 0
    done = 0
    flat = {k: t.reshape(-1, *t.shape[2:]) for k, t in s.items()}
    while done < total:
        stop = int(torch.searchsorted(ends, done + MAX_PAIRS, right=True))
        stop = max(stop, start + 1)
        ids = torch.arange(start, stop, device=device)
        n = counts[start:stop]
        ids, n = ids[n > 0], n[n > 0]
        start, done = stop, int(ends[stop - 1])
        if ids.numel() == 0:
            continue
        owner = torch.repeat_interleave(ids, n)
        local = torch.arange(owner.numel(), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        nx = flat["nx"][owner]
        px = flat["x0"][owner] + local % nx
        py = flat["y0"][owner] + local // nx
        fx = _pixel_ndc(px, width)
        fy = _pixel_ndc(py, height)
        a, b, c = flat["a"][owner], flat["b"][owner], flat["c"][owner]
        e = a * fx[:, None] + (b * fy[:, None] + c)
        inside = ((e > 0) | ((e == 0) & flat["on_edge"][owner])).all(-1)
        z = _depth(flat["dz"][owner], fx, fy)
        keep = inside & (z >= -1.0) & (z <= 1.0)
        image = owner // num_faces
        hits_pixel.append(((image * height + py) * width + px)[keep])
        hits_z.append(z[keep])
        hits_tri.append((owner % num_faces)[keep])
    tri_id = torch.full((pixels,), -1, dtype=torch.long, device=device)
    if hits_pixel:
        pixel, z, tri = torch.cat(hits_pixel), torch.cat(hits_z), torch.cat(hits_tri)
        best_z.scatter_reduce_(0, pixel, z, reduce="amin")
        closest = z == best_z[pixel]
        best_tri = torch.full((pixels,), num_faces, dtype=torch.long, device=device)
        best_tri.scatter_reduce_(0, pixel[closest], tri[closest], reduce="amin")
        tri_id = torch.where(best_tri < num_faces, best_tri, -1)
    return tri_id.reshape(batch, height, width)


def _dense_by_default(device: torch.device) -> bool:
    """Whether the differentiable helpers work on every pixel (masked) rather than a
    list of the pixels concerned. Listing them needs ``nonzero``, whose output size
    a device must read back to the host, stalling the step; on the CPU that costs
    nothing and the list is much shorter (the blend touches a few percent of pixels)."""
    return device.type != "cpu"


def rast_from_triangle_ids(
    pos: torch.Tensor, faces: torch.Tensor, tri_id: torch.Tensor, output_db: bool = False, dense: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rasteriser's output from the triangle seen at each pixel, differentiably.

    pos: (B, V, 4) clip space (float32 or float64); faces: (F, 3);
    tri_id: (B, H, W) int64, -1 where empty (from either engine's search).
    Returns rast (B, H, W, 4) = (u, v, z/w, tri + 1) in pos's dtype, and with
    ``output_db`` the image-space derivatives (du/dX, du/dY, dv/dX, dv/dY) in
    pixels. (u, v) and the derivatives carry gradients to pos; z/w and the id do not
    (as in nvdiffrast). Barycentrics are recomputed from the edge functions in
    float64, exactly as the native kernel computes them.

    dense: compute every pixel, empty ones masked out, so that nothing waits for
    the device (the native CUDA engine calls this every step); else only the
    covered pixels. Both give the same result (bit for bit on the CPU). Default:
    dense except on the CPU.
    """
    pos = _as_batched(pos)
    batch, height, width = tri_id.shape
    num_faces = faces.shape[0]
    device = pos.device
    if dense is None:
        dense = _dense_by_default(device)
    flat = tri_id.reshape(-1)
    covered = (flat >= 0) & (flat < num_faces)
    sel = torch.arange(flat.numel(), device=device) if dense else torch.nonzero(covered).squeeze(1)
    covered = covered[sel]
    image = sel // (height * width)
    py = (sel // width) % height
    px = sel % width
    tri = torch.where(covered, flat[sel], 0)
    # Set up each triangle once (differentiably), then gather per pixel. Triangles
    # seen nowhere are zeroed first: a non-finite vertex there would otherwise turn
    # the zero gradients of its neighbours into NaN (0 * inf).
    rows = batch * num_faces
    key = image * num_faces + tri
    seen = torch.zeros(rows + 1, dtype=torch.bool, device=device)  # row `rows`: a sink for empty pixels
    seen = seen.scatter(0, torch.where(covered, key, rows), covered)[:rows]
    # Indices outside [0, V) (not checked on CUDA: reading them would wait for the
    # device) are clamped: the kernel never draws such a triangle, so it is unseen.
    corners = pos.double()[:, faces.long().clamp(0, max(pos.shape[1] - 1, 0))].reshape(rows, 3, 4)
    setup = _triangle_setup(torch.where(seen[:, None, None], corners, 0.0))
    abc = torch.stack([setup["a"], setup["b"], setup["c"]], dim=1)  # (B * F, [a, b, c], 3)
    dz = setup["dz"].detach()
    # Empty pixels (dense only) read rows spread over all triangles plus one zero row:
    # gathering them all from one row would make its gradient a sum of that many
    # terms, which CUDA's index backward adds up one after another.
    key = torch.where(covered, key, sel % (rows + 1))
    a, b, c = torch.cat([abc, abc.new_zeros(1, 3, 3)])[key].unbind(1)
    dz = torch.cat([dz, dz.new_zeros(1, 3)])[key]
    fx = _pixel_ndc(px, width)
    fy = _pixel_ndc(py, height)
    e = a * fx[:, None] + (b * fy[:, None] + c)
    # Any finite, non-zero edge values for empty pixels: theirs are masked out
    # below, and a division by zero would make their zero gradients NaN.
    e = torch.where(covered[:, None], e, 1.0)
    at = (e[:, 0] + e[:, 1]) + e[:, 2]
    inv_at = 1.0 / at
    u = e[:, 0] * inv_at
    vv = e[:, 1] * inv_at
    z = _depth(dz, fx, fy)
    dtype = pos.dtype
    zero = torch.zeros((), dtype=dtype, device=device)
    values = torch.stack([u.to(dtype), vv.to(dtype), z.to(dtype), (tri + 1).to(dtype)], dim=1)
    values = torch.where(covered[:, None], values, zero)
    rast = torch.zeros(batch * height * width, 4, dtype=dtype, device=device)
    rast = rast.index_put((sel,), values).reshape(batch, height, width, 4)
    if not output_db:
        return rast, None
    # d(E_i / sum E)/dfx = (a_i - b_i' * sum a) / sum E with dfx/dX = 2 / W (pixels).
    asum = (a[:, 0] + a[:, 1]) + a[:, 2]
    bsum = (b[:, 0] + b[:, 1]) + b[:, 2]
    sx, sy = 2.0 / width, 2.0 / height
    db_values = torch.stack(
        [
            (a[:, 0] - u * asum) / at * sx,
            (b[:, 0] - u * bsum) / at * sy,
            (a[:, 1] - vv * asum) / at * sx,
            (b[:, 1] - vv * bsum) / at * sy,
        ],
        dim=1,
    ).to(dtype)
    db_values = torch.where(covered[:, None], db_values, zero)
    db = torch.zeros(batch * height * width, 4, dtype=dtype, device=device)
    db = db.index_put((sel,), db_values).reshape(batch, height, width, 4)
    return rast, db


def rasterize(
    pos_clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int], output_db: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of :func:`avatar.ops.raster.rasterize` (float32 or float64 positions)."""
    pos = _as_batched(pos_clip)
    with torch.no_grad():
        tri_id = visible_triangles(pos, faces, resolution)
    return rast_from_triangle_ids(pos, faces, tri_id, output_db)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`avatar.ops.raster.interpolate`.

    attr: (V, C) or (1 or B, V, C); rast: (B, H, W, 4); faces: (F, 3) -> (B, H, W, C),
    u * a0 + v * a1 + (1 - u - v) * a2 in the native kernel's order, 0 where empty.
    """
    attr = attr.unsqueeze(0) if attr.dim() == 2 else attr
    batch = rast.shape[0]
    num_faces, num_vertices = faces.shape[0], attr.shape[1]
    tri = rast[..., 3].detach().long() - 1
    valid = (tri >= 0) & (tri < num_faces)
    vid = (
        faces.long()[tri.clamp(0, max(num_faces - 1, 0))]
        if num_faces
        else torch.zeros((*tri.shape, 3), dtype=torch.long, device=rast.device)
    )
    valid = valid & ((vid >= 0) & (vid < num_vertices)).all(-1)
    vid = torch.where(valid[..., None], vid, 0)
    image = torch.arange(batch, device=rast.device).view(batch, 1, 1, 1) if attr.shape[0] > 1 else 0
    corners = attr[image, vid]  # (B, H, W, 3, C)
    u = rast[..., 0:1]
    v = rast[..., 1:2]
    w = (1.0 - u) - v
    out = u * corners[..., 0, :] + v * corners[..., 1, :] + w * corners[..., 2, :]
    return torch.where(valid[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))


# ---------------------------------------------------------------------------
# Antialiasing (Laine et al. 2020, "Modular Primitives for High-Performance
# Differentiable Rendering", section 3.4; the analysis mirrors nvdiffrast's).


def opposite_vertices(faces: torch.Tensor) -> torch.Tensor:
    """For each triangle edge, the third vertex of the triangle across it.

    faces: (F, 3) -> (F, 3) int32; entry i is for the edge opposite vertex i
    (vertices i+1, i+2). -1 where the edge is a boundary, is shared by more than
    two triangles, or both triangles have the same third vertex; such edges are
    always treated as silhouettes. Degenerate triangles (a repeated vertex) take no
    part, nor do triangles with a negative index.

    Edges are matched by sorting all 3F of them (fixed sizes only, so nothing
    waits for the device: the native CUDA engine calls this for every new face
    tensor, i.e. every step with DMTet).
    """
    f = faces.long()
    num_faces = f.shape[0]
    if num_faces == 0:
        return torch.full((0, 3), -1, dtype=torch.int32, device=faces.device)
    va, vb, vo = f[:, _NEXT].reshape(-1), f[:, _PREV].reshape(-1), f.reshape(-1)
    proper = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0]) & (f >= 0).all(1)
    proper = proper[:, None].expand(num_faces, 3).reshape(-1)
    # An edge's key packs its (lower, higher) vertex ids, in [0, 2^31), into one
    # int64 below 2^63 - 2^31 (no max() read back); edges of degenerate triangles,
    # and of triangles with a negative index (which no kernel draws), get distinct
    # keys above all others, so they never pair.
    position = torch.arange(3 * num_faces, device=faces.device)
    key = torch.minimum(va, vb) * (1 << 32) + torch.maximum(va, vb)
    key = torch.where(proper, key, torch.iinfo(torch.int64).max - position)
    key, entries = torch.sort(key, stable=True)
    # In the sorted keys an edge shared by exactly two triangles is a run of length
    # two: each of its keys equals one neighbour and differs from the next ones.
    # equal[i + 1]: sorted keys i - 1 and i are equal (false off the ends).
    n = key.shape[0]
    off = torch.zeros(2, dtype=torch.bool, device=faces.device)
    equal = torch.cat([off, key[1:] == key[:-1], off])
    first = equal[2 : n + 2] & ~equal[1 : n + 1] & ~equal[3 : n + 3]
    second = equal[1 : n + 1] & ~equal[2 : n + 2] & ~equal[0:n]
    partner = torch.where(first, position + 1, position - 1).clamp(0, n - 1)
    opposite = vo[entries[partner]]
    opposite = torch.where((first | second) & (opposite != vo[entries]), opposite, -1)
    out = torch.empty_like(opposite).scatter(0, entries, opposite)
    return out.view(num_faces, 3).int()


def _same_sign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.signbit(a) == torch.signbit(b)


def _rational_gt(n0, n1, d0, d1):
    return (n0 * d1 > n1 * d0) == _same_sign(d0, d1)


def antialias_analysis(
    rast: torch.Tensor, pos: torch.Tensor, faces: torch.Tensor, opposite: torch.Tensor
) -> torch.Tensor:
    """Silhouette edges crossing between neighbouring pixel centres.

    rast: (B, H, W, 4); pos: (B, V, 4) float32; faces, opposite: (F, 3).
    Returns codes (B, H, W, 2) int32 for the pair of each pixel with its right
    (index 0) and next-row (index 1) neighbour: ``edge | (uses_neighbour << 2)``
    where an edge of the closer triangle is a silhouette crossing the segment
    between the pixel centres, else -1. Float32 math in nvdiffrast's order.
    """
    batch, height, width, _ = rast.shape
    num_faces, num_vertices = faces.shape[0], pos.shape[1]
    device = rast.device
    codes = torch.full((batch, height, width, 2), -1, dtype=torch.int32, device=device)
    rast = rast.detach()
    pos = pos.detach().float()
    tri_img = rast[..., 3].long() - 1
    depth = rast[..., 2]
    f32 = torch.float32
    kmax = torch.tensor(3.402823466e38, dtype=f32, device=device)
    for d in (0, 1):
        if d == 0:
            t0, t1, z0, z1 = tri_img[:, :, :-1], tri_img[:, :, 1:], depth[:, :, :-1], depth[:, :, 1:]
        else:
            t0, t1, z0, z1 = tri_img[:, :-1], tri_img[:, 1:], depth[:, :-1], depth[:, 1:]
        bi, yi, xi = torch.nonzero(t0 != t1, as_tuple=True)
        if bi.numel() == 0:
            continue
        tri0, tri1 = t0[bi, yi, xi], t1[bi, yi, xi]
        tri = torch.where(tri0 >= 0, tri0, tri1)
        both = (tri0 >= 0) & (tri1 >= 0)
        tri = torch.where(both, torch.where(z0[bi, yi, xi] < z1[bi, yi, xi], tri0, tri1), tri)
        use1 = tri == tri1
        px = xi + (use1 & (d == 0)).long()
        py = yi + (use1 & (d == 1)).long()
        ok = (tri >= 0) & (tri < num_faces)
        vi = faces.long()[tri.clamp(0, max(num_faces - 1, 0))]
        ok = ok & ((vi >= 0) & (vi < num_vertices)).all(-1)
        op = opposite.long()[tri.clamp(0, max(num_faces - 1, 0))]
        op = torch.where(op < num_vertices, op, -1)
        vi = vi.clamp(0, num_vertices - 1)
        p = pos[bi[:, None], vi]  # (N, 3, 4)
        o = torch.where((op >= 0)[..., None], pos[bi[:, None], op.clamp(min=0)], p)
        xh = torch.tensor(width * 0.5, dtype=f32, device=device)
        yh = torch.tensor(height * 0.5, dtype=f32, device=device)
        fx = ((px.to(f32) + 0.5) - xh)[:, None]
        fy = ((py.to(f32) + 0.5) - yh)[:, None]
        iw = 1.0 / p[..., 3]
        ow = 1.0 / o[..., 3]
        x = p[..., 0] * iw * xh - fx
        y = p[..., 1] * iw * yh - fy
        ox = o[..., 0] * ow * xh - fx
        oy = o[..., 1] * ow * yh - fy
        x0, x1, x2 = x.unbind(-1)
        y0, y1, y2 = y.unbind(-1)
        ox0, ox1, ox2 = ox.unbind(-1)
        oy0, oy1, oy2 = oy.unbind(-1)
        bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        a0 = (x1 - ox0) * (y2 - oy0) - (x2 - ox0) * (y1 - oy0)
        a1 = (x2 - ox1) * (y0 - oy1) - (x0 - ox1) * (y2 - oy1)
        a2 = (x0 - ox2) * (y1 - oy2) - (x1 - ox2) * (y0 - oy2)
        if d == 1:
            x0, y0, x1, y1, x2, y2 = y0, x0, y1, x1, y2, x2
        dx0, dx1, dx2 = x2 - x1, x0 - x2, x1 - x0
        dy0, dy1, dy2 = y2 - y1, y0 - y2, y1 - y0
        ds = torch.where(use1, -1.0, 1.0).to(f32)
        d0 = ds * (x1 * dy0 - y1 * dx0)
        d1 = ds * (x2 * dy1 - y2 * dx1)
        d2 = ds * (x0 * dy2 - y0 * dx2)
        one = torch.ones((), dtype=f32, device=device)
        s12, s20, s01 = _same_sign(y1, y2), _same_sign(y2, y0), _same_sign(y0, y1)
        d0, dy0 = torch.where(s12, -kmax, d0), torch.where(s12, one, dy0)
        d1, dy1 = torch.where(s20, -kmax, d1), torch.where(s20, one, dy1)
        d2, dy2 = torch.where(s01, -kmax, d2), torch.where(s01, one, dy2)
        g10 = _rational_gt(d1, d0, dy1, dy0)
        g20 = _rational_gt(d2, d0, dy2, dy0)
        g21 = _rational_gt(d2, d1, dy2, dy1)
        di = torch.where(g20 & g21, 2, torch.where(g10, 1, 0))
        dc = torch.full_like(d0, -3.402823466e38)
        dc = torch.where((di == 0) & _same_sign(a0, bb) & (dy0.abs() >= dx0.abs()), d0 / dy0, dc)
        dc = torch.where((di == 1) & _same_sign(a1, bb) & (dy1.abs() >= dx1.abs()), d1 / dy1, dc)
        dc = torch.where((di == 2) & _same_sign(a2, bb) & (dy2.abs() >= dx2.abs()), d2 / dy2, dc)
        hit = ok & (dc > -0.0625) & (dc < 1.0625)
        code = (di | (use1.long() << 2)).int()
        codes[bi[hit], yi[hit], xi[hit], d] = code[hit]
    return codes


def antialias_blend(
    color: torch.Tensor,
    rast: torch.Tensor,
    pos: torch.Tensor,
    faces: torch.Tensor,
    codes: torch.Tensor,
    dense: bool | None = None,
) -> torch.Tensor:
    """Blend colours across the silhouette edges found by the analysis, differentiably.

    For a pair of pixel centres with the closer triangle's silhouette edge crossing
    the segment at fraction dc from the occluder's pixel, the pixel on the far side
    of the segment midpoint takes a share |0.5 - dc| of the other's colour (a
    box-filter coverage along the segment). Gradients flow to the colours and,
    through dc, to the clip-space positions of the edge's two vertices (Laine et
    al. 2020, section 3.4). color: (B, H, W, C); pos: (B, V, 4); codes from
    :func:`antialias_analysis` or the native analysis.

    dense: compute every (pixel, direction) pair, those without an edge masked
    out, so that nothing waits for the device (the native CUDA engine calls this
    every step); else only the pairs with an edge. Both give the same result (bit
    for bit on the CPU). Default: dense except on the CPU.
    """
    batch, height, width, channels = color.shape
    num_faces, num_vertices = faces.shape[0], pos.shape[1]
    flat = color.reshape(-1, channels)
    if num_faces == 0 or num_vertices == 0:  # no edge to blend across
        return color.clone()
    if dense is None:
        dense = _dense_by_default(color.device)
    all_codes = codes.reshape(-1)  # pairs in (B, H, W, [right, down]) order
    pair = torch.arange(all_codes.numel(), device=color.device) if dense else torch.nonzero(all_codes >= 0).squeeze(1)
    code = all_codes[pair].long()
    blend = code >= 0
    code = code.clamp(min=0)
    di, use1 = code & 3, (code >> 2) & 1
    d = pair % 2
    pixel0 = pair // 2
    xi = pixel0 % width
    yi = (pixel0 // width) % height
    bi = pixel0 // (height * width)
    # Pairs without an edge stay on their own pixel (the last row and column have no neighbour).
    pixel1 = torch.where(blend, pixel0 + torch.where(d == 1, width, 1), pixel0)
    tri = rast.detach()[..., 3].reshape(-1)[torch.where(use1 == 1, pixel1, pixel0)].long() - 1
    tri = tri.clamp(0, num_faces - 1)
    px = (xi + use1 * (1 - d)).to(pos.dtype)
    py = (yi + use1 * d).to(pos.dtype)
    f = faces.long()[tri]
    va = f.gather(1, ((di + 1) % 3)[:, None]).squeeze(1).clamp(0, num_vertices - 1)
    vb = f.gather(1, ((di + 2) % 3)[:, None]).squeeze(1).clamp(0, num_vertices - 1)
    # Pairs without an edge (dense only) compute with a finite, slanted stand-in
    # edge, so that their zero weight has a zero, not NaN, gradient. The vertices
    # they gather first are spread over all rows: gathering them all from one row
    # would make its gradient a sum of that many terms, which CUDA's index
    # backward adds up one after another.
    rows = pos.reshape(-1, 4)
    spread = pair % rows.shape[0]
    channel = torch.arange(4, device=pos.device)
    stand_in_a = (channel == 3).to(pos.dtype)  # (0, 0, 0, 1)
    stand_in_b = (channel != 2).to(pos.dtype)  # (1, 1, 0, 1)
    pa = torch.where(blend[:, None], rows[torch.where(blend, bi * num_vertices + va, spread)], stand_in_a)
    pb = torch.where(blend[:, None], rows[torch.where(blend, bi * num_vertices + vb, spread)], stand_in_b)
    xh, yh = width * 0.5, height * 0.5
    fx = (px + 0.5) - xh
    fy = (py + 0.5) - yh
    xa = pa[:, 0] * (1.0 / pa[:, 3]) * xh - fx
    ya = pa[:, 1] * (1.0 / pa[:, 3]) * yh - fy
    xb = pb[:, 0] * (1.0 / pb[:, 3]) * xh - fx
    yb = pb[:, 1] * (1.0 / pb[:, 3]) * yh - fy
    down = d == 1
    xa, ya = torch.where(down, ya, xa), torch.where(down, xa, ya)
    xb, yb = torch.where(down, yb, xb), torch.where(down, xb, yb)
    ds = (1 - 2 * use1).to(pos.dtype)
    ddy = yb - ya
    dc = ds * (xa * ddy - ya * (xb - xa)) / ddy
    alpha = ds * (0.5 - dc.clamp(0.0, 1.0))
    target = torch.where(alpha > 0, pixel0, pixel1)
    delta = alpha.to(color.dtype)[:, None] * (flat[pixel1] - flat[pixel0])
    delta = torch.where(blend[:, None], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    return flat.index_add(0, target, delta).reshape(color.shape)


def antialias(color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`avatar.ops.raster.antialias`."""
    pos = _as_batched(pos_clip)
    if pos.shape[0] == 1 and rast.shape[0] > 1:
        pos = pos.expand(rast.shape[0], -1, -1)
    codes = antialias_analysis(rast, pos, faces, opposite_vertices(faces))
    return antialias_blend(color, rast, pos, faces, codes)
