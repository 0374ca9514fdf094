"""A training step of the native raster engine never makes the host wait for the GPU
(issue #14, point 8).

On CUDA an op whose output size depends on the data (``nonzero``, boolean-mask
indexing, ``unique_consecutive``, ``repeat_interleave`` without ``output_size``)
or that turns a tensor into a Python value (``.item()``, ``int()``, ``bool()``,
``.tolist()``) or a host list into a tensor (``torch.tensor([...])``) blocks the
host until the device has caught up. A CPU machine can show that none is called:
:func:`no_host_sync` fails on each of them while the native engine's rasterize
-> interpolate -> antialias runs forward and backward on CPU tensors along the
path it takes on CUDA. Where a GPU is present, CUDA's own sync detector checks
the real thing.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import pytest
import torch
from test_ops_raster import random_scene, sphere_scene
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from avatar import _native
from avatar.ops import raster
from avatar.ops.reference import raster as ref

aten = torch.ops.aten


@pytest.fixture(autouse=True, scope="module")
def native_ops():
    _native.load()  # registers torch.ops.avatar


# ATen ops that wait for the device on CUDA: the size of their output, or their
# result, is data read back to the host.
_SYNCING_OPS = {
    aten.nonzero.default: "nonzero (output size from the data)",
    aten._local_scalar_dense.default: ".item() / int() / float() / bool() of a tensor",
    aten.unique_consecutive.default: "unique_consecutive (output size from the data)",
    aten._unique.default: "unique (output size from the data)",
    aten._unique2.default: "unique (output size from the data)",
    aten.unique_dim.default: "unique (output size from the data)",
    aten.masked_select.default: "masked_select (output size from the data)",
    aten.bincount.default: "bincount (output size from the data)",
    aten.equal.default: "torch.equal (a Python bool)",
}
_MASK_INDEXED_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
# Python-level calls that copy between host and device (torch.tensor of host data
# is a pageable host-to-device copy, which CUDA completes synchronously).
_SYNCING_CALLS = {
    torch.tensor: "torch.tensor (host data copied to the device)",
    torch.as_tensor: "torch.as_tensor (host data copied to the device)",
    torch.Tensor.tolist: ".tolist()",
    torch.Tensor.item: ".item()",
    torch.Tensor.cpu: ".cpu()",
    torch.Tensor.numpy: ".numpy()",
    torch.Tensor.__bool__: "bool(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__index__: "tensor used as a Python index",
}


class HostSync(AssertionError):
    """An op was called that would make the host wait for a CUDA device."""


def _why_syncing_op(func, args, kwargs) -> str | None:
    if func in _SYNCING_OPS:
        return _SYNCING_OPS[func]
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size"
    if func in _MASK_INDEXED_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "indexing with a boolean mask (nonzero inside)"
    return None


class _NoSyncingOps(TorchDispatchMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _why_syncing_op(func, args, kwargs)
        if why:
            self.found.append(why)
            raise HostSync(f"{func}: {why}")
        return func(*args, **kwargs)


class _NoSyncingCalls(TorchFunctionMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        why = _SYNCING_CALLS.get(func)
        if why:
            self.found.append(why)
            raise HostSync(why)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Fail on any op that synchronises a CUDA device with the host, forward or
    backward, whatever the tensors' device. Yields the list of offences (an
    exception raised in a backward could be wrapped; the list is not)."""
    found: list[str] = []
    with _NoSyncingCalls(found), _NoSyncingOps(found):
        yield found
    assert not found, found


# --------------------------------------------------------------------------
# the guard itself


def _with_sync_in_backward(x: torch.Tensor) -> torch.Tensor:
    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.nonzero(grad).shape[0]

    return Op.apply(x)


SYNCING = {
    "nonzero": lambda x, m: torch.nonzero(m),
    "where(mask)": lambda x, m: torch.where(m),
    "x[mask]": lambda x, m: x[m],
    "x[mask] = 0": lambda x, m: x.clone().__setitem__(m, 0.0),
    "item": lambda x, m: x[0].item(),
    "int": lambda x, m: int(x[0]),
    "bool": lambda x, m: bool(m.any()),
    "tolist": lambda x, m: x.tolist(),
    "torch.tensor": lambda x, m: torch.tensor([1.0, 2.0]),
    "unique_consecutive": lambda x, m: torch.unique_consecutive(m, return_counts=True),
    "repeat_interleave": lambda x, m: torch.repeat_interleave(m.long()),
    "masked_select": lambda x, m: torch.masked_select(x, m),
    "in backward": lambda x, m: _with_sync_in_backward(x.clone().requires_grad_()).sum().backward(),
}


