"""Native ops against their PyTorch references (values, gradients, speed), and the optional
GPU engines (nvdiffrast, tiny-cuda-nn) against ours.

Every native run happens under :class:`~avatar.selftest.core.NativeCalls`, which fails the
check unless the ``avatar::`` kernels themselves served it on the device under test. Both
engines are called through the public ops of :mod:`avatar.ops` with the engine forced.

Tolerances (``max |native - reference| / max |reference|``): fp32 values 1e-5 and
gradients 1e-4, as the op tests use; the fp16 hash table 2e-3 against the fp32 reference
with the unrounded table (fp16 keeps 11 significant bits: 4.9e-4 per stored value).
Triangle ids and ray samples must be identical on the CPU, where both engines do the
same float operations in the same order; on CUDA nvcc contracts multiply-adds, so a
pixel centre exactly on an edge, or a lattice point exactly on a cell border, may be
decided the other way: at most 1e-4 of pixels and 1e-3 of rays may differ there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from avatar.selftest.core import (
    CheckFailed,
    Comparison,
    DeviceContext,
    NativeCalls,
    Outcome,
    Skip,
    compare,
    mismatch,
    native_module,
    pow2,
    seeded,
)

FP32_VALUES = 1e-5
FP32_GRADS = 1e-4
FP16_TABLE = 2e-3
COMPOSITE_THRESHOLD = 1e-4


# ---------------------------------------------------------------------------
# axpy: the template op


def check_axpy(ctx: DeviceContext) -> Outcome:
    from avatar.ops.elementwise import axpy

    native_module(ctx.device)
    d, n = ctx.device, ctx.sizes.axpy
    with seeded(0):
        x, y, up = (torch.randn(n, device=d) for _ in range(3))

    def run(engine: str):
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = axpy(xl, yl, 0.75, engine=engine)
        out.backward(up)
        return out.detach(), xl.grad, yl.grad

    rec = NativeCalls()
    with rec:
        got = run("native")
    ops = rec.require(["axpy"], d)
    want = run("torch")
    cmp = [compare("value", got[0], want[0], FP32_VALUES), compare("grad x", got[1], want[1], FP32_GRADS),
           compare("grad y", got[2], want[2], FP32_GRADS)]
    return Outcome(cmp, f"{pow2(n)} elements", ctx.timed(lambda: run("native")), ctx.timed(lambda: run("torch")),
                   ops)


# ---------------------------------------------------------------------------
# Hash grid


def _hash_config(ctx: DeviceContext) -> tuple[dict[str, Any], int, str]:
    from avatar.ops.hashgrid import max_resolution_to_per_level_scale

    levels, features, log2_size, base, finest = ctx.sizes.hash_grid
    cfg = {"n_levels": levels, "log2_hashmap_size": log2_size, "base_resolution": base,
           "per_level_scale": max_resolution_to_per_level_scale(base, finest, levels)}
    return cfg, features, f"L={levels} F={features} T={log2_size} res {base}..{finest}"


def _edge_points(device: torch.device) -> torch.Tensor:
    """Cube faces and corners, the centre, and points outside the cube (clamped, zero gradient)."""
    values = torch.tensor([0.0, 1.0, 0.5, -0.2, 1.3], device=device)
    return torch.cartesian_prod(values, values, values)


def _hash_inputs(ctx: DeviceContext, n: int, seed: int):
    from avatar.ops.hashgrid import hash_grid_layout

    cfg, features, label = _hash_config(ctx)
    layout = hash_grid_layout(**cfg)
    d = ctx.device
    with seeded(seed):
        points = torch.rand(n, 3, device=d)
        table = torch.rand(layout.n_rows, features, device=d) * 2 - 1
        upstream = torch.randn(n, cfg["n_levels"] * features, device=d)
    edge = _edge_points(d)
    points[: edge.shape[0]] = edge[: points.shape[0]]
    return cfg, label, points, table, upstream


def _hash_native(points, table, upstream, cfg, grad_points: bool, grad_table: bool):
    from avatar.ops.hashgrid import hash_grid_encode

    p = points.detach().requires_grad_(grad_points)
    t = table.detach().requires_grad_(grad_table)
    out = hash_grid_encode(p, t, **cfg, engine="native")
    out.backward(upstream)
    return out.detach(), p.grad, t.grad


def _hash_reference(points, table, upstream, cfg, grad_points: bool, grad_table: bool, chunk: int):
    """The reference in chunks of points (its autograd keeps (N, 8) indices per level)."""
    from avatar.ops.hashgrid import hash_grid_encode

    n = points.shape[0]
    out = torch.empty(upstream.shape, device=points.device, dtype=points.dtype)
    grad_p = torch.empty_like(points) if grad_points else None
    t = table.detach().clone().requires_grad_(grad_table)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        p = points[start:stop].detach().clone().requires_grad_(grad_points)
        o = hash_grid_encode(p, t, **cfg, engine="torch")
        o.backward(upstream[start:stop])
        out[start:stop] = o.detach()
        if grad_p is not None:
            grad_p[start:stop] = p.grad
        del o, p
    return out, grad_p, t.grad


def _check_hashgrid_fp32(ctx: DeviceContext, n: int, seed: int, table_grad: bool) -> Outcome:
    """Native against reference at fp32: values and point gradients, or the table gradient."""
    native_module(ctx.device)
    cfg, label, points, table, upstream = _hash_inputs(ctx, n, seed=seed)
    want = (not table_grad, table_grad)  # (point gradients, table gradient)
    rec = NativeCalls()
    with rec:
        out_n, gp_n, gt_n = _hash_native(points, table, upstream, cfg, *want)
    ops = rec.require(["hashgrid_forward", "hashgrid_backward"], ctx.device)
    out_r, gp_r, gt_r = _hash_reference(points, table, upstream, cfg, *want, ctx.sizes.hash_chunk)
    if table_grad:
        cmp = [compare("grad table", gt_n, gt_r, FP32_GRADS)]
    else:
        cmp = [compare("value", out_n, out_r, FP32_VALUES), compare("grad points", gp_n, gp_r, FP32_GRADS)]
    del out_n, gp_n, gt_n, out_r, gp_r, gt_r
    t_n = ctx.timed(lambda: _hash_native(points, table, upstream, cfg, *want))
    t_r = ctx.timed(lambda: _hash_reference(points, table, upstream, cfg, *want, ctx.sizes.hash_chunk))
    return Outcome(cmp, f"{pow2(n)} points, {label}", t_n, t_r, ops)


def check_hashgrid(ctx: DeviceContext) -> Outcome:
    """Forward values and point gradients (fp32)."""
    return _check_hashgrid_fp32(ctx, ctx.sizes.hash_points, seed=1, table_grad=False)


def check_hashgrid_table_grad(ctx: DeviceContext) -> Outcome:
    """Table gradients (fp32): many points share a row, so the kernel's accumulation is under test."""
    return _check_hashgrid_fp32(ctx, ctx.sizes.hash_table_points, seed=2, table_grad=True)


