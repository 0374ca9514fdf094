"""Signed distance to a closed head mesh, sampled on a cached grid.

Building (numpy + scipy, a few seconds on 2 cores):

1. nodes within :data:`BAND_VOXELS` voxels of the surface get the exact
   point-triangle distance, the candidate triangles being those of their
   nearest dense surface samples (a k-d tree);
2. every other node takes the distance to the closest surface point of its
   nearest band node (closest-point propagation by a Euclidean distance
   transform), accurate to a fraction of a voxel;
3. sign from ray parity along grid columns, per closed component (the head and
   each eyeball), voted over the three axes; the solid is the union of the
   components, and triangles buried inside another component (the back of an
   eyeball inside the skull, found by exact ray parity of their centroids) are
   left out of the distance, so the result is the signed distance to the
   union's boundary.

Lookup is trilinear (``torch.nn.functional.grid_sample``), differentiable in
the points; outside the grid the distance to the grid box is added.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from avatar.prior.errors import PriorError

SDF_VERSION = 1
DEFAULT_RESOLUTION = 128
BAND_VOXELS = 4.0
PADDING = 0.03  # metres of empty space around the mesh inside the grid


class SDFGrid:
    """Signed distances on a regular grid over an axis-aligned cube.

    Attributes:
        values: (R, R, R) signed distances in metres, indexed [z, y, x] (the
            layout ``grid_sample`` reads), negative inside.
        lo, hi: (3,) corners of the cube, project frame (metres).
    """

    def __init__(self, values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.values = values
        self.lo = lo
        self.hi = hi

    @property
    def resolution(self) -> int:
        return int(self.values.shape[0])

    @property
    def voxel_size(self) -> float:
        return float((self.hi - self.lo).max()) / (self.resolution - 1)

    def to(self, device=None, dtype=None) -> SDFGrid:
        return SDFGrid(*(t.to(device=device, dtype=dtype) for t in (self.values, self.lo, self.hi)))

    def lookup(self, points: torch.Tensor) -> torch.Tensor:
        """Trilinear signed distance at points.

        Args:
            points: (N, 3) project-frame points.

        Returns:
            (N,) signed distances on the points' device and dtype.
        """
        grid = self.values.to(device=points.device, dtype=points.dtype)
        lo = self.lo.to(device=points.device, dtype=points.dtype)
        hi = self.hi.to(device=points.device, dtype=points.dtype)
        clamped = torch.minimum(torch.maximum(points, lo), hi)
        outside = torch.linalg.norm(points - clamped, dim=-1)
        normalised = 2.0 * (clamped - lo) / (hi - lo) - 1.0  # (x, y, z) in [-1, 1]
        sampled = torch.nn.functional.grid_sample(
            grid[None, None], normalised.reshape(1, -1, 1, 1, 3), mode="bilinear", align_corners=True
        )
        return sampled.reshape(-1) + outside


# ----------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------
def _surface_samples(vertices: np.ndarray, faces: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points on every triangle, no more than ``spacing`` apart, and their triangle ids."""
    tri = vertices[faces]
    longest = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(axis=1)
    divisions = np.maximum(1, np.ceil(longest / spacing).astype(np.int64))
    points, owners = [], []
    for n in np.unique(divisions):
        ids = np.flatnonzero(divisions == n)
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = i + j <= n
        bary = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1) / n  # (m, 3)
        pts = np.einsum("mk,tkc->tmc", bary, tri[ids])
        points.append(pts.reshape(-1, 3))
        owners.append(np.repeat(ids, len(bary)))
    return np.concatenate(points), np.concatenate(owners)


