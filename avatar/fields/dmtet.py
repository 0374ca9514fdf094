"""Fine-stage geometry: DMTet (Shen et al. 2021) on our own tetrahedral grid.

A signed distance per grid vertex and a bounded offset per vertex (at most
``deform_scale`` grid cells) are optimised directly; marching tetrahedra turns
them into a triangle mesh every step, differentiably in both (Magic3D's and
HeadSculpt's fine stage). The texture lives in a separate field
(:class:`TextureField`) queried at the surface points.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from avatar.fields.frame import FieldFrame
from avatar.fields.nerf import hash_grid, mlp
from avatar.ops.marching_tets import cube_tetrahedra, marching_tetrahedra


class DMTetGeometry(nn.Module):
    """SDF and deformation on a ``resolution``^3-cell tetrahedral grid of the field cube.

    sdf_init: callable (N, 3) field units -> (N,) signed distance in field units
        (negative inside), e.g. the prior's SDF or one derived from the coarse density.
    """

    def __init__(self, resolution: int, frame: FieldFrame | None = None,
                 sdf_init: Callable[[torch.Tensor], torch.Tensor] | None = None, deform_scale: float = 0.5):
        super().__init__()
        self.frame = frame or FieldFrame()
        self.resolution = resolution
        verts, tets = cube_tetrahedra(resolution, self.frame.bound)
        self.register_buffer("grid_verts", verts)
        self.register_buffer("tets", tets)
        self.cell = 2.0 * self.frame.bound / resolution
        self.deform_scale = deform_scale
        init = sdf_init(verts) if sdf_init is not None else verts.norm(dim=-1) - 0.5 * self.frame.bound
        self.sdf = nn.Parameter(init.detach().float().clone())
        self.deform = nn.Parameter(torch.zeros_like(verts))

    def vertices(self) -> torch.Tensor:
        """(V, 3) deformed grid vertices, each within ``deform_scale`` cells of its rest position."""
        return self.grid_verts + self.deform_scale * self.cell * torch.tanh(self.deform)

    def extract(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current surface: vertices (M, 3) field units (differentiable) and faces (F, 3)."""
        return marching_tetrahedra(self.vertices(), self.tets, self.sdf)


class TextureField(nn.Module):
    """Albedo over the field cube: hash grid + small MLP, sigmoid output in [0, 1]."""

    def __init__(self, frame: FieldFrame | None = None, n_levels: int = 16, log2_hashmap_size: int = 19,
                 max_resolution: int = 2048, hidden: int = 64, engine: str = "auto"):
        super().__init__()
        self.frame = frame or FieldFrame()
        self.encoding = hash_grid(n_levels, log2_hashmap_size, max_resolution, engine)
        self.net = mlp(self.encoding.n_output_dims, 3, hidden, 1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points: (N, 3) field units -> (N, 3) albedo."""
        feat = self.encoding(self.frame.to_unit(points).clamp(0, 1))
        return torch.sigmoid(self.net(feat))


def laplacian_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared uniform-Laplacian of the mesh (each vertex vs the mean of its
    neighbours): penalises bumps and spikes."""
    f = faces.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    edges = torch.cat([edges, edges.flip(1)])
    n = verts.shape[0]
    neigh_sum = torch.zeros_like(verts).index_add(0, edges[:, 0], verts[edges[:, 1]])
    degree = torch.zeros(n, device=verts.device, dtype=verts.dtype).index_add(
        0, edges[:, 0], torch.ones(edges.shape[0], device=verts.device, dtype=verts.dtype))
    lap = verts - neigh_sum / degree.clamp(min=1)[:, None]
    return lap.pow(2).sum(-1).mean()


def normal_consistency_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cos) between the normals of triangles sharing an edge."""
    f = faces.long()
    face_n = torch.nn.functional.normalize(
        torch.linalg.cross(verts[f[:, 1]] - verts[f[:, 0]], verts[f[:, 2]] - verts[f[:, 0]], dim=-1), dim=-1)
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    key = torch.sort(edges, dim=1).values
    face_id = torch.arange(f.shape[0], device=f.device).repeat(3)
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    sorted_inv = inverse[order]
    # Pairs of consecutive entries with the same edge id are the two faces of a manifold edge.
    same = sorted_inv[1:] == sorted_inv[:-1]
    a, b = face_id[order[:-1][same]], face_id[order[1:][same]]
    if a.numel() == 0:
        return verts.new_zeros(())
    return (1.0 - (face_n[a] * face_n[b]).sum(-1)).mean()