def check_hashgrid_fp16(ctx: DeviceContext) -> Outcome:
    """An fp16 table (CUDA) against the fp32 reference on the unrounded fp32 table."""
    if not ctx.is_cuda:
        raise Skip("the fp16 table is a CUDA feature of the native kernel")
    native_module(ctx.device)
    n = ctx.sizes.hash_table_points
    cfg, label, points, table, upstream = _hash_inputs(ctx, n, seed=3)
    half = table.half()
    rec = NativeCalls()
    with rec:
        out_n, gp_n, gt_n = _hash_native(points, half, upstream, cfg, True, True)
    ops = rec.require(["hashgrid_forward", "hashgrid_backward"], ctx.device)
    if out_n.dtype != torch.float32:
        raise CheckFailed(f"an fp16 table with fp32 points must encode in fp32, got {out_n.dtype}")
    out_r, gp_r, gt_r = _hash_reference(points, table, upstream, cfg, True, True, ctx.sizes.hash_chunk)
    cmp = [compare("value", out_n, out_r, FP16_TABLE), compare("grad points", gp_n, gp_r, FP16_TABLE),
           compare("grad table", gt_n, gt_r, FP16_TABLE)]
    del out_n, gp_n, gt_n, out_r, gp_r, gt_r
    t_n = ctx.timed(lambda: _hash_native(points, half, upstream, cfg, True, True))
    t_r = ctx.timed(lambda: _hash_reference(points, table, upstream, cfg, True, True, ctx.sizes.hash_chunk))
    return Outcome(cmp, f"{pow2(n)} points, fp16 table, {label}", t_n, t_r, ops)


