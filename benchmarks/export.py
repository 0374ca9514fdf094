"""Export speed: the default export (the prior's topology, 2048 maps), GLB + OBJ + PLY, by stage.

The head is a run made from the head prior in seconds (fine stage only, one step, the
DMTet grid at ``--dmtet`` cells, the default preset's texture-field size), so the
exporter resamples it to its export resolution, decimates to ``--faces``, unwraps,
bakes a full-size hash-grid texture field, transfers the 52 blendshapes and the skin
and writes every format. ``--run RUN`` exports an existing run instead.

    python benchmarks/export.py [--run RUN] [--topology prior|surface] [--faces N] [--texture-size 2048]
                                [--threads 2]

``--topology prior`` (the default) times the export on the prior's own topology (fit, subdivide,
rig, bake, accessory, GLB; issue #18's goal is a quality-sized run in <= 60 s at 2048);
``--topology surface`` the surface path (decimation to ``--faces``, default 50000, unwrap, bake,
closest-point transfer);
there ``--faces`` is the head's triangle budget (default: the export's own default) and the
subdivision's figures (skin triangles, refined, Chamfer of the exported skin) are printed too.

prints JSON: the export summary's seconds per stage, wall and CPU seconds, counts, and
the load average (on a shared machine the wall figure moves with it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def prior_head_run(parent: Path, dmtet: int) -> Path:
    """A finished run whose surface is the prior's head (coarse stage skipped, one fine step)."""
    import trimesh

    from avatar.config import GenerateConfig, make_config
    from avatar.guidance import make_oracle_guidance
    from avatar.pipeline.generate import run_generate
    from avatar.render.mesh import MeshRenderer
    from avatar.workspace import Workspace

    cfg = make_config(GenerateConfig, "smoke", [
        "prompt=benchmark head", "device=cpu", "prior.spec=anny", "coarse.steps=0", "fine.steps=1",
        f"fine.dmtet_resolution={dmtet}", "fine.resolution=32", "fine.n_levels=16", "fine.log2_hashmap_size=19",
        "fine.max_resolution=2048", "fine.hidden=64", "checkpoint_every=100", "preview_every=100"])
    sphere = trimesh.creation.icosphere(2, radius=0.35)
    import torch

    verts, faces = torch.as_tensor(sphere.vertices, dtype=torch.float32), torch.as_tensor(sphere.faces)

    def target(cameras):
        return MeshRenderer().render(cameras, verts, faces, albedo=None).rgb

    guidance = make_oracle_guidance(target, seed=0, t_range=tuple(cfg.fine.t_range), total_steps=1)
    ws = Workspace.create(parent, "bench-head")
    run_generate(cfg, ws, guidance=guidance, progress=False)
    return ws.root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="export this run instead of a prior head")
    parser.add_argument("--faces", type=int, default=None,
                        help="surface: decimation target (default 50000); prior: the head's budget (default: export's)")
    parser.add_argument("--texture-size", type=int, default=2048)
    parser.add_argument("--dmtet", type=int, default=64, help="DMTet cells of the generated prior head")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--topology", choices=("surface", "prior"), default="prior")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from avatar.config import ExportConfig
    from avatar.export import export_run

    with tempfile.TemporaryDirectory() as tmp:
        made = time.perf_counter()
        run = args.run or prior_head_run(Path(tmp), args.dmtet)
        made = time.perf_counter() - made
        out = Path(tmp) / "export"
        cpu0, wall0 = time.process_time(), time.perf_counter()
        faces = args.faces or (50_000 if args.topology == "surface" else ExportConfig().faces)
        summary = export_run(run, ExportConfig(formats=("glb", "obj", "ply"), faces=faces,
                                               texture_size=args.texture_size, topology=args.topology), out_dir=out)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        sizes = {name: (out / name).stat().st_size for name in ("avatar.glb", "avatar.obj", "avatar.png",
                                                                "avatar.ply")}
    report = {
        "benchmark": "export", "run": str(args.run) if args.run else f"prior head (dmtet {args.dmtet})",
        "setup_seconds": round(made, 1), "threads": args.threads,
        "topology": args.topology, "faces": summary["faces"], "vertices": summary["vertices"],
        **{k: summary[k] for k in ("mesh_vertices", "extraction_resolution", "extracted_faces", "parts", "materials")
           if k in summary},
        "texture_size": summary["texture_size"], "morph_targets": summary["morph_targets"],
        **({"fit_chamfer_mm": summary["fit"]["chamfer_mm"]} if "fit" in summary else {}),
        **({"subdivision": {k: summary["subdivision"][k] for k in ("budget", "skin_faces_before", "skin_faces",
                                                                   "refined", "chamfer_mm", "max_move_mm")}}
           if "subdivision" in summary else {}),
        **({"settle": summary["blendshapes"]} if "blendshapes" in summary else {}),
        "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "stage_seconds": summary["seconds"],
        "file_bytes": sizes, "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0], "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
