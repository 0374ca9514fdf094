"""Landmark contour names and conventions shared by all head models.

The contours are those the MediaPipe-face ControlNet was trained to read (face
oval, eyes, brows, outer and inner lips, irises) plus the nose line. Each is an
ordered list of indices into ``HeadState.landmarks``; closed contours join their
last point to their first. "Left" is the subject's left, which is +X in the
project frame (the face looks down +Z, +Y is up).

A head model whose landmarks are the 478 points of MediaPipe Face Mesh (with iris
refinement), in MediaPipe's order, as the anny head's are, has
:data:`MEDIAPIPE_CONTOURS` as its contours; control images for it are drawn with
MediaPipe's own connection sets (:data:`MEDIAPIPE_POLYLINES`), as the ControlNet's
training tool drew them. The index lists below are those of MediaPipe's
``face_mesh_connections.py`` (Apache-2.0, Copyright The MediaPipe Authors), written
as ordered polylines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CONTOUR_NAMES: tuple[str, ...] = (
    "face_oval",
    "left_eye",
    "right_eye",
    "left_brow",
    "right_brow",
    "lips_outer",
    "lips_inner",
    "left_iris",
    "right_iris",
    "nose",
)

CLOSED_CONTOURS: frozenset[str] = frozenset(
    {"face_oval", "left_eye", "right_eye", "lips_outer", "lips_inner", "left_iris", "right_iris"}
)

# ----------------------------------------------------------------------------
# MediaPipe Face Mesh (468 points + 10 iris points with ``refine_landmarks``)
# ----------------------------------------------------------------------------
MEDIAPIPE_NUM_LANDMARKS = 478

MEDIAPIPE_PUPILS: dict[str, int] = {"left_iris": 473, "right_iris": 468}
"""Iris centres: the ControlNet's training tool draws a 4x4 square at each."""

# FACEMESH_FACE_OVAL, _LIPS, _LEFT_EYE, _RIGHT_EYE, _LEFT_EYEBROW, _RIGHT_EYEBROW,
# _LEFT_IRIS, _RIGHT_IRIS as polylines (a closed one repeats its first point).
# MediaPipe's "left" is the subject's left, as ours.
MEDIAPIPE_POLYLINES: dict[str, tuple[tuple[int, ...], ...]] = {
    "face_oval": ((10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
                   152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109, 10),),
    "left_eye": ((362, 398, 384, 385, 386, 387, 388, 466, 263), (263, 249, 390, 373, 374, 380, 381, 382, 362)),
    "right_eye": ((133, 173, 157, 158, 159, 160, 161, 246, 33), (33, 7, 163, 144, 145, 153, 154, 155, 133)),
    "left_brow": ((276, 283, 282, 295, 285), (300, 293, 334, 296, 336)),
    "right_brow": ((46, 53, 52, 65, 55), (70, 63, 105, 66, 107)),
    "lips_outer": ((61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291),
                   (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)),
    "lips_inner": ((78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308),
                   (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)),
    "left_iris": ((474, 475, 476, 477, 474),),
    "right_iris": ((469, 470, 471, 472, 469),),
}  # fmt: skip

MEDIAPIPE_CONTOURS: dict[str, list[int]] = {
    "face_oval": list(MEDIAPIPE_POLYLINES["face_oval"][0][:-1]),
    # eyes from the inner corner along the upper lid; lips from the left corner, upper lip first
    "left_eye": [362, 398, 384, 385, 386, 387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382],
    "right_eye": [133, 173, 157, 158, 159, 160, 161, 246, 33, 7, 163, 144, 145, 153, 154, 155],
    # brows: both of MediaPipe's lines, one after the other (an open contour)
    "left_brow": [285, 295, 282, 283, 276, 300, 293, 334, 296, 336],
    "right_brow": [55, 65, 52, 53, 46, 70, 63, 105, 66, 107],
    "lips_outer": [291, 409, 270, 269, 267, 0, 37, 39, 40, 185, 61, 146, 91, 181, 84, 17, 314, 405, 321, 375],
    "lips_inner": [308, 415, 310, 311, 312, 13, 82, 81, 80, 191, 78, 95, 88, 178, 87, 14, 317, 402, 318, 324],
    "left_iris": [474, 475, 476, 477],
    "right_iris": [469, 470, 471, 472],
    # nasion down the bridge to the tip, then the base of the nose from the right wing to the left
    "nose": [168, 6, 197, 195, 5, 4, 64, 98, 97, 2, 326, 327, 294],
}  # fmt: skip
"""The :data:`CONTOUR_NAMES` contours over MediaPipe's 478 points."""


