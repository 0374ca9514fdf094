"""Camera conventions agree between rays, projection and clip space; sampling follows the config."""

from __future__ import annotations

import pytest
import torch

from avatar.config import CameraConfig
from avatar.render.cameras import make_cameras, orbit_cameras, sample_cameras, view_label
from avatar.render.shading import random_light, sample_shading, shade


def test_sector_fractions_and_ranges():
    cfg = CameraConfig()
    g = torch.Generator().manual_seed(0)
    cams = sample_cameras(10_000, cfg, 64, generator=g)
    az = torch.remainder(cams.azimuth + 180, 360) - 180
    front = (az.abs() <= cfg.front_sector / 2).float().mean().item()
    back = (az.abs() >= 180 - cfg.back_sector / 2).float().mean().item()
    side = 1 - front - back
    for got, want in zip((front, side, back), cfg.sector_probs):
        assert abs(got - want) < 0.02
    assert cams.polar.min() >= cfg.polar_range[0] and cams.polar.max() <= cfg.polar_range[1]
    assert cams.radius.min() >= cfg.radius_range[0] and cams.radius.max() <= cfg.radius_range[1]
    fov = torch.rad2deg(cams.fov_y)
    assert fov.min() >= cfg.fov_range[0] - 1e-4 and fov.max() <= cfg.fov_range[1] + 1e-4
    # Labels follow the azimuth sectors alone (HeadSculpt has no overhead label): cameras near
    # the top keep their sector's label.
    assert set(cams.views) == {"front", "side", "back"}
    az = torch.remainder(cams.azimuth + 180, 360) - 180
    top = cams.polar < 30.0
    assert top.sum() > 500
    for i in torch.nonzero(top).flatten()[:200].tolist():
        want = "front" if abs(az[i]) <= cfg.front_sector / 2 else "back" if abs(az[i]) >= 180 - cfg.back_sector / 2 \
            else "side"
        assert cams.views[i] == want
    # The label can still be switched on through the config.
    steep = sample_cameras(2000, CameraConfig(overhead_polar=30.0), 64, generator=torch.Generator().manual_seed(0))
    assert [v == "overhead" for v in steep.views] == (steep.polar < 30.0).tolist()
    # Same generator seed -> same cameras.
    again = sample_cameras(10_000, cfg, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.c2w, cams.c2w)


def test_labels():
    az = torch.tensor([0.0, 30.0, 90.0, -90.0, 180.0, -150.0, 0.0])
    polar = torch.tensor([90.0, 90.0, 90.0, 90.0, 90.0, 90.0, 10.0])
    assert view_label(az, polar) == ["front", "front", "side", "side", "back", "back", "front"]
    assert view_label(az, polar, overhead_polar=30.0)[-1] == "overhead"


def test_front_view_orientation():
    cam = make_cameras(torch.tensor([0.0]), torch.tensor([90.0]), torch.tensor([1.5]), torch.tensor([40.0]), 128)
    assert torch.allclose(cam.eye[0], torch.tensor([0.0, 0.0, 1.5]), atol=1e-6)
    pts = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.0]])
    px, depth = cam.project(pts)
    # +X (the head's left) is on the image's right; +Y is up, i.e. a smaller row.
    assert px[0, 0, 0] > 64 and abs(px[0, 0, 1] - 64) < 1e-4
    assert px[0, 1, 1] < 64 and abs(px[0, 1, 0] - 64) < 1e-4
    assert torch.allclose(px[0, 2], torch.tensor([64.0, 64.0])) and abs(depth[0, 2] - 1.5) < 1e-6


def test_back_view_mirrors_x():
    cam = make_cameras(torch.tensor([180.0]), torch.tensor([90.0]), torch.tensor([1.5]), torch.tensor([40.0]), 128)
    px, _ = cam.project(torch.tensor([[0.1, 0.0, 0.0]]))
    assert px[0, 0, 0] < 64


def test_rays_project_back_to_their_pixels():
    cfg = CameraConfig()
    cams = sample_cameras(4, cfg, (24, 32), generator=torch.Generator().manual_seed(1))
    origins, dirs = cams.rays()
    assert origins.shape == (4, 24, 32, 3) and torch.allclose(dirs.norm(dim=-1), torch.ones(4, 24, 32))
    pts = (origins + 0.7 * dirs).reshape(4, -1, 3)
    px, depth = cams.project(pts)
    rows, cols = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    want = torch.stack([cols, rows], -1).reshape(1, -1, 2).expand(4, -1, -1)
    torch.testing.assert_close(px, want, atol=1e-3, rtol=0)
    assert (depth > 0).all()


def test_clip_space_matches_projection_in_nvdiffrast_convention():
    cams = sample_cameras(3, CameraConfig(), (40, 60), generator=torch.Generator().manual_seed(2))
    pts = torch.randn(50, 3) * 0.2
    clip = cams.to_clip(pts)
    ndc = clip[..., :3] / clip[..., 3:]
    # nvdiffrast: pixel column = (x_ndc + 1) / 2 * W and output row = (y_ndc + 1) / 2 * H.
    px_from_clip = torch.stack([(ndc[..., 0] + 1) / 2 * 60, (ndc[..., 1] + 1) / 2 * 40], -1)
    px, depth = cams.project(pts)
    torch.testing.assert_close(px_from_clip, px, atol=1e-3, rtol=0)
    torch.testing.assert_close(clip[..., 3], depth, atol=1e-5, rtol=0)
    assert (ndc[..., 2].abs() < 1).all()


def test_orbit_and_straight_down():
    cams = orbit_cameras(8, elevation=0.0, radius=2.0, resolution=32)
    assert cams.views[0] == "front" and cams.views[4] == "back"
    assert torch.allclose(cams.eye.norm(dim=-1), torch.full((8,), 2.0))
    top = orbit_cameras(1, elevation=90.0, radius=2.0, resolution=32)
    assert torch.isfinite(top.c2w).all()
    rot = top.c2w[0, :3, :3]
    torch.testing.assert_close(rot.T @ rot, torch.eye(3), atol=1e-5, rtol=0)


def test_shading():
    g = torch.Generator().manual_seed(0)
    assert sample_shading((1.0, 0.0, 0.0), g) == "albedo"
    modes = [sample_shading((0.5, 0.3, 0.2), g) for _ in range(2000)]
    assert abs(modes.count("lambertian") / 2000 - 0.3) < 0.04
    albedo = torch.full((1, 2, 3), 0.5)
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])
    pos = torch.zeros(1, 2, 3)
    light = torch.tensor([[0.0, 0.0, 5.0]])
    lit = shade(albedo, normals, pos, "lambertian", light, ambient=0.2)
    torch.testing.assert_close(lit[0, 0], torch.full((3,), 0.5))   # facing the light
    torch.testing.assert_close(lit[0, 1], torch.full((3,), 0.1))   # facing away: ambient only
    assert torch.allclose(shade(albedo, normals, pos, "textureless", light, 0.2)[0, 0], torch.ones(3))
    assert torch.allclose(shade(albedo, normals, pos, "normal")[0, 0], torch.tensor([0.5, 0.5, 1.0]))
    eye = torch.tensor([[0.0, 0.0, 1.5]])
    lights = torch.cat([random_light(eye, g) for _ in range(200)])
    assert (lights[:, 2] > 0).float().mean() > 0.9  # mostly on the camera's side
    with pytest.raises(ValueError, match="unknown shading mode"):
        shade(albedo, normals, pos, "toon")
