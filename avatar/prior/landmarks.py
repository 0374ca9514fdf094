"""Landmark contour names and conventions shared by all head models.

The contours are those the MediaPipe-face ControlNet was trained to read (face
oval, eyes, brows, outer and inner lips, irises) plus the nose line. Each is an
ordered list of indices into ``HeadState.landmarks``; closed contours join their
last point to their first. "Left" is the subject's left, which is +X in the
project frame (the face looks down +Z, +Y is up).
"""

from __future__ import annotations

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
