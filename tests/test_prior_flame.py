"""The FLAME loader: chumpy-free unpickling, LBS equal to smplx's, clear errors.

The FLAME files cannot be shipped, so the test writes a small synthetic model in
FLAME's format: a Python-2 style pickle (protocol 2) whose arrays are wrapped in
a stand-in ``chumpy.ch.Ch`` class that exists only while pickling.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
import trimesh

from avatar.prior import PriorError, load_head_model
from avatar.prior.flame import load_flame, read_flame_pickle
from avatar.prior.landmarks import CONTOUR_NAMES

N_SHAPE, N_EXPR, N_JOINTS = 300, 100, 5


def _fake_chumpy_class():
    """A class pickled as ``chumpy.ch.Ch`` with chumpy's kind of state (value in ``x``)."""

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x)
            self._dirty_vars = set()
            self._itr = None

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": self._dirty_vars, "_itr": self._itr}

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    return Ch


def write_synthetic_flame(folder: Path, monkeypatch, seed: int = 0, neck_hole: bool = True) -> dict:
    """Write a FLAME-format folder; returns the plain arrays it holds."""
    rng = np.random.default_rng(seed)
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.1)
    faces = sphere.faces
    if neck_hole:  # open the bottom like FLAME's neck
        bottom = sphere.vertices[faces].mean(1)[:, 1] < -0.09
        faces = faces[~bottom]
        used = np.unique(faces)
        remap = -np.ones(len(sphere.vertices), dtype=np.int64)
        remap[used] = np.arange(len(used))
        verts, faces = sphere.vertices[used], remap[faces]
    else:
        verts = sphere.vertices
    n_vert = len(verts)
    v_template = verts + rng.normal(scale=0.002, size=verts.shape) + np.array([0.01, -0.02, 0.03])
    shapedirs = rng.normal(scale=1e-3, size=(n_vert, 3, N_SHAPE + N_EXPR))
    posedirs = rng.normal(scale=1e-3, size=(n_vert, 3, 9 * (N_JOINTS - 1)))
    weights = rng.uniform(size=(n_vert, N_JOINTS)) ** 3
    weights /= weights.sum(axis=1, keepdims=True)
    j_dense = np.zeros((N_JOINTS, n_vert))
    for j in range(N_JOINTS):
        members = rng.choice(n_vert, size=6, replace=False)
        j_dense[j, members] = rng.uniform(size=6)
        j_dense[j] /= j_dense[j].sum()
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32)
    static = {
        "lmk_face_idx": rng.choice(len(faces), size=51).astype(np.int64),
        "lmk_b_coords": rng.dirichlet(np.ones(3), size=51),
    }
    dynamic = {
        "lmk_face_idx": rng.choice(len(faces), size=(79, 17)).astype(np.int64),
        "lmk_b_coords": rng.dirichlet(np.ones(3), size=(79, 17)),
    }

    Ch = _fake_chumpy_class()
    chumpy = types.ModuleType("chumpy")
    chumpy_ch = types.ModuleType("chumpy.ch")
    chumpy_ch.Ch = Ch
    chumpy.ch = chumpy_ch
    monkeypatch.setitem(sys.modules, "chumpy", chumpy)
    monkeypatch.setitem(sys.modules, "chumpy.ch", chumpy_ch)
    model = {
        "f": faces.astype(np.uint32),
        "v_template": Ch(v_template),
        "shapedirs": Ch(shapedirs),
        "posedirs": posedirs,
        "J_regressor": scipy.sparse.csc_matrix(j_dense),
        "weights": Ch(weights),
        "kintree_table": kintree,
        "J": Ch(j_dense @ v_template),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generic_model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    (folder / "flame_static_embedding.pkl").write_bytes(pickle.dumps(static, protocol=2))
    np.save(folder / "flame_dynamic_embedding.npy", np.array(dynamic, dtype=object), allow_pickle=True)
    monkeypatch.delitem(sys.modules, "chumpy")
    monkeypatch.delitem(sys.modules, "chumpy.ch")
    return {
        "v_template": v_template, "faces": faces, "shapedirs": shapedirs, "posedirs": posedirs,
        "weights": weights, "J_regressor": j_dense, "parents": [-1, 0, 1, 1, 1], "static": static, "dynamic": dynamic,
    }  # fmt: skip


@pytest.fixture
def flame_dir(tmp_path, monkeypatch):
    folder = tmp_path / "flame"
    arrays = write_synthetic_flame(folder, monkeypatch)
    return folder, arrays


def test_chumpy_is_not_available():
    # The point of the loader: it must work where chumpy cannot be imported.
    assert importlib.util.find_spec("chumpy") is None
    assert "chumpy" not in sys.modules


def test_flame_pickle_loads_without_chumpy(flame_dir):
    folder, arrays = flame_dir
    raw = read_flame_pickle(folder / "generic_model.pkl")
    assert "chumpy" not in sys.modules
    np.testing.assert_array_equal(raw["v_template"], arrays["v_template"])
    np.testing.assert_array_equal(raw["shapedirs"], arrays["shapedirs"])
    assert isinstance(raw["weights"], np.ndarray)


@pytest.mark.parametrize("seed,dtype", [(0, torch.float64), (1, torch.float64), (2, torch.float32)])
def test_flame_vertices_match_smplx_lbs(flame_dir, seed, dtype):
    from smplx.lbs import lbs

    folder, arrays = flame_dir
    model = load_flame(folder, recentre=False, dtype=dtype)
    rng = np.random.default_rng(100 + seed)
    batch = 3
    shape = torch.as_tensor(rng.normal(size=(batch, N_SHAPE)), dtype=dtype)
    expression = torch.as_tensor(rng.normal(size=(batch, N_EXPR)), dtype=dtype)
    pose = torch.zeros(batch, N_JOINTS, 3, dtype=dtype)
    pose[:, 0] = torch.as_tensor(rng.normal(scale=0.2, size=(batch, 3)))  # global
    pose[:, 1] = torch.as_tensor(rng.normal(scale=0.3, size=(batch, 3)))  # neck
    pose[:, 2] = torch.as_tensor(rng.normal(scale=0.3, size=(batch, 3)))  # jaw
    pose[:, 3:] = torch.as_tensor(rng.normal(scale=0.2, size=(batch, 2, 3)))  # eyes

    padded_expression = torch.cat([expression, torch.zeros(batch, 3, dtype=dtype)], dim=1)
    state = model.forward(shape=shape, expression=padded_expression, pose=pose)

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)

    ref_vertices, ref_joints = lbs(
        torch.cat([shape, expression], dim=1),
        pose.reshape(batch, -1),
        t(arrays["v_template"]),
        t(arrays["shapedirs"]),
        t(arrays["posedirs"].reshape(-1, arrays["posedirs"].shape[2]).T),
        t(arrays["J_regressor"]),
        torch.as_tensor(arrays["parents"]),
        t(arrays["weights"]),
    )
    assert state.vertices.dtype == dtype
    assert (ref_vertices - t(arrays["v_template"])).abs().max() > 1e-2  # the pose does something
    torch.testing.assert_close(state.vertices, ref_vertices, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.joints, ref_joints, atol=1e-5, rtol=0)


