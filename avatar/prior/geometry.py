"""Small mesh-geometry helpers for the head prior (numpy only).

Plane clipping that keeps track of where every new vertex comes from, boundary
loops, hole capping by ear clipping, connected components and exact
point-to-triangle distances. They work on plain arrays: ``vertices (V, 3)``
float, ``faces (F, 3)`` int, counter-clockwise seen from outside.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def clip_by_plane(
    vertices: np.ndarray, faces: np.ndarray, origin: np.ndarray, normal: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the part of a triangle mesh on the positive side of a plane.

    Triangles crossing the plane are split exactly on it, so the cut is a clean
    planar loop. New vertices are convex combinations of the two ends of the edge
    they lie on, returned as a linear map so that any per-vertex quantity
    (blendshapes, skin weights) can be carried over exactly.

    Args:
        vertices: (V, 3) positions.
        faces: (F, 3) vertex indices.
        origin: (3,) a point of the plane.
        normal: (3,) plane normal; the side it points to is kept.

    Returns:
        source: (N, 2) int64, the two source vertices of each output vertex
            (equal for vertices kept as they are).
        weight: (N,) float64, output = (1 - weight) * v[source0] + weight * v[source1].
        out_faces: (F', 3) int64 faces indexing the N output vertices.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    normal = np.asarray(normal, dtype=np.float64)
    normal = normal / np.linalg.norm(normal)
    dist = (vertices - np.asarray(origin, dtype=np.float64)) @ normal
    inside = dist >= 0.0

    new_index: dict[tuple[int, int], int] = {}
    source: list[tuple[int, int]] = []
    weight: list[float] = []

    def kept(i: int) -> int:
        key = (i, i)
        if key not in new_index:
            new_index[key] = len(source)
            source.append(key)
            weight.append(0.0)
        return new_index[key]

    def crossing(i: int, j: int) -> int:
        # One vertex per cut edge, shared by the two triangles on either side of it.
        key = (min(i, j), max(i, j))
        if key not in new_index:
            a, b = key
            new_index[key] = len(source)
            source.append(key)
            weight.append(float(dist[a] / (dist[a] - dist[b])))
        return new_index[key]

    out: list[tuple[int, int, int]] = []
    face_inside = inside[faces]
    count = face_inside.sum(axis=1)
    for f in faces[count == 3]:
        out.append((kept(f[0]), kept(f[1]), kept(f[2])))
    for f, fin in zip(faces[(count == 1) | (count == 2)], face_inside[(count == 1) | (count == 2)]):
        # Rotate so that the odd vertex comes first; the winding is unchanged.
        odd = int(np.flatnonzero(fin != (fin.sum() == 2))[0])
        a, b, c = (int(f[(odd + k) % 3]) for k in range(3))
        ab, ac = crossing(a, b), crossing(a, c)
        if inside[a]:
            out.append((kept(a), ab, ac))
        else:
            kb, kc = kept(b), kept(c)
            out.append((ab, kb, kc))
            out.append((ab, kc, ac))
    return (
        np.asarray(source, dtype=np.int64).reshape(-1, 2),
        np.asarray(weight, dtype=np.float64),
        np.asarray(out, dtype=np.int64).reshape(-1, 3),
    )


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Ordered boundary loops of a triangle mesh.

    Each loop follows the direction its edges have in their (single) face, so a
    cap closing the hole must traverse it in reverse.

    Returns:
        A list of (n_i,) int64 arrays of vertex indices, longest loop first.

    Raises:
        ValueError: if the boundary is not a union of simple loops (a vertex with
            more than one outgoing boundary edge).
    """
    faces = np.asarray(faces, dtype=np.int64)
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected = np.sort(directed, axis=1)
    _, inverse, counts = np.unique(undirected, axis=0, return_inverse=True, return_counts=True)
    boundary = directed[counts[inverse.reshape(-1)] == 1]
    nxt: dict[int, int] = {}
    for a, b in boundary:
        if int(a) in nxt:
            raise ValueError(f"vertex {int(a)} has two outgoing boundary edges: the boundary is not simple")
        nxt[int(a)] = int(b)
    loops = []
    while nxt:
        start = next(iter(nxt))
        loop = [start]
        cur = nxt.pop(start)
        while cur != start:
            loop.append(cur)
            cur = nxt.pop(cur)
        loops.append(np.asarray(loop, dtype=np.int64))
    loops.sort(key=len, reverse=True)
    return loops


