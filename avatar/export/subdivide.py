"""One level of adaptive (red-green) refinement of a triangle mesh to a face budget (issue #18:
the export head subdivided to ``--faces`` with its blendshapes and weights carried through).

Red-green refinement (Bank, Sherman and Weiser 1983, "Some refinement algorithms and data
structures for regular local mesh refinement"; Verfuerth 1996, "A review of a posteriori error
estimation and adaptive mesh-refinement techniques", section 4.1): a *red* triangle is split
into four at its edge midpoints; a neighbour left with one split edge is split into two
(*green*), so that no midpoint hangs on an unsplit edge (no T-junction); a neighbour with two
or three split edges is made red, and so on until nothing changes. The triangles made red are
those of highest priority, as many as keep the mesh within the budget (:func:`refine`).

Every new vertex is the midpoint of an edge, so every per-vertex quantity (positions,
blendshape deltas, skin weights, UVs) is carried by one sparse matrix ``M`` (V' x V):
``x' = M @ x``, the identity on the old vertices and 0.5 / 0.5 on each midpoint
(:attr:`Refinement.matrix`). A mesh split at UV seams (one position at two indices) is refined
with ``keys``, the unsplit index of each vertex: an edge splits when its unsplit edge does, so
the two sides of a seam split together, their midpoints lie at the same position and no crack
opens. Every child keeps its parent's winding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from avatar.errors import AvatarError


class SubdivisionError(AvatarError, ValueError):
    """The refinement was given inputs it cannot use (shapes, indices, NaNs); the message names which."""


@dataclass
class Refinement:
    """One level of red-green refinement of a mesh with V vertices and F faces.

    faces: (F', 3) int64 the refined triangles, counter-clockwise as their parents, each
        parent's children together and in the parents' order.
    matrix: (V', V) scipy CSR: ``M @ x`` carries any per-vertex quantity (:meth:`apply`).
    parents: (V' - V, 2) int64 the edge (lower index first) each new vertex ``V + i`` halves,
        sorted, so the new vertices' order is the edges' lexicographic order.
    face_parent: (F',) int64 the original face of each refined face.
    red: (F,) bool faces split into four; green: (F,) bool faces split into two.
    """

    faces: np.ndarray
    matrix: Any
    parents: np.ndarray
    face_parent: np.ndarray
    red: np.ndarray
    green: np.ndarray

    @property
    def num_vertices(self) -> int:
        """V', the vertices after refinement."""
        return int(self.matrix.shape[0])

    def apply(self, values: Any, axis: int = 0) -> np.ndarray:
        """``values`` with its vertex axis (length V) carried through the refinement (length V').

        E.g. positions (V, 3), weights (V, J), UVs (V, 2), deltas (E, V, 3) with ``axis=1``.
        Returns float64.
        """
        x = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0)
        if x.shape[0] != self.matrix.shape[1]:
            raise SubdivisionError(f"apply: the vertex axis has {x.shape[0]} entries, the refined mesh had "
                                   f"{self.matrix.shape[1]} vertices")
        out = (self.matrix @ x.reshape(len(x), -1)).reshape((self.num_vertices, *x.shape[1:]))
        return np.moveaxis(out, 0, axis)

    def rows_of(self, pairs: np.ndarray) -> np.ndarray:
        """(N,) the new vertex of each edge (N, 2) of old vertices (either order); every edge must
        be one this refinement split."""
        pairs = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
        n = self.matrix.shape[1]
        codes = self.parents[:, 0] * n + self.parents[:, 1]
        want = pairs[:, 0] * n + pairs[:, 1]
        pos = np.searchsorted(codes, want).clip(max=max(len(codes) - 1, 0))
        if len(want) and (not len(codes) or (codes[pos] != want).any()):
            raise SubdivisionError("rows_of: an edge that this refinement did not split")
        return n + pos


def _check(faces: Any, num_vertices: int, keys: Any) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise SubdivisionError(f"faces must be (F, 3) integers, got {f.shape} {f.dtype}")
    f = f.astype(np.int64)
    if f.size and (f.min() < 0 or f.max() >= num_vertices):
        raise SubdivisionError(f"faces index vertices outside 0..{num_vertices - 1}")
    if keys is None:
        return f, np.arange(num_vertices, dtype=np.int64)
    k = np.asarray(keys)
    if k.shape != (num_vertices,) or not np.issubdtype(k.dtype, np.integer):
        raise SubdivisionError(f"keys must be ({num_vertices},) integers (the unsplit index of each vertex), "
                               f"got {k.shape} {k.dtype}")
    return f, k.astype(np.int64)


def _edges(faces: np.ndarray, keys: np.ndarray) -> tuple[int, np.ndarray]:
    """The unsplit edges: how many, and (F, 3) the edge of each face's corners (j, j + 1)."""
    k = keys[faces]
    pairs = np.sort(np.stack([k[:, [0, 1]], k[:, [1, 2]], k[:, [2, 0]]], axis=1).reshape(-1, 2), axis=1)
    if not len(pairs):
        return 0, np.zeros((0, 3), np.int64)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return len(unique), inverse.reshape(-1, 3)


def _closure(edge_of_face: np.ndarray, num_edges: int, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Red faces (seeds and every face they force red) and the split edges."""
    red = seeds.copy()
    while True:
        split = np.zeros(num_edges, bool)
        split[edge_of_face[red].reshape(-1)] = True
        grow = (split[edge_of_face].sum(axis=1) >= 2) & ~red
        if not grow.any():
            return red, split
        red |= grow


def _face_count(edge_of_face: np.ndarray, red: np.ndarray, split: np.ndarray) -> int:
    green = ~red & split[edge_of_face].any(axis=1)
    return int(len(red) + 3 * red.sum() + green.sum())


def refined_face_count(faces: Any, num_vertices: int, red: Any, keys: Any = None) -> int:
    """Faces after :func:`refine_faces` with these red seeds (closure included)."""
    f, k = _check(faces, num_vertices, keys)
    num_edges, edge_of_face = _edges(f, k)
    red_all, split = _closure(edge_of_face, num_edges, np.asarray(red, dtype=bool))
    return _face_count(edge_of_face, red_all, split)


def choose_red(faces: Any, num_vertices: int, priority: Any, budget: int, keys: Any = None) -> np.ndarray:
    """(F,) bool the red faces (closed) of the largest refinement within ``budget`` faces that
    seeds the ``k`` faces of highest ``priority`` (F,) (ties: lower index first): all faces
    when ``budget >= 4 F``, none when ``budget <= F`` (a mesh is never coarsened).

    The face count grows with ``k`` (a larger seed set closes to a superset), so ``k`` is found
    by bisection."""
    f, k = _check(faces, num_vertices, keys)
    p = np.asarray(priority, dtype=np.float64)
    if p.shape != (len(f),) or not np.isfinite(p).all():
        raise SubdivisionError(f"priority must be ({len(f)},) finite numbers, got {p.shape}")
    if int(budget) != budget:
        raise SubdivisionError(f"budget must be a whole number of faces, got {budget!r}")
    num_edges, edge_of_face = _edges(f, k)
    order = np.lexsort((np.arange(len(f)), -p))

    def red_of(count: int) -> tuple[np.ndarray, int]:
        seeds = np.zeros(len(f), bool)
        seeds[order[:count]] = True
        red, split = _closure(edge_of_face, num_edges, seeds)
        return red, _face_count(edge_of_face, red, split)

    red, total = red_of(len(f))
    if total <= budget:
        return red
    lo, hi = 0, len(f)  # count(lo) fits (or lo = 0), count(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if red_of(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    red, total = red_of(lo)
    return red if total <= budget else np.zeros(len(f), bool)


def refine_faces(faces: Any, num_vertices: int, red: Any, keys: Any = None) -> Refinement:
    """Refine with these red faces (F,) bool (closed first: faces with two or three split
    edges made red) and their neighbours green. ``keys`` (V,): the unsplit index of each
    vertex of a seam-split mesh (default: the vertices themselves)."""
    f, k = _check(faces, num_vertices, keys)
    import scipy.sparse as sp

    seeds = np.asarray(red, dtype=bool)
    if seeds.shape != (len(f),):
        raise SubdivisionError(f"red must be ({len(f)},) bool, got {seeds.shape}")
    num_edges, edge_of_face = _edges(f, k)
    red_all, split = _closure(edge_of_face, num_edges, seeds)
    face_split = split[edge_of_face]  # (F, 3): corner j's edge (j, j + 1) is split
    corner_pairs = np.stack([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], axis=1)  # (F, 3, 2)
    wanted = np.sort(corner_pairs[face_split], axis=1)
    if len(wanted):
        parents, inverse = np.unique(wanted, axis=0, return_inverse=True)
    else:
        parents, inverse = np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    mid = np.full((len(f), 3), -1, np.int64)
    mid[face_split] = num_vertices + inverse.reshape(-1)

    green = ~red_all & face_split.any(axis=1)
    plain = ~red_all & ~green
    a, b, c = f[:, 0], f[:, 1], f[:, 2]
    ab, bc, ca = mid[:, 0], mid[:, 1], mid[:, 2]
    r = np.flatnonzero(red_all)
    red_children = np.stack([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1), np.stack([ca, bc, c], 1),
                             np.stack([ab, bc, ca], 1)], axis=1)[r].reshape(-1, 3)
    g = np.flatnonzero(green)
    j = face_split[g].argmax(axis=1)  # the one split edge, corners (j, j + 1)
    u, v, w = f[g, j], f[g, (j + 1) % 3], f[g, (j + 2) % 3]
    m = mid[g, j]
    green_children = np.stack([np.stack([u, m, w], 1), np.stack([m, v, w], 1)], axis=1).reshape(-1, 3)
    p = np.flatnonzero(plain)
    new_faces = np.concatenate([f[p], red_children, green_children]).astype(np.int64)
    parent = np.concatenate([p, np.repeat(r, 4), np.repeat(g, 2)])
    order = np.argsort(parent, kind="stable")

    n_new = len(parents)
    rows = np.concatenate([np.arange(num_vertices), np.repeat(num_vertices + np.arange(n_new), 2)])
    cols = np.concatenate([np.arange(num_vertices), parents.reshape(-1)])
    vals = np.concatenate([np.ones(num_vertices), np.full(2 * n_new, 0.5)])
    matrix = sp.csr_matrix((vals, (rows, cols)), shape=(num_vertices + n_new, num_vertices))
    return Refinement(faces=new_faces[order], matrix=matrix, parents=parents.astype(np.int64),
                      face_parent=parent[order].astype(np.int64), red=red_all, green=green)


def refine(faces: Any, num_vertices: int, priority: Any, budget: int, keys: Any = None) -> Refinement:
    """One level of red-green refinement of the highest-``priority`` faces within ``budget``
    faces (:func:`choose_red`, then :func:`refine_faces`).

    faces: (F, 3) counter-clockwise; priority: (F,) where refining helps most (larger first);
    budget: most faces after refinement; keys: (V,) unsplit index of each vertex (seams).
    """
    return refine_faces(faces, num_vertices, choose_red(faces, num_vertices, priority, budget, keys), keys)


__all__ = ["Refinement", "SubdivisionError", "choose_red", "refine", "refine_faces", "refined_face_count"]
