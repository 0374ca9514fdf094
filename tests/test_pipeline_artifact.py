"""Reading a finished avatar back from its run folder (what edit and export start from)."""

from __future__ import annotations

import pytest
import torch
from support import oracle_sphere_guidance, tiny_run_config

from avatar.pipeline.artifact import ArtifactError, load_avatar
from avatar.pipeline.generate import load_final_mesh, run_generate
from avatar.workspace import Workspace

pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.mark.parametrize("coarse_steps, fine_steps", [(1, 2), (2, 0)])
def test_load_avatar_rebuilds_the_final_surface_and_its_colours(tmp_path, one_thread, coarse_steps, fine_steps):
    cfg = tiny_run_config(tmp_path, 1)
    cfg.coarse.steps, cfg.fine.steps = coarse_steps, fine_steps
    ws = Workspace.create(tmp_path, "artifact")
    run_generate(cfg, ws, guidance=oracle_sphere_guidance(cfg), progress=False)
    before = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()}
    avatar = load_avatar(ws.root)
    verts_m, faces, frame = load_final_mesh(ws)
    assert avatar.kind == "generate" and avatar.prompt == "resume" and avatar.prior_spec == "anny"
    assert torch.allclose(avatar.vertices_metres, verts_m) and torch.equal(avatar.faces, faces)
    assert avatar.has_fine == (fine_steps > 0)
    colours = avatar.albedo(avatar.vertices[:50])
    assert colours.shape == (50, 3) and bool(((colours >= 0) & (colours <= 1)).all())
    if avatar.has_fine:
        v, f = avatar.geometry.extract()
        assert torch.allclose(v, avatar.vertices, atol=1e-6) and torch.equal(f.long(), avatar.faces)
    else:
        with pytest.raises(ArtifactError, match="no fine stage"):
            load_avatar(ws.root, need_fine=True)
    assert {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()} == before


def test_load_avatar_refuses_an_unfinished_run(tmp_path, one_thread):
    cfg = tiny_run_config(tmp_path, 2)
    ws = Workspace.create(tmp_path, "unfinished")
    run_generate(cfg, ws, guidance=oracle_sphere_guidance(cfg), progress=False, stop_after=1)
    with pytest.raises(ArtifactError, match="has not finished.*--resume"):
        load_avatar(ws.root)
