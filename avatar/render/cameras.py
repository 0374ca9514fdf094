"""Head-centric pinhole cameras: one convention for rays, rasterisation and landmarks.

Conventions (used everywhere; the classic silent bug of this field is two of
them disagreeing by a flip):

- World/field frame: +Y up, the face looks down +Z, head centre at the origin.
- Camera frame (OpenGL): the camera looks down its -Z axis, +X right, +Y up.
  ``c2w`` columns are (right, up, back, eye).
- Spherical placement: ``azimuth`` in degrees from +Z (the face) turning toward
  +X, so azimuth 0 is a front view and 180 a back view; ``polar`` in degrees from
  +Y, so 90 is level with the face; ``radius`` in field units.
- Images: row 0 is the top, column 0 the left; pixel (row i, col j) has its
  centre at (j + 0.5, i + 0.5). :meth:`Cameras.project` returns (x right, y down)
  pixel coordinates in that frame.
- Clip space: :meth:`Cameras.mvp` is an OpenGL perspective matrix with its Y row
  negated, so that a rasteriser using nvdiffrast's convention (output row 0 at
  NDC y = -1) produces images whose row 0 is the top, like the ray renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from avatar.seeding import draw

VIEWS = ("front", "side", "back", "overhead")
OVERHEAD_POLAR = 0.0
"""Default polar angle (degrees) below which cameras are labelled ``overhead``: 0 disables the
label, as in HeadSculpt (its provider.py polar overrides are commented out, so views are labelled
from azimuth alone and a camera near the top gets its sector's label, and the landmark ControlNet
unless the sector is ``back``). The label stays available through ``CameraConfig.overhead_polar``."""


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices looking from ``eye`` at ``target``.

    eye, target: (B, 3). up: (3,), default +Y. Returns (B, 4, 4), columns
    (right, up, back, eye) in the OpenGL camera convention.
    """
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up.expand_as(forward), dim=-1)
    # Looking straight up or down: any right vector perpendicular to forward will do.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype,
                                                   device=eye.device).expand_as(forward), dim=-1)
    right = torch.nn.functional.normalize(torch.where(degenerate, alt, right), dim=-1)
    true_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=eye.dtype, device=eye.device).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    return c2w


