"""The volume and mesh renderers agree with each other and with the analytic sphere."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh
from torch import nn

from avatar.ops.compositing import OccupancyGrid
from avatar.render.cameras import orbit_cameras
from avatar.render.mesh import MeshRenderer, vertex_normals
from avatar.render.volume import VolumeRenderer, ray_box

RADIUS = 0.35
CAM_RADIUS = 1.4
FOV = 40.0
RES = 96


class SphereField(nn.Module):
    """Analytic density: a hard ball of radius RADIUS with a colour gradient."""

    def __init__(self):
        super().__init__()
        self.tint = nn.Parameter(torch.tensor([0.2, 0.5, 0.8]))

    def forward(self, points):
        inside = points.norm(dim=-1) < RADIUS
        density = torch.where(inside, 2000.0, 0.0).to(points)
        albedo = (self.tint * torch.ones_like(points)).clamp(0, 1)
        return density, albedo

    def density(self, points):
        return self.forward(points)[0]

    def normals(self, points):
        return torch.nn.functional.normalize(points, dim=-1)


def analytic_disk(cams):
    """Pixel mask of the sphere's exact silhouette and its centre depth."""
    f = cams.focal[0].item()
    r_px = f * math.tan(math.asin(RADIUS / CAM_RADIUS))
    rows, cols = torch.meshgrid(torch.arange(RES) + 0.5, torch.arange(RES) + 0.5, indexing="ij")
    return ((rows - RES / 2) ** 2 + (cols - RES / 2) ** 2) < r_px**2, CAM_RADIUS - RADIUS


@pytest.fixture(scope="module")
def cams():
    return orbit_cameras(8, elevation=15.0, radius=CAM_RADIUS, fov_y=FOV, resolution=RES)


@pytest.fixture(scope="module")
def sphere_mesh():
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=RADIUS)
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.int64)


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def test_ray_box():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far = ray_box(o, d, 1.0)
    assert torch.allclose(near[0], torch.tensor(2.0)) and torch.allclose(far[0], torch.tensor(4.0))
    assert near[1] == far[1]  # misses


def test_volume_and_mesh_agree_with_the_analytic_sphere(cams, sphere_mesh):
    disk, centre_depth = analytic_disk(cams)
    volume = VolumeRenderer(SphereField(), bound=1.0, samples_per_ray=512).render(cams)
    verts, faces = sphere_mesh
    mesh = MeshRenderer().render(cams, verts, faces)
    vol_mask = volume.opacity[..., 0] > 0.5
    mesh_mask = mesh.opacity[..., 0] > 0.5
    for i in range(len(cams)):
        assert iou(vol_mask[i], mesh_mask[i]) >= 0.97
        assert iou(vol_mask[i], disk) >= 0.97 and iou(mesh_mask[i], disk) >= 0.97
    c = RES // 2
    centre_vol = volume.depth[:, c - 1:c + 1, c - 1:c + 1, 0].mean(dim=(1, 2))
    centre_mesh = mesh.depth[:, c - 1:c + 1, c - 1:c + 1, 0].mean(dim=(1, 2))
    assert torch.allclose(centre_vol, torch.full((8,), centre_depth), rtol=0.01)
    assert torch.allclose(centre_mesh, torch.full((8,), centre_depth), rtol=0.01)
    # White background outside, the sphere's colour inside.
    assert torch.allclose(volume.rgb[0, 0, 0], torch.ones(3), atol=1e-4)
    assert torch.allclose(volume.rgb[0, c, c], torch.tensor([0.2, 0.5, 0.8]), atol=1e-3)


def test_occupancy_grid_skips_empty_space_without_changing_the_image(cams):
    field = SphereField()
    full = VolumeRenderer(field, samples_per_ray=128).render(cams[:2])
    grid = OccupancyGrid(resolution=32, update_every=1, warmup_steps=10)
    skipping = VolumeRenderer(field, samples_per_ray=128, occupancy=grid)
    # Each refresh probes one random point per cell, as in training; a few refreshes
    # find the cells the ball only grazes.
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        skipping.update_occupancy(step, generator=g)
    assert 0.0 < grid.occupancy < 0.2
    fast = skipping.render(cams[:2])
    assert fast.extras["n_samples"] < 0.5 * full.extras["n_samples"]
    assert iou(fast.opacity > 0.5, full.opacity > 0.5) > 0.995
    assert (fast.opacity - full.opacity).abs().mean() < 2e-3


