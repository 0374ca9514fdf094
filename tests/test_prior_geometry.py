"""Mesh helpers of the head prior: plane clipping, hole capping, SDF grids on known shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from avatar.prior.geometry import (
    boundary_loops,
    cap_loop,
    clip_by_plane,
    closest_point_on_triangles,
    connected_components,
)
from avatar.prior.sdf import build_sdf_grid


def test_clip_by_plane_cuts_exactly_on_the_plane_and_caps_watertight():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.1)
    normal = np.array([0.2, 1.0, 0.1])
    normal /= np.linalg.norm(normal)
    origin = np.array([0.0, -0.031, 0.0])
    source, t, faces = clip_by_plane(sphere.vertices, sphere.faces, origin, normal)
    verts = (1 - t)[:, None] * sphere.vertices[source[:, 0]] + t[:, None] * sphere.vertices[source[:, 1]]

    assert ((verts - origin) @ normal >= -1e-12).all()
    loops = boundary_loops(faces)
    assert len(loops) == 1
    # The cut vertices lie on the plane and on the sphere's edges (radius <= 0.1).
    on_plane = (verts[loops[0]] - origin) @ normal
    np.testing.assert_allclose(on_plane, 0.0, atol=1e-12)
    cut = source[:, 0] != source[:, 1]
    assert set(loops[0].tolist()) == set(np.flatnonzero(cut).tolist())

    closed = trimesh.Trimesh(verts, np.concatenate([faces, cap_loop(verts, loops[0])]), process=False)
    assert closed.is_watertight
    assert closed.is_winding_consistent
    assert closed.volume > 0  # outward orientation kept by the cap
    # Volume of the spherical cap above the plane: pi h^2 (3r - h) / 3 with h = r - d.
    r, d = 0.1, origin @ normal
    h = r - d
    expected = np.pi * h**2 * (3 * r - h) / 3
    assert closed.volume == pytest.approx(expected, rel=0.03)


def test_boundary_loops_rejects_non_manifold_boundary():
    # Two triangles touching at one vertex: that vertex has two outgoing boundary edges.
    faces = np.array([[0, 1, 2], [0, 3, 4]])
    with pytest.raises(ValueError, match="two outgoing boundary edges"):
        boundary_loops(faces)


def test_connected_components_separates_disjoint_spheres():
    a = trimesh.creation.icosphere(subdivisions=1)
    b = trimesh.creation.icosphere(subdivisions=1)
    faces = np.concatenate([a.faces, b.faces + len(a.vertices)])
    labels = connected_components(faces, len(a.vertices) * 2)
    assert len(np.unique(labels)) == 2
    assert (labels[: len(a.faces)] == labels[0]).all() and (labels[len(a.faces) :] != labels[0]).all()


def test_closest_point_on_triangles_matches_trimesh():
    rng = np.random.default_rng(0)
    tris = rng.normal(size=(500, 3, 3))
    points = rng.normal(size=(500, 3)) * 2
    ours = closest_point_on_triangles(points, tris[:, 0], tris[:, 1], tris[:, 2])
    ref = trimesh.triangles.closest_point(tris, points)
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_sdf_grid_of_a_sphere_is_the_analytic_distance():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.08)
    grid = build_sdf_grid(sphere.vertices, sphere.faces, resolution=64)
    rng = np.random.default_rng(1)
    points = rng.uniform(-0.1, 0.1, size=(2000, 3))
    got = grid.lookup(torch.as_tensor(points, dtype=torch.float32)).numpy()
    # The icosphere's faces sit up to 0.3 mm inside the true sphere; interpolation adds a little.
    expected = np.linalg.norm(points, axis=1) - 0.08
    assert np.abs(got - expected).max() < 1.5e-3
    assert (np.sign(got) == np.sign(expected))[np.abs(expected) > 2e-3].all()
    # Outside the grid the distance keeps growing.
    far = grid.lookup(torch.tensor([[0.5, 0.0, 0.0]])).item()
    assert far == pytest.approx(0.42, abs=3e-3)


def test_sdf_grid_of_overlapping_spheres_is_their_union():
    # Two closed components that overlap, like an eyeball sitting in its socket.
    a = trimesh.creation.icosphere(subdivisions=3, radius=0.05)
    b = trimesh.creation.icosphere(subdivisions=3, radius=0.03)
    shift = np.array([0.05, 0.0, 0.0])
    verts = np.concatenate([a.vertices, b.vertices + shift])
    faces = np.concatenate([a.faces, b.faces + len(a.vertices)])
    grid = build_sdf_grid(verts, faces, resolution=64)
    # (Away from the spheres' centres, where the distance has a kink that trilinear
    # interpolation rounds off by up to a voxel.)
    points = np.array([[0.03, 0.0, 0.0], [0.06, 0.0, 0.0], [-0.02, 0.0, 0.0], [0.075, 0.0, 0.0], [0.0, 0.06, 0.0]])
    got = grid.lookup(torch.as_tensor(points, dtype=torch.float32)).numpy()
    union = np.minimum(np.linalg.norm(points, axis=1) - 0.05, np.linalg.norm(points - shift, axis=1) - 0.03)
    # Inside the overlap (first two points) parity over both surfaces would say "outside".
    assert (got[:3] < 0).all()
    # Facets of the subdivision-3 icospheres sit up to 0.6 mm inside the true spheres.
    np.testing.assert_allclose(got[2:], union[2:], atol=1.5e-3)
