"""Volume rendering of a radiance field for the coarse stage.

Rays through pixel centres (:meth:`Cameras.rays`) are clipped to the field
cube, sampled on a lattice only where the occupancy grid says there may be
density (Instant-NGP's empty-space skipping), queried for density and albedo,
shaded per sample and alpha-composited (:func:`avatar.ops.compositing.composite_rays`)
over a background.

Outputs are (B, H, W, C) images in the camera's top-down image order:
``rgb``, ``opacity``, ``depth`` (camera-space distance along the optical axis,
expected under the ray's weights) and, when asked for or needed by the shading,
``normal`` (composited unit world normals). ``weights`` and ``samples`` carry the
per-sample terms the regularisers need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from avatar.ops.compositing import OccupancyGrid, composite_rays
from avatar.render.cameras import Cameras
from avatar.render.shading import shade
from avatar.seeding import draw


def ray_box(origins: torch.Tensor, dirs: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays (N, 3) through the cube [-bound, bound]^3.

    Rays that miss get near == far (no samples). Near is clamped at 0.
    """
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-bound - origins) / safe
    t1 = (bound - origins) / safe
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    far = torch.maximum(far, near)
    return near, far


class BackgroundMLP(nn.Module):
    """A learned background colour as a function of the view direction (small MLP
    over a low-frequency encoding), as DreamFusion uses to keep the backdrop from
    absorbing the subject."""

    def __init__(self, hidden: int = 32, frequencies: int = 2):
        super().__init__()
        self.frequencies = frequencies
        n_in = 3 + 6 * frequencies
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        enc = [dirs]
        for k in range(self.frequencies):
            enc += [torch.sin((2.0**k) * math.pi * dirs), torch.cos((2.0**k) * math.pi * dirs)]
        return torch.sigmoid(self.net(torch.cat(enc, dim=-1)))


@dataclass
class RenderOutput:
    """Images (B, H, W, C) plus per-sample terms for regularisers."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def background_colour(background: str | torch.Tensor | nn.Module, dirs: torch.Tensor) -> torch.Tensor:
    """(..., 3) background for view directions ``dirs`` (..., 3)."""
    if isinstance(background, nn.Module):
        return background(dirs)
    if isinstance(background, str):
        value = {"white": 1.0, "black": 0.0, "grey": 0.5}.get(background)
        if value is None:
            raise ValueError(f"unknown background '{background}': white, black, grey, a colour or a module")
        return torch.full_like(dirs, value)
    return background.to(dirs).expand_as(dirs)


class VolumeRenderer:
    """Renders a field ``(points (N, 3) field units) -> (density (N,), albedo (N, 3))``.

    field: a module with ``forward`` as above and ``normals(points)`` (see
        :class:`avatar.fields.nerf.NeRFField`).
    bound: half-size of the field cube.
    samples_per_ray: lattice steps across the cube's diagonal (the maximum per ray).
    occupancy: optional :class:`OccupancyGrid` over the cube (None samples everywhere).
    engine: compositing / marching engine.
    """

    def __init__(self, field: nn.Module, bound: float = 1.0, samples_per_ray: int = 128,
                 occupancy: OccupancyGrid | None = None, engine: str = "auto",
                 transmittance_threshold: float = 1e-4):
        self.field = field
        self.bound = bound
        self.samples_per_ray = samples_per_ray
        self.step_size = 2.0 * bound * math.sqrt(3.0) / samples_per_ray
        self.occupancy = occupancy
        self.engine = engine
        self.transmittance_threshold = transmittance_threshold
        self._full = None

    def update_occupancy(self, step: int, force: bool = False, generator: torch.Generator | None = None) -> bool:
        """Refresh the occupancy grid from the field's density (every N steps)."""
        if self.occupancy is None:
            return False

        def density(unit_points: torch.Tensor) -> torch.Tensor:
            return self.field.density((unit_points * 2.0 - 1.0) * self.bound)

        return self.occupancy.update(step, density, force=force, generator=generator)

    def _bitfield(self, device: torch.device) -> tuple[torch.Tensor, int]:
        if self.occupancy is not None:
            return self.occupancy.bitfield, self.occupancy.resolution
        if self._full is None or self._full.device != device:
            self._full = torch.full((1,), 255, dtype=torch.uint8, device=device)
        return self._full, 1

    def render(self, cameras: Cameras, shading: str = "albedo", light: torch.Tensor | None = None,
               background: str | torch.Tensor | nn.Module = "white", jitter: bool = False,
               generator: torch.Generator | None = None, with_normals: bool = False,
               ambient: float = 0.25) -> RenderOutput:
        """Render every pixel of every camera.

        shading: ``albedo``, ``lambertian``, ``textureless`` or ``normal``.
        light: (B, 3) point lights (for lambertian/textureless).
        jitter: stratified sample offsets per ray (training) instead of bin centres.
        """
        from avatar.ops.compositing import march_rays

        b, h, w = len(cameras), cameras.height, cameras.width
        origins, dirs = cameras.rays()
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        n_rays = o.shape[0]
        near, far = ray_box(o, d, self.bound)
        if jitter:
            offset = draw(torch.rand, n_rays, generator=generator, dtype=o.dtype, device=o.device)
        else:
            offset = 0.5
        bitfield, res = self._bitfield(o.device)
        # The occupancy grid lives in the unit cube: x_unit = (x / bound + 1) / 2, with the
        # direction scaled alike so that t keeps its field-unit meaning.
        samples = march_rays((o / self.bound + 1.0) * 0.5, d / (2.0 * self.bound), bitfield, res, near, far,
                             self.step_size, max_samples=self.samples_per_ray * 2, jitter=offset,
                             engine=self.engine)
        ray_idx = samples.ray_indices
        points = o[ray_idx] + samples.ts[:, None] * d[ray_idx]
        density, albedo = self.field(points) if points.shape[0] else (points.new_zeros(0), points.new_zeros(0, 3))
        need_normals = with_normals or shading != "albedo"
        normals = self.field.normals(points) if need_normals and points.shape[0] else None
        per_sample_light = light[ray_idx // (h * w)] if light is not None else None
        if shading == "albedo":
            colour = albedo
        elif shading == "normal":
            colour = shade(albedo, normals, None, "normal")
        else:
            if per_sample_light is None:
                raise ValueError(f"{shading} shading needs light positions")
            colour = shade(albedo[:, None], normals[:, None], points[:, None], shading, per_sample_light, ambient)[:, 0]
        channels = colour if normals is None else torch.cat([colour, normals], dim=-1)
        result = composite_rays(density, channels.contiguous(), samples.deltas, samples.ts, samples.offsets,
                                self.transmittance_threshold, engine=self.engine)
        opacity = result.opacity[:, None]
        # Depth along the optical axis: t * cos(angle between ray and axis).
        forward = -cameras.c2w[:, :3, 2]
        cos = (dirs * forward[:, None, None, :]).sum(-1).reshape(-1)
        depth = (result.depth / result.opacity.clamp(min=1e-6) * cos)[:, None]
        rgb = result.colour[:, :3] + (1.0 - opacity) * background_colour(background, d)
        out = RenderOutput(
            rgb=rgb.view(b, h, w, 3), opacity=opacity.view(b, h, w, 1), depth=depth.view(b, h, w, 1),
            extras={"weights": result.weights, "ray_indices": ray_idx, "dirs": d, "n_samples": points.shape[0]},
        )
        if normals is not None:
            out.normal = torch.nn.functional.normalize(result.colour[:, 3:6], dim=-1).view(b, h, w, 3)
            out.extras["normals"] = normals
        return out
