"""The head prior's signed distance: sign along rays, accuracy against trimesh, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from avatar.prior import load_head_model
from avatar.prior.geometry import connected_components
from avatar.prior.sdf import cached_sdf_grid, mesh_key


@pytest.fixture(scope="module")
def head():
    model = load_head_model("anny")
    model.sdf_grid()  # built once (seconds) and cached on disk, then shared
    return model


def trimesh_distance(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Exact unsigned distance with trimesh's point-triangle routine.

    Only triangles whose bounding sphere comes within the distance to the nearest
    vertex can hold the closest point, so the rest are skipped (no rtree needed).
    """
    upper, _ = cKDTree(mesh.vertices).query(points)
    centres = mesh.triangles_center
    radius = np.linalg.norm(mesh.triangles - centres[:, None], axis=2).max()
    tree = cKDTree(centres)
    out = np.empty(len(points))
    for i, (p, ub) in enumerate(zip(points, upper)):
        cand = np.asarray(tree.query_ball_point(p, ub + radius))
        closest = trimesh.triangles.closest_point(mesh.triangles[cand], np.repeat(p[None], len(cand), axis=0))
        out[i] = np.linalg.norm(closest - p, axis=1).min()
    return out


def _ray_crossings(origin: np.ndarray, direction: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Distances along a ray at which it crosses triangles (Moller-Trumbore)."""
    e1, e2 = triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]
    h = np.cross(direction, e2)
    a = np.einsum("ij,ij->i", e1, h)
    ok = np.abs(a) > 1e-15
    f = 1.0 / np.where(ok, a, 1.0)
    s = origin - triangles[:, 0]
    u = f * np.einsum("ij,ij->i", s, h)
    q = np.cross(s, e1)
    v = f * (q @ direction)
    t = f * np.einsum("ij,ij->i", q, e2)
    return np.sort(t[ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)])


def test_grid_is_fine_enough(head):
    grid = head.sdf_grid()
    assert grid.resolution >= 128
    assert grid.voxel_size < 0.003
    verts = head.template
    assert (grid.lo < verts.min(0).values).all() and (grid.hi > verts.max(0).values).all()


def test_sign_along_rays_from_the_centre(head):
    mesh = head.neutral_mesh(capped=True)
    labels = connected_components(mesh.faces, len(mesh.vertices))
    components = [mesh.triangles[labels == c] for c in np.unique(labels)]
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(120, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centre = np.zeros(3)
    ts = np.linspace(0.0, 0.25, 60)
    points, expected = [], []
    for d in directions:
        crossings = [_ray_crossings(centre, d, tri) for tri in components]
        every = np.concatenate(crossings)
        for t in ts:
            if every.size and np.abs(every - t).min() < 0.005:
                continue  # too close to the surface along this ray to call
            # Inside the union: inside any closed component (odd crossings beyond the point).
            inside = any((c > t).sum() % 2 == 1 for c in crossings)
            points.append(centre + t * d)
            expected.append(inside)
    points, expected = np.asarray(points), np.asarray(expected)
    assert 0.2 < expected.mean() < 0.8  # both sides are exercised
    sdf = head.sdf(torch.as_tensor(points, dtype=torch.float32)).numpy()
    wrong = (sdf < 0) != expected
    assert wrong.sum() == 0, f"{wrong.sum()} of {len(points)} points have the wrong sign, e.g. {points[wrong][:3]}"


def test_distance_matches_trimesh_within_2mm_near_the_surface(head):
    mesh = head.neutral_mesh(capped=True)
    rng = np.random.default_rng(1)
    points, face = trimesh.sample.sample_surface(mesh, 1500, seed=1)
    points = points + mesh.face_normals[face] * rng.uniform(-0.02, 0.02, size=(1500, 1))
    # The SDF is that of the solid head, eyeballs included: the eye-socket walls and
    # the backs of the eyeballs are inside it and do not count, while trimesh
    # measures to every triangle. Away from the eyes the two notions agree.
    eyes = head.joint_template[2:].numpy()
    away = np.linalg.norm(points[:, None] - eyes[None], axis=2).min(axis=1) > 0.025
    points = points[away][:1000]
    assert len(points) == 1000
    expected = trimesh_distance(mesh, points)
    assert expected.max() <= 0.0201
    got = head.sdf(torch.as_tensor(points, dtype=torch.float32)).numpy()
    error = np.abs(np.abs(got) - expected)
    assert error.max() < 0.002, f"max |sdf| error {error.max() * 1000:.2f} mm"
    assert np.median(error) < 0.0003


def test_sdf_is_differentiable_and_a_distance(head):
    points = torch.tensor([[0.0, 0.0, 0.2], [0.0, 0.3, 0.0], [0.02, 0.0, 0.0]], requires_grad=True)
    sdf = head.sdf(points)
    sdf.sum().backward()
    # Far outside the gradient is a unit vector pointing away from the head.
    grad = points.grad
    assert grad[0, 2] > 0.9 and grad[1, 1] > 0.9
    assert sdf[0] > 0.05 and sdf[1] > 0.15 and sdf[2] < -0.02
    dtype_check = head.sdf(torch.zeros(2, 3, dtype=torch.float64))
    assert dtype_check.dtype == torch.float64


def test_grid_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path))
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.05)
    first = cached_sdf_grid(sphere.vertices, sphere.faces, resolution=32)
    path = tmp_path / "prior" / "sdf" / f"{mesh_key(sphere.vertices, sphere.faces, 32)}.npz"
    assert path.exists()
    second = cached_sdf_grid(sphere.vertices, sphere.faces, resolution=32)
    torch.testing.assert_close(first.values, second.values, atol=0, rtol=0)
    # A different mesh gets a different grid.
    assert mesh_key(sphere.vertices * 1.01, sphere.faces, 32) != mesh_key(sphere.vertices, sphere.faces, 32)
