"""What MediaPipe Face Mesh reads from an ``avatar export --topology prior`` GLB, against the prior itself (issue #18).

Runs in avatar's environment; ``run.sh export`` calls it around ``detect.py`` (MediaPipe's environment):

    python tools/mediapipe/export_check.py render OUT --glb RUN/export/avatar.glb   # OUT/renders/*.png, OUT/views.json
    (MediaPipe)  detect.py --out OUT/detections.json OUT/renders/*.png
    python tools/mediapipe/export_check.py report OUT                               # OUT/report.json, OUT/report.md

``render`` draws, at 512 x 512 from the control cameras ``front``, ``yaw+-40`` and ``pitch+-15``
(:data:`avatar.prior.show.CONTROL_CAMERAS`), the same Lambertian shading with painted eyes that
``run.sh measure`` shows MediaPipe (:func:`avatar.prior.show.shaded_images`) of

- ``prior``: the anny head model (``load_head_model('anny')``) posed with ``forward(expression=...)``;
- ``head``: the prior's own export head (:func:`avatar.prior.anny_export.load_export_head`: the
  same anny head with eyeballs, teeth and tongue, at its default shape, unfitted) posed with
  ``forward(expression=...)``: what the export is before the fit, so ``export`` against ``head``
  measures what the fit changes and ``head`` against ``prior`` what the mouth's and eyes' parts change;
- ``export``: the GLB's parts as an engine shows them: each part's POSITION plus the sum of
  weight x morph target (sparse accessors decoded), in the GLB's frame (metres, the prior's frame),

under :data:`EXPRESSIONS`. ``report`` reads MediaPipe's landmarks and gives, per camera, whether a
face was found and the pixel distances of :data:`MEASURES` (lip gap 13-14, lid gaps 386-374 and
159-145, mouth width 61-291) neutral and under the expression that moves them, for each; then the
export's change from neutral against the prior's (issue #18: the same expressions within 20%; the
exit status) and against the unfitted export head's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

CAMERAS = ["front", "yaw+40", "yaw-40", "pitch+15", "pitch-15"]
EXPRESSIONS: dict[str, dict[str, float]] = {
    "neutral": {},
    "jawOpen": {"jawOpen": 1.0},
    "eyeBlinkLeft": {"eyeBlinkLeft": 1.0},
    "eyeBlinkRight": {"eyeBlinkRight": 1.0},
    "smile": {"mouthSmileLeft": 1.0, "mouthSmileRight": 1.0},
}
MEASURES: dict[str, tuple[int, int, str]] = {
    "lip_gap": (13, 14, "jawOpen"),
    "left_lid_gap": (386, 374, "eyeBlinkLeft"),
    "right_lid_gap": (159, 145, "eyeBlinkRight"),
    "mouth_width": (61, 291, "smile"),
}
"""name -> (MediaPipe landmark, landmark, the expression that moves their distance)."""
TOLERANCE = 0.20
SIZE = 512
SOURCES = ("prior", "head", "export")


def read_glb(path: Path) -> dict[str, dict]:
    """The GLB's mesh parts: name -> positions (V, 3), faces (F, 3) and morph targets name -> (V, 3) deltas."""
    from pygltflib import GLTF2

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from test_export_glb_rig import decode, targets_of

    gltf = GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()
    parts = {}
    for mesh_index, mesh in enumerate(gltf.meshes):
        prim = mesh.primitives[0]
        names = list(mesh.extras["targetNames"]) if mesh.extras and "targetNames" in mesh.extras else []
        parts[mesh.name.removesuffix("_geometry")] = {
            "positions": decode(gltf, blob, prim.attributes.POSITION),
            "faces": decode(gltf, blob, prim.indices).astype(np.int64).reshape(-1, 3),
            "targets": {n: decode(gltf, blob, t["POSITION"]) for n, t in zip(names, targets_of(gltf, mesh_index))},
        }
    return parts


