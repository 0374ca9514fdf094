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
