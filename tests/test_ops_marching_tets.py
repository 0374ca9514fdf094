"""Tetrahedral grids and marching tetrahedra: conforming, int32, built where asked, watertight, outward,
differentiable, and as few host syncs as the data-dependent output sizes need."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh
from torch.utils._python_dispatch import TorchDispatchMode

from avatar.ops.marching_tets import (
    TRIANGLE_COUNT,
    TetGridSpec,
    cube_tetrahedra,
    marching_tetrahedra,
    tetrahedral_grid,
)


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
    from support import assert_gradients_match_finite_differences

    verts, tets = cube_tetrahedra(8)
    verts = verts.double().requires_grad_(True)
    sdf = (verts.detach().norm(dim=-1) - 0.53).requires_grad_(True)  # no vertex on the surface
    _, faces = marching_tetrahedra(verts, tets, sdf)
    weights = torch.randn(len(faces) * 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def loss():
        v, f = marching_tetrahedra(verts, tets, sdf)
        assert torch.equal(f, faces)  # eps keeps every SDF sign, so the topology
        return (v.norm(dim=-1) * weights[: len(v)]).sum()

    # float64, 3 random directions, central differences with eps 1e-7: within 1e-6 relative.
    assert_gradients_match_finite_differences(loss, {"sdf": sdf, "verts": verts}, eps=1e-7, rtol=1e-6, atol=1e-9)
    v, _ = marching_tetrahedra(verts, tets, sdf)
    v.norm(dim=-1).sum().backward()
    # Raising the SDF everywhere shrinks the surface: d(sum |v|)/d(sdf) summed is negative.
    assert sdf.grad.sum() < 0


def test_empty_and_bad_input():
    verts, tets = cube_tetrahedra(2)
    v, f = marching_tetrahedra(verts, tets, torch.ones(len(verts)))
    assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError, match="sdf must be"):
        marching_tetrahedra(verts, tets, torch.ones(3))


def test_box_grid_has_cubic_cells_covers_its_box_and_is_conforming():
    spec = TetGridSpec.covering((-0.3, -0.5, -0.4), (0.3, 0.5, 0.4), 10, within=1.0)
    assert spec.cells == (6, 10, 8) and spec.cell == pytest.approx(0.1)
    assert all(o <= lo + 1e-6 for o, lo in zip(spec.origin, (-0.3, -0.5, -0.4)))
    assert all(m >= hi - 1e-6 for m, hi in zip(spec.box_max, (0.3, 0.5, 0.4)))
    verts, tets = tetrahedral_grid(spec)
    assert verts.shape == (spec.n_vertices, 3) == (7 * 11 * 9, 3) and tets.shape == (spec.n_tetrahedra, 4)
    assert tets.dtype == torch.int32 and verts.dtype == torch.float32
    p = verts[tets.long()]
    vol = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)) / 6
    assert (vol > 0).all()
    assert math.isclose(vol.sum().item(), 0.6 * 1.0 * 0.8, rel_tol=1e-5)
    faces = torch.cat([tets[:, [0, 1, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 3]], tets[:, [1, 2, 3]]])
    _, counts = torch.unique(torch.sort(faces, 1).values, dim=0, return_counts=True)
    assert set(counts.tolist()) <= {1, 2}
    assert (counts == 1).sum().item() == 2 * 2 * (6 * 10 + 10 * 8 + 6 * 8)
    # A side rounded up to whole cells past the field cube is moved back inside it, still covering.
    near = TetGridSpec.covering((0.58, 0.3, 0.58), (0.99, 0.99, 0.99), 7, within=1.0)
    assert near.cells[0] == 5 and near.box_max[0] == pytest.approx(1.0) and near.origin[0] <= 0.58
    assert TetGridSpec.covering((0.58, 0.3, 0.58), (0.99, 0.99, 0.99), 7).box_max[0] > 1.03


def test_grid_is_built_on_the_requested_device_with_int32_indices():
    spec = TetGridSpec.covering((-0.46, -0.58, -0.52), (0.46, 0.82, 0.52), 156)
    verts, tets = tetrahedral_grid(spec, torch.device("meta"))  # no memory: shapes and dtypes only
    assert verts.device.type == "meta" and tets.device.type == "meta"
    assert tets.dtype == torch.int32 and tets.shape == (spec.n_tetrahedra, 4)
    assert spec.nbytes == verts.nbytes + tets.nbytes
    _, cube = cube_tetrahedra(3)
    assert cube.dtype == torch.int32
    with pytest.raises(ValueError, match="int32"):
        TetGridSpec.cube(1400)


def test_same_grid_is_built_once_while_held():
    spec = TetGridSpec.cube(5)
    a, b = tetrahedral_grid(spec), tetrahedral_grid(spec)
    assert a[1].data_ptr() == b[1].data_ptr() and a[0].data_ptr() == b[0].data_ptr()
    assert tetrahedral_grid(TetGridSpec.cube(6))[1].shape[0] == 6 * 216


def test_spec_round_trips_and_reads_old_stored_grids():
    spec = TetGridSpec.covering((-0.3, -0.5, -0.4), (0.3, 0.5, 0.4), 9)
    assert TetGridSpec.from_dict(spec.to_dict()) == spec
    verts, _ = cube_tetrahedra(7, bound=1.0)
    assert TetGridSpec.of_vertices(verts) == TetGridSpec.cube(7, 1.0)
    with pytest.raises(ValueError, match="cube grid"):
        TetGridSpec.of_vertices(verts[:-1])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_box_grid_sphere_is_watertight_with_either_index_type(dtype):
    spec = TetGridSpec.covering((-0.5, -0.6, -0.55), (0.5, 0.6, 0.55), 20)
    verts, tets = tetrahedral_grid(spec)
    sdf = verts.norm(dim=-1) - 0.41
    v, f = marching_tetrahedra(verts, tets.to(dtype), sdf)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert abs(mesh.volume / (4 / 3 * math.pi * 0.41**3) - 1) < 0.06
    v64, f64 = marching_tetrahedra(verts, tets.long(), sdf)
    assert torch.equal(v, v64) and torch.equal(f, f64) and f.dtype == torch.int64


class _SyncRecorder(TorchDispatchMode):
    """Records the ops that make the host wait for the device: data-dependent output sizes
    (nonzero, unique, masked_select, boolean-mask indexing) and scalar reads (item, bool,
    int, float); ``tolist`` is counted by :func:`host_syncs`, since on the CPU it bypasses dispatch."""

    SIZE_OPS = ("aten.nonzero.", "aten._unique", "aten.unique", "aten.masked_select", "aten.repeat_interleave")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.SIZE_OPS) or name.startswith("aten._local_scalar_dense"):
            self.syncs.append(name.split(".")[1])
        if name.startswith("aten.index.") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.syncs.append("boolean index")
        return func(*args, **(kwargs or {}))


def host_syncs(fn, monkeypatch) -> list[str]:
    """The host syncs ``fn()`` would make on a GPU, in order."""
    recorder = _SyncRecorder()
    tolist = torch.Tensor.tolist

    def counted(self):
        recorder.syncs.append("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with recorder:
        fn()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return recorder.syncs


def test_marching_waits_for_the_device_twice_and_regularisers_never(monkeypatch):
    """Per-step host syncs (issue #14, 8): the surface's size is data-dependent, so marching
    tetrahedra learns it in two syncs (cut tetrahedra; surface vertices and faces together);
    the fine stage's regularisers make none."""
    from avatar.fields.dmtet import laplacian_loss, normal_consistency_loss

    verts, tets = cube_tetrahedra(10)
    sdf = verts.norm(dim=-1) - 0.55
    assert host_syncs(lambda: marching_tetrahedra(verts, tets, sdf), monkeypatch) == ["nonzero", "tolist"]
    v, f = marching_tetrahedra(verts, tets, sdf)
    assert host_syncs(lambda: laplacian_loss(v, f), monkeypatch) == []
    assert host_syncs(lambda: normal_consistency_loss(v, f), monkeypatch) == []
