"""Multi-resolution hash encoding: native kernel against the PyTorch reference.

Forward within 1e-5 relative (fp32), gradients within 1e-4, on random points and
on the edge cases the kernel must get right: the cube's faces (0 and 1), points
exactly on cell borders, points outside the cube (clamped). Gradcheck in float64
for both engines, determinism of the race-free CPU table gradient, the layout
rules shared with tiny-cuda-nn, and the module's engine handling.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import served_by

from avatar import _native
from avatar.ops.engine import EngineError
from avatar.ops.hashgrid import HashGridEncoding, hash_grid_encode, hash_grid_layout
from avatar.ops.reference import hashgrid as reference

native = pytest.mark.skipif(not _native.available(), reason="native extension unavailable")

# A small grid with dense and hashed levels: resolutions 4, 7, 12, 20, 34, 58.
SMALL = dict(n_levels=6, log2_hashmap_size=12, base_resolution=5, per_level_scale=1.7)


def _table(rows: int, features: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, features, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def _edge_points(layout, dtype=torch.float32) -> torch.Tensor:
    """Faces of the cube, its corners, points outside, and exact cell borders per level."""
    values = [0.0, 1.0, 0.5, 0.25, 0.75, -0.2, 1.3]
    pts = [torch.tensor([a, b, c]) for a in values[:3] for b in values for c in (0.0, 1.0, 0.3)]
    for scale in layout.scales:
        # x * scale + 0.5 == k exactly (in float32): the point sits on a cell border.
        for k in (1, 2, int(scale) // 2 + 1, int(math.floor(scale + 0.5))):
            x = torch.tensor((k - 0.5) / scale, dtype=torch.float32)
            border = x * torch.tensor(scale, dtype=torch.float32) + 0.5
            if float(border) == float(k) and 0.0 <= float(x) <= 1.0:
                pts.append(torch.stack([x, torch.tensor(0.37), x]))
    return torch.stack(pts).to(dtype)


def _compare(points: torch.Tensor, table: torch.Tensor, config: dict, grad_points: bool = True) -> None:
    results = {}
    g = torch.Generator().manual_seed(7)
    upstream = None
    for engine in ("native", "torch"):
        t = table.clone().requires_grad_(True)
        p = points.clone().requires_grad_(grad_points)
        with served_by(engine, "hashgrid_forward", "hashgrid_backward"):
            out = hash_grid_encode(p, t, **config, engine=engine)
            if upstream is None:
                upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
            out.backward(upstream)
        results[engine] = (out.detach(), t.grad, p.grad)
    (o_n, gt_n, gp_n), (o_r, gt_r, gp_r) = results["native"], results["torch"]
    scale = o_r.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(o_n, o_r, rtol=1e-5, atol=1e-5 * float(scale))
    torch.testing.assert_close(gt_n, gt_r, rtol=1e-4, atol=1e-4 * float(gt_r.abs().max().clamp_min(1e-12)))
    if grad_points:
        torch.testing.assert_close(gp_n, gp_r, rtol=1e-4, atol=1e-4 * float(gp_r.abs().max().clamp_min(1e-12)))


def test_layout_follows_tiny_cuda_nn():
    layout = hash_grid_layout(16, 19, 16, 1.4472692374403782)
    assert layout.scales[0] == 15.0 and layout.resolutions[0] == 16
    assert layout.resolutions[-1] == 4096  # this b gives a finest resolution of 4096
    for level in range(16):
        res = layout.resolutions[level]
        assert res == math.ceil(layout.scales[level]) + 1
        rows = min((res**3 + 7) // 8 * 8, 1 << 19)
        assert layout.level_size(level) == rows
        assert layout.dense[level] == (res**3 <= rows)
    assert layout.dense[:5] == (True,) * 5 and not any(layout.dense[5:])
    assert layout.n_rows == layout.offsets[-1] == sum(layout.level_size(i) for i in range(16))


def test_hashed_rows_use_instant_ngp_primes():
    layout = hash_grid_layout(**SMALL)
    level = 5
    assert not layout.dense[level]
    cells = torch.tensor([[0, 0, 0], [1, 2, 3], [57, 58, 13], [31, 0, 58]])
    rows = reference.level_rows(cells, layout, level)
    for (x, y, z), row in zip(cells.tolist(), rows.tolist()):
        h = (x * 1) ^ ((y * 2654435761) % 2**32) ^ ((z * 805459861) % 2**32)
        assert row == layout.offsets[level] + h % layout.level_size(level)
    dense_level = 0
    res = layout.resolutions[dense_level]
    rows = reference.level_rows(torch.tensor([[1, 2, 3]]), layout, dense_level)
    assert rows.item() == 1 + 2 * res + 3 * res * res


def test_reference_interpolates_a_linear_field_exactly():
    # A table holding a linear function of the vertex position is reproduced
    # exactly by trilinear interpolation (dense level, away from the border wrap).
    layout = hash_grid_layout(n_levels=1, log2_hashmap_size=16, base_resolution=9, per_level_scale=2.0)
    res, scale = layout.resolutions[0], layout.scales[0]
    idx = torch.arange(layout.n_rows)
    gx, gy, gz = idx % res, (idx // res) % res, idx // (res * res)
    table = torch.stack([gx + 2.0 * gy - gz], dim=1).double()
    points = torch.rand(100, 3, dtype=torch.float64) * 0.8
    out = reference.hash_grid_encode(points, table, 1, 16, 9, 2.0)
    pos = points * scale + 0.5
    torch.testing.assert_close(out[:, 0], pos[:, 0] + 2 * pos[:, 1] - pos[:, 2])


@native
@pytest.mark.parametrize("features", [1, 2, 4, 8])
def test_native_matches_reference_random(features):
    layout = hash_grid_layout(**SMALL)
    points = torch.rand(3000, 3, generator=torch.Generator().manual_seed(features))
    _compare(points, _table(layout.n_rows, features), SMALL)


@native
def test_native_matches_reference_edge_points():
    layout = hash_grid_layout(**SMALL)
    points = _edge_points(layout)
    _compare(points, _table(layout.n_rows, 2, seed=3), SMALL)


@native
def test_native_table_gradient_without_point_gradient():
    layout = hash_grid_layout(**SMALL)
    points = torch.rand(500, 3, generator=torch.Generator().manual_seed(11))
    _compare(points, _table(layout.n_rows, 2), SMALL, grad_points=False)


@native
def test_native_float64_matches_reference():
    layout = hash_grid_layout(**SMALL)
    points = torch.cat([torch.rand(400, 3, dtype=torch.float64), _edge_points(layout, torch.float64)])
    table = _table(layout.n_rows, 2, torch.float64)
    with served_by("native", "hashgrid_forward"):
        out_n = hash_grid_encode(points, table, **SMALL, engine="native")
    out_r = hash_grid_encode(points, table, **SMALL, engine="torch")
    torch.testing.assert_close(out_n, out_r, rtol=1e-12, atol=1e-12)


GRADCHECK = dict(n_levels=3, log2_hashmap_size=6, base_resolution=3, per_level_scale=2.0)


@pytest.mark.parametrize("engine", ["torch", pytest.param("native", marks=native)])
def test_gradcheck_float64(engine):
    layout = hash_grid_layout(**GRADCHECK)
    assert layout.dense[0] and not layout.dense[-1]
    g = torch.Generator().manual_seed(5)
    # Keep points away from cell borders, where the encoding is not differentiable.
    points = (0.05 + 0.9 * torch.rand(6, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    table = _table(layout.n_rows, 2, torch.float64).requires_grad_(True)

    def fn(p, t):
        return hash_grid_encode(p, t, **GRADCHECK, engine=engine)

    with served_by(engine, "hashgrid_forward", "hashgrid_backward"):
        assert torch.autograd.gradcheck(fn, (points, table), eps=1e-6, atol=1e-7)


@native
def test_native_table_gradient_is_deterministic_across_threads():
    layout = hash_grid_layout(**SMALL)
    points = torch.rand(20000, 3, generator=torch.Generator().manual_seed(2))
    table = _table(layout.n_rows, 2)
    upstream = torch.randn(points.shape[0], layout.n_levels * 2, generator=torch.Generator().manual_seed(3))
    args = (list(layout.offsets), list(layout.scales), list(layout.resolutions))
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            grads.append(torch.ops.avatar.hashgrid_backward(upstream, points, table, *args, True, True))
    finally:
        torch.set_num_threads(threads)
    for gt, gp in grads[1:]:
        assert torch.equal(gt, grads[0][0]) and torch.equal(gp, grads[0][1])


def test_empty_input():
    layout = hash_grid_layout(**SMALL)
    table = _table(layout.n_rows, 2).requires_grad_(True)
    for engine in ["torch"] + (["native"] if _native.available() else []):
        out = hash_grid_encode(torch.zeros(0, 3), table, **SMALL, engine=engine)
        assert out.shape == (0, 12)
        out.sum().backward()
        assert table.grad is not None and not table.grad.any()


def test_input_validation():
    layout = hash_grid_layout(**SMALL)
    with pytest.raises(ValueError, match="table of shape"):
        hash_grid_encode(torch.rand(4, 3), torch.zeros(layout.n_rows + 1, 2), **SMALL)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        hash_grid_encode(torch.rand(4, 2), torch.zeros(layout.n_rows, 2), **SMALL)
    with pytest.raises(EngineError, match="HashGridEncoding"):
        hash_grid_encode(torch.rand(4, 3), torch.zeros(layout.n_rows, 2), **SMALL, engine="tcnn")
    with pytest.raises(ValueError, match="n_levels"):
        hash_grid_layout(n_levels=33)


@native
def test_float16_table_is_cuda_only_for_native_and_falls_back_on_auto():
    layout = hash_grid_layout(**SMALL)
    table = _table(layout.n_rows, 2).half()
    points = torch.rand(10, 3)
    with pytest.raises(EngineError, match="float16"):
        hash_grid_encode(points, table, **SMALL, engine="native")
    out = hash_grid_encode(points, table, **SMALL, engine="auto")
    torch.testing.assert_close(out, hash_grid_encode(points, table.float(), **SMALL, engine="torch"))


def test_module_shapes_params_and_engines():
    enc = HashGridEncoding(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                           per_level_scale=2.0, engine="torch")
    assert enc.n_output_dims == 8
    assert enc.params.shape == (enc.layout.n_rows * 2,)
    assert enc.params.abs().max() <= 1e-4
    assert list(enc.state_dict()) == ["params"]
    assert enc.tcnn_config()["otype"] == "HashGrid"
    points = torch.rand(2, 5, 3)
    out = enc(points)
    assert out.shape == (2, 5, 8)
    out.sum().backward()
    assert enc.params.grad is not None and enc.params.grad.abs().sum() > 0
    if _native.available():
        with torch.no_grad():
            enc.params.uniform_(-1, 1)
        enc.engine = "native"
        with served_by("native", "hashgrid_forward"):
            a = enc(points)
        enc.engine = "torch"
        torch.testing.assert_close(a, enc(points), rtol=1e-5, atol=1e-6)


def test_module_tcnn_engine_needs_cuda_and_tinycudann():
    enc = HashGridEncoding(n_levels=2, log2_hashmap_size=8, engine="tcnn")
    with pytest.raises(EngineError):
        enc(torch.rand(3, 3))