def _parity_inside(vertices: np.ndarray, faces: np.ndarray, axes: list[np.ndarray], along: int) -> np.ndarray:
    """Inside test of grid nodes for one closed surface, by ray parity along one axis.

    Args:
        axes: the grid coordinates [xs, ys, zs], each (R,).
        along: 0, 1 or 2, the axis the rays follow.

    Returns:
        (R, R, R) bool indexed [x, y, z].
    """
    u_axis, v_axis = [a for a in range(3) if a != along]
    us, vs, ws = axes[u_axis], axes[v_axis], axes[along]
    step_u, step_v = us[1] - us[0], vs[1] - vs[0]
    # Rays pass a hair off the nodes so they never graze an edge or a vertex exactly.
    ray_u, ray_v = us + 1.234567e-7, vs + 2.345678e-7
    tri = vertices[faces]
    tu, tv, tw = tri[..., u_axis], tri[..., v_axis], tri[..., along]
    i0 = np.ceil((tu.min(1) - ray_u[0]) / step_u).astype(np.int64).clip(0, len(us))
    i1 = np.floor((tu.max(1) - ray_u[0]) / step_u).astype(np.int64).clip(-1, len(us) - 1)
    j0 = np.ceil((tv.min(1) - ray_v[0]) / step_v).astype(np.int64).clip(0, len(vs))
    j1 = np.floor((tv.max(1) - ray_v[0]) / step_v).astype(np.int64).clip(-1, len(vs) - 1)
    ni, nj = np.maximum(i1 - i0 + 1, 0), np.maximum(j1 - j0 + 1, 0)
    count = ni * nj
    t_idx = np.repeat(np.arange(len(faces)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    ci = i0[t_idx] + local // np.maximum(nj[t_idx], 1)
    cj = j0[t_idx] + local % np.maximum(nj[t_idx], 1)
    pu, pv = ray_u[ci], ray_v[cj]
    a_u, a_v = tu[t_idx, 0], tv[t_idx, 0]
    b_u, b_v = tu[t_idx, 1], tv[t_idx, 1]
    c_u, c_v = tu[t_idx, 2], tv[t_idx, 2]
    det = (b_v - c_v) * (a_u - c_u) + (c_u - b_u) * (a_v - c_v)
    # Triangles seen edge-on along the ray cannot be crossed (their det is 0).
    safe = np.where(det != 0, det, 1.0)
    l0 = ((b_v - c_v) * (pu - c_u) + (c_u - b_u) * (pv - c_v)) / safe
    l1 = ((c_v - a_v) * (pu - c_u) + (a_u - c_u) * (pv - c_v)) / safe
    l2 = 1.0 - l0 - l1
    hit = (det != 0) & (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
    w = l0 * tw[t_idx, 0] + l1 * tw[t_idx, 1] + l2 * tw[t_idx, 2]
    column = ci * len(vs) + cj
    # Count, for every node, the crossings below it in its column: one sorted key per crossing.
    w0, extent = ws[0] - 1.0, ws[-1] - ws[0] + 2.0
    keys = np.sort(column[hit] * 4.0 + (w[hit] - w0) / extent)
    col_grid = (np.arange(len(us))[:, None] * len(vs) + np.arange(len(vs))[None, :]).reshape(-1)
    node_keys = col_grid[:, None] * 4.0 + ((ws - w0) / extent)[None, :]
    below = np.searchsorted(keys, node_keys) - np.searchsorted(keys, col_grid * 4.0)[:, None]
    inside = (below % 2 == 1).reshape(len(us), len(vs), len(ws))
    order = [0, 0, 0]
    order[u_axis], order[v_axis], order[along] = 0, 1, 2
    return np.transpose(inside, axes=order)


def points_inside(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Exact inside test of a few points against one closed surface (ray parity, 3 rays voting).

    Args:
        points: (N, 3); vertices: (V, 3); faces: (F, 3) of a closed surface.

    Returns:
        (N,) bool.
    """
    tri = vertices[faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    # Directions off the axes, so rays do not run along the mesh's symmetry planes.
    directions = np.array([[1.0, 0.0123, 0.0071], [0.0093, 1.0, 0.0137], [0.0111, 0.0057, 1.0]])
    votes = np.zeros(len(points), dtype=np.int64)
    chunk = max(1, 2_000_000 // max(len(faces), 1))
    for d in directions / np.linalg.norm(directions, axis=1, keepdims=True):
        # Moller-Trumbore, every point against every triangle, in chunks of points.
        h = np.cross(d, e2)  # (F, 3)
        a = np.einsum("fc,fc->f", e1, h)
        with np.errstate(divide="ignore"):
            inv_a = np.where(np.abs(a) > 1e-18, 1.0 / a, 0.0)
        for start in range(0, len(points), chunk):
            p = points[start : start + chunk]
            s = p[:, None, :] - tri[None, :, 0]  # (n, F, 3)
            u = np.einsum("nfc,fc->nf", s, h) * inv_a
            q = np.cross(s, e1[None])
            v = (q @ d) * inv_a
            t = np.einsum("nfc,fc->nf", q, e2) * inv_a
            hit = (inv_a != 0) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
            votes[start : start + chunk] += hit.sum(axis=1) % 2
    return votes >= 2


def build_sdf_grid(
    vertices: np.ndarray, faces: np.ndarray, resolution: int = DEFAULT_RESOLUTION, padding: float = PADDING
) -> SDFGrid:
    """Compute the signed distance grid of a closed triangle mesh (see module docstring).

    Args:
        vertices: (V, 3) float, faces: (F, 3) int; every connected component
            must be closed (the head with its neck cap, eyeballs).
        resolution: nodes per axis (>= 2).

    Returns:
        An :class:`SDFGrid` in float32 over a cube ``padding`` larger than the mesh.
    """
    from scipy.ndimage import distance_transform_edt
    from scipy.spatial import cKDTree

    from avatar.prior.geometry import closest_point_on_triangles, connected_components

    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if resolution < 2:
        raise PriorError(f"SDF resolution must be at least 2, got {resolution}")
    centre = 0.5 * (vertices.min(0) + vertices.max(0))
    half = 0.5 * (vertices.max(0) - vertices.min(0)).max() + padding
    lo, hi = centre - half, centre + half
    axes = [np.linspace(lo[a], hi[a], resolution) for a in range(3)]
    voxel = 2 * half / (resolution - 1)
    nodes = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)  # [x, y, z] order

    # Sign: union of the closed components, each by ray parity voted over three axes.
    labels = connected_components(faces, len(vertices))
    component_ids = np.unique(labels)
    inside_by_component = {}
    for c in component_ids:
        comp_faces = faces[labels == c]
        votes = sum(_parity_inside(vertices, comp_faces, axes, along).astype(np.int8) for along in range(3))
        inside_by_component[c] = votes >= 2
    inside = np.zeros((resolution,) * 3, dtype=bool)
    for v in inside_by_component.values():
        inside |= v

    # Triangles buried inside another component are not on the union's boundary.
    keep = np.ones(len(faces), dtype=bool)
    if len(component_ids) > 1:
        centroids = vertices[faces].mean(axis=1)
        for c in component_ids:
            comp_faces = faces[labels == c]
            box_lo, box_hi = vertices[comp_faces].min((0, 1)), vertices[comp_faces].max((0, 1))
            candidates = np.flatnonzero(
                (labels != c) & (centroids >= box_lo).all(axis=1) & (centroids <= box_hi).all(axis=1)
            )
            if len(candidates):
                keep[candidates[points_inside(centroids[candidates], vertices, comp_faces)]] = False
    surface = faces[keep]

    # Unsigned distance, exact in a band around the surface: candidate triangles
    # are those of the nearest dense samples (a k-d tree query that is fast near
    # the surface, where it has few rivals).
    samples, owner = _surface_samples(vertices, surface, spacing=0.5 * voxel)
    marked = np.zeros((resolution,) * 3, dtype=bool)
    cell = np.clip(np.round((samples - lo) / voxel).astype(np.int64), 0, resolution - 1)
    marked[cell[:, 0], cell[:, 1], cell[:, 2]] = True
    band_mask = distance_transform_edt(~marked) <= BAND_VOXELS
    band = np.flatnonzero(band_mask.reshape(-1))
    tree = cKDTree(samples)
    _, nearest = tree.query(nodes[band], k=8, workers=-1)
    candidates = owner[nearest]  # (B, 8) triangle ids; duplicates are harmless
    tri = vertices[surface]
    best = np.full(len(band), np.inf)
    best_point = np.zeros((len(band), 3))
    for k in range(candidates.shape[1]):
        t = tri[candidates[:, k]]
        closest = closest_point_on_triangles(nodes[band], t[:, 0], t[:, 1], t[:, 2])
        d = np.linalg.norm(nodes[band] - closest, axis=1)
        better = d < best
        best[better] = d[better]
        best_point[better] = closest[better]
    # Elsewhere, the closest surface point of the nearest band node (closest-point
    # propagation through a Euclidean distance transform): far from the surface a
    # k-d tree over a surface is slow, and this is accurate to a fraction of a voxel.
    closest_point = np.zeros((resolution**3, 3))
    closest_point[band] = best_point
    _, source = distance_transform_edt(~band_mask, return_indices=True)
    source_flat = np.ravel_multi_index(tuple(source.reshape(3, -1)), (resolution,) * 3)
    dist = np.linalg.norm(nodes - closest_point[source_flat], axis=1)
    dist[band] = best
    signed = np.where(inside.reshape(-1), -dist, dist).reshape(resolution, resolution, resolution)  # [x, y, z]
    values = torch.as_tensor(np.ascontiguousarray(signed.transpose(2, 1, 0)), dtype=torch.float32)
    return SDFGrid(values, torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32))


def mesh_key(vertices: np.ndarray, faces: np.ndarray, resolution: int) -> str:
    """Cache key of a mesh's grid: content hash + resolution + code version."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(np.round(np.asarray(vertices, dtype=np.float64), 7)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(faces, dtype=np.int64)).tobytes())
    return f"sdf-v{SDF_VERSION}-r{resolution}-{h.hexdigest()[:20]}"


def cached_sdf_grid(vertices: np.ndarray, faces: np.ndarray, resolution: int = DEFAULT_RESOLUTION) -> SDFGrid:
    """:func:`build_sdf_grid`, cached as ``.npz`` under the avatar cache (``prior/sdf``)."""
    from avatar.paths import cache_dir

    path = cache_dir("prior", "sdf") / f"{mesh_key(vertices, faces, resolution)}.npz"
    if path.exists():
        try:
            with np.load(path) as data:
                return SDFGrid(*(torch.as_tensor(data[k]) for k in ("values", "lo", "hi")))
        except (OSError, ValueError, KeyError, EOFError):
            pass  # torn file: rebuild
    grid = build_sdf_grid(vertices, faces, resolution)
    _atomic_savez(path, values=grid.values.numpy(), lo=grid.lo.numpy(), hi=grid.hi.numpy())
    return grid


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as exc:
        warnings.warn(f"could not cache the SDF grid in {path}: {exc}; it will be rebuilt next time", stacklevel=2)
