"""Maps baked on a fixed UV layout: base colour, tangent-space normal, ORM (issue 18, item 4).

The exported head is a low-poly mesh on the prior's topology with the prior's UVs,
fitted to the generated high-detail surface. What the low-poly surface cannot carry
is baked into its UV layout, as a cage baker does (Cignoni et al. 1998, "A general
method for preserving attribute values on simplified meshes"; the same projection
Blender's and Substance's "ray distance" bakers make):

1. every texel centre covered by the low-poly mesh's UV charts gives a point ``p``
   on the low-poly surface and its interpolated normal ``n`` (:func:`rasterize_uv`);
2. the ray ``p + t n``, ``|t| <= max_distance``, is cast both ways against the
   target's triangles near it, with no BVH: the ``FIRST_CANDIDATES`` triangles nearest
   ``p`` (a KD-tree over centroid and normal, so that a triangle facing away ranks
   farther; texels in chunks); for the few rays that miss them, the ``CANDIDATES``
   nearest; for those that miss these too, the triangles nearest where the ray meets
   the tangent plane at the nearest surface point. The hit with the smallest ``|t|`` on a
   triangle facing the way ``n`` does is kept (not the other lip, not the far side of
   a thin shell); without a hit, the nearest surface point within ``max_distance``;
   without that, nothing;
3. at that target point: the base colour is the albedo field there; the normal map
   stores the target's smooth normal (area-weighted vertex normals, interpolated)
   in the texel's tangent frame; the occlusion is the target's per-vertex ambient
   occlusion, interpolated. A texel where nothing was found keeps the flat normal
   and takes the albedo at its own point;
4. every map is dilated over the whole gutter (:func:`~avatar.export.texture.dilate`)
   so that no mip level mixes in background.

Tangent frames are glTF's (the ``TANGENT`` attribute, :func:`vertex_tangents`): the
tangent follows increasing u, and the bitangent ``cross(normal, tangent) * w`` points
up the image (decreasing glTF v), because glTF's normal textures are "+X right,
+Y up" (glTF 2.0, ``material.normalTexture``) while its v grows downward. This is
the frame three.js uses with a ``TANGENT`` attribute (``normalize(cross(vNormal,
vTangent) * tangent.w)``, no flip) and what Blender's importer reproduces with its
flipped v (KhronosGroup/glTF-Sample-Models#174 is the discussion). The baked
normal is the exact inverse of the shader's decode ``normalize(mat3(T, B, N) * m)``
with T, B, N the interpolated and normalised vertex frame
(:func:`shading_normals`), so the engine shows the target's normal.

Ambient occlusion is computed on the target's vertices by depth-map visibility from
``ao_directions`` fixed directions on a Fibonacci sphere (orthographic depth maps
from our rasteriser), cosine-weighted over each vertex's hemisphere: cheap,
deterministic, and the same on every machine.

Everything is numpy in (metres), images out; the albedo callable takes a float32
torch tensor of points in metres, as :func:`~avatar.export.texture.bake_texture`'s does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avatar.errors import AvatarError
from avatar.export.texture import dilate, rasterize_uv

FIRST_CANDIDATES = 4
"""Target triangles first tested per texel ray: those nearest the texel's point (centroid
and orientation, :func:`_target`). Where the two surfaces are near each other and near parallel (most of a
fitted head: 98% of the texels of a head-sized case) one of them is hit."""

ORIENTATION = 0.2
"""Weight of orientation in the candidates' nearness, as a share of ``max_distance``: with the
default 1 cm, a triangle facing away from the texel's normal ranks 4 mm farther (:func:`_target`)."""

CANDIDATES = 16
"""Target triangles tested for a ray that missed the first ones, and whose nearest point
is the fallback; a ray missing these too gets a last try around where it meets the
tangent plane at that nearest point."""

AO_RESOLUTION = 512
"""Side of the orthographic depth maps of the ambient occlusion (a head: ~0.6 mm a pixel)."""

CHUNK = 1 << 16
"""Texels per batch of the ray search (memory: ~100 bytes x CANDIDATES a texel)."""


class BakeError(AvatarError, ValueError):
    """The bake was given inputs it cannot use (shapes, indices, NaNs, sizes); the message names which."""


