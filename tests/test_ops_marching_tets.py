"""Tetrahedral grid and marching tetrahedra: conforming, watertight, outward, differentiable."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh

from avatar.ops.marching_tets import TRIANGLE_COUNT, cube_tetrahedra, marching_tetrahedra


def test_grid_is_conforming_and_fills_the_cube():
    verts, tets = cube_tetrahedra(4, bound=1.0)
    assert verts.shape == (125, 3) and tets.shape == (6 * 64, 4)
    p = verts[tets]
    vol = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)) / 6
    assert (vol > 0).all()
    assert math.isclose(vol.sum().item(), 8.0, rel_tol=1e-5)
    # Conforming: every interior triangle is shared by exactly two tetrahedra.
    faces = torch.cat([tets[:, [0, 1, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 3]], tets[:, [1, 2, 3]]])
    _, counts = torch.unique(torch.sort(faces, 1).values, dim=0, return_counts=True)
    boundary = (counts == 1).sum().item()
    assert set(counts.tolist()) <= {1, 2} and boundary == 6 * 16 * 2  # 2 triangles per boundary square


def test_table_counts():
    assert TRIANGLE_COUNT[0] == 0 and TRIANGLE_COUNT[15] == 0
    assert TRIANGLE_COUNT[1] == 1 and TRIANGLE_COUNT[3] == 2 and TRIANGLE_COUNT[7] == 1


@pytest.mark.parametrize("res", [16, 24])
def test_sphere_is_watertight_outward_and_accurate(res):
    verts, tets = cube_tetrahedra(res, bound=1.0)
    radius = 0.61  # off the grid planes
    sdf = verts.norm(dim=-1) - radius
    v, f = marching_tetrahedra(verts, tets, sdf)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    mesh.merge_vertices()  # no-op if shared vertices were created once
    assert len(mesh.vertices) == len(v)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals
    assert abs(mesh.volume / (4 / 3 * math.pi * radius**3) - 1) < 0.06
    assert torch.allclose(v.norm(dim=-1), torch.full((len(v),), radius), atol=2.0 / res * 0.2)


def test_gradients_flow_to_sdf_and_vertices():
    verts, tets = cube_tetrahedra(8)
    verts = verts.clone().requires_grad_(True)
    sdf = (verts.detach().norm(dim=-1) - 0.5).requires_grad_(True)
    v, _ = marching_tetrahedra(verts, tets, sdf)
    v.norm(dim=-1).sum().backward()
    assert sdf.grad.abs().sum() > 0 and verts.grad.abs().sum() > 0
    # Raising the SDF everywhere shrinks the surface: d(sum |v|)/d(sdf) summed is negative.
    assert sdf.grad.sum() < 0


def test_empty_and_bad_input():
    verts, tets = cube_tetrahedra(2)
    v, f = marching_tetrahedra(verts, tets, torch.ones(len(verts)))
    assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError, match="sdf must be"):
        marching_tetrahedra(verts, tets, torch.ones(3))
