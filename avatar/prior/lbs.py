"""Linear blend skinning shared by every head model.

The maths is that of SMPL (Loper et al. 2015, eq. 2-4) as implemented by the
``smplx`` package's ``lbs``: shape and expression blendshapes, pose-corrective
blendshapes driven by ``R(theta) - I`` of every non-root joint, a kinematic chain
of rigid transforms and per-vertex blend weights. Tests check this module
against ``smplx.lbs.lbs`` on the same arrays.
"""

from __future__ import annotations

import torch


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula.

    Args:
        axis_angle: (..., 3) rotation vectors (axis * angle in radians).

    Returns:
        (..., 3, 3) rotation matrices.
    """
    angle_sq = (axis_angle * axis_angle).sum(dim=-1, keepdim=True)[..., None]  # (..., 1, 1)
    angle = torch.sqrt(angle_sq.clamp_min(1e-24))
    small = angle_sq < 1e-12
    # sin(t)/t and (1-cos t)/t^2, with their Taylor series near zero so that the
    # gradient at the rest pose is finite.
    safe = torch.where(small, torch.ones_like(angle), angle)
    a = torch.where(small, 1.0 - angle_sq / 6.0, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - angle_sq / 24.0, (1.0 - torch.cos(safe)) / (safe * safe))
    x, y, z = axis_angle.unbind(dim=-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * k + b * (k @ k)


def rigid_transforms(
    rotations: torch.Tensor, joints: torch.Tensor, parents: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kinematics of a joint tree at rest position ``joints``.

    Args:
        rotations: (B, J, 3, 3) local rotation of each joint.
        joints: (B, J, 3) rest joint positions.
        parents: J parent indices, -1 for the root (which must be joint 0); a
            parent comes before its children.

    Returns:
        posed_joints: (B, J, 3) joint positions after posing.
        skinning_transforms: (B, J, 4, 4) transforms taking a rest-pose point to
            its posed position for a vertex bound rigidly to each joint.
    """
    batch, num_joints = joints.shape[:2]
    rel = joints.clone()
    if num_joints > 1:
        rel[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.zeros(batch, num_joints, 4, 4, dtype=joints.dtype, device=joints.device)
    local[:, :, :3, :3] = rotations
    local[:, :, :3, 3] = rel
    local[:, :, 3, 3] = 1.0
    chain = [local[:, 0]]
    for j in range(1, num_joints):
        chain.append(chain[parents[j]] @ local[:, j])
    world = torch.stack(chain, dim=1)  # (B, J, 4, 4)
    posed_joints = world[:, :, :3, 3]
    # Remove the rest position: T_j = G_j * [I, -j_rest; 0, 1].
    offset = (world[:, :, :3, :3] @ joints[..., None])[..., 0]
    skinning = world.clone()
    skinning[:, :, :3, 3] = posed_joints - offset
    return posed_joints, skinning


def linear_blend_skinning(
    rest_vertices: torch.Tensor,
    rest_joints: torch.Tensor,
    pose: torch.Tensor,
    parents: list[int],
    skin_weights: torch.Tensor,
    posedirs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose a shaped mesh.

    Args:
        rest_vertices: (B, V, 3) vertices after shape and expression blendshapes.
        rest_joints: (B, J, 3) joint positions of that shaped mesh.
        pose: (B, J, 3) axis-angle rotation of each joint relative to its parent.
        parents: J parent indices (root first, -1).
        skin_weights: (V, J) blend weights, rows summing to one.
        posedirs: optional (9 * (J - 1), V * 3) pose-corrective blendshapes,
            driven by the flattened ``R_j - I`` of joints 1..J-1 (SMPL's layout).

    Returns:
        vertices: (B, V, 3) posed vertices.
        joints: (B, J, 3) posed joints.
    """
    batch = rest_vertices.shape[0]
    rotations = axis_angle_to_matrix(pose)  # (B, J, 3, 3)
    vertices = rest_vertices
    if posedirs is not None:
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        feature = (rotations[:, 1:] - eye).reshape(batch, -1)
        vertices = vertices + (feature @ posedirs).reshape(batch, -1, 3)
    joints, transforms = rigid_transforms(rotations, rest_joints, parents)
    blended = torch.einsum("vj,bjmn->bvmn", skin_weights, transforms[:, :, :3, :])  # (B, V, 3, 4)
    posed = (blended[..., :3] @ vertices[..., None])[..., 0] + blended[..., 3]
    return posed, joints