def glb_as_model(parts: dict[str, dict]):
    """The GLB's parts as the few attributes of a head model :func:`avatar.prior.show.shaded_images`
    reads (faces, the eyeballs by joint), and a function posing them: expression -> (V, 3) metres."""
    import torch

    joints = ["head", "left_eye", "right_eye"]
    offsets, faces, owner, names = [], [], [], list(parts)
    start = 0
    for name in names:
        p = parts[name]
        offsets.append(start)
        faces.append(p["faces"] + start)
        owner += [joints.index(name) if name in joints else 0] * len(p["positions"])
        start += len(p["positions"])
    weights = torch.nn.functional.one_hot(torch.tensor(owner), len(joints)).float()
    template = torch.from_numpy(np.concatenate([parts[n]["positions"] for n in names]))
    all_faces = torch.from_numpy(np.concatenate(faces))
    model = SimpleNamespace(all_faces=lambda: all_faces, skin_weights=weights, joint_names=joints, template=template)

    def pose(expression: dict[str, float]) -> torch.Tensor:
        out = []
        for name in names:
            p = parts[name]
            moved = p["positions"].copy()
            for target, w in expression.items():
                moved += w * p["targets"][target]
            out.append(moved)
        return torch.from_numpy(np.concatenate(out)).float()

    return model, pose


def export_head_parts(expressions: dict[str, dict[str, float]]) -> dict[str, dict]:
    """The prior's export head (unfitted, default shape) as :func:`read_glb`'s parts: each part's rest
    positions, its faces and, per name in ``expressions``, ``forward(expression=...) - rest``."""
    import torch

    from avatar.prior.anny_export import load_export_head

    head = load_export_head()
    names = sorted({n for e in expressions.values() for n in e})
    with torch.no_grad():
        rest = head.forward().vertices[0].double().numpy()
        moved = {}
        for n in names:
            e = torch.zeros(1, head.num_expression)
            e[0, head.expression_names.index(n)] = 1.0
            moved[n] = head.forward(expression=e).vertices[0].double().numpy()
    parts = {}
    for name, part in head.parts.items():
        if "eyelashes" in name:  # the export leaves them out
            continue
        rows = np.asarray(part.model_index)  # the part's vertices (split at UV seams) as model rows
        parts[name] = {"positions": rest[rows], "faces": np.asarray(part.faces, dtype=np.int64),
                       "targets": {n: moved[n][rows] - rest[rows] for n in names}}
    return parts


def render(out: Path, glb: Path) -> None:
    import torch
    from PIL import Image

    from avatar.prior import load_head_model
    from avatar.prior.show import control_cameras, prior_frame, shaded_images

    prior = load_head_model("anny")
    frame = prior_frame(prior)  # the GLB is in the prior's frame (metres): the same cameras frame both
    cams, info = control_cameras(CAMERAS, SIZE)
    glb_model, pose = glb_as_model(read_glb(glb))
    head_model, head_pose = glb_as_model(export_head_parts(EXPRESSIONS))
    (out / "renders").mkdir(parents=True, exist_ok=True)
    views = []
    for expr_name, expr in EXPRESSIONS.items():
        with torch.no_grad():
            prior_verts = prior.forward(expression=expr or None).vertices[0].detach().cpu().float()
        for source, model, verts in (("prior", prior, prior_verts), ("head", head_model, head_pose(expr)),
                                     ("export", glb_model, pose(expr))):
            images = shaded_images(model, cams, verts, frame)
            for i, cam in enumerate(info):
                stem = f"{source}_{expr_name}_{cam['name']}"
                pixels = (images[i].numpy() * 255.0 + 0.5).astype(np.uint8)
                Image.fromarray(pixels).save(out / "renders" / f"{stem}.png")
                views.append({"source": source, "expression": expr_name, "camera": cam["name"], "stem": stem})
        print(f"rendered {expr_name}", flush=True)
    doc = {"glb": str(glb), "size": SIZE, "cameras": info, "expressions": EXPRESSIONS, "views": views}
    (out / "views.json").write_text(json.dumps(doc, indent=1))


