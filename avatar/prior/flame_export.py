"""The FLAME head for engine export: skin and eyeballs on FLAME's own topology (issue 18).

:mod:`avatar.prior.anny_export` is the anny head an engine can animate; this is the
same for users with FLAME's files (:func:`avatar.prior.flame.load_flame`), with what
FLAME has and nothing it lacks:

* **parts** -- ``skin`` (FLAME without its eyeballs) and ``left_eye`` / ``right_eye``:
  the closed components of FLAME's mesh skinned mostly (> 0.5) to an eye joint (FLAME
  2020's two 546-vertex eyeballs). A FLAME without such components has no eye parts.
  FLAME has no teeth, tongue or mouth interior: no ``mouth`` material;
* **UVs** -- the skin's from FLAME's texture space file (``FLAME_texture.npz`` beside
  the model: ``vt`` (T, 2) texture coordinates, v up as in OBJ, and ``ft`` (F, 3) each
  face's corners into ``vt``, as TF_FLAME's ``sample_texture.py`` reads them), split at
  its seams; without that file, one layout of the skin (:func:`avatar.export.texture.unwrap_uv`:
  conformal charts packed by xatlas) made once and cached under the user's cache folder,
  keyed by a hash of the skin's triangles (the same layout for every FLAME file of that
  topology). The eyeballs use their own texture space (:func:`eye_corner_uvs`: each
  hemisphere an azimuthal map of its own disk) and a procedural eye texture drawn once
  into the cache (:func:`eye_texture_path`);
* **skeleton** -- FLAME's five joints with FLAME's weights, under the export's names:
  FLAME's ``global`` (the root, at the base of the neck) is ``neck``, its ``neck`` (which
  turns the head) is ``head``, then ``jaw``, ``left_eye``, ``right_eye``
  (:data:`FLAME_TO_EXPORT_JOINT`); parents ``neck -> head -> jaw, left_eye, right_eye``;
* **expressions** -- FLAME's as :class:`~avatar.prior.head_model.HeadModel` exposes them,
  ``exp_00 .. exp_NN`` (FLAME's expression components, weight 1 = one unit of the
  coefficient) then ``jaw_rot_x/y/z`` (the jaw's axis-angle in radians, through the
  joint and FLAME's pose correctives): :meth:`forward` equals the FLAME prior's. The GLB's
  morph targets are :attr:`FlameExportHead.morph_names`, the ``exp_NN`` only: the jaw is
  a rotation, which a morph target (a straight-line displacement) cannot play (at half
  weight a 1-radian target would pull the chin 10% of its distance to the jaw's axis
  inwards); an engine opens FLAME's mouth by turning the ``jaw`` joint, as FLAME does;
* **visemes** -- none: FLAME has no ARKit-named expressions to combine
  (:attr:`FlameExportHead.visemes` is empty, :meth:`FlameExportHead.viseme_weights` says so);
* **lining** -- the rims of FLAME's openings other than the neck: the mouth's boundary
  ring and the lid rims around the eyeballs (:attr:`FlameExportHead.openings`), where the
  generated surface seals what FLAME leaves open (as anny's lining of the mouth and sockets).

Rows of the model are FLAME's vertices, skin first, then the left and the right eyeball
(FLAME 2020 already stores them so: the order is then FLAME's own);
:attr:`FlameExportHead.prior_index` gives each row's FLAME vertex. Everything is in the
FLAME prior's frame (``load_flame(folder)``, recentred), so a run generated with
``--prior flame:DIR`` fits it as it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar.prior.anny_export import ExportPart, _srgb, eye_colour, split_at_seams
from avatar.prior.errors import PriorError
from avatar.prior.head_model import HeadModel

TEXTURE_FILE = "FLAME_texture.npz"
UV_LAYOUT_VERSION = 1
"""Bump when the cached skin layout (:func:`skin_corner_uvs` without a texture file) changes."""
UV_LAYOUT_SIZE = 2048
"""Texture size the cached layout's chart padding is measured in (the export's default maps)."""
EYE_TEXTURE_VERSION = 1
EYE_TEXTURE_SIZE = 512
EYE_UV_RADIUS_DEG = 120.0
"""Angle from a hemisphere's pole at the rim of its disk in the eye texture (a front face
straddling the equator reaches a little past 90 degrees)."""

FLAME_TO_EXPORT_JOINT = {"global": "neck", "neck": "head", "jaw": "jaw", "left_eye": "left_eye",
                         "right_eye": "right_eye"}
JOINT_NAMES = list(FLAME_TO_EXPORT_JOINT.values())
PART_NAMES = ["skin", "left_eye", "right_eye"]
MATERIALS = ["skin", "eyes"]

# The eye as anny's export head draws it (anny_export: a 12 mm eyeball, 11.5 mm iris, 3.5 mm
# pupil, MakeHuman's default eye colours, linear RGB).
_SCLERA, _IRIS_MAJOR, _IRIS_MINOR, _PUPIL = (1.0, 1.0, 1.0), (0.18, 0.49, 0.91), (0.11, 0.16, 0.41), (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------
# Finding the parts
# ----------------------------------------------------------------------------
def _closed(faces: np.ndarray) -> bool:
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return bool(len(faces)) and bool((counts == 2).all())


def find_eyeballs(faces: np.ndarray, weights: np.ndarray, joint_names: list[str]) -> dict[str, np.ndarray]:
    """The eyeballs of a FLAME mesh: closed components whose vertices are skinned mostly to an eye joint.

    Args:
        faces: (F, 3) FLAME's triangles; weights: (V, J) its skin weights.

    Returns:
        ``{"left_eye": (n,) vertices, "right_eye": ...}`` in ascending order, for the eyes found.
    """
    from avatar.prior.geometry import connected_components

    labels = connected_components(faces, len(weights))
    found: dict[str, list[np.ndarray]] = {}
    for label in np.unique(labels):
        comp = faces[labels == label]
        verts = np.unique(comp)
        for side in ("left_eye", "right_eye"):
            if side in joint_names and weights[verts, joint_names.index(side)].mean() > 0.5 and _closed(comp):
                found.setdefault(side, []).append(verts)
    return {side: np.sort(np.concatenate(found[side])) for side in ("left_eye", "right_eye") if side in found}


def find_openings(template: np.ndarray, skin_faces: np.ndarray, eyes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The skin's boundary rings, named: ``neck`` (the longest rim), ``left_eye`` / ``right_eye``
    (the rim nearest each eyeball's centre, within twice its radius) and ``mouth`` (of the other
    rims, the lowest one on the midline, within a tenth of the head's width of it).

    template: (V, 3) rows; skin_faces: (F, 3) over the rows; eyes: part -> rows.
    Returns name -> (n,) rows of that ring, in order.
    """
    from avatar.prior.geometry import boundary_loops

    try:
        loops = boundary_loops(skin_faces)
    except ValueError:
        return {}  # a boundary that is no union of simple rings: no lining rather than a wrong one
    if not loops:
        return {}

    def perimeter(loop: np.ndarray) -> float:
        p = template[loop]
        return float(np.linalg.norm(p - np.roll(p, -1, axis=0), axis=1).sum())

    rest = sorted(loops, key=perimeter, reverse=True)
    out = {"neck": rest.pop(0)}
    for side, rows in eyes.items():
        centre = template[rows].mean(axis=0)
        radius = float(np.linalg.norm(template[rows] - centre, axis=1).max())
        if not rest:
            break
        gaps = [float(np.linalg.norm(template[loop].mean(axis=0) - centre)) for loop in rest]
        k = int(np.argmin(gaps))
        if gaps[k] < 2.0 * radius:
            out[side] = rest.pop(k)
    width = float(np.ptp(template[np.unique(skin_faces), 0]))
    mid = 0.5 * (template[np.unique(skin_faces), 0].min() + template[np.unique(skin_faces), 0].max())
    central = [loop for loop in rest if abs(float(template[loop, 0].mean()) - mid) < 0.1 * width]
    if central:
        out["mouth"] = min(central, key=lambda loop: float(template[loop, 1].mean()))
    return out