@pytest.mark.parametrize("name", list(SYNCING))
def test_guard_catches_syncing_ops(name):
    x = torch.arange(6.0)
    mask = x > 2
    with pytest.raises(Exception):  # noqa: B017 (HostSync, or autograd's wrapping of it)
        with no_host_sync() as found:
            SYNCING[name](x, mask)
    assert found


def test_guard_lets_fixed_size_ops_through():
    x = torch.arange(6.0, requires_grad=True)
    mask = x > 2
    with no_host_sync():
        y = torch.where(mask, x, 0.0)[torch.arange(3)]
        torch.repeat_interleave(torch.ones(3, dtype=torch.long), output_size=3)
        torch.sort(x.detach(), stable=True)
        torch.zeros(4).index_add(0, torch.arange(2), torch.ones(2))
        torch.zeros(3).scatter(0, torch.arange(3), mask[:3].float())
        y.sum().backward()


# --------------------------------------------------------------------------
# the native engine on the CUDA path


def training_step(pos, faces, colors, weights, resolution):
    """rasterize -> interpolate -> antialias with the native engine, forward and
    backward (rast_db too, though the renderer does not use it)."""
    p = pos.clone().requires_grad_()
    c = colors.clone().requires_grad_()
    rast, db = raster.rasterize(p, faces, resolution, engine="native", output_db=True)
    color = raster.interpolate(c, rast, faces, engine="native")
    out = raster.antialias(color, rast, p, faces, engine="native")
    ((out * weights).sum() + db.sum()).backward()
    return out.detach(), db.detach(), p.grad, c.grad


def sphere_views(device="cpu"):
    """Two views of a coarse sphere (many silhouette crossings), plus a triangle
    with an index past the vertices and one with a negative index: on CUDA no
    check reads the faces (that would wait for the device); the kernels skip them."""
    pos, faces, resolution = sphere_scene(resolution=48, subdivisions=2)
    pos = torch.stack([pos, pos * torch.tensor([1.0, 1.0, 1.0, 1.4])]).contiguous()
    bad = torch.tensor([[0, 1, pos.shape[1]], [-1, 0, 1]], dtype=torch.int32)
    faces = torch.cat([faces, bad]).contiguous()
    g = torch.Generator().manual_seed(6)
    colors = torch.rand(pos.shape[1], 3, generator=g)
    weights = torch.randn(2, *resolution, 3, generator=g)
    return pos.to(device), faces.to(device), colors.to(device), weights.to(device), resolution


def skip_face_checks(monkeypatch):
    """The faces' index range goes unread, as on CUDA (meta stands in for a device
    whose values cannot be read without waiting for it)."""
    check = raster._check_face_values
    monkeypatch.setattr(raster, "_check_face_values", lambda f, n, engine, op: check(f.to("meta"), n, engine, op))


def take_the_cuda_path(monkeypatch):
    """What the native engine does differently on CUDA is decided by the device: the
    faces go unchecked, and the reference helpers it calls work densely (they ask
    ``_dense_by_default``)."""
    skip_face_checks(monkeypatch)
    decide = ref._dense_by_default
    monkeypatch.setattr(ref, "_dense_by_default", lambda device: decide(torch.device("cuda")))


