"""DMTet geometry extracts the initial shape, saves no grid, loads old checkpoints; regularisers
measure what they claim."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh
from support import assert_gradients_match_finite_differences

from avatar.fields.dmtet import DMTetGeometry, TextureField, laplacian_loss, normal_consistency_loss
from avatar.ops.marching_tets import TetGridSpec


def test_extracts_the_initial_sdf_and_bounds_deformation():
    geo = DMTetGeometry(24, sdf_init=lambda p: p.norm(dim=-1) - 0.5)
    v, f = geo.extract()
    mesh = trimesh.Trimesh(v.detach().numpy(), f.numpy(), process=False)
    assert mesh.is_watertight and mesh.volume > 0
    assert abs(mesh.volume / (4 / 3 * math.pi * 0.125) - 1) < 0.05
    with torch.no_grad():
        geo.deform.fill_(100.0)
    offset = (geo.vertices() - geo.grid_verts).abs().max()
    assert offset <= 0.5 * geo.cell + 1e-6


def test_gradients_of_sdf_deform_and_texture_match_finite_differences():
    # float64, 3 random directions per tensor, eps 1e-6 (small enough that no SDF value changes
    # sign, so the extracted topology stays): within 1e-5 relative, 1e-7 absolute (the loss is
    # O(100): rounding in the difference is about 1e-8).
    torch.manual_seed(0)
    geo = DMTetGeometry(12, sdf_init=lambda p: p.norm(dim=-1) - 0.53).double()  # no vertex on the surface
    tex = TextureField(log2_hashmap_size=12, max_resolution=64, engine="torch").double()
    with torch.no_grad():
        geo.deform.uniform_(-0.3, 0.3)
        tex.encoding.params.uniform_(-0.5, 0.5)
    _, faces = geo.extract()
    weights = torch.randn(faces.shape[0] * 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss():
        v, f = geo.extract()
        assert torch.equal(f, faces)  # same topology on both sides of the difference
        return v.pow(2).sum() + (tex(v) * weights[: v.shape[0]]).sum()

    tensors = {"sdf": geo.sdf, "deform": geo.deform, **{f"texture.{k}": p for k, p in tex.named_parameters()}}
    assert_gradients_match_finite_differences(loss, tensors, eps=1e-6, rtol=1e-5, atol=1e-7)


def test_regularisers():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = torch.tensor(sphere.vertices, dtype=torch.float32)
    f = torch.tensor(sphere.faces)
    smooth_lap, smooth_nc = laplacian_loss(v, f), normal_consistency_loss(v, f)
    bumpy = v.clone()
    bumpy[::7] *= 1.2
    assert laplacian_loss(bumpy, f) > 3 * smooth_lap  # the mean length (HeadSculpt's form)
    assert laplacian_loss(bumpy, f, squared=True) > 10 * laplacian_loss(v, f, squared=True)
    assert normal_consistency_loss(bumpy, f) > 5 * smooth_nc
    assert smooth_nc < 0.02


def test_state_dict_holds_the_grid_spec_not_the_grid():
    spec = TetGridSpec.covering((-0.3, -0.5, -0.4), (0.3, 0.5, 0.4), 10)
    geo = DMTetGeometry(spec, sdf_init=lambda p: p.norm(dim=-1) - 0.3)
    state = geo.state_dict()
    assert set(state) == {"sdf", "deform", "_extra_state"}
    assert state["_extra_state"] == {"grid": spec.to_dict(), "sdf_units": "cells"}
    assert geo.tets.dtype == torch.int32 and geo.tets.shape == (spec.n_tetrahedra, 4)
    again = DMTetGeometry.from_state_dict(state)
    assert again.spec == spec and torch.equal(again.sdf, geo.sdf) and torch.equal(again.tets, geo.tets)
    with pytest.raises(ValueError, match=r"grid of \(6, 10, 8\) cells.*from_state_dict"):
        DMTetGeometry(10).load_state_dict(state)


def test_old_checkpoints_with_the_grid_buffers_still_load():
    geo = DMTetGeometry(6, sdf_init=lambda p: p.norm(dim=-1) - 0.5)
    with torch.no_grad():
        geo.deform.normal_(generator=torch.Generator().manual_seed(0))
    # What checkpoints held before grids were rebuilt: the grid buffers, and the SDF in field units.
    old = {"grid_verts": geo.grid_verts.clone(), "tets": geo.tets.long().clone(),
           "sdf": geo.sdf.detach() * geo.cell, "deform": geo.deform.detach().clone()}
    loaded = DMTetGeometry.from_state_dict(dict(old))
    assert loaded.spec == TetGridSpec.cube(6) and torch.equal(loaded.vertices(), geo.vertices())
    into = DMTetGeometry(6)
    into.load_state_dict(dict(old))  # strict: the grid buffers are dropped, not unexpected
    torch.testing.assert_close(into.sdf, geo.sdf)  # loaded in cells: the same surface
    assert set(into.state_dict()) == {"sdf", "deform", "_extra_state"}


def test_geometry_is_built_on_the_requested_device():
    spec = TetGridSpec.covering((-0.46, -0.58, -0.52), (0.46, 0.82, 0.52), 156)
    geo = DMTetGeometry(spec, device="meta")  # a quality-sized grid's shapes, without its memory
    assert {t.device.type for t in (geo.grid_verts, geo.tets, geo.sdf, geo.deform)} == {"meta"}
    assert geo.tets.dtype == torch.int32 and geo.sdf.shape == (spec.n_vertices,)
    assert 10e6 <= geo.tets.shape[0] <= 12e6
