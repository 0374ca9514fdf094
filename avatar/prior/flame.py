"""FLAME (Li et al. 2017) for users who have its files, read without ``chumpy``.

FLAME's model pickles (``generic_model.pkl`` of FLAME 2020, ``FLAME_NEUTRAL.pkl``
as the ``smplx`` package names it) were written in Python 2 with some arrays
stored as ``chumpy`` objects. chumpy is unmaintained and breaks on current
numpy, so :class:`_FlameUnpickler` maps every chumpy class to a stand-in that
keeps the pickled state and turns it into a plain array. It also refuses any
class outside numpy and scipy.sparse, so a FLAME folder cannot run code.

Conventions follow ``smplx.FLAME``: ``shapedirs`` holds 300 shape then the
expression components; joints are global (root), neck, jaw, left eye, right
eye; the pose-corrective blendshapes are driven by joints 1..4. Expression
parameters are ``exp_00..exp_NN`` followed by ``jaw_rot_x/y/z`` (an axis-angle
in radians added to the jaw joint; positive ``jaw_rot_x`` opens the mouth).
ARKit-named expressions come only with the anny head.

Landmarks are FLAME's 51 static iBUG points (``flame_static_embedding.pkl``,
required), the 17 jaw-line points of the frontal entry of
``flame_dynamic_embedding.npy`` (optional) and the MediaPipe points of
``mediapipe_landmark_embedding.npz`` (optional). Contours use the MediaPipe
points when present, else the iBUG ones; FLAME has no iris landmarks.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar.prior.errors import PriorError
from avatar.prior.head_model import HeadModel
from avatar.prior.landmarks import CONTOUR_NAMES, IBUG68_CONTOURS, MEDIAPIPE_CONTOURS

MODEL_FILES = ("FLAME_NEUTRAL.pkl", "generic_model.pkl", "flame2023.pkl")
STATIC_EMBEDDING = "flame_static_embedding.pkl"
DYNAMIC_EMBEDDING = "flame_dynamic_embedding.npy"
MEDIAPIPE_EMBEDDING = "mediapipe_landmark_embedding.npz"
SHAPE_SPACE_DIM = 300  # FLAME stores 300 shape components before the expression ones
FLAME_JOINT_NAMES = ["global", "neck", "jaw", "left_eye", "right_eye"]
JAW_CONTROLS = ["jaw_rot_x", "jaw_rot_y", "jaw_rot_z"]
_REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")



class _ChumpyStandIn:
    """Receives the pickled state of a chumpy object (its value is in ``x``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def to_array(self) -> np.ndarray:
        state = getattr(self, "_state", None)
        if isinstance(state, dict) and "x" in state:
            return _to_array(state["x"])
        if isinstance(state, tuple):  # (dict_state, slot_state)
            for part in state:
                if isinstance(part, dict) and "x" in part:
                    return _to_array(part["x"])
        raise PriorError(
            "a chumpy object in the FLAME file holds no plain value ('x'); "
            "re-save the file with chumpy's values as numpy arrays"
        )


def _to_array(value: Any) -> np.ndarray:
    if isinstance(value, _ChumpyStandIn):
        return value.to_array()
    if hasattr(value, "toarray"):  # scipy.sparse
        return value.toarray()
    return np.asarray(value)


class _FlameUnpickler(pickle.Unpickler):
    """Unpickler for FLAME files: chumpy -> stand-in, only numpy/scipy otherwise."""

    _ALLOWED_ROOTS = {"numpy", "scipy", "copy_reg", "copyreg", "_codecs", "collections", "builtins", "__builtin__"}
    _ALLOWED_BUILTINS = {"object", "set", "frozenset", "slice", "complex", "bytearray", "dict", "list", "tuple"}

    def find_class(self, module: str, name: str) -> Any:
        root = module.split(".")[0]
        if root == "chumpy":
            return _ChumpyStandIn
        if root not in self._ALLOWED_ROOTS:
            raise PriorError(f"unexpected object {module}.{name} in a FLAME file: not a FLAME model")
        if root in ("builtins", "__builtin__") and name not in self._ALLOWED_BUILTINS:
            raise PriorError(f"unexpected object {module}.{name} in a FLAME file: not a FLAME model")
        return super().find_class(module, name)


def read_flame_pickle(path: Path) -> Any:
    """Unpickle a FLAME ``.pkl`` (Python 2 or 3) without chumpy; chumpy values become arrays."""
    data = Path(path).read_bytes()
    try:
        obj = _FlameUnpickler(io.BytesIO(data), encoding="latin1").load()
    except PriorError:
        raise
    except Exception as exc:  # any unpickling failure means "not a FLAME file"
        raise PriorError(f"{path} is not a readable FLAME pickle: {exc}") from None
    if isinstance(obj, dict):
        return {k: _to_array(v) if isinstance(v, _ChumpyStandIn) else v for k, v in obj.items()}
    return obj


def find_flame_files(folder: Path) -> dict[str, Path | None]:
    """Locate the FLAME files in a folder.

    Raises:
        PriorError: the folder is missing, or lacks a model or the static
            landmark embedding; the message lists what was found and expected.
    """
    folder = Path(folder).expanduser()
    expected = (
        f"one of {', '.join(MODEL_FILES)}; {STATIC_EMBEDDING}; optionally {DYNAMIC_EMBEDDING} and {MEDIAPIPE_EMBEDDING}"
    )
    if not folder.is_dir():
        raise PriorError(f"FLAME folder {folder} does not exist; expected a folder with {expected}")
    found = sorted(p.name for p in folder.iterdir())
    model = next((folder / n for n in MODEL_FILES if (folder / n).is_file()), None)
    static = folder / STATIC_EMBEDDING
    if model is None or not static.is_file():
        missing = ([f"a model ({' or '.join(MODEL_FILES)})"] if model is None else []) + (
            [STATIC_EMBEDDING] if not static.is_file() else []
        )
        raise PriorError(
            f"incomplete FLAME folder {folder}: missing {', '.join(missing)}. "
            f"Found: {found or 'nothing'}. Expected: {expected}. "
            "FLAME files come from https://flame.is.tue.mpg.de after registration."
        )
    dynamic, mediapipe = folder / DYNAMIC_EMBEDDING, folder / MEDIAPIPE_EMBEDDING
    return {
        "model": model,
        "static": static,
        "dynamic": dynamic if dynamic.is_file() else None,
        "mediapipe": mediapipe if mediapipe.is_file() else None,
    }


def _landmark_embedding(
    data: Any, path: Path, faces: np.ndarray, leading: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    try:
        face_idx = np.asarray(data["lmk_face_idx"], dtype=np.int64)
        bary = np.asarray(data["lmk_b_coords"], dtype=np.float64)
    except (KeyError, TypeError, IndexError):
        raise PriorError(
            f"{path} is not a FLAME landmark embedding: expected 'lmk_face_idx' and 'lmk_b_coords'"
        ) from None
    if bary.shape != face_idx.shape + (3,) or (face_idx.size and (face_idx.min() < 0 or face_idx.max() >= len(faces))):
        raise PriorError(
            f"{path}: landmark faces {face_idx.shape} / barycentrics {bary.shape} "
            f"do not fit a mesh of {len(faces)} faces"
        )
    return face_idx, bary


def load_flame(folder: Path | str, recentre: bool = True, dtype: torch.dtype = torch.float32) -> HeadModel:
    """Load FLAME from a folder of its files into a :class:`HeadModel`.

    Args:
        folder: holds a FLAME model pickle and ``flame_static_embedding.pkl``.
        recentre: translate so the template's bounding-box centre is the origin
            (the project frame); the offset is kept in ``info["centre_offset"]``.
            With ``recentre=False`` the numbers equal ``smplx``'s exactly.
    """
    from avatar.prior.geometry import boundary_loops, cap_loop

    files = find_flame_files(Path(folder))
    raw = read_flame_pickle(files["model"])
    if not isinstance(raw, dict) or any(k not in raw for k in _REQUIRED_KEYS):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise PriorError(f"{files['model']} is not a FLAME model: expected keys {list(_REQUIRED_KEYS)}, found {keys}")
    arr = {k: _to_array(raw[k]) for k in _REQUIRED_KEYS}
    v_template = arr["v_template"].astype(np.float64)
    faces = arr["f"].astype(np.int64)
    n_vert = len(v_template)
    shapedirs = arr["shapedirs"].astype(np.float64)
    posedirs = arr["posedirs"].astype(np.float64)
    j_regressor = arr["J_regressor"].astype(np.float64)
    weights = arr["weights"].astype(np.float64)
    kintree = arr["kintree_table"].astype(np.int64)
    n_joint = weights.shape[1] if weights.ndim == 2 else -1
    checks = {
        "v_template": (v_template.shape, (n_vert, 3)),
        "f": (faces.shape[1:], (3,)),
        "weights": (weights.shape, (n_vert, n_joint)),
        "J_regressor": (j_regressor.shape, (n_joint, n_vert)),
        "kintree_table": (kintree.shape, (2, n_joint)),
        "posedirs": (posedirs.shape, (n_vert, 3, 9 * (n_joint - 1))),
    }
    for key, (got, want) in checks.items():
        if tuple(got) != tuple(want):
            raise PriorError(
                f"{files['model']}: {key} has shape {tuple(got)}, expected {tuple(want)} for a FLAME model"
            )
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (n_vert, 3):
        raise PriorError(f"{files['model']}: shapedirs has shape {shapedirs.shape}, expected ({n_vert}, 3, K)")

    parents = [-1] + [int(p) for p in kintree[0, 1:]]
    n_shape = min(SHAPE_SPACE_DIM, shapedirs.shape[2])
    n_expr = shapedirs.shape[2] - n_shape
    shape_dirs = np.moveaxis(shapedirs[:, :, :n_shape], 2, 0)  # (S, V, 3)
    expr_dirs = np.moveaxis(shapedirs[:, :, n_shape:], 2, 0)  # (E, V, 3)
    joint_template = j_regressor @ v_template
    shape_joint_dirs = np.einsum("jv,svc->sjc", j_regressor, shape_dirs)
    expr_joint_dirs = np.einsum("jv,evc->ejc", j_regressor, expr_dirs)
    joint_names = FLAME_JOINT_NAMES if n_joint == 5 else [f"joint_{i}" for i in range(n_joint)]

    # Landmarks: static iBUG 17..67, then the frontal jaw line 0..16, then MediaPipe.
    static_face, static_bary = _landmark_embedding(read_flame_pickle(files["static"]), files["static"], faces)
    lmk_faces, lmk_bary = [static_face], [static_bary]
    ibug_index = {17 + i: i for i in range(len(static_face))}
    if files["dynamic"] is not None:
        try:
            dyn = np.load(files["dynamic"], allow_pickle=True, encoding="latin1")[()]
        except Exception as exc:
            raise PriorError(f"{files['dynamic']} is not a FLAME dynamic embedding: {exc}") from None
        dyn_face, dyn_bary = _landmark_embedding(dyn, files["dynamic"], faces)
        if dyn_face.ndim != 2:
            raise PriorError(f"{files['dynamic']}: expected (yaw bins, points) landmark faces, got {dyn_face.shape}")
        offset = sum(len(f) for f in lmk_faces)
        ibug_index.update({i: offset + i for i in range(dyn_face.shape[1])})
        lmk_faces.append(dyn_face[0])  # yaw 0: the frontal jaw line
        lmk_bary.append(dyn_bary[0])
    contours = {name: [ibug_index[i] for i in ids if i in ibug_index] for name, ids in IBUG68_CONTOURS.items()}
    mediapipe_count = 0
    if files["mediapipe"] is not None:
        with np.load(files["mediapipe"], allow_pickle=False) as mp:
            mp_face, mp_bary = _landmark_embedding(mp, files["mediapipe"], faces)
            ids = np.asarray(mp["landmark_indices"], dtype=np.int64) if "landmark_indices" in mp.files else None
        if ids is None or ids.shape != mp_face.shape:
            raise PriorError(f"{files['mediapipe']}: expected 'landmark_indices' matching 'lmk_face_idx'")
        offset = sum(len(f) for f in lmk_faces)
        mp_index = {int(m): offset + i for i, m in enumerate(ids)}
        for name, ids_ in MEDIAPIPE_CONTOURS.items():
            picked = [mp_index[m] for m in ids_ if m in mp_index]
            if len(picked) >= 3:
                contours[name] = picked
        lmk_faces.append(mp_face)
        lmk_bary.append(mp_bary)
        mediapipe_count = len(ids)
    lmk_faces_all = np.concatenate(lmk_faces)
    contours = {name: contours.get(name, []) for name in CONTOUR_NAMES}

    # Close every hole (the neck, and any other open rim) for the SDF and export.
    caps = [cap_loop(v_template, loop) for loop in boundary_loops(faces)]
    cap_faces = np.concatenate(caps) if caps else np.zeros((0, 3), dtype=np.int64)

    centre = 0.5 * (v_template.min(axis=0) + v_template.max(axis=0)) if recentre else np.zeros(3)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)

    n_pose_ctrl = len(JAW_CONTROLS) if "jaw" in joint_names else 0
    expression_pose = None
    if n_pose_ctrl:
        expression_pose = np.zeros((n_pose_ctrl, n_joint, 3))
        for axis in range(3):
            expression_pose[axis, joint_names.index("jaw"), axis] = 1.0
    model = HeadModel(
        name="flame",
        template=t(v_template - centre),
        faces=torch.as_tensor(faces),
        cap_faces=torch.as_tensor(cap_faces),
        shape_dirs=t(shape_dirs),
        shape_joint_dirs=t(shape_joint_dirs),
        shape_names=[f"shape_{i:03d}" for i in range(n_shape)],
        shape_defaults=torch.zeros(n_shape, dtype=dtype),
        expression_dirs=t(expr_dirs),
        expression_joint_dirs=t(expr_joint_dirs),
        expression_names=[f"exp_{i:02d}" for i in range(n_expr)] + (JAW_CONTROLS if n_pose_ctrl else []),
        joint_template=t(joint_template - centre),
        joint_names=joint_names,
        parents=parents,
        skin_weights=t(weights),
        landmark_vertices=torch.as_tensor(faces[lmk_faces_all]),
        landmark_weights=t(np.concatenate(lmk_bary)),
        landmark_contours=contours,
        # smplx's layout: (9 (J - 1), 3 V), rows the flattened R - I of joints 1..J-1.
        posedirs=t(posedirs.reshape(-1, posedirs.shape[2]).T),
        expression_pose=None if expression_pose is None else t(expression_pose),
        info={
            "source": f"FLAME files in {Path(folder).expanduser()}",
            "model_file": files["model"].name,
            "dynamic_embedding": files["dynamic"] is not None,
            "mediapipe_landmarks": mediapipe_count,
            "centre_offset": (-centre).tolist(),
            "note": "ARKit-named expressions come only with the anny head",
            "landmarks": (f"MediaPipe embedding ({MEDIAPIPE_EMBEDDING}, {mediapipe_count} points) over iBUG 68"
                          if mediapipe_count else
                          f"iBUG 68 only: control images drawn from 68 landmarks (single-line brows, no pupils, "
                          f"the jaw line as face oval); add {MEDIAPIPE_EMBEDDING} from the FLAME site"),
        },
    )
    if contours["face_oval"] and contours["face_oval"][0] in ibug_index.values():
        # iBUG's oval is the open 17-point jaw line: closing it would draw a line across the face.
        model.closed_contours = model.closed_contours - {"face_oval"}
    return model