# ----------------------------------------------------------------------------
# UVs
# ----------------------------------------------------------------------------
def read_texture_space(path: Path, num_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """``vt`` (T, 2) and ``ft`` (F, 3) of FLAME's texture space file, checked against a mesh of
    ``num_faces`` triangles (no pickle is read)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "vt" not in data.files or "ft" not in data.files:
                raise PriorError(f"{path} holds no 'vt' and 'ft' (FLAME's texture coordinates and their faces); "
                                 f"found {sorted(data.files)}: replace it with FLAME's {TEXTURE_FILE} or remove it")
            vt = np.asarray(data["vt"], dtype=np.float64)
            ft = np.asarray(data["ft"])
    except PriorError:
        raise
    except Exception as exc:  # not a zip, a cut file, object arrays (refused: no pickle)
        raise PriorError(f"{path} is not a readable .npz texture space ({type(exc).__name__}); replace it with "
                         f"FLAME's {TEXTURE_FILE} or remove it to use a generated layout") from None
    if (vt.ndim != 2 or vt.shape[1] != 2 or not np.isfinite(vt).all() or ft.shape != (num_faces, 3)
            or not np.issubdtype(ft.dtype, np.integer) or ft.min() < 0 or ft.max() >= len(vt)):
        raise PriorError(f"{path}: vt {vt.shape} / ft {ft.shape} do not fit this FLAME model's {num_faces} faces; "
                         f"use the {TEXTURE_FILE} of the same FLAME version or remove it to use a generated layout")
    return vt, ft.astype(np.int64)


def _layout_cache_path(faces: np.ndarray, num_vertices: int) -> Path:
    from avatar.paths import cache_dir

    digest = hashlib.sha256(np.ascontiguousarray(faces, dtype=np.int64).tobytes()
                            + f"/{num_vertices}".encode()).hexdigest()[:16]
    return cache_dir("prior") / f"flame-uv-{digest}-v{UV_LAYOUT_VERSION}-{UV_LAYOUT_SIZE}.npz"


def generated_corner_uvs(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3, 2) glTF UVs of each corner of ``faces`` over ``vertices``: the skin's charts
    (:func:`avatar.export.texture.unwrap_uv`, the export's own layout), in the faces' order."""
    from avatar.export.texture import unwrap_uv  # the one chart layout of the project

    atlas = unwrap_uv(vertices, faces, UV_LAYOUT_SIZE)
    source = atlas.vmapping[atlas.faces]  # (F, 3) the faces' vertices, in the atlas's order
    where = {tuple(f): k for k, f in enumerate(np.asarray(faces).tolist())}
    order = np.array([where[tuple(f)] for f in source.tolist()], dtype=np.int64)
    corner = np.zeros((len(faces), 3, 2))
    corner[order] = atlas.uvs[atlas.faces]
    return corner


def skin_corner_uvs(vertices: np.ndarray, faces: np.ndarray, use_cache: bool = True) -> tuple[np.ndarray, str]:
    """The generated layout of the skin, made once per triangle list and cached.

    vertices: (V, 3) the skin's; faces: (F, 3) over them. Returns (F, 3, 2) corner UVs and the
    cache file's path.
    """
    from avatar.prior.anny_head import cached_arrays

    path = _layout_cache_path(faces, len(vertices))
    arrays = cached_arrays(path, lambda: {"corner_uvs": generated_corner_uvs(vertices, faces).astype(np.float32)},
                           "the FLAME skin's UV layout", use_cache)
    corner = np.asarray(arrays["corner_uvs"], dtype=np.float64)
    if corner.shape != (len(faces), 3, 2):
        raise PriorError(f"the cached FLAME UV layout {path} does not fit the skin's {len(faces)} faces: delete it")
    return corner, str(path)


def eye_corner_uvs(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3, 2) glTF UVs of an eyeball's corners in the eye texture (:func:`eye_texture_path`).

    FLAME's eyeballs look down +Z. A face whose centre is in front of the eyeball's centre
    maps into the left disk (centre (0.25, 0.5), radius 0.25), azimuthally about +Z: the
    distance from the disk's centre is the angle from the gaze axis (:data:`EYE_UV_RADIUS_DEG`
    at the rim), seen from the front (u to +X, v down). A face behind maps the same way about
    -Z into the right disk, seen from behind. No chart wraps round a pole, so no triangle
    spans its disk; the equator is a seam.
    """
    centre = vertices.mean(axis=0)
    d = vertices[faces] - centre  # (F, 3, 3)
    front = d.mean(axis=1)[:, 2] >= 0.0
    axis = np.where(front, 1.0, -1.0)[:, None]
    cos = np.clip(d[..., 2] * axis / np.linalg.norm(d, axis=-1).clip(min=1e-12), -1.0, 1.0)
    rho = 0.25 * np.degrees(np.arccos(cos)) / EYE_UV_RADIUS_DEG
    planar = np.linalg.norm(d[..., :2], axis=-1).clip(min=1e-12)
    u_dir, v_dir = d[..., 0] / planar * axis, -d[..., 1] / planar
    u0 = np.where(front, 0.25, 0.75)[:, None]
    return np.stack([u0 + rho * u_dir, 0.5 + rho * v_dir], axis=-1)


def draw_eye_texture(size: int = EYE_TEXTURE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 sRGB: pupil, iris and sclera by angle from the gaze axis in the
    left disk of :func:`eye_corner_uvs`, sclera elsewhere (anny's eye, :mod:`avatar.prior.anny_export`)."""
    centre = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(centre, centre)
    angle = np.hypot(u - 0.25, v - 0.5) / 0.25 * EYE_UV_RADIUS_DEG
    angle = np.where(u < 0.5, angle, 180.0)  # the back disk: sclera
    colour = eye_colour(angle, _srgb(_SCLERA), _srgb(_IRIS_MINOR), _srgb(_IRIS_MAJOR), _srgb(_PUPIL))
    return (np.clip(colour, 0, 1) * 255).round().astype(np.uint8)


