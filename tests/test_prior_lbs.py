"""Linear blend skinning of the head prior against smplx's reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avatar.prior.lbs import axis_angle_to_matrix, linear_blend_skinning


def test_axis_angle_matches_smplx_and_is_a_rotation():
    from smplx.lbs import batch_rodrigues

    rng = np.random.default_rng(0)
    vecs = torch.as_tensor(rng.normal(size=(64, 3)) * 1.5)
    ours = axis_angle_to_matrix(vecs)
    torch.testing.assert_close(ours, batch_rodrigues(vecs), atol=1e-7, rtol=0)
    eye = torch.eye(3, dtype=ours.dtype).expand_as(ours)
    torch.testing.assert_close(ours @ ours.transpose(1, 2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(ours), torch.ones(64, dtype=ours.dtype), atol=1e-12, rtol=0)
    quarter = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    torch.testing.assert_close(quarter @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                               torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)  # fmt: skip


def test_axis_angle_gradient_is_finite_at_rest():
    vec = torch.zeros(3, requires_grad=True)
    axis_angle_to_matrix(vec)[0, 1].backward()
    # d R[0,1] / d w_z = -1 at the identity (R ~ I + [w]x).
    torch.testing.assert_close(vec.grad, torch.tensor([0.0, 0.0, -1.0]))


@pytest.mark.parametrize("with_posedirs", [True, False])
def test_lbs_matches_smplx(with_posedirs):
    from smplx.lbs import lbs

    rng = np.random.default_rng(1)
    batch, n_vert, n_joint, n_beta = 4, 50, 6, 7
    parents = [-1, 0, 1, 1, 3, 0]
    v_template = torch.as_tensor(rng.normal(size=(n_vert, 3)))
    shapedirs = torch.as_tensor(rng.normal(scale=0.05, size=(n_vert, 3, n_beta)))
    posedirs = torch.as_tensor(rng.normal(scale=0.05, size=(9 * (n_joint - 1), 3 * n_vert)))
    regressor = torch.as_tensor(rng.dirichlet(np.ones(n_vert), size=n_joint))
    weights = torch.as_tensor(rng.dirichlet(np.ones(n_joint) * 0.5, size=n_vert))
    betas = torch.as_tensor(rng.normal(size=(batch, n_beta)))
    pose = torch.as_tensor(rng.normal(scale=0.5, size=(batch, n_joint, 3)))

    ref_v, ref_j = lbs(betas, pose.reshape(batch, -1), v_template, shapedirs,
                       posedirs if with_posedirs else torch.zeros_like(posedirs),
                       regressor, torch.tensor(parents), weights)  # fmt: skip
    rest = v_template + torch.einsum("bl,vcl->bvc", betas, shapedirs)
    joints = torch.einsum("jv,bvc->bjc", regressor, rest)
    ours_v, ours_j = linear_blend_skinning(rest, joints, pose, parents, weights, posedirs if with_posedirs else None)
    # smplx's Rodrigues adds 1e-8 to every rotation vector, hence 1e-7 and not 1e-12.
    torch.testing.assert_close(ours_v, ref_v, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours_j, ref_j, atol=1e-7, rtol=0)


def test_rest_pose_is_identity():
    rng = np.random.default_rng(2)
    rest = torch.as_tensor(rng.normal(size=(2, 30, 3)))
    joints = torch.as_tensor(rng.normal(size=(2, 3, 3)))
    weights = torch.as_tensor(rng.dirichlet(np.ones(3), size=30))
    verts, posed = linear_blend_skinning(rest, joints, torch.zeros(2, 3, 3, dtype=torch.float64), [-1, 0, 1], weights)
    torch.testing.assert_close(verts, rest, atol=1e-12, rtol=0)
    torch.testing.assert_close(posed, joints, atol=1e-12, rtol=0)