# ---------------------------------------------------------------------------
# Compositing and marching


def _composite_inputs(ctx: DeviceContext):
    """Packed rays (zero-sample rays included). sigma = k/2 and delta = m/128, so every
    s = sigma delta and every prefix sum is exact in float32 and float64 alike: the
    early-termination test ``T < 1e-4`` cannot fall differently by rounding in either engine
    (the nearest optical depths give T 0.3% and 0.06% away from the threshold)."""
    d, n_rays, most = ctx.device, ctx.sizes.composite_rays, ctx.sizes.composite_max_samples
    with seeded(4):
        counts = torch.randint(0, most + 1, (n_rays,), device=d)
        counts[::97] = 0
        offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
        n = int(offsets[-1])
        sigmas = torch.randint(0, 25, (n,), device=d).float() * 0.5
        sigmas[::7] = 0.0
        deltas = torch.randint(1, 9, (n,), device=d).float() / 128
        ts = torch.rand(n, device=d) * 4
        rgbs = torch.rand(n, 3, device=d)
        upstream = [torch.randn(n, device=d), torch.randn(n_rays, device=d), torch.randn(n_rays, device=d),
                    torch.randn(n_rays, 3, device=d)]
    return (sigmas, rgbs, deltas, ts), offsets, upstream


def _composite_run(inputs, offsets, upstream, engine: str):
    from avatar.ops.compositing import composite_rays

    leaves = [t.detach().requires_grad_() for t in inputs]
    out = composite_rays(*leaves, offsets, COMPOSITE_THRESHOLD, engine=engine)
    loss = sum((o * u).sum() for o, u in zip(out, upstream))
    loss.backward()
    return [o.detach() for o in out], [leaf.grad for leaf in leaves]


def check_composite(ctx: DeviceContext) -> Outcome:
    native_module(ctx.device)
    inputs, offsets, upstream = _composite_inputs(ctx)
    rec = NativeCalls()
    with rec:
        out_n, grad_n = _composite_run(inputs, offsets, upstream, "native")
    ops = rec.require(["composite_forward", "composite_backward"], ctx.device)
    out_r, grad_r = _composite_run(inputs, offsets, upstream, "torch")
    names = ("weights", "opacity", "depth", "colour")
    cmp = [compare(name, a, b, FP32_VALUES) for name, a, b in zip(names, out_n, out_r)]
    cmp += [compare(f"grad {name}", a, b, FP32_GRADS)
            for name, a, b in zip(("sigmas", "rgbs", "deltas", "ts"), grad_n, grad_r)]
    terminated = int(((out_r[0] == 0) & (inputs[0] > 0)).sum())
    n_samples, n_rays = inputs[0].numel(), offsets.numel() - 1
    t_n = ctx.timed(lambda: _composite_run(inputs, offsets, upstream, "native"))
    t_r = ctx.timed(lambda: _composite_run(inputs, offsets, upstream, "torch"))
    return Outcome(cmp, f"{pow2(n_rays)} rays, {n_samples:,} samples", t_n, t_r, ops,
                   [f"{terminated:,} samples past early termination (T < {COMPOSITE_THRESHOLD:g})"])


