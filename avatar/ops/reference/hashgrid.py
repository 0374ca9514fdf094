"""Reference multi-resolution hash encoding (Instant-NGP) in plain PyTorch.

Same layout and arithmetic as the native kernel (``cuda_ext/include/avatar/hashgrid.h``)
and as tiny-cuda-nn's ``HashGrid``, so the three engines share one parameter table:

- level ``l`` has the float32 scale ``s_l = 2^(l log2 b) * N_min - 1`` and
  ``r_l = ceil(s_l) + 1`` grid vertices per axis (``b`` = per-level scale,
  ``N_min`` = base resolution);
- its table slice has ``min(next_multiple(r_l^3, 8), 2^T)`` rows: dense indexing
  ``x + y r + z r^2`` while ``r_l^3`` fits, the spatial hash of Instant-NGP's Eq. 4
  (xor of ``coordinate * (1, 2654435761, 805459861)`` in uint32) otherwise, both
  modulo the slice size;
- a point ``x`` in ``[0,1]^3`` (clamped) sits at ``x * s_l + 0.5`` (the 0.5 staggers
  the levels, paper appendix A) and is interpolated trilinearly from its cell's 8
  corners.

The reference loops over levels (each level vectorised over all points) so that
2^18 points x 16 levels never materialise an (N, L, 8, 3) index tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

PRIMES = (1, 2654435761, 805459861)
_UINT32 = 0xFFFFFFFF


@dataclass(frozen=True)
class HashGridLayout:
    """Per-level geometry of a hash grid (identical to tiny-cuda-nn's HashGrid).

    scales: float32 values (as Python floats) of ``s_l``, one per level.
    resolutions: grid vertices per axis ``ceil(s_l) + 1``.
    offsets: first table row of each level, plus the total row count at the end.
    dense: whether each level is indexed densely (its grid fits its slice).
    """

    n_levels: int
    log2_hashmap_size: int
    base_resolution: int
    per_level_scale: float
    scales: tuple[float, ...]
    resolutions: tuple[int, ...]
    offsets: tuple[int, ...]
    dense: tuple[bool, ...]

    @property
    def n_rows(self) -> int:
        """Rows of the parameter table, ``offsets[-1]``; the table is ``(n_rows, F)``."""
        return self.offsets[-1]

    def level_size(self, level: int) -> int:
        return self.offsets[level + 1] - self.offsets[level]


def _next_multiple(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@lru_cache(maxsize=64)
def hash_grid_layout(
    n_levels: int = 16,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    per_level_scale: float = 2.0,
) -> HashGridLayout:
    """The level layout of a hash grid with these settings.

    n_levels: L, at most 32. log2_hashmap_size: T, table rows per level at most 2^T
    (1 <= T <= 30). base_resolution: N_min > 1. per_level_scale: b >= 1, the
    growth of the resolution from one level to the next.
    """
    if not 1 <= n_levels <= 32:
        raise ValueError(f"hash grid: n_levels must be in [1, 32], got {n_levels}")
    if not 1 <= log2_hashmap_size <= 30:
        raise ValueError(f"hash grid: log2_hashmap_size must be in [1, 30], got {log2_hashmap_size}")
    if base_resolution < 2:
        raise ValueError(f"hash grid: base_resolution must be >= 2, got {base_resolution}")
    if not per_level_scale >= 1.0:
        raise ValueError(f"hash grid: per_level_scale must be >= 1, got {per_level_scale}")
    # float32 arithmetic, in tcnn's order: exp2f(l * log2(b)) * N_min - 1.
    log2_b = torch.log2(torch.tensor(per_level_scale, dtype=torch.float32))
    levels = torch.arange(n_levels, dtype=torch.float32)
    scales_t = torch.exp2(levels * log2_b) * torch.tensor(float(base_resolution), dtype=torch.float32) - 1.0
    scales = tuple(float(s) for s in scales_t.tolist())
    if scales[-1] >= 2**20:
        raise ValueError(f"hash grid: the finest level's scale {scales[-1]:.4g} must stay below 2^20")
    resolutions = tuple(int(math.ceil(s)) + 1 for s in scales)
    offsets = [0]
    dense = []
    max_rows = 1 << log2_hashmap_size
    for res in resolutions:
        rows = min(_next_multiple(res**3, 8), max_rows)
        dense.append(res**3 <= rows)
        offsets.append(offsets[-1] + rows)
    return HashGridLayout(
        n_levels=n_levels,
        log2_hashmap_size=log2_hashmap_size,
        base_resolution=base_resolution,
        per_level_scale=float(per_level_scale),
        scales=scales,
        resolutions=resolutions,
        offsets=tuple(offsets),
        dense=tuple(dense),
    )


def max_resolution_to_per_level_scale(base_resolution: int, max_resolution: int, n_levels: int) -> float:
    """``b = exp((ln N_max - ln N_min) / (L - 1))`` (Instant-NGP Eq. 3)."""
    if n_levels < 2:
        return 1.0
    return math.exp((math.log(max_resolution) - math.log(base_resolution)) / (n_levels - 1))


def level_rows(cells: torch.Tensor, layout: HashGridLayout, level: int) -> torch.Tensor:
    """Table rows (with the level offset) of integer grid vertices ``cells: (..., 3) int64``."""
    gx, gy, gz = cells.unbind(-1)
    return _combine_rows(gx, gy, gz, layout, level)


def _combine_rows(gx, gy, gz, layout: HashGridLayout, level: int) -> torch.Tensor:
    # Broadcasting int64 coordinates; the hash products stay below 2^63 and are
    # masked to 32 bits, which is uint32 wrap-around.
    res = layout.resolutions[level]
    if layout.dense[level]:
        index = gx + gy * res + gz * (res * res)
    else:
        index = gx ^ ((gy * PRIMES[1]) & _UINT32) ^ ((gz * PRIMES[2]) & _UINT32)
    return index % layout.level_size(level) + layout.offsets[level]


def hash_grid_encode(
    points: torch.Tensor,
    table: torch.Tensor,
    n_levels: int = 16,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    per_level_scale: float = 2.0,
) -> torch.Tensor:
    """Encode points with a multi-resolution hash grid.

    points: (N, 3) float32/float64 in [0, 1]^3 (clamped outside).
    table: (layout.n_rows, F) parameters, same dtype as points.
    Returns (N, L * F), level-major (``out[:, l*F:(l+1)*F]`` is level l).
    Differentiable (any order) in table and points.
    """
    layout = hash_grid_layout(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
    if table.shape[0] != layout.n_rows:
        raise ValueError(f"hash grid: the layout needs a table of {layout.n_rows} rows, got {tuple(table.shape)}")
    n_points, n_features = points.shape[0], table.shape[1]
    x = points.clamp(0.0, 1.0)
    step = torch.tensor([0, 1], device=points.device)
    outputs = []
    for level in range(layout.n_levels):
        pos = x * layout.scales[level] + 0.5
        cell = torch.floor(pos)
        frac = pos - cell
        # Lower/upper vertex and weight along each axis: (N, 2) each, combined into
        # the cell's 8 corners by broadcasting (corner bit d = upper along axis d).
        g = cell.long()[:, :, None] + step  # (N, 3, 2)
        w = torch.stack((1.0 - frac, frac), dim=-1)  # (N, 3, 2)
        rows = _combine_rows(
            g[:, 0].view(-1, 1, 1, 2), g[:, 1].view(-1, 1, 2, 1), g[:, 2].view(-1, 2, 1, 1), layout, level
        )  # (N, 2, 2, 2) indexed [z, y, x]
        weights = w[:, 0].view(-1, 1, 1, 2) * w[:, 1].view(-1, 1, 2, 1) * w[:, 2].view(-1, 2, 1, 1)
        values = table.index_select(0, rows.reshape(-1)).view(n_points, 8, n_features)
        outputs.append((weights.reshape(n_points, 8, 1) * values).sum(1))
    return torch.cat(outputs, dim=1)
