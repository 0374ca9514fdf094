"""Control images and renders of the head prior: right place, right side, right colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.fields.frame import FieldFrame
from avatar.prior import load_head_model
from avatar.prior.landmarks import IBUG68_CONTOURS, MEDIAPIPE_PUPILS
from avatar.render.cameras import make_cameras, orbit_cameras
from avatar.render.control import control_images, draw_landmark_images
from avatar.render.mesh import MeshRenderer
from avatar.render.preview import save_preview

FRAME = FieldFrame()

# RGB as the ControlNet saw them (its training tool reversed the channels of what it drew).
OVAL, LIPS = (10, 200, 10), (10, 180, 10)
LEFT_EYE, LEFT_BROW, LEFT_PUPIL = (10, 200, 180), (10, 220, 180), (10, 200, 250)
RIGHT_EYE, RIGHT_BROW, RIGHT_PUPIL = (180, 200, 10), (180, 220, 10), (250, 200, 10)


@pytest.fixture(scope="module")
def head():
    model = load_head_model("anny")
    verts = FRAME.to_field(model.template.float())
    faces = model.all_faces()
    landmarks = FRAME.to_field(model.neutral_landmarks().float())
    return model, verts, faces, landmarks


def _cams(azimuth, res=512, polar=90.0):
    n = len(azimuth)
    return make_cameras(torch.tensor(azimuth, dtype=torch.float32), torch.full((n,), polar), torch.full((n,), 1.3),
                        torch.full((n,), 40.0), res)


def _u8(images: torch.Tensor) -> np.ndarray:
    return (images.numpy() * 255 + 0.5).astype(np.uint8)


def _mask(image: np.ndarray, colour) -> np.ndarray:
    return (image == np.asarray(colour, dtype=np.uint8)).all(-1)


def test_front_view_faces_the_camera_with_the_nose_nearest(head):
    _, verts, faces, _ = head
    cams = _cams([0.0], 256)
    out = MeshRenderer().render(cams, verts, faces)
    depth = out.depth[0, ..., 0]
    covered = out.extras["mask"][0, ..., 0]
    nearest = torch.where(covered, depth, torch.full_like(depth, 1e9)).argmin()
    nose = verts[verts[:, 2].argmax()]  # the most +Z vertex is the nose tip
    px, _ = cams.project(nose[None])
    row, col = divmod(int(nearest), 256)
    assert abs(col + 0.5 - px[0, 0, 0]) < 4 and abs(row + 0.5 - px[0, 0, 1]) < 4


def test_projected_landmarks_land_on_their_rasterised_points(head):
    model, verts, faces, landmarks = head
    cams = _cams([0.0], 256)
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
            assert abs(col + 0.5 - px[0, i, 0]) <= 1.5 and abs(row + 0.5 - px[0, i, 1]) <= 1.5, (name, i)
            checked += 1
    assert checked >= 20


def test_colours_and_pupils_follow_the_training_images(head):
    """The training tool's colours after its channel reversal, 4x4 pupils at landmarks 473 / 468."""
    model, verts, faces, landmarks = head
    cams = _cams([0.0])
    image = _u8(control_images(cams, landmarks, model.landmark_contours, verts, faces, model.closed_contours))[0]
    px = cams.project(landmarks)[0][0].numpy()
    for iris, colour in (("left_iris", LEFT_PUPIL), ("right_iris", RIGHT_PUPIL)):
        x, y = np.floor(px[MEDIAPIPE_PUPILS[iris]]).astype(int)
        # exactly the 4x4 square rows y-2..y+1, cols x-2..x+1, and nothing else in that colour
        assert (image[y - 2 : y + 2, x - 2 : x + 2] == colour).all(), iris
        rows, cols = np.nonzero(_mask(image, colour))
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (y - 2, y + 1, x - 2, x + 1), iris
    # The subject's left (+X) is the image's right in a front view: pupil 473 and the teal eye.
    assert px[473, 0] > 256 > px[468, 0]
    for a, b, colour in ((386, 385, LEFT_EYE), (159, 158, RIGHT_EYE), (152, 148, OVAL), (0, 267, LIPS),
                         (334, 296, LEFT_BROW), (105, 66, RIGHT_BROW)):
        x, y = np.floor(0.5 * (px[a] + px[b])).astype(int)
        assert tuple(image[y, x]) == colour, (a, b, tuple(image[y, x]), colour)
    counts = {c: int(_mask(image, c).sum()) for c in (OVAL, LIPS, LEFT_EYE, RIGHT_EYE, LEFT_BROW, RIGHT_BROW)}
    assert min(counts.values()) > 150, counts
    # Only these eight colours and black are drawn.
    drawn = {tuple(c) for c in np.unique(image.reshape(-1, 3), axis=0)}
    assert drawn <= {(0, 0, 0), OVAL, LIPS, LEFT_EYE, LEFT_BROW, LEFT_PUPIL, RIGHT_EYE, RIGHT_BROW, RIGHT_PUPIL}