def spherical_to_position(azimuth: torch.Tensor, polar: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """(B,) degrees, degrees, field units -> (B, 3) positions (see module conventions)."""
    az, po = torch.deg2rad(azimuth), torch.deg2rad(polar)
    return torch.stack([radius * torch.sin(po) * torch.sin(az), radius * torch.cos(po),
                        radius * torch.sin(po) * torch.cos(az)], dim=-1)


def view_label(azimuth: torch.Tensor, polar: torch.Tensor, front_sector: float = 70.0,
               back_sector: float = 70.0, overhead_polar: float = OVERHEAD_POLAR) -> list[str]:
    """``front`` / ``side`` / ``back`` per camera from its azimuth (for view-dependent prompts);
    ``overhead`` where the polar angle is below ``overhead_polar`` degrees (0, the default, never)."""
    az = torch.remainder(azimuth + 180.0, 360.0) - 180.0  # (-180, 180]
    labels = []
    for a, p in zip(az.tolist(), polar.tolist()):
        if p < overhead_polar:
            labels.append("overhead")
        elif abs(a) <= front_sector / 2:
            labels.append("front")
        elif abs(a) >= 180.0 - back_sector / 2:
            labels.append("back")
        else:
            labels.append("side")
    return labels


@dataclass
class Cameras:
    """A batch of B pinhole cameras of one image size.

    c2w: (B, 4, 4) camera-to-world. fov_y: (B,) vertical field of view, radians.
    azimuth, polar, radius: (B,) the spherical placement (degrees, degrees, field units).
    views: B labels from :data:`VIEWS`.
    """

    c2w: torch.Tensor
    fov_y: torch.Tensor
    height: int
    width: int
    azimuth: torch.Tensor
    polar: torch.Tensor
    radius: torch.Tensor
    views: list[str]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index: int | slice) -> Cameras:
        idx = [index] if isinstance(index, int) else index
        views = [self.views[index]] if isinstance(index, int) else self.views[index]
        return Cameras(self.c2w[idx], self.fov_y[idx], self.height, self.width, self.azimuth[idx],
                       self.polar[idx], self.radius[idx], views)

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, device: torch.device | str) -> Cameras:
        # non_blocking: a copy from the host to a GPU then does not wait for the GPU's queue
        # (pageable memory is staged at once, so the source may be reused straight away).
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=t.device.type == "cpu")

        return Cameras(move(self.c2w), move(self.fov_y), self.height, self.width,
                       move(self.azimuth), move(self.polar), move(self.radius), list(self.views))

    def with_resolution(self, height: int, width: int | None = None) -> Cameras:
        """Same cameras at another image size (the field of view is kept)."""
        return Cameras(self.c2w, self.fov_y, height, width or height, self.azimuth, self.polar, self.radius,
                       list(self.views))

    @property
    def w2c(self) -> torch.Tensor:
        """(B, 4, 4) world-to-camera."""
        return torch.linalg.inv(self.c2w)

    @property
    def eye(self) -> torch.Tensor:
        """(B, 3) camera centres in the world."""
        return self.c2w[:, :3, 3]

    @property
    def focal(self) -> torch.Tensor:
        """(B,) focal length in pixels (square pixels; vertical field of view)."""
        return 0.5 * self.height / torch.tan(0.5 * self.fov_y)

    @property
    def intrinsics(self) -> torch.Tensor:
        """(B, 3, 3) K for (x right, y down) pixel coordinates of the camera-frame point
        (X, -Y, -Z) (i.e. OpenCV's frame, which flips OpenGL's Y and Z)."""
        k = torch.zeros(len(self), 3, 3, dtype=self.c2w.dtype, device=self.device)
        k[:, 0, 0] = self.focal
        k[:, 1, 1] = self.focal
        k[:, 0, 2] = self.width / 2
        k[:, 1, 2] = self.height / 2
        k[:, 2, 2] = 1.0
        return k

    def projection(self, near: float = 0.05, far: float = 10.0) -> torch.Tensor:
        """(B, 4, 4) OpenGL perspective with the Y row negated (see module docstring)."""
        p = torch.zeros(len(self), 4, 4, dtype=self.c2w.dtype, device=self.device)
        t = torch.tan(0.5 * self.fov_y)
        aspect = self.width / self.height
        p[:, 0, 0] = 1.0 / (t * aspect)
        p[:, 1, 1] = -1.0 / t
        p[:, 2, 2] = -(far + near) / (far - near)
        p[:, 2, 3] = -2.0 * far * near / (far - near)
        p[:, 3, 2] = -1.0
        return p

    def mvp(self, near: float = 0.05, far: float = 10.0) -> torch.Tensor:
        """(B, 4, 4) world -> clip."""
        return self.projection(near, far) @ self.w2c

    def to_clip(self, points: torch.Tensor, near: float = 0.05, far: float = 10.0) -> torch.Tensor:
        """points: (V, 3) or (B, V, 3) world -> (B, V, 4) clip coordinates for the rasteriser."""
        if points.dim() == 2:
            points = points.expand(len(self), -1, -1)
        homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
        return homo @ self.mvp(near, far).transpose(1, 2)

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points: (N, 3) or (B, N, 3) world -> pixels (B, N, 2) as (x right, y down) and
        depth (B, N) along the viewing axis (positive in front of the camera)."""
        if points.dim() == 2:
            points = points.expand(len(self), -1, -1)
        w2c = self.w2c
        cam = points @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
        depth = -cam[..., 2]
        f = self.focal[:, None]
        x = f * cam[..., 0] / depth + self.width / 2
        y = -f * cam[..., 1] / depth + self.height / 2
        return torch.stack([x, y], dim=-1), depth

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions through pixel centres, each (B, H, W, 3) in the world."""
        dtype, device = self.c2w.dtype, self.device
        j = torch.arange(self.width, dtype=dtype, device=device) + 0.5
        i = torch.arange(self.height, dtype=dtype, device=device) + 0.5
        ii, jj = torch.meshgrid(i, j, indexing="ij")
        f = self.focal[:, None, None]
        dirs_cam = torch.stack([(jj - self.width / 2) / f, -(ii - self.height / 2) / f,
                                -torch.ones_like(jj).expand_as(f * jj)], dim=-1)
        dirs = torch.einsum("bhwc,brc->bhwr", dirs_cam, self.c2w[:, :3, :3])
        dirs = torch.nn.functional.normalize(dirs, dim=-1)
        origins = self.eye[:, None, None, :].expand_as(dirs)
        return origins, dirs


