"""Landmark control images for the MediaPipe-face ControlNet.

CrucibleAI/ControlNetMediaPipeFace was trained on MediaPipe Face Mesh detections
of photographs drawn by its ``tool_generate_face_poses.py`` (HeadSculpt's
``anno_utils.py`` and controlnet_aux's ``mediapipe_face_common.py`` copy its spec):
MediaPipe's connection sets for the face oval, eyes, eyebrows and lips as 4 px
lines (cv2, on images of at least 512 px), then a 4 x 4 pixel square at each iris
centre (landmarks 468 and 473), every detected point drawn, including those hidden
behind the nose in three-quarter views. The tool draws its colour tuples into an
array it treats as BGR and reverses the channels at the end, so the RGB images the
model saw have (:data:`PART_COLOURS`, :data:`PUPIL_COLOURS`): face oval (10, 200, 10),
lips (10, 180, 10), the subject's left eye (10, 200, 180), left brow (10, 220, 180),
left pupil (10, 200, 250), and the right side the reverse: eye (180, 200, 10), brow
(180, 220, 10), pupil (250, 200, 10). The subject's left is our +X, which shows on
the image's right in a front view.

We draw the head prior's landmarks projected by exactly the camera of the render
(:func:`draw_landmark_images` reproduces the tool's pixels: MediaPipe's drawing of
the same points and ours agree to 0.02 px), with MediaPipe's own connection sets when
the prior's landmarks are MediaPipe's 478 points (the anny head), else its contours
(FLAME's iBUG points), see :func:`avatar.prior.landmarks.control_polylines`. MediaPipe's
face oval follows the face's outline, so a prior may carry it per camera direction
and each camera gets it interpolated (:func:`control_landmarks`). As in the training
images, landmarks are not depth-tested against the head; while the camera sees the
face (within :data:`FULL_FACE_YAW_DEG`) all are drawn, further round only the near
half of the face (:func:`landmark_visibility`), and back views get an empty image, as
HeadSculpt does (the ControlNet is not applied there).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from avatar.prior.landmarks import (
    MEDIAPIPE_CONTOURS,
    MEDIAPIPE_OVAL_VIEW_PITCHES,
    MEDIAPIPE_OVAL_VIEW_YAWS,
    MEDIAPIPE_VIEW_LANDMARKS,
    control_polylines,
    is_mediapipe_layout,
    oval_view_rows,
    pupil_landmarks,
)
from avatar.render.cameras import Cameras

PART_COLOURS: dict[str, tuple[int, int, int]] = {
    "face_oval": (10, 200, 10),
    "left_eye": (10, 200, 180),
    "left_brow": (10, 220, 180),
    "right_eye": (180, 200, 10),
    "right_brow": (180, 220, 10),
    "lips_outer": (10, 180, 10),
    "lips_inner": (10, 180, 10),
}
"""RGB of each part as the ControlNet saw it; the training tool's drawing order (later parts on top)."""

PUPIL_COLOURS: dict[str, tuple[int, int, int]] = {"left_iris": (10, 200, 250), "right_iris": (250, 200, 10)}
"""RGB of the 4 x 4 pupil squares, drawn last."""

LINE_WIDTH_AT_512 = 4
"""cv2 line thickness of the training tool (its images were at least 512 px)."""
LINE_RADIUS_AT_512 = 2.4
"""Half-width of our capsule rasterisation that covers the pixels of a thickness-4 cv2 line
(intersection over union 0.93 on random segments, the same area)."""
PUPIL_SIZE_AT_512 = 4
CONTROL_RESOLUTION = 512
"""Stable Diffusion 1.5's image size: ControlNet conditioning is drawn at this size."""
FULL_FACE_YAW_DEG = 60.0
FULL_FACE_PITCH_DEG = 45.0
"""Within these camera angles around the head MediaPipe finds the face, and every landmark is
drawn (as in the training images, also those hidden behind the nose)."""
FACING_LIMIT_DEG = 100.0
"""Beyond them (toward a profile) a landmark is drawn while the angle between its direction from
the head's centre and its direction to the camera is below this: the near half of the face."""


