"""Memory of the fine stage's DMTet grid and checkpoint at a preset's size (default quality).

    python benchmarks/grid_memory.py [--preset quality] [--repeats 3] [--no-checkpoint]

prints JSON:

``grid``: the preset's grid (the head prior's box plus ``fine.grid_margin``, ``fine.dmtet_resolution``
cells along its longest side): cells, cell size, vertices, tetrahedra, the bytes a device holds
for it (float32 vertices + int32 tetrahedra), and, measured in a child process that imports only
torch and the grid builder, the build's wall seconds on this CPU (best of ``--repeats``) and its
peak resident memory (growth of VmHWM over the RSS before the build, ``peak_memory``; and the
child's whole VmHWM). Goals: <= 4 GiB and <= 10 s.

``checkpoint``: a fine-stage checkpoint of that preset as a run writes it (the workspace's
atomic writer): the DMTet SDF and offsets, the texture field, their Adam state (populated by one
step with zero gradients, as after any real step), the RNG states and the final mesh
extracted from the prior's SDF on the grid; its file size and the bytes by part. Goal: <= 300 MB.

``legacy``: the same figures, by arithmetic, for the grid checkpoints used to store (a
256-cell cube of int64 tetrahedra, 6 * 256^3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import status_kib  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from peak_memory import peak_growth_mib, status_kib
import torch
from avatar.ops.marching_tets import TetGridSpec, tetrahedral_grid

spec = TetGridSpec.from_dict(json.loads(sys.argv[1]))
repeats = int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
rss_before = status_kib("VmRSS")
held = {}

def build():
    t0 = time.perf_counter()
    held["grid"] = tetrahedral_grid(spec, "cpu")
    held["seconds"] = time.perf_counter() - t0

growth = peak_growth_mib(build)
verts, tets = held["grid"]
out = {"peak_rss_growth_mib": growth, "built_bytes": verts.nbytes + tets.nbytes,
       "tets_dtype": str(tets.dtype), "seconds": [held["seconds"]]}
for _ in range(repeats - 1):
    held.clear(); del verts, tets
    build()
    verts, tets = held["grid"]
    out["seconds"].append(held["seconds"])
out["child_rss_before_mib"] = round(rss_before / 1024, 1)
out["child_peak_rss_mib"] = round(status_kib("VmHWM") / 1024, 1)
print(json.dumps(out))
"""


def build_in_child(spec, repeats: int, threads: int) -> dict:
    """Build the grid of ``spec`` in a fresh interpreter; its seconds and peak RSS."""
    bench_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec.to_dict()), bench_dir, str(repeats),
                           str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"ok": False, "stderr": proc.stderr[-2000:]}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    seconds = child.pop("seconds")
    return {"ok": True, "seconds_best": round(min(seconds), 3), "seconds_all": [round(s, 3) for s in seconds],
            **child}


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def checkpoint_size(cfg, frame, prior, spec) -> dict:
    """Write the fine stage of ``cfg`` as a run's checkpoint would hold it; its size and parts."""
    from avatar.pipeline.generate import FineStage
    from avatar.seeding import rng_state
    from avatar.workspace import Workspace

    device = torch.device("cpu")
    sdf = (lambda p: prior.sdf(frame.to_metres(p)).float() * frame.scale)  # noqa: E731
    t0 = time.perf_counter()
    stage = FineStage(cfg, frame, device, sdf, spec)
    built = time.perf_counter() - t0
    # One Adam step with zero gradients fills the optimiser state a real step leaves.
    for group in stage.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    stage.optimizer.step()
    with torch.no_grad():
        verts, faces = stage.geometry.extract()
    fine = stage.state_dict()
    state = {"stage": "fine", "step": cfg.coarse.steps + cfg.fine.steps,
             "steps": {"coarse": cfg.coarse.steps, "fine": cfg.fine.steps}, "frame": frame.to_dict(),
             "rng": rng_state(), "cameras_generator": torch.Generator().get_state(), "guidance": {},
             "lr_scale": 1.0, "nan_rollbacks": 0, "coarse": None, "fine": fine,
             "mesh": {"vertices": verts.float(), "faces": faces.long(), "frame": frame.to_dict(), "units": "field"}}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.create(tmp, "grid-memory")
        path = ws.save_checkpoint(state, state["step"], keep=1)
        size = path.stat().st_size
        keys = sorted(ws.load_checkpoint(path)["state"]["fine"]["geometry"])
    return {"file_bytes": size, "file_mib": round(size / 2**20, 1), "goal_mb": 300,
            "meets_goal": size <= 300e6, "geometry_keys": keys,
            "parts_mib": {"geometry": round(_nbytes(fine["geometry"]) / 2**20, 1),
                          "texture": round(_nbytes(fine["texture"]) / 2**20, 1),
                          "optimizer": round(_nbytes(fine["optimizer"]) / 2**20, 1),
                          "final_mesh": round(_nbytes(state["mesh"]) / 2**20, 1)},
            "final_mesh_faces": int(faces.shape[0]), "stage_build_seconds": round(built, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quality")
    parser.add_argument("--repeats", type=int, default=3, help="grid builds in the child (best is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from avatar.config import GenerateConfig, make_config
    from avatar.pipeline.generate import fine_grid, head_frame, load_prior

    cfg = make_config(GenerateConfig, args.preset, ["device=cpu", "prior.spec=anny"])
    prior = load_prior(cfg.prior.spec)
    frame = head_frame(prior)
    spec = fine_grid(cfg.fine, frame, prior)
    child = build_in_child(spec, args.repeats, args.threads)
    report = {
        "preset": args.preset,
        "grid": {"dmtet_resolution": cfg.fine.dmtet_resolution, "grid_margin": cfg.fine.grid_margin,
                 "cells": list(spec.cells), "cell_field_units": round(spec.cell, 6),
                 "cell_mm": round(1000 * spec.cell / frame.scale, 2),
                 "box": [[round(x, 4) for x in spec.origin], [round(x, 4) for x in spec.box_max]],
                 "vertices": spec.n_vertices, "tetrahedra": spec.n_tetrahedra,
                 "device_bytes": spec.nbytes, "device_mib": round(spec.nbytes / 2**20, 1),
                 "build": child,
                 "goals": {"peak_rss_mib": 4096, "seconds": 10.0},
                 "meets_goals": bool(child.get("ok")) and child["peak_rss_growth_mib"] is not None
                 and child["peak_rss_growth_mib"] <= 4096 and child["seconds_best"] <= 10.0},
    }
    if not args.no_checkpoint:
        report["checkpoint"] = checkpoint_size(cfg, frame, prior, spec)
    n = 256
    legacy_tets, legacy_verts = 6 * n**3, (n + 1) ** 3
    report["legacy"] = {"grid": "cube 256, int64 tetrahedra, stored in every checkpoint",
                        "vertices": legacy_verts, "tetrahedra": legacy_tets,
                        "grid_bytes": legacy_verts * 3 * 4 + legacy_tets * 4 * 8,
                        "grid_mib": round((legacy_verts * 3 * 4 + legacy_tets * 4 * 8) / 2**20, 1)}
    report["machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                         "load_average": [round(x, 2) for x in os.getloadavg()],
                         "parent_peak_rss_mib": round((status_kib("VmHWM") or 0) / 1024, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
