"""Fitting the prior's own head mesh to a generated surface (avatar.export.fit).

The targets are made from the anny prior itself, so the truth is known: a head of known
shape coefficients, with a smooth 3 mm bump on the left cheek (skin the shape space cannot
make, which the offsets must) and an open box over the crown (a hat: an accessory, which
the skin must not chase). Shape-space tests use six coefficients with distinct, sizeable
effects (anny's full space has near-duplicate directions, e.g. ``head-trans-up`` and
``measure-neck-height-incr``, which no fit can tell apart).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.export.fit import FitError, face_normals, fit_head_model, fit_template, uniform_laplacian
from avatar.prior import load_head_model


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Small tensors gain nothing from threads, and on a shared 2-core machine OpenMP
    threads waiting on each other make the fit several times slower (module-wide, as the
    fit runs in module fixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TRUE_SHAPE = {
    "gender": 0.8,
    "nose-scale-depth-incr": 0.5,
    "chin-height-incr": -0.4,
    "mouth-trans-forward": 0.3,
    "forehead-scale-vert-incr": 0.4,
    "head-back-scale-depth-incr": -0.3,
}
BUMP_MM = 3.0


@pytest.fixture(scope="module")
def model():
    return load_head_model("anny")


@pytest.fixture(scope="module")
def subspace(model):
    """(vertices_of_shape over the six TRUE_SHAPE coefficients, their start, their truth, skin mask)."""
    names = list(TRUE_SHAPE)
    index = torch.tensor([model.shape_names.index(n) for n in names])
    base = model.shape_defaults.clone()
    dirs = model.shape_dirs.reshape(model.shape_dirs.shape[0], -1)

    def vertices_of_shape(shape: torch.Tensor) -> torch.Tensor:
        full = base.to(shape.dtype).index_put((index,), shape)
        return model.template + (model.shape_coefficients(full[None])[0] @ dirs).reshape(-1, 3)

    truth = torch.tensor([TRUE_SHAPE[n] for n in names])
    skin = (model.skin_weights[:, 2:].sum(dim=1) <= 0.5).numpy()  # not the eyeballs
    return vertices_of_shape, base[index], truth, skin


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    normals = np.zeros_like(vertices)
    np.add.at(normals, faces.reshape(-1), np.repeat(face_normals(vertices, faces), 3, axis=0))
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def open_box(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A box without its bottom, outward normals, about 10 mm triangles."""
    import trimesh

    box = trimesh.creation.box(bounds=[lo, hi]).subdivide().subdivide().subdivide()
    faces = box.faces[box.vertices[box.faces].mean(axis=1)[:, 1] > lo[1] + 1e-6]
    return np.asarray(box.vertices), np.asarray(faces)


@pytest.fixture(scope="module")
def hat_target(model, subspace):
    """The truth head with a cheek bump and a hat, as (vertices, faces, info)."""
    vertices_of_shape, _, truth, skin = subspace
    head = vertices_of_shape(truth).double().numpy()
    faces = model.faces.numpy()
    normals = vertex_normals(head, faces)
    cheek = np.argmin(np.linalg.norm(head - np.array([0.045, -0.03, 0.07]), axis=1) + 1e3 * ~skin)
    falloff = np.exp(-((np.linalg.norm(head - head[cheek], axis=1) / 0.012) ** 2))
    bumped = head + BUMP_MM * 1e-3 * falloff[:, None] * normals
    top = head[:, 1].max()
    rim = top - 0.045
    around = head[head[:, 1] > rim - 0.01]
    lo, hi = around.min(axis=0) - 0.012, around.max(axis=0) + 0.012
    lo[1], hi[1] = rim, top + 0.03
    hat_v, hat_f = open_box(lo, hi)
    under_hat = np.all((bumped[faces].mean(axis=1) > lo) & (bumped[faces].mean(axis=1) < hi), axis=1)
    head_faces = faces[~under_hat]
    # A speck 2 cm in front of the nose, 0.5 cm^2: too small to be an accessory.
    tip = head[np.argmax(head[:, 2])]
    speck_v = tip + np.array([[0.0, 0.0, 0.02], [0.01, 0.0, 0.02], [0.0, 0.01, 0.02]])
    target_v = np.concatenate([bumped, hat_v, speck_v])
    target_f = np.concatenate([head_faces, hat_f + len(bumped), np.array([[0, 1, 2]]) + len(bumped) + len(hat_v),
                               model.cap_faces.numpy()])
    hat_index = np.arange(len(head_faces), len(head_faces) + len(hat_f))
    return target_v, target_f, {"head": head, "cheek": cheek, "hat_faces": hat_index, "falloff": falloff}