# MediaPipe's face oval follows the face's visible outline, so it is not fixed to the surface:
# seen from a side, its points sit further round the face than seen from the front. A head
# model may therefore carry, after its 478 points, the oval's 36 points (in
# MEDIAPIPE_CONTOURS["face_oval"] order) as MediaPipe finds them from each camera direction of
# a grid; control images interpolate them for the actual camera.
MEDIAPIPE_OVAL_VIEW_YAWS: tuple[float, ...] = (-40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0)
"""Camera yaw in degrees around the head, toward the subject's left (+X) (the camera azimuth)."""
MEDIAPIPE_OVAL_VIEW_PITCHES: tuple[float, ...] = (-15.0, 0.0, 15.0)
"""Camera elevation in degrees above the head's horizontal plane (90 - the camera polar angle)."""
MEDIAPIPE_VIEW_LANDMARKS = MEDIAPIPE_NUM_LANDMARKS + 36 * len(MEDIAPIPE_OVAL_VIEW_YAWS) * len(
    MEDIAPIPE_OVAL_VIEW_PITCHES)
"""Landmark count of a model with the view-dependent oval (478 + 36 per grid direction)."""


def oval_view_rows() -> list[list[list[int]]]:
    """[pitch][yaw] -> the 36 landmark rows of the face oval seen from that direction."""
    n_oval, n_yaw = len(MEDIAPIPE_CONTOURS["face_oval"]), len(MEDIAPIPE_OVAL_VIEW_YAWS)
    return [[[MEDIAPIPE_NUM_LANDMARKS + (p * n_yaw + y) * n_oval + k for k in range(n_oval)]
             for y in range(n_yaw)] for p in range(len(MEDIAPIPE_OVAL_VIEW_PITCHES))]


def is_mediapipe_layout(contours: Mapping[str, Sequence[int]], num_landmarks: int) -> bool:
    """Whether the first 478 landmarks are MediaPipe's points in MediaPipe's order (judged by the
    contours), possibly followed by the view-dependent oval (:data:`MEDIAPIPE_VIEW_LANDMARKS`)."""
    return num_landmarks in (MEDIAPIPE_NUM_LANDMARKS, MEDIAPIPE_VIEW_LANDMARKS) and all(
        list(contours.get(name, ())) == ids for name, ids in MEDIAPIPE_CONTOURS.items()
    )


def control_polylines(contours: Mapping[str, Sequence[int]], num_landmarks: int,
                      closed: frozenset[str] | set[str] | None = None) -> dict[str, list[list[int]]]:
    """The lines a control image draws: part name -> polylines of landmark indices.

    MediaPipe's connection sets for MediaPipe-layout landmarks (the brows are two
    lines each); otherwise each contour is one polyline, closed (its first point
    repeated at the end) when it is in ``closed`` (default :data:`CLOSED_CONTOURS`).
    Irises and the nose are not drawn as lines (see :func:`pupil_landmarks`).
    """
    parts = ("face_oval", "left_eye", "right_eye", "left_brow", "right_brow", "lips_outer", "lips_inner")
    if is_mediapipe_layout(contours, num_landmarks):
        return {name: [list(line) for line in MEDIAPIPE_POLYLINES[name]] for name in parts}
    closed = CLOSED_CONTOURS if closed is None else closed
    out: dict[str, list[list[int]]] = {}
    for name in parts:
        idx = [int(i) for i in contours.get(name, ())]
        if len(idx) >= 2:
            out[name] = [idx + [idx[0]] if name in closed and len(idx) > 2 else idx]
    return out


def pupil_landmarks(contours: Mapping[str, Sequence[int]], num_landmarks: int) -> dict[str, list[int]]:
    """Iris name -> landmark indices whose mean is the pupil (MediaPipe's iris centre, else the
    iris contour's points); absent for a model without irises."""
    if is_mediapipe_layout(contours, num_landmarks):
        return {name: [idx] for name, idx in MEDIAPIPE_PUPILS.items()}
    return {name: [int(i) for i in contours[name]] for name in ("left_iris", "right_iris") if contours.get(name)}


# The 68-point iBUG/300-W layout that FLAME's landmark embeddings follow
# (0-based). FLAME's static embedding holds points 17..67; the dynamic one holds
# the 17 jaw-line points 0..16.
IBUG68_CONTOURS: dict[str, list[int]] = {
    "face_oval": list(range(0, 17)),
    "right_brow": list(range(17, 22)),
    "left_brow": list(range(22, 27)),
    "nose": list(range(27, 31)) + list(range(31, 36)),
    "right_eye": list(range(36, 42)),
    "left_eye": list(range(42, 48)),
    "lips_outer": list(range(48, 60)),
    "lips_inner": list(range(60, 68)),
}

# Apple ARKit's 52 blendshape locations (ARFaceAnchor.BlendShapeLocation).
ARKIT_BLENDSHAPE_NAMES: tuple[str, ...] = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft",
    "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight",
    "eyeSquintRight", "eyeWideRight",
    "jawForward", "jawLeft", "jawRight", "jawOpen",
    "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight",
    "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthUpperUpLeft", "mouthUpperUpRight",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "noseSneerLeft", "noseSneerRight",
    "tongueOut",
)  # fmt: skip
