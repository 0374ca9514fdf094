"""DMTet geometry extracts the initial shape; regularisers measure what they claim."""

from __future__ import annotations

import math

import torch
import trimesh

from avatar.fields.dmtet import DMTetGeometry, TextureField, laplacian_loss, normal_consistency_loss


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


def test_gradients_reach_sdf_deform_and_texture():
    geo = DMTetGeometry(12, sdf_init=lambda p: p.norm(dim=-1) - 0.5)
    tex = TextureField(log2_hashmap_size=12, max_resolution=64, engine="torch")
    v, f = geo.extract()
    loss = v.pow(2).sum() + tex(v).mean()
    loss.backward()
    assert geo.sdf.grad.abs().sum() > 0 and geo.deform.grad.abs().sum() > 0
    assert tex.encoding.params.grad.abs().sum() > 0


def test_regularisers():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = torch.tensor(sphere.vertices, dtype=torch.float32)
    f = torch.tensor(sphere.faces)
    smooth_lap, smooth_nc = laplacian_loss(v, f), normal_consistency_loss(v, f)
    bumpy = v.clone()
    bumpy[::7] *= 1.2
    assert laplacian_loss(bumpy, f) > 5 * smooth_lap
    assert normal_consistency_loss(bumpy, f) > 5 * smooth_nc
    assert smooth_nc < 0.02
