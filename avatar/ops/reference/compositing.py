"""Reference ray compositing and occupancy-grid marching in plain PyTorch.

Packed samples: ray ``r`` owns samples ``offsets[r]:offsets[r+1]`` of the flat
(S,) / (S, C) sample tensors, so rays may have any number of samples, zero
included. The math and its order of operations are those of the native kernels
(``cuda_ext/include/avatar/composite.h`` and ``occupancy.h``); see there for the
equations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CompositeResult(NamedTuple):
    """Outputs of :func:`composite_rays`.

    weights: (S,) w_i = T_i alpha_i (0 after early termination).
    opacity: (R,) accumulated alpha, sum of a ray's weights.
    depth: (R,) expected ray parameter, sum of w_i t_i (not normalised by opacity).
    colour: (R, C) sum of w_i c_i (no background: add ``(1 - opacity) * bg``).
    """

    weights: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    colour: torch.Tensor


class RaySamples(NamedTuple):
    """Packed samples along rays, as produced by :func:`march_rays`.

    ts: (S,) ray parameters of the samples (bin centres with jitter 0.5).
    deltas: (S,) bin lengths (the step size).
    offsets: (R + 1,) int64; ray r owns samples offsets[r]:offsets[r+1].
    ray_indices: (S,) int64, the ray of each sample.
    """

    ts: torch.Tensor
    deltas: torch.Tensor
    offsets: torch.Tensor
    ray_indices: torch.Tensor

    def points(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
        """(S, 3) sample positions ``o + t d``."""
        return rays_o[self.ray_indices] + self.ts[:, None] * rays_d[self.ray_indices]


def ray_indices_from_offsets(offsets: torch.Tensor, n_samples: int | None = None) -> torch.Tensor:
    """(S,) int64 ray index of each packed sample."""
    counts = offsets[1:] - offsets[:-1]
    rays = torch.arange(counts.numel(), device=offsets.device)
    return torch.repeat_interleave(rays, counts, output_size=n_samples)


def composite_rays(
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    deltas: torch.Tensor,
    ts: torch.Tensor,
    offsets: torch.Tensor,
    transmittance_threshold: float = 1e-4,
) -> CompositeResult:
    """Alpha-composite packed samples (NeRF quadrature) with early termination.

    sigmas, deltas, ts: (S,) densities (>= 0), bin lengths, bin positions.
    rgbs: (S, C) colours (or any per-sample features).
    offsets: (R + 1,) int64, non-decreasing, offsets[0] = 0, offsets[R] = S.
    transmittance_threshold: samples whose transmittance before them is below
        this get weight 0, and so do all later samples of the ray (0 disables).
    """
    n_samples = sigmas.shape[0]
    n_rays = offsets.numel() - 1
    offsets = offsets.long()
    ray = ray_indices_from_offsets(offsets, n_samples)
    starts = offsets[:-1][ray]
    s = sigmas * deltas
    # Exclusive per-ray prefix sums of s from one global prefix sum in float64
    # (torch.cumsum on the CPU accumulates in double too), then T = exp(-sum).
    prefix = torch.cat((s.new_zeros(1, dtype=torch.float64), torch.cumsum(s.double(), 0)))
    exclusive = (prefix[:-1] - prefix[starts]).to(s.dtype)
    trans = torch.exp(-exclusive)
    # Terminated: this or an earlier sample of the ray fell below the threshold.
    below = (trans < transmittance_threshold).long()
    below_prefix = torch.cat((below.new_zeros(1), torch.cumsum(below, 0)))
    active = (below_prefix[1:] - below_prefix[starts]) == 0
    weights = trans * -torch.expm1(-s) * active
    opacity = sigmas.new_zeros(n_rays).index_add(0, ray, weights)
    depth = sigmas.new_zeros(n_rays).index_add(0, ray, weights * ts)
    colour = rgbs.new_zeros(n_rays, rgbs.shape[1]).index_add(0, ray, weights[:, None] * rgbs)
    return CompositeResult(weights, opacity, depth, colour)


def occupancy_lookup(points: torch.Tensor, bitfield: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N,) bool: is each point of ``points: (N, 3)`` in an occupied cell of the grid?

    Cell ``floor(p * res)`` (clamped to res - 1), bit ``(ix * res + iy) * res + iz``
    of the little-endian packed ``bitfield``; points outside [0,1]^3 are empty.
    """
    inside = ((points >= 0) & (points <= 1)).all(-1)
    cell = torch.floor(points * resolution).long().clamp(0, resolution - 1)
    flat = (cell[..., 0] * resolution + cell[..., 1]) * resolution + cell[..., 2]
    bit = (bitfield.long()[flat >> 3] >> (flat & 7)) & 1
    return inside & (bit == 1)


def march_rays(
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    near: torch.Tensor,
    far: torch.Tensor,
    jitter: torch.Tensor,
    bitfield: torch.Tensor,
    resolution: int,
    step_size: float,
    max_samples: int,
) -> RaySamples:
    """Samples on the lattice t_k = near + (k + jitter) step (t_k < far) kept where occupied.

    rays_o, rays_d: (R, 3); near, far, jitter: (R,); bitfield: packed uint8 grid.
    At most ``max_samples`` samples per ray (the first ones). Tests every lattice
    point, so it is for tests and small inputs; the native engine skips empty cells.
    """
    n_rays = rays_o.shape[0]
    dtype = rays_o.dtype
    span = ((far - near) / step_size).max() if n_rays else torch.zeros(())
    n_lattice = int(torch.ceil(span).item()) + 1 if n_rays else 0
    k = torch.arange(max(n_lattice, 0), device=rays_o.device, dtype=dtype)
    t = (k[None, :] + jitter[:, None]) * step_size + near[:, None]  # (R, K)
    points = rays_o[:, None, :] + t[..., None] * rays_d[:, None, :]
    keep = (t < far[:, None]) & occupancy_lookup(points, bitfield, resolution)
    keep &= torch.cumsum(keep.long(), dim=1) <= max_samples
    counts = keep.sum(1)
    offsets = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0)))
    ts = t[keep]
    return RaySamples(ts, torch.full_like(ts, step_size), offsets, ray_indices_from_offsets(offsets, ts.numel()))
