"""The fine stage's DMTet grid (issue #14, 7): sized like HeadSculpt's over the head's box,
built on the run's device, never saved; old checkpoints that saved it still resume; a run
folder without a readable config.yaml is a one-line error, never the quality grid."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from support import oracle_sphere_guidance, tiny_run_config

from avatar.config import GenerateConfig, make_config
from avatar.fields.dmtet import DMTetGeometry
from avatar.ops.marching_tets import TetGridSpec, cube_tetrahedra
from avatar.pipeline.artifact import ArtifactError, load_avatar
from avatar.pipeline.generate import fine_grid, head_frame, run_generate
from avatar.workspace import Workspace

pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def prior():
    from avatar.prior import load_head_model

    return load_head_model("anny")


@pytest.mark.parametrize("preset, low, high", [("quality", 10e6, 12e6), ("fast", 1e6, 3e6),
                                                ("smoke", 0.02e6, 0.2e6)])
def test_preset_grids_span_the_head_with_room_and_quality_is_headsculpt_sized(prior, preset, low, high):
    cfg = make_config(GenerateConfig, preset, ["prior.spec=anny"])
    frame = head_frame(prior)
    spec = fine_grid(cfg.fine, frame, prior)
    assert low <= spec.n_tetrahedra <= high
    assert spec.resolution == cfg.fine.dmtet_resolution
    head = frame.to_field(prior.template.float())
    margin, headroom, tol = cfg.fine.grid_margin, cfg.fine.grid_headroom, 1e-4
    room = (margin, headroom, margin)  # above the crown: room for hats
    assert all(o <= lo - margin + tol for o, lo in zip(spec.origin, head.min(0).values.tolist()))
    assert all(m >= hi + r - tol for m, hi, r in zip(spec.box_max, head.max(0).values.tolist(), room))
    assert headroom >= 0.45  # 18 cm: a top hat stands on the crown
    assert all(-frame.bound - tol <= x <= frame.bound + tol for x in (*spec.origin, *spec.box_max))
    # The box is the head's, not the field cube: cells 1.4x+ smaller than a cube grid of this resolution.
    assert spec.cell <= 2.0 * frame.bound / spec.resolution / 1.4
    geo = DMTetGeometry(spec, frame, device="meta")  # built where asked (here: shapes only)
    assert geo.tets.device.type == "meta" and geo.tets.dtype == torch.int32
    assert geo.tets.shape == (spec.n_tetrahedra, 4)


def _tensors(obj, path=""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def test_fine_checkpoints_hold_no_grid(tmp_path, one_thread):
    cfg = tiny_run_config(tmp_path, 2)
    ws = Workspace.create(tmp_path, "no-grid")
    run_generate(cfg, ws, guidance=oracle_sphere_guidance(cfg), progress=False, stop_after=3)
    state = ws.load_checkpoint()["state"]
    geometry = state["fine"]["geometry"]
    assert set(geometry) == {"sdf", "deform", "_extra_state"}
    n_verts = geometry["sdf"].shape[0]
    spec = TetGridSpec.from_dict(geometry["_extra_state"]["grid"])
    assert spec.n_vertices == n_verts and spec.resolution == cfg.fine.dmtet_resolution
    # Nothing in the whole checkpoint is a grid: no (T, 4) index table, no second (V, 3) vertex set.
    for path, t in _tensors(state):
        assert not (t.dim() == 2 and t.shape[1] == 4 and not t.is_floating_point()), path
        assert not (t.shape == (n_verts, 3) and path != ".fine.geometry.deform"
                    and "optimizer" not in path), path


def _to_old_format(ws: Workspace, path=None) -> None:
    """Rewrite a checkpoint as checkpoints were before grids were rebuilt: the cube grid's
    vertices and int64 tetrahedra stored as buffers, no grid spec, and the SDF (with Adam's
    moments of it) in field units rather than cells."""
    ckpt = ws.load_checkpoint(path)
    fine = ckpt["state"]["fine"]
    geometry = fine["geometry"]
    spec = TetGridSpec.from_dict(geometry.pop("_extra_state")["grid"])
    assert spec == TetGridSpec.cube(spec.resolution, 1.0), "old grids were cubes of the field cube"
    verts, tets = cube_tetrahedra(spec.resolution, 1.0)
    geometry["grid_verts"], geometry["tets"] = verts.clone(), tets.long().clone()
    geometry["sdf"] = geometry["sdf"] * spec.cell
    sdf_moments = fine["optimizer"]["state"].get(0, {})  # the sdf is the first parameter
    if "exp_avg" in sdf_moments:
        sdf_moments["exp_avg"] = sdf_moments["exp_avg"] / spec.cell
        sdf_moments["exp_avg_sq"] = sdf_moments["exp_avg_sq"] / spec.cell**2
    payload = {"format": "avatar-checkpoint", "version": 1, "step": ckpt["step"], "state": ckpt["state"]}
    torch.save(payload, ckpt["path"])


def test_old_checkpoints_with_the_grid_resume_and_load(tmp_path, one_thread):
    cfg = tiny_run_config(tmp_path, 2)
    cfg.fine.grid_margin = cfg.fine.grid_headroom = 1.0  # the whole field cube, as grids were before
    straight = Workspace.create(tmp_path / "a", "straight")
    run_generate(cfg, straight, guidance=oracle_sphere_guidance(cfg), progress=False)
    split = Workspace.create(tmp_path / "b", "split")
    run_generate(cfg, split, guidance=oracle_sphere_guidance(cfg), progress=False, stop_after=3)
    _to_old_format(split)
    assert "grid_verts" in split.load_checkpoint()["state"]["fine"]["geometry"]
    # Old configs had no grid_margin (so they read as the default): the checkpoint's grid wins.
    old_cfg = copy.deepcopy(cfg)
    old_cfg.fine.grid_margin = GenerateConfig().fine.grid_margin
    old_cfg.fine.grid_headroom = GenerateConfig().fine.grid_headroom
    run_generate(old_cfg, split, guidance=oracle_sphere_guidance(cfg), progress=False, resume=True)
    a = straight.load_checkpoint()["state"]["fine"]
    b = split.load_checkpoint()["state"]["fine"]
    assert set(b["geometry"]) == {"sdf", "deform", "_extra_state"}  # the next checkpoint is the new format
    assert b["geometry"]["_extra_state"]["sdf_units"] == "cells"
    # The SDF went to field units and back (a rounding step apart), Adam's moments with it: the
    # resumed run continues as the uninterrupted one did.
    for group in ("geometry", "texture"):
        for key, value in a[group].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, b[group][key], rtol=1e-4, atol=1e-5, msg=str((group, key)))
    _to_old_format(straight)
    avatar = load_avatar(straight.root)
    assert avatar.geometry.spec == TetGridSpec.cube(cfg.fine.dmtet_resolution, 1.0)
    v, f = avatar.geometry.extract()
    assert torch.allclose(v, avatar.vertices, atol=1e-6) and torch.equal(f, avatar.faces)


@pytest.fixture
def finished_run(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_run_config(tmp_path, 1)
        cfg.coarse.steps = 0
        ws = Workspace.create(tmp_path, "finished")
        run_generate(cfg, ws, guidance=oracle_sphere_guidance(cfg), progress=False)
    finally:
        torch.set_num_threads(threads)
    return ws


@pytest.fixture
def grids_built(monkeypatch):
    """The specs of every DMTet grid built while the test runs."""
    import avatar.fields.dmtet as dmtet

    built: list[TetGridSpec] = []
    real = dmtet.tetrahedral_grid

    def recording(spec, device="cpu"):
        built.append(spec)
        return real(spec, device)

    monkeypatch.setattr(dmtet, "tetrahedral_grid", recording)
    return built


GARBLED = "fine:\n  dmtet_resolution: [12\n  deform_scale: : 0.5\n"


@pytest.mark.parametrize("damage", ["missing", "garbled", "not a mapping"])
def test_unreadable_config_is_a_one_line_error_and_builds_no_grid(finished_run, grids_built, damage):
    from avatar.config import ExportConfig
    from avatar.export import export_run

    ws = finished_run
    if damage == "missing":
        ws.config_path.unlink()
    else:
        ws.config_path.write_text(GARBLED if damage == "garbled" else "- just\n- a list\n")
    with pytest.raises(ArtifactError) as info:
        load_avatar(ws.root)
    message = str(info.value)
    assert "\n" not in message and str(ws.config_path) in message
    assert {"missing": "is missing", "garbled": "not valid YAML (", "not a mapping": "not a mapping"}[damage] in message
    with pytest.raises(ArtifactError):
        export_run(ws.root, ExportConfig(), out_dir=ws.root / "out")
    assert grids_built == []


def test_a_config_without_the_fine_sizes_never_builds_the_quality_grid(finished_run, grids_built):
    ws = finished_run
    spec = TetGridSpec.from_dict(ws.load_checkpoint()["state"]["fine"]["geometry"]["_extra_state"]["grid"])
    ws.config_path.write_text("prompt: resume\n")  # every fine size falls back to the quality preset's
    with pytest.raises(ArtifactError, match="does not fit the field sizes in .*config.yaml"):
        load_avatar(ws.root)  # the texture field's sizes were the smoke preset's
    assert grids_built == [spec]  # the run's own grid, from its checkpoint
    assert spec.n_tetrahedra < 1e5


@pytest.mark.parametrize("command", ["export", "generate --resume", "edit"])
def test_cli_reports_an_unreadable_config_in_one_line_with_exit_code_2(finished_run, command):
    ws = finished_run
    ws.config_path.write_text(GARBLED)
    args = {"export": ["export", str(ws.root)], "generate --resume": ["generate", "--resume", str(ws.root)],
            "edit": ["edit", str(ws.root), "add a hat", "--guidance", "tiny"]}[command]
    out = subprocess.run([sys.executable, "-m", "avatar.cli", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(ws.config_path) in lines[0], out.stderr
    assert "not valid YAML" in lines[0] and "at line 3" in lines[0]
