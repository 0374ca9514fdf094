"""Volume compositing of packed ray samples, and the occupancy grid that places them.

- :func:`composite_rays`: weights, opacity, depth and colour of rays from
  per-sample density and colour (NeRF quadrature, Mildenhall et al. 2020 Eq. 3),
  with transmittance early termination; differentiable in densities, colours,
  deltas and ts.
- :func:`march_rays`: packed samples on a fixed lattice along each ray, only in
  cells an occupancy bitfield marks (Instant-NGP's empty-space skipping).
- :class:`OccupancyGrid`: the bitfield over the unit cube, kept up to date from a
  density callback every N steps with Instant-NGP's decayed maximum.

Packed samples: ray ``r`` owns samples ``offsets[r]:offsets[r+1]`` (offsets (R+1,)
int64), so rays have any number of samples, zero included. Engines: ``native``
(cuda_ext, CPU and CUDA) and ``torch`` (:mod:`avatar.ops.reference.compositing`).
Both native engines accumulate in double; CUDA matches the CPU engine to rtol 1e-5,
atol 1e-6 in float32 (1e-12 in float64): the device ``expf`` differs from the host's
in the last bits. Marching on CUDA reads the total sample count back once per call
(the packed output must be allocated); nothing else in these ops waits for the GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from avatar.ops.engine import EngineError, resolve_engine
from avatar.ops.reference import compositing as reference
from avatar.ops.reference.compositing import CompositeResult, RaySamples, occupancy_lookup

__all__ = [
    "CompositeResult",
    "OccupancyGrid",
    "RaySamples",
    "composite_rays",
    "march_rays",
    "occupancy_lookup",
    "pack_occupancy",
    "unpack_occupancy",
]

_MAX_CHANNELS = 32


def _grad_or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # An output the loss does not use arrives as None; the kernel reads an empty
    # tensor as zeros, so no zero tensor is materialised.
    return like.new_empty(0) if grad is None else grad.contiguous()


class _CompositeNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigmas, rgbs, deltas, ts, offsets, threshold: float):
        weights, opacity, depth, colour, n_active = torch.ops.avatar.composite_forward(
            sigmas, rgbs, deltas, ts, offsets, float(threshold)
        )
        ctx.save_for_backward(sigmas, rgbs, deltas, ts, offsets, weights, n_active)
        ctx.set_materialize_grads(False)
        return weights, opacity, depth, colour

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_opacity, grad_depth, grad_colour):
        sigmas, rgbs, deltas, ts, offsets, weights, n_active = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_sigmas, grad_rgbs, grad_deltas, grad_ts = torch.ops.avatar.composite_backward(
            _grad_or_empty(grad_weights, sigmas),
            _grad_or_empty(grad_opacity, sigmas),
            _grad_or_empty(grad_depth, sigmas),
            _grad_or_empty(grad_colour, sigmas),
            sigmas,
            rgbs,
            deltas,
            ts,
            offsets,
            weights,
            n_active,
            bool(needs[1]),
            bool(needs[2]),
            bool(needs[3]),
        )
        return (
            grad_sigmas if needs[0] else None,
            grad_rgbs if needs[1] else None,
            grad_deltas if needs[2] else None,
            grad_ts if needs[3] else None,
            None,
            None,
        )


def _check_offsets(offsets: torch.Tensor, n_samples: int, op: str) -> torch.Tensor:
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{op}: offsets must be (R + 1,), got {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: offsets must be int32 or int64, got {offsets.dtype}")
    offsets = offsets.long().contiguous()
    if offsets.device.type != "cpu":
        # Reading values back would stall the GPU once per render; offsets on a GPU come
        # from march_rays, which builds them non-decreasing from 0 to the sample count.
        return offsets
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != n_samples or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(
            f"{op}: offsets must be non-decreasing from 0 to the sample count {n_samples}, "
            f"got {first} ... {last}"
        )
    return offsets


def composite_rays(
    sigmas: torch.Tensor,
    rgbs: torch.Tensor,
    deltas: torch.Tensor,
    ts: torch.Tensor,
    offsets: torch.Tensor,
    transmittance_threshold: float = 1e-4,
    engine: str = "auto",
) -> CompositeResult:
    """Alpha-composite packed ray samples.

    sigmas: (S,) densities >= 0. rgbs: (S, C) colours or features, C <= 32.
    deltas: (S,) bin lengths. ts: (S,) bin positions along the ray (for depth).
    offsets: (R + 1,) int32/int64; ray r owns samples offsets[r]:offsets[r+1]; non-decreasing
        from 0 to S (checked for CPU tensors; trusted on a GPU, where reading them back would
        stall every render).
    transmittance_threshold: once the transmittance before a sample drops below
        it, that sample and the rest of the ray get weight 0 (0 disables).
    engine: ``auto`` | ``native`` | ``torch``.
    All float tensors float32 or float64, one dtype, one device.

    Returns :class:`CompositeResult` (weights (S,), opacity (R,), depth (R,),
    colour (R, C)); colour has no background term. Differentiable (first order
    with the native engine) in sigmas, rgbs, deltas and ts.
    """
    if sigmas.dim() != 1 or deltas.shape != sigmas.shape or ts.shape != sigmas.shape:
        raise ValueError(
            f"composite_rays: sigmas, deltas, ts must be (S,), got {tuple(sigmas.shape)}, "
            f"{tuple(deltas.shape)}, {tuple(ts.shape)}"
        )
    if rgbs.dim() != 2 or rgbs.shape[0] != sigmas.shape[0]:
        raise ValueError(f"composite_rays: rgbs must be (S, C), got {tuple(rgbs.shape)}")
    dtypes = {sigmas.dtype, rgbs.dtype, deltas.dtype, ts.dtype}
    if len(dtypes) != 1 or sigmas.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"composite_rays: expected one float32/float64 dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (sigmas, rgbs, deltas, ts, offsets)}
    if len(devices) != 1:
        raise ValueError(f"composite_rays: inputs on several devices: {devices}")
    offsets = _check_offsets(offsets, sigmas.shape[0], "composite_rays")
    choice = resolve_engine("composite", engine, sigmas.device.type)
    if choice == "native" and rgbs.shape[1] > _MAX_CHANNELS:
        if engine == "native":
            raise EngineError(f"native compositing supports at most {_MAX_CHANNELS} channels, got {rgbs.shape[1]}")
        choice = "torch"
    if choice == "native":
        out = _CompositeNative.apply(
            sigmas.contiguous(),
            rgbs.contiguous(),
            deltas.contiguous(),
            ts.contiguous(),
            offsets,
            float(transmittance_threshold),
        )
        return CompositeResult(*out)
    return reference.composite_rays(sigmas, rgbs, deltas, ts, offsets, transmittance_threshold)


def _per_ray(value, n_rays: int, like: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.shape not in ((n_rays,), ()):
            raise ValueError(f"march_rays: {name} must be a float or ({n_rays},), got {tuple(value.shape)}")
        return value.to(device=like.device, dtype=like.dtype).expand(n_rays).contiguous()
    return torch.full((n_rays,), float(value), device=like.device, dtype=like.dtype)


def march_rays(
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    bitfield: torch.Tensor,
    resolution: int,
    near: float | torch.Tensor,
    far: float | torch.Tensor,
    step_size: float,
    max_samples: int = 1024,
    jitter: float | torch.Tensor = 0.5,
    engine: str = "auto",
) -> RaySamples:
    """Place samples along rays only where the occupancy grid is set.

    rays_o, rays_d: (R, 3) origins and directions in the grid's frame, the unit
        cube [0,1]^3 (directions need not be normalised; t is in their units).
    bitfield: (ceil(res^3 / 8),) uint8, see :func:`pack_occupancy`.
    near, far: floats or (R,) finite ray intervals (checked for CPU tensors only).
    step_size: distance in t between samples; every sample gets delta = step_size.
    max_samples: at most this many (the first) samples per ray.
    jitter: offset of the lattice within a step, float or (R,) in [0, 1): 0.5 puts
        samples at bin centres, ``torch.rand(R)`` stratifies for training.
    engine: ``auto`` | ``native`` | ``torch``. Not differentiable.

    Sample k of a ray sits at t_k = near + (k + jitter) step_size, t_k < far, and
    is kept if o + t_k d lies in an occupied cell. The native engine jumps over
    empty cells and returns exactly the samples of the reference, which tests
    every lattice point.
    """
    if rays_o.dim() != 2 or rays_o.shape[1] != 3 or rays_d.shape != rays_o.shape:
        raise ValueError(f"march_rays: rays_o, rays_d must be (R, 3), got {tuple(rays_o.shape)}, {tuple(rays_d.shape)}")
    if rays_o.dtype not in (torch.float32, torch.float64) or rays_d.dtype != rays_o.dtype:
        raise TypeError(f"march_rays: rays must be float32 or float64, got {rays_o.dtype}, {rays_d.dtype}")
    if bitfield.dtype != torch.uint8 or bitfield.dim() != 1 or bitfield.numel() * 8 < resolution**3:
        raise ValueError(
            f"march_rays: bitfield must be ({(resolution**3 + 7) // 8},) uint8 for resolution {resolution}, "
            f"got {tuple(bitfield.shape)} {bitfield.dtype}"
        )
    if not step_size > 0:
        raise ValueError(f"march_rays: step_size must be > 0, got {step_size}")
    n_rays = rays_o.shape[0]
    near_t = _per_ray(near, n_rays, rays_o, "near")
    far_t = _per_ray(far, n_rays, rays_o, "far")
    jitter_t = _per_ray(jitter, n_rays, rays_o, "jitter")
    # Value checks on CPU tensors only, where they cost no device sync (see _check_offsets).
    if n_rays and rays_o.device.type == "cpu" and not bool(torch.isfinite(near_t).all() & torch.isfinite(far_t).all()):
        raise ValueError("march_rays: near and far must be finite")
    bitfield = bitfield.to(rays_o.device).contiguous()
    choice = resolve_engine("march", engine, rays_o.device.type)
    if choice == "native" and rays_o.is_cuda and rays_o.dtype != torch.float32:
        if engine == "native":
            raise EngineError("native ray marching on CUDA takes float32 rays")
        choice = "torch"
    if choice == "torch":
        return reference.march_rays(
            rays_o, rays_d, near_t, far_t, jitter_t, bitfield, resolution, step_size, max_samples
        )
    offsets, ts = torch.ops.avatar.occupancy_march(
        rays_o.contiguous(),
        rays_d.contiguous(),
        near_t,
        far_t,
        jitter_t,
        bitfield,
        int(resolution),
        float(step_size),
        int(max_samples),
    )
    return RaySamples(
        ts, torch.full_like(ts, step_size), offsets, reference.ray_indices_from_offsets(offsets, ts.numel())
    )


def pack_occupancy(mask: torch.Tensor) -> torch.Tensor:
    """Pack a (res, res, res) bool grid indexed [ix, iy, iz] into a uint8 bitfield.

    Bit ``flat & 7`` of byte ``flat >> 3`` holds cell ``flat = (ix*res + iy)*res + iz``.
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_occupancy(bitfield: torch.Tensor, resolution: int) -> torch.Tensor:
    """The (res, res, res) bool grid of a bitfield (inverse of :func:`pack_occupancy`)."""
    shifts = torch.arange(8, device=bitfield.device, dtype=torch.uint8)
    bits = (bitfield[:, None] >> shifts) & 1
    return bits.reshape(-1)[: resolution**3].bool().view(resolution, resolution, resolution)


