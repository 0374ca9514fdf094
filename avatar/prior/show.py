"""``avatar prior show``: let artists and developers look at a head prior.

Writes the neutral mesh (OBJ), a front / side / back picture of the landmark
contours drawn over the shaded silhouette (PNG) and a JSON summary. The
pictures come from a small orthographic z-buffer rasteriser written here in
numpy: it only has to be good enough to check that contours sit in the right
places (the real rasteriser lives in ``avatar.render``).

With ``control=True`` it also writes, for :data:`CONTROL_CAMERAS` and
:data:`CONTROL_EXPRESSIONS`, a shaded render of the prior through the real
renderer and the landmark control image the ControlNet gets from the same camera
(:func:`avatar.render.control.control_images`), side by side and as separate PNGs,
with ``control.json`` listing the cameras. ``tools/mediapipe/measure.sh`` runs
MediaPipe Face Mesh on exactly these renders.
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
    from avatar.prior.landmarks import control_polylines

    # The control images' lines (MediaPipe's connection sets for MediaPipe landmarks: two lines
    # per brow), then the irises and the nose from the contours.
    lines = control_polylines(contours, len(landmarks), closed)
    for name in ("left_iris", "right_iris", "nose"):
        idx = list(contours.get(name, ()))
        if idx:
            lines[name] = [idx + [idx[0]] if name in closed and len(idx) > 2 else idx]
    for name, polylines in lines.items():
        colour = CONTOUR_COLOURS.get(name, (255, 255, 255))
        pairs = [pair for line in polylines for pair in zip(line[:-1], line[1:])]
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


def show_prior(spec: str, out_dir: Path, size: int = 512, control: bool = False) -> dict[str, Any]:
    """Write ``prior.obj`` (neutral mesh), ``landmarks.png`` and ``prior.json`` (summary).

    Args:
        spec: a head-model spec for :func:`avatar.prior.load_head_model`
            (``auto``, ``anny``, ``flame:DIR``).
        out_dir: folder to write into (created if needed).
        size: side in pixels of each of the three views.
        control: also write shaded renders and control images (:func:`write_control_views`)
            into ``out_dir/control/``.

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
    if control:
        write_control_views(model, out_dir, size=size)
        summary["files"]["control"] = str(out_dir / "control" / "control.json")
    json_path.write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------
# Control images next to shaded renders (``avatar prior show --control``)
# ----------------------------------------------------------------------------
CONTROL_CAMERAS: tuple[tuple[str, float, float], ...] = (
    ("front", 0.0, 90.0),
    ("yaw+20", 20.0, 90.0),
    ("yaw-20", -20.0, 90.0),
    ("yaw+35", 35.0, 90.0),
    ("yaw-35", -35.0, 90.0),
    ("yaw+40", 40.0, 90.0),
    ("yaw-40", -40.0, 90.0),
    ("pitch+15", 0.0, 75.0),
    ("pitch-15", 0.0, 105.0),
    ("yaw+20-pitch+15", 20.0, 75.0),
    ("back", 180.0, 90.0),
)
"""(name, azimuth, polar) in degrees (:mod:`avatar.render.cameras` conventions): ``yaw+20``
has the camera 20 degrees toward the subject's left (+X); ``pitch+15`` looks from 15
degrees above the face."""
CONTROL_RADIUS = 1.3
"""Camera distance in field units (the middle of the training cameras' range)."""
CONTROL_FOV = 40.0
"""Vertical field of view in degrees (the middle of the training cameras' range)."""
CONTROL_EXPRESSIONS: dict[str, dict[str, float]] = {
    "neutral": {},
    "jaw_open": {"jawOpen": 0.4},
    "blink": {"eyeBlinkLeft": 1.0, "eyeBlinkRight": 1.0},
    "smile": {"mouthSmileLeft": 0.8, "mouthSmileRight": 0.8},
}
"""Expressions shown (those the model does not have are skipped: FLAME gets ``neutral``)."""

def hidden_pupils(expression: dict[str, float]) -> list[int]:
    """MediaPipe's iris centres (473 left, 468 right) of the eyes an expression closes (eyeBlink >= 0.9):
    MediaPipe still reports them, where it guesses, so measurements leave them out."""
    return [idx for side, idx in (("Left", 473), ("Right", 468)) if expression.get(f"eyeBlink{side}", 0.0) >= 0.9]


SKIN_RGB = (0.80, 0.63, 0.53)
SCLERA_RGB = (0.92, 0.90, 0.87)
IRIS_RGB = (0.30, 0.18, 0.10)
PUPIL_RGB = (0.03, 0.03, 0.03)
IRIS_ANGLE, PUPIL_ANGLE = 22.0, 8.0
"""Half-angles in degrees, seen from the eyeball's centre, of the painted iris and pupil
(a 16 mm eyeball: iris 6 mm, pupil 2.2 mm in radius)."""


