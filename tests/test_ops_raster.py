"""Triangle rasterisation, interpolation and antialiasing: native engine against the
PyTorch reference (values and gradients), nvdiffrast's conventions, and analytic
cases (a sphere's silhouette area and depth, a moving silhouette edge)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import trimesh
from support import served_by

from avatar import _native
from avatar.ops import raster
from avatar.ops.engine import EngineError
from avatar.ops.reference import raster as ref

# --------------------------------------------------------------------------
# helpers


def perspective(fov_y_deg: float, aspect: float, near: float, far: float) -> torch.Tensor:
    """OpenGL projection matrix (camera looks down -z)."""
    f = 1.0 / math.tan(math.radians(fov_y_deg) / 2)
    return torch.tensor(
        [
            [f / aspect, 0, 0, 0],
            [0, f, 0, 0],
            [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
            [0, 0, -1, 0],
        ],
        dtype=torch.float64,
    )


def camera_on_z(distance: float) -> torch.Tensor:
    """View matrix of a camera at (0, 0, distance) looking at the origin, +y up."""
    view = torch.eye(4, dtype=torch.float64)
    view[2, 3] = -distance
    return view


def to_clip(vertices: torch.Tensor, mvp: torch.Tensor) -> torch.Tensor:
    homo = torch.cat([vertices.double(), torch.ones(len(vertices), 1, dtype=torch.float64)], 1)
    return (homo @ mvp.T).float().contiguous()


def random_scene(seed: int, batch: int = 2, num_vertices: int = 60, num_faces: int = 90):
    """Random clip-space triangles with the awkward cases mixed in: vertices behind
    the camera (w < 0), triangles crossing w = 0 and the near/far planes, repeated
    vertex indices, collinear vertices, a non-finite vertex and exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.empty(batch, num_vertices, 4)
    pos[..., :2] = torch.rand(batch, num_vertices, 2, generator=g) * 2.4 - 1.2
    pos[..., 3] = torch.rand(batch, num_vertices, generator=g) * 1.5 + 0.5
    pos[..., 2] = (torch.rand(batch, num_vertices, generator=g) * 2.4 - 1.2) * pos[..., 3]
    pos[..., :2] *= pos[..., 3:4]
    pos[:, :6, 3] *= -1.0  # behind the eye
    pos[:, 6:9, 2] = -3.0 * pos[:, 6:9, 3].abs()  # beyond the near plane
    pos[:, 9] = (pos[:, 10] + pos[:, 11]) / 2  # collinear with 10 and 11
    pos[1, 12, 0] = float("nan")
    faces = torch.randint(0, num_vertices, (num_faces, 3), generator=g, dtype=torch.int32)
    faces[0] = torch.tensor([0, 1, 2])  # all behind
    faces[1] = torch.tensor([0, 20, 21])  # crossing w = 0
    faces[2] = torch.tensor([3, 4, 22])  # crossing w = 0
    faces[3] = torch.tensor([6, 23, 24])  # crossing the near plane
    faces[4] = torch.tensor([9, 10, 11])  # degenerate: collinear
    faces[5] = torch.tensor([30, 30, 31])  # degenerate: repeated index
    faces[6] = torch.tensor([12, 32, 33])  # non-finite in image 1
    faces[7] = faces[8]  # exact duplicate: same depth, the lower id wins
    return pos.contiguous(), faces.contiguous()


