"""Random draws happen on their generator's device (the GPU path's first crash).

PyTorch refuses a draw whose generator lives on another device than the one it
draws on ("Expected a 'cuda' device type for generator"). A run's generator lives
on the CPU while a GPU run's tensors live on CUDA, so every draw with a generator
must draw where the generator is and then move (``avatar.seeding.draw``).

A CPU machine cannot draw on CUDA, but it has a second device that takes any draw
without complaint: ``meta``. Running the code that draws with its tensors on
``meta`` and a CPU generator, and recording where each draw with a generator
lands, shows a draw made on the tensors' device instead of the generator's, which
is exactly what crashes on CUDA. The AST check keeps every such draw going through
``draw``, so calls that no test runs are covered too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from avatar.seeding import draw

PACKAGE = Path(__file__).resolve().parents[1] / "avatar"
SAMPLERS = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "multinomial",
    "normal", "bernoulli", "poisson", "uniform_", "normal_", "random_", "exponential_", "geometric_",
    "cauchy_", "log_normal_", "bernoulli_",
}


class DrawDevices(TorchFunctionMode):
    """Records (function, generator device, result device) of every draw that passes a generator."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[str, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and isinstance(out, torch.Tensor):
            self.draws.append((getattr(func, "__name__", str(func)), gen.device.type, out.device.type))
        return out

    def misplaced(self) -> list[tuple[str, str, str]]:
        return [d for d in self.draws if d[1] != d[2]]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the helper --------------------------------------------------------------------------


def test_draw_equals_the_direct_draw_on_the_generators_device():
    a = draw(torch.rand, 7, generator=_generator(3), dtype=torch.float64)
    b = torch.rand(7, generator=_generator(3), dtype=torch.float64)
    assert torch.equal(a, b)
    a = draw(torch.randint, 0, 10, (5,), generator=_generator(4))
    assert torch.equal(a, torch.randint(0, 10, (5,), generator=_generator(4)))


def test_draw_moves_the_result_and_the_tensor_arguments():
    with DrawDevices() as mode:
        out = draw(torch.randn, 3, 2, generator=_generator(), device="meta")
        assert out.device.type == "meta" and out.shape == (3, 2)
        pick = draw(torch.multinomial, torch.ones(4, dtype=torch.float64), 2, generator=_generator(), device="meta")
        assert pick.device.type == "meta"
    assert mode.draws and not mode.misplaced(), mode.draws


def test_draw_without_a_generator_uses_the_devices_own():
    out = draw(torch.rand, 4, device="meta")
    assert out.device.type == "meta"


# -- the code that draws, with its tensors on another device than the generator ------------


def test_occupancy_update_draws_on_the_generators_device():
    from avatar.ops.compositing import OccupancyGrid

    grid = OccupancyGrid(resolution=8, update_every=1, warmup_steps=0).to("meta")
    with DrawDevices() as mode:
        grid.update(5, lambda p: p.sum(-1), generator=_generator())
    assert len(mode.draws) >= 3  # uniform cells, occupied cells, jitter
    assert not mode.misplaced(), f"draws on the tensors' device, not the generator's: {mode.misplaced()}"


def test_occupancy_update_picks_occupied_cells_without_reading_them_back():
    """After warm-up a refresh probes a quarter of the cells uniformly and as many occupied ones."""
    from avatar.ops.compositing import OccupancyGrid, pack_occupancy

    grid = OccupancyGrid(resolution=8, update_every=1, warmup_steps=0, decay=1.0)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2, 3, 4] = mask[5, 5, 5] = True
    grid.bitfield.copy_(pack_occupancy(mask))
    probed: list[torch.Tensor] = []

    def density(points: torch.Tensor) -> torch.Tensor:
        probed.append(points.clone())
        return torch.zeros(points.shape[0])

    grid.update(1, density, generator=_generator())
    cells = (torch.cat(probed) * 8).floor().long()
    flat = (cells[:, 0] * 8 + cells[:, 1]) * 8 + cells[:, 2]
    count = 8**3 // 4
    occupied_part = flat[count:]
    assert occupied_part.numel() == count
    assert set(occupied_part.tolist()) == {2 * 64 + 3 * 8 + 4, 5 * 64 + 5 * 8 + 5}
    # With nothing occupied every probe is a uniform cell inside the grid.
    grid.bitfield.zero_()
    probed.clear()
    grid.update(2, density, generator=_generator())
    points = torch.cat(probed)
    assert points.shape[0] >= count and bool(((points >= 0) & (points < 1)).all())


