"""The coarse NeRF field starts from the prior's shape and is trainable."""

from __future__ import annotations

import torch
from support import assert_gradients_match_finite_differences

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


def test_gradients_of_grid_and_mlps_match_finite_differences():
    # float64, 3 random directions per tensor, central differences with eps 1e-5: within 1e-5
    # relative, 1e-8 absolute (the loss is O(10): rounding in the difference is about 1e-9).
    # The field is smooth in its parameters; the points stay fixed.
    torch.manual_seed(0)
    field = NeRFField(log2_hashmap_size=12, max_resolution=128, engine="torch").double()
    with torch.no_grad():  # a table away from its tiny initial values, so every level matters
        field.encoding.params.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    points = torch.rand(64, 3, generator=g, dtype=torch.float64) * 2 - 1
    wd, wa = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)

    def loss():
        d, a = field(points)
        return (d * wd).sum() + (a * wa).sum()

    assert_gradients_match_finite_differences(loss, dict(field.named_parameters()), eps=1e-5, rtol=1e-5,
                                              atol=1e-8)


def test_sample_grid_axes():
    grid = torch.zeros(3, 3, 3)
    grid[2, 1, 1] = 1.0  # +X face centre
    pts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(sample_grid(grid, pts, 1.0), torch.tensor([1.0, 0.0, 0.5]))
