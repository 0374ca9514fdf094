"""Landmark control images for the MediaPipe-face ControlNet.

The ControlNet (CrucibleAI/ControlNetMediaPipeFace) was trained on MediaPipe
face-mesh contours drawn on black with one colour per part (its
``laion_face_common`` drawing spec, RGB): face oval (10, 200, 10), left eye
(180, 200, 10), left brow (180, 220, 10), right eye (10, 200, 180), right brow
(10, 220, 180), lips (10, 180, 10), lines 2 px wide at 512 px, and pupils as
small filled circles, left (250, 200, 10) and right (10, 200, 250). "Left" is
the subject's left (our +X), which shows on the image's right in a front view.

We draw the head prior's ``landmark_contours`` projected by exactly the camera
used for the render. A contour segment is hidden where either end point is
occluded by the head itself (a depth test against the prior mesh rasterised
from the same camera), and back views get an empty image, as HeadSculpt does
(the ControlNet is not applied there).
"""

from __future__ import annotations

import numpy as np
import torch

from avatar.render.cameras import Cameras

CONTOUR_STYLE: dict[str, tuple[tuple[int, int, int], bool]] = {
    "face_oval": ((10, 200, 10), True),
    "left_eye": ((180, 200, 10), True),
    "right_eye": ((10, 200, 180), True),
    "left_brow": ((180, 220, 10), False),
    "right_brow": ((10, 220, 180), False),
    "lips_outer": ((10, 180, 10), True),
    "lips_inner": ((10, 180, 10), True),
}
"""Contour name -> (RGB colour, closed loop)."""

IRIS_STYLE = {"left_iris": (250, 200, 10), "right_iris": (10, 200, 250)}
LINE_WIDTH_AT_512 = 2
CONTROL_RESOLUTION = 512
"""Stable Diffusion 1.5's image size: ControlNet conditioning is drawn at this size."""


def landmark_visibility(cameras: Cameras, landmarks: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor,
                        tolerance: float = 0.01, engine: str = "auto") -> torch.Tensor:
    """(B, L) bool: landmark in the image and not hidden by the head.

    landmarks: (L, 3) or (B, L, 3) and verts: (V, 3) or (B, V, 3) in the cameras'
    frame; faces: (F, 3). A landmark is visible if its camera depth is within
    ``tolerance`` (same units) of the rasterised depth at its pixel.
    """
    from avatar.render.mesh import MeshRenderer

    out = MeshRenderer(engine=engine).render(cameras, verts, faces, antialiased=False)
    px, depth = cameras.project(landmarks)
    h, w = cameras.height, cameras.width
    col = px[..., 0].floor().long()
    row = px[..., 1].floor().long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h) & (depth > 0)
    b_idx = torch.arange(len(cameras), device=px.device)[:, None].expand_as(col)
    surface = out.depth[b_idx, row.clamp(0, h - 1), col.clamp(0, w - 1), 0]
    covered = out.extras["mask"][b_idx, row.clamp(0, h - 1), col.clamp(0, w - 1), 0]
    return inside & (~covered | (depth <= surface + tolerance))


def draw_control_images(cameras: Cameras, landmarks: torch.Tensor, contours: dict[str, list[int]],
                        visible: torch.Tensor | None = None, closed: set[str] | frozenset[str] | None = None
                        ) -> torch.Tensor:
    """Draw the contours for each camera.

    cameras: any resolution (the drawing scales line widths with it; use
        :data:`CONTROL_RESOLUTION` for Stable Diffusion 1.5).
    landmarks: (L, 3) or (B, L, 3) in the cameras' frame.
    contours: name -> ordered landmark indices (see :data:`CONTOUR_STYLE`, :data:`IRIS_STYLE`).
    visible: (B, L) bool from :func:`landmark_visibility`, or None (all visible).
    closed: names of contours whose last point joins the first (the prior's
        ``closed_contours``); default: the closed flags of :data:`CONTOUR_STYLE`.
    Returns (B, H, W, 3) float in [0, 1], black background; back views are empty.
    """
    from PIL import Image, ImageDraw

    h, w = cameras.height, cameras.width
    px, _ = cameras.project(landmarks)
    px = px.detach().cpu().numpy()
    vis = np.ones(px.shape[:2], dtype=bool) if visible is None else visible.detach().cpu().numpy()
    width = max(1, round(LINE_WIDTH_AT_512 * h / CONTROL_RESOLUTION))
    images = []
    for i in range(len(cameras)):
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        if cameras.views[i] != "back":
            draw = ImageDraw.Draw(canvas)
            for name, (colour, closed_by_default) in CONTOUR_STYLE.items():
                idx = contours.get(name)
                if not idx:
                    continue
                is_closed = closed_by_default if closed is None else name in closed
                ring = list(idx) + ([idx[0]] if is_closed else [])
                for a, b in zip(ring[:-1], ring[1:]):
                    if vis[i, a] and vis[i, b]:
                        draw.line([tuple(px[i, a]), tuple(px[i, b])], fill=colour, width=width)
            for name, colour in IRIS_STYLE.items():
                idx = contours.get(name)
                if not idx or vis[i, idx].mean() < 0.5:  # mostly hidden behind the lids or the nose
                    continue
                pts = px[i, idx]
                centre = pts.mean(0)
                radius = max(float(width), 0.5 * float(np.linalg.norm(pts - centre, axis=1).mean()))
                draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius],
                             fill=colour)
        images.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0))
    return torch.stack(images).to(cameras.device)


def control_images(cameras: Cameras, landmarks: torch.Tensor, contours: dict[str, list[int]],
                   verts: torch.Tensor, faces: torch.Tensor, closed: set[str] | frozenset[str] | None = None,
                   tolerance: float = 0.01, engine: str = "auto") -> torch.Tensor:
    """Depth-tested landmark drawings, (B, H, W, 3) in [0, 1] (see module docstring)."""
    visible = landmark_visibility(cameras, landmarks, verts, faces, tolerance, engine)
    return draw_control_images(cameras, landmarks, contours, visible, closed)
