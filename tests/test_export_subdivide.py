"""One level of red-green refinement (avatar.export.subdivide, issue #18's subdivision to the
triangle budget): the budget holds, no T-junction opens, every child keeps its parent's
winding, per-vertex quantities are carried linearly, and a mesh split at UV seams refines
into coincident midpoints on both sides of the seam."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from avatar.export.subdivide import SubdivisionError, choose_red, refine, refine_faces, refined_face_count


def sphere() -> tuple[np.ndarray, np.ndarray]:
    mesh = trimesh.creation.icosphere(2, radius=0.1)
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)


def edge_use(faces: np.ndarray) -> np.ndarray:
    """How many faces use each undirected edge."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(edges, axis=0, return_counts=True)[1]


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = vertices[faces]
    return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


def priority(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Something local and uneven: faces near one pole first."""
    return vertices[faces].mean(axis=1)[:, 2]


@pytest.mark.parametrize("budget", [400, 500, 900, 1279, 1280, 5000])
def test_the_budget_holds_and_the_highest_priority_faces_are_refined(budget):
    vertices, faces = sphere()  # 320 faces
    refined = refine(faces, len(vertices), priority(vertices, faces), budget)
    assert len(refined.faces) <= budget
    assert len(refined.faces) == refined_face_count(faces, len(vertices), refined.red)
    assert len(refined.faces) == len(faces) + 3 * refined.red.sum() + refined.green.sum()
    if budget >= 4 * len(faces):
        assert refined.red.all() and len(refined.faces) == 4 * len(faces)
    else:  # as many as fit: one more seed would break the budget
        order = np.argsort(-priority(vertices, faces), kind="stable")
        seeds = order[:refined.red.sum()]
        assert refined.red[order[0]] and refined.red[seeds[: len(seeds) // 2]].all()
        more = refined.red.copy()
        more[order[~refined.red[order]][0]] = True
        assert refined_face_count(faces, len(vertices), more) > budget
        assert len(refined.faces) > budget - 12  # a red face and its closure cost a few faces


@pytest.mark.parametrize("budget", [0, 100, 320])
def test_a_budget_at_or_below_the_mesh_refines_nothing(budget):
    vertices, faces = sphere()
    refined = refine(faces, len(vertices), priority(vertices, faces), budget)
    assert np.array_equal(refined.faces, faces) and refined.num_vertices == len(vertices)
    assert not refined.red.any() and not refined.green.any()
    assert np.array_equal(refined.matrix.toarray(), np.eye(len(vertices)))


@pytest.mark.parametrize("budget", [500, 900, 1280])
def test_no_t_junctions_and_the_winding_is_kept(budget):
    """A closed mesh stays closed and manifold (every edge shared by exactly two faces: a midpoint
    hanging on an unsplit edge would leave edges with one face), the Euler characteristic stays
    2, and every child faces the way its parent does."""
    vertices, faces = sphere()
    refined = refine(faces, len(vertices), priority(vertices, faces), budget)
    assert refined.green.any() or refined.red.all()
    use = edge_use(refined.faces)
    assert (use == 2).all()
    edges = len(use)
    assert refined.num_vertices - edges + len(refined.faces) == 2
    positions = refined.apply(vertices)
    child, parent = face_normals(positions, refined.faces), face_normals(vertices, faces)[refined.face_parent]
    cos = (child * parent).sum(1) / np.linalg.norm(child, axis=1) / np.linalg.norm(parent, axis=1)
    assert cos.min() > 0.999  # the children of a flat triangle lie in it, same side up
    # Each parent's children cover exactly its area.
    area = np.bincount(refined.face_parent, np.linalg.norm(child, axis=1), minlength=len(faces))
    assert np.allclose(area, np.linalg.norm(face_normals(vertices, faces), axis=1))
    # Every face with two or three split edges was made red: a face is red, green or untouched.
    assert not (refined.red & refined.green).any()
    assert np.array_equal(np.bincount(refined.face_parent, minlength=len(faces)),
                          np.where(refined.red, 4, np.where(refined.green, 2, 1)))


def test_an_open_mesh_keeps_its_edges_shared_by_at_most_two_faces():
    n = 12
    xs, ys = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    vertices = np.stack([xs.ravel(), ys.ravel(), np.zeros(n * n)], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    refined = refine(faces, len(vertices), -np.linalg.norm(vertices[faces].mean(1) - 5.5, axis=1), 400)
    assert edge_use(refined.faces).max() == 2
    # The boundary is only ever split (never crossed): its length is unchanged.
    use_before, use_after = edge_use(faces), edge_use(refined.faces)
    assert (use_after == 1).sum() >= (use_before == 1).sum()
    positions = refined.apply(vertices)
    assert (face_normals(positions, refined.faces)[:, 2] > 0).all()


def test_every_per_vertex_quantity_is_carried_linearly():
    vertices, faces = sphere()
    refined = refine(faces, len(vertices), priority(vertices, faces), 900)
    m = refined.matrix.toarray()
    n = len(vertices)
    assert np.array_equal(m[:n], np.eye(n))  # old vertices keep their values
    assert np.allclose(m.sum(axis=1), 1.0)
    assert np.allclose(m[np.arange(n, refined.num_vertices)[:, None], refined.parents], 0.5)
    assert (np.count_nonzero(m[n:], axis=1) == 2).all()
    rng = np.random.default_rng(0)
    weights = rng.random((n, 5))
    deltas = rng.normal(size=(4, n, 3))
    carried = refined.apply(deltas, axis=1)
    assert carried.shape == (4, refined.num_vertices, 3)
    assert np.allclose(carried[2], m @ deltas[2])
    assert np.allclose(refined.apply(weights)[n:], 0.5 * (weights[refined.parents[:, 0]]
                                                          + weights[refined.parents[:, 1]]))
    affine = rng.normal(size=(3, 3))
    assert np.allclose(refined.apply(vertices @ affine.T + 1.0), refined.apply(vertices) @ affine.T + 1.0)
    assert np.array_equal(refined.rows_of(refined.parents[:, ::-1]), np.arange(n, refined.num_vertices))
    with pytest.raises(SubdivisionError, match="did not split"):
        refined.rows_of(np.array([[0, 0]]))


def split_at_a_seam(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sphere cut along the meridian x > 0, y = 0 (the faces on the y < 0 side take copies of
    its vertices), as a UV layout splits a closed head: (split faces, keys, split positions)."""
    on_seam = (np.abs(vertices[:, 1]) < 1e-9) & (vertices[:, 0] > 1e-9)
    below = vertices[faces].mean(axis=1)[:, 1] < 0
    copy = np.full(len(vertices), -1)
    copy[on_seam] = len(vertices) + np.arange(on_seam.sum())
    split = faces.copy()
    moved = below[:, None] & on_seam[faces]
    split[moved] = copy[faces[moved]]
    keys = np.concatenate([np.arange(len(vertices)), np.flatnonzero(on_seam)])
    return split, keys, vertices[keys]


def welded(refined, keys: np.ndarray) -> np.ndarray:
    """The refined split faces over welded vertices: old ones by key, midpoints by their edge's keys."""
    pairs = np.sort(keys[refined.parents], axis=1)
    _, edge = np.unique(pairs, axis=0, return_inverse=True)
    return np.concatenate([keys, keys.max() + 1 + edge.reshape(-1)])[refined.faces]


def test_seam_duplicates_refine_into_coincident_midpoints():
    vertices, faces = sphere()
    split_faces, keys, split_positions = split_at_a_seam(vertices, faces)
    assert len(keys) > len(vertices)
    # Scattered red faces: some red on one side of the seam and green on the other.
    red = choose_red(faces, len(vertices), np.random.default_rng(0).random(len(faces)), 500)
    unsplit = refine_faces(faces, len(vertices), red)
    split = refine_faces(split_faces, len(keys), red, keys=keys)
    # The same triangles, seen through the keys, and the midpoints on both sides of the seam at one place.
    model_index = np.concatenate([keys, unsplit.rows_of(keys[split.parents])])
    assert np.array_equal(model_index[split.faces], unsplit.faces)
    assert np.allclose(split.apply(split_positions), unsplit.apply(vertices)[model_index])
    seam_mids = np.flatnonzero(np.bincount(model_index, minlength=unsplit.num_vertices)[len(vertices):] > 1)
    assert len(seam_mids) > 0  # the refined region crosses the seam
    # No crack: the split mesh welded by position is as closed as the unsplit one ...
    assert (edge_use(welded(split, keys)) == 2).all()
    # ... which it would not be if the seam's two sides were refined each on its own.
    assert not (edge_use(welded(refine_faces(split_faces, len(keys), red), keys)) == 2).all()


def test_bad_inputs_are_refused():
    vertices, faces = sphere()
    with pytest.raises(SubdivisionError, match=r"faces must be \(F, 3\)"):
        refine(faces[:, :2], len(vertices), np.zeros(len(faces)), 1000)
    with pytest.raises(SubdivisionError, match="outside"):
        refine(faces, 10, np.zeros(len(faces)), 1000)
    with pytest.raises(SubdivisionError, match="priority"):
        refine(faces, len(vertices), np.full(len(faces), np.nan), 1000)
    with pytest.raises(SubdivisionError, match="keys"):
        refine(faces, len(vertices), np.zeros(len(faces)), 1000, keys=np.zeros(3, dtype=np.int64))
