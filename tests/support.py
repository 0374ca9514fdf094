"""Helpers shared by the tests of whole runs (generate, edit, export, batch)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import pytest
import torch

from avatar.config import GenerateConfig, make_config

# Sizes shared by the fast tests: a tiny hash grid, tiny images, few steps.
TINY_SIZES = [
    "coarse.resolution=16", "coarse.samples_per_ray=24", "coarse.occupancy_update_every=2",
    "fine.resolution=24", "fine.dmtet_resolution=12", "prior.spec=anny", "device=cpu",
]


def oracle_sphere_guidance(cfg):
    """An oracle whose target is a grey sphere: cheap, no mesh file, no diffusion model."""
    import trimesh

    from avatar.guidance import make_oracle_guidance
    from avatar.render.mesh import MeshRenderer

    sphere = trimesh.creation.icosphere(2, radius=0.35)
    verts = torch.as_tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.as_tensor(sphere.faces)

    def target(cameras):
        return MeshRenderer().render(cameras, verts, faces, albedo=None).rgb

    return make_oracle_guidance(target, seed=cfg.seed, t_range=tuple(cfg.coarse.t_range),
                                total_steps=cfg.coarse.steps)


def tiny_run_config(tmp_path, steps_each: int, engine: str = "torch"):
    return make_config(GenerateConfig, "smoke", [
        "prompt=resume", *TINY_SIZES, f"engines.hashgrid={engine}", f"coarse.steps={steps_each}",
        f"fine.steps={steps_each}", "checkpoint_every=100", "preview_every=100", "coarse.batch_size=2",
    ])


@contextlib.contextmanager
def native_kernel_calls() -> Iterator[collections.Counter]:
    """Count the native kernels (``torch.ops.avatar.*``) run inside the block: {op name: calls}.

    A test comparing the native engine with the PyTorch reference asserts that the kernel
    served the call (``calls["rasterize_fwd"] == 1``), so a native op that silently falls back
    to the reference fails it instead of comparing the reference with itself. Backward
    kernels count too when ``.backward()`` runs inside the block."""
    from avatar import _native

    _native.load()
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("avatar::"))
    assert names, "the native extension registered no torch.ops.avatar kernels"
    calls: collections.Counter = collections.Counter()
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            packet = getattr(torch.ops.avatar, name)

            def spy(*args, _packet=packet, _name=name, **kwargs):
                calls[_name] += 1
                return _packet(*args, **kwargs)

            mp.setattr(torch.ops.avatar, name, spy)
        yield calls


@contextlib.contextmanager
def served_by(engine: str, *kernels: str) -> Iterator[collections.Counter]:
    """Check that ``engine`` served the ops called inside the block: with ``native`` each of
    ``kernels`` (``torch.ops.avatar`` names) ran at least once; with ``torch`` no native kernel
    ran. Yields the counts of :func:`native_kernel_calls`."""
    from avatar import _native

    if engine != "native" and not _native.available():
        yield collections.Counter()
        return
    with native_kernel_calls() as calls:
        yield calls
    if engine == "native":
        missing = [k for k in kernels if calls[k] == 0]
        assert not missing, f"engine='native' never ran {missing}: the reference served it (ran: {dict(calls)})"
    elif engine == "torch":
        assert not calls, f"engine='torch' ran native kernels: {dict(calls)}"


def assert_gradients_match_finite_differences(fn, tensors: dict[str, torch.Tensor], *, eps: float, rtol: float,
                                              atol: float = 0.0, directions: int = 3, seed: int = 0) -> None:
    """Autograd's gradient of the scalar ``fn()`` against central differences, per tensor.

    fn: recomputes the scalar from the current values of ``tensors`` (leaves that require grad,
    e.g. a module's parameters). For each tensor and ``directions`` random unit directions d:
    <grad, d> must equal (fn(x + eps d) - fn(x - eps d)) / (2 eps) within ``atol + rtol * |that|``,
    and some direction must see a derivative above 1e-9 (the gradient reaches the tensor).
    Values are restored afterwards."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.autograd.grad(fn(), list(tensors.values()), allow_unused=True)
    for (name, t), grad in zip(tensors.items(), grads):
        assert grad is not None, f"{name}: no gradient reaches it"
        original = t.detach().clone()
        largest = 0.0
        for k in range(directions):
            d = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            d = d / d.norm()
            with torch.no_grad():
                t.copy_(original + eps * d)
                plus = float(fn())
                t.copy_(original - eps * d)
                minus = float(fn())
                t.copy_(original)
            numeric = (plus - minus) / (2 * eps)
            analytic = float((grad.double() * d.double()).sum())
            largest = max(largest, abs(numeric))
            assert abs(analytic - numeric) <= atol + rtol * abs(numeric), (
                f"{name}, direction {k}: autograd {analytic:.8g}, finite difference {numeric:.8g}")
        assert largest > 1e-9, f"{name}: zero derivative in every direction"
