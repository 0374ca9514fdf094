"""The coarse-stage radiance field: hash grid + small MLPs for density and albedo.

Density starts from the head prior: a fixed bias that is a smooth step of the
prior's signed distance (high inside the head, about zero outside, a few
millimetres wide), which the network learns to correct. This is what makes a
text-to-head run start from a head instead of a fog (HeadSculpt, Sec. 3.2).
The prior's SDF is sampled once onto a small dense grid kept in the field's
state, so a run needs the prior only when it is created.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from avatar.fields.frame import FieldFrame
from avatar.ops.hashgrid import HashGridEncoding, max_resolution_to_per_level_scale


def mlp(n_in: int, n_out: int, hidden: int, layers: int) -> nn.Sequential:
    """A ReLU MLP with ``layers`` hidden layers of width ``hidden``."""
    mods: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


def hash_grid(n_levels: int, log2_hashmap_size: int, max_resolution: int, engine: str) -> HashGridEncoding:
    """The fields' hash grid: 2 features per level from resolution 16 up to ``max_resolution``."""
    return HashGridEncoding(
        n_levels=n_levels, n_features_per_level=2, log2_hashmap_size=log2_hashmap_size, base_resolution=16,
        per_level_scale=max_resolution_to_per_level_scale(16, max_resolution, n_levels), engine=engine)


def sample_grid(grid: torch.Tensor, points: torch.Tensor, bound: float) -> torch.Tensor:
    """Trilinear lookup of a dense (D, D, D) grid over [-bound, bound]^3 indexed [x, y, z].

    points: (N, 3) field units. Returns (N,). Points outside read the border value.
    """
    # grid_sample wants (N, C, D, H, W) indexed [z, y, x] and coordinates (x, y, z) in [-1, 1].
    vol = grid.permute(2, 1, 0)[None, None]
    coords = (points / bound).clamp(-1, 1).view(1, -1, 1, 1, 3).to(grid.dtype)
    out = torch.nn.functional.grid_sample(vol, coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(-1).to(points.dtype)


class NeRFField(nn.Module):
    """Density and albedo over the field cube.

    frame: the :class:`FieldFrame` (field units <-> metres).
    prior_sdf: optional callable (N, 3) metres -> (N,) signed distance in metres
        (negative inside), sampled once on a ``prior_grid``^3 grid.
    sdf_width: width of the smooth step in metres.
    density_inside: density (per field unit) the bias gives deep inside the head.
    normal_eps: step of the central differences in :meth:`normals`, field units.
        HeadSculpt's is 1e-2 of its units (network_grid.py:183-206), 3.1 mm; 8e-3 of ours
        (2.5 units per metre) is the same length.
    """

    def __init__(self, frame: FieldFrame | None = None, prior_sdf: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 sdf_width: float = 0.005, density_inside: float = 50.0, prior_grid: int = 96,
                 n_levels: int = 16, log2_hashmap_size: int = 19, max_resolution: int = 2048,
                 hidden: int = 64, engine: str = "auto", normal_eps: float = 8e-3):
        super().__init__()
        self.frame = frame or FieldFrame()
        self.normal_eps = normal_eps
        self.encoding = hash_grid(n_levels, log2_hashmap_size, max_resolution, engine)
        self.density_net = mlp(self.encoding.n_output_dims, 1, hidden, 1)
        self.albedo_net = mlp(self.encoding.n_output_dims, 3, hidden, 1)
        self.sdf_width = sdf_width
        self.density_inside = density_inside
        if prior_sdf is not None:
            axis = torch.linspace(-self.frame.bound, self.frame.bound, prior_grid)
            pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
            with torch.no_grad():
                sdf = prior_sdf(self.frame.to_metres(pts)).reshape(prior_grid, prior_grid, prior_grid)
            self.register_buffer("prior_sdf_grid", sdf.float())
        else:
            self.register_buffer("prior_sdf_grid", torch.empty(0))

    def density_bias(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) raw-density bias from the prior: softplus(bias) is ``density_inside``
        inside the head and about zero more than a few widths outside."""
        if self.prior_sdf_grid.numel() == 0:
            return points.new_zeros(points.shape[0])
        sdf = sample_grid(self.prior_sdf_grid, points, self.frame.bound)
        step = torch.sigmoid(-sdf / self.sdf_width)
        return step * (self.density_inside + 5.0) - 5.0

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points: (N, 3) field units -> density (N,) >= 0 and albedo (N, 3) in [0, 1]."""
        feat = self.encoding(self.frame.to_unit(points).clamp(0, 1))
        raw = self.density_net(feat).squeeze(-1) + self.density_bias(points)
        density = torch.nn.functional.softplus(raw)
        albedo = torch.sigmoid(self.albedo_net(feat))
        return density, albedo

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) field units -> (N,) density; for occupancy grids and extraction."""
        return self.forward(points)[0]

    def normals(self, points: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """(N, 3) unit outward normals: minus the normalised density gradient, by
        central differences of step ``eps`` (default :attr:`normal_eps`) field units;
        works with every hash-grid engine."""
        eps = self.normal_eps if eps is None else eps
        offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps
        plus = self.density((points[:, None, :] + offsets).reshape(-1, 3)).view(-1, 3)
        minus = self.density((points[:, None, :] - offsets).reshape(-1, 3)).view(-1, 3)
        grad = (plus - minus) / (2 * eps)
        return -torch.nn.functional.normalize(grad, dim=-1)