def head_view_angles(cameras: Cameras, verts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) yaw and (B,) pitch in degrees of each camera seen from the head's centre.

    verts: (V, 3) the prior in its rest orientation (+X the subject's left, +Y up, the face
    towards +Z), in the cameras' frame; its bounding-box centre is the head's centre (the
    field origin of a run). Yaw turns toward +X (a camera's azimuth), pitch is the
    elevation above the horizontal plane (90 - polar).
    """
    centre = 0.5 * (verts.min(0).values + verts.max(0).values)
    d = torch.nn.functional.normalize(cameras.eye.to(verts) - centre, dim=-1)
    yaw = torch.rad2deg(torch.atan2(d[:, 0], d[:, 2]))
    pitch = torch.rad2deg(torch.asin(d[:, 1].clamp(-1.0, 1.0)))
    return yaw, pitch


def landmark_visibility(cameras: Cameras, landmarks: torch.Tensor, verts: torch.Tensor,
                        facing_limit_deg: float = FACING_LIMIT_DEG) -> torch.Tensor:
    """(B, L) bool: which landmarks a control image draws for each camera.

    landmarks: (L, 3) or (B, L, 3) (per camera) and verts: (V, 3) in the cameras' frame.
    Every landmark in front of the camera while it sees the face within
    :data:`FULL_FACE_YAW_DEG` / :data:`FULL_FACE_PITCH_DEG` (no depth test: the training
    images draw occluded points too); further round, those whose direction from the head's
    centre is within ``facing_limit_deg`` of the direction to the camera.
    """
    lmk = landmarks if landmarks.dim() == 3 else landmarks[None].expand(len(cameras), -1, -1)
    v = verts.to(lmk)
    yaw, pitch = head_view_angles(cameras, v)
    full = (yaw.abs() <= FULL_FACE_YAW_DEG) & (pitch.abs() <= FULL_FACE_PITCH_DEG)
    centre = 0.5 * (v.min(0).values + v.max(0).values)
    radial = torch.nn.functional.normalize(lmk - centre, dim=-1)
    to_camera = torch.nn.functional.normalize(cameras.eye[:, None, :].to(lmk) - lmk, dim=-1)
    facing = (radial * to_camera).sum(-1) > math.cos(math.radians(facing_limit_deg))
    _, depth = cameras.project(lmk)
    return (full[:, None] | facing) & (depth > 0)


def control_landmarks(cameras: Cameras, landmarks: torch.Tensor, contours: dict[str, list[int]],
                      verts: torch.Tensor) -> torch.Tensor:
    """(B, L, 3) the landmarks each camera's control image draws.

    The landmarks themselves, except that a model with MediaPipe's view-dependent face
    oval (:data:`avatar.prior.landmarks.MEDIAPIPE_VIEW_LANDMARKS` landmarks) gets its oval
    interpolated (bilinearly in yaw and pitch, clamped to the grid) from the grid
    directions around each camera's (:func:`head_view_angles`).
    landmarks: (L, 3) and verts: (V, 3) in the cameras' frame.
    """
    out = landmarks[None].expand(len(cameras), -1, -1).clone()
    n_lmk = landmarks.shape[0]
    if n_lmk != MEDIAPIPE_VIEW_LANDMARKS or not is_mediapipe_layout(contours, n_lmk):
        return out
    yaw, pitch = head_view_angles(cameras, verts.to(landmarks))
    rows = torch.as_tensor(oval_view_rows(), device=landmarks.device)  # (P, Y, 36)
    table = landmarks[rows]  # (P, Y, 36, 3)

    def bracket(value: torch.Tensor, grid: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.as_tensor(grid, dtype=value.dtype, device=value.device)
        v = value.clamp(g[0], g[-1])
        hi = torch.searchsorted(g, v.contiguous()).clamp(1, len(grid) - 1)
        lo = hi - 1
        return lo, hi, (v - g[lo]) / (g[hi] - g[lo])

    y0, y1, ty = bracket(yaw, MEDIAPIPE_OVAL_VIEW_YAWS)
    p0, p1, tp = bracket(pitch, MEDIAPIPE_OVAL_VIEW_PITCHES)
    ty, tp = ty[:, None, None], tp[:, None, None]
    oval = ((1 - tp) * ((1 - ty) * table[p0, y0] + ty * table[p0, y1])
            + tp * ((1 - ty) * table[p1, y0] + ty * table[p1, y1]))  # (B, 36, 3)
    out[:, MEDIAPIPE_CONTOURS["face_oval"]] = oval
    return out


def _capsule_pixels(a: np.ndarray, b: np.ndarray, radius: float, height: int, width: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels whose centres (integer coordinates, as cv2's) lie within
    ``radius`` of segments a[k] -> b[k] ((K, 2) each, x right, y down)."""
    lo = np.floor(np.minimum(a, b) - radius).astype(np.int64)
    hi = np.ceil(np.maximum(a, b) + radius).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    nx, ny = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0), np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    count = nx * ny
    seg = np.repeat(np.arange(len(a)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    x = lo[seg, 0] + local % np.maximum(nx[seg], 1)
    y = lo[seg, 1] + local // np.maximum(nx[seg], 1)
    d = b[seg] - a[seg]
    length2 = np.maximum((d**2).sum(1), 1e-12)
    t = np.clip(((x - a[seg, 0]) * d[:, 0] + (y - a[seg, 1]) * d[:, 1]) / length2, 0.0, 1.0)
    dist2 = (x - a[seg, 0] - t * d[:, 0]) ** 2 + (y - a[seg, 1] - t * d[:, 1]) ** 2
    keep = dist2 <= radius**2
    return y[keep], x[keep]


def draw_landmark_images(points: torch.Tensor | np.ndarray, polylines: dict[str, list[list[int]]],
                         pupils: dict[str, list[int]], height: int, width: int,
                         visible: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Draw projected landmarks with the training tool's spec.

    points: (B, L, 2) pixel positions (x right, y down, pixel centres at +0.5), e.g.
        :meth:`Cameras.project` or MediaPipe's ``landmark.x * width``.
    polylines: part name -> lists of landmark indices (:func:`avatar.prior.landmarks.control_polylines`).
    pupils: iris name -> landmark indices whose mean is the pupil (:func:`avatar.prior.landmarks.pupil_landmarks`).
    visible: (B, L) bool or None (all drawn); a segment needs both ends, a pupil all its points.
    Returns (B, H, W, 3) uint8 RGB on black.

    Like the training tool (MediaPipe's ``draw_landmarks`` then ``draw_pupils``), a point
    is drawn at pixel ``floor(x), floor(y)`` and only if it lies in the image; lines are
    ``4 * H / 512`` px wide and pupils ``4 * H / 512`` px squares with their centre pixel
    at offset +2 (rows y-2 .. y+1).
    """
    pts = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    b_count, n_pts = pts.shape[:2]
    vis = np.ones((b_count, n_pts), dtype=bool) if visible is None else np.asarray(
        visible.detach().cpu() if isinstance(visible, torch.Tensor) else visible, dtype=bool)
    scale = height / CONTROL_RESOLUTION
    radius = max(0.5, LINE_RADIUS_AT_512 * scale)
    half = max(1, round(PUPIL_SIZE_AT_512 * scale / 2))
    images = np.zeros((b_count, height, width, 3), dtype=np.uint8)
    for i in range(b_count):
        finite = np.isfinite(pts[i]).all(axis=1)
        px = np.floor(np.where(finite[:, None], pts[i], -1.0))
        inside = finite & (px[:, 0] >= 0) & (px[:, 0] < width) & (px[:, 1] >= 0) & (px[:, 1] < height)
        ok = inside & vis[i]
        for name, colour in PART_COLOURS.items():
            pairs = [(p, q) for line in polylines.get(name, ()) for p, q in zip(line[:-1], line[1:])
                     if ok[p] and ok[q]]
            if not pairs:
                continue
            idx = np.asarray(pairs)
            rows, cols = _capsule_pixels(px[idx[:, 0]], px[idx[:, 1]], radius, height, width)
            images[i, rows, cols] = colour
        for name, colour in PUPIL_COLOURS.items():
            idx = pupils.get(name)
            if not idx or not ok[idx].all():
                continue
            x, y = np.floor(pts[i, idx].mean(axis=0)).astype(np.int64)
            images[i, max(y - half, 0) : max(y + half, 0), max(x - half, 0) : max(x + half, 0)] = colour
    return images


def draw_control_images(cameras: Cameras, landmarks: torch.Tensor, contours: dict[str, list[int]],
                        visible: torch.Tensor | None = None, closed: set[str] | frozenset[str] | None = None
                        ) -> torch.Tensor:
    """Draw the landmarks for each camera.

    cameras: any resolution (line widths scale with it; use :data:`CONTROL_RESOLUTION`
        for Stable Diffusion 1.5).
    landmarks: (L, 3) or (B, L, 3) in the cameras' frame.
    contours: name -> ordered landmark indices (the prior's ``landmark_contours``).
    visible: (B, L) bool from :func:`landmark_visibility`, or None (all drawn).
    closed: names of contours whose last point joins the first (the prior's
        ``closed_contours``; default :data:`avatar.prior.landmarks.CLOSED_CONTOURS`).
    Returns (B, H, W, 3) float in [0, 1], black background; back views are empty.
    """
    n_lmk = landmarks.shape[-2]
    px, _ = cameras.project(landmarks)
    images = draw_landmark_images(px, control_polylines(contours, n_lmk, closed), pupil_landmarks(contours, n_lmk),
                                  cameras.height, cameras.width, visible)
    images[[i for i, view in enumerate(cameras.views) if view == "back"]] = 0
    return torch.from_numpy(images.astype(np.float32) / 255.0).to(cameras.device)


def control_images(cameras: Cameras, landmarks: torch.Tensor, contours: dict[str, list[int]],
                   verts: torch.Tensor, faces: torch.Tensor | None = None,
                   closed: set[str] | frozenset[str] | None = None, facing_limit_deg: float = FACING_LIMIT_DEG,
                   engine: str = "auto") -> torch.Tensor:
    """Landmark drawings the ControlNet gets, (B, H, W, 3) in [0, 1] (see module docstring).

    landmarks: (L, 3) and verts: (V, 3) in the cameras' frame, the prior in its rest
    orientation. The landmarks are :func:`control_landmarks` (the view-dependent face oval),
    drawn where :func:`landmark_visibility` says. ``faces`` and ``engine`` are accepted for
    callers that pass the prior's triangles and rasteriser engine (nothing is rasterised).
    """
    per_camera = control_landmarks(cameras, landmarks, contours, verts)
    visible = landmark_visibility(cameras, per_camera, verts, facing_limit_deg)
    return draw_control_images(cameras, per_camera, contours, visible, closed)


def contour_agreement(ours: np.ndarray | torch.Tensor, theirs: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How far apart two control images' drawings are, per colour, in pixels.

    ours, theirs: (H, W, 3) uint8 or float in [0, 1]. For every colour of
    :data:`PART_COLOURS` and :data:`PUPIL_COLOURS` drawn in either image: the
    symmetric mean distance from each pixel of that colour in one image to the
    nearest pixel of that colour in the other (a colour drawn in only one image counts
    as the image diagonal), and the intersection over union of all drawn pixels whose
    colours match. Returns ``{"distance_px": mean over colours, "iou": ...,
    "per_colour": {rgb: distance}}``.
    """
    from scipy.ndimage import distance_transform_edt

    def u8(img) -> np.ndarray:
        a = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img)
        return a if a.dtype == np.uint8 else (a * 255.0 + 0.5).astype(np.uint8)

    a, b = u8(ours), u8(theirs)
    diagonal = float(np.hypot(*a.shape[:2]))
    colours = sorted(set(PART_COLOURS.values()) | set(PUPIL_COLOURS.values()))
    per_colour = {}
    for colour in colours:
        ma, mb = (a == colour).all(-1), (b == colour).all(-1)
        if not ma.any() and not mb.any():
            continue
        if not ma.any() or not mb.any():
            per_colour[str(colour)] = diagonal
            continue
        da, db = distance_transform_edt(~ma), distance_transform_edt(~mb)
        per_colour[str(colour)] = 0.5 * (float(db[ma].mean()) + float(da[mb].mean()))
    drawn_a, drawn_b = a.any(-1), b.any(-1)
    same = drawn_a & drawn_b & (a == b).all(-1)
    union = (drawn_a | drawn_b).sum()
    return {
        "distance_px": float(np.mean(list(per_colour.values()))) if per_colour else 0.0,
        "iou": float(same.sum() / union) if union else 1.0,
        "per_colour": per_colour,
    }