@pytest.fixture(scope="module")
def hat_fit(model, subspace, hat_target):
    vertices_of_shape, start, _, skin = subspace
    target_v, target_f, _ = hat_target
    return fit_template(vertices_of_shape, len(start), model.faces, target_v, target_f, skin_mask=skin,
                        closing_faces=model.cap_faces, shape_init=start, samples=4000)


def test_fit_recovers_the_shape_the_bump_and_the_hat(hat_fit, subspace, hat_target):
    _, start, truth, skin = subspace
    _, _, info = hat_target
    # The shape: every coefficient within 0.06 of the truth (they moved by 0.3 to 0.5).
    assert (hat_fit.shape - truth).abs().max() < 0.06, (hat_fit.shape, truth)
    assert (start - truth).abs().max() >= 0.3
    # The skin: within 1 mm both ways, and the bump is the offsets' (the shape cannot make it).
    report = hat_fit.report
    assert report["chamfer_mm"] <= 1.0 and report["p95_mm"] <= 1.0, report
    assert report["shape"]["p95_mm"] > 1.5 * report["p95_mm"], report
    cheek = info["cheek"]
    moved = (hat_fit.vertices[cheek] - info["head"][cheek]) * 1e3
    assert np.linalg.norm(moved) == pytest.approx(BUMP_MM, abs=0.5)
    far = info["falloff"] < 1e-3
    error = np.linalg.norm(hat_fit.vertices - info["head"], axis=1)[far & skin]
    assert np.percentile(error, 95) < 0.5e-3  # away from the bump the skin stays on the truth
    # The hat is the accessory, whole, and nothing of the head is.
    accessory = hat_fit.accessory
    assert accessory is not None
    hat = set(info["hat_faces"].tolist())
    taken = set(accessory.face_index.tolist())
    assert len(taken & hat) >= 0.95 * len(hat)
    assert taken <= hat
    assert report["accessory"]["components"] == 1
    assert report["accessory"]["dropped_islands"] == 1  # the speck
    assert accessory.faces.max() < len(accessory.vertices)
    assert (accessory.distance > 4e-3).all()


def test_offsets_are_smooth_and_only_on_the_skin(hat_fit, model, subspace, hat_target):
    _, _, _, skin = subspace
    target_v, target_f, info = hat_target
    offsets = hat_fit.offsets
    assert np.all(offsets[~skin] == 0.0)
    assert np.abs(offsets[skin]).max() > 2e-3  # the bump is there
    lap = uniform_laplacian(model.faces.numpy(), model.num_vertices)
    roughness = np.linalg.norm(lap @ offsets, axis=1)[skin]
    # Against what snapping every vertex to its closest target point would do.
    from avatar.export.fit import SurfaceProximity

    shaped = hat_fit.vertices - offsets
    face, bary, _, _ = SurfaceProximity(target_v, target_f).closest(shaped)
    snapped = np.einsum("nk,nkc->nc", bary, target_v[target_f[face]]) - shaped
    snapped[~skin] = 0.0
    snapped_roughness = np.linalg.norm(lap @ snapped, axis=1)[skin]
    bump = BUMP_MM * 1e-3 * info["falloff"][:, None] * vertex_normals(info["head"], model.faces.numpy())
    bump_roughness = np.linalg.norm(lap @ bump, axis=1)[skin]
    # No rougher than the displacement that made the target (the bump), and far smoother
    # than snapping (about 1e4 times the energy here).
    assert roughness.max() <= bump_roughness.max()
    assert np.square(roughness).sum() <= 1.5 * np.square(bump_roughness).sum()
    assert np.square(roughness).sum() <= 0.01 * np.square(snapped_roughness).sum()


