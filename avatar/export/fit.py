"""Fit the prior's own head mesh to a generated surface, and split off what it cannot follow.

A generated head stays registered to the prior (its SDF started from the prior's, every
view was steered by the prior's landmarks), so the prior's template fits it in two stages
(the non-rigid ICP of Amberg et al. 2007, "Optimal step nonrigid ICP algorithms for
surface registration", with a Laplacian instead of their per-edge stiffness):

1. **Shape**: the prior's shape coefficients (and, optionally, a similarity transform:
   scale, rotation, translation about the template's centre) minimise a robust two-sided
   point-to-surface distance between samples of the template's skin and of the target,
   plus an L2 prior on the coefficients. Closest points are recomputed each outer step
   (ICP); between them L-BFGS minimises with the correspondences fixed, over variables
   scaled to the millimetres they move the head. The distance is point-to-plane both
   ways (plus a little point-to-point from the target), robustified with Geman-McClure
   at a scale shrinking from ``shape_sigma[0]`` to ``shape_sigma[1]``, and smaller
   (``outside_sigma``) where the target lies outside the template: the target is the
   skin plus what covers it, so what lies outside is rather a hat than skin.
2. **Offsets**: per-vertex offsets of the skin (``skin_mask``) minimise the same data
   term plus ``smoothness`` times the squared uniform Laplacian of the offsets: a sparse
   linear least-squares problem solved exactly at each step (iteratively reweighted for
   the robust kernel), the smoothness relaxed over the steps, and nothing farther than
   ``accessory_threshold`` pulling at all. Offsets stay small and smooth, so every
   vertex keeps its role and every blendshape of the prior stays valid. Vertices outside
   the skin (eyeballs, teeth, tongue) get no offset: they follow the fitted shape,
   rigid relative to the head.
3. **Accessories**: target faces farther than ``accessory_threshold`` from the fitted
   template (hair, a hat, a beard) become a separate mesh: the connected components
   of those faces, islands under ``min_accessory_area`` dropped.

A pair of closest points is no correspondence when their normals differ by more than
``max_normal_angle``, when it lands on an open edge (the template's neck cut, a hole in
the target) or on ``closing_faces`` (the template's neck cap, against the target's
closed neck), or when another part of the template is much nearer to the target point
(ICP's reciprocity test: skin inside the mouth or behind the eyeballs, which a
generated surface seals over, is hidden, not missing).

All geometry in one frame and unit (the project frame, metres). The fit runs on the
CPU (KD-trees); the template's shape function may live on any device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avatar.errors import AvatarError


class FitError(AvatarError, ValueError):
    """The fit was given inputs it cannot use (sizes, indices, NaNs); the message names which."""


@dataclass
class Similarity:
    """``x -> scale * rotation @ (x - centre) + centre + translation`` (metres).

    Apply it to anything defined on the template (joints, blendshape displacements with
    ``linear=True``) to carry it onto the fitted head.
    """

    scale: float
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)
    centre: np.ndarray  # (3,)

    def apply(self, points: np.ndarray, linear: bool = False) -> np.ndarray:
        """(..., 3) points (or, with ``linear``, displacements) -> the same in the target's frame."""
        points = np.asarray(points, dtype=np.float64)
        if linear:
            return self.scale * points @ self.rotation.T
        return self.scale * (points - self.centre) @ self.rotation.T + self.centre + self.translation


@dataclass
class Accessory:
    """The part of the target the fitted template does not cover.

    vertices: (N, 3) float64, faces: (F, 3) int64 (re-indexed), face_index: (F,) the
    faces' indices into the target's faces, distance: (N,) each vertex's distance to
    the fitted template in metres.
    """

    vertices: np.ndarray
    faces: np.ndarray
    face_index: np.ndarray
    distance: np.ndarray


@dataclass
class FitResult:
    """The fitted template.

    shape: (S,) fitted shape coefficients (the dtype and device of ``shape_init``).
    similarity: the fitted similarity transform, or None when not fitted.
    offsets: (V, 3) float64 per-vertex offsets in metres, zero outside the skin.
    vertices: (V, 3) float64 ``similarity(vertices_of_shape(shape)) + offsets``.
    accessory: what the template does not cover, or None.
    report: figures (distances in millimetres, times in seconds), JSON-ready:
        ``chamfer_mm`` (mean of the two ways), ``to_target_mm`` (template skin -> target),
        ``to_template_mm`` (target -> template skin), ``p95_mm`` and ``max_mm`` (both
        ways pooled), all over the skin region (see :func:`surface_distances`), and
        ``hidden_skin`` (fraction of the template's skin the target seals over); per stage
        (``shape``, ``offsets``): ``iterations`` (ICP steps), ``seconds``, the same
        distances after it (``shape``: also ``evaluations``; ``offsets``: mean and max
        offset); ``accessory``: faces, components, area, dropped islands, distances;
        ``similarity``: scale, rotation in degrees, translation in mm (when fitted).
    """

    shape: torch.Tensor
    similarity: Similarity | None
    offsets: np.ndarray
    vertices: np.ndarray
    accessory: Accessory | None
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Geometry helpers.


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) unit normals (counter-clockwise = outward); zero for degenerate faces."""
    tri = vertices[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return np.where(length > 0, n / np.maximum(length, 1e-300), 0.0)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform by area: face index (count,) and barycentric weights (count, 3)."""
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = area.sum()
    if not total > 0:
        raise FitError("the surface to sample has zero area")
    face = rng.choice(len(faces), size=count, p=area / total)
    r1, r2 = np.sqrt(rng.random(count)), rng.random(count)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    return face, bary


