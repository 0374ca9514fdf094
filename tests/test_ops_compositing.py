"""Ray compositing and occupancy-grid marching: native kernels against the references.

Compositing: forward within 1e-5 relative (fp32), gradients within 1e-4, on
packed rays of random lengths including zero-sample rays, with and without early
termination, for several channel counts; gradcheck in float64; an analytic
constant-density ray. Marching: the native marcher (which skips empty cells)
returns exactly the reference's samples; the occupancy grid updates from a
density callback and keeps samples out of empty space.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import served_by

from avatar import _native
from avatar.ops.compositing import (
    OccupancyGrid,
    composite_rays,
    march_rays,
    occupancy_lookup,
    pack_occupancy,
    unpack_occupancy,
)

native = pytest.mark.skipif(not _native.available(), reason="native extension unavailable")
ENGINES = ["torch", pytest.param("native", marks=native)]


def _packed(n_rays: int, max_samples: int, channels: int = 3, dtype=torch.float32, seed: int = 0,
            density: float = 20.0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_samples + 1, (n_rays,), generator=g)
    counts[0] = 0
    counts[n_rays // 2] = 0
    counts[-1] = 0
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), counts.cumsum(0)))
    n = int(offsets[-1])
    sigmas = (torch.rand(n, generator=g, dtype=torch.float64) * density).to(dtype)
    sigmas[::7] = 0.0  # empty space inside rays
    rgbs = torch.rand(n, channels, generator=g, dtype=torch.float64).to(dtype)
    deltas = (torch.rand(n, generator=g, dtype=torch.float64) * 0.05 + 0.002).to(dtype)
    ts = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) * 4
    return sigmas, rgbs, deltas, ts, offsets


def _run(engine, inputs, offsets, threshold, upstream=None, use=(True, True, True, True)):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with served_by(engine, "composite_forward", "composite_backward"):
        out = composite_rays(*leaves, offsets, threshold, engine=engine)
        if upstream is None:
            g = torch.Generator().manual_seed(99)
            upstream = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out]
        loss = sum((o * u).sum() for o, u, keep in zip(out, upstream, use) if keep)
        loss.backward()
    return [o.detach() for o in out], [t.grad for t in leaves], upstream


def _assert_close(a, b, rtol):
    if a is None or b is None:  # an input the used outputs do not depend on
        a, b = (torch.zeros_like(b) if a is None else a), (torch.zeros_like(a) if b is None else b)
    scale = float(b.abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(scale, 1e-12))


@native
@pytest.mark.parametrize("channels", [1, 3, 4, 6])
@pytest.mark.parametrize("threshold", [0.0, 1e-4, 0.3])
def test_native_matches_reference(channels, threshold):
    *inputs, offsets = _packed(300, 96, channels, seed=channels)
    out_r, grad_r, upstream = _run("torch", inputs, offsets, threshold)
    out_n, grad_n, _ = _run("native", inputs, offsets, threshold, upstream)
    for a, b in zip(out_n, out_r):
        _assert_close(a, b, 1e-5)
    for a, b in zip(grad_n, grad_r):
        _assert_close(a, b, 1e-4)
    if threshold == 0.3:  # termination really happened
        assert (out_r[0] == 0).sum() > (inputs[0] == 0).sum()


@native
def test_native_gradients_when_outputs_are_unused():
    *inputs, offsets = _packed(200, 64, seed=4)
    for use in [(False, True, False, False), (False, False, True, True), (True, False, False, False)]:
        out_r, grad_r, upstream = _run("torch", inputs, offsets, 1e-4, use=use)
        _, grad_n, _ = _run("native", inputs, offsets, 1e-4, upstream, use=use)
        for a, b in zip(grad_n, grad_r):
            _assert_close(a, b, 1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_gradcheck_float64(engine):
    *inputs, offsets = _packed(6, 7, 3, dtype=torch.float64, seed=1, density=5.0)
    leaves = [t.clone().requires_grad_(True) for t in inputs]

    def fn(sigmas, rgbs, deltas, ts):
        return tuple(composite_rays(sigmas, rgbs, deltas, ts, offsets, 0.0, engine=engine))

    with served_by(engine, "composite_forward", "composite_backward"):
        assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ENGINES)
def test_constant_density_ray_matches_analytic_values(engine):
    sigma, length, n = 2.0, 1.5, 1000
    delta = length / n
    ts = (torch.arange(n, dtype=torch.float64) + 0.5) * delta
    with served_by(engine, "composite_forward"):
        out = composite_rays(
            torch.full((n,), sigma, dtype=torch.float64),
            torch.full((n, 3), 0.25, dtype=torch.float64),
            torch.full((n,), delta, dtype=torch.float64),
            ts,
            torch.tensor([0, n]),
            0.0,
            engine=engine,
        )
    opacity = 1 - math.exp(-sigma * length)
    assert out.opacity.item() == pytest.approx(opacity, rel=1e-9)
    torch.testing.assert_close(out.colour, torch.full((1, 3), 0.25 * opacity, dtype=torch.float64))
    # E[t] over the exponential density truncated at `length` (midpoint quadrature, O(delta^2)).
    depth = 1 / sigma - math.exp(-sigma * length) * (length + 1 / sigma)
    assert out.depth.item() == pytest.approx(depth, rel=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_early_termination_and_empty_rays(engine):
    n = 64
    sigmas = torch.full((n,), 50.0)
    with served_by(engine, "composite_forward"):
        out = composite_rays(sigmas, torch.ones(n, 3), torch.full((n,), 0.05), torch.arange(n).float(),
                             torch.tensor([0, 0, n, n]), 1e-3, engine=engine)
    w = out.weights
    trans = torch.exp(-torch.cumsum(sigmas * 0.05, 0) + sigmas * 0.05)
    active = trans >= 1e-3
    assert (w[~active] == 0).all() and (w[active] > 0).all() and not active.all()
    assert out.opacity[1] >= 1 - 1e-3
    assert out.opacity[0] == 0 and out.opacity[2] == 0 and (out.colour[[0, 2]] == 0).all()
    empty = composite_rays(torch.zeros(0), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0),
                           torch.zeros(4, dtype=torch.long), engine=engine)
    assert empty.opacity.shape == (3,) and not empty.opacity.any() and empty.colour.shape == (3, 3)


def test_offsets_are_validated():
    s = torch.rand(5)
    with pytest.raises(ValueError, match="offsets"):
        composite_rays(s, torch.rand(5, 3), s, s, torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="offsets"):
        composite_rays(s, torch.rand(5, 3), s, s, torch.tensor([0, 4]))
    with pytest.raises(TypeError):
        composite_rays(s.double(), torch.rand(5, 3), s, s, torch.tensor([0, 5]))


# --- occupancy grid ---------------------------------------------------------------


def _grid_mask(res: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(res, res, res, dtype=torch.bool)
    mask[res // 4 : res // 2, res // 3 : (3 * res) // 4, 2 : res - 3] = True
    mask |= torch.rand(res, res, res, generator=g) < 0.02
    return mask


def test_pack_unpack_and_lookup():
    res = 10  # 1000 cells: not a multiple of 8 bytes of bits
    mask = _grid_mask(res)
    bits = pack_occupancy(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == 125
    assert torch.equal(unpack_occupancy(bits, res), mask)
    ijk = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = (ijk.float() + 0.5) / res
    assert torch.equal(occupancy_lookup(centres, bits, res), mask.reshape(-1))
    outside = torch.tensor([[-0.01, 0.5, 0.5], [0.5, 1.01, 0.5]])
    assert not occupancy_lookup(outside, torch.full_like(bits, 255), res).any()
    assert occupancy_lookup(torch.tensor([[1.0, 1.0, 1.0]]), torch.full_like(bits, 255), res).all()


def _rays(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    origins = torch.rand(n, 3, generator=g) * 3 - 1
    dirs = torch.randn(n, 3, generator=g)
    dirs[: n // 8, 1:] = 0.0  # axis-aligned rays
    dirs[n // 8 : n // 4, 2] = 0.0
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins[n // 4 : n // 3] = torch.rand(n // 3 - n // 4, 3, generator=g)  # starting inside
    jitter = torch.rand(n, generator=g)
    return origins, dirs, jitter


@native
@pytest.mark.parametrize("res,step,max_samples", [(16, 0.01, 100000), (32, 0.003, 100000), (24, 0.02, 5)])
def test_native_march_equals_reference(res, step, max_samples):
    bits = pack_occupancy(_grid_mask(res, seed=res))
    origins, dirs, jitter = _rays(600, seed=res)
    near = torch.rand(600) * 0.5
    with served_by("native", "occupancy_march"):
        a = march_rays(origins, dirs, bits, res, near, 4.0, step, max_samples, jitter, engine="native")
    b = march_rays(origins, dirs, bits, res, near, 4.0, step, max_samples, jitter, engine="torch")
    assert a.ts.numel() > 50
    assert torch.equal(a.offsets, b.offsets)
    assert torch.equal(a.ts, b.ts)
    assert torch.equal(a.ray_indices, b.ray_indices)
    assert torch.equal(a.deltas, b.deltas) and (a.deltas == step).all()
    assert occupancy_lookup(a.points(origins, dirs), bits, res).all()
    if max_samples == 5:
        assert (a.offsets.diff() <= 5).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_march_skips_empty_grid_and_fills_full_grid(engine):
    res = 8
    origins = torch.tensor([[0.5, 0.5, -1.0], [2.0, 2.0, 2.0]])
    dirs = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # the second misses the cube
    empty = torch.zeros((res**3 + 7) // 8, dtype=torch.uint8)
    full = torch.full_like(empty, 255)
    with served_by(engine, "occupancy_march") as calls:
        none = march_rays(origins, dirs, empty, res, 0.0, 3.0, 0.01, engine=engine)
        assert none.ts.numel() == 0 and none.offsets.tolist() == [0, 0, 0]
        every = march_rays(origins, dirs, full, res, 0.0, 3.0, 0.01, engine=engine)
    assert calls["occupancy_march"] == (2 if engine == "native" else 0)
    # Samples at t = (k + 0.5) * 0.01 with z = t - 1 in [0, 1]: k = 100 ... 199.
    assert every.offsets.tolist() == [0, 100, 100]
    torch.testing.assert_close(every.ts, (torch.arange(100, 200) + 0.5) * 0.01)


def _sphere_density(points: torch.Tensor) -> torch.Tensor:
    return torch.where((points - 0.5).norm(dim=-1) < 0.3, 10.0, 0.0)


def test_occupancy_grid_update_and_sampling():
    grid = OccupancyGrid(resolution=16, update_every=4, decay=0.5, threshold=0.01, warmup_steps=100)
    assert grid.occupancy == 1.0
    assert not grid.update(3, _sphere_density)
    assert grid.update(4, _sphere_density, generator=torch.Generator().manual_seed(0))
    centres = grid.cell_centres()
    inside = (centres - 0.5).norm(dim=-1) < 0.3 - math.sqrt(3) / 16
    outside = (centres - 0.5).norm(dim=-1) > 0.3 + math.sqrt(3) / 16
    occupied = grid.occupied(centres)
    assert occupied[inside].all() and not occupied[outside].any()
    assert 0.05 < grid.occupancy < 0.3
    # Decayed maximum: stored densities halve at the next update where the field is gone.
    before = grid.density.clone()
    grid.update(8, lambda p: torch.zeros(p.shape[0]), force=True)
    torch.testing.assert_close(grid.density, before * 0.5)
    # Sampling through the grid lands only in occupied cells, and never outside the sphere's cells.
    grid.update(12, _sphere_density)
    origins = torch.tensor([[0.5, 0.5, -0.5], [0.05, 0.05, -0.5]])
    dirs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    samples = grid.sample(origins, dirs, 0.0, 2.0, 0.005)
    assert samples.offsets[2] == samples.offsets[1]  # the corner ray sees only empty space
    assert grid.occupied(samples.points(origins, dirs)).all()
    assert 100 < samples.ts.numel() < 160  # about the sphere's diameter (0.6) / step, plus cell slack


def test_occupancy_grid_state_dict_round_trip():
    grid = OccupancyGrid(resolution=8)
    grid.update(0, _sphere_density)
    copy = OccupancyGrid(resolution=8)
    copy.load_state_dict(grid.state_dict())
    assert torch.equal(copy.bitfield, grid.bitfield) and torch.equal(copy.density, grid.density)