def _march_inputs(ctx: DeviceContext):
    from avatar.ops.compositing import pack_occupancy

    d, res, n = ctx.device, ctx.sizes.march_resolution, ctx.sizes.march_rays
    with seeded(5):
        mask = torch.zeros(res, res, res, dtype=torch.bool, device=d)
        mask[res // 4 : res // 2, res // 3 : (3 * res) // 4, 2 : res - 3] = True
        mask |= torch.rand(res, res, res, device=d) < 0.02
        origins = torch.rand(n, 3, device=d) * 3 - 1
        dirs = torch.randn(n, 3, device=d)
        dirs[: n // 8, 1:] = 0.0  # axis-aligned rays
        dirs[n // 8 : n // 4, 2] = 0.0
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins[n // 4 : n // 3] = torch.rand(n // 3 - n // 4, 3, device=d)  # starting inside
        jitter = torch.rand(n, device=d)
        near = torch.rand(n, device=d) * 0.5
    return pack_occupancy(mask), origins, dirs, near, jitter


MARCH_MAX_SAMPLES = 64
MARCH_FAR = 4.0
MARCH_BORDER = 1e-3
"""On CUDA a sample whose point lies within this many cells of a cell border (or whose t lies
within 1e-5 relative of ``far``) may be kept by one engine only: nvcc fuses ``o + t d`` into
one rounding, the reference rounds twice (a few 1e-5 cells at a 128^3 grid)."""


def _lattice_keys(samples, near: torch.Tensor, jitter: torch.Tensor, step: float, per_ray: int) -> torch.Tensor:
    """``ray * per_ray + k`` of each sample at t = near + (k + jitter) step (sorted: rays, then k)."""
    ray = samples.ray_indices
    k = torch.round((samples.ts.double() - near.double()[ray]) / step - jitter.double()[ray]).long()
    return ray * per_ray + k


def check_march(ctx: DeviceContext) -> Outcome:
    """The same lattice samples as the reference: exactly on the CPU; on CUDA, samples kept by one
    engine only must sit on a cell border (see :data:`MARCH_BORDER`), all but 1e-4 of them (the
    per-ray cap passes such a difference on to later samples), and common samples agree to 1e-6."""
    from avatar.ops.compositing import march_rays

    native_module(ctx.device)
    bits, origins, dirs, near, jitter = _march_inputs(ctx)
    res, step = ctx.sizes.march_resolution, ctx.sizes.march_step

    def run(engine: str):
        return march_rays(origins, dirs, bits, res, near, MARCH_FAR, step, MARCH_MAX_SAMPLES, jitter, engine=engine)

    rec = NativeCalls()
    with rec:
        a = run("native")
    ops = rec.require(["occupancy_march"], ctx.device)
    b = run("torch")
    if b.ts.numel() == 0:
        raise CheckFailed("the reference placed no samples: the test scene is broken")
    per_ray = int(math.ceil(MARCH_FAR / step)) + 2
    keys_a, keys_b = _lattice_keys(a, near, jitter, step, per_ray), _lattice_keys(b, near, jitter, step, per_ray)
    in_b, in_a = torch.isin(keys_a, keys_b), torch.isin(keys_b, keys_a)
    only = torch.cat((keys_a[~in_b], keys_b[~in_a]))
    excused = torch.zeros_like(only, dtype=torch.bool)
    if ctx.is_cuda and only.numel():
        ray, k = only // per_ray, only % per_ray
        t = near.double()[ray] + (k.double() + jitter.double()[ray]) * step
        grid = (origins.double()[ray] + t[:, None] * dirs.double()[ray]) * res
        on_border = (grid - grid.round()).abs().min(-1).values < MARCH_BORDER
        excused = on_border | ((t - MARCH_FAR).abs() < 1e-5 * MARCH_FAR)
    total = max(b.ts.numel(), 1)
    cmp = [Comparison("samples kept by one engine only", float((~excused).sum()) / total,
                      1e-4 if ctx.is_cuda else 0.0, kind="fraction"),
           compare("t of common samples", a.ts[in_b], b.ts[in_a], 1e-6 if ctx.is_cuda else 0.0)]
    t_n = ctx.timed(lambda: run("native"))
    t_r = ctx.timed(lambda: run("torch"))
    notes = [f"{int(excused.sum())} samples on a cell border kept by one engine only"] if ctx.is_cuda else []
    return Outcome(cmp, f"{pow2(origins.shape[0])} rays, {res}^3 grid, {b.ts.numel():,} samples", t_n, t_r, ops,
                   notes)


# ---------------------------------------------------------------------------
# Rasterisation


def _raster_scene(ctx: DeviceContext):
    """Random small triangles at random depths (some beyond the near/far planes), screen-filling
    triangles (a far background, a tilted one cutting through the others), triangles with
    vertices behind the eye (w < 0, crossing w = 0, and wholly behind), degenerate ones, and a
    lattice with shared edges through pixel centres. Returns (pos (B, V, 4), faces (F, 3) int32)."""
    if "raster" in ctx.cache:
        return ctx.cache["raster"]
    d = ctx.device
    batch, (height, width), n_random = ctx.sizes.raster_batch, ctx.sizes.raster_resolution, ctx.sizes.raster_triangles
    tris: list[torch.Tensor] = []  # (B, k, 3, 4) clip-space corners
    with seeded(6):
        size = 5.0 * 2.0 / min(height, width)  # about 5 pixels
        centre = torch.rand(batch, n_random, 1, 2, device=d) * 2.2 - 1.1
        xy = centre + size * torch.randn(batch, n_random, 3, 2, device=d)
        z = (torch.rand(batch, n_random, 1, 1, device=d) * 2.3 - 1.15) + 0.01 * torch.randn(
            batch, n_random, 3, 1, device=d)
        w = torch.rand(batch, n_random, 3, 1, device=d) * 1.5 + 0.5
        tris.append(torch.cat((xy * w, z * w, w), -1))
        # Crossing w = 0: one or two corners behind the eye; and one wholly behind.
        k = 8
        crossing = torch.rand(batch, k, 3, 4, device=d) * 2 - 1
        crossing[..., 3] = torch.rand(batch, k, 3, device=d) * 1.5 + 0.3
        crossing[:, :, 0, 3] *= -1.0
        crossing[:, k // 2 :, 1, 3] *= -1.0
        crossing[..., 2] = crossing[..., 2].abs() * 0.5 * crossing[..., 3].abs()
        tris.append(crossing)
        behind = torch.rand(batch, 1, 3, 4, device=d) * 2 - 1
        behind[..., 3] = -(torch.rand(batch, 1, 3, device=d) + 0.2)
        tris.append(behind)
    # Screen-filling: a tilted plane through the scene and a far background. In image 0 both
    # lie inside the view volume (every pixel covered); in the others the plane crosses the
    # far plane and the background lies beyond it (clipped: empty pixels).
    big = torch.tensor([[[-3.0, -3.0, -0.6, 1.0], [5.0, -3.0, 0.8, 1.0], [-3.0, 5.0, 0.1, 1.0]],
                        [[-3.0, -3.0, 0.97, 1.0], [5.0, -3.0, 0.97, 1.0], [-3.0, 5.0, 0.97, 1.0]]], device=d)
    big = big.expand(batch, -1, -1, -1).clone()
    big[1:, 0, :, 2] = torch.tensor([-0.6, 1.8, 0.4], device=d)
    big[1:, 1, :, 2] = 1.2
    tris.append(big)
    # Degenerate: collinear corners, and a repeated corner.
    degenerate = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]],
                               [[0.2, 0.1, 0.0, 1.0], [0.2, 0.1, 0.0, 1.0], [0.6, 0.4, 0.0, 1.0]]], device=d)
    tris.append(degenerate.expand(batch, -1, -1, -1))
    soup = torch.cat(tris, 1)  # (B, F0, 3, 4)
    pos = soup.reshape(batch, -1, 4)
    faces = torch.arange(pos.shape[1], device=d, dtype=torch.int32).view(-1, 3)
    # A lattice with vertices on pixel centres (shared edges: the top-left rule), in front.
    cells, spacing = 8, max(2, min(height, width) // 32)
    ix = torch.arange(cells + 1, device=d) * spacing + width // 4
    iy = torch.arange(cells + 1, device=d) * spacing + height // 4
    gy, gx = torch.meshgrid(iy, ix, indexing="ij")
    lx = (2 * gx.reshape(-1).double() + 1) / width - 1
    ly = (2 * gy.reshape(-1).double() + 1) / height - 1
    lattice = torch.stack((lx, ly, torch.full_like(lx, -0.9), torch.ones_like(lx)), -1).float()
    idx = torch.arange((cells + 1) ** 2, device=d).view(cells + 1, cells + 1)
    a, b, c, e = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    lfaces = torch.cat((torch.stack((a, b, e), -1).reshape(-1, 3), torch.stack((a, e, c), -1).reshape(-1, 3)))
    faces = torch.cat((faces, (lfaces + pos.shape[1]).int()))
    pos = torch.cat((pos, lattice.expand(batch, -1, -1)), 1).contiguous()
    ctx.cache["raster"] = (pos, faces.contiguous())
    return ctx.cache["raster"]


def _raster_label(ctx: DeviceContext, faces: torch.Tensor) -> str:
    h, w = ctx.sizes.raster_resolution
    return f"{ctx.sizes.raster_batch} x {h}x{w}, {faces.shape[0]:,} triangles (screen-filling, w<0)"


def _id_tolerance(ctx: DeviceContext) -> float:
    return 1e-4 if ctx.is_cuda else 0.0


def check_rasterize(ctx: DeviceContext) -> Outcome:
    from avatar.ops.raster import rasterize

    native_module(ctx.device)
    pos, faces = _raster_scene(ctx)
    res = ctx.sizes.raster_resolution
    p_n, p_r = pos.clone().requires_grad_(), pos.clone().requires_grad_()
    rec = NativeCalls()
    with rec:
        rast_k, _ = rasterize(pos, faces, res, engine="native")  # the kernel's own (u, v, z/w, id)
        rast_n, _ = rasterize(p_n, faces, res, engine="native")  # ids from the kernel, (u, v) differentiable
    ops = rec.require(["rasterize_fwd"], ctx.device)
    rast_r, _ = rasterize(p_r, faces, res, engine="torch")
    differs = (rast_k[..., 3] != rast_r[..., 3]) | (rast_n[..., 3] != rast_r[..., 3])
    same = ~differs
    covered = float((rast_r[0, ..., 3] > 0).float().mean())
    if covered < 1.0:
        raise CheckFailed(f"the screen-filling triangles cover only {covered:.2%} of the reference's image 0")
    with seeded(7):
        upstream = torch.randn(*rast_r.shape[:3], 2, device=ctx.device) * same[..., None]
    (rast_n[..., :2] * upstream).sum().backward()
    (rast_r[..., :2] * upstream).sum().backward()
    want = rast_r[..., :3].detach()[same]
    cmp = [mismatch("triangle ids", differs, _id_tolerance(ctx)),
           compare("u, v, z/w (kernel)", rast_k[..., :3][same], want, FP32_VALUES),
           compare("u, v, z/w (differentiable)", rast_n[..., :3].detach()[same], want, FP32_VALUES),
           compare("grad pos", p_n.grad, p_r.grad, FP32_GRADS)]
    t_n = ctx.timed(lambda: rasterize(pos, faces, res, engine="native"))
    t_r = ctx.timed(lambda: rasterize(pos, faces, res, engine="torch"))
    return Outcome(cmp, _raster_label(ctx, faces), t_n, t_r, ops)


def check_interpolate(ctx: DeviceContext) -> Outcome:
    from avatar.ops.raster import interpolate, rasterize

    native_module(ctx.device)
    pos, faces = _raster_scene(ctx)
    res = ctx.sizes.raster_resolution
    with seeded(8):
        attr = torch.randn(pos.shape[1], 4, device=ctx.device)
        upstream = torch.randn(pos.shape[0], *res, 4, device=ctx.device)

    def run(engine: str):
        # The same (native) rasterisation feeds both engines, so only interpolate differs.
        p, a = pos.clone().requires_grad_(), attr.clone().requires_grad_()
        rast, _ = rasterize(p, faces, res, engine="native")
        out = interpolate(a, rast, faces, engine=engine)
        (out * upstream).sum().backward()
        return out.detach(), a.grad, p.grad

    rec = NativeCalls()
    with rec:
        got = run("native")
    ops = rec.require(["interpolate_fwd", "interpolate_grad_rast"], ctx.device)
    want = run("torch")
    cmp = [compare("value", got[0], want[0], FP32_VALUES), compare("grad attr", got[1], want[1], FP32_GRADS),
           compare("grad pos", got[2], want[2], FP32_GRADS)]
    p_leaf = pos.clone().requires_grad_()
    rast, _ = rasterize(p_leaf, faces, res, engine="native")
    a_leaf = attr.clone().requires_grad_()

    def op_only(engine: str):
        out = interpolate(a_leaf, rast, faces, engine=engine)
        return torch.autograd.grad((out * upstream).sum(), (a_leaf, rast))

    return Outcome(cmp, _raster_label(ctx, faces), ctx.timed(lambda: op_only("native")),
                   ctx.timed(lambda: op_only("torch")), ops)


def check_antialias(ctx: DeviceContext) -> Outcome:
    from avatar.ops.raster import antialias, interpolate, opposite_vertices, rasterize
    from avatar.ops.reference import raster as reference

    native_module(ctx.device)
    pos, faces = _raster_scene(ctx)
    res = ctx.sizes.raster_resolution
    with torch.no_grad():
        rast, _ = rasterize(pos, faces, res, engine="native")
    with seeded(9):
        colours = torch.rand(pos.shape[1], 3, device=ctx.device)
        upstream = torch.randn(pos.shape[0], *res, 3, device=ctx.device)
    color = interpolate(colours, rast, faces, engine="torch").detach()
    codes_n = torch.ops.avatar.antialias_analysis(rast, pos, faces, opposite_vertices(faces))
    codes_r = reference.antialias_analysis(rast, pos, faces, opposite_vertices(faces))
    differs = (codes_n != codes_r).any(-1)
    # A pair decided differently changes both its pixels: compare the rest.
    near = torch.nn.functional.max_pool2d(differs[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    keep = (~near)[..., None]
    upstream = upstream * keep

    def run(engine: str):
        c, p = color.clone().requires_grad_(), pos.clone().requires_grad_()
        out = antialias(c, rast, p, faces, engine=engine)
        (out * upstream).sum().backward()
        return out.detach(), c.grad, p.grad

    rec = NativeCalls()
    with rec:
        got = run("native")
    ops = rec.require(["antialias_analysis"], ctx.device)
    want = run("torch")
    edges = int((codes_r >= 0).sum())
    if edges == 0:
        raise CheckFailed("the reference found no silhouette edge: the test scene is broken")
    mask = keep.expand_as(got[0])
    cmp = [mismatch("edge codes", differs, _id_tolerance(ctx)),
           compare("value", got[0], want[0], FP32_VALUES, mask=mask),
           compare("grad color", got[1], want[1], FP32_GRADS, mask=mask),
           compare("grad pos", got[2], want[2], FP32_GRADS)]
    return Outcome(cmp, _raster_label(ctx, faces), ctx.timed(lambda: run("native")),
                   ctx.timed(lambda: run("torch")), ops, [f"{edges:,} silhouette edge crossings"])


# ---------------------------------------------------------------------------
# Optional GPU engines against ours


def _sphere_scene(device: torch.device, resolution: int = 512):
    """A subdivided sphere from two distances: clip-space positions (2, V, 4) and faces."""
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    verts = torch.as_tensor(mesh.vertices, dtype=torch.float64)
    faces = torch.as_tensor(mesh.faces, dtype=torch.int32)
    f = 1.0 / math.tan(math.radians(40.0) / 2)
    near, far = 0.5, 10.0
    proj = torch.tensor([[f, 0, 0, 0], [0, f, 0, 0],
                         [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)], [0, 0, -1, 0]],
                        dtype=torch.float64)
    clips = []
    for distance in (3.5, 5.0):
        view = torch.eye(4, dtype=torch.float64)
        view[2, 3] = -distance
        homo = torch.cat((verts, torch.ones(len(verts), 1, dtype=torch.float64)), 1)
        clips.append((homo @ (proj @ view).T).float())
    return torch.stack(clips).contiguous().to(device), faces.to(device), (resolution, resolution)


def check_nvdiffrast(ctx: DeviceContext) -> Outcome:
    """nvdiffrast against our engine. It snaps vertices to 1/16 pixel, so up to 1% of covered
    pixels may see another triangle; where both see the same one, barycentrics and depth agree
    to 1e-3; interpolation of the same rast to 1e-5 (values) and 1e-4 (gradients); its
    antialiasing of the same image differs by more than 1e-3 at no more than 0.1% of pixels."""
    from avatar.ops.engine import gpu_engine_present
    from avatar.ops.raster import antialias, interpolate, rasterize

    if not ctx.is_cuda:
        raise Skip("nvdiffrast needs a CUDA device")
    if not gpu_engine_present("nvdiffrast"):
        raise Skip("nvdiffrast not installed")
    native_module(ctx.device)
    pos, faces, res = _sphere_scene(ctx.device)
    rast_nv, _ = rasterize(pos, faces, res, engine="nvdiffrast")
    rast_our, _ = rasterize(pos, faces, res, engine="native")
    ids_nv, ids_our = rast_nv[..., 3], rast_our[..., 3]
    covered = (ids_nv > 0) | (ids_our > 0)
    if not bool(covered.any()):
        raise CheckFailed("neither engine drew the sphere")
    same = (ids_nv == ids_our) & (ids_our > 0)
    cmp = [mismatch("triangle ids (covered pixels)", (ids_nv != ids_our)[covered], 1e-2),
           compare("u, v, z/w", rast_nv[..., :3][same], rast_our[..., :3][same], 1e-3)]
    with seeded(10):
        attr = torch.randn(pos.shape[1], 3, device=ctx.device)
        upstream = torch.randn(pos.shape[0], *res, 3, device=ctx.device)
    outs = {}
    for engine in ("nvdiffrast", "native"):
        a = attr.clone().requires_grad_()
        out = interpolate(a, rast_nv, faces, engine=engine)
        (out * upstream).sum().backward()
        outs[engine] = (out.detach(), a.grad)
    cmp += [compare("interpolate", outs["nvdiffrast"][0], outs["native"][0], FP32_VALUES),
            compare("interpolate grad attr", outs["nvdiffrast"][1], outs["native"][1], FP32_GRADS)]
    color = outs["native"][0]
    aa_nv = antialias(color, rast_nv, pos, faces, engine="nvdiffrast")
    aa_our = antialias(color, rast_nv, pos, faces, engine="native")
    cmp.append(mismatch("antialias pixels off by > 1e-3", ((aa_nv - aa_our).abs() > 1e-3).any(-1), 1e-3))
    t_nv = ctx.timed(lambda: rasterize(pos, faces, res, engine="nvdiffrast"))
    t_our = ctx.timed(lambda: rasterize(pos, faces, res, engine="native"))
    return Outcome(cmp, f"2 x {res[0]}x{res[1]}, sphere of {faces.shape[0]:,} triangles",
                   notes=[f"rasterize: nvdiffrast {t_nv * 1e3:.2f} ms, ours {t_our * 1e3:.2f} ms"])


def check_tcnn(ctx: DeviceContext) -> Outcome:
    """tiny-cuda-nn's HashGrid against ours on one parameter table: values to 1e-4 and table
    gradients to 1e-3 (its own interpolation order and atomics)."""
    from avatar.ops.engine import gpu_engine_present
    from avatar.ops.hashgrid import HashGridEncoding

    if not ctx.is_cuda:
        raise Skip("tiny-cuda-nn needs a CUDA device")
    if not gpu_engine_present("tcnn"):
        raise Skip("tiny-cuda-nn (tinycudann) not installed")
    native_module(ctx.device)
    cfg, features, label = _hash_config(ctx)
    kwargs = {**cfg, "n_features_per_level": features}
    ours = HashGridEncoding(**kwargs, engine="native").to(ctx.device)
    theirs = HashGridEncoding(**kwargs, engine="tcnn").to(ctx.device)
    n = 1 << 20
    with seeded(11), torch.no_grad():
        ours.params.uniform_(-1.0, 1.0)
        points = torch.rand(n, 3, device=ctx.device)
        upstream = torch.randn(n, ours.n_output_dims, device=ctx.device)
    with torch.no_grad():
        theirs.params.copy_(ours.params)
    out_t = theirs(points)
    out_o = ours(points)
    (out_t.float() * upstream).sum().backward()
    (out_o * upstream).sum().backward()
    cmp = [compare("value", out_t.detach().float(), out_o.detach(), 1e-4),
           compare("grad table", theirs.params.grad, ours.params.grad, 1e-3)]
    t_t = ctx.timed(lambda: theirs(points).float().sum().backward())
    t_o = ctx.timed(lambda: ours(points).sum().backward())
    return Outcome(cmp, f"{pow2(n)} points, {label}",
                   notes=[f"forward + backward: tiny-cuda-nn {t_t * 1e3:.2f} ms, ours {t_o * 1e3:.2f} ms"])