def test_flame_jaw_controls_equal_the_jaw_pose(flame_dir):
    folder, _ = flame_dir
    model = load_flame(folder, dtype=torch.float64)
    assert model.expression_names[:2] == ["exp_00", "exp_01"]
    assert model.expression_names[-3:] == ["jaw_rot_x", "jaw_rot_y", "jaw_rot_z"]
    assert model.joint_names == ["global", "neck", "jaw", "left_eye", "right_eye"]
    by_control = model.forward(expression={"jaw_rot_x": 0.3, "exp_05": 1.0})
    by_pose = model.forward(expression={"exp_05": 1.0}, pose={"jaw": [0.3, 0.0, 0.0]})
    torch.testing.assert_close(by_control.vertices, by_pose.vertices)
    assert (by_control.vertices - model.forward().vertices).abs().max() > 1e-3


def test_flame_landmarks_follow_the_embeddings(flame_dir):
    folder, arrays = flame_dir
    model = load_flame(folder, recentre=False, dtype=torch.float64)
    state = model.forward()
    verts = state.vertices[0].numpy()
    faces = arrays["faces"]
    static = (verts[faces[arrays["static"]["lmk_face_idx"]]] * arrays["static"]["lmk_b_coords"][..., None]).sum(1)
    jaw = (verts[faces[arrays["dynamic"]["lmk_face_idx"][0]]] * arrays["dynamic"]["lmk_b_coords"][0][..., None]).sum(1)
    np.testing.assert_allclose(state.landmarks[0, :51].numpy(), static, atol=1e-12)
    np.testing.assert_allclose(state.landmarks[0, 51:68].numpy(), jaw, atol=1e-12)
    # iBUG 68 layout: the oval is the jaw line (17 points), eyes have 6 points each.
    assert set(model.landmark_contours) == set(CONTOUR_NAMES)
    assert model.landmark_contours["face_oval"] == list(range(51, 68))
    assert model.landmark_contours["right_eye"] == list(range(36 - 17, 42 - 17))
    assert model.landmark_contours["left_iris"] == []
    # The jaw line is an open curve: drawn closed it would cut across the face.
    assert "face_oval" not in model.closed_contours and "lips_outer" in model.closed_contours
    assert model.info["landmarks"].startswith("iBUG 68 only")


