"""`avatar prior show`: the neutral mesh, a landmark picture and a summary."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import trimesh

from avatar.prior import load_head_model, show_prior
from avatar.prior.show import CONTOUR_COLOURS


def _pixels_of(image: np.ndarray, colour) -> np.ndarray:
    """(n, 2) (row, col) of pixels drawn in exactly this colour."""
    return np.argwhere((image == np.asarray(colour, dtype=np.uint8)).all(axis=-1))


def test_show_writes_mesh_picture_and_summary(tmp_path):
    size = 256
    summary = show_prior("anny", tmp_path / "out", size=size)
    files = summary["files"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "landmarks.png", "prior.json", "prior.obj",
    ]  # fmt: skip

    model = load_head_model("anny")
    mesh = trimesh.load(files["mesh"], process=False)
    assert len(mesh.vertices) == model.num_vertices and mesh.is_watertight

    written = json.loads((tmp_path / "out" / "prior.json").read_text())
    assert written["model"] == "anny" and written["vertex_count"] == model.num_vertices
    assert 0.20 <= written["size_m"][1] <= 0.32
    assert written["expression_names"] == model.expression_names and "jawOpen" in written["expression_names"]
    assert written["joint_names"] == ["neck", "head", "left_eye", "right_eye"]
    assert written["bounds_m"]["max"][1] > 0 > written["bounds_m"]["min"][1]

    image = iio.imread(files["landmarks_png"])
    assert image.shape == (size, 3 * size, 3)
    front, side, back = image[:, :size], image[:, size : 2 * size], image[:, 2 * size :]
    # Front: the subject's left eye (green) is on the image's right, above the lips (pink).
    left_eye = _pixels_of(front, CONTOUR_COLOURS["left_eye"])
    right_eye = _pixels_of(front, CONTOUR_COLOURS["right_eye"])
    lips = _pixels_of(front, CONTOUR_COLOURS["lips_outer"])
    assert len(left_eye) > 10 and len(right_eye) > 10 and len(lips) > 10
    assert left_eye[:, 1].mean() > size / 2 > right_eye[:, 1].mean()
    assert left_eye[:, 0].mean() < lips[:, 0].mean()
    # Side (camera on +X): only the left half of the face is seen, facing image-left.
    assert len(_pixels_of(side, CONTOUR_COLOURS["right_eye"])) == 0
    side_lips = _pixels_of(side, CONTOUR_COLOURS["lips_outer"])
    assert len(side_lips) > 0 and side_lips[:, 1].mean() < size / 2
    # Back: the face is hidden, only the silhouette is drawn.
    colours = {tuple(c) for c in CONTOUR_COLOURS.values()}
    back_colours = {tuple(p) for p in back.reshape(-1, 3)}
    assert not colours & back_colours
    assert (back.reshape(-1, 3).max(axis=1) > 0).mean() > 0.2  # the silhouette is there


def test_show_control_writes_renders_control_images_and_cameras(tmp_path):
    """``avatar prior show --control``: shaded render and control image per camera and expression,
    side by side and separately, with a JSON listing the cameras."""
    from avatar.prior.show import CONTROL_CAMERAS, write_control_views

    model = load_head_model("anny")
    size = 128
    doc = write_control_views(model, tmp_path, size=size, cameras=["front", "yaw+40", "back"],
                              expressions={"neutral": {}, "jaw_open": {"jawOpen": 0.4}})
    folder = tmp_path / "control"
    assert json.loads((folder / "control.json").read_text()) == doc
    cams = {c["name"]: c for c in doc["cameras"]}
    assert list(cams) == ["front", "yaw+40", "back"]
    table = {name: (az, polar) for name, az, polar in CONTROL_CAMERAS}
    for name, cam in cams.items():
        assert (cam["azimuth_deg"], cam["polar_deg"]) == table[name]
        assert cam["width"] == cam["height"] == size and len(cam["c2w"]) == 4
    assert [cams[n]["view"] for n in cams] == ["front", "side", "back"]
    assert doc["expressions"] == {"neutral": {}, "jaw_open": {"jawOpen": 0.4}}
    assert len(doc["views"]) == 6

    images = {}
    for view in doc["views"]:
        files = {k: iio.imread(folder / v) for k, v in view["files"].items()}
        assert files["render"].shape == files["control"].shape == (size, size, 3)
        np.testing.assert_array_equal(files["pair"], np.concatenate([files["render"], files["control"]], axis=1))
        images[view["expression"], view["camera"]] = files
    for expr in ("neutral", "jaw_open"):
        assert images[expr, "back"]["control"].max() == 0  # no landmarks on the back of the head
        assert (images[expr, "back"]["render"].max(-1) > 0).mean() > 0.2  # but the head is rendered
        front = images[expr, "front"]["control"]
        for colour in ((10, 200, 10), (10, 180, 10), (10, 200, 180), (180, 200, 10)):
            assert len(_pixels_of(front, colour)) > 5, (expr, colour)
    # Opening the jaw moves the lips down in the control image.
    lips = [_pixels_of(images[e, "front"]["control"], (10, 180, 10))[:, 0].max() for e in ("neutral", "jaw_open")]
    assert lips[1] > lips[0] + 2
