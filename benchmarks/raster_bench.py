"""Rasterisation benchmark: native engine vs the PyTorch reference.

Rasterise + interpolate (3 channels) a ~30k-triangle head-like mesh at 512 x 512
from a perspective camera, forward only (the issue's target: native at least 20x
faster), plus a training step: forward + backward of rasterize + interpolate +
antialias with gradients to vertex positions and attributes.

Time: wall clock in ms per frame, the best of N frames after one warm-up frame
(the figure least disturbed by other processes on a shared machine), median also
given. Memory: the growth of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs after freed heap went back to the OS with
malloc_trim) during one forward frame over the resident set before it, in MiB:
everything the frame allocates (outputs and temporaries; torch's CPU tensors live
in malloc'd memory, so they count). Same method as ``benchmarks/ops.py``.

``bench_raster()`` returns a dict (``benchmarks/ops.py`` collects it); run this
file to print it as JSON.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from peak_memory import peak_growth_mib  # noqa: E402

from avatar.ops import raster  # noqa: E402

RESOLUTION = (512, 512)
FREQUENCY = 39  # geodesic sphere: 20 * 39^2 = 30,420 triangles


def geodesic_sphere(frequency: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere from an icosahedron whose faces are split into frequency^2
    triangles (uniform triangles, unlike a UV sphere's slivers at the poles)."""
    import trimesh

    ico = trimesh.creation.icosahedron()
    n = frequency
    ij = [(i, j) for i in range(n + 1) for j in range(n + 1 - i)]
    index = {p: k for k, p in enumerate(ij)}
    bary = np.array([[1 - (i + j) / n, i / n, j / n] for i, j in ij])
    local = []
    for i in range(n):
        for j in range(n - i):
            local.append([index[(i, j)], index[(i + 1, j)], index[(i, j + 1)]])
            if i + j < n - 1:
                local.append([index[(i + 1, j)], index[(i + 1, j + 1)], index[(i, j + 1)]])
    local = np.array(local)
    corners = ico.vertices[ico.faces]  # (20, 3, 3)
    points = np.einsum("pk,fkc->fpc", bary, corners).reshape(-1, 3)
    faces = (local[None] + (np.arange(len(ico.faces)) * len(ij))[:, None, None]).reshape(-1, 3)
    mesh = trimesh.Trimesh(points / np.linalg.norm(points, axis=1, keepdims=True), faces, process=False)
    mesh.merge_vertices(digits_vertex=9)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def head_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    """A head-like closed surface: a geodesic sphere shaped into a skull-like
    ellipsoid with nose, brow, cheeks, chin and ears. Face looks down +z, +y up."""
    d, faces = geodesic_sphere(FREQUENCY)

    def bump(center, width, height):
        c = np.asarray(center, dtype=np.float64)
        c = c / np.linalg.norm(c)
        return height * np.exp(-np.sum((d - c) ** 2, axis=1) / (2 * width**2))

    r = 1.0
    r = r + bump([0, -0.05, 1], 0.10, 0.22)  # nose
    r = r + bump([0, 0.25, 1], 0.22, 0.06)  # brow
    r = r + bump([0.35, -0.1, 0.9], 0.15, 0.05) + bump([-0.35, -0.1, 0.9], 0.15, 0.05)  # cheeks
    r = r + bump([0, -0.6, 0.75], 0.18, 0.08)  # chin
    r = r + bump([1, 0, -0.1], 0.10, 0.12) + bump([-1, 0, -0.1], 0.10, 0.12)  # ears
    r = r - bump([0.3, 0.15, 0.95], 0.06, 0.04) - bump([-0.3, 0.15, 0.95], 0.06, 0.04)  # eye sockets
    v = d * r[:, None] * np.array([0.78, 1.0, 0.9])
    return torch.tensor(v, dtype=torch.float32), torch.tensor(faces, dtype=torch.int32)