def test_native_step_on_the_cuda_path_does_not_synchronise(monkeypatch):
    pos, faces, colors, weights, resolution = sphere_views()
    skip_face_checks(monkeypatch)  # let the triangles with bad indices through, as on CUDA
    want = training_step(pos, faces, colors, weights, resolution)  # the CPU path: sparse helpers
    take_the_cuda_path(monkeypatch)
    monkeypatch.setattr(raster, "_topology_cache", None)
    fresh = faces.clone()  # a new face tensor, as DMTet makes every step: opposite_vertices runs inside
    with no_host_sync():
        got = training_step(pos, fresh, colors, weights, resolution)
    assert raster._topology_cache is not None and raster._topology_cache[0]() is fresh
    # Same image and gradients as the CPU path, bit for bit, with silhouettes blended.
    for name, g, w in zip(("image", "rast_db", "grad pos", "grad colors"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
    assert got[2].abs().sum() > 0 and torch.isfinite(got[2]).all()
    codes = torch.ops.avatar.antialias_analysis(
        torch.ops.avatar.rasterize_fwd(pos, faces, *resolution), pos, faces, ref.opposite_vertices(faces)
    )
    assert (codes >= 0).sum() > 30  # silhouettes were blended


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_helpers_equal_the_sparse_ones(seed):
    # Awkward triangles (behind the eye, crossing w = 0, degenerate, a NaN vertex,
    # duplicates): the masked dense path gives what the list of pixels gives, and
    # its empty pixels and unblended pairs add no NaN to the gradients.
    pos, faces = random_scene(seed)
    resolution = (37, 53)
    tri_id = torch.ops.avatar.rasterize_fwd(pos, faces, *resolution)[..., 3].long() - 1
    weights = torch.randn(2, *resolution, 4, generator=torch.Generator().manual_seed(seed))
    results = {}
    for dense in (False, True):
        p = pos.clone().requires_grad_()
        with no_host_sync() if dense else contextlib.nullcontext():
            rast, db = ref.rast_from_triangle_ids(p, faces, tri_id, output_db=True, dense=dense)
        codes = torch.ops.avatar.antialias_analysis(rast.detach(), pos, faces, ref.opposite_vertices(faces))
        color = rast[..., :3] * 2.0
        with no_host_sync() if dense else contextlib.nullcontext():
            out = ref.antialias_blend(color, rast, p, faces, codes, dense=dense)
            loss = (rast * weights).sum() + (db * weights).sum() + (out * weights[..., :3]).sum()
            loss.backward()
        results[dense] = (rast.detach(), db.detach(), out.detach(), p.grad)
        assert (codes >= 0).sum() > 20
    for name, got, want in zip(("rast", "rast_db", "blend", "grad pos"), results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.isfinite(results[True][3]).all()


def opposite_vertices_by_hand(faces: torch.Tensor) -> torch.Tensor:
    edges = defaultdict(list)
    rows = faces.tolist()
    for t, f in enumerate(rows):
        if len(set(f)) == 3 and min(f) >= 0:
            for i in range(3):
                edges[frozenset((f[(i + 1) % 3], f[(i + 2) % 3]))].append((t, i))
    out = torch.full(faces.shape, -1, dtype=torch.int32)
    for sharing in edges.values():
        if len(sharing) == 2:
            (t0, i0), (t1, i1) = sharing
            if rows[t0][i0] != rows[t1][i1]:
                out[t0, i0], out[t1, i1] = rows[t1][i1], rows[t0][i0]
    return out


def test_opposite_vertices_sorts_without_reading_back():
    # A few vertices and many triangles: edges shared by one, two, three or more
    # triangles, pairs with the same third vertex, degenerate triangles.
    g = torch.Generator().manual_seed(7)
    faces = torch.randint(0, 16, (60, 3), generator=g, dtype=torch.int32)
    faces[:8, 1] = faces[:8, 0]
    _, sphere, _ = sphere_scene(subdivisions=2)
    for f in (faces, sphere, faces[:1], faces[:0]):
        with no_host_sync():
            got = ref.opposite_vertices(f)
        assert got.dtype == torch.int32 and got.shape == f.shape
        assert torch.equal(got, opposite_vertices_by_hand(f))
    assert (ref.opposite_vertices(sphere) >= 0).all()  # closed and manifold: every edge has a neighbour
    mixed = ref.opposite_vertices(faces)
    assert (mixed >= 0).sum() > 20 and (mixed < 0).sum() > 20


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_step_on_cuda_does_not_synchronise():
    pos, faces, colors, weights, resolution = sphere_views("cuda")
    # On a CUDA machine the install builds the CUDA kernels: an engine error here is a failure.
    training_step(pos, faces, colors, weights, resolution)  # first calls set up kernels and memory
    torch.cuda.synchronize()
    fresh = faces.clone()  # a new face tensor: the topology is rebuilt inside
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(pos, fresh, colors, weights, resolution)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