def test_flame_is_recentred_and_capped(flame_dir):
    folder, arrays = flame_dir
    model = load_flame(folder)
    verts = model.template.numpy()
    np.testing.assert_allclose(0.5 * (verts.min(0) + verts.max(0)), 0.0, atol=1e-6)
    offset = np.asarray(model.info["centre_offset"])
    np.testing.assert_allclose(verts - offset, arrays["v_template"], atol=1e-6)
    assert not model.neutral_mesh(capped=False).is_watertight
    assert model.neutral_mesh(capped=True).is_watertight


def test_load_head_model_flame_spec_and_auto(flame_dir, monkeypatch):
    folder, _ = flame_dir
    assert load_head_model(f"flame:{folder}").name == "flame"
    monkeypatch.setenv("AVATAR_FLAME_DIR", str(folder))
    assert load_head_model("auto").name == "flame"


def test_incomplete_flame_folder_lists_found_and_expected_files(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "flame_dynamic_embedding.npy").write_bytes(b"")
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(PriorError) as info:
        load_head_model(f"flame:{folder}")
    message = str(info.value)
    assert "generic_model.pkl" in message and "flame_static_embedding.pkl" in message  # expected
    assert "readme.txt" in message and "flame_dynamic_embedding.npy" in message  # found
    with pytest.raises(PriorError, match="does not exist"):
        load_head_model(f"flame:{tmp_path / 'nowhere'}")


def test_auto_falls_back_to_anny_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_FLAME_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="AVATAR_FLAME_DIR"):
        model = load_head_model("auto")
    assert model.name == "anny"


def test_wrong_kind_of_flame_files_is_rejected(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "flame_static_embedding.pkl").write_bytes(pickle.dumps({"lmk_face_idx": np.zeros(3)}, protocol=2))
    (folder / "generic_model.pkl").write_bytes(pickle.dumps({"v_template": np.zeros((4, 3))}, protocol=2))
    with pytest.raises(PriorError, match="not a FLAME model: expected keys"):
        load_flame(folder)
    (folder / "generic_model.pkl").write_bytes(b"this is not a pickle")
    with pytest.raises(PriorError, match="not a readable FLAME pickle"):
        load_flame(folder)


def test_flame_pickle_cannot_run_code(tmp_path):
    # eval, not print: a library imported earlier in the session (Ray) may have replaced
    # builtins.print, and the pickle would then name that function instead.
    class Exploit:
        def __reduce__(self):
            return (eval, ("__import__('os').getpid()",))

    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": Exploit()}, protocol=2))
    with pytest.raises(PriorError, match=r"refused to load (__builtin__|builtins)\.eval"):
        read_flame_pickle(path)


def test_bad_landmark_embedding_names_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "flame"
    write_synthetic_flame(folder, monkeypatch)
    bad = {"lmk_face_idx": np.array([10**6]), "lmk_b_coords": np.ones((1, 3)) / 3}
    (folder / "flame_static_embedding.pkl").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(PriorError, match="flame_static_embedding.pkl.*do not fit"):
        load_flame(folder)


def test_doctor_says_which_landmarks_flame_will_draw(tmp_path, monkeypatch):
    from avatar import doctor

    (tmp_path / "generic_model.pkl").write_bytes(b"")
    monkeypatch.setenv("AVATAR_FLAME_DIR", str(tmp_path))
    assert "iBUG 68 only" in doctor._priors()["flame"]["reason"]
    (tmp_path / "mediapipe_landmark_embedding.npz").write_bytes(b"")
    assert "MediaPipe embedding" in doctor._priors()["flame"]["reason"]