def test_lines_are_four_pixels_wide_at_512_and_scale_with_the_image():
    """A horizontal brow line: 5 rows of pixel centres within 2.4 px, as cv2's thickness-4 line covers."""
    points = np.zeros((1, 478, 2))
    line = (46, 53, 52, 65, 55)  # one of the right brow's two lines
    points[0, line, 0] = np.linspace(100.5, 300.5, len(line))
    points[0, line, 1] = 200.5
    polylines = {"right_brow": [list(line)]}
    image = draw_landmark_images(points, polylines, {}, 512, 512)[0]
    rows = np.nonzero(_mask(image, RIGHT_BROW)[:, 200])[0]
    assert rows.tolist() == [198, 199, 200, 201, 202]
    small = draw_landmark_images(points / 4, polylines, {}, 128, 128)[0]
    assert _mask(small, RIGHT_BROW)[:, 50].sum() == 1


def test_back_views_are_empty_and_profiles_show_the_near_side(head):
    model, verts, faces, landmarks = head
    cams = _cams([0.0, 90.0, -90.0, 180.0, 150.0], 256)
    assert cams.views == ["front", "side", "side", "back", "back"]
    images = _u8(control_images(cams, landmarks, model.landmark_contours, verts, faces, model.closed_contours))
    assert images.shape == (5, 256, 256, 3)
    assert images[3].sum() == 0 and images[4].sum() == 0  # back views: no landmarks
    assert images[0].sum() > 0
    # Camera on +X (the subject's left): the left eye and pupil show, not the right ones; -X the reverse.
    assert _mask(images[1], LEFT_EYE).sum() > 5 and _mask(images[1], RIGHT_EYE).sum() == 0
    assert _mask(images[2], RIGHT_EYE).sum() > 5 and _mask(images[2], LEFT_EYE).sum() == 0
    assert _mask(images[1], RIGHT_PUPIL).sum() == 0 and _mask(images[2], LEFT_PUPIL).sum() == 0
    # Eyes above the mouth.
    rows_eye = np.nonzero(_mask(images[0], LEFT_EYE))[0]
    rows_mouth = np.nonzero(_mask(images[0], LIPS))[0]
    assert rows_mouth.mean() > rows_eye.mean() + 20


def test_three_quarter_views_draw_hidden_points(head):
    """As the training images do: at 40 degrees the far brow's tail is hidden behind the brow ridge
    and the far inner lip behind the near lip, and both are drawn anyway."""
    model, verts, faces, landmarks = head
    cams = _cams([40.0])
    out = MeshRenderer().render(cams, verts, faces, antialiased=False)
    px, depth = cams.project(landmarks)
    image = _u8(control_images(cams, landmarks, model.landmark_contours, verts, faces, model.closed_contours))[0]
    for index, colour in ((70, RIGHT_BROW), (78, LIPS)):  # the right side is the far side from +X
        col, row = (int(v) for v in px[0, index])
        assert out.extras["mask"][0, row, col, 0]
        assert depth[0, index] > out.depth[0, row, col, 0] + 0.01, index  # occluded
        assert _mask(image[row - 2 : row + 3, col - 2 : col + 3], colour).any(), index


def test_flame_style_contours_draw_as_lines_with_the_same_colours():
    """A model with iBUG-68 contours (FLAME without the MediaPipe embedding) draws each contour as one line."""
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    points = np.stack([256 + 150 * np.cos(t), 256 + 180 * np.sin(t)], axis=1)[None]
    contours = dict(IBUG68_CONTOURS)
    from avatar.prior.landmarks import control_polylines, pupil_landmarks

    polylines = control_polylines(contours, 68, frozenset({"left_eye", "right_eye", "lips_outer", "lips_inner"}))
    assert polylines["left_brow"] == [list(range(22, 27))]
    assert polylines["left_eye"] == [list(range(42, 48)) + [42]]
    image = draw_landmark_images(points, polylines, pupil_landmarks(contours, 68), 512, 512)[0]
    for colour in (OVAL, LIPS, LEFT_EYE, RIGHT_EYE, LEFT_BROW, RIGHT_BROW):
        assert _mask(image, colour).sum() > 20, colour


def test_preview_of_the_prior_with_landmarks(head, tmp_path: Path):
    model, verts, faces, landmarks = head
    cams = orbit_cameras(4, elevation=0.0, radius=1.3, fov_y=40.0, resolution=192)
    out = MeshRenderer().render(cams, verts, faces, shading="normal")
    control = control_images(cams, landmarks, model.landmark_contours, verts, faces, model.closed_contours)
    overlay = torch.where(control.sum(-1, keepdim=True) > 0, control, out.rgb)
    path = save_preview(tmp_path / "prior.png", {"normal": out.rgb, "control": control, "overlay": overlay},
                        prompt="anny prior", step=0)
    assert path.stat().st_size > 10_000