def test_cameras_and_lights_draw_on_the_generators_device():
    from avatar.config import CameraConfig
    from avatar.render.cameras import sample_cameras
    from avatar.render.shading import random_light, sample_shading

    gen = _generator()
    with DrawDevices() as mode:
        cams = sample_cameras(4, CameraConfig(), 32, gen, device="meta")
        light = random_light(cams.eye, gen)
        sample_shading((0.2, 0.4, 0.4), gen)
    assert cams.eye.device.type == "meta" and light.device.type == "meta"
    assert len(mode.draws) >= 6
    assert not mode.misplaced(), mode.misplaced()


def test_random_light_is_unchanged_on_the_cpu():
    """The light is computed where the cameras are; on the CPU it is the same number as ever."""
    from avatar.render.shading import random_light

    eye = torch.tensor([[0.0, 0.2, 1.3], [1.1, 0.0, -0.4]])
    gen = _generator(7)
    got = random_light(eye, gen)
    ref_gen = _generator(7)
    direction = torch.nn.functional.normalize(eye.double(), dim=-1)
    direction = torch.nn.functional.normalize(direction + 0.5 * torch.randn(2, 3, generator=ref_gen,
                                                                            dtype=torch.float64), dim=-1)
    dist = 0.8 + 0.7 * torch.rand(2, 1, generator=ref_gen, dtype=torch.float64)
    assert torch.equal(got, (direction * dist * eye.double().norm(dim=-1, keepdim=True)).float())


def test_guidance_noise_and_timesteps_draw_on_the_generators_device():
    from avatar.guidance.sds import TimestepSchedule

    gen = _generator()
    with DrawDevices() as mode:
        t = TimestepSchedule().sample(3, 0, gen)
    assert t.device.type == "cpu" and not mode.misplaced()


def test_volume_jitter_draws_on_the_generators_device(monkeypatch):
    """The stratified offsets of training rays are drawn on the generator's device."""
    from avatar.render import volume

    seen: dict[str, torch.Tensor] = {}

    def stop(*args, **kwargs):
        seen["jitter"] = kwargs["jitter"]
        raise RuntimeError("stop after the draw")

    monkeypatch.setattr(volume, "march_rays", stop, raising=False)
    import avatar.ops.compositing as compositing

    monkeypatch.setattr(compositing, "march_rays", stop)
    from avatar.render.cameras import orbit_cameras

    cams = orbit_cameras(1, resolution=4, device="meta")
    renderer = volume.VolumeRenderer(SimpleNamespace(), bound=1.0, samples_per_ray=8)
    with DrawDevices() as mode, pytest.raises(RuntimeError, match="stop after the draw"):
        renderer.render(cams, jitter=True, generator=_generator())
    assert seen["jitter"].device.type == "meta"
    assert mode.draws and not mode.misplaced(), mode.draws


# -- every draw with a generator goes through avatar.seeding.draw ------------------------


def _direct_draws(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not any(k.arg == "generator" for k in node.keywords):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in SAMPLERS:
            found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)[:90]}")
    return found


def test_no_direct_draw_with_a_generator_in_the_package():
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "seeding.py"]
    assert len(files) > 40
    offenders = [hit for p in files for hit in _direct_draws(p)]
    assert not offenders, (
        "random draws that pass a generator must use avatar.seeding.draw (drawn on the generator's "
        "device, then moved):\n" + "\n".join(offenders))


def test_the_ast_check_finds_a_direct_draw(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f(g, d, x):\n    torch.randint(4, (2,), device=d, generator=g)\n"
                   "    x.uniform_(generator=g)\n    return draw(torch.rand, 3, generator=g)\n")
    assert len(_direct_draws(bad, tmp_path)) == 2
