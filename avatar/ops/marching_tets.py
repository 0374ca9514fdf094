"""Tetrahedral grids and marching tetrahedra (vectorised PyTorch, differentiable).

DMTet (Shen et al. 2021, "Deep Marching Tetrahedra") extracts a triangle mesh
from signed distances stored on the vertices of a tetrahedral grid. Each
surface vertex lies on a grid edge whose end points have opposite signs, at the
zero of the linear interpolation, so it is differentiable in both the SDF
values and the (deformable) grid vertex positions. We generate the grid
ourselves (no downloaded grid files): a cube of ``N^3`` cells, each split into
six tetrahedra sharing the cell's main diagonal (Kuhn's subdivision), which
is conforming, so neighbouring cells agree on shared faces and the mesh is
watertight.

SDF convention: negative inside, as everywhere in avatar.
"""

from __future__ import annotations

import itertools

import torch

# Local edges of a tetrahedron (vertex pairs).
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_EDGE_INDEX = {e: i for i, e in enumerate(TET_EDGES)}


def _edge(a: int, b: int) -> int:
    return _EDGE_INDEX[(min(a, b), max(a, b))]


def _triangle_table() -> tuple[torch.Tensor, torch.Tensor]:
    """For each 4-bit inside pattern: up to two triangles as local edge indices.

    One vertex on its own (inside or outside) cuts a triangle through its three
    edges; two and two cut a quad through the four mixed edges, in cyclic order.
    Orientation is fixed afterwards from the geometry, so the table need not
    encode it.
    """
    table = torch.full((16, 6), -1, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for code in range(16):
        inside = [v for v in range(4) if code >> v & 1]
        outside = [v for v in range(4) if not code >> v & 1]
        if len(inside) in (1, 3):
            lone = inside[0] if len(inside) == 1 else outside[0]
            others = [v for v in range(4) if v != lone]
            table[code, :3] = torch.tensor([_edge(lone, o) for o in others])
            count[code] = 1
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            ring = [_edge(a, c), _edge(a, d), _edge(b, d), _edge(b, c)]
            table[code] = torch.tensor([ring[0], ring[1], ring[2], ring[0], ring[2], ring[3]])
            count[code] = 2
    return table, count


TRIANGLE_TABLE, TRIANGLE_COUNT = _triangle_table()


def cube_tetrahedra(resolution: int, bound: float = 1.0, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tetrahedral grid of the cube ``[-bound, bound]^3``.

    resolution: cells per side N. Returns vertices (( N+1)^3, 3) float32 and
    tetrahedra (6 N^3, 4) int64, each positively oriented.
    """
    n = int(resolution)
    if n < 1:
        raise ValueError(f"tetrahedral grid resolution must be >= 1, got {resolution}")
    axis = torch.linspace(-bound, bound, n + 1, device=device)
    verts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)

    def vid(i: torch.Tensor, j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (i * (n + 1) + j) * (n + 1) + k

    cells = torch.stack(torch.meshgrid(*(torch.arange(n, device=device),) * 3, indexing="ij"), -1).reshape(-1, 3)
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = cells.clone()
        ids = [vid(*corner.unbind(-1))]
        for axis_idx in perm:
            corner = corner.clone()
            corner[:, axis_idx] += 1
            ids.append(vid(*corner.unbind(-1)))
        tets.append(torch.stack(ids, dim=-1))
    tets = torch.cat(tets, dim=0)
    # Make every tetrahedron positively oriented (odd permutations come out negative).
    p = verts[tets]
    vol = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], dim=1))
    flip = vol < 0
    tets[flip] = tets[flip][:, [0, 2, 1, 3]]
    return verts, tets


def marching_tetrahedra(verts: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Extract the zero level set of ``sdf`` as a triangle mesh.

    verts: (V, 3) grid vertex positions (may be deformed; gradients flow).
    tets: (T, 4) int64 vertex indices. sdf: (V,) signed distance, negative inside.
    Returns mesh vertices (M, 3) (differentiable in ``verts`` and ``sdf``) and
    faces (F, 3) int64, counter-clockwise seen from outside (normals point out).
    Surface vertices on an edge shared by several tetrahedra are created once.
    """
    if verts.dim() != 2 or verts.shape[1] != 3:
        raise ValueError(f"verts must be (V, 3), got {tuple(verts.shape)}")
    if sdf.shape != verts.shape[:1]:
        raise ValueError(f"sdf must be (V,) = ({verts.shape[0]},), got {tuple(sdf.shape)}")
    device = verts.device
    with torch.no_grad():
        inside = sdf < 0
        occ = inside[tets]  # (T, 4)
        n_in = occ.sum(-1)
        active = (n_in > 0) & (n_in < 4)
        tets_a = tets[active]
        if tets_a.numel() == 0:
            return verts.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=device)
        occ_a = occ[active]
        local = torch.tensor(TET_EDGES, device=device)  # (6, 2)
        edges = tets_a[:, local]  # (Ta, 6, 2)
        crossing = occ_a[:, local[:, 0]] != occ_a[:, local[:, 1]]  # (Ta, 6)
        edges = torch.sort(edges, dim=-1).values
        unique, edge_ids = torch.unique(edges[crossing], dim=0, return_inverse=True)
        edge_map = torch.full(crossing.shape, -1, dtype=torch.long, device=device)
        edge_map[crossing] = edge_ids
        code = (occ_a.long() * torch.tensor([1, 2, 4, 8], device=device)).sum(-1)
        table = TRIANGLE_TABLE.to(device)[code]  # (Ta, 6)
        counts = TRIANGLE_COUNT.to(device)[code]
        tri_local = table.view(-1, 2, 3)
        keep = torch.arange(2, device=device)[None, :] < counts[:, None]  # (Ta, 2)
        faces = torch.gather(edge_map[:, None, :].expand(-1, 2, -1), 2, tri_local.clamp(min=0))[keep]
        tet_of_face = torch.arange(tets_a.shape[0], device=device)[:, None].expand(-1, 2)[keep]

    # Zero crossing on each edge: p = a + t (b - a), t = sdf_a / (sdf_a - sdf_b).
    s_a, s_b = sdf[unique[:, 0]], sdf[unique[:, 1]]
    t = (s_a / (s_a - s_b)).unsqueeze(-1)
    v_a, v_b = verts[unique[:, 0]], verts[unique[:, 1]]
    mesh_verts = v_a + t * (v_b - v_a)

    with torch.no_grad():
        # Orient each triangle so its normal points from the inside corners of
        # its tetrahedron toward the outside ones.
        p = mesh_verts.detach()[faces]
        normal = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
        corners = verts.detach()[tets_a[tet_of_face]]  # (F, 4, 3)
        w_in = occ_a[tet_of_face].float()
        centre_in = (corners * w_in[..., None]).sum(1) / w_in.sum(1, keepdim=True)
        centre_out = (corners * (1 - w_in)[..., None]).sum(1) / (1 - w_in).sum(1, keepdim=True)
        flip = (normal * (centre_out - centre_in)).sum(-1) < 0
        faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return mesh_verts, faces