def triangulate_polygon(points: np.ndarray) -> np.ndarray:
    """Ear-clipping triangulation of a simple, roughly planar 3D polygon.

    The polygon is projected on its best-fit plane. Triangles keep the polygon's
    orientation: an anticlockwise polygon gives anticlockwise triangles.

    Args:
        points: (n, 3) polygon corners in order, n >= 3.

    Returns:
        (n - 2, 3) int64 indices into ``points``.
    """
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    centred = points - points.mean(axis=0)
    # Newell's normal is robust for non-convex polygons, unlike a cross product of two edges.
    normal = np.cross(centred, np.roll(centred, -1, axis=0)).sum(axis=0)
    normal /= np.linalg.norm(normal)
    u = np.cross(normal, [1.0, 0.0, 0.0] if abs(normal[0]) < 0.9 else [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    w = np.cross(normal, u)
    p2 = np.stack([centred @ u, centred @ w], axis=1)  # anticlockwise in (u, w)

    def cross2(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])

    remaining = np.arange(n)
    tris = []
    while len(remaining) > 3:
        # All candidate ears (prev, corner, next) of the remaining polygon at once.
        a, b, c = p2[np.roll(remaining, 1)], p2[remaining], p2[np.roll(remaining, -1)]
        convex = cross2(a, b, c) > 1e-15
        q = p2[remaining][None, :, :]  # (1, m, 2): every remaining corner against every ear
        inside = (
            (cross2(a[:, None], b[:, None], q) >= 0)
            & (cross2(b[:, None], c[:, None], q) >= 0)
            & (cross2(c[:, None], a[:, None], q) >= 0)
        )
        m = len(remaining)
        own = np.zeros((m, m), dtype=bool)
        own[np.arange(m), (np.arange(m) - 1) % m] = True
        own[np.arange(m), np.arange(m)] = True
        own[np.arange(m), (np.arange(m) + 1) % m] = True
        ears = convex & ~(inside & ~own).any(axis=1)
        if not ears.any():
            break  # numerically flat leftovers: a fan below keeps the cap closed
        # The fattest ear (area over longest edge squared): caps without slivers.
        longest = np.maximum.reduce([np.linalg.norm(b - a, axis=1), np.linalg.norm(c - b, axis=1),
                                     np.linalg.norm(a - c, axis=1)])  # fmt: skip
        quality = np.where(ears, cross2(a, b, c) / (longest**2 + 1e-30), -np.inf)
        k = int(np.argmax(quality))
        tris.append((remaining[k - 1], remaining[k], remaining[(k + 1) % m]))
        remaining = np.delete(remaining, k)
    for k in range(1, len(remaining) - 1):
        tris.append((remaining[0], remaining[k], remaining[k + 1]))
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def cap_loop(vertices: np.ndarray, loop: np.ndarray) -> np.ndarray:
    """Faces closing one boundary loop (as returned by :func:`boundary_loops`).

    Returns:
        (n - 2, 3) int64 faces indexing ``vertices``, oriented outwards.
    """
    reverse = np.asarray(loop, dtype=np.int64)[::-1]
    return reverse[triangulate_polygon(np.asarray(vertices)[reverse])]


def connected_components(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """(F,) int64 component label of each face (faces sharing a vertex are connected)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    faces = np.asarray(faces, dtype=np.int64)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(num_vertices, num_vertices))
    _, labels = scipy_components(graph, directed=False)
    return labels[faces[:, 0]].astype(np.int64)


def closest_point_on_triangles(points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest point of triangle (a, b, c) to each point, pairwise.

    Ericson, Real-Time Collision Detection, 5.1.5, vectorised over rows.

    Args:
        points, a, b, c: (N, 3) arrays (broadcastable).

    Returns:
        (N, 3) closest points.
    """
    p = np.asarray(points, dtype=np.float64)
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    p, a, b, c = np.broadcast_arrays(p, a, b, c)
    ab, ac, ap = b - a, c - a, p - a
    d1 = np.einsum("ij,ij->i", ab, ap)
    d2 = np.einsum("ij,ij->i", ac, ap)
    bp = p - b
    d3 = np.einsum("ij,ij->i", ab, bp)
    d4 = np.einsum("ij,ij->i", ac, bp)
    cp = p - c
    d5 = np.einsum("ij,ij->i", ab, cp)
    d6 = np.einsum("ij,ij->i", ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1.0 / (va + vb + vc)
        v_face = vb * denom
        w_face = vc * denom
        t_ab = d1 / (d1 - d3)
        t_ac = d2 / (d2 - d6)
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
    result = a + ab * v_face[:, None] + ac * w_face[:, None]

    # Later assignments take precedence, so go from the interior to the vertices.
    on_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
    result = np.where(on_bc[:, None], b + (c - b) * t_bc[:, None], result)
    on_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    result = np.where(on_ac[:, None], a + ac * t_ac[:, None], result)
    on_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    result = np.where(on_ab[:, None], a + ab * t_ab[:, None], result)
    at_c = (d6 >= 0) & (d5 <= d6)
    result = np.where(at_c[:, None], c, result)
    at_b = (d3 >= 0) & (d4 <= d3)
    result = np.where(at_b[:, None], b, result)
    at_a = (d1 <= 0) & (d2 <= 0)
    result = np.where(at_a[:, None], a, result)
    return result


def vertex_adjacency(faces: np.ndarray) -> dict[int, set[int]]:
    """Vertex -> set of neighbouring vertices along mesh edges."""
    adj: dict[int, set[int]] = defaultdict(set)
    for a, b, c in np.asarray(faces, dtype=np.int64):
        adj[a].update((b, c))
        adj[b].update((a, c))
        adj[c].update((a, b))
    return adj