def icosphere(subdivisions: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit icosphere rotated so that one vertex is exactly at (0, 0, 1) and its
    antipode at (0, 0, -1)."""
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    top = v[0] / np.linalg.norm(v[0])
    rot = trimesh.geometry.align_vectors(top, [0.0, 0.0, 1.0])[:3, :3]
    v = v @ rot.T
    for k in np.nonzero(np.abs(np.abs(v[:, 2]) - 1.0) < 1e-9)[0]:
        v[k] = (0.0, 0.0, np.sign(v[k, 2]))
    return torch.from_numpy(v), torch.from_numpy(np.asarray(mesh.faces)).int()


def sphere_scene(resolution: int = 127, distance: float = 4.0, fov: float = 40.0, subdivisions: int = 4):
    vertices, faces = icosphere(subdivisions)
    mvp = perspective(fov, 1.0, 0.5, 10.0) @ camera_on_z(distance)
    return to_clip(vertices, mvp), faces, (resolution, resolution)


def assert_same_rast(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a[..., 3], b[..., 3]), f"{int((a[..., 3] != b[..., 3]).sum())} pixels see other triangles"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# rasterize: native equals reference


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("resolution", [(37, 53), (64, 64)])
def test_rasterize_native_matches_reference(seed, resolution):
    pos, faces = random_scene(seed)
    with served_by("native", "rasterize_fwd"):
        native, _ = raster.rasterize(pos, faces, resolution, engine="native")
    with served_by("torch"):
        torch_rast, _ = raster.rasterize(pos, faces, resolution, engine="torch")
    assert native.shape == (2, *resolution, 4) and native.dtype == torch.float32
    assert (native[..., 3] > 0).float().mean() > 0.5  # a busy scene
    assert_same_rast(native, torch_rast)
    # The barycentrics recomputed for gradients equal the kernel's own.
    with served_by("native", "rasterize_fwd"):
        with_grad, _ = raster.rasterize(pos.clone().requires_grad_(), faces, resolution, engine="native")
    assert_same_rast(with_grad.detach(), native)


def test_rasterize_awkward_triangles_cover_nothing():
    pos, faces = random_scene(0)
    with served_by("native", "rasterize_fwd") as calls:
        for bad in (0, 4, 5):  # behind the eye, collinear, repeated vertex
            rast, _ = raster.rasterize(pos, faces[bad : bad + 1], (32, 32), engine="native")
            assert not rast.any(), f"triangle {bad} drew pixels"
        rast, _ = raster.rasterize(pos[1:], faces[6:7], (32, 32), engine="native")  # a NaN vertex
        assert not rast.any()
        duplicate, _ = raster.rasterize(pos, faces[7:9], (64, 64), engine="native")
    assert calls["rasterize_fwd"] == 5
    ids = duplicate[..., 3]
    assert (ids[ids > 0] == 1).all(), "exact duplicates must resolve to the lower triangle id"


def brute_force_coverage(tri: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: covered by the clipped triangle (float64 solve), and the distance
    of the decision from its threshold (to skip pixels too close to call)."""
    m = tri[:, [0, 1, 3]].T  # columns (x, y, w)
    fy, fx = np.meshgrid(
        (2 * np.arange(height) + 1) / height - 1, (2 * np.arange(width) + 1) / width - 1, indexing="ij"
    )
    p = np.stack([fx, fy, np.ones_like(fx)], -1)
    b = np.linalg.solve(m, p.reshape(-1, 3).T).T  # b = t * barycentrics with t = 1 / w
    t = b.sum(1)
    bary = b / t[:, None]
    w = 1.0 / t
    z = bary @ tri[:, 2] / w
    covered = (bary >= 0).all(1) & (w > 0) & (z >= -1) & (z <= 1)
    margin = np.minimum(np.abs(bary).min(1), np.minimum(np.abs(z + 1), np.abs(z - 1)))
    return covered.reshape(height, width), margin.reshape(height, width)


@pytest.mark.parametrize("case", ["crossing_eye_plane", "crossing_near_plane", "crossing_far_plane"])
def test_rasterize_clips_like_opengl(case):
    tri = {
        "crossing_eye_plane": [[-0.5, -0.6, 0.0, 1.0], [0.7, -0.4, 0.2, 1.2], [0.3, 0.9, -0.5, -0.8]],
        "crossing_near_plane": [[-0.9, -0.8, -2.0, 1.0], [0.8, -0.7, 0.5, 1.0], [0.0, 0.9, 0.5, 1.0]],
        "crossing_far_plane": [[-0.9, -0.8, 3.0, 1.5], [0.8, -0.7, 0.0, 1.0], [0.0, 0.9, 0.5, 1.0]],
    }[case]
    pos = torch.tensor([tri], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    height, width = 48, 40
    for engine in ("native", "torch"):
        with served_by(engine, "rasterize_fwd"):
            rast, _ = raster.rasterize(pos, faces, (height, width), engine=engine)
        covered, margin = brute_force_coverage(pos[0].double().numpy(), height, width)
        clear = margin > 1e-6
        got = (rast[0, ..., 3] > 0).numpy()
        assert 0 < covered.sum() < height * width
        assert (got[clear] == covered[clear]).all(), engine
        depth = rast[0, ..., 2].numpy()[got]
        assert (depth >= -1).all() and (depth <= 1).all()


def lattice_mesh(cells: int = 5, step: int = 3, origin: int = 1):
    """A grid of quads (split along alternating diagonals) whose vertices sit on
    pixel centres of a 24 x 24 image, plus pixel centres on every edge."""
    size = 24
    ndc = lambda p: (2 * p + 1) / size - 1  # noqa: E731
    idx = lambda i, j: i * (cells + 1) + j  # noqa: E731
    verts = [[ndc(origin + step * j), ndc(origin + step * i)] for i in range(cells + 1) for j in range(cells + 1)]
    faces = []
    for i in range(cells):
        for j in range(cells):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j + 1), idx(i + 1, j)
            faces += [[a, b, c], [a, c, d]] if (i + j) % 2 else [[a, b, d], [b, c, d]]
    return torch.tensor(verts, dtype=torch.float64), torch.tensor(faces, dtype=torch.int32), size


def coverage_counts(pos: torch.Tensor, faces: torch.Tensor, size: int, engine: str) -> torch.Tensor:
    counts = torch.zeros(size, size)
    for k in range(len(faces)):
        rast, _ = raster.rasterize(pos, faces[k : k + 1], (size, size), engine=engine)
        counts += (rast[0, ..., 3] > 0).float()
    return counts


@pytest.mark.parametrize("engine", ["native", "torch"])
@pytest.mark.parametrize("perspective_w", [False, True])
def test_pixels_on_shared_edges_are_counted_once(engine, perspective_w):
    xy, faces, size = lattice_mesh()
    w = torch.ones(len(xy), 1, dtype=torch.float64)
    if perspective_w:  # same image, different (non-exact) arithmetic
        w = torch.rand(len(xy), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 0.5
    pos = torch.cat([xy * w, torch.zeros_like(w), w], 1).float()
    with served_by(engine, "rasterize_fwd"):
        counts = coverage_counts(pos, faces, size, engine)
    assert counts.max() <= 1, "a pixel on a shared edge was drawn by two triangles"
    inner = slice(2, 15)  # pixel centres strictly inside the lattice, many on edges
    if not perspective_w:  # exact arithmetic: vertices shared by 4-6 triangles count once too
        assert (counts[inner, inner] == 1).all()
    else:  # edges are exact; only the lattice vertices themselves may round either way
        on_vertex = torch.zeros(size, size, dtype=torch.bool)
        on_vertex[1::3, 1::3] = True
        assert (counts[inner, inner][~on_vertex[inner, inner]] == 1).all()
    full, _ = raster.rasterize(pos, faces, (size, size), engine=engine)
    assert torch.equal(full[0, ..., 3] > 0, counts > 0)


def test_sphere_covers_the_analytic_disk_and_depth():
    distance, fov, near, far, size = 4.0, 40.0, 0.5, 10.0, 255
    vertices, faces = icosphere(5)
    mvp = perspective(fov, 1.0, near, far) @ camera_on_z(distance)
    pos = to_clip(vertices, mvp)
    with served_by("native", "rasterize_fwd"):
        rast, _ = raster.rasterize(pos, faces, (size, size), engine="native")
    covered = int((rast[0, ..., 3] > 0).sum())
    # Silhouette of a unit sphere seen from `distance`: a cone of half-angle
    # asin(1 / distance), i.e. a disk of radius f * tan(asin(1/d)) in NDC.
    focal = 1.0 / math.tan(math.radians(fov) / 2)
    radius_px = focal * math.tan(math.asin(1.0 / distance)) * size / 2
    assert covered == pytest.approx(math.pi * radius_px**2, rel=0.01)
    # The centre pixel samples NDC (0, 0): the vertex at (0, 0, 1), eye depth d - 1.
    c = size // 2
    eye = distance - 1.0
    expected = (far + near) / (far - near) - 2 * far * near / ((far - near) * eye)
    assert rast[0, c, c, 3] > 0
    assert float(rast[0, c, c, 2]) == pytest.approx(expected, abs=1e-6)
    # That pixel is a vertex shared by a fan of triangles: exactly one of them draws it.
    top = int(torch.nonzero(vertices[:, 2] == 1.0))
    fan = torch.nonzero((faces == top).any(1)).squeeze(1)
    assert len(fan) == 5
    hits = 0
    for k in fan.tolist():
        single, _ = raster.rasterize(pos, faces[k : k + 1], (size, size), engine="native")
        hits += int(single[0, c, c, 3] > 0)
    assert hits == 1
    torch_rast, _ = raster.rasterize(pos, faces, (size, size), engine="torch")
    assert_same_rast(rast, torch_rast)


def test_conventions_match_nvdiffrast():
    # Interpolating clip-space (x, y, w) must give back each pixel's sample point:
    # this pins pixel centres, row 0 at y = -1, (u, v) as the weights of vertices 0
    # and 1, and perspective-correct barycentrics (x and w are linear in 3D).
    pos = torch.tensor([[-2.0, -1.5, 0.3, 2.0], [1.2, -0.8, -0.2, 1.0], [0.1, 3.0, 0.9, 3.0]])
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    height, width = 24, 32
    for engine in ("native", "torch"):
        with served_by(engine, "rasterize_fwd"):
            rast, _ = raster.rasterize(pos, faces, (height, width), engine=engine)
        assert rast.shape == (1, height, width, 4)
        inside = rast[0, ..., 3] > 0
        assert inside.sum() > 100 and torch.equal(rast[0, ..., 3][inside], torch.ones(int(inside.sum())))
        assert (rast[0][~inside] == 0).all()
        attr = pos[:, [0, 1, 3]].contiguous()
        with served_by(engine, "interpolate_fwd"):
            xyw = raster.interpolate(attr, rast, faces, engine=engine)[0]
        fx = (2 * torch.arange(width) + 1) / width - 1
        fy = (2 * torch.arange(height) + 1) / height - 1
        torch.testing.assert_close(
            (xyw[..., 0] / xyw[..., 2])[inside], fx.expand(height, width)[inside], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            (xyw[..., 1] / xyw[..., 2])[inside], fy[:, None].expand(height, width)[inside], atol=1e-5, rtol=0
        )
        z = raster.interpolate(pos[:, 2:3].contiguous(), rast, faces, engine=engine)[0, ..., 0]
        torch.testing.assert_close(rast[0, ..., 2][inside], (z / xyw[..., 2])[inside], atol=1e-5, rtol=0)
    # (V, 4) means one image.
    single, db = raster.rasterize(pos, faces, (height, width))
    assert single.shape == (1, height, width, 4) and db is None


def test_rast_db_is_the_image_space_derivative():
    pos = torch.tensor([[-0.9, -0.8, 0.3, 1.0], [1.6, -0.9, -0.2, 2.0], [0.1, 1.3, 0.5, 1.4]])
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    for engine in ("native", "torch"):
        with served_by(engine, "rasterize_fwd"):
            rast, db = raster.rasterize(pos, faces, (40, 40), engine=engine, output_db=True)
        inner = (rast[0, 1:-1, 1:-1, 3] > 0) & (rast[0, 2:, 1:-1, 3] > 0) & (rast[0, :-2, 1:-1, 3] > 0)
        inner &= (rast[0, 1:-1, 2:, 3] > 0) & (rast[0, 1:-1, :-2, 3] > 0)
        du_dx = (rast[0, 1:-1, 2:, 0] - rast[0, 1:-1, :-2, 0]) / 2
        dv_dy = (rast[0, 2:, 1:-1, 1] - rast[0, :-2, 1:-1, 1]) / 2
        torch.testing.assert_close(db[0, 1:-1, 1:-1, 0][inner], du_dx[inner], atol=2e-4, rtol=0)
        torch.testing.assert_close(db[0, 1:-1, 1:-1, 3][inner], dv_dy[inner], atol=2e-4, rtol=0)


def test_empty_inputs():
    pos = torch.rand(2, 5, 4)
    with served_by("native", "rasterize_fwd"):
        rast, _ = raster.rasterize(pos, torch.zeros(0, 3, dtype=torch.int32), (8, 9), engine="native")
    assert rast.shape == (2, 8, 9, 4) and not rast.any()
    ref_rast, _ = raster.rasterize(pos, torch.zeros(0, 3, dtype=torch.int32), (8, 9), engine="torch")
    assert torch.equal(rast, ref_rast)


# --------------------------------------------------------------------------
# gradients


def test_reference_gradcheck_float64():
    pos, faces, resolution = sphere_scene(resolution=12, distance=3.0, subdivisions=1)
    pos64 = pos.double().requires_grad_()
    rast, _ = ref.rasterize(pos64, faces, resolution)
    tri_id = rast[..., 3].long() - 1
    attr = torch.randn(pos.shape[0], 3, dtype=torch.float64, requires_grad=True)

    def render(p, a):
        r, db = ref.rast_from_triangle_ids(p, faces, tri_id, output_db=True)
        return ref.interpolate(a, r, faces), db

    assert (tri_id >= 0).float().mean() > 0.3
    assert torch.autograd.gradcheck(render, (pos64, attr), eps=1e-6, atol=1e-6)
    # interpolate alone, in attr and in the barycentric channels (u, v) of rast.
    uv = rast[..., :2].detach().clone().requires_grad_()
    rest = rast[..., 2:].detach()
    assert torch.autograd.gradcheck(
        lambda a, b: ref.interpolate(a, torch.cat([b, rest], -1), faces), (attr, uv), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("batched_attr", [False, True])
def test_interpolate_native_matches_reference(batched_attr):
    pos, faces = random_scene(4)
    faces = faces[7:]  # random faces only; some still touch the non-finite vertex of image 1
    g = torch.Generator().manual_seed(5)
    attr = torch.randn(*((2,) if batched_attr else ()), pos.shape[1], 5, generator=g)
    weights = torch.randn(2, 40, 48, 5, generator=g)
    results = {}
    for engine in ("native", "torch"):
        p = pos.clone().requires_grad_()
        a = attr.clone().requires_grad_()
        with served_by(engine, "rasterize_fwd", "interpolate_fwd", "interpolate_grad_rast"):
            rast, _ = raster.rasterize(p, faces, (40, 48), engine=engine)
            out = raster.interpolate(a, rast, faces, engine=engine)
            (out * weights).sum().backward()
        results[engine] = (out.detach(), a.grad, p.grad)
    (out_n, ga_n, gp_n), (out_t, ga_t, gp_t) = results["native"], results["torch"]
    torch.testing.assert_close(out_n, out_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga_n, ga_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gp_n, gp_t, rtol=1e-4, atol=1e-5)
    assert gp_n.abs().sum() > 0 and ga_n.abs().sum() > 0
    assert torch.isfinite(gp_n).all()  # a non-finite vertex elsewhere does not leak NaN


# --------------------------------------------------------------------------
# the CUDA rasteriser's algorithm, run on the CPU


def lattice_scene():
    xy, faces, size = lattice_mesh()
    w = torch.rand(len(xy), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 0.5
    return torch.cat([xy * w, torch.zeros_like(w), w], 1).float()[None].contiguous(), faces, (size, size)


def sphere_batch():
    pos, faces, resolution = sphere_scene(resolution=70, subdivisions=3)
    return pos[None], faces, resolution


@pytest.mark.parametrize(
    "scene",
    [
        lambda: (*random_scene(0), (37, 53)),  # partial tiles, awkward triangles
        lambda: (*random_scene(1, num_faces=700), (64, 64)),  # several chunks of 256 triangles
        sphere_batch,
        lattice_scene,  # pixel centres exactly on shared edges
    ],
    ids=["random", "many-triangles", "sphere", "edges"],
)
def test_cuda_rasteriser_algorithm_equals_the_cpu_engine_bit_for_bit(scene):
    # raster.cu's tile kernel, run tile by tile on the CPU with the same header
    # functions (the test-only op rasterize_fwd_tiled), gives exactly the band
    # rasteriser's output; on the GPU the same code is compiled without fused
    # multiply-adds (tests/test_cuda_compile.py), so it matches there too.
    _native.load()
    pos, faces, (height, width) = scene()
    pos = pos.contiguous()
    bad = torch.tensor([[0, 1, pos.shape[1]], [-1, 0, 1]], dtype=torch.int32)  # skipped by both
    faces = torch.cat([faces, bad]).contiguous()
    cpu = torch.ops.avatar.rasterize_fwd(pos, faces, height, width)
    tiled = torch.ops.avatar.rasterize_fwd_tiled(pos, faces, height, width)
    assert (cpu[..., 3] > 0).any()
    assert torch.equal(tiled, cpu), f"{int((tiled != cpu).any(-1).sum())} pixels differ"
    assert not (cpu[..., 3] > faces.shape[0] - 2).any()  # the bad triangles drew nothing


# --------------------------------------------------------------------------
# no host synchronisation on CUDA


def test_face_indices_are_checked_only_where_free():
    pos, faces, resolution = sphere_scene(resolution=16)
    with pytest.raises(ValueError, match=r"faces index vertices in \[0, \d+\] but there are 12 vertices"):
        raster.rasterize(pos[:12], faces, resolution)
    # On a device (meta stands in for CUDA: its values cannot be read) the kernels'
    # index check replaces the wrapper's, which would wait for the device.
    meta = faces.to("meta")
    raster._check_face_values(meta, 12, "native", "rasterize")
    raster._check_face_values(meta, 12, "nvdiffrast", "rasterize")
    with pytest.raises(RuntimeError, match="meta"):  # the torch engine reads them (and syncs anyway)
        raster._check_face_values(meta, 12, "torch", "rasterize")


def test_interpolate_attr_gradient_does_not_synchronise(monkeypatch):
    # nonzero's output size lives on the device: the backward must not call it. Bad
    # vertex indices and empty pixels get zero gradient, as the kernel gives them.
    pos, faces = random_scene(4)
    faces = faces[7:].contiguous()
    rast, _ = raster.rasterize(pos, faces, (40, 48), engine="native")
    attr = torch.randn(2, pos.shape[1], 3, generator=torch.Generator().manual_seed(8))
    grad = torch.randn(2, 40, 48, 3, generator=torch.Generator().manual_seed(9))
    leaf = attr.clone().requires_grad_()
    want = torch.autograd.grad(raster.interpolate(leaf, rast, faces, engine="torch"), leaf, grad)[0]
    seen = int(rast[..., 3].max())  # a visible triangle, given a bad index below
    broken = faces.clone()
    broken[seen - 1, 0] = pos.shape[1]
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: pytest.fail("torch.nonzero synchronises the device"))
    got = raster._interpolate_grad_attr(grad, attr, rast, faces)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_broken = raster._interpolate_grad_attr(grad, attr, rast, broken)
    spared = (grad * (rast[..., 3] == seen)[..., None]).sum()  # what that triangle would have spread
    assert spared != 0 and torch.isfinite(got_broken).all()
    torch.testing.assert_close(got_broken.sum(), want.sum() - spared, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# antialias


def test_opposite_vertices():
    faces = torch.tensor([[0, 1, 2], [2, 1, 3], [1, 0, 4], [0, 1, 5], [6, 6, 7]], dtype=torch.int32)
    opp = ref.opposite_vertices(faces)
    # Edge (1, 2) joins faces 0 and 1; edge (0, 1) is shared by three faces: no pair.
    assert opp[0].tolist() == [3, -1, -1]
    assert opp[1].tolist() == [-1, -1, 0]
    assert opp[2].tolist() == [-1, -1, -1]
    assert opp[4].tolist() == [-1, -1, -1]
    assert raster.opposite_vertices(faces) is raster.opposite_vertices(faces)  # cached


def shaded_sphere(engine: str, pos: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor, resolution):
    rast, _ = raster.rasterize(pos, faces, resolution, engine=engine)
    color = raster.interpolate(colors, rast, faces, engine=engine)
    return raster.antialias(color, rast, pos, faces, engine=engine), color, rast


def test_antialias_native_matches_reference():
    # A coarse sphere: as in nvdiffrast, only silhouette edges of the triangles that
    # cover the pixel centres are found, so a finely tessellated rim gets few.
    pos, faces, resolution = sphere_scene(resolution=96, subdivisions=2)
    pos = torch.cat([pos[None], (pos * torch.tensor([1.0, 1.0, 1.0, 1.4]))[None]])  # two views
    g = torch.Generator().manual_seed(6)
    colors = torch.rand(pos.shape[1], 3, generator=g)
    weights = torch.randn(2, *resolution, 3, generator=g)
    results = {}
    for engine in ("native", "torch"):
        p = pos.clone().requires_grad_()
        c = colors.clone().requires_grad_()
        with served_by(engine, "rasterize_fwd", "interpolate_fwd", "antialias_analysis"):
            out, color, rast = shaded_sphere(engine, p, faces, c, resolution)
            (out * weights).sum().backward()
        results[engine] = (out.detach(), c.grad, p.grad)
    codes_native = torch.ops.avatar.antialias_analysis(rast.detach(), pos, faces, raster.opposite_vertices(faces))
    codes_ref = ref.antialias_analysis(rast.detach(), pos, faces, raster.opposite_vertices(faces))
    assert torch.equal(codes_native, codes_ref)
    assert (codes_ref >= 0).sum() > 100  # the silhouette is found ...
    changed = (results["native"][0] != color.detach()).any(-1)
    assert changed.sum() < 0.1 * changed.numel()  # ... and only the silhouette changes
    for got, want in zip(results["native"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_antialias_leaves_interior_edges_alone():
    xy, faces, size = lattice_mesh()
    pos = torch.cat(
        [xy, torch.zeros(len(xy), 1, dtype=torch.float64), torch.ones(len(xy), 1, dtype=torch.float64)], 1
    ).float()
    rast, _ = raster.rasterize(pos, faces, (size, size))
    color = torch.rand(1, size, size, 2)
    out = raster.antialias(color, rast, pos, faces)
    interior = slice(3, 14)
    assert torch.equal(out[0, interior, interior], color[0, interior, interior])


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_silhouette_gradient_matches_finite_differences(engine):
    # A white triangle on black: the antialiased image's sum is its coverage.
    size = 64
    pos = torch.tensor([[-0.62, -0.55, 0.0, 1.0], [0.71, -0.32, 0.0, 1.0], [-0.13, 0.66, 0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)

    def coverage(p: torch.Tensor) -> torch.Tensor:
        rast, _ = raster.rasterize(p, faces, (size, size), engine=engine)
        white = (rast[..., 3:4] > 0).float()
        return raster.antialias(white, rast, p, faces, engine=engine).sum()

    p = pos.clone().requires_grad_()
    with served_by(engine, "rasterize_fwd", "antialias_analysis"):
        coverage(p).backward()
    # Analytic: area in pixels = |cross| / 2 * (size / 2)^2; its derivative with
    # respect to a vertex is half the perpendicular of the opposite edge.
    scale = (size / 2) ** 2
    for vertex, axis in [(0, 0), (0, 1), (1, 0), (2, 1)]:
        step = 1.5 / size  # 0.75 pixel in NDC
        plus, minus = pos.clone(), pos.clone()
        plus[vertex, axis] += step
        minus[vertex, axis] -= step
        finite_difference = float(coverage(plus) - coverage(minus)) / (2 * step)
        q = pos[:, :2].double()
        a, b = q[(vertex + 1) % 3], q[(vertex + 2) % 3]
        area_grad = 0.5 * torch.tensor([a[1] - b[1], b[0] - a[0]])[axis] * scale  # counter-clockwise
        analytic = float(p.grad[vertex, axis])
        assert analytic == pytest.approx(finite_difference, rel=0.10), (vertex, axis)
        assert analytic == pytest.approx(float(area_grad), rel=0.10), (vertex, axis)
    assert p.grad[:, 3].abs().sum() > 0  # w moves the projected vertex too


# --------------------------------------------------------------------------
# engines and validation


def test_engine_selection_and_errors():
    pos, faces, resolution = sphere_scene(resolution=16)
    with pytest.raises(EngineError, match="nvdiffrast"):
        raster.rasterize(pos, faces, resolution, engine="nvdiffrast")
    with pytest.raises(EngineError, match="does not implement"):
        raster.rasterize(pos, faces, resolution, engine="tcnn")
    with pytest.raises(TypeError, match="int32"):
        raster.rasterize(pos, faces.long(), resolution)
    with pytest.raises(ValueError, match="vertices"):
        raster.rasterize(pos, faces + 10_000, resolution)
    with pytest.raises(ValueError, match=r"\(B, V, 4\)"):
        raster.rasterize(pos[:, :3], faces, resolution)
    with pytest.raises(ValueError, match="resolution"):
        raster.rasterize(pos, faces, (0, 16))
    with pytest.raises(TypeError, match="float64"):
        raster.rasterize(pos.double(), faces, resolution, engine="native")
    with pytest.raises(RuntimeError, match="must have dtype"):
        torch.ops.avatar.rasterize_fwd(pos[None].double(), faces, 8, 8)
    # float64 goes to the reference under "auto".
    rast64, _ = raster.rasterize(pos.double(), faces, resolution)
    rast32, _ = raster.rasterize(pos, faces, resolution)
    assert rast64.dtype == torch.float64 and torch.equal(rast64[..., 3].float(), rast32[..., 3])


def test_nvdiffrast_wrapper_uses_the_documented_api(monkeypatch):
    calls = []

    class Context:
        def __init__(self, device=None):
            calls.append(("RasterizeCudaContext", device))

    def rasterize(glctx, pos, tri, resolution, ranges=None, grad_db=True):
        assert isinstance(glctx, Context) and pos.is_contiguous() and tri.dtype == torch.int32
        calls.append(("rasterize", tuple(resolution), grad_db))
        rast, db = ref.rasterize(pos, tri, tuple(resolution), output_db=True)
        return rast, db

    def interpolate(attr, rast, tri, rast_db=None, diff_attrs=None):
        calls.append(("interpolate",))
        return ref.interpolate(attr, rast, tri), None

    class TopologyHash:
        def __init__(self, tri):
            self.tri = tri

    def antialias_construct_topology_hash(tri):
        calls.append(("antialias_construct_topology_hash",))
        return TopologyHash(tri)

    def antialias(color, rast, pos, tri, topology_hash=None, pos_gradient_boost=1.0):
        # The documented API: a hash made by antialias_construct_topology_hash for this tri.
        assert isinstance(topology_hash, TopologyHash) and topology_hash.tri is tri
        calls.append(("antialias",))
        return ref.antialias(color, rast, pos, tri)

    dr = types.SimpleNamespace(
        RasterizeCudaContext=Context, rasterize=rasterize, interpolate=interpolate, antialias=antialias,
        antialias_construct_topology_hash=antialias_construct_topology_hash,
    )
    monkeypatch.setattr(raster, "_nvdiffrast", lambda: dr)
    monkeypatch.setattr(raster, "resolve_engine", lambda op, engine, device, gpu: "nvdiffrast")
    monkeypatch.setattr(raster, "_contexts", {})
    monkeypatch.setattr(raster, "_topology_hash_cache", None)
    pos, faces, resolution = sphere_scene(resolution=24)
    rast, db = raster.rasterize(pos, faces, resolution)
    assert db is None
    color = raster.interpolate(torch.rand(pos.shape[0], 3), rast, faces)
    raster.antialias(color, rast, pos, faces)
    raster.antialias(color, rast, pos, faces)  # same faces: the cached hash
    raster.rasterize(pos, faces, resolution, output_db=True)
    names = [c[0] for c in calls]
    assert names == ["RasterizeCudaContext", "rasterize", "interpolate", "antialias_construct_topology_hash",
                     "antialias", "antialias", "rasterize"]
    assert calls[1] == ("rasterize", resolution, False) and calls[6] == ("rasterize", resolution, True)
    # Other faces, or the same tensor modified in place, get a new hash.
    faces2 = faces.clone()
    raster.antialias(color, rast, pos, faces2)
    faces2[0] = faces2[0].flip(0)
    raster.antialias(color, rast, pos, faces2)
    assert [c[0] for c in calls[7:]] == ["antialias_construct_topology_hash", "antialias"] * 2