def eye_texture_path(size: int = EYE_TEXTURE_SIZE) -> Path:
    """The procedural eye texture (PNG), drawn once into the user's cache."""
    from PIL import Image

    from avatar.paths import cache_dir

    path = cache_dir("prior") / f"flame-eyes-v{EYE_TEXTURE_VERSION}-{size}.png"
    if not path.exists():
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
        Image.fromarray(draw_eye_texture(size)).save(tmp)
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
class FlameExportHead(HeadModel):
    """The FLAME head with eye parts, UVs and the export's joint names (see the module docstring).

    The interface of :class:`avatar.prior.anny_export.ExportHead` (what
    :func:`avatar.export.prior_export.build_prior_export` uses), for FLAME.

    Attributes:
        parts: name -> :class:`~avatar.prior.anny_export.ExportPart` (``skin``, and
            ``left_eye`` / ``right_eye`` when FLAME has eyeballs).
        prior_index: (V,) int64 FLAME vertex of each row.
        prior_vertex_count: rows shared with the FLAME prior: all of them.
        morph_names: the expressions a GLB carries as morph targets (``exp_NN``; the jaw is a joint).
        visemes: empty (FLAME has no ARKit names to combine).
        lining: (V,) bool, rows on the rims of the mouth and the eye openings.
        openings: rim name (``neck``, ``mouth``, ``left_eye``, ``right_eye``) -> (n,) rows in order.
        uv_source: ``texture file`` (FLAME's :data:`TEXTURE_FILE`) or ``generated`` (cached layout).
    """

    def __init__(self, *, parts: dict[str, ExportPart], prior_index: np.ndarray, lining: np.ndarray,
                 openings: dict[str, np.ndarray], uv_source: str, **kwargs: Any) -> None:
        self.parts = parts
        self.prior_index = np.asarray(prior_index, dtype=np.int64)
        self.prior_vertex_count = len(self.prior_index)
        self.lining = np.asarray(lining, dtype=bool)
        self.openings = openings
        self.uv_source = uv_source
        self.visemes: dict[str, dict[str, float]] = {}
        super().__init__(**kwargs)
        self.morph_names = list(self.expression_names[: self.expression_dirs.shape[0]])

    def vertices(self, shape: Any = None, expression: Any = None) -> torch.Tensor:
        """(B, V, 3) vertices for shape and expression with no other pose (the jaw controls turn
        the jaw joint, as in :meth:`forward`); differentiable in both."""
        return self.forward(shape=shape, expression=expression).vertices

    def viseme_weights(self, name: str) -> torch.Tensor:
        raise PriorError(f"the FLAME export head has no viseme {name!r}: FLAME has no ARKit-named expressions to "
                         "build visemes from; export with the anny prior (--prior anny) for visemes")

    def texture_paths(self) -> dict[str, Path | None]:
        """Texture files: the procedural eye map (None without eyes); FLAME has no mouth
        interior, so no inside-mouth mask and no mouth texture."""
        eyes = eye_texture_path() if any(p.material == "eyes" for p in self.parts.values()) else None
        return {"inside_mouth_mask": None, "eyes": eyes, "mouth": None}

    def part_faces(self, name: str) -> torch.Tensor:
        """(F, 3) int64 triangles of one part over the model's rows (unsplit)."""
        part = self.parts[name]
        return torch.as_tensor(part.model_index[part.faces], device=self.faces.device)

    def expression_quality(self, names: list[str] | None = None, part: str = "skin") -> dict[str, dict[str, float]]:
        """Per expression at weight 1 (default :attr:`morph_names`) on the neutral head: flipped
        triangles and edge stretch, as :meth:`avatar.prior.anny_export.ExportHead.expression_quality`
        measures them (``flipped_visible``: not wholly on :attr:`lining`); jaw controls through
        :meth:`forward` (1 radian)."""
        names = list(self.morph_names) if names is None else names
        unknown = [n for n in names if n not in self.expression_names]
        if unknown:
            raise PriorError(f"unknown FLAME expression(s) {unknown}; expected names from {self.expression_names}")
        from avatar.prior.anny_export import deformation_quality

        with torch.no_grad():
            rest = self.forward().vertices[0].double()
            rows = torch.eye(self.num_expression, dtype=self.dtype, device=self.device)[
                [self.expression_names.index(n) for n in names]]
            moved_all = self.forward(expression=rows).vertices.double() if names else rest[None][:0]
        return deformation_quality(self.part_faces(part), self.lining, rest, dict(zip(names, moved_all)))

    def exposed_eyeball_vertices(self, vertices: torch.Tensor | np.ndarray, side: str) -> np.ndarray:
        """Eyeball vertices no skin triangle covers along +Z (see
        :meth:`avatar.prior.anny_export.ExportHead.exposed_eyeball_vertices`, the same test)."""
        from avatar.prior.anny_export import ExportHead

        if f"{side}_eye" not in self.parts:
            raise PriorError(f"this FLAME model has no {side} eyeball (no closed component skinned to {side}_eye)")
        return ExportHead.exposed_eyeball_vertices(self, vertices, side)  # duck-typed: parts and part_faces

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["parts"] = {n: {"material": p.material, "vertices": p.num_vertices, "split_vertices": len(p.vertex_map),
                            "faces": len(p.faces), "rigid_joint": p.rigid_joint} for n, p in self.parts.items()}
        out["morph_names"] = list(self.morph_names)
        out["visemes"] = []
        out["uv_source"] = self.uv_source
        return out


