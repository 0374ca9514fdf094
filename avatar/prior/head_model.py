"""The one interface every head prior implements: :class:`HeadModel`.

A head model is a linear blendshape model posed by linear blend skinning:

    rest(v)   = template + sum_k c_k(shape) * shape_dirs_k + sum_e x_e * expression_dirs_e
    joints    = joint_template + (same coefficients on the joint directions)
    vertices  = LBS(rest, joints, pose)                 (avatar.prior.lbs)
    landmarks = barycentric combination of posed vertices

All geometry is in the project frame: metres, +Y up, the face looks down +Z
(as glTF expects), the centre of the neutral head at the origin. ``c_k(shape)``
is the identity for FLAME and anny's phenotype interpolation for the anny head
(:mod:`avatar.prior.anny_head`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avatar.prior.errors import PriorError
from avatar.prior.landmarks import CLOSED_CONTOURS, CONTOUR_NAMES
from avatar.prior.lbs import linear_blend_skinning

FRAME_DESCRIPTION = "metres, +Y up, face looks down +Z, neutral head centre at the origin"


@dataclass
class HeadState:
    """Output of :meth:`HeadModel.forward`.

    Attributes:
        vertices: (B, V, 3) posed vertices, project frame.
        landmarks: (B, L, 3) posed landmark points, project frame.
        joints: (B, J, 3) posed joint positions, project frame.
    """

    vertices: torch.Tensor
    landmarks: torch.Tensor
    joints: torch.Tensor


_TENSOR_FIELDS = (
    "template",
    "shape_dirs",
    "shape_joint_dirs",
    "expression_dirs",
    "expression_joint_dirs",
    "joint_template",
    "skin_weights",
    "posedirs",
    "expression_pose",
    "landmark_weights",
    "shape_defaults",
)


class HeadModel:
    """A parametric head: shape, expression, joints, skinning, landmarks, SDF.

    Attributes:
        name: "anny" or "flame".
        faces: (F, 3) int64 triangles of the surface, outward counter-clockwise.
        cap_faces: (C, 3) int64 triangles closing the neck (and any other hole);
            ``faces`` + ``cap_faces`` is watertight.
        shape_names: names of the ``num_shape`` shape parameters.
        shape_defaults: (num_shape,) values giving the neutral head.
        expression_names: names of the expression parameters (the 52 ARKit names
            for anny; ``exp_00..`` then ``jaw_*`` pose controls for FLAME).
        joint_names: names of the J joints, root first.
        parents: J parent indices (-1 for the root).
        skin_weights: (V, J) LBS weights, rows sum to one.
        landmark_contours: contour name -> ordered indices into the landmarks.
        closed_contours: names of the contours whose last point joins the first.
        info: free-form provenance (source files, versions), JSON-serialisable.
    """

    def __init__(
        self,
        *,
        name: str,
        template: torch.Tensor,
        faces: torch.Tensor,
        cap_faces: torch.Tensor,
        shape_dirs: torch.Tensor,
        shape_joint_dirs: torch.Tensor,
        shape_names: list[str],
        shape_defaults: torch.Tensor,
        expression_dirs: torch.Tensor,
        expression_joint_dirs: torch.Tensor,
        expression_names: list[str],
        joint_template: torch.Tensor,
        joint_names: list[str],
        parents: list[int],
        skin_weights: torch.Tensor,
        landmark_vertices: torch.Tensor,
        landmark_weights: torch.Tensor,
        landmark_contours: Mapping[str, list[int]],
        posedirs: torch.Tensor | None = None,
        expression_pose: torch.Tensor | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Build from arrays (loaders do this; users call :func:`load_head_model`).

        Args:
            template: (V, 3) neutral rest vertices.
            faces, cap_faces: (F, 3), (C, 3) int triangles.
            shape_dirs: (K, V, 3) shape blendshapes driven by
                :meth:`shape_coefficients` (K may differ from ``num_shape``).
            shape_joint_dirs: (K, J, 3) matching joint displacements.
            shape_defaults: (S,) neutral shape parameters.
            expression_dirs: (E_lin, V, 3) expression blendshapes; the first
                E_lin expression parameters drive them.
            expression_joint_dirs: (E_lin, J, 3).
            joint_template: (J, 3) neutral joint positions.
            skin_weights: (V, J).
            landmark_vertices: (L, 3) int vertex indices; landmark_weights: (L, 3)
                barycentric weights (a vertex landmark is ``[i, i, i], [1, 0, 0]``).
            posedirs: optional (9 (J - 1), 3 V) pose-corrective blendshapes.
            expression_pose: optional (E - E_lin, J, 3): the remaining expression
                parameters add this axis-angle to the pose (FLAME's jaw controls).
        """
        self.name = name
        self.template = template
        self.faces = faces.long()
        self.cap_faces = cap_faces.long()
        self.shape_dirs = shape_dirs
        self.shape_joint_dirs = shape_joint_dirs
        self.shape_names = list(shape_names)
        self.shape_defaults = shape_defaults
        self.expression_dirs = expression_dirs
        self.expression_joint_dirs = expression_joint_dirs
        self.expression_names = list(expression_names)
        self.joint_template = joint_template
        self.joint_names = list(joint_names)
        self.parents = [int(p) for p in parents]
        self.skin_weights = skin_weights
        self.landmark_vertices = landmark_vertices.long()
        self.landmark_weights = landmark_weights
        self.landmark_contours = {k: [int(i) for i in v] for k, v in landmark_contours.items()}
        self.closed_contours = frozenset(k for k in self.landmark_contours if k in CLOSED_CONTOURS)
        self.posedirs = posedirs
        self.expression_pose = expression_pose
        self.info = dict(info or {})
        self._sdf_grid = None
        self._check_consistency()

    # ------------------------------------------------------------------ sizes
    @property
    def num_vertices(self) -> int:
        return int(self.template.shape[0])

    @property
    def num_shape(self) -> int:
        return len(self.shape_names)

    @property
    def num_expression(self) -> int:
        return len(self.expression_names)

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def num_landmarks(self) -> int:
        return int(self.landmark_vertices.shape[0])

    @property
    def device(self) -> torch.device:
        return self.template.device

    @property
    def dtype(self) -> torch.dtype:
        return self.template.dtype

    def _check_consistency(self) -> None:
        v, j = self.num_vertices, self.num_joints
        k = self.shape_dirs.shape[0]
        e_lin = self.expression_dirs.shape[0]
        expected = {
            "template": (v, 3),
            "shape_dirs": (k, v, 3),
            "shape_joint_dirs": (k, j, 3),
            "shape_defaults": (self.num_shape,),
            "expression_dirs": (e_lin, v, 3),
            "expression_joint_dirs": (e_lin, j, 3),
            "joint_template": (j, 3),
            "skin_weights": (v, j),
            "landmark_weights": (self.num_landmarks, 3),
        }
        for field, shape in expected.items():
            got = tuple(getattr(self, field).shape)
            if got != shape:
                raise PriorError(f"{self.name} head model: {field} has shape {got}, expected {shape}")
        n_pose_ctrl = self.num_expression - e_lin
        if n_pose_ctrl < 0 or (n_pose_ctrl > 0 and self.expression_pose is None):
            raise PriorError(
                f"{self.name} head model: {self.num_expression} expression names for {e_lin} expression blendshapes"
            )
        if self.expression_pose is not None and tuple(self.expression_pose.shape) != (n_pose_ctrl, j, 3):
            raise PriorError(f"{self.name} head model: expression_pose must be ({n_pose_ctrl}, {j}, 3)")
        if self.posedirs is not None and tuple(self.posedirs.shape) != (9 * (j - 1), 3 * v):
            raise PriorError(f"{self.name} head model: posedirs must be ({9 * (j - 1)}, {3 * v})")
        if (
            len(self.parents) != j
            or self.parents[0] != -1
            or any(not 0 <= p < i for i, p in enumerate(self.parents) if i > 0)
        ):
            raise PriorError(f"{self.name} head model: bad joint parents {self.parents}")
        for name, idx in self.landmark_contours.items():
            if name not in CONTOUR_NAMES:
                raise PriorError(f"{self.name} head model: unknown contour {name!r}; expected {CONTOUR_NAMES}")
            if any(not 0 <= i < self.num_landmarks for i in idx):
                raise PriorError(
                    f"{self.name} head model: contour {name!r} indexes past {self.num_landmarks} landmarks"
                )

    # ------------------------------------------------------------ conversions
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HeadModel:
        """Move the model's tensors (in place, like ``torch.nn.Module.to``) and return it.

        ``dtype`` applies to floating-point tensors; index tensors stay int64.
        ``model.to(torch.float64)`` works too, as with modules.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for field in _TENSOR_FIELDS:
            value = getattr(self, field)
            if value is not None:
                setattr(self, field, value.to(device=device, dtype=dtype))
        for field in ("faces", "cap_faces", "landmark_vertices"):
            setattr(self, field, getattr(self, field).to(device=device))
        if self._sdf_grid is not None:
            self._sdf_grid = self._sdf_grid.to(device=device, dtype=dtype)
        return self

    # ---------------------------------------------------------- parameters
    def shape_coefficients(self, shape: torch.Tensor) -> torch.Tensor:
        """Coefficients of ``shape_dirs`` for shape parameters.

        Args:
            shape: (B, num_shape).

        Returns:
            (B, K); zero for ``shape_defaults``. Linear (``shape - defaults``)
            unless a subclass says otherwise.
        """
        return shape - self.shape_defaults

    def _as_parameters(self, value: Any, names: list[str], default: torch.Tensor, what: str) -> torch.Tensor:
        """Turn None / mapping / array input into a validated (B, len(names)) tensor."""
        size = len(names)
        if value is None:
            return default[None]
        if isinstance(value, Mapping):
            unknown = [k for k in value if k not in names]
            if unknown:
                raise PriorError(
                    f"unknown {what} name(s) {unknown} for the {self.name} head; "
                    f"expected names from {what}_names: {names}"
                )
            columns = {k: self._as_tensor(v, f"{what}[{k!r}]").reshape(-1) for k, v in value.items()}
            batch = max([c.shape[0] for c in columns.values()] + [1])
            out = default[None].expand(batch, size).clone()
            for k, col in columns.items():
                if col.shape[0] not in (1, batch):
                    raise PriorError(f"{what}[{k!r}] has {col.shape[0]} values, expected 1 or {batch}")
                out[:, names.index(k)] = col
            return out
        tensor = self._as_tensor(value, what)
        if tensor.dim() == 1:
            tensor = tensor[None]
        if tensor.dim() != 2 or tensor.shape[1] != size:
            raise PriorError(
                f"{what} must have shape (B, {size}) or ({size},) for the {self.name} head, got {tuple(tensor.shape)}"
            )
        return tensor

    def _as_tensor(self, value: Any, what: str) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
                raise PriorError(f"{what} must be a floating-point tensor, got {value.dtype}")
            tensor = value.to(device=self.device, dtype=self.dtype)
        else:
            try:
                tensor = torch.as_tensor(np.asarray(value, dtype=np.float64), device=self.device, dtype=self.dtype)
            except (TypeError, ValueError) as exc:
                raise PriorError(f"{what} must be numbers, got {type(value).__name__}: {exc}") from None
        if not torch.isfinite(tensor).all():
            raise PriorError(f"{what} contains NaN or infinite values")
        return tensor

    def _as_pose(self, pose: Any) -> torch.Tensor:
        j = self.num_joints
        zero = torch.zeros(1, j, 3, device=self.device, dtype=self.dtype)
        if pose is None:
            return zero
        if isinstance(pose, Mapping):
            unknown = [k for k in pose if k not in self.joint_names]
            if unknown:
                raise PriorError(f"unknown joint name(s) {unknown} in pose; expected names from {self.joint_names}")
            rows = {k: self._as_tensor(v, f"pose[{k!r}]") for k, v in pose.items()}
            for k, r in rows.items():
                if r.shape[-1] != 3 or r.dim() > 2:
                    raise PriorError(f"pose[{k!r}] must be an axis-angle of shape (3,) or (B, 3), got {tuple(r.shape)}")
            batch = max([r.reshape(-1, 3).shape[0] for r in rows.values()] + [1])
            out = zero.expand(batch, j, 3).clone()
            for k, r in rows.items():
                out[:, self.joint_names.index(k)] = r.reshape(-1, 3)
            return out
        tensor = self._as_tensor(pose, "pose")
        if tensor.dim() == 1 and tensor.shape[0] == 3 * j:
            tensor = tensor.reshape(1, j, 3)
        elif tensor.dim() == 2 and tensor.shape == (j, 3):
            tensor = tensor[None]
        elif tensor.dim() == 2 and tensor.shape[1] == 3 * j:
            tensor = tensor.reshape(-1, j, 3)
        if tensor.dim() != 3 or tensor.shape[1:] != (j, 3):
            raise PriorError(
                f"pose must have shape (B, {j}, 3) axis-angles for joints {self.joint_names}, got {tuple(tensor.shape)}"
            )
        return tensor

    # --------------------------------------------------------------- forward
    def forward(self, shape: Any = None, expression: Any = None, pose: Any = None) -> HeadState:
        """Shape, animate and pose the head.

        Args:
            shape: None (neutral), (num_shape,) / (B, num_shape) values, or a
                mapping ``{name: value}`` over ``shape_names`` (others neutral).
            expression: None, (E,) / (B, E), or ``{name: value}`` over
                ``expression_names`` (e.g. ``{"jawOpen": 1.0}``).
            pose: None, (J, 3) / (B, J, 3) / (B, 3 J) axis-angles in radians of
                each joint relative to its parent, or ``{joint_name: (3,)}``.

        Inputs with batch 1 broadcast against the others.

        Returns:
            HeadState with vertices (B, V, 3), landmarks (B, L, 3), joints (B, J, 3).

        Raises:
            PriorError: wrong sizes, unknown names, NaN or infinite values.
        """
        shape_t = self._as_parameters(shape, self.shape_names, self.shape_defaults, "shape")
        zero_expression = torch.zeros(self.num_expression, device=self.device, dtype=self.dtype)
        expr_t = self._as_parameters(expression, self.expression_names, zero_expression, "expression")
        pose_t = self._as_pose(pose)
        sizes = {shape_t.shape[0], expr_t.shape[0], pose_t.shape[0]} - {1}
        if len(sizes) > 1:
            raise PriorError(
                f"batch sizes differ: shape {shape_t.shape[0]}, expression {expr_t.shape[0]}, pose {pose_t.shape[0]}"
            )
        batch = sizes.pop() if sizes else 1

        coeff = self.shape_coefficients(shape_t).expand(batch, -1)
        n_lin = self.expression_dirs.shape[0]
        expr_lin = expr_t[:, :n_lin].expand(batch, -1)
        rest = (
            self.template
            + torch.einsum("bk,kvc->bvc", coeff, self.shape_dirs)
            + torch.einsum("be,evc->bvc", expr_lin, self.expression_dirs)
        )
        joints = (
            self.joint_template
            + torch.einsum("bk,kjc->bjc", coeff, self.shape_joint_dirs)
            + torch.einsum("be,ejc->bjc", expr_lin, self.expression_joint_dirs)
        )
        pose_t = pose_t.expand(batch, -1, -1)
        if self.expression_pose is not None:
            pose_t = pose_t + torch.einsum("be,ejc->bjc", expr_t[:, n_lin:].expand(batch, -1), self.expression_pose)
        vertices, posed_joints = linear_blend_skinning(
            rest, joints, pose_t, self.parents, self.skin_weights, self.posedirs
        )
        landmarks = (vertices[:, self.landmark_vertices] * self.landmark_weights[None, :, :, None]).sum(dim=2)
        return HeadState(vertices=vertices, landmarks=landmarks, joints=posed_joints)

    __call__ = forward

    # ------------------------------------------------------------- geometry
    def all_faces(self) -> torch.Tensor:
        """(F + C, 3) surface plus cap triangles: a closed surface."""
        return torch.cat([self.faces, self.cap_faces], dim=0)

    def neutral_mesh(self, capped: bool = True):
        """The neutral head as a ``trimesh.Trimesh`` (project frame, metres).

        With ``capped`` the neck hole is closed and the mesh is watertight.
        """
        import trimesh

        faces = self.all_faces() if capped else self.faces
        return trimesh.Trimesh(
            vertices=self.template.detach().cpu().double().numpy(),
            faces=faces.cpu().numpy(),
            process=False,
        )

    def neutral_landmarks(self) -> torch.Tensor:
        """(L, 3) landmarks of the neutral head."""
        verts = self.template[self.landmark_vertices]
        return (verts * self.landmark_weights[:, :, None]).sum(dim=1)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance to the neutral (capped) head, negative inside.

        Looked up by trilinear interpolation in a cached grid (see
        :mod:`avatar.prior.sdf`); exact to grid precision near the surface, and
        outside the grid the distance to the grid box is added.

        Args:
            points: (N, 3) project-frame points (metres).

        Returns:
            (N,) signed distances in metres, on the points' device and dtype.
        """
        if not isinstance(points, torch.Tensor):
            points = torch.as_tensor(np.asarray(points), dtype=self.dtype, device=self.device)
        if points.dim() != 2 or points.shape[1] != 3:
            raise PriorError(f"sdf points must have shape (N, 3), got {tuple(points.shape)}")
        return self.sdf_grid().lookup(points)

    def sdf_grid(self):
        """The cached :class:`avatar.prior.sdf.SDFGrid` of the neutral head (built on first use)."""
        if self._sdf_grid is None:
            from avatar.prior.sdf import cached_sdf_grid

            grid = cached_sdf_grid(
                self.template.detach().cpu().double().numpy(),
                self.all_faces().cpu().numpy(),
            )
            self._sdf_grid = grid.to(device=self.device, dtype=self.dtype)
        return self._sdf_grid

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: counts, bounds in metres, names."""
        verts = self.template.detach().cpu().double().numpy()
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        return {
            "model": self.name,
            "frame": FRAME_DESCRIPTION,
            "vertex_count": self.num_vertices,
            "face_count": int(self.faces.shape[0]),
            "cap_face_count": int(self.cap_faces.shape[0]),
            "bounds_m": {"min": lo.round(5).tolist(), "max": hi.round(5).tolist()},
            "size_m": (hi - lo).round(5).tolist(),
            "num_shape": self.num_shape,
            "shape_names": self.shape_names,
            "expression_names": self.expression_names,
            "joint_names": self.joint_names,
            "landmark_count": self.num_landmarks,
            "landmark_contours": {k: len(v) for k, v in self.landmark_contours.items()},
            "info": self.info,
        }

    def __repr__(self) -> str:
        return (
            f"HeadModel({self.name!r}, V={self.num_vertices}, F={int(self.faces.shape[0])}, "
            f"shape={self.num_shape}, expression={self.num_expression}, joints={self.joint_names})"
        )
