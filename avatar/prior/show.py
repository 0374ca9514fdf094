"""``avatar prior show``: let artists and developers look at a head prior.

Writes the neutral mesh (OBJ), a front / side / back picture of the landmark
contours drawn over the shaded silhouette (PNG) and a JSON summary. The
pictures come from a small orthographic z-buffer rasteriser written here in
numpy: it only has to be good enough to check that contours sit in the right
places (the real rasteriser lives in ``avatar.render``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# name -> (forward direction the camera looks along, label); up is always +Y.
VIEWS: dict[str, tuple[tuple[float, float, float], str]] = {
    "front": ((0.0, 0.0, -1.0), "front (camera on +Z)"),
    "side": ((-1.0, 0.0, 0.0), "left side (camera on +X)"),
    "back": ((0.0, 0.0, 1.0), "back (camera on -Z)"),
}

# RGB per contour, in the spirit of MediaPipe's face-mesh drawing styles.
CONTOUR_COLOURS: dict[str, tuple[int, int, int]] = {
    "face_oval": (224, 224, 224),
    "left_eye": (48, 255, 48),
    "right_eye": (255, 48, 48),
    "left_brow": (48, 255, 48),
    "right_brow": (255, 48, 48),
    "lips_outer": (255, 96, 200),
    "lips_inner": (255, 160, 230),
    "left_iris": (48, 255, 255),
    "right_iris": (255, 255, 48),
    "nose": (80, 160, 255),
}


def _view_axes(forward: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fwd = np.asarray(forward, dtype=np.float64)
    up = np.array([0.0, 1.0, 0.0])
    right = np.cross(fwd, up)
    return right, up, fwd


def rasterize_depth(
    vertices: np.ndarray,
    faces: np.ndarray,
    forward: tuple[float, float, float],
    size: int,
    extent: float,
    centre: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthographic z-buffer of a triangle mesh.

    Args:
        vertices: (V, 3) project-frame points; faces: (F, 3).
        forward: direction the camera looks along (unit, horizontal).
        size: image side in pixels; extent: metres covered by the image side.
        centre: (3,) point at the image centre.

    Returns:
        depth: (size, size) height of the nearest surface towards the camera,
            -inf where empty; shade: (size, size) Lambert shading in [0, 1];
        face_index: (size, size) int64 visible face, -1 where empty.
    """
    right, up, fwd = _view_axes(forward)
    rel = vertices - centre
    scale = size / extent
    px = (rel @ right) * scale + size / 2.0
    py = size / 2.0 - (rel @ up) * scale
    pz = -(rel @ fwd)  # larger is closer to the camera
    depth = np.full((size, size), -np.inf)
    shade = np.zeros((size, size))
    face_index = np.full((size, size), -1, dtype=np.int64)
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-20
    light = -fwd + np.array([0.0, 0.6, 0.0])
    light /= np.linalg.norm(light)
    lambert = np.clip(np.abs(normals @ light), 0.0, 1.0)

    # Every (triangle, pixel of its bounding box) pair at once, then keep the
    # nearest covering triangle per pixel.
    tx, ty, tz = px[faces], py[faces], pz[faces]  # (F, 3)
    x0 = np.clip(np.ceil(tx.min(1) - 0.5), 0, size).astype(np.int64)
    x1 = np.clip(np.floor(tx.max(1) - 0.5), -1, size - 1).astype(np.int64)
    y0 = np.clip(np.ceil(ty.min(1) - 0.5), 0, size).astype(np.int64)
    y1 = np.clip(np.floor(ty.max(1) - 0.5), -1, size - 1).astype(np.int64)
    nx, ny = np.maximum(x1 - x0 + 1, 0), np.maximum(y1 - y0 + 1, 0)
    count = nx * ny
    tri_id = np.repeat(np.arange(len(faces)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    gx = x0[tri_id] + local % np.maximum(nx[tri_id], 1)
    gy = y0[tri_id] + local // np.maximum(nx[tri_id], 1)
    cx, cy = gx + 0.5, gy + 0.5
    ax, bx, cxv = tx[tri_id, 0], tx[tri_id, 1], tx[tri_id, 2]
    ay, by, cyv = ty[tri_id, 0], ty[tri_id, 1], ty[tri_id, 2]
    det = (by - cyv) * (ax - cxv) + (cxv - bx) * (ay - cyv)
    with np.errstate(divide="ignore", invalid="ignore"):
        l0 = ((by - cyv) * (cx - cxv) + (cxv - bx) * (cy - cyv)) / det
        l1 = ((cyv - ay) * (cx - cxv) + (ax - cxv) * (cy - cyv)) / det
    l2 = 1.0 - l0 - l1
    hit = (np.abs(det) > 1e-12) & (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
    z = l0 * tz[tri_id, 0] + l1 * tz[tri_id, 1] + l2 * tz[tri_id, 2]
    pix, z, tri_id = (gy * size + gx)[hit], z[hit], tri_id[hit]
    order = np.lexsort((-z, pix))
    first = order[np.unique(pix[order], return_index=True)[1]]
    flat_depth, flat_shade, flat_face = depth.reshape(-1), shade.reshape(-1), face_index.reshape(-1)
    flat_depth[pix[first]] = z[first]
    flat_shade[pix[first]] = lambert[tri_id[first]]
    flat_face[pix[first]] = tri_id[first]
    return depth, shade, face_index


def render_contours(
    vertices: np.ndarray,
    faces: np.ndarray,
    landmarks: np.ndarray,
    contours: dict[str, list[int]],
    closed: frozenset[str] | set[str],
    view: str,
    size: int = 512,
    extent: float | None = None,
    centre: np.ndarray | None = None,
) -> np.ndarray:
    """One view: shaded silhouette with the visible landmark contours on top.

    Returns:
        (size, size, 3) uint8 RGB image.
    """
    from PIL import Image, ImageDraw

    forward = VIEWS[view][0]
    if centre is None:
        centre = 0.5 * (vertices.min(axis=0) + vertices.max(axis=0))
    if extent is None:
        extent = float((vertices.max(axis=0) - vertices.min(axis=0)).max()) * 1.15
    depth, shade, _ = rasterize_depth(vertices, faces, forward, size, extent, centre)
    grey = np.where(np.isfinite(depth), 40.0 + 110.0 * shade, 0.0)
    image = Image.fromarray(np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    right, up, fwd = _view_axes(forward)
    rel = landmarks - centre
    scale = size / extent
    lx = (rel @ right) * scale + size / 2.0
    ly = size / 2.0 - (rel @ up) * scale
    lz = -(rel @ fwd)
    # A landmark is visible when it is not more than 4 mm behind the nearest surface.
    ix = np.clip(lx.astype(int), 0, size - 1)
    iy = np.clip(ly.astype(int), 0, size - 1)
    window = np.stack([depth[np.clip(iy + dy, 0, size - 1), np.clip(ix + dx, 0, size - 1)]
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)]).max(axis=0)  # fmt: skip
    visible = lz >= window - 0.004 * 1.0
    width = max(1, size // 256)
    for name, idx in contours.items():
        if not idx:
            continue
        colour = CONTOUR_COLOURS.get(name, (255, 255, 255))
        pairs = list(zip(idx[:-1], idx[1:]))
        if name in closed and len(idx) > 2:
            pairs.append((idx[-1], idx[0]))
        for a, b in pairs:
            if visible[a] and visible[b]:
                draw.line([(lx[a], ly[a]), (lx[b], ly[b])], fill=colour, width=width)
    return np.asarray(image)


def render_views(model, size: int = 512) -> dict[str, np.ndarray]:
    """Front, side and back contour pictures of a head model's neutral mesh."""
    vertices = model.template.detach().cpu().double().numpy()
    faces = model.all_faces().cpu().numpy()
    landmarks = model.neutral_landmarks().detach().cpu().double().numpy()
    centre = 0.5 * (vertices.min(axis=0) + vertices.max(axis=0))
    extent = float((vertices.max(axis=0) - vertices.min(axis=0)).max()) * 1.15
    return {
        view: render_contours(
            vertices,
            faces,
            landmarks,
            model.landmark_contours,
            model.closed_contours,
            view,
            size=size,
            extent=extent,
            centre=centre,
        )  # fmt: skip
        for view in VIEWS
    }


def show_prior(spec: str, out_dir: Path, size: int = 512) -> dict[str, Any]:
    """Write ``prior.obj`` (neutral mesh), ``landmarks.png`` and ``prior.json`` (summary).

    Args:
        spec: a head-model spec for :func:`avatar.prior.load_head_model`
            (``auto``, ``anny``, ``flame:DIR``).
        out_dir: folder to write into (created if needed).
        size: side in pixels of each of the three views.

    Returns:
        The summary written to the JSON file, plus ``files`` (name -> path).
    """
    import imageio.v3 as iio

    from avatar.prior.load import load_head_model

    model = load_head_model(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obj_path = out_dir / "prior.obj"
    png_path = out_dir / "landmarks.png"
    json_path = out_dir / "prior.json"

    model.neutral_mesh(capped=True).export(obj_path)
    views = render_views(model, size=size)
    iio.imwrite(png_path, np.concatenate([views[v] for v in VIEWS], axis=1))

    summary = model.summary()
    summary["spec"] = spec
    summary["views"] = [VIEWS[v][1] for v in VIEWS]
    summary["files"] = {"mesh": str(obj_path), "landmarks_png": str(png_path), "summary": str(json_path)}
    json_path.write_text(json.dumps(summary, indent=2))
    return summary