def uniform_laplacian(faces: np.ndarray, num_vertices: int):
    """(V, V) sparse ``L = I - D^-1 A`` over the mesh edges (an edge counts once)."""
    from scipy.sparse import coo_matrix, diags, identity

    i = faces[:, [0, 1, 2, 1, 2, 0]].reshape(-1)
    j = faces[:, [1, 2, 0, 0, 1, 2]].reshape(-1)
    adj = coo_matrix((np.ones(len(i)), (i, j)), shape=(num_vertices, num_vertices)).tocsr()
    adj.data[:] = 1.0
    degree = np.asarray(adj.sum(axis=1)).reshape(-1)
    return (identity(num_vertices, format="csr") - diags(1.0 / np.maximum(degree, 1.0)) @ adj).tocsr()


class SurfaceProximity:
    """Closest points on a fixed triangle mesh, for many queries.

    Candidate triangles are those owning the ``k`` nearest of a set of surface samples
    (a KD-tree built once): every triangle's centroid plus, for triangles larger than the
    median, extra samples keeping their spacing near the median triangle's size (as
    :func:`avatar.export.rig.closest_points` does); the exact closest point is then
    computed on each candidate (Ericson's test). ``boundary`` marks where the closest
    point lies on an open edge of the mesh (the neck's cut), which is no correspondence.
    """

    CHUNK = 65536

    def __init__(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        from scipy.spatial import cKDTree

        self.vertices = np.asarray(vertices, dtype=np.float64)
        self.faces = np.asarray(faces, dtype=np.int64)
        tri = self.vertices[self.faces]
        area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        extra = np.minimum(np.ceil(area / max(float(np.median(area)), 1e-20)).astype(np.int64) - 1, 4096)
        rng = np.random.default_rng(0)
        self.owner = np.concatenate([np.arange(len(self.faces)), np.repeat(np.arange(len(self.faces)), extra)])
        r1, r2 = np.sqrt(rng.random(int(extra.sum()))), rng.random(int(extra.sum()))
        bary = np.concatenate([np.full((len(self.faces), 3), 1.0 / 3.0),
                               np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)])
        self.tree = cKDTree(np.einsum("nk,nkc->nc", bary, tri[self.owner]))
        self.on_boundary = np.zeros(len(self.vertices), bool)
        edges = np.sort(self.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        unique, count = np.unique(edges, axis=0, return_counts=True)
        self.on_boundary[unique[count == 1].reshape(-1)] = True

    def closest(self, points: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Face (N,), barycentric weights (N, 3), distance (N,) and an open-boundary flag (N,)
        of the closest point of the mesh to each of ``points`` (N, 3)."""
        from avatar.export.rig import closest_point_on_triangles

        points = np.asarray(points, dtype=np.float64)
        if len(points) > self.CHUNK:
            parts = [self.closest(points[i:i + self.CHUNK], k) for i in range(0, len(points), self.CHUNK)]
            return tuple(np.concatenate(arrays) for arrays in zip(*parts))  # type: ignore[return-value]
        k = max(1, min(k, self.tree.n))
        _, near = self.tree.query(points, k=k)
        cand = self.owner[near.reshape(len(points), -1)]
        tris = torch.as_tensor(self.vertices)[torch.as_tensor(self.faces[cand])]  # (N, k, 3, 3)
        p = torch.as_tensor(points)[:, None, :].expand(-1, cand.shape[1], -1)
        q, b = closest_point_on_triangles(p, tris[:, :, 0], tris[:, :, 1], tris[:, :, 2])
        d = (q - p).norm(dim=-1)
        best = d.argmin(dim=1)
        rows = torch.arange(len(points))
        face = cand[np.arange(len(points)), best.numpy()]
        bary = b[rows, best].numpy()
        # On an open edge when every corner the point depends on is a boundary vertex.
        boundary = (self.on_boundary[self.faces[face]] | (bary < 1e-9)).all(axis=1)
        return face, bary, d[rows, best].numpy(), boundary


def _geman_mcclure_weight(residual: np.ndarray, sigma: float) -> np.ndarray:
    """IRLS weight of Geman-McClure ``rho(r) = r^2 s^2 / (r^2 + s^2)``: ``rho'(r) / (2 r)``."""
    return 1.0 / (1.0 + (residual / sigma) ** 2) ** 2


def _geman_mcclure(squared: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    s2 = sigma * sigma
    return squared * s2 / (squared + s2)


def _axis_angle_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, differentiable at zero (a series for tiny angles)."""
    theta2 = (rotvec * rotvec).sum()
    theta = torch.sqrt(theta2 + 1e-30)
    small = theta2 < 1e-12
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / (theta2 + 1e-30))
    x, y, z = rotvec
    zero = torch.zeros_like(x)
    k = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    return torch.eye(3, dtype=rotvec.dtype, device=rotvec.device) + a * k + b * (k @ k)


# ---------------------------------------------------------------------------
# The distances we report.


def surface_distances(template_vertices: np.ndarray, faces: np.ndarray, skin_faces: np.ndarray,
                      target: SurfaceProximity, target_keep: np.ndarray | None, samples: int,
                      rng: np.random.Generator, closing: np.ndarray | None = None) -> dict[str, float]:
    """Two-sided distances (mm) between a template's skin and a target, over the skin region.

    Template side: samples on ``faces[skin_faces]``, measured to the target, kept where the
    closest target point is on a face in ``target_keep`` (F_t,) bool (default all), not
    on an open edge of the target (a hole: no surface there to compare with) and not
    claimed by another part of the template (hidden skin: inside the closed mouth, behind
    the eyeballs; its fraction is ``hidden_skin``). Target side:
    samples on the kept target faces, measured to the whole template, kept where the
    closest template point is on a skin face, not on an open edge and not on the
    ``closing`` triangles (C, 3) (the target's neck cap has no counterpart on the skin).
    Returns ``chamfer_mm`` (mean of the two means), ``to_target_mm``, ``to_template_mm``,
    ``p95_mm`` and ``max_mm`` (both ways pooled).
    """
    keep_t = np.ones(len(target.faces), bool) if target_keep is None else target_keep
    closing = np.zeros((0, 3), np.int64) if closing is None else closing
    template = SurfaceProximity(template_vertices, np.concatenate([faces, closing]))
    face, bary = sample_surface(template_vertices, faces[skin_faces], samples, rng)
    points = np.einsum("nk,nkc->nc", bary, template_vertices[faces[skin_faces][face]])
    tf, tb, d1, open_edge = target.closest(points, k=8)
    q = np.einsum("nk,nkc->nc", tb, target.vertices[target.faces[tf]])
    visible = ~_claimed_elsewhere(template, points, q)
    d1 = d1[keep_t[tf] & ~open_edge & visible]
    d2 = np.zeros(0)
    if keep_t.any():
        face2, bary2 = sample_surface(target.vertices, target.faces[keep_t], samples, rng)
        points2 = np.einsum("nk,nkc->nc", bary2, target.vertices[target.faces[keep_t][face2]])
        is_skin = np.zeros(len(faces) + len(closing), bool)
        is_skin[skin_faces] = True
        f2, _, d2, boundary = template.closest(points2, k=8)
        d2 = d2[is_skin[f2] & ~boundary]
    both = np.concatenate([d1, d2]) * 1000.0
    m1 = float(d1.mean() * 1000.0) if len(d1) else float("nan")
    m2 = float(d2.mean() * 1000.0) if len(d2) else float("nan")
    return {
        "hidden_skin": round(float(1.0 - visible.mean()), 4),
        "chamfer_mm": round(0.5 * (m1 + m2), 4),
        "to_target_mm": round(m1, 4),
        "to_template_mm": round(m2, 4),
        "p95_mm": round(float(np.percentile(both, 95)), 4) if len(both) else float("nan"),
        "max_mm": round(float(both.max()), 4) if len(both) else float("nan"),
    }


# ---------------------------------------------------------------------------
# The fit.


@dataclass
class _Problem:
    """Validated inputs shared by the stages (numpy float64 unless said)."""

    faces: np.ndarray  # (F, 3) template triangles
    closing: np.ndarray  # (C, 3) triangles closing the template's holes (no data on them)
    skin: np.ndarray  # (V,) bool
    skin_faces: np.ndarray  # indices of faces with all three vertices on the skin
    target: SurfaceProximity
    target_normals: np.ndarray  # (F_t, 3)
    template_face: np.ndarray  # template samples: skin-face index, barycentric
    template_bary: np.ndarray
    target_points: np.ndarray  # target samples and their normals
    target_point_normals: np.ndarray
    min_normal_dot: float
    candidates: int  # candidate triangles per closest-point query


def _claimed_elsewhere(template: SurfaceProximity, points: np.ndarray, closest: np.ndarray) -> np.ndarray:
    """(N,) True where the target point ``closest`` to a template point ``points`` lies at
    under half that distance from some other part of the template: the skin inside the
    mouth against closed lips, the socket behind an eyeball, the inside of an ear fold.
    Such a template point is hidden in the target, and has nothing to match (the
    reciprocal-correspondence test of ICP)."""
    gap = np.linalg.norm(points - closest, axis=1)
    _, _, back, _ = template.closest(closest, k=4)
    return back < 0.5 * gap - 1e-4


def _correspondences(problem: _Problem, vertices: np.ndarray) -> dict[str, np.ndarray]:
    """Closest points both ways for the template ``vertices`` (V, 3), with normal, open-edge,
    closing-face and reciprocity checks (``ok1``, ``ok2``)."""
    faces = problem.faces
    skin_tris = faces[problem.skin_faces][problem.template_face]  # (N1, 3)
    points = np.einsum("nk,nkc->nc", problem.template_bary, vertices[skin_tris])
    normals = face_normals(vertices, faces)
    template = SurfaceProximity(vertices, np.concatenate([faces, problem.closing]))
    target = problem.target
    tf, tb, _, open_edge = target.closest(points, k=problem.candidates)
    q = np.einsum("nk,nkc->nc", tb, target.vertices[target.faces[tf]])
    n = problem.target_normals[tf]
    ok1 = ((n * normals[problem.skin_faces][problem.template_face]).sum(1) > problem.min_normal_dot) & ~open_edge
    ok1 &= ~_claimed_elsewhere(template, points, q)
    f2, b2, _, boundary = template.closest(problem.target_points, k=problem.candidates)
    closing = f2 >= len(faces)
    f2 = np.where(closing, 0, f2)
    n2 = normals[f2]
    ok2 = ((n2 * problem.target_point_normals).sum(1) > problem.min_normal_dot) & ~boundary & ~closing
    return {"tris1": skin_tris, "bary1": problem.template_bary, "q1": q, "n1": n, "ok1": ok1,
            "tris2": faces[f2], "bary2": b2, "n2": n2, "ok2": ok2}


def _data_energy(x: torch.Tensor, corr: dict[str, torch.Tensor], target_points: torch.Tensor,
                 sigma: float, sigma_outside: float, point_weight: float) -> torch.Tensor:
    """Robust two-sided distance of template vertices ``x`` (V, 3) for fixed correspondences,
    in mm^2 (so that tolerances and prior weights read in millimetres): Geman-McClure of the
    point-to-plane distances, template -> target on the target's plane and target ->
    template on the template's (its normal held from the last correspondence step), plus
    ``point_weight`` times that of the point-to-point distance target -> template; each
    a mean over its samples (rejected pairs count zero). Point-to-plane converges in far
    fewer ICP steps than point-to-point (Rusinkiewicz & Levoy 2001, "Efficient variants
    of the ICP algorithm").

    Where the target lies outside the template the scale is ``sigma_outside``: the target
    is the skin plus what covers it (hair, a hat), so target surface beyond the template
    is more likely an accessory than skin the template has yet to reach."""
    p1 = (x[corr["tris1"]] * corr["bary1"][..., None]).sum(1)
    r1 = ((p1 - corr["q1"]) * corr["n1"]).sum(1) * 1e3  # > 0: the template is outside the target
    s1 = torch.where(r1 >= 0, sigma, sigma_outside) * 1e3
    p2 = (x[corr["tris2"]] * corr["bary2"][..., None]).sum(1)
    d2 = (target_points - p2) * 1e3
    r2 = (d2 * corr["n2"]).sum(1)  # > 0: the target is outside the template
    s2 = torch.where(r2 > 0, sigma_outside, sigma) * 1e3
    e1 = (corr["ok1"] * _geman_mcclure(r1.square(), s1)).sum() / r1.shape[0]
    e2 = (corr["ok2"] * (_geman_mcclure(r2.square(), s2) + point_weight * _geman_mcclure(d2.square().sum(1), s2)))
    return e1 + e2.sum() / d2.shape[0]


def _sensitivity(vertices_of_shape: Callable[[torch.Tensor], torch.Tensor], shape: torch.Tensor,
                 step: float = 0.05) -> torch.Tensor:
    """(S,) RMS vertex displacement in mm per unit of each coefficient at ``shape``
    (central differences; 1 for a coefficient that moves nothing)."""
    sens = torch.ones(shape.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for k in range(shape.shape[0]):
            delta = torch.zeros_like(shape)
            delta[k] = step
            moved = (vertices_of_shape(shape + delta) - vertices_of_shape(shape - delta)).to(torch.float64)
            rms = float(moved.square().sum(dim=1).mean().sqrt()) * 1e3 / (2 * step)
            if rms > 1e-6:
                sens[k] = rms
    return sens


def _shape_stage(problem: _Problem, vertices_of_shape: Callable[[torch.Tensor], torch.Tensor],
                 shape_init: torch.Tensor, shape_prior: torch.Tensor, shape_bounds, similarity: bool,
                 similarity_prior: float, iterations: int, inner_iterations: int, sigmas: np.ndarray,
                 start: torch.Tensor, sigma_outside: float, point_weight: float
                 ) -> tuple[torch.Tensor, Similarity | None, np.ndarray, dict[str, Any]]:
    # Every variable is in millimetres of the displacement it causes (coefficients scaled by
    # their RMS effect, the similarity by the head's radius), so L-BFGS sees a well
    # conditioned problem and the priors read as "this many mm^2 per mm moved".
    dev = shape_init.device
    s0 = shape_init.detach().to(torch.float64)
    sens = _sensitivity(vertices_of_shape, shape_init).to(dev)
    start64 = start.detach().to(torch.float64)
    centre_np = start64.mean(dim=0).cpu().numpy()
    centre_t = start64.mean(dim=0)
    radius = float((start64 - centre_t).square().sum(dim=1).mean().sqrt()) * 1e3  # mm
    z = torch.zeros_like(s0, requires_grad=True)
    z_sim = torch.zeros(7, dtype=torch.float64, device=dev, requires_grad=True)  # scale, rotation, translation
    params = [z] + ([z_sim] if similarity else [])
    prior_w = shape_prior.to(device=dev, dtype=torch.float64)
    lo = hi = None
    if shape_bounds is not None:
        lo, hi = (torch.as_tensor(b, dtype=torch.float64, device=dev) for b in shape_bounds)

    def current_shape() -> torch.Tensor:
        s = s0 + z / sens
        return s if lo is None else torch.minimum(torch.maximum(s, lo), hi)

    def transform() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.exp(z_sim[0] / radius), _axis_angle_matrix(z_sim[1:4] / radius), z_sim[4:] * 1e-3

    def posed() -> torch.Tensor:
        x = vertices_of_shape(current_shape().to(shape_init.dtype)).to(torch.float64)
        if similarity:
            scale, rot, trans = transform()
            x = scale * (x - centre_t) @ rot.T + centre_t + trans
        return x

    evaluations = 0
    target_points = torch.as_tensor(problem.target_points, device=dev)
    state: dict[str, Any] = {}

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        state["optimizer"].zero_grad()
        energy = _data_energy(posed(), state["corr"], target_points, state["sigma"],
                              min(state["sigma"], sigma_outside), point_weight)
        energy = energy + (prior_w * z.square()).sum()
        if similarity:
            energy = energy + similarity_prior * z_sim.square().sum()
        energy.backward()
        return energy

    for step in range(iterations):
        with torch.no_grad():
            corr = _correspondences(problem, posed().cpu().numpy())
        state["corr"] = {k: torch.as_tensor(v, device=dev) for k, v in corr.items()}
        state["sigma"] = float(sigmas[step])
        state["optimizer"] = torch.optim.LBFGS(params, lr=1.0, max_iter=inner_iterations,
                                               line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                               tolerance_change=1e-14, history_size=20)
        state["optimizer"].step(closure)
    with torch.no_grad():
        final = posed().cpu().numpy()
        fitted_shape = current_shape().detach().to(dtype=shape_init.dtype)
    sim = None
    if similarity:
        with torch.no_grad():
            scale, rot, trans = transform()
        sim = Similarity(scale=float(scale), rotation=rot.cpu().numpy(), translation=trans.cpu().numpy().copy(),
                         centre=centre_np)
    return fitted_shape, sim, final, {"iterations": iterations, "evaluations": evaluations}


def _offset_stage(problem: _Problem, base: np.ndarray, smoothness: tuple[float, ...], steps_per_level: int,
                  sigma: float, cutoff: float, point_weight: float, damping: float
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    from scipy.sparse import diags
    from scipy.sparse.linalg import splu

    num_v = len(base)
    skin = problem.skin
    col = np.full(num_v, -1, dtype=np.int64)
    col[skin] = np.arange(int(skin.sum()))
    n_unknowns = 3 * int(skin.sum())
    lap = uniform_laplacian(problem.faces, num_v)[skin][:, skin]  # non-skin neighbours hold zero offsets
    lap3 = _kron3(lap)
    lap_normal = (lap3.T @ lap3) / max(int(skin.sum()), 1)
    offsets = np.zeros_like(base)
    steps = 0
    for level in smoothness:
        for _ in range(steps_per_level):
            steps += 1
            corr = _correspondences(problem, base + offsets)
            blocks, rhs, weights = [], [], []
            # Template -> target, point-to-plane on the target: n . (sum_i b_i (x_i + d_i) - q) = 0.
            p0 = np.einsum("nk,nkc->nc", corr["bary1"], base[corr["tris1"]])
            gap = p0 + np.einsum("nk,nkc->nc", corr["bary1"], offsets[corr["tris1"]]) - corr["q1"]
            r = (gap * corr["n1"]).sum(1)
            # Nothing farther than the accessory threshold is skin: no pull from a hat, however weak.
            near = np.linalg.norm(gap, axis=1) <= cutoff
            w = corr["ok1"] * near * _geman_mcclure_weight(r, sigma) / len(r)
            blocks.append(_plane_rows(corr["tris1"], corr["bary1"], corr["n1"], col, n_unknowns))
            rhs.append(((corr["q1"] - p0) * corr["n1"]).sum(1))
            weights.append(w)
            # Target -> template, point-to-plane on the template, plus a little point-to-point.
            p0 = np.einsum("nk,nkc->nc", corr["bary2"], base[corr["tris2"]])
            p_now = p0 + np.einsum("nk,nkc->nc", corr["bary2"], offsets[corr["tris2"]])
            r = np.linalg.norm(p_now - problem.target_points, axis=1)
            w = corr["ok2"] * (r <= cutoff) * _geman_mcclure_weight(r, sigma) / len(r)
            blocks.append(_plane_rows(corr["tris2"], corr["bary2"], corr["n2"], col, n_unknowns))
            rhs.append(((problem.target_points - p0) * corr["n2"]).sum(1))
            weights.append(w)
            for axis in range(3):
                unit = np.zeros((len(r), 3))
                unit[:, axis] = 1.0
                blocks.append(_plane_rows(corr["tris2"], corr["bary2"], unit, col, n_unknowns))
                rhs.append(problem.target_points[:, axis] - p0[:, axis])
                weights.append(point_weight * w)
            a = _vstack(blocks)
            wv = np.concatenate(weights)
            b = np.concatenate(rhs)
            aw = diags(wv) @ a
            normal = (a.T @ aw + level * lap_normal + damping / max(n_unknowns, 1)
                      * _identity(n_unknowns)).tocsc()
            # Symmetric positive definite: a symmetric ordering makes SuperLU several times faster.
            factor = splu(normal, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})
            solution = factor.solve(a.T @ (wv * b))
            offsets = np.zeros_like(base)
            offsets[skin] = solution.reshape(-1, 3)
    return offsets, {"iterations": steps}


def _kron3(matrix):
    """(n, n) sparse -> (3n, 3n) acting on interleaved xyz unknowns."""
    from scipy.sparse import identity, kron

    return kron(matrix, identity(3, format="csr"), format="csr")


def _identity(n: int):
    from scipy.sparse import identity

    return identity(n, format="csr")


def _vstack(blocks):
    from scipy.sparse import vstack

    return vstack(blocks, format="csr")


def _plane_rows(tris: np.ndarray, bary: np.ndarray, normals: np.ndarray, col: np.ndarray, n_unknowns: int):
    """Sparse rows ``sum_i b_i n . d_{tris_i}`` over the skin unknowns (non-skin corners drop out)."""
    from scipy.sparse import coo_matrix

    n = len(tris)
    rows = np.repeat(np.arange(n), 9)
    corner_col = col[tris]  # (n, 3)
    cols = (3 * corner_col[:, :, None] + np.arange(3)[None, None, :]).reshape(n, 9).reshape(-1)
    values = (bary[:, :, None] * normals[:, None, :]).reshape(-1)
    keep = np.repeat(corner_col >= 0, 3, axis=1).reshape(-1) & (values != 0)
    return coo_matrix((values[keep], (rows[keep], cols[keep])), shape=(n, n_unknowns)).tocsr()


def _accessory(vertices: np.ndarray, faces: np.ndarray, closing: np.ndarray, target: SurfaceProximity,
               threshold: float, min_area: float) -> tuple[Accessory | None, np.ndarray, dict[str, Any]]:
    """Target faces whose three corners lie over ``threshold`` from the fitted template (its
    ``faces`` and the ``closing`` triangles, so the target's closed neck is no accessory), in
    connected components of at least ``min_area`` (m^2). Returns the accessory (or None),
    the (F_t,) mask of its faces and a JSON-ready description."""
    from avatar.prior.geometry import connected_components

    target_vertices, target_faces = target.vertices, target.faces
    _, _, dist, _ = SurfaceProximity(vertices, np.concatenate([faces, closing])).closest(target_vertices, k=8)
    far = (dist[target_faces] > threshold).all(axis=1)
    mask = np.zeros(len(target_faces), bool)
    info: dict[str, Any] = {"threshold_mm": threshold * 1e3, "faces": 0, "components": 0, "area_cm2": 0.0,
                            "dropped_islands": 0}
    if not far.any():
        return None, mask, info
    idx = np.nonzero(far)[0]
    sub = target_faces[idx]
    labels = connected_components(sub, len(target_vertices))
    tri = target_vertices[sub]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    uniq, inverse = np.unique(labels, return_inverse=True)
    comp_area = np.bincount(inverse, weights=area)
    keep_comp = comp_area >= min_area
    info["dropped_islands"] = int((~keep_comp).sum())
    kept = keep_comp[inverse]
    if not kept.any():
        return None, mask, info
    face_index = idx[kept]
    mask[face_index] = True
    used, inverse_v = np.unique(target_faces[face_index].reshape(-1), return_inverse=True)
    accessory = Accessory(vertices=target_vertices[used].copy(), faces=inverse_v.reshape(-1, 3).astype(np.int64),
                          face_index=face_index, distance=dist[used])
    info.update(faces=int(len(face_index)), components=int(keep_comp.sum()),
                area_cm2=round(float(comp_area[keep_comp].sum()) * 1e4, 3),
                mean_distance_mm=round(float(accessory.distance.mean()) * 1e3, 3),
                max_distance_mm=round(float(accessory.distance.max()) * 1e3, 3))
    return accessory, mask, info


def _check_inputs(n_shape: int, faces: Any, target_vertices: Any, target_faces: Any, shape_init: Any
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    faces_np = np.asarray(faces.cpu() if isinstance(faces, torch.Tensor) else faces)
    tv = np.asarray(target_vertices.detach().cpu() if isinstance(target_vertices, torch.Tensor)
                    else target_vertices, dtype=np.float64)
    tf = np.asarray(target_faces.cpu() if isinstance(target_faces, torch.Tensor) else target_faces)
    if faces_np.ndim != 2 or faces_np.shape[1] != 3 or not np.issubdtype(faces_np.dtype, np.integer):
        raise FitError(f"template faces must be (F, 3) integers, got {faces_np.shape} {faces_np.dtype}")
    if tv.ndim != 2 or tv.shape[1] != 3 or len(tv) == 0:
        raise FitError(f"target vertices must be (N, 3) with N > 0, got {tv.shape}")
    if not np.isfinite(tv).all():
        raise FitError("target vertices contain NaN or infinite values: clean the target mesh first")
    if tf.ndim != 2 or tf.shape[1] != 3 or len(tf) == 0 or not np.issubdtype(tf.dtype, np.integer):
        raise FitError(f"target faces must be (F, 3) integers with F > 0, got {tf.shape} {tf.dtype}")
    if tf.min() < 0 or tf.max() >= len(tv):
        raise FitError(f"target faces index vertices outside 0..{len(tv) - 1}")
    if n_shape < 0:
        raise FitError(f"n_shape must be >= 0, got {n_shape}")
    if shape_init is None:
        shape_t = torch.zeros(n_shape, dtype=torch.float32)
    else:
        shape_t = torch.as_tensor(shape_init).detach()
        if not shape_t.is_floating_point():
            shape_t = shape_t.to(torch.float32)
        if tuple(shape_t.shape) != (n_shape,):
            raise FitError(f"shape_init must have shape ({n_shape},), got {tuple(shape_t.shape)}")
    return faces_np.astype(np.int64), tv, tf.astype(np.int64), shape_t


def fit_template(vertices_of_shape: Callable[[torch.Tensor], torch.Tensor], n_shape: int, faces: Any,
                 target_vertices: Any, target_faces: Any, *, skin_mask: Any = None, closing_faces: Any = None,
                 shape_init: Any = None,
                 shape_prior: float | Any = 1e-2, shape_bounds: tuple[Any, Any] | None = None,
                 similarity: bool = False, similarity_prior: float = 1e-4, samples: int = 10000,
                 shape_iterations: int = 8, shape_inner_iterations: int = 10,
                 shape_sigma: tuple[float, float] = (0.02, 0.003), outside_sigma: float = 0.002,
                 smoothness: tuple[float, ...] = (3.0, 1.0, 0.3),
                 offset_steps: int = 2, offset_sigma: float = 0.003, point_weight: float = 0.1,
                 damping: float = 1e-3, accessory_threshold: float = 0.004, min_accessory_area: float = 1e-4,
                 max_normal_angle: float = 60.0, candidates: int = 4, seed: int = 0,
                 report: Callable[[str], None] | None = None) -> FitResult:
    """Fit a template (a shape model and its triangles) to a target surface.

    Args:
        vertices_of_shape: shape (S,) tensor -> (V, 3) template vertices in metres,
            differentiable (e.g. ``lambda s: model.forward(shape=s).vertices[0]``).
        n_shape: S.
        faces: (F, 3) template triangles, counter-clockwise seen from outside.
        target_vertices, target_faces: the target surface (N, 3) metres, (F_t, 3),
            outward normals, in the template's frame.
        skin_mask: (V,) bool, the vertices the data term may offset (default all);
            the others (eyeballs, teeth, tongue) keep zero offsets.
        closing_faces: optional (C, 3) triangles over the template's vertices closing its
            holes (the neck cap): target points nearest to them are no data and no
            accessory (a generated head's closed neck has nothing to match on an open one).
        shape_init: (S,) start of the shape fit and centre of its prior (default zeros);
            its dtype and device are those ``vertices_of_shape`` receives.
        shape_prior: weight (scalar or (S,)) of ``sum_k w_k (e_k (shape_k - init_k))^2``
            where ``e_k`` is coefficient k's RMS effect on the vertices in mm per unit: a
            change moving the head by 1 mm RMS costs ``w_k`` mm^2 of mean squared distance.
        shape_bounds: optional ((S,), (S,)) bounds the shape is clamped to.
        similarity: also fit a scale, rotation and translation (for a target not in the
            template's frame; a generated head is already in it).
        similarity_prior: the same for the similarity: weight per mm^2 of translation, and of
            scale and rotation measured at the template's RMS radius.
        samples: points sampled on each surface for the data term and the figures.
        shape_iterations: ICP steps of the shape stage (closest points recomputed);
            shape_inner_iterations: L-BFGS iterations per step.
        shape_sigma: Geman-McClure scale (m) at the first and the last shape step.
        outside_sigma: the scale (m, at most the current one) where the target lies
            outside the template: hair and hats are outside the skin, never inside.
        smoothness: Laplacian weights of the offset stage, one level each, stiff to soft.
        offset_steps: ICP steps per smoothness level. offset_sigma: its robust scale (m).
        point_weight: weight of target->template point-to-point against point-to-plane.
        damping: weight of the mean squared offset (pins sliding along flat regions).
        accessory_threshold: target faces farther than this (m) from the fitted template
            become the accessory. min_accessory_area: smaller islands (m^2) are dropped.
        max_normal_angle: correspondences whose normals differ more (degrees) are ignored.
        candidates: candidate triangles per closest-point query during the fit (the
            figures use 8).
        seed: seeds the surface samples (the fit is deterministic for a seed).
        report: optional callback told each stage's name as it starts.

    Returns:
        FitResult (see there).

    Raises:
        FitError: inputs of the wrong size or type, NaNs, an empty skin.
    """
    faces_np, tv, tf, shape_init_t = _check_inputs(n_shape, faces, target_vertices, target_faces, shape_init)
    with torch.no_grad():
        start = vertices_of_shape(shape_init_t)
    if not isinstance(start, torch.Tensor) or start.dim() != 2 or start.shape[1] != 3:
        got = tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
        raise FitError(f"vertices_of_shape must return a (V, 3) tensor, got {got}")
    num_v = int(start.shape[0])
    if faces_np.size and (faces_np.min() < 0 or faces_np.max() >= num_v):
        raise FitError(f"template faces index vertices outside 0..{num_v - 1}")
    if skin_mask is None:
        skin = np.ones(num_v, bool)
    else:
        skin = np.asarray(skin_mask.cpu() if isinstance(skin_mask, torch.Tensor) else skin_mask).astype(bool)
        if skin.shape != (num_v,):
            raise FitError(f"skin_mask must have shape ({num_v},), got {skin.shape}")
    closing_np = np.zeros((0, 3), np.int64)
    if closing_faces is not None:
        closing_np = np.asarray(closing_faces.cpu() if isinstance(closing_faces, torch.Tensor) else closing_faces)
        if closing_np.ndim != 2 or closing_np.shape[1] != 3 or not np.issubdtype(closing_np.dtype, np.integer):
            raise FitError(f"closing_faces must be (C, 3) integers, got {closing_np.shape} {closing_np.dtype}")
        closing_np = closing_np.astype(np.int64)
        if closing_np.size and (closing_np.min() < 0 or closing_np.max() >= num_v):
            raise FitError(f"closing_faces index vertices outside 0..{num_v - 1}")
    skin_faces = np.nonzero(skin[faces_np].all(axis=1))[0]
    if len(skin_faces) == 0:
        raise FitError("no template face has all three vertices in skin_mask: nothing to fit")
    if accessory_threshold <= 0:
        raise FitError(f"accessory_threshold must be > 0 metres, got {accessory_threshold}")
    prior_t = torch.as_tensor(shape_prior, dtype=torch.float64)
    if prior_t.dim() not in (0, 1) or (prior_t.dim() == 1 and prior_t.shape[0] != n_shape):
        raise FitError(f"shape_prior must be a number or ({n_shape},) weights, got {tuple(prior_t.shape)}")

    rng = np.random.default_rng(seed)
    start_np = start.detach().cpu().double().numpy()
    t_face, t_bary = sample_surface(start_np, faces_np[skin_faces], samples, rng)
    g_face, g_bary = sample_surface(tv, tf, samples, rng)
    tnormals = face_normals(tv, tf)
    problem = _Problem(
        faces=faces_np, closing=closing_np, skin=skin, skin_faces=skin_faces, target=SurfaceProximity(tv, tf),
        target_normals=tnormals, template_face=t_face, template_bary=t_bary,
        target_points=np.einsum("nk,nkc->nc", g_bary, tv[tf[g_face]]), target_point_normals=tnormals[g_face],
        min_normal_dot=math.cos(math.radians(max_normal_angle)), candidates=candidates,
    )
    figures: dict[str, Any] = {}

    if report is not None:
        report("fit shape")
    started = time.perf_counter()
    sigmas = np.geomspace(shape_sigma[0], shape_sigma[1], max(shape_iterations, 1))
    shape, sim, base, shape_info = _shape_stage(
        problem, vertices_of_shape, shape_init_t, prior_t, shape_bounds, similarity, similarity_prior,
        shape_iterations, shape_inner_iterations, sigmas, start, outside_sigma, point_weight)
    shape_info["seconds"] = round(time.perf_counter() - started, 3)

    if report is not None:
        report("fit offsets")
    started = time.perf_counter()
    offsets, offset_info = _offset_stage(problem, base, tuple(smoothness), offset_steps, offset_sigma,
                                         accessory_threshold, point_weight, damping)
    offset_info["seconds"] = round(time.perf_counter() - started, 3)
    vertices = base + offsets

    if report is not None:
        report("fit accessories")
    started = time.perf_counter()
    accessory, acc_mask, acc_info = _accessory(vertices, faces_np, closing_np, problem.target, accessory_threshold,
                                             min_accessory_area)
    acc_info["seconds"] = round(time.perf_counter() - started, 3)

    keep = ~acc_mask
    shape_info.update(surface_distances(base, faces_np, skin_faces, problem.target, keep, samples,
                                        np.random.default_rng(seed + 1), closing_np))
    final = surface_distances(vertices, faces_np, skin_faces, problem.target, keep, samples,
                              np.random.default_rng(seed + 1), closing_np)
    offset_norm = np.linalg.norm(offsets[skin], axis=1)
    offset_info.update(mean_offset_mm=round(float(offset_norm.mean()) * 1e3, 4),
                       max_offset_mm=round(float(offset_norm.max()) * 1e3, 4))
    figures.update(final)
    figures.update(shape=shape_info, offsets=offset_info, accessory=acc_info,
                   samples=samples, skin_vertices=int(skin.sum()), vertices=num_v)
    if sim is not None:
        figures["similarity"] = {"scale": round(sim.scale, 6),
                                 "rotation_deg": round(math.degrees(_rotation_angle(sim.rotation)), 4),
                                 "translation_mm": (sim.translation * 1e3).round(3).tolist()}
    return FitResult(shape=shape, similarity=sim, offsets=offsets, vertices=vertices, accessory=accessory,
                     report=figures)


def _rotation_angle(rotation: np.ndarray) -> float:
    return math.acos(max(-1.0, min(1.0, (np.trace(rotation) - 1.0) / 2.0)))


def fit_head_model(model: Any, target_vertices: Any, target_faces: Any, **options: Any) -> FitResult:
    """:func:`fit_template` for a :class:`avatar.prior.HeadModel` (its neutral expression).

    The skin is every vertex not skinned mostly (> 0.5) to an eye joint; the shape starts
    at, and is held towards, ``model.shape_defaults`` (anny's within its sliders' ranges);
    the neck cap closes the template.
    ``options`` go to :func:`fit_template`.
    """
    eye_joints = [i for i, name in enumerate(model.joint_names) if "eye" in name]
    phenotypes = getattr(model, "num_phenotypes", None)
    if phenotypes is not None:  # anny: phenotypes in [0, 1], local changes in [-1, 1]
        lo = torch.tensor([0.0] * phenotypes + [-1.0] * (model.num_shape - phenotypes))
        options.setdefault("shape_bounds", (lo, torch.ones(model.num_shape)))
    weights = model.skin_weights.detach().cpu()
    skin = (weights[:, eye_joints].sum(dim=1) <= 0.5) if eye_joints else torch.ones(model.num_vertices, dtype=bool)
    options.setdefault("skin_mask", skin.numpy())
    options.setdefault("shape_init", model.shape_defaults)
    options.setdefault("closing_faces", model.cap_faces)

    dirs = model.shape_dirs.reshape(model.shape_dirs.shape[0], -1)

    def vertices_of_shape(shape: torch.Tensor) -> torch.Tensor:
        # model.forward(shape=shape).vertices[0] without the expression and skinning work:
        # at zero pose linear blend skinning is the identity (three times faster).
        coefficients = model.shape_coefficients(shape[None])[0]
        return model.template + (coefficients @ dirs).reshape(-1, 3)

    return fit_template(vertices_of_shape, model.num_shape, model.faces, target_vertices, target_faces, **options)
