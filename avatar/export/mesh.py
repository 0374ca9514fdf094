"""The export mesh: extraction at export resolution, cleanup, decimation, normals.

A fine run's surface is the zero level set of the DMTet signed distance. Training
may use a coarse grid (22 cells along the head's box for the smoke preset: 2.5 cm
facets), so the exporter resamples the grid's SDF and deformation trilinearly onto a
finer lattice and runs marching tetrahedra again, only in the cells the surface crosses
(:func:`extract_surface`). The result is cleaned (:func:`clean_mesh`: degenerate
faces, small floating components), decimated with a quadric simplifier
(fast-simplification, Garland & Heckbert 1997) and given smooth vertex normals.

Everything here works in field units on the CPU with float32/float64 NumPy or
torch arrays; callers convert to metres.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from avatar.ops.marching_tets import TetGridSpec, lattice_tetrahedra, marching_tetrahedra

MAX_EXPORT_RESOLUTION = 192
"""Finest lattice extraction resamples to, as cells across the field cube (a 4 mm cell at the
default frame); :func:`export_resolution_cap` turns it into cells along a grid's longest side."""


def export_resolution_cap(spec: TetGridSpec, bound: float) -> int:
    """The most cells along ``spec``'s longest side that extraction resamples to: cells no
    smaller than the field cube's ``2 * bound / MAX_EXPORT_RESOLUTION``, never below training's."""
    extent = spec.resolution * spec.cell
    return max(spec.resolution, int(MAX_EXPORT_RESOLUTION * extent / (2.0 * bound) + 1e-6))


def _grid_values(geometry) -> tuple[torch.Tensor, torch.Tensor, TetGridSpec]:
    """The DMTet grid as volumes: sdf (1, 1, nx+1, ny+1, nz+1) and vertex offsets
    (1, 3, nx+1, ny+1, nz+1), indexed [x, y, z] as :func:`tetrahedral_grid` lays them out."""
    spec = geometry.spec
    with torch.no_grad():
        sdf = geometry.sdf.detach().float().reshape(1, 1, *spec.vertex_shape)
        offset = (geometry.vertices() - geometry.grid_verts).detach().float()
        offset = offset.reshape(*spec.vertex_shape, 3).permute(3, 0, 1, 2)[None]
    return sdf.cpu(), offset.cpu(), spec


def _sample(volume: torch.Tensor, points: torch.Tensor, spec: TetGridSpec) -> torch.Tensor:
    """Trilinear lookup of a (1, C, X, Y, Z) volume over ``spec``'s box at (N, 3) points -> (N, C)."""
    origin = points.new_tensor(spec.origin)
    extent = points.new_tensor(spec.cells) * spec.cell
    # grid_sample reads (x, y, z) as (W, H, D): our volume is [x, y, z] = [D, H, W], so flip.
    grid = (2.0 * (points - origin) / extent - 1.0).flip(-1).view(1, -1, 1, 1, 3)
    out = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", align_corners=True, padding_mode="border")
    return out.view(volume.shape[1], -1).T


def choose_resolution(train_resolution: int, train_faces: int, target_faces: int,
                      max_resolution: int = MAX_EXPORT_RESOLUTION) -> int:
    """Export lattice resolution (cells along the grid's longest side): enough cells that
    marching tetrahedra gives about twice the target face count (faces grow with the square
    of the resolution), never below training's, at most ``max_resolution``
    (:func:`export_resolution_cap`)."""
    if train_faces <= 0:
        return train_resolution
    wanted = train_resolution * math.sqrt(2.0 * target_faces / train_faces)
    return int(min(max(train_resolution, math.ceil(wanted / 8) * 8), max(train_resolution, max_resolution)))