@dataclass
class BakedMaps:
    """The maps of one bake, each (S, S, ...) with row 0 at v = 0 (glTF's top row).

    base_colour: (S, S, 3) uint8, sRGB as the albedo field gives it.
    normal: (S, S, 3) uint8, tangent space (``c / 255 * 2 - 1``; (128, 128, 255) is flat),
        in the frames of :attr:`tangents`.
    orm: (S, S, 3) uint8 linear: R ambient occlusion, G roughness, B metallic (0): glTF's
        ``occlusionTexture`` and ``metallicRoughnessTexture`` in one image.
    coverage: (S, S) bool, texels whose centre lies in a UV triangle.
    tangents: (V, 4) float32 glTF ``TANGENT`` of the low-poly mesh (:func:`vertex_tangents`).
    stats: ``seconds`` per part of the bake, ``texels`` covered, and how each was found
        (``hit``: ray hit, ``nearest``: nearest point, ``missed``: nothing within max_distance).
    """

    base_colour: np.ndarray
    normal: np.ndarray
    orm: np.ndarray
    coverage: np.ndarray
    tangents: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Validation at the door.


def _array(name: str, value: Any, cols: int, dtype: Any) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise BakeError(f"bake: {name} must be a numeric (N, {cols}) array ({exc})") from exc
    if arr.ndim != 2 or arr.shape[1] != cols:
        raise BakeError(f"bake: {name} must have shape (N, {cols}), got {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BakeError(f"bake: {name} has NaN or infinite values")
    return arr


def _faces(name: str, value: Any, num_vertices: int) -> np.ndarray:
    faces = _array(name, value, 3, np.int64)
    if len(faces) == 0:
        raise BakeError(f"bake: {name} is empty")
    if faces.min() < 0 or faces.max() >= num_vertices:
        raise BakeError(f"bake: {name} index vertices in [{faces.min()}, {faces.max()}] but there are "
                        f"{num_vertices} vertices")
    return faces


def _mesh(positions: Any, normals: Any, uvs: Any, faces: Any
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pos = _array("positions", positions, 3, np.float64)
    nrm = _array("normals", normals, 3, np.float64)
    uv = _array("uvs", uvs, 2, np.float64)
    if not len(pos) == len(nrm) == len(uv):
        raise BakeError(f"bake: positions, normals and uvs must have one row per vertex, got "
                        f"{len(pos)}, {len(nrm)} and {len(uv)}")
    return pos, nrm, uv, _faces("faces", faces, len(pos))


# ---------------------------------------------------------------------------
# Small geometry helpers (numpy, rows of vectors).


def _normalize(v: np.ndarray, eps: float = 1e-20) -> np.ndarray:
    length = np.sqrt(np.einsum("...i,...i->...", v, v))[..., None]
    return v / np.maximum(length, eps)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b)


def _scatter(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Sum rows of ``values`` (N, C) into ``size`` rows by ``index`` (N,)."""
    return np.stack([np.bincount(index, values[:, c], minlength=size) for c in range(values.shape[1])], axis=1)


def _cross3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross products of (3, N) component arrays (much faster than ``np.cross`` on (N, 3))."""
    return np.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _any_perpendicular(n: np.ndarray) -> np.ndarray:
    axis = np.where(np.abs(n[:, :1]) < 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
    return _normalize(axis - n * _dot(axis, n)[:, None])


def vertex_normals(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) float64 area-weighted unit vertex normals of counter-clockwise triangles
    (:func:`avatar.export.mesh.smooth_normals`, the normals the exporter writes)."""
    from avatar.export.mesh import smooth_normals

    return smooth_normals(np.asarray(positions, dtype=np.float64), np.asarray(faces, dtype=np.int64)).astype(
        np.float64)


def vertex_tangents(positions: Any, normals: Any, uvs: Any, faces: Any) -> np.ndarray:
    """Per-vertex tangent frames from UV derivatives: glTF's ``TANGENT`` attribute.

    positions: (V, 3); normals: (V, 3) unit; uvs: (V, 2) in glTF's convention (v down);
    faces: (F, 3) counter-clockwise.

    Returns (V, 4) float32: xyz is the unit tangent along increasing u (each face's
    dP/du, area-weighted, made orthogonal to the normal by Gram-Schmidt, Lengyel 2001,
    "Computing tangent space basis vectors for an arbitrary mesh"), w = +-1 is the
    handedness such that ``bitangent = cross(normal, tangent) * w`` points up the image
    (decreasing v), as glTF's "+Y up" normal textures need. Mirrored UVs flip w.
    A vertex whose faces have no UV area gets a tangent perpendicular to its normal
    and w = 1.
    """
    pos, nrm, uv, f = _mesh(positions, normals, uvs, faces)
    nrm = _normalize(nrm)
    e1, e2 = pos[f[:, 1]] - pos[f[:, 0]], pos[f[:, 2]] - pos[f[:, 0]]
    d1, d2 = uv[f[:, 1]] - uv[f[:, 0]], uv[f[:, 2]] - uv[f[:, 0]]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    scale = np.abs(d1).sum(1) * np.abs(d2).sum(1)
    ok = np.abs(det) > 1e-12 * np.maximum(scale, 1e-30)
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)[:, None]
    dp_du = (e1 * d2[:, 1:] - e2 * d1[:, 1:]) * inv
    dp_dv = (e2 * d1[:, :1] - e1 * d2[:, :1]) * inv
    area = 0.5 * np.linalg.norm(np.cross(e1, e2), axis=1)[:, None] * ok[:, None]
    t_acc = _scatter(f.reshape(-1), np.repeat(_normalize(dp_du) * area, 3, axis=0), len(pos))
    v_acc = _scatter(f.reshape(-1), np.repeat(_normalize(dp_dv) * area, 3, axis=0), len(pos))
    t = t_acc - nrm * _dot(t_acc, nrm)[:, None]
    length = np.linalg.norm(t, axis=1)
    t = np.where((length > 1e-12)[:, None], t / np.maximum(length, 1e-30)[:, None], _any_perpendicular(nrm))
    # Up the image is -dP/dv (glTF's v grows downward).
    w = np.where(_dot(np.cross(nrm, t), -v_acc) < 0.0, -1.0, 1.0)
    return np.concatenate([t, w[:, None]], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# The texels of the low-poly mesh.


@dataclass
class _Texels:
    """Covered texels: flat index into the (S, S) image, and the interpolated point and
    frame there (float32; the frame's vectors each normalised, as a shader does)."""

    index: np.ndarray  # (N,) int64
    point: np.ndarray  # (N, 3)
    normal: np.ndarray  # (N, 3) unit
    tangent: np.ndarray  # (N, 3) unit
    bitangent: np.ndarray  # (N, 3) unit


def _interp(values: np.ndarray, faces: np.ndarray, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """(N, C) values of the vertices of triangles ``tri`` (N,) mixed by ``bary`` (N, 3)."""
    corners = faces[tri]
    return (bary[:, :1] * values[corners[:, 0]] + bary[:, 1:2] * values[corners[:, 1]]
            + bary[:, 2:] * values[corners[:, 2]])


def _texels(pos: np.ndarray, nrm: np.ndarray, uv: np.ndarray, faces: np.ndarray, tangents: np.ndarray,
            size: int, engine: str) -> _Texels:
    from avatar.ops.raster import interpolate

    faces_t = torch.as_tensor(faces, dtype=torch.int32).contiguous()
    rast = rasterize_uv(torch.as_tensor(uv, dtype=torch.float32), faces_t, size, engine)
    unit_n = _normalize(nrm)
    bitangent = np.cross(unit_n, tangents[:, :3].astype(np.float64)) * tangents[:, 3:].astype(np.float64)
    attr = np.concatenate([pos, unit_n, tangents[:, :3], bitangent], axis=1).astype(np.float32)
    index = np.flatnonzero(rast[0, ..., 3].reshape(-1).numpy() > 0)
    with torch.no_grad():
        values = interpolate(torch.from_numpy(attr), rast, faces_t, engine=engine)[0].reshape(-1, 12)
    values = values.numpy()[index]
    return _Texels(index=index, point=values[:, 0:3], normal=_normalize(values[:, 3:6]),
                   tangent=_normalize(values[:, 6:9]), bitangent=_normalize(values[:, 9:12]))


# ---------------------------------------------------------------------------
# Ray search against the target.


@dataclass
class _Target:
    vertices: np.ndarray  # (Vt, 3) float64
    faces: np.ndarray  # (Ft, 3)
    soa: np.ndarray  # (12, Ft) float32: corner 0, corner 1 - corner 0, corner 2 - corner 0, unit normal
    face_normal: np.ndarray  # (Ft, 3) float64 unit
    vertex_normal: np.ndarray  # (Vt, 3) float64 unit
    tree: Any  # cKDTree over (centroid, orientation * face normal)
    orientation: float  # metres per unit of normal difference in the tree's metric

    def query(self, points: np.ndarray, normals: np.ndarray, k: int) -> np.ndarray:
        """(N, k) triangles nearest ``points`` (N, 3) in the tree's metric (see :func:`_target`)."""
        _, cand = self.tree.query(np.concatenate([points, self.orientation * normals], axis=1), k=k, workers=-1)
        return cand.reshape(len(points), k)


def _target(vertices: np.ndarray, faces: np.ndarray, orientation: float) -> _Target:
    """The target's triangles ready for the ray search. The KD-tree holds each triangle as
    (centroid, ``orientation`` * unit normal) and is queried with (point, ``orientation`` *
    normal): a triangle facing away (the other lip 1 mm off) ranks as if it were about
    2 * ``orientation`` farther, so it does not crowd out the surface the ray is meant to hit."""
    from scipy.spatial import cKDTree

    tri = vertices[faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    face_normal = _normalize(np.cross(e1, e2))
    soa = np.ascontiguousarray(np.concatenate([tri[:, 0], e1, e2, face_normal], axis=1).T, dtype=np.float32)
    tree = cKDTree(np.concatenate([tri.mean(axis=1), orientation * face_normal], axis=1))
    return _Target(vertices=vertices, faces=faces, soa=soa, face_normal=face_normal,
                   vertex_normal=vertex_normals(vertices, faces), tree=tree, orientation=orientation)


def _cast(target: _Target, origin: np.ndarray, direction: np.ndarray, cand: np.ndarray, max_distance: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-sided rays ``origin + t direction`` (N, 3) against candidate triangles (N, K)
    (Moeller and Trumbore 1997): per ray the hit with the smallest |t| <= max_distance on
    a triangle facing the way ``direction`` does. Returns found (N,) bool, t (N,),
    triangle (N,), barycentrics (N, 3) of the triangle's corners 0, 1, 2.

    Component arrays of (N, K) float32 throughout: several times faster in numpy than
    (N, K, 3) arrays with ``np.cross``."""
    v0x, v0y, v0z, e1x, e1y, e1z, e2x, e2y, e2z, nx, ny, nz = target.soa[:, cand]
    o = origin.astype(np.float32)
    d = direction.astype(np.float32)
    ox, oy, oz = o[:, 0:1], o[:, 1:2], o[:, 2:3]
    dx, dy, dz = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    px, py, pz = dy * e2z - dz * e2y, dz * e2x - dx * e2z, dx * e2y - dy * e2x  # d x e2
    det = e1x * px + e1y * py + e1z * pz
    ok = (nx * dx + ny * dy + nz * dz > 0.0) & (np.abs(det) > 1e-12)
    inv = 1.0 / np.where(ok, det, 1.0)
    tx, ty, tz = ox - v0x, oy - v0y, oz - v0z
    u = (tx * px + ty * py + tz * pz) * inv
    qx, qy, qz = ty * e1z - tz * e1y, tz * e1x - tx * e1z, tx * e1y - ty * e1x  # (o - v0) x e1
    v = (dx * qx + dy * qy + dz * qz) * inv
    t = (e2x * qx + e2y * qy + e2z * qz) * inv
    tol = 1e-5
    ok &= (u >= -tol) & (v >= -tol) & (u + v <= 1.0 + tol) & (np.abs(t) <= max_distance)
    score = np.where(ok, np.abs(t), np.inf)
    best = np.argmin(score, axis=1)
    rows = np.arange(len(cand))
    found = np.isfinite(score[rows, best])
    u, v = np.clip(u[rows, best], 0.0, 1.0), np.clip(v[rows, best], 0.0, 1.0)
    total = np.maximum(u + v, 1.0)
    u, v = u / total, v / total
    bary = np.stack([1.0 - u - v, u, v], axis=1).astype(np.float64)
    return found, t[rows, best].astype(np.float64), cand[rows, best], bary


def _nearest(target: _Target, points: np.ndarray, normals: np.ndarray, cand: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest point on the candidate triangles (N, K), preferring triangles facing the
    way ``normals`` do. Returns distance (N,), point (N, 3), triangle (N,), barycentrics (N, 3)."""
    from trimesh.triangles import closest_point, points_to_barycentric

    n, k = cand.shape
    tris = target.vertices[target.faces[cand.reshape(-1)]]
    q = closest_point(tris, np.repeat(points, k, axis=0)).reshape(n, k, 3)
    dist = np.linalg.norm(q - points[:, None, :], axis=2)
    facing = _dot(target.face_normal[cand], normals[:, None, :]) > 0.0
    score = np.where(facing, dist, dist + 1e3)
    best = np.argmin(score, axis=1)
    rows = np.arange(n)
    tri = cand[rows, best]
    point = q[rows, best]
    bary = points_to_barycentric(target.vertices[target.faces[tri]], point)
    bary = np.clip(np.nan_to_num(bary, nan=1.0 / 3.0), 0.0, 1.0)
    bary /= np.maximum(bary.sum(1, keepdims=True), 1e-12)
    return dist[rows, best], point, tri, bary


def _search(target: _Target, points: np.ndarray, normals: np.ndarray, max_distance: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each texel's ray meets the target. Returns how (N,) int8 (2 ray hit,
    1 nearest point, 0 nothing), point (N, 3), triangle (N,), barycentrics (N, 3); the
    last three hold the nearest candidate point where nothing was found."""
    points, normals = points.astype(np.float64), normals.astype(np.float64)
    k1, k = min(FIRST_CANDIDATES, len(target.faces)), min(CANDIDATES, len(target.faces))
    cand = target.query(points, normals, k1)
    found, t, tri, bary = _cast(target, points, normals, cand, max_distance)
    how = np.where(found, 2, 0).astype(np.int8)
    point = points + t[:, None] * normals
    miss = np.flatnonzero(~found)
    if len(miss) and k > k1:  # the few rays that missed the nearest triangles: more of them
        cand = target.query(points[miss], normals[miss], k)
        ok, t1, tri1, bary1 = _cast(target, points[miss], normals[miss], cand, max_distance)
        rows = miss[ok]
        how[rows], point[rows] = 2, points[rows] + t1[ok, None] * normals[rows]
        tri[rows], bary[rows] = tri1[ok], bary1[ok]
        miss, cand = miss[~ok], cand[~ok]
    elif len(miss):
        cand = cand[miss]
    if len(miss):
        dist, q, qtri, qbary = _nearest(target, points[miss], normals[miss], cand)
        # Second try: around where the ray meets the tangent plane at the nearest point.
        nq = target.face_normal[qtri]
        cos = _dot(normals[miss], nq)
        t_plane = _dot(q - points[miss], nq) / np.where(np.abs(cos) > 0.3, cos, np.inf)
        retry = np.flatnonzero((np.abs(t_plane) <= max_distance) & (np.abs(t_plane) > 0.0))
        if len(retry):
            rows = miss[retry]
            guess = points[rows] + t_plane[retry, None] * normals[rows]
            cand2 = target.query(guess, normals[rows], k)
            ok2, t2, tri2, bary2 = _cast(target, points[rows], normals[rows], cand2, max_distance)
            hit_rows, hit_local = rows[ok2], retry[ok2]
            how[hit_rows] = 2
            point[hit_rows] = points[hit_rows] + t2[ok2, None] * normals[hit_rows]
            tri[hit_rows], bary[hit_rows] = tri2[ok2], bary2[ok2]
            keep = np.ones(len(miss), dtype=bool)
            keep[hit_local] = False
            miss, dist, q, qtri, qbary = miss[keep], dist[keep], q[keep], qtri[keep], qbary[keep]
        how[miss] = np.where(dist <= max_distance, 1, 0)
        point[miss], tri[miss], bary[miss] = q, qtri, qbary
    return how, point, tri, bary


# ---------------------------------------------------------------------------
# Ambient occlusion.


def fibonacci_directions(count: int) -> np.ndarray:
    """(count, 3) unit directions spread evenly over the sphere (the Fibonacci lattice)."""
    i = np.arange(count, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / count
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def ambient_occlusion(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | None = None,
                      directions: int = 64, resolution: int = AO_RESOLUTION, engine: str = "auto",
                      batch: int = 8) -> np.ndarray:
    """(V,) float64 ambient occlusion in [0, 1] (1 = open sky) at the vertices of a mesh.

    For each of ``directions`` Fibonacci directions ``d`` an orthographic depth map of the
    mesh is rasterised looking along ``-d``; a vertex sees ``d`` when its depth is within
    a bias of the map's at its pixel. The result is the cosine-weighted fraction of the
    vertex's hemisphere (about ``normals``) that it sees, the usual definition of ambient
    occlusion (Zhukov et al. 1998) with visibility from shadow maps (Williams 1978).
    """
    from avatar.ops.raster import rasterize

    v = np.asarray(vertices, dtype=np.float64)
    nrm = vertex_normals(v, faces) if normals is None else _normalize(np.asarray(normals, dtype=np.float64))
    dirs = fibonacci_directions(directions)
    centre = 0.5 * (v.min(0) + v.max(0))
    radius = float(np.linalg.norm(v - centre, axis=1).max()) * 1.01 + 1e-9
    pixel = 2.0 * radius / resolution
    rel = ((v - centre) / radius).astype(np.float32)
    nrm32 = nrm.astype(np.float32)
    faces_t = torch.as_tensor(np.asarray(faces), dtype=torch.int32).contiguous()
    seen = np.zeros(len(v), dtype=np.float32)
    weight = np.zeros(len(v), dtype=np.float32)
    for start in range(0, len(dirs), batch):
        group = dirs[start:start + batch]
        count = len(group)
        helper = np.where(np.abs(group[:, :1]) < 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
        a = _normalize(np.cross(group, helper))
        b = np.cross(group, a)
        # Orthographic view along -d: x, y across, z = -depth towards the light (nearest: smallest z).
        axes = np.stack([a, b, -group], axis=0).astype(np.float32)  # (3, B, 3)
        xyz = np.einsum("vc,kbc->kbv", rel, axes)  # (3, B, V) in [-1, 1]
        clip = np.concatenate([xyz, np.ones((1, count, len(v)), dtype=np.float32)], axis=0).transpose(1, 2, 0)
        rast, _ = rasterize(torch.from_numpy(np.ascontiguousarray(clip)), faces_t, (resolution, resolution),
                            engine=engine)
        depth = torch.where(rast[..., 3] > 0, rast[..., 2], 2.0).reshape(-1).numpy()
        x, y, z = xyz
        col = np.clip(((x + 1.0) * (0.5 * resolution)).astype(np.int64), 0, resolution - 1)
        row = np.clip(((y + 1.0) * (0.5 * resolution)).astype(np.int64), 0, resolution - 1)
        flat = (np.arange(count)[:, None] * resolution + row) * resolution + col
        cos = group.astype(np.float32) @ nrm32.T  # (B, V)
        # Shadow-map bias: a pixel of slope at the vertex's angle to the light, plus a pixel.
        tan = np.sqrt(np.maximum(0.0, 1.0 - cos * cos)) / np.maximum(cos, 0.2)
        bias = (pixel / radius) * (1.5 + 1.5 * tan)
        w = np.maximum(cos, 0.0)
        seen += (w * (z <= depth[flat] + bias)).sum(0)
        weight += w.sum(0)
    return np.where(weight > 0, seen / np.maximum(weight, 1e-12), 1.0).astype(np.float64)


# ---------------------------------------------------------------------------
# Encoding.


def _encode_unit(values: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 by ``round(127.5 x + 127.5)``, with 0 to 128 exactly (not 127 for -1e-9)."""
    return np.clip(np.round(values * 127.5 + 127.51), 0, 255).astype(np.uint8)


def _tangent_space(texels: _Texels, rows: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(N, 3) unit ``m`` with ``normalize(T m_x + B m_y + N m_z) = normal`` at texels ``rows``:
    the exact inverse of the shader's decode over the interpolated frame."""
    t, b, n = (x[rows].T for x in (texels.tangent, texels.bitangent, texels.normal))  # (3, N) float32
    h = normal.T.astype(np.float32)
    # Cramer's rule: the rows of the inverse of [T B N] are (B x N, N x T, T x B) / det.
    bn, nt, tb = _cross3(b, n), _cross3(n, t), _cross3(t, b)
    det = (t * bn).sum(0)
    good = np.abs(det) > 1e-6
    m = np.stack([(bn * h).sum(0), (nt * h).sum(0), (tb * h).sum(0)], axis=1) / np.where(good, det, 1.0)[:, None]
    if not good.all():  # a degenerate frame: its transpose
        m[~good] = np.stack([(t * h).sum(0), (b * h).sum(0), (n * h).sum(0)], axis=1)[~good]
    return _normalize(m)


def shading_normals(normal_map: np.ndarray, positions: Any, normals: Any, uvs: Any, faces: Any,
                    tangents: Any, engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """What a glTF viewer shades with: per texel of ``normal_map`` (S, S, 3) uint8 the world
    normal ``normalize(T m_x + B m_y + N m_z)``, T, B = cross(N, tangent) * w and N the
    interpolated, normalised vertex frame of the low-poly mesh and m the decoded texel
    (``c / 255 * 2 - 1``). Returns ((S, S, 3) float64 unit normals, zero where uncovered;
    (S, S) bool coverage). For fidelity checks against the surface the map was baked from."""
    pos, nrm, uv, f = _mesh(positions, normals, uvs, faces)
    tan = _array("tangents", tangents, 4, np.float64)
    size = int(normal_map.shape[0])
    texels = _texels(pos, nrm, uv, f, tan, size, engine)
    m = normal_map.reshape(-1, 3)[texels.index].astype(np.float64) / 255.0 * 2.0 - 1.0
    t, b, n = (x.astype(np.float64) for x in (texels.tangent, texels.bitangent, texels.normal))
    world = _normalize(t * m[:, :1] + b * m[:, 1:2] + n * m[:, 2:])
    out = np.zeros((size * size, 3))
    out[texels.index] = world
    cover = np.zeros(size * size, dtype=bool)
    cover[texels.index] = True
    return out.reshape(size, size, 3), cover.reshape(size, size)


# ---------------------------------------------------------------------------
# The bake.


def _albedo_at(albedo: Callable[[torch.Tensor], Any] | None, points: np.ndarray, chunk: int = 1 << 18
               ) -> np.ndarray:
    if albedo is None:
        return np.full((len(points), 3), 0.7)
    out = []
    with torch.no_grad():
        for start in range(0, len(points), chunk):
            value = albedo(torch.as_tensor(points[start:start + chunk], dtype=torch.float32))
            if isinstance(value, torch.Tensor):
                value = value.detach().float().cpu().numpy()
            out.append(np.asarray(value, dtype=np.float64).reshape(-1, 3))
    return np.clip(np.concatenate(out) if out else np.zeros((0, 3)), 0.0, 1.0)


def bake_maps(positions: Any, normals: Any, uvs: Any, faces: Any, target_vertices: Any, target_faces: Any,
              albedo: Callable[[torch.Tensor], Any] | None, size: int = 2048, *, max_distance: float = 0.01,
              roughness: float = 0.6, ao_directions: int = 64, engine: str = "auto") -> BakedMaps:
    """Bake base colour, tangent-space normal and ORM maps of a high-detail surface onto a
    low-poly mesh's UV layout (see the module docstring for the method).

    positions: (V, 3) low-poly vertices, metres; normals: (V, 3) its vertex normals (what
        the export writes as NORMAL); uvs: (V, 2) in [0, 1], glTF convention (v = 0 is the
        image's top row); faces: (F, 3) counter-clockwise.
    target_vertices: (Vt, 3) metres, target_faces: (Ft, 3): the generated surface.
    albedo: points (N, 3) float32 torch tensor in metres -> (N, 3) in [0, 1] (tensor or
        array), e.g. the run's texture field behind a change of frame; None gives grey.
    size: side of the square maps in texels. max_distance: how far (metres) along the
        normal, either way, the target is looked for. roughness: the constant G of the
        ORM map. ao_directions: directions of the ambient occlusion (0: none, R = 255).
    engine: rasteriser engine (:mod:`avatar.ops.engine`).
    """
    timings: dict[str, float] = {}
    start_all = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    pos, nrm, uv, f = _mesh(positions, normals, uvs, faces)
    tv = _array("target_vertices", target_vertices, 3, np.float64)
    tf = _faces("target_faces", target_faces, len(tv))
    if not isinstance(size, (int, np.integer)) or not 8 <= size <= 16384:
        raise BakeError(f"bake: size must be an integer texel count in [8, 16384], got {size!r}")
    if not (isinstance(max_distance, (int, float)) and math.isfinite(max_distance) and max_distance > 0):
        raise BakeError(f"bake: max_distance must be a positive number of metres, got {max_distance!r}")
    if not (isinstance(roughness, (int, float)) and 0.0 <= roughness <= 1.0):
        raise BakeError(f"bake: roughness must be in [0, 1], got {roughness!r}")
    if not isinstance(ao_directions, (int, np.integer)) or ao_directions < 0:
        raise BakeError(f"bake: ao_directions must be a non-negative integer, got {ao_directions!r}")
    if albedo is not None and not callable(albedo):
        raise BakeError(f"bake: albedo must be a callable (points -> colours) or None, got {type(albedo).__name__}")
    size = int(size)

    tangents = vertex_tangents(pos, nrm, uv, f)
    lap("tangents")
    texels = _texels(pos, nrm, uv, f, tangents, size, engine)
    n = len(texels.index)
    lap("raster")
    target = _target(tv, tf, ORIENTATION * float(max_distance))
    lap("index")
    how = np.zeros(n, dtype=np.int8)
    where = np.zeros((n, 3))
    tri = np.zeros(n, dtype=np.int64)
    bary = np.zeros((n, 3))
    for s in range(0, n, CHUNK):
        part = slice(s, s + CHUNK)
        how[part], where[part], tri[part], bary[part] = _search(target, texels.point[part], texels.normal[part],
                                                                float(max_distance))
    lap("search")

    found = how > 0
    colour_at = np.where(found[:, None], where, texels.point)
    colour = _albedo_at(albedo, colour_at)
    lap("albedo")

    tangent_normal = np.tile(np.array([0.0, 0.0, 1.0]), (n, 1))
    rows = np.flatnonzero(found)
    if len(rows):
        surface_normal = _normalize(_interp(target.vertex_normal.astype(np.float32), tf, tri[rows],
                                            bary[rows].astype(np.float32)))
        tangent_normal[rows] = _tangent_space(texels, rows, surface_normal)
    lap("normal")

    if ao_directions > 0:
        ao_vertex = ambient_occlusion(tv, tf, target.vertex_normal, directions=int(ao_directions), engine=engine)
        occlusion = np.clip(np.einsum("nk,nk->n", bary, ao_vertex[tf[tri]]), 0.0, 1.0)
    else:
        occlusion = np.ones(n)
    lap("ao")

    images = np.zeros((size * size, 9), dtype=np.uint8)
    images[texels.index, 0:3] = np.round(colour * 255.0).astype(np.uint8)
    images[texels.index, 3:6] = _encode_unit(tangent_normal)
    images[texels.index, 6] = np.round(occlusion * 255.0).astype(np.uint8)
    images[texels.index, 7] = int(round(roughness * 255.0))
    coverage = np.zeros(size * size, dtype=bool)
    coverage[texels.index] = True
    coverage = coverage.reshape(size, size)
    images = images.reshape(size, size, 9)
    if n:
        images = dilate(images, coverage)
    else:  # no chart at all: flat normal, open, the constant roughness
        images[..., 3:6] = (128, 128, 255)
        images[..., 6:8] = (255, int(round(roughness * 255.0)))
    lap("dilate")
    timings["total"] = time.perf_counter() - start_all
    stats = {"seconds": {k: round(v, 4) for k, v in timings.items()}, "size": size, "texels": int(n),
             "coverage": float(n) / (size * size), "hit": int((how == 2).sum()),
             "nearest": int((how == 1).sum()), "missed": int((how == 0).sum()),
             "target_faces": int(len(tf)), "faces": int(len(f))}
    return BakedMaps(base_colour=np.ascontiguousarray(images[..., 0:3]),
                     normal=np.ascontiguousarray(images[..., 3:6]), orm=np.ascontiguousarray(images[..., 6:9]),
                     coverage=coverage, tangents=tangents, stats=stats)


__all__ = ["BakeError", "BakedMaps", "ambient_occlusion", "bake_maps", "fibonacci_directions", "shading_normals",
           "vertex_normals", "vertex_tangents"]