class OccupancyGrid(nn.Module):
    """Which cells of the unit cube [0,1]^3 may hold density (Instant-NGP, App. E.2).

    resolution: cells per axis.
    update_every: :meth:`update` refreshes the grid every this many steps.
    decay: each refresh multiplies the stored densities by this before taking the
        maximum with the new estimates (old evidence fades, new evidence wins).
    threshold: a cell is occupied if its density exceeds min(threshold, mean density).
    warmup_steps: before this step every refresh evaluates every cell; afterwards a
        quarter of the cells uniformly plus as many occupied cells.
    chunk: points per call of the density callback.

    Buffers (saved in checkpoints): ``density`` (res, res, res) float32, ``bitfield``
    (ceil(res^3 / 8),) uint8. The grid starts fully occupied.
    """

    def __init__(
        self,
        resolution: int = 128,
        update_every: int = 16,
        decay: float = 0.95,
        threshold: float = 0.01,
        warmup_steps: int = 256,
        chunk: int = 1 << 18,
    ) -> None:
        super().__init__()
        if resolution < 1 or update_every < 1 or not 0.0 <= decay <= 1.0:
            raise ValueError("OccupancyGrid: need resolution >= 1, update_every >= 1 and 0 <= decay <= 1")
        self.resolution = resolution
        self.update_every = update_every
        self.decay = decay
        self.threshold = threshold
        self.warmup_steps = warmup_steps
        self.chunk = chunk
        self.register_buffer("density", torch.zeros(resolution, resolution, resolution))
        self.register_buffer("bitfield", torch.full(((resolution**3 + 7) // 8,), 255, dtype=torch.uint8))

    @property
    def occupancy(self) -> float:
        """Fraction of occupied cells."""
        return float(self.occupied_fraction())

    def occupied_fraction(self) -> torch.Tensor:
        """Fraction of occupied cells, a 0-d tensor where the grid is (nothing read back)."""
        return unpack_occupancy(self.bitfield, self.resolution).float().mean()

    def cell_centres(self) -> torch.Tensor:
        """(res^3, 3) centres of all cells in bit order."""
        r = self.resolution
        axis = (torch.arange(r, device=self.density.device, dtype=torch.float32) + 0.5) / r
        return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)

    @torch.no_grad()
    def update(self, step: int, density_fn, force: bool = False, generator: torch.Generator | None = None) -> bool:
        """Refresh the grid from ``density_fn(points (N, 3) in [0,1]^3) -> (N,) or (N, 1)``.

        Runs when ``step % update_every == 0`` (or ``force``); returns whether it ran.
        Each evaluated cell is probed at a uniformly random point inside it.
        """
        if not force and step % self.update_every != 0:
            return False
        from avatar.seeding import draw

        r = self.resolution
        n_cells = r**3
        device = self.density.device
        flat_density = self.density.view(-1)
        if step < self.warmup_steps:
            cells = torch.arange(n_cells, device=device)
        else:
            # A quarter of the cells uniformly plus as many occupied cells, drawn without a
            # host sync: the k-th occupied cell is found by a search over the running count.
            count = max(1, n_cells // 4)
            uniform = draw(torch.randint, n_cells, (count,), generator=generator, device=device)
            occupied = unpack_occupancy(self.bitfield, r).view(-1)
            running = torch.cumsum(occupied, 0)
            k = draw(torch.rand, (count,), generator=generator, dtype=torch.float64, device=device)
            k = (k * running[-1]).long()  # k-th occupied cell, 0 <= k < n_occupied
            picked = torch.searchsorted(running, k + 1).clamp_(max=n_cells - 1)
            cells = torch.cat((uniform, torch.where(running[-1] > 0, picked, uniform)))
        ijk = torch.stack((cells // (r * r), (cells // r) % r, cells % r), dim=-1).float()
        jitter = draw(torch.rand, ijk.shape, generator=generator, device=device)
        points = (ijk + jitter) / r
        chunks = [points[i : i + self.chunk] for i in range(0, len(points), self.chunk)]
        sigmas = torch.cat([density_fn(chunk).reshape(-1).float() for chunk in chunks])
        flat_density.mul_(self.decay)
        flat_density.scatter_reduce_(0, cells, sigmas.to(flat_density.dtype), "amax", include_self=True)
        limit = flat_density.mean().clamp(max=self.threshold)  # a tensor: no host sync
        self.bitfield.copy_(pack_occupancy(self.density > limit))
        return True

    def mark_all_occupied(self) -> None:
        self.bitfield.fill_(255)

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) bool for points (N, 3) in the unit cube (outside counts as empty)."""
        return occupancy_lookup(points, self.bitfield, self.resolution)

    def sample(
        self,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        near: float | torch.Tensor,
        far: float | torch.Tensor,
        step_size: float,
        max_samples: int = 1024,
        jitter: float | torch.Tensor = 0.5,
        engine: str = "auto",
    ) -> RaySamples:
        """Packed samples in occupied cells along the rays (see :func:`march_rays`)."""
        return march_rays(
            rays_o, rays_d, self.bitfield, self.resolution, near, far, step_size, max_samples, jitter, engine
        )