def prior_frame(model):
    """The field frame of a run on this prior (as :func:`avatar.pipeline.generate.head_frame`):
    centred on the bounding box of the neutral mesh, 2.5 field units per metre."""
    from avatar.fields.frame import FieldFrame

    t = model.template.detach().cpu().double()
    centre = (0.5 * (t.min(0).values + t.max(0).values)).tolist()
    return FieldFrame(scale=2.5, centre=(float(centre[0]), float(centre[1]), float(centre[2])))


def control_cameras(names: list[str] | None = None, size: int = 512):
    """:class:`avatar.render.cameras.Cameras` for :data:`CONTROL_CAMERAS` (or the named subset),
    and one JSON-ready dict per camera."""
    import torch

    from avatar.render.cameras import make_cameras

    table = {name: (az, polar) for name, az, polar in CONTROL_CAMERAS}
    names = list(table) if names is None else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown control camera(s) {unknown}; choose from {list(table)}")
    az = torch.tensor([table[n][0] for n in names], dtype=torch.float32)
    polar = torch.tensor([table[n][1] for n in names], dtype=torch.float32)
    n = len(names)
    cams = make_cameras(az, polar, torch.full((n,), CONTROL_RADIUS), torch.full((n,), CONTROL_FOV), size)
    info = [
        {"name": name, "azimuth_deg": float(a), "polar_deg": float(p), "radius": CONTROL_RADIUS,
         "fov_y_deg": CONTROL_FOV, "width": size, "height": size, "view": view,
         "c2w": [[round(float(x), 6) for x in row] for row in c2w]}
        for name, a, p, view, c2w in zip(names, az.tolist(), polar.tolist(), cams.views, cams.c2w.tolist())
    ]  # fmt: skip
    return cams, info


def _eyeballs(model) -> list[tuple[Any, Any]]:
    """Per eye: (its vertex indices, weights over them that pick out its front pole)."""
    import torch

    out = []
    weights = model.skin_weights.detach().cpu()
    template = model.template.detach().cpu().double()
    for name in ("left_eye", "right_eye"):
        if name not in model.joint_names:
            continue
        idx = torch.nonzero(weights.argmax(dim=1) == model.joint_names.index(name))[:, 0]
        if len(idx) < 8:
            continue
        rel = template[idx] - template[idx].mean(0)
        cos = rel[:, 2] / rel.norm(dim=1).clamp_min(1e-12)
        out.append((idx, (cos > 0.85).double()))
    return out


def shaded_images(model, cameras, vertices, frame, supersample: int = 2, engine: str = "auto"):
    """Lambertian renders of posed prior meshes with painted eyes, as MediaPipe is shown them.

    Args:
        model: the :class:`~avatar.prior.head_model.HeadModel` (faces, eyeballs).
        cameras: B cameras in field units.
        vertices: (V, 3) or (B, V, 3) posed vertices in metres (``HeadState.vertices``).
        frame: the field frame (:func:`prior_frame`).
        supersample: render at this many times the resolution and average down.

    Returns:
        (B, H, W, 3) float in [0, 1]: skin-coloured head, white sclera, brown iris,
        black pupil, lit from just above the camera, black background.
    """
    import torch

    from avatar.render.mesh import MeshRenderer

    h, w = cameras.height, cameras.width
    big = cameras.with_resolution(h * supersample, w * supersample)
    v = vertices.detach().cpu().float()
    v = v[None] if v.dim() == 2 else v
    vf = frame.to_field(v)
    faces = model.all_faces().cpu()
    b = len(cameras)
    vf = vf.expand(b, -1, -1) if vf.shape[0] == 1 else vf
    out = torch.zeros(b, h * supersample, w * supersample, 3)
    renderer = MeshRenderer(engine=engine)
    for i in range(b):
        r = renderer.render(big[i], vf[i], faces, antialiased=False)
        mask = r.extras["mask"][0, ..., 0]
        positions, normals = r.extras["positions"][0], r.normal[0]
        tri = r.extras["rast"][0, ..., 3].long() - 1
        colour = torch.tensor(SKIN_RGB).expand(*mask.shape, 3).clone()
        for idx, front in _eyeballs(model):
            ball = torch.zeros(len(vf[i]), dtype=torch.bool)
            ball[idx] = True
            on_ball = mask & ball[faces[tri.clamp_min(0)]].all(dim=-1)
            centre = vf[i, idx].mean(0)
            axis = torch.nn.functional.normalize((vf[i, idx] * front[:, None].float()).sum(0) / front.sum()
                                                 - centre, dim=0)
            rel = torch.nn.functional.normalize(positions[on_ball] - centre, dim=-1)
            angle = torch.rad2deg(torch.arccos((rel @ axis).clamp(-1.0, 1.0)))
            eye = torch.where((angle < PUPIL_ANGLE)[:, None], torch.tensor(PUPIL_RGB),
                              torch.where((angle < IRIS_ANGLE)[:, None], torch.tensor(IRIS_RGB),
                                          torch.tensor(SCLERA_RGB)))
            colour[on_ball] = eye
        light = big.eye[i] + torch.tensor([0.0, 0.4 * CONTROL_RADIUS, 0.0])
        to_light = torch.nn.functional.normalize(light - positions, dim=-1)
        diffuse = (normals * to_light).sum(-1, keepdim=True).clamp_min(0.0)
        out[i] = colour * (0.3 + 0.7 * diffuse) * mask[..., None]
    out = out.view(b, h, supersample, w, supersample, 3).mean(dim=(2, 4))
    return out.clamp(0.0, 1.0)