def test_mesh_normals_face_the_camera_and_point_outward(cams, sphere_mesh):
    verts, faces = sphere_mesh
    n = vertex_normals(verts, faces)
    assert (torch.nn.functional.cosine_similarity(n, verts) > 0.99).all()
    out = MeshRenderer().render(cams[:1], verts, faces, shading="normal")
    c = RES // 2
    # Front camera at +Z (slightly above): the centre normal points back at it.
    assert out.normal[0, c, c, 2] > 0.9


def test_gradients_of_field_vertices_and_texture_match_finite_differences(cams, sphere_mesh):
    from support import assert_gradients_match_finite_differences

    # Volume: the image is linear in the tint (its clamp inactive), so float32 central
    # differences (eps 1e-2, 3 random directions) agree within 1e-3 relative.
    field = SphereField()
    renderer = VolumeRenderer(field, samples_per_ray=64)
    assert_gradients_match_finite_differences(lambda: renderer.render(cams[:1]).rgb.mean(), {"tint": field.tint},
                                              eps=1e-2, rtol=1e-3, atol=1e-7)

    verts, faces = sphere_mesh
    verts = verts.clone().requires_grad_(True)
    torch.manual_seed(0)
    texture = nn.Linear(3, 3)
    mesh_renderer = MeshRenderer()

    def image(v=None):
        v = verts if v is None else v
        # Silhouette and colour both depend on the vertices; colour on the texture field.
        out = mesh_renderer.render(cams[:1], v, faces, albedo=lambda p: torch.sigmoid(texture(p)))
        return out.opacity.mean() + out.rgb.mean()

    # The texture field is smooth; float32 rounding in the image mean (about 1e-7) needs a large
    # step: eps 0.1 (truncation about 1e-3 relative), within 1e-2 relative plus 2e-5 absolute
    # (rounding over the 0.2 step; the derivatives are up to 5e-3).
    assert_gradients_match_finite_differences(image, dict(texture.named_parameters()), eps=0.1, rtol=1e-2,
                                              atol=2e-5)
    # The vertices: along a growth of the sphere by 1% (the silhouette moves a third of a
    # pixel), through antialiasing and interpolation, within 20%. A coarse sphere (80 faces):
    # as in nvdiffrast, only silhouette edges of triangles seen at pixel centres are found, so
    # finer rims lose the silhouette gradient (measured on this view, autograd / differences:
    # 0.85 with 80 faces, 0.37 with 320, 0.0 with the 20480 of ``sphere_mesh``).
    coarse = trimesh.creation.icosphere(subdivisions=1, radius=RADIUS)
    verts = torch.tensor(coarse.vertices, dtype=torch.float32).requires_grad_(True)
    faces = torch.tensor(coarse.faces, dtype=torch.int64)
    (grad,) = torch.autograd.grad(image(verts), verts)
    step = 0.01
    with torch.no_grad():
        numeric = float(image(verts * (1 + step)) - image(verts * (1 - step))) / (2 * step)
    analytic = float((grad * verts.detach()).sum())
    assert numeric > 0 and analytic == pytest.approx(numeric, rel=0.2)


def test_learned_background_fills_empty_pixels_and_trains(cams):
    from avatar.render.volume import BackgroundMLP

    torch.manual_seed(0)
    background = BackgroundMLP()
    out = VolumeRenderer(SphereField(), samples_per_ray=64).render(cams[:2], background=background)
    corner = out.rgb[:, 0, 0]
    assert not torch.allclose(corner, torch.ones_like(corner))  # not the default white
    out.rgb[:, :4, :4].mean().backward()
    assert background.net[0].weight.grad.abs().sum() > 0
    # The two cameras look in different directions, so their backgrounds differ.
    assert (out.rgb[0, 0, 0] - out.rgb[1, 0, 0]).abs().sum() > 1e-4
