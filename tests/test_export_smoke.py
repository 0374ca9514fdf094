"""Acceptance of the surface export (``--topology surface``) on the session's smoke run (tiny
guidance, smoke preset): the files engines read, validated, loaded back and animated. Slow:
the smoke run takes minutes; the export itself about one. Exports go into a copy of the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import (
    ARKIT_NAMES,
    _chin_and_forehead,
    copy_run,
    glb_arrays,
    node_world,
    psnr,
    rotation_x,
    skin_vertices,
    validate_glb,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_cache")]


@pytest.fixture(scope="module")
def smoke_export(smoke_run, tmp_path_factory):
    from avatar.config import ExportConfig
    from avatar.export import export_run

    run = copy_run(smoke_run[0], tmp_path_factory.mktemp("smoke-export"))
    # The surface topology: these tests are about the generated surface and its closest-point rig
    # (the prior topology's are in test_export_prior.py and test_export.py).
    summary = export_run(run, ExportConfig(formats=("glb", "obj", "ply", "video"), topology="surface",
                                           texture_size=1024, video_frames=24, video_size=128))
    print("export summary:", summary)
    return run, summary


def test_glb_has_no_validator_errors(smoke_export):
    run, _ = smoke_export
    report = validate_glb(run / "export" / "avatar.glb")
    assert report["issues"]["numErrors"] == 0
    print("validator warnings:", report["issues"]["numWarnings"])


def test_glb_loads_back_textured_with_arkit_targets_and_a_named_skin(smoke_export):
    import trimesh

    run, summary = smoke_export
    path = run / "export" / "avatar.glb"
    scene = trimesh.load(path, process=False)
    (mesh,) = scene.geometry.values()
    assert len(mesh.vertices) == summary["vertices"]
    assert mesh.visual.kind == "texture"
    assert mesh.visual.material.baseColorTexture is not None
    assert mesh.visual.material.baseColorTexture.size == (1024, 1024)
    arrays = glb_arrays(path)
    assert arrays["names"] == ARKIT_NAMES and len(arrays["targets"]) == 52
    names = [arrays["gltf"].nodes[n].name for n in arrays["joint_nodes"]]
    assert names == ["neck", "head", "left_eye", "right_eye"]
    assert np.abs(arrays["weights"].sum(axis=1) - 1.0).max() < 1e-6
    extras = arrays["gltf"].asset.extras
    assert extras["prompt"] == "an old sea captain" and extras["seed"] == 0 and extras["models"]
    assert not arrays["gltf"].extensionsRequired


def test_jaw_open_moves_the_chin_down_and_not_the_forehead(smoke_export):
    from avatar.pipeline.generate import load_prior

    run, _ = smoke_export
    arrays = glb_arrays(run / "export" / "avatar.glb")
    jaw = arrays["targets"][arrays["names"].index("jawOpen")]
    chin, forehead = _chin_and_forehead(load_prior("anny"), arrays["positions"])
    print("chin dy (mm):", 1000 * jaw[chin, 1].mean(), "forehead max (mm):",
          1000 * np.linalg.norm(jaw[forehead], axis=1).max())
    assert jaw[chin, 1].mean() <= -0.005
    assert np.linalg.norm(jaw[forehead], axis=1).max() < 0.001


def test_rotating_the_head_joint_rotates_the_head(smoke_export):
    run, _ = smoke_export
    arrays = glb_arrays(run / "export" / "avatar.glb")
    gltf = arrays["gltf"]
    head = next(n for n in arrays["joint_nodes"] if gltf.nodes[n].name == "head")
    local = np.eye(4)
    local[:3, 3] = gltf.nodes[head].translation
    local[:3, :3] = rotation_x(np.radians(-25.0))
    posed = skin_vertices(arrays, {head: local})
    pivot = node_world(gltf, head)[:3, 3]
    rigid = (arrays["positions"] - pivot) @ rotation_x(np.radians(-25.0)).T + pivot
    top = arrays["positions"][:, 1] > pivot[1] + 0.04
    error = np.linalg.norm(posed[top] - rigid[top], axis=1)
    assert top.sum() > 1000
    assert np.quantile(error, 0.99) < 1e-3 and error.max() < 3e-3
    # The base of the neck follows the neck joint, not the head: it moves far less.
    bottom = arrays["positions"][:, 1] < arrays["positions"][:, 1].min() + 0.01
    moved = np.linalg.norm(posed - arrays["positions"], axis=1)
    assert moved[bottom].mean() < 0.2 * moved[top].mean()


def test_baked_texture_reproduces_the_texture_field(smoke_export):
    from avatar.export.video import render_textured
    from avatar.export.viewer import read_glb
    from avatar.pipeline.artifact import load_avatar
    from avatar.render.cameras import orbit_cameras
    from avatar.render.mesh import MeshRenderer

    run, _ = smoke_export
    avatar = load_avatar(run)
    glb = read_glb(run / "export" / "avatar.glb")
    verts = avatar.frame.to_field(torch.as_tensor(glb.positions, dtype=torch.float32))
    faces = torch.as_tensor(glb.faces)
    cams = orbit_cameras(8, elevation=10.0, radius=1.6, fov_y=35.0, resolution=256)
    with torch.no_grad():
        baked = render_textured(cams, verts, faces, torch.as_tensor(glb.uvs),
                                torch.as_tensor(glb.texture, dtype=torch.float32) / 255.0)
        field = MeshRenderer().render(cams, verts, faces, albedo=avatar.albedo).rgb
    value = psnr(baked, field)
    print(f"bake PSNR over 8 views: {value:.1f} dB")
    assert value >= 30.0


def test_obj_ply_and_turntable_load_back(smoke_export):
    import imageio.v2 as imageio
    import trimesh

    run, summary = smoke_export
    out = run / "export"
    obj = trimesh.load(out / "avatar.obj", process=False)
    assert len(obj.faces) == summary["faces"] and obj.visual.kind == "texture"
    assert obj.visual.material.image is not None
    ply = trimesh.load(out / "avatar.ply", process=False)
    assert len(ply.faces) == summary["faces"] and ply.visual.kind == "vertex"
    reader = imageio.get_reader(out / "turntable.mp4", format="FFMPEG")
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 24 and frames[0].shape == (128, 128, 3)