def control_landmark_pixels(model, expression: dict[str, float], cameras: list[str] | None = None,
                            size: int = 512):
    """(B, L, 2) pixel positions (x right, y down) of the landmarks the control images of the named
    control cameras draw, for an expression (:func:`avatar.render.control.control_landmarks`:
    the face oval as seen from each camera)."""
    import torch

    from avatar.render.control import control_landmarks

    cams, _ = control_cameras(cameras, size)
    frame = prior_frame(model)
    with torch.no_grad():
        state = model.forward(expression=expression or None)
        landmarks = control_landmarks(cams, frame.to_field(state.landmarks[0].detach().cpu().float()),
                                      model.landmark_contours, frame.to_field(state.vertices[0].detach().cpu().float()))
        px, _ = cams.project(landmarks)
    return px


def control_views(model, size: int = 512, cameras: list[str] | None = None,
                  expressions: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Shaded renders and control images of the prior for cameras x expressions.

    Returns one dict per (expression, camera): ``expression``, ``camera`` (name),
    ``render`` and ``control`` ((size, size, 3) uint8 RGB), in expression-major order.
    """
    import torch

    from avatar.render.control import control_images

    expressions = CONTROL_EXPRESSIONS if expressions is None else expressions
    expressions = {k: v for k, v in expressions.items() if all(n in model.expression_names for n in v)}
    cams, info = control_cameras(cameras, size)
    frame = prior_frame(model)
    faces = model.all_faces().cpu()
    out = []
    for expr_name, expr in expressions.items():
        with torch.no_grad():
            state = model.forward(expression=expr or None)
        verts = state.vertices[0].detach().cpu().float()
        renders = shaded_images(model, cams, verts, frame)
        controls = control_images(cams, frame.to_field(state.landmarks[0].detach().cpu().float()),
                                  model.landmark_contours, frame.to_field(verts), faces,
                                  closed=model.closed_contours)
        for i, cam in enumerate(info):
            out.append({
                "expression": expr_name,
                "camera": cam["name"],
                "render": (renders[i].numpy() * 255.0 + 0.5).astype(np.uint8),
                "control": (controls[i].cpu().numpy() * 255.0 + 0.5).astype(np.uint8),
            })  # fmt: skip
    return out


def write_control_views(model, out_dir: Path, size: int = 512, cameras: list[str] | None = None,
                        expressions: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Write ``control/<expression>_<camera>_{render,control,pair}.png`` and ``control/control.json``.

    Returns the JSON document: ``cameras`` (name, azimuth, polar, radius, field of view,
    size, view label, camera-to-world in field units), ``frame`` (metres -> field units),
    ``expressions`` (name -> expression values) and ``views`` (files per expression and camera).
    """
    from PIL import Image

    folder = Path(out_dir) / "control"
    folder.mkdir(parents=True, exist_ok=True)
    views = control_views(model, size, cameras, expressions)
    _, cam_info = control_cameras(cameras, size)
    used = sorted({v["expression"] for v in views}, key=[v["expression"] for v in views].index)
    table = CONTROL_EXPRESSIONS if expressions is None else expressions
    listing = []
    for view in views:
        stem = f"{view['expression']}_{view['camera']}"
        files = {}
        for kind, image in (("render", view["render"]), ("control", view["control"]),
                            ("pair", np.concatenate([view["render"], view["control"]], axis=1))):
            path = folder / f"{stem}_{kind}.png"
            Image.fromarray(image).save(path)
            files[kind] = path.name
        listing.append({"expression": view["expression"], "camera": view["camera"], "files": files})
    doc = {
        "model": model.name,
        "description": "Shaded renders of the head prior and the landmark control images the ControlNet "
                       "gets from the same cameras (camera-to-world in field units; +Y up, face towards +Z).",
        "frame": prior_frame(model).to_dict(),
        "cameras": cam_info,
        "expressions": {name: table[name] for name in used},
        "views": listing,
    }
    (folder / "control.json").write_text(json.dumps(doc, indent=1))
    return doc
