"""Helpers shared by the tests of whole runs (generate, edit, export, batch)."""

from __future__ import annotations

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