def clip_positions(vertices: torch.Tensor, yaw_deg: float = 25.0) -> torch.Tensor:
    """(1, V, 4) clip space: a 30 degree camera 4.2 units away, head turned by yaw."""
    yaw = math.radians(yaw_deg)
    rot = torch.tensor(
        [[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]], dtype=torch.float64
    )
    v = vertices.double() @ rot.T
    v[:, 2] -= 4.2  # camera at the origin looking down -z
    f, near, far = 1.0 / math.tan(math.radians(15)), 0.5, 20.0
    clip = torch.stack(
        [f * v[:, 0], f * v[:, 1], -(far + near) / (far - near) * v[:, 2] - 2 * far * near / (far - near), -v[:, 2]],
        dim=1,
    )
    return clip.float()[None].contiguous()


def _frame(engine: str, pos: torch.Tensor, faces: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    rast, _ = raster.rasterize(pos, faces, RESOLUTION, engine=engine)
    return raster.interpolate(attr, rast, faces, engine=engine)


def _train_step(engine: str, pos: torch.Tensor, faces: torch.Tensor, attr: torch.Tensor) -> None:
    p = pos.clone().requires_grad_()
    a = attr.clone().requires_grad_()
    rast, _ = raster.rasterize(p, faces, RESOLUTION, engine=engine)
    color = raster.interpolate(a, rast, faces, engine=engine)
    raster.antialias(color, rast, p, faces, engine=engine).square().mean().backward()


def _time_ms(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall-clock milliseconds over ``repeats`` runs after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def _scene():
    vertices, faces = head_mesh()
    pos = clip_positions(vertices)
    attr = (vertices - vertices.min(0).values) / (vertices.max(0).values - vertices.min(0).values)
    return pos, faces, attr.contiguous()


def bench_raster(native_repeats: int = 20, reference_repeats: int = 3) -> dict:
    """Native vs reference rasterise + interpolate at 512 x 512 on a ~30k-triangle head."""
    pos, faces, attr = _scene()
    with torch.no_grad():
        native_img = _frame("native", pos, faces, attr)
        reference_img = _frame("torch", pos, faces, attr)
        rast = raster.rasterize(pos, faces, RESOLUTION, engine="native")[0]
        coverage = float((rast[..., 3] > 0).float().mean())
        native = _time_ms(lambda: _frame("native", pos, faces, attr), native_repeats)
        native_raster = _time_ms(lambda: raster.rasterize(pos, faces, RESOLUTION, engine="native"), native_repeats)
        reference = _time_ms(lambda: _frame("torch", pos, faces, attr), reference_repeats)
        native_mib = peak_growth_mib(lambda: _frame("native", pos, faces, attr))
        reference_mib = peak_growth_mib(lambda: _frame("torch", pos, faces, attr))
    native_step = _time_ms(lambda: _train_step("native", pos, faces, attr), max(3, native_repeats // 4))
    reference_step = _time_ms(lambda: _train_step("torch", pos, faces, attr), reference_repeats)
    speedup = reference[0] / native[0]
    return {
        "op": "rasterize + interpolate (3 channels), forward",
        "mesh": f"head-like geodesic sphere, {faces.shape[0]} triangles, {pos.shape[1]} vertices",
        "resolution": list(RESOLUTION),
        "pixels_covered": round(coverage, 3),
        "threads": torch.get_num_threads(),
        "native": {"ms": round(native[0], 2), "ms_median": round(native[1], 2), "peak_mib": native_mib},
        "native_rasterize_only": {"ms": round(native_raster[0], 2), "ms_median": round(native_raster[1], 2)},
        "torch": {"ms": round(reference[0], 1), "ms_median": round(reference[1], 1), "peak_mib": reference_mib},
        "speedup_forward": round(speedup, 1),
        "target_forward": 20.0,
        "meets_target": speedup >= 20.0,
        "outputs_equal": bool(torch.equal(native_img, reference_img)),
        "train_step": {
            "what": "rasterize + interpolate + antialias, forward + backward to positions and attributes",
            "native_ms": round(native_step[0], 1),
            "torch_ms": round(reference_step[0], 1),
            "speedup": round(reference_step[0] / native_step[0], 1),
        },
        "method": {
            "time": "wall clock, best of N frames after one warm-up; ms_median also given",
            "memory": "peak RSS growth during one forward frame over the RSS before it (after malloc_trim; "
            "VmHWM reset via /proc/self/clear_refs), MiB",
        },
    }


if __name__ == "__main__":
    print(json.dumps(bench_raster(), indent=2))