def test_a_target_scaled_and_moved_is_fitted_with_the_similarity(model, subspace):
    vertices_of_shape, start, truth, skin = subspace
    head = vertices_of_shape(truth).double().numpy()
    centre = head.mean(axis=0)
    angle = np.radians(2.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    moved = 1.04 * (head - centre) @ rotation.T + centre + np.array([0.003, -0.002, 0.004])
    target_f = np.concatenate([model.faces.numpy(), model.cap_faces.numpy()])
    common = dict(skin_mask=skin, closing_faces=model.cap_faces, shape_init=start, samples=3000)
    fit = fit_template(vertices_of_shape, len(start), model.faces, moved, target_f, similarity=True, **common)
    assert fit.report["chamfer_mm"] <= 0.5, fit.report
    assert fit.report["shape"]["chamfer_mm"] <= 0.5, fit.report
    assert fit.similarity.scale == pytest.approx(1.04, abs=0.004)
    assert np.linalg.norm(fit.similarity.translation - [0.003, -0.002, 0.004]) < 1e-3
    assert (fit.shape - truth).abs().max() < 0.1
    # vertices = similarity(vertices_of_shape(shape)) + offsets
    again = fit.similarity.apply(vertices_of_shape(fit.shape).double().numpy()) + fit.offsets
    np.testing.assert_allclose(again, fit.vertices, atol=1e-6)
    # Without it the shape space cannot follow.
    rigid = fit_template(vertices_of_shape, len(start), model.faces, moved, target_f, similarity=False,
                         shape_iterations=3, smoothness=(3.0,), offset_steps=1, **common)
    assert rigid.report["shape"]["chamfer_mm"] > 1.0, rigid.report


def test_the_prior_fitted_to_its_own_sdf_surface(model):
    """The smoke run's case: a generated head is a level set of a field that started as the
    prior's SDF. Here it is exactly that level set (marching tetrahedra, 3.5 mm cells):
    closed at the neck, the mouth and the eye sockets sealed."""
    from avatar.ops.marching_tets import TetGridSpec, marching_tetrahedra, tetrahedral_grid

    lo, hi = model.template.min(dim=0).values - 0.01, model.template.max(dim=0).values + 0.01
    grid, tets = tetrahedral_grid(TetGridSpec.covering(tuple(lo.tolist()), tuple(hi.tolist()), 80))
    with torch.no_grad():
        vertices, faces = marching_tetrahedra(grid, tets, model.sdf(grid))
    fit = fit_head_model(model, vertices.double().numpy(), faces.numpy(), samples=3000, shape_iterations=4)
    report = fit.report
    assert report["chamfer_mm"] < 0.2 and report["p95_mm"] < 0.5, report
    # Skin the level set seals over (inside the mouth, behind the eyes) is hidden, not an error;
    # the closed neck matches the prior's cap, not an accessory.
    assert 0.01 < report["hidden_skin"] < 0.1, report
    assert fit.accessory is None, report["accessory"]
    assert fit.similarity is None
    np.testing.assert_allclose(fit.vertices, model.template.double().numpy(), atol=4e-3)
    # The fitted shape is the prior's: its own forward gives the vertices before the offsets.
    shaped = model.forward(shape=fit.shape).vertices[0].double().numpy()
    np.testing.assert_allclose(shaped + fit.offsets, fit.vertices, atol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("skin", "skin_mask must have shape"),
    ("nan", "NaN"),
    ("faces", "target faces index vertices outside"),
    ("shape", "shape_init must have shape"),
    ("empty_skin", "nothing to fit"),
])
def test_bad_inputs_are_one_line_errors(model, subspace, case, message):
    vertices_of_shape, start, _, skin = subspace
    target_v = model.template.double().numpy().copy()
    target_f = model.faces.numpy().copy()
    kwargs = dict(skin_mask=skin, shape_init=start)
    if case == "skin":
        kwargs["skin_mask"] = skin[:-1]
    elif case == "nan":
        target_v[3, 1] = np.nan
    elif case == "faces":
        target_f[0, 0] = len(target_v)
    elif case == "shape":
        kwargs["shape_init"] = start[:-1]
    elif case == "empty_skin":
        kwargs["skin_mask"] = np.zeros_like(skin)
    with pytest.raises(FitError, match=message) as info:
        fit_template(vertices_of_shape, len(start), model.faces, target_v, target_f, **kwargs)
    assert "\n" not in str(info.value)