def extract_surface(geometry, resolution: int, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Marching tetrahedra on the DMTet geometry resampled to ``resolution`` cells along its
    grid's longest side (same box, smaller cubic cells).

    geometry: :class:`~avatar.fields.dmtet.DMTetGeometry`. The SDF and the vertex
    offsets are interpolated trilinearly; only cells whose eight corners do not all
    share a sign get tetrahedra (Kuhn's six per cell, :func:`lattice_tetrahedra`).
    Returns vertices (M, 3) float32 field units and faces (F, 3) int64, outward.
    """
    sdf_vol, offset_vol, spec = _grid_values(geometry)
    n = spec.resolution
    if resolution <= n:
        with torch.no_grad():
            verts, faces = geometry.extract()
        return verts.detach().float().cpu(), faces.long().cpu()
    cell = spec.cell * n / int(resolution)
    origin = torch.tensor(spec.origin)
    last = torch.tensor([int(c * spec.cell / cell + 1e-6) for c in spec.cells])  # last lattice index per axis
    # Only the box around the training surface needs the fine lattice.
    inside = (sdf_vol[0, 0] < 0).nonzero()
    if inside.numel() == 0:
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    lo_w = origin + (inside.min(0).values.float() - 2) * spec.cell
    hi_w = origin + (inside.max(0).values.float() + 2) * spec.cell
    lo = torch.minimum(torch.clamp(torch.floor((lo_w - origin) / cell), min=0).long(), last)
    hi = torch.minimum(torch.clamp(torch.ceil((hi_w - origin) / cell), min=0).long(), last)
    size = (hi - lo + 1).tolist()  # lattice points per axis in the box
    axes = [spec.origin[a] + (lo[a] + torch.arange(size[a])).double() * cell for a in range(3)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3).float()
    sdf = torch.cat([_sample(sdf_vol, p, spec)[:, 0] for p in points.split(chunk)])
    offset = torch.cat([_sample(offset_vol, p, spec) for p in points.split(chunk)])
    verts = points + offset
    # Cells whose corners change sign.
    sign = (sdf < 0).view(*size)
    corners = [sign[i:size[0] - 1 + i, j:size[1] - 1 + j, k:size[2] - 1 + k]
               for i, j, k in itertools.product((0, 1), repeat=3)]
    any_in = torch.stack(corners).any(0)
    all_in = torch.stack(corners).all(0)
    cells = (any_in & ~all_in).nonzero()  # (C, 3)
    if cells.numel() == 0:
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    tets = lattice_tetrahedra(cells, (size[0], size[1], size[2]))
    used, tets = torch.unique(tets, return_inverse=True)
    with torch.no_grad():
        mesh_v, mesh_f = marching_tetrahedra(verts[used], tets, sdf[used])
    return mesh_v.float(), mesh_f.long()


def face_areas(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = verts[faces]
    return 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)


def remove_unreferenced(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop vertices no face uses. Returns vertices, re-indexed faces and the kept vertex ids."""
    used, inverse = np.unique(faces.reshape(-1), return_inverse=True)
    return verts[used], inverse.reshape(-1, 3).astype(np.int64), used


def clean_mesh(verts: np.ndarray, faces: np.ndarray, min_component_area: float = 0.01,
               min_face_area: float = 1e-12, drop_inner: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Drop degenerate faces (repeated indices or area <= ``min_face_area``), small components
    and inner shells.

    Keeps the largest connected component (by area) plus every component of at least
    ``min_component_area`` times its area (a hat or an ear ring that is not touching
    the head stays; marching-tetrahedra specks go), less, with ``drop_inner``, every closed
    component wholly inside another (:func:`_inner_shells`). Unused vertices are removed.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return verts[:0], faces
    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    areas = face_areas(verts, faces)
    keep = ~repeated & (areas > min_face_area)
    faces, areas = faces[keep], areas[keep]
    if len(faces) == 0:
        return verts[:0], faces
    # Components of the face graph (faces joined through shared vertices).
    n_v = len(verts)
    rows = np.repeat(np.arange(len(faces)), 3)
    incidence = coo_matrix((np.ones(rows.size), (rows, faces.reshape(-1))), shape=(len(faces), n_v)).tocsr()
    count, labels = connected_components(incidence.T @ incidence, directed=False)
    face_label = labels[faces[:, 0]]
    comp_area = np.bincount(face_label, weights=areas, minlength=count)
    keep_comp = comp_area >= min_component_area * comp_area.max()
    if drop_inner and keep_comp.sum() > 1:
        keep_comp &= ~_inner_shells(verts, faces, face_label, keep_comp, comp_area)
    faces = faces[keep_comp[face_label]]
    v, f, _ = remove_unreferenced(verts, faces)
    return v, f


def winding_number(points: np.ndarray, verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Generalised winding number of a triangle mesh at (P, 3) points (Jacobson et al. 2013,
    "Robust inside-outside segmentation using generalized winding numbers"; the solid angle of
    each triangle by Van Oosterom & Strackee 1983): about 1 inside a closed outward surface, 0
    outside, and still meaningful where the surface has small holes."""
    tri = verts[faces]  # (F, 3, 3)
    out = np.zeros(len(points))
    for k, p in enumerate(points):
        a, b, c = tri[:, 0] - p, tri[:, 1] - p, tri[:, 2] - p
        la, lb, lc = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1), np.linalg.norm(c, axis=1)
        det = np.einsum("ij,ij->i", a, np.cross(b, c))
        div = (la * lb * lc + np.einsum("ij,ij->i", a, b) * lc + np.einsum("ij,ij->i", b, c) * la
               + np.einsum("ij,ij->i", c, a) * lb)
        out[k] = np.arctan2(det, div).sum() / (2.0 * np.pi)
    return out


def _inner_shells(verts: np.ndarray, faces: np.ndarray, face_label: np.ndarray, keep: np.ndarray,
                  comp_area: np.ndarray, samples: int = 4) -> np.ndarray:
    """(C,) True for a kept component that is closed (every edge in two of its faces) and lies
    wholly inside a larger kept component (winding number > 1/2 at ``samples`` of its vertices):
    an inner wall marching tetrahedra leaves inside the head, which no one sees and which
    doubles the mesh, the atlas and the rig for nothing."""
    inner = np.zeros(len(keep), dtype=bool)
    order = [c for c in np.argsort(-comp_area) if keep[c]]
    for rank, c in enumerate(order[1:], start=1):
        own = faces[face_label == c]
        edges = np.sort(own[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        _, uses = np.unique(edges, axis=0, return_counts=True)
        if not (uses == 2).all():
            continue
        used = np.unique(own)
        pick = used[np.linspace(0, len(used) - 1, min(samples, len(used))).astype(np.int64)]
        for outer in order[:rank]:
            if not inner[outer] and (winding_number(verts[pick], verts, faces[face_label == outer]) > 0.5).all():
                inner[c] = True
                break
    return inner


def taubin_smooth(verts: np.ndarray, faces: np.ndarray, iterations: int = 10, lamb: float = 0.5,
                  mu: float = -0.53) -> np.ndarray:
    """Taubin's lambda|mu smoothing (Taubin 1995, "A signal processing approach to fair surface
    design") with uniform weights: removes the cell-sized facets marching tetrahedra leaves on
    a trilinearly resampled SDF without shrinking the head. Returns new vertices (V, 3)."""
    from scipy.sparse import coo_matrix, diags

    if iterations <= 0 or len(faces) == 0:
        return verts
    n = len(verts)
    i = faces[:, [0, 1, 2, 1, 2, 0]].reshape(-1)
    j = faces[:, [1, 2, 0, 0, 1, 2]].reshape(-1)
    adj = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
    adj.data[:] = 1.0  # an edge counts once whichever faces share it
    degree = np.asarray(adj.sum(axis=1)).reshape(-1)
    average = diags(1.0 / np.maximum(degree, 1.0)) @ adj
    v = np.asarray(verts, dtype=np.float64).copy()
    for _ in range(iterations):
        v = v + lamb * (average @ v - v)
        v = v + mu * (average @ v - v)
    return v


def decimate(verts: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation to about ``target_faces`` faces (fast-simplification).

    A mesh already at or under the target is returned unchanged.
    """
    import fast_simplification

    if len(faces) <= target_faces:
        return verts, faces
    reduction = 1.0 - float(target_faces) / float(len(faces))
    v, f = fast_simplification.simplify(np.ascontiguousarray(verts, dtype=np.float32),
                                        np.ascontiguousarray(faces, dtype=np.int32), target_reduction=reduction)
    return np.asarray(v, dtype=np.float64), np.asarray(f, dtype=np.int64)


def smooth_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) float32 area-weighted unit vertex normals (outward for counter-clockwise faces).

    A vertex with no usable face gets +Y, so every normal is unit length (glTF requires it).
    """
    v = verts[faces]
    face_n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])  # length = 2 * area
    normals = np.zeros_like(verts, dtype=np.float64)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_n)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-20, normals / np.maximum(length, 1e-30), np.array([0.0, 1.0, 0.0]))
    normals = normals.astype(np.float32)
    # Renormalise in float32 so the stored vectors pass the validator's unit-length test.
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


__all__ = ["MAX_EXPORT_RESOLUTION", "choose_resolution", "clean_mesh", "decimate", "export_resolution_cap",
           "extract_surface", "face_areas", "remove_unreferenced", "smooth_normals", "taubin_smooth",
           "winding_number"]
