"""The FLAME export head (issue 18, FLAME's topology): parts, joints, UVs, expressions.

FLAME's files cannot be shipped, so a small synthetic head is written in FLAME's file
format: a sphere opened at the neck, the mouth and two eye holes, with two closed
eyeballs skinned to the eye joints behind the eye holes (as FLAME 2020's), optionally
with a texture space file (``FLAME_texture.npz``: ``vt``, ``ft``).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import trimesh

from avatar.prior import PriorError
from avatar.prior import anny_head as ah
from avatar.prior import flame_export as fe
from avatar.prior.flame import load_flame
from avatar.prior.geometry import boundary_loops

N_SHAPE, N_EXPR = 300, 10
JOINTS = ["global", "neck", "jaw", "left_eye", "right_eye"]


def _hole(verts: np.ndarray, faces: np.ndarray, direction, radius: float) -> np.ndarray:
    """Faces whose centre lies within ``radius`` of the sphere point towards ``direction``."""
    point = 0.1 * np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    return np.linalg.norm(verts[faces].mean(axis=1) - point, axis=1) < radius


def write_flame_head(folder, eyes: bool = True, texture: bool = False, seed: int = 0) -> dict:
    """A FLAME-format folder of a head-like mesh; returns what it holds (FLAME's vertex order).

    Skin: an icosphere (0.1 m) without its bottom (the neck), a mouth hole on the midline and
    two eye holes; eyeballs (12 mm) sit behind the eye holes, FLAME's left eye at +X, skinned
    0.9 to their eye joint. With ``texture`` a ``FLAME_texture.npz`` holds a longitude-latitude
    layout (OBJ's v up) with its seam at the back.
    """
    rng = np.random.default_rng(seed)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.1)
    verts, faces = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    eye_dirs = {"left_eye": (0.35, 0.2, 0.91), "right_eye": (-0.35, 0.2, 0.91)}
    cut = verts[faces].mean(axis=1)[:, 1] < -0.085
    cut |= _hole(verts, faces, (0.0, -0.45, 0.89), 0.02)
    for d in eye_dirs.values():
        cut |= _hole(verts, faces, d, 0.016)
    faces = faces[~cut]
    used = np.unique(faces)
    remap = -np.ones(len(verts), dtype=np.int64)
    remap[used] = np.arange(len(used))
    verts, faces = verts[used], remap[faces]
    assert len(boundary_loops(faces)) == 4  # neck, mouth, two eye holes
    n_skin = len(verts)
    eye_rows: dict[str, np.ndarray] = {}
    if eyes:
        ball = trimesh.creation.icosphere(subdivisions=2, radius=0.012)
        for side, d in eye_dirs.items():
            centre = 0.1 * np.asarray(d) / np.linalg.norm(d) * 0.9
            eye_rows[side] = len(verts) + np.arange(len(ball.vertices))
            faces = np.concatenate([faces, len(verts) + np.asarray(ball.faces)])
            verts = np.concatenate([verts, np.asarray(ball.vertices) + centre])
    n_vert = len(verts)
    v_template = verts + np.array([0.01, -0.02, 0.03])
    weights = np.zeros((n_vert, 5))
    weights[:n_skin, :3] = rng.uniform(size=(n_skin, 3)) ** 3 + 0.01
    weights[:n_skin, 3:] = 0.02 * rng.uniform(size=(n_skin, 2))
    for j, rows in enumerate(eye_rows.values()):
        weights[rows, 1], weights[rows, 3 + j] = 0.1, 0.9
    weights /= weights.sum(axis=1, keepdims=True)
    j_regressor = np.zeros((5, n_vert))
    for j in range(3):
        members = rng.choice(n_skin, size=6, replace=False)
        j_regressor[j, members] = 1.0 / 6
    for j, side in enumerate(("left_eye", "right_eye")):
        rows = eye_rows.get(side, rng.choice(n_skin, size=6, replace=False))
        j_regressor[3 + j, rows] = 1.0 / len(rows)
    model = {
        "f": faces.astype(np.uint32), "v_template": v_template,
        "shapedirs": rng.normal(scale=1e-4, size=(n_vert, 3, N_SHAPE + N_EXPR)),
        "posedirs": rng.normal(scale=1e-4, size=(n_vert, 3, 36)),
        "J_regressor": j_regressor, "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
    }
    skin_faces = np.flatnonzero(faces.max(axis=1) < n_skin)
    static = {"lmk_face_idx": rng.choice(skin_faces, size=51).astype(np.int64),
              "lmk_b_coords": rng.dirichlet(np.ones(3), size=51)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generic_model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    (folder / "flame_static_embedding.pkl").write_bytes(pickle.dumps(static, protocol=2))
    out = {**model, "n_skin": n_skin, "eye_rows": eye_rows, "faces": faces}
    if texture:
        centred = v_template - v_template[:n_skin].mean(axis=0)
        u = np.arctan2(centred[:, 0], centred[:, 2]) / (2 * np.pi) + 0.5  # seam at the back
        v = 1.0 - np.arccos(np.clip(centred[:, 1] / np.linalg.norm(centred, axis=1), -1, 1)) / np.pi
        corner = np.stack([u, v], axis=1)[faces]  # (F, 3, 2)
        wraps = np.ptp(corner[:, :, 0], axis=1) > 0.5
        corner[:, :, 0] = np.where(wraps[:, None] & (corner[:, :, 0] < 0.5), corner[:, :, 0] + 1.0, corner[:, :, 0])
        corner[:, :, 0] /= 1.0 + 1e-3  # keep u <= 1
        vt, ft = np.unique(corner.reshape(-1, 2), axis=0, return_inverse=True)
        np.savez(folder / fe.TEXTURE_FILE, vt=vt, ft=ft.reshape(-1, 3).astype(np.int32),
                 mean=np.zeros((4, 4, 3)), tex_dir=np.zeros((4, 4, 3, 1)))
        out.update(vt=vt, ft=ft.reshape(-1, 3))
    return out


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the UV layout and eye texture are made in it), sharing the
    user's compiled native extension (an export rasterises with it)."""
    from avatar.paths import cache_dir

    root = tmp_path / "cache"
    root.mkdir()
    (root / "ext").symlink_to(cache_dir("ext"), target_is_directory=True)
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(root))
    monkeypatch.setattr(ah, "_memory_cache", {})
    return root


@pytest.fixture
def flame_head(tmp_path):
    folder = tmp_path / "flame"
    return folder, write_flame_head(folder, texture=True)


def test_parts_joints_and_lining(flame_head):
    folder, arrays = flame_head
    head = fe.load_flame_export_head(folder, dtype=torch.float64)
    assert list(head.parts) == fe.PART_NAMES
    n_skin = arrays["n_skin"]
    # Rows: FLAME's skin, then the eyeball skinned to FLAME's left eye, then the right one.
    np.testing.assert_array_equal(head.prior_index, np.arange(len(arrays["v_template"])))
    for side in ("left_eye", "right_eye"):
        part = head.parts[side]
        np.testing.assert_array_equal(head.prior_index[part.offset:part.offset + part.num_vertices],
                                      arrays["eye_rows"][side])
        assert part.material == "eyes" and part.rigid_joint == side
        mesh = trimesh.Trimesh(head.template[part.offset:part.offset + part.num_vertices].numpy(),
                               part.vertex_map[part.faces], process=False)
        assert mesh.is_watertight and mesh.volume > 0  # closed and outward, seams welded back
        assert part.uvs.min() >= 0.0 and part.uvs.max() <= 1.0
    skin = head.parts["skin"]
    assert (skin.offset, skin.num_vertices, skin.material, skin.rigid_joint) == (0, n_skin, "skin", None)
    assert np.array_equal(skin.vertex_map[:n_skin], np.arange(n_skin))
    assert len(head.parts["skin"].faces) + sum(len(head.parts[s].faces) for s in ("left_eye", "right_eye")) \
        == len(arrays["faces"])
    # FLAME's joints under the export's names, with FLAME's weights and hierarchy.
    assert head.joint_names == ["neck", "head", "jaw", "left_eye", "right_eye"]
    assert head.parents == [-1, 0, 1, 1, 1]
    np.testing.assert_allclose(head.skin_weights.numpy(), arrays["weights"][head.prior_index])
    # The lining: the mouth's and the eye holes' rims, not the neck's.
    loops = sorted(boundary_loops(arrays["faces"][arrays["faces"].max(axis=1) < n_skin]), key=len)
    assert set(head.openings) == {"neck", "mouth", "left_eye", "right_eye"}
    assert set(np.flatnonzero(head.lining)) == set(np.concatenate(
        [head.openings["mouth"], head.openings["left_eye"], head.openings["right_eye"]]).tolist())
    assert {frozenset(r.tolist()) for r in loops} == {frozenset(r.tolist()) for r in head.openings.values()}
    mouth = head.template[head.openings["mouth"]].numpy()
    assert abs(mouth[:, 0].mean() - head.template[:n_skin, 0].numpy().mean()) < 0.01 and mouth[:, 1].mean() < 0
    assert head.template[head.openings["left_eye"], 0].mean() > 0 > head.template[head.openings["right_eye"], 0].mean()
    assert head.summary()["visemes"] == [] and head.visemes == {}


def test_expressions_match_flame_forward(flame_head):
    folder, _ = flame_head
    prior = load_flame(folder, dtype=torch.float64)
    head = fe.load_flame_export_head(folder, dtype=torch.float64)
    assert head.expression_names == prior.expression_names
    assert head.morph_names == [f"exp_{i:02d}" for i in range(N_EXPR)]
    rng = np.random.default_rng(3)
    shape = torch.as_tensor(rng.normal(size=(2, N_SHAPE)))
    expression = torch.as_tensor(rng.normal(size=(2, prior.num_expression)) * 0.3)  # jaw_rot_* included
    pose = torch.as_tensor(rng.normal(scale=0.2, size=(2, 5, 3)))
    ours = head.forward(shape=shape, expression=expression, pose=pose)
    theirs = prior.forward(shape=shape, expression=expression, pose=pose)
    # Row i of the export head is FLAME vertex prior_index[i].
    torch.testing.assert_close(ours.vertices, theirs.vertices[:, head.prior_index], rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.joints, theirs.joints, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.landmarks, theirs.landmarks, rtol=0, atol=1e-12)
    jaw = head.vertices(expression={"jaw_rot_x": 0.3})[0]
    torch.testing.assert_close(jaw, prior.forward(expression={"jaw_rot_x": 0.3}).vertices[0, head.prior_index])
    quality = head.expression_quality()
    assert list(quality) == head.morph_names and all(q["flipped"] == 0 for q in quality.values())
    with pytest.raises(PriorError, match="no ARKit-named expressions"):
        head.viseme_weights("viseme_aa")


def test_eyeball_rows_are_reordered_to_follow_the_skin(tmp_path):
    """A FLAME whose eyeballs come first still gives skin, left eye, right eye rows, and the
    same vertices as the prior through ``prior_index``."""
    folder = tmp_path / "flame"
    arrays = write_flame_head(folder, texture=True)
    prior = load_flame(folder, dtype=torch.float64)
    perm = np.random.default_rng(0).permutation(prior.num_vertices)
    inverse = np.argsort(perm)
    prior.template = prior.template[perm]
    prior.faces = torch.as_tensor(inverse[prior.faces.numpy()])
    prior.cap_faces = torch.as_tensor(inverse[prior.cap_faces.numpy()])
    prior.shape_dirs, prior.expression_dirs = prior.shape_dirs[:, perm], prior.expression_dirs[:, perm]
    prior.skin_weights = prior.skin_weights[perm]
    prior.posedirs = prior.posedirs.reshape(-1, prior.num_vertices, 3)[:, perm].reshape(prior.posedirs.shape)
    prior.landmark_vertices = torch.as_tensor(inverse[prior.landmark_vertices.numpy()])
    head = fe.flame_export_head_from_prior(prior)  # its texture file found in its own folder
    assert head.uv_source == "texture file"
    left = head.parts["left_eye"]
    np.testing.assert_array_equal(np.sort(perm[head.prior_index[left.offset:left.offset + left.num_vertices]]),
                                  arrays["eye_rows"]["left_eye"])
    assert list(head.parts) == fe.PART_NAMES and head.parts["skin"].offset == 0
    expression = {"exp_03": 1.0, "jaw_rot_x": 0.2}
    torch.testing.assert_close(head.forward(expression=expression).vertices,
                               prior.forward(expression=expression).vertices[:, head.prior_index])


def test_texture_file_uvs_used_when_present(flame_head, monkeypatch):
    folder, arrays = flame_head

    def no_layout(*args, **kwargs):
        raise AssertionError("a generated layout despite FLAME's texture file")

    monkeypatch.setattr(fe, "generated_corner_uvs", no_layout)
    head = fe.load_flame_export_head(folder, dtype=torch.float64)
    assert head.uv_source == "texture file"
    skin = head.parts["skin"]
    n_skin = arrays["n_skin"]
    skin_face_ids = np.flatnonzero(arrays["faces"].max(axis=1) < n_skin)
    want = arrays["vt"][arrays["ft"][skin_face_ids]]
    want[..., 1] = 1.0 - want[..., 1]  # glTF's v down
    np.testing.assert_allclose(skin.uvs[skin.faces], want, atol=1e-6)
    np.testing.assert_array_equal(skin.vertex_map[skin.faces], arrays["faces"][skin_face_ids])
    assert len(skin.vertex_map) > skin.num_vertices  # split at the layout's seam


def test_generated_uv_layout_made_once_and_cached(tmp_path, monkeypatch, private_cache):
    folder = tmp_path / "flame"
    arrays = write_flame_head(folder)
    made = []
    original = fe.generated_corner_uvs
    monkeypatch.setattr(fe, "generated_corner_uvs", lambda v, f: made.append(1) or original(v, f))
    first = fe.load_flame_export_head(folder)
    assert first.uv_source == "generated" and len(made) == 1
    cached = list((private_cache / "prior").glob("flame-uv-*.npz"))
    assert len(cached) == 1 and cached[0].name == fe._layout_cache_path(
        first.parts["skin"].vertex_map[first.parts["skin"].faces], arrays["n_skin"]).name
    monkeypatch.setattr(ah, "_memory_cache", {})  # a new process: only the file remains
    second = fe.load_flame_export_head(folder)
    assert len(made) == 1  # read from the cache, not made again
    skin = second.parts["skin"]
    np.testing.assert_array_equal(skin.uvs, first.parts["skin"].uvs)
    np.testing.assert_array_equal(skin.vertex_map[skin.faces], arrays["faces"][arrays["faces"].max(axis=1)
                                                                                < arrays["n_skin"]])
    assert skin.uvs.min() >= 0.0 and skin.uvs.max() <= 1.0
    # Charts do not overlap much: the UV area is the sum of distinct charts' areas.
    tri = skin.uvs[skin.faces]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    assert area.min() > 0 and 0.2 < area.sum() <= 1.0


def test_bad_texture_file_is_one_line_error(flame_head):
    folder, arrays = flame_head
    np.savez(folder / fe.TEXTURE_FILE, vt=arrays["vt"], ft=arrays["ft"][:-1])
    with pytest.raises(PriorError, match=r"FLAME_texture\.npz.*do not fit.*remove it") as err:
        fe.load_flame_export_head(folder)
    assert "\n" not in str(err.value)


def test_flame_without_eyeballs_has_no_eye_parts(tmp_path):
    folder = tmp_path / "flame"
    write_flame_head(folder, eyes=False)
    head = fe.load_flame_export_head(folder)
    assert list(head.parts) == ["skin"]
    assert head.texture_paths() == {"inside_mouth_mask": None, "eyes": None, "mouth": None}
    assert set(head.openings) == {"neck", "mouth"}  # the eye holes are no eye rims without eyeballs
    with pytest.raises(PriorError, match="no left eyeball"):
        head.exposed_eyeball_vertices(head.template, "left")


def test_eye_texture_shows_the_pupil_at_the_front_and_the_eye_is_open(flame_head):
    from PIL import Image

    folder, _ = flame_head
    head = fe.load_flame_export_head(folder, dtype=torch.float64)
    textures = head.texture_paths()
    assert textures["mouth"] is None and textures["inside_mouth_mask"] is None
    eyes = np.asarray(Image.open(textures["eyes"]).convert("RGB"), dtype=np.float64) / 255.0
    size = eyes.shape[0]
    for side in ("left_eye", "right_eye"):
        part = head.parts[side]
        points = head.template[part.model_index].numpy()
        centre = points.mean(axis=0)

        def texel(i, uvs=part.uvs):
            return eyes[min(int(uvs[i, 1] * size), size - 1), min(int(uvs[i, 0] * size), size - 1)]

        assert texel(int(np.argmax(points[:, 2]))).mean() < 0.2  # the pupil looks down +Z
        assert texel(int(np.argmin(points[:, 2]))).mean() > 0.9  # the back is white
        assert texel(int(np.argmax(np.abs(points[:, 0] - centre[0])))).mean() > 0.9  # the side too
        # Through the eye hole the eyeball shows.
        assert len(head.exposed_eyeball_vertices(head.template, side.split("_")[0])) >= 5


@pytest.mark.slow
def test_build_prior_export_takes_the_flame_head(tmp_path):
    """``export --topology prior`` of a FLAME run: the FLAME head fitted to a surface, its parts,
    ``eyes`` material, exp_NN targets (no visemes) and joints in a GLB the Khronos validator passes."""
    from types import SimpleNamespace

    from test_export import validate_glb

    from avatar.export.glb_rig import build_rigged_glb
    from avatar.export.prior_export import build_prior_export

    folder = tmp_path / "flame"
    write_flame_head(folder)
    prior = load_flame(folder)
    head = fe.flame_export_head_from_prior(prior)
    # The "generated" surface: FLAME at another shape, its openings closed, 1 mm further out.
    rng = np.random.default_rng(0)
    moved = prior.forward(shape=torch.as_tensor(rng.normal(size=N_SHAPE) * 0.5, dtype=torch.float32))
    skin = (prior.skin_weights[:, 3:].sum(dim=1) <= 0.5).numpy()
    faces = prior.all_faces().numpy()
    mesh = trimesh.Trimesh(moved.vertices[0].double().numpy(), faces[skin[faces].all(axis=1)], process=True)
    mesh.remove_unreferenced_vertices()
    frame = SimpleNamespace(to_metres=lambda x: x, to_field=lambda x: x)
    avatar = SimpleNamespace(frame=frame, vertices=torch.as_tensor(mesh.vertices + 0.001 * mesh.vertex_normals),
                             faces=torch.as_tensor(mesh.faces), albedo=lambda p: torch.full((len(p), 3), 0.6),
                             texture=torch.nn.Linear(1, 1))
    built = build_prior_export(avatar, 64, head=head, faces=5400)
    assert [p.name for p in built.parts] == ["skin", "left_eye", "right_eye"]
    assert [m.name for m in built.materials] == ["skin", "eyes"]
    assert built.morph_names == head.morph_names == [f"exp_{i:02d}" for i in range(N_EXPR)]
    assert built.skeleton.names == fe.JOINT_NAMES
    assert built.report["fit"]["chamfer_mm"] < 1.0
    path = tmp_path / "flame.glb"
    path.write_bytes(build_rigged_glb(built.parts, built.materials, built.skeleton, built.morph_names))
    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0 and report["issues"]["numWarnings"] == 0


@pytest.mark.slow
def test_a_flame_run_exports_on_flames_topology_by_default(tmp_path, monkeypatch):
    """``avatar export`` of a run generated on a FLAME prior (``prior.spec=flame:DIR``) takes the
    FLAME export head through run.py's default path: FLAME's skin and eyes, its expression
    components as targets, the five joints, in a GLB the Khronos validator passes."""
    from pygltflib import GLTF2
    from test_export import validate_glb

    from avatar.config import ExportConfig, GenerateConfig, make_config
    from avatar.export import export_run
    from avatar.pipeline.generate import run_generate
    from avatar.workspace import Workspace

    monkeypatch.setenv("AVATAR_OUTPUTS", str(tmp_path))
    write_flame_head(tmp_path / "flame")
    cfg = make_config(GenerateConfig, "smoke", ["prompt=a head", "guidance.model=tiny", "device=cpu",
                                                f"prior.spec=flame:{tmp_path / 'flame'}", "coarse.steps=0",
                                                "fine.steps=2", "fine.dmtet_resolution=64", "checkpoint_every=100",
                                                "preview_every=100"])
    ws = Workspace.create(tmp_path, "run")
    run_generate(cfg, ws, progress=False)
    summary = export_run(ws.root, ExportConfig(texture_size=256, formats=("glb",)), out_dir=tmp_path / "export")
    assert summary["topology"] == "prior"
    assert list(summary["parts"]) == ["skin", "left_eye", "right_eye"] and summary["materials"] == ["skin", "eyes"]
    assert summary["joints"] == fe.JOINT_NAMES and summary["morph_targets"] == N_EXPR
    assert summary["fit"]["chamfer_mm"] < 1.0
    path = tmp_path / "export" / "avatar.glb"
    gltf = GLTF2().load_binary(str(path))
    assert gltf.meshes[0].extras["targetNames"] == [f"exp_{i:02d}" for i in range(N_EXPR)]
    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0 and report["issues"]["numWarnings"] == 0
