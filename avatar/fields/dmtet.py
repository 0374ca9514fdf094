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
from avatar.ops.marching_tets import TetGridSpec, marching_tetrahedra, tetrahedral_grid

SDF_UNITS = "cells"
"""What one unit of the stored SDF is: a grid cell. States written before this (no
``sdf_units`` in their extra state) hold field units and are converted on load."""

GRID_STATE_KEY = "_extra_state"
"""The key (under the geometry's prefix) of the grid's definition in a state dict."""

LEGACY_GRID_KEYS = ("grid_verts", "tets")
"""Buffers that checkpoints written before grids were rebuilt on load still carry: dropped on load."""


class DMTetGeometry(nn.Module):
    """SDF and deformation on the vertices of a tetrahedral grid.

    grid: a :class:`~avatar.ops.marching_tets.TetGridSpec` (the fine stage's box around the
        head, :func:`avatar.pipeline.generate.fine_grid`), or an int N for N cells per side
        over the whole field cube.
    sdf_init: callable (V, 3) field units -> (V,) signed distance in field units
        (negative inside), e.g. the prior's SDF or one derived from the coarse density.
        It is stored in grid cells and clamped to [-1, 1] (:data:`SDF_UNITS`): exact within
        a cell of the surface, saturated beyond, as HeadSculpt keeps its DMTet SDF in
        [-1, 1] (renderer.py:863), so a learning rate of 1e-2 moves it by 1% of its range.
    deform_scale: bound on each vertex's offset, in cells.
    device: where the grid is built and the parameters live (the run's device).

    The grid itself (rest vertices (V, 3) float32, tetrahedra (T, 4) int32) is rebuilt from
    its spec, never saved: ``state_dict()`` holds ``sdf`` (V,), ``deform`` (V, 3) and the
    spec (a few numbers, as extra state). Loading a state checks that it is of this grid
    (:meth:`from_state_dict` builds the right one) and drops the grid buffers older
    checkpoints carry.
    """

    def __init__(self, grid: int | TetGridSpec, frame: FieldFrame | None = None,
                 sdf_init: Callable[[torch.Tensor], torch.Tensor] | None = None, deform_scale: float = 0.5,
                 device: torch.device | str | None = None):
        super().__init__()
        self.frame = frame or FieldFrame()
        self.spec = grid if isinstance(grid, TetGridSpec) else TetGridSpec.cube(grid, self.frame.bound)
        verts, tets = tetrahedral_grid(self.spec, device if device is not None else "cpu")
        self.register_buffer("grid_verts", verts, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.resolution = self.spec.resolution
        self.cell = self.spec.cell
        self.deform_scale = deform_scale
        init = sdf_init(verts) if sdf_init is not None else verts.norm(dim=-1) - 0.5 * self.frame.bound
        init = (init.detach().to(device=verts.device, dtype=torch.float32) / self.cell).clamp(-1.0, 1.0)
        self.sdf = nn.Parameter(init.clone())
        self.deform = nn.Parameter(torch.zeros_like(verts))

    @classmethod
    def from_state_dict(cls, state: dict, frame: FieldFrame | None = None, deform_scale: float = 0.5,
                        device: torch.device | str | None = None) -> DMTetGeometry:
        """The geometry a saved ``state`` (this class's ``state_dict()``, or an older one with
        the grid buffers) belongs to, on ``device``, with the state loaded."""
        geometry = cls(grid_of_state(state), frame, lambda p: p.new_zeros(p.shape[0]), deform_scale, device)
        geometry.load_state_dict(state)
        return geometry

    def vertices(self) -> torch.Tensor:
        """(V, 3) deformed grid vertices, each within ``deform_scale`` cells of its rest position."""
        return self.grid_verts + self.deform_scale * self.cell * torch.tanh(self.deform)

    def extract(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current surface: vertices (M, 3) field units (differentiable) and faces (F, 3)."""
        return marching_tetrahedra(self.vertices(), self.tets, self.sdf)

    def get_extra_state(self) -> dict:
        return {"grid": self.spec.to_dict(), "sdf_units": SDF_UNITS}

    def set_extra_state(self, state: dict) -> None:
        pass  # checked in _load_from_state_dict, before the parameters are copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        local = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        spec = grid_of_state(local)
        for name in LEGACY_GRID_KEYS:
            state_dict.pop(prefix + name, None)
        if sdf_in_field_units(local) and prefix + "sdf" in state_dict:
            # Written before the SDF was kept in cells: the same surface, in cells (not clamped,
            # so every zero crossing stays where it was). The caller's tensor is not changed.
            state_dict[prefix + "sdf"] = state_dict[prefix + "sdf"] / spec.cell
        state_dict[prefix + GRID_STATE_KEY] = {"grid": spec.to_dict(), "sdf_units": SDF_UNITS}
        if not _same_grid(spec, self.spec):
            raise ValueError(f"the saved geometry is of a grid of {spec.cells} cells of {spec.cell:.5g} from "
                             f"{_fmt(spec.origin)}, this one of {self.spec.cells} cells of {self.spec.cell:.5g} "
                             f"from {_fmt(self.spec.origin)}: build it with DMTetGeometry.from_state_dict")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def sdf_in_field_units(state: dict) -> bool:
    """Whether a saved geometry state (keys without the module prefix) holds its SDF in field
    units, as states written before the SDF was kept in cells (:data:`SDF_UNITS`) do."""
    extra = state.get(GRID_STATE_KEY)
    return not (isinstance(extra, dict) and extra.get("sdf_units") == SDF_UNITS)


def grid_of_state(state: dict) -> TetGridSpec:
    """The :class:`~avatar.ops.marching_tets.TetGridSpec` of a saved geometry state (keys
    without the module prefix): its extra state, or for checkpoints written before grids
    were rebuilt, the rest vertices they stored."""
    extra = state.get(GRID_STATE_KEY)
    if isinstance(extra, dict) and isinstance(extra.get("grid"), dict):
        return TetGridSpec.from_dict(extra["grid"])
    if "grid_verts" in state:
        return TetGridSpec.of_vertices(state["grid_verts"])
    raise ValueError("the saved geometry has no grid definition (neither its extra state nor the grid_verts of "
                     "older checkpoints): it is not a DMTetGeometry state")


def _same_grid(a: TetGridSpec, b: TetGridSpec) -> bool:
    tol = 1e-5 * min(a.cell, b.cell)
    return (a.cells == b.cells and abs(a.cell - b.cell) <= tol
            and all(abs(x - y) <= tol * max(a.cells) for x, y in zip(a.origin, b.origin)))


def _fmt(point: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in point) + ")"


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

    @torch.no_grad()
    def copy_albedo_from(self, nerf: nn.Module) -> bool:
        """Start from a coarse :class:`~avatar.fields.nerf.NeRFField`'s albedo: copy its hash
        grid and albedo MLP in place (HeadSculpt loads the coarse weights into the DMTet
        model, main.py:192-200, so the mesh starts with the coarse colours). The parameters
        keep their identity, so an optimiser built on them stays valid.

        Returns False, changing nothing, when the two grids or MLPs differ in size
        (different ``coarse.*`` and ``fine.*`` hash-grid settings).
        """
        def grid_key(enc: nn.Module) -> tuple:
            return (enc.n_levels, enc.n_features_per_level, enc.log2_hashmap_size, enc.base_resolution,
                    enc.per_level_scale, tuple(enc.params.shape))

        pairs = [(self.encoding.params, nerf.encoding.params)]
        pairs += list(zip(self.net.parameters(), nerf.albedo_net.parameters()))
        if (grid_key(self.encoding) != grid_key(nerf.encoding) or len(list(self.net.parameters()))
                != len(list(nerf.albedo_net.parameters())) or any(a.shape != b.shape for a, b in pairs)):
            return False
        for mine, theirs in pairs:
            mine.copy_(theirs)
        return True


def laplacian_loss(verts: torch.Tensor, faces: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Mean length of the uniform Laplacian of the mesh (each vertex vs the mean of its
    neighbours), as HeadSculpt's ``laplacian_smooth_loss`` (renderer.py:230-268): penalises
    bumps and spikes. ``squared`` averages the squared length instead."""
    f = faces.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    edges = torch.cat([edges, edges.flip(1)])
    n = verts.shape[0]
    neigh_sum = torch.zeros_like(verts).index_add(0, edges[:, 0], verts[edges[:, 1]])
    degree = torch.zeros(n, device=verts.device, dtype=verts.dtype).index_add(
        0, edges[:, 0], torch.ones(edges.shape[0], device=verts.device, dtype=verts.dtype))
    lap = verts - neigh_sum / degree.clamp(min=1)[:, None]
    sq = lap.pow(2).sum(-1)
    # The length's gradient is undefined at zero (a flat patch): a tiny floor keeps it finite.
    return sq.mean() if squared else (sq + 1e-20).sqrt().mean()


def normal_consistency_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cos) between the normals of triangles sharing an edge.

    verts: (V, 3); faces: (F, 3). Sort-based, with no data-dependent sizes, so it never
    waits for the device: the three edges of every face get one integer key each, and
    neighbouring entries of the sorted keys that are equal are the two faces of an edge.
    """
    f = faces.long()
    face_n = torch.nn.functional.normalize(
        torch.linalg.cross(verts[f[:, 1]] - verts[f[:, 0]], verts[f[:, 2]] - verts[f[:, 0]], dim=-1), dim=-1)
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    key = edges.min(1).values * verts.shape[0] + edges.max(1).values
    face_id = torch.arange(f.shape[0], device=f.device).repeat(3)
    key, order = torch.sort(key, stable=True)
    same = (key[1:] == key[:-1]).to(face_n.dtype)  # (3F - 1,): 1 where entries i, i + 1 share an edge
    a, b = face_id[order[:-1]], face_id[order[1:]]
    return ((1.0 - (face_n[a] * face_n[b]).sum(-1)) * same).sum() / same.sum().clamp(min=1.0)
