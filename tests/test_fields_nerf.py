"""The coarse NeRF field starts from the prior's shape and is trainable."""

from __future__ import annotations

import torch

from avatar.fields.frame import FieldFrame
from avatar.fields.nerf import NeRFField, sample_grid


def sphere_sdf(metres: torch.Tensor) -> torch.Tensor:
    return metres.norm(dim=-1) - 0.1


def test_prior_bias_makes_a_head_shaped_density():
    torch.manual_seed(0)
    field = NeRFField(FieldFrame(scale=2.5), prior_sdf=sphere_sdf, prior_grid=48, log2_hashmap_size=12,
                      max_resolution=128, engine="torch")
    inside = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.05, 0.0]])   # field units (0.04 m from centre)
    outside = torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.6, 0.3]])   # 0.2+ m from centre
    d_in, albedo = field(inside)
    d_out, _ = field(outside)
    assert (d_in > 30).all() and (d_out < 0.05).all()
    assert albedo.shape == (2, 3) and ((albedo > 0) & (albedo < 1)).all()
    # Normals of the prior sphere point outward.
    p = torch.tensor([[0.25, 0.0, 0.0], [0.0, 0.0, -0.25]])
    n = field.normals(p, eps=5e-3)
    assert (torch.nn.functional.cosine_similarity(n, p) > 0.95).all()


def test_gradients_reach_grid_and_mlps():
    field = NeRFField(log2_hashmap_size=12, max_resolution=128, engine="torch")
    d, a = field(torch.rand(64, 3) * 2 - 1)
    (d.sum() + a.sum()).backward()
    assert field.encoding.params.grad.abs().sum() > 0
    assert field.density_net[0].weight.grad.abs().sum() > 0 and field.albedo_net[0].weight.grad.abs().sum() > 0


def test_sample_grid_axes():
    grid = torch.zeros(3, 3, 3)
    grid[2, 1, 1] = 1.0  # +X face centre
    pts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(sample_grid(grid, pts, 1.0), torch.tensor([1.0, 0.0, 0.5]))