def report(out: Path) -> dict:
    views = json.loads((out / "views.json").read_text())
    det = json.loads((out / "detections.json").read_text())["images"]

    def measure(source: str, expr: str, cam: str, a: int, b: int) -> float | None:
        d = det.get(f"{source}_{expr}_{cam}")
        if not d or not d["found"]:
            return None
        lm = np.asarray(d["landmarks"])[:, :2]
        return round(float(np.linalg.norm(lm[a] - lm[b])), 2)

    found = {f"{s}_{e}_{c}": bool(det.get(f"{s}_{e}_{c}", {}).get("found"))
             for s in SOURCES for e in EXPRESSIONS for c in CAMERAS}
    rows = []
    for name, (a, b, expr) in MEASURES.items():
        for cam in CAMERAS:
            row = {"measure": name, "landmarks": [a, b], "expression": expr, "camera": cam}
            for source in SOURCES:
                row[f"{source}_neutral"] = measure(source, "neutral", cam, a, b)
                row[f"{source}_{expr}"] = measure(source, expr, cam, a, b)
            head = [row["head_neutral"], row[f"head_{expr}"], row["export_neutral"], row[f"export_{expr}"]]
            if None not in head and abs(head[1] - head[0]) > 1e-6:
                row["head_change"] = round(head[1] - head[0], 2)
                row["change_ratio_to_head"] = round((head[3] - head[2]) / (head[1] - head[0]), 3)
            vals = [row["prior_neutral"], row[f"prior_{expr}"], row["export_neutral"], row[f"export_{expr}"]]
            if None not in vals:
                dp, de = vals[1] - vals[0], vals[3] - vals[2]
                row.update(prior_change=round(dp, 2), export_change=round(de, 2),
                           change_ratio=round(de / dp, 3) if abs(dp) > 1e-6 else None,
                           value_ratio=round(vals[3] / vals[1], 3) if vals[1] > 1e-6 else None)
                row["within_tolerance"] = bool(row["change_ratio"] is not None
                                               and abs(row["change_ratio"] - 1.0) <= TOLERANCE)
            rows.append(row)
    # How differently MediaPipe places all 478 landmarks on the export and on the prior, per view.
    landmark_px = {}
    for e in EXPRESSIONS:
        for c in CAMERAS:
            a, b = det.get(f"prior_{e}_{c}"), det.get(f"export_{e}_{c}")
            if a and b and a["found"] and b["found"]:
                d = np.linalg.norm(np.asarray(a["landmarks"])[:, :2] - np.asarray(b["landmarks"])[:, :2], axis=1)
                landmark_px[f"{e}_{c}"] = {"mean": round(float(d.mean()), 2), "max": round(float(d.max()), 2)}
    counted = [r for r in rows if "within_tolerance" in r]
    doc = {"detector": json.loads((out / "detections.json").read_text())["detector"], "glb": views["glb"],
           "size": views["size"], "tolerance": TOLERANCE, "faces_found": found, "landmark_px": landmark_px,
           "measures": rows,
           "all_within_tolerance": bool(counted) and all(r["within_tolerance"] for r in counted)}
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out / "report.md").write_text(md)
    print(md)
    return doc


def markdown(doc: dict) -> str:
    lines = ["Faces found (prior / head / export), per expression and camera:", "",
             "| expression | " + " | ".join(CAMERAS) + " |", "|---" * (len(CAMERAS) + 1) + "|"]
    for e in EXPRESSIONS:
        cells = [" / ".join("y" if doc["faces_found"][f"{s}_{e}_{c}"] else "n" for s in SOURCES) for c in CAMERAS]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", "Mean (max) distance in px between MediaPipe's 478 landmarks on the export and on the prior:", "",
              "| expression | " + " | ".join(CAMERAS) + " |", "|---" * (len(CAMERAS) + 1) + "|"]
    for e in EXPRESSIONS:
        cells = [f"{v['mean']} ({v['max']})" if (v := doc["landmark_px"].get(f"{e}_{c}")) else "-" for c in CAMERAS]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", f"Distances in px at {doc['size']}; change = expression - neutral; ratio = export change / prior "
              f"change (goal 1 +- {doc['tolerance']:.0%}); to head = export change / the unfitted export head's:", "",
              "| measure (landmarks) | camera | prior neutral -> expr | head neutral -> expr | export neutral -> expr "
              "| prior change | export change | ratio | to head |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["measures"]:
        expr = r["expression"]

        def cell(source, r=r, expr=expr):
            n, x = r[f"{source}_neutral"], r[f"{source}_{expr}"]
            return f"{'-' if n is None else n} -> {'-' if x is None else x}"

        ratio = r.get("change_ratio")
        flag = "" if r.get("within_tolerance", True) else " (off)"
        lines.append(f"| {r['measure']} ({r['landmarks'][0]}-{r['landmarks'][1]}), {expr} | {r['camera']} | "
                     f"{cell('prior')} | {cell('head')} | {cell('export')} | {r.get('prior_change', '-')} | "
                     f"{r.get('export_change', '-')} | {'-' if ratio is None else ratio}{flag} | "
                     f"{r.get('change_ratio_to_head', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="render the prior and the GLB for MediaPipe")
    p.add_argument("out", type=Path)
    p.add_argument("--glb", type=Path, required=True)
    p = sub.add_parser("report", help="compare what MediaPipe read on both")
    p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "render":
        render(args.out, args.glb)
    else:
        doc = report(args.out)
        sys.exit(0 if doc["all_within_tolerance"] else 1)


if __name__ == "__main__":
    main()
