"""Run MediaPipe Face Mesh on images and draw its detections as the ControlNet's training tool did.

Runs in its own environment (see ``requirements.txt``; ``run.sh`` makes it), never in
avatar's: it imports only mediapipe, numpy and OpenCV (a mediapipe dependency).

    python detect.py --out detections.json [--draw DIR] IMAGE.png ...

For each image: the legacy ``mp.solutions.face_mesh.FaceMesh`` with
``static_image_mode=True, refine_landmarks=True, max_num_faces=1`` (468 mesh points
+ 10 iris points) gives ``landmarks``: 478 x (x, y, z) with x, y in pixels of the
image (x right, y down, pixel centres at +0.5) and z MediaPipe's relative depth
scaled like x. With ``--draw``, ``DIR/<stem>.png`` is the detection drawn exactly as
CrucibleAI/ControlNetMediaPipeFace's ``tool_generate_face_poses.py`` drew its
training images: MediaPipe's ``draw_landmarks`` with the face oval, eye, eyebrow
and lip connection sets, 4 px lines, then a 4x4 square at each iris centre, drawn
into an array read as BGR, whose channels are then reversed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import mediapipe as mp
import numpy as np

mp_face_mesh = mp.solutions.face_mesh
mp_drawing = mp.solutions.drawing_utils
DrawingSpec = mp.solutions.drawing_styles.DrawingSpec

# The training tool's drawing spec (colours as it wrote them, i.e. BGR in its array).
THICKNESS = 4
SPEC = {
    "face_oval": (mp_face_mesh.FACEMESH_FACE_OVAL, (10, 200, 10)),
    "left_eye": (mp_face_mesh.FACEMESH_LEFT_EYE, (180, 200, 10)),
    "left_eyebrow": (mp_face_mesh.FACEMESH_LEFT_EYEBROW, (180, 220, 10)),
    "right_eye": (mp_face_mesh.FACEMESH_RIGHT_EYE, (10, 200, 180)),
    "right_eyebrow": (mp_face_mesh.FACEMESH_RIGHT_EYEBROW, (10, 220, 180)),
    "lips": (mp_face_mesh.FACEMESH_LIPS, (10, 180, 10)),
}
PUPILS = {468: (10, 200, 250), 473: (250, 200, 10)}  # right iris centre, left iris centre


def draw_training_style(shape: tuple[int, int, int], face_landmarks) -> np.ndarray:
    """The training tool's drawing of one detection, as an RGB array."""
    spec = {}
    for connections, colour in SPEC.values():
        for edge in connections:
            spec[edge] = DrawingSpec(color=colour, thickness=THICKNESS, circle_radius=1)
    image = np.zeros(shape, dtype=np.uint8)
    mp_drawing.draw_landmarks(image, face_landmarks, connections=spec.keys(), landmark_drawing_spec=None,
                              connection_drawing_spec=spec)
    rows, cols = shape[:2]
    for idx, colour in PUPILS.items():
        lm = face_landmarks.landmark[idx]
        if not (0 <= lm.x < 1 and 0 <= lm.y < 1):
            continue
        x, y = int(cols * lm.x), int(rows * lm.y)
        image[y - 2 : y + 2, x - 2 : x + 2, :] = colour
    return image[:, :, ::-1].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--draw", type=Path, default=None, help="folder for training-style drawings")
    parser.add_argument("--min-confidence", type=float, default=0.5)
    args = parser.parse_args()
    if args.draw is not None:
        args.draw.mkdir(parents=True, exist_ok=True)
    results = {}
    with mp_face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                               min_detection_confidence=args.min_confidence) as face_mesh:
        for path in args.images:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise SystemExit(f"cannot read {path}")
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]
            found = face_mesh.process(rgb).multi_face_landmarks
            entry = {"file": str(path), "width": w, "height": h, "found": bool(found)}
            if found:
                lms = found[0].landmark
                entry["landmarks"] = [[round(lm.x * w, 3), round(lm.y * h, 3), round(lm.z * w, 3)] for lm in lms]
                if args.draw is not None:
                    drawing = draw_training_style(rgb.shape, found[0])
                    cv2.imwrite(str(args.draw / f"{path.stem}.png"), cv2.cvtColor(drawing, cv2.COLOR_RGB2BGR))
            results[path.stem] = entry
            print(f"{path.name}: {'face' if found else 'no face'}", flush=True)
    doc = {
        "detector": f"mediapipe {mp.__version__} solutions.face_mesh.FaceMesh(static_image_mode=True, "
                    f"max_num_faces=1, refine_landmarks=True, min_detection_confidence={args.min_confidence})",
        "images": results,
    }
    args.out.write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