def _part(name: str, material: str, faces_local: np.ndarray, corner_uv: np.ndarray, offset: int, count: int,
          rigid_joint: str | None) -> ExportPart:
    faces_split, vmap, uvs = split_at_seams(faces_local, corner_uv, count)
    return ExportPart(name=name, material=material, faces=faces_split, vertex_map=vmap, model_index=offset + vmap,
                      uvs=uvs, atlas_uvs=uvs.copy(), offset=offset, num_vertices=count, rigid_joint=rigid_joint,
                      optional=False)


def flame_export_head_from_prior(prior: HeadModel, folder: Path | str | None = None,
                                 use_cache: bool = True) -> FlameExportHead:
    """The :class:`FlameExportHead` of a loaded FLAME prior (``load_flame(folder)``).

    Args:
        prior: the FLAME :class:`~avatar.prior.head_model.HeadModel`, on the CPU.
        folder: where :data:`TEXTURE_FILE` is looked for (default: the prior's own folder,
            ``prior.info["folder"]``; no texture file when neither is known).
        use_cache: read the generated skin layout from the cache (False: make it again).

    Raises:
        PriorError: the model is not FLAME's five-joint kind, has vertices in no triangle,
            or its texture space file does not fit it (the message names the file and the fix).
    """
    if prior.joint_names != list(FLAME_TO_EXPORT_JOINT):
        raise PriorError(f"the FLAME export head needs FLAME's joints {list(FLAME_TO_EXPORT_JOINT)}, this model has "
                         f"{prior.joint_names}: use FLAME 2020 or 2023 files from https://flame.is.tue.mpg.de")
    faces = prior.faces.cpu().numpy()
    weights = prior.skin_weights.detach().cpu().double().numpy()
    n_vert = prior.num_vertices
    used = np.zeros(n_vert, dtype=bool)
    used[faces.reshape(-1)] = True
    if not used.all():
        raise PriorError(f"the FLAME model has {int((~used).sum())} vertices in no triangle: it is no FLAME mesh; "
                         "replace it with the files from https://flame.is.tue.mpg.de")
    eyes = find_eyeballs(faces, weights, prior.joint_names)
    in_eye = np.zeros(n_vert, dtype=bool)
    for rows in eyes.values():
        in_eye[rows] = True
    order = [np.flatnonzero(~in_eye)] + [eyes[side] for side in ("left_eye", "right_eye") if side in eyes]
    prior_index = np.concatenate(order)
    row_of = np.empty(n_vert, dtype=np.int64)
    row_of[prior_index] = np.arange(n_vert)
    model_faces = row_of[faces]
    template = prior.template.detach().cpu().double().numpy()[prior_index]

    folder = prior.info.get("folder") if folder is None else folder
    texture_file = Path(folder).expanduser() / TEXTURE_FILE if folder is not None else None
    corner_all = None
    if texture_file is not None and texture_file.is_file():
        vt, ft = read_texture_space(texture_file, len(faces))
        corner_all = np.stack([vt[:, 0], 1.0 - vt[:, 1]], axis=1)[ft]  # OBJ's v up -> glTF's v down
    parts: dict[str, ExportPart] = {}
    offset = 0
    info_uv = ""
    for name, rows in zip(["skin"] + [s for s in ("left_eye", "right_eye") if s in eyes], order):
        count = len(rows)
        member = np.zeros(n_vert, dtype=bool)
        member[offset:offset + count] = True
        face_ids = np.flatnonzero(member[model_faces].all(axis=1))
        local = model_faces[face_ids] - offset
        if name == "skin":
            if corner_all is not None:
                corner, info_uv = corner_all[face_ids], str(texture_file)
            else:
                corner, info_uv = skin_corner_uvs(template[offset:offset + count], local, use_cache)
            parts[name] = _part(name, "skin", local, corner, offset, count, None)
        else:
            corner = eye_corner_uvs(template[offset:offset + count], local)
            parts[name] = _part(name, "eyes", local, corner, offset, count, name)
        offset += count

    skin_faces = parts["skin"].model_index[parts["skin"].faces]
    eye_rows = {s: np.arange(parts[s].offset, parts[s].offset + parts[s].num_vertices) for s in eyes}
    openings = find_openings(template, skin_faces, eye_rows)
    lining = np.zeros(n_vert, dtype=bool)
    for rim, ring in openings.items():
        if rim != "neck":
            lining[ring] = True

    def rows_t(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor.detach().cpu().index_select(dim, torch.as_tensor(prior_index))

    posedirs = None
    if prior.posedirs is not None:
        p = prior.posedirs.detach().cpu()
        posedirs = rows_t(p.reshape(p.shape[0], n_vert, 3), 1).reshape(p.shape[0], 3 * n_vert)
    info = {**prior.info,
            "source": f"{prior.info.get('source', 'FLAME')}, export head (skin"
                      + "".join(f", {s}" for s in eyes) + ")",
            "uv_source": info_uv,
            "joints": FLAME_TO_EXPORT_JOINT,
            "morph_targets": "exp_NN (FLAME's expression components); the jaw is the 'jaw' joint",
            "openings": {k: len(v) for k, v in openings.items()}}
    return FlameExportHead(
        parts=parts, prior_index=prior_index, lining=lining, openings=openings,
        uv_source="texture file" if corner_all is not None else "generated",
        name="flame-export",
        template=rows_t(prior.template, 0),
        faces=torch.as_tensor(model_faces),
        cap_faces=torch.as_tensor(row_of[prior.cap_faces.cpu().numpy()].reshape(-1, 3)),
        shape_dirs=rows_t(prior.shape_dirs, 1),
        shape_joint_dirs=prior.shape_joint_dirs.detach().cpu(),
        shape_names=prior.shape_names,
        shape_defaults=prior.shape_defaults.detach().cpu(),
        expression_dirs=rows_t(prior.expression_dirs, 1),
        expression_joint_dirs=prior.expression_joint_dirs.detach().cpu(),
        expression_names=prior.expression_names,
        joint_template=prior.joint_template.detach().cpu(),
        joint_names=JOINT_NAMES,
        parents=prior.parents,
        skin_weights=rows_t(prior.skin_weights, 0),
        landmark_vertices=torch.as_tensor(row_of[prior.landmark_vertices.cpu().numpy()]),
        landmark_weights=prior.landmark_weights.detach().cpu(),
        landmark_contours=prior.landmark_contours,
        posedirs=posedirs,
        expression_pose=None if prior.expression_pose is None else prior.expression_pose.detach().cpu(),
        info=info,
    )


def load_flame_export_head(folder: Path | str, use_cache: bool = True,
                           dtype: torch.dtype = torch.float32) -> FlameExportHead:
    """The FLAME export head from a folder of FLAME's files (those :func:`~avatar.prior.flame.load_flame`
    reads, plus :data:`TEXTURE_FILE` when there), in the FLAME prior's frame.

    Raises:
        PriorError: a missing or wrong FLAME file (one line naming it and the fix).
    """
    from avatar.prior.flame import load_flame

    return flame_export_head_from_prior(load_flame(folder, dtype=dtype), folder, use_cache=use_cache)


__all__ = ["FlameExportHead", "JOINT_NAMES", "MATERIALS", "PART_NAMES", "TEXTURE_FILE", "find_eyeballs",
           "find_openings", "flame_export_head_from_prior", "load_flame_export_head"]