def make_cameras(azimuth: torch.Tensor, polar: torch.Tensor, radius: torch.Tensor, fov_y_deg: torch.Tensor,
                 resolution: int | tuple[int, int], target: torch.Tensor | None = None,
                 front_sector: float = 70.0, back_sector: float = 70.0,
                 overhead_polar: float = OVERHEAD_POLAR) -> Cameras:
    """Cameras on a sphere around the head looking at ``target`` (default the origin).

    azimuth, polar: (B,) degrees; radius: (B,) field units; fov_y_deg: (B,) degrees;
    target: (B, 3) or None.
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    eye = spherical_to_position(azimuth, polar, radius)
    if target is None:
        target = torch.zeros_like(eye)
    return Cameras(look_at(eye, target), torch.deg2rad(fov_y_deg), h, w, azimuth, polar, radius,
                   view_label(azimuth, polar, front_sector, back_sector, overhead_polar))


def sample_cameras(n: int, cfg, resolution: int | tuple[int, int], generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Cameras:
    """Random training cameras following a :class:`avatar.config.CameraConfig`.

    The azimuth sector (front / side / back) is drawn with ``cfg.sector_probs``,
    then the azimuth uniformly within it; polar, radius and field of view are
    uniform in their ranges; the look-at point is jittered by ``cfg.look_at_jitter``.
    Sampling runs on the generator's device (a run's generator lives on the CPU, so the
    cameras do not depend on the training device), then the cameras move to ``device``.
    """
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * draw(torch.rand, n, generator=generator, dtype=torch.float64)

    probs = torch.tensor(cfg.sector_probs, dtype=torch.float64)
    sector = draw(torch.multinomial, probs / probs.sum(), n, replacement=True, generator=generator)
    half_front, half_back = cfg.front_sector / 2, cfg.back_sector / 2
    side_width = 180.0 - half_front - half_back  # each of the two side sectors
    u = draw(torch.rand, n, generator=generator, dtype=torch.float64)
    front = (2 * u - 1) * half_front
    back = 180.0 + (2 * u - 1) * half_back
    # One side sector on each side: u < 0.5 -> +X side, else -X side.
    side_u = torch.remainder(2 * u, 1.0)
    side = torch.where(u < 0.5, 1.0, -1.0) * (half_front + side_u * side_width)
    azimuth = torch.where(sector == 0, front, torch.where(sector == 1, side, back))
    polar = uniform(*cfg.polar_range)
    radius = uniform(*cfg.radius_range)
    fov = uniform(*cfg.fov_range)
    target = draw(torch.randn, n, 3, generator=generator, dtype=torch.float64) * cfg.look_at_jitter
    cams = make_cameras(azimuth.float(), polar.float(), radius.float(), fov.float(), resolution, target.float(),
                        cfg.front_sector, cfg.back_sector, cfg.overhead_polar)
    return cams.to(device)


def orbit_cameras(n: int, elevation: float = 0.0, radius: float = 1.3, fov_y: float = 40.0,
                  resolution: int | tuple[int, int] = 256, start_azimuth: float = 0.0,
                  device: torch.device | str = "cpu") -> Cameras:
    """``n`` cameras evenly spaced in azimuth at one elevation (degrees above the
    horizon), for turntables, previews and held-out evaluation views."""
    azimuth = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    polar = torch.full((n,), 90.0 - elevation)
    cams = make_cameras(azimuth, polar, torch.full((n,), radius), torch.full((n,), fov_y), resolution)
    return cams.to(device)


def fov_to_focal(fov_y_deg: float, height: int) -> float:
    """Focal length in pixels for a vertical field of view in degrees."""
    return 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
