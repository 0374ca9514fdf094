"""``--topology surface`` (issue #18): the closest-point rig on a sealed generated surface, sparse
morph targets, the UV atlas, inner shells and the OBJ's material. The head is the anny prior's
own signed distance meshed by marching tetrahedra: one sealed surface over the eyes and mouth,
as a generated head is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import validate_glb
from test_export_glb_rig import on_zero_view

pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def prior():
    from avatar.pipeline.generate import load_prior

    return load_prior("anny")


@pytest.fixture(scope="module")
def sealed_head(prior):
    """(V, 3) metres, (F, 3): the prior's SDF meshed on a 4 mm lattice, decimated to 20k faces."""
    from avatar.export.mesh import clean_mesh, decimate
    from avatar.ops.marching_tets import lattice_tetrahedra, marching_tetrahedra

    cell = 0.004
    t = prior.template.double().numpy()
    lo, hi = t.min(0) - 2 * cell, t.max(0) + 2 * cell
    size = [int(s) for s in np.ceil((hi - lo) / cell).astype(int) + 1]
    axes = [lo[a] + np.arange(size[a]) * cell for a in range(3)]
    points = torch.as_tensor(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3), dtype=torch.float32)
    sdf = prior.sdf(points).float()
    cells = torch.stack(torch.meshgrid(*[torch.arange(s - 1) for s in size], indexing="ij"), -1).reshape(-1, 3)
    v, f = marching_tetrahedra(points, lattice_tetrahedra(cells, tuple(size)), sdf)
    v, f = clean_mesh(v.double().numpy(), f.numpy())
    v, f = decimate(v, f, 20000)
    return clean_mesh(v, f, min_component_area=0.0)


def _edges(faces: np.ndarray) -> np.ndarray:
    return np.unique(np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)


def torn_edges(verts: np.ndarray, faces: np.ndarray, delta: np.ndarray) -> int:
    """Edges whose length changes by more than 5 mm, or by more than 3x (and 1 mm)."""
    e = _edges(faces)
    rest = np.linalg.norm(verts[e[:, 0]] - verts[e[:, 1]], axis=1)
    moved = verts + delta
    now = np.linalg.norm(moved[e[:, 0]] - moved[e[:, 1]], axis=1)
    change = np.abs(now - rest)
    ratio = np.maximum(now, 1e-12) / np.maximum(rest, 1e-12)
    return int(((change > 0.005) | (((ratio > 3) | (ratio < 1 / 3)) & (change > 0.001))).sum())


def closest_point_targets(verts: np.ndarray, prior) -> np.ndarray:
    """(E, N, 3) the targets as the old transfer made them: closest point over ``all_faces``
    (eyeballs too), no smoothing."""
    from avatar.export.rig import closest_points, falloff

    faces = prior.all_faces().numpy()
    with torch.no_grad():
        delta = np.stack([(prior.forward(expression={n: 1.0}).vertices[0] - prior.template).double().numpy()
                          for n in prior.expression_names])
    face, bary, dist = closest_points(verts, prior.template.double().numpy(), faces)
    return np.einsum("nk,enkc->enc", bary, delta[:, faces[face]]) * falloff(dist, 0.01, 0.04)[None, :, None]


@pytest.fixture(scope="module")
def sealed_rig(sealed_head, prior):
    from avatar.export.rig import transfer_rig

    v, f = sealed_head
    return transfer_rig(v, prior, faces=f)


def test_blinks_do_not_tear_a_sealed_surface(sealed_head, sealed_rig, prior):
    v, f = sealed_head
    old = closest_point_targets(v, prior)
    for name in ("eyeBlinkLeft", "eyeBlinkRight"):
        k = sealed_rig.target_names.index(name)
        before, after = torn_edges(v, f, old[k]), torn_edges(v, f, sealed_rig.targets[k])
        print(f"{name}: {before} torn edges with the eyeball shells and no smoothing, {after} now")
        assert before >= 10  # the surface shows the fault
        assert after <= before // 10
        # The lid still closes: the blink moves some vertex by most of the prior's 11.5 mm.
        assert np.linalg.norm(sealed_rig.targets[k], axis=1).max() > 0.007


def test_rig_targets_are_smooth_over_the_surface(sealed_head, sealed_rig, prior):
    """Neighbours move alike under every target. jawOpen and mouthClose are left out: they part
    lips that a sealed surface joins (the prior topology's mouth is the fix for those)."""
    v, f = sealed_head
    old = closest_point_targets(v, prior)
    names = [n for n in sealed_rig.target_names if n not in ("jawOpen", "mouthClose")]
    before = sum(torn_edges(v, f, old[sealed_rig.target_names.index(n)]) for n in names)
    after = sum(torn_edges(v, f, sealed_rig.targets[sealed_rig.target_names.index(n)]) for n in names)
    print(f"torn edges over {len(names)} targets: {before} before smoothing, {after} now")
    assert after <= before // 4
    np.testing.assert_allclose(sealed_rig.weights.sum(axis=1), 1.0, atol=1e-6)


def _skin(verts: np.ndarray, rig, joint: int, rotation: np.ndarray) -> np.ndarray:
    """Linear blend skinning with one joint rotated about its rest position."""
    centre = rig.joint_positions[joint].astype(np.float64)
    turned = (verts - centre) @ rotation.T + centre
    w = np.where(rig.joints == joint, rig.weights, 0.0).sum(axis=1)
    return verts + w[:, None] * (turned - verts)


def _normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    return np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])


@pytest.mark.parametrize("eye", ["left_eye", "right_eye"])
def test_turning_an_eye_joint_moves_only_skin_near_the_eye_without_flips(sealed_head, sealed_rig, eye):
    v, f = sealed_head
    j = sealed_rig.joint_names.index(eye)
    a = np.radians(30.0)
    for rotation in (np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]),
                     np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])):
        posed = _skin(v, sealed_rig, j, rotation)
        moved = np.linalg.norm(posed - v, axis=1)
        far = np.linalg.norm(v - sealed_rig.joint_positions[j], axis=1) > 0.04
        assert moved[far].max() < 1e-4
        rest_n, posed_n = _normals(v, f), _normals(posed, f)
        real = np.linalg.norm(rest_n, axis=1) > 2e-8  # a needle under 0.01 mm^2 has no orientation to keep
        flipped = ((rest_n * posed_n).sum(axis=1) < 0) & real
        assert flipped.sum() == 0, f"{flipped.sum()} triangles flip when {eye} turns 30 degrees"
        assert moved.max() < 0.005  # the old transfer carried a patch of skin 8 mm with the eyeball


def test_morph_targets_are_sparse_without_float_noise(tmp_path, sealed_head, sealed_rig):
    from pygltflib import GLTF2

    from avatar.export.gltf import build_glb
    from avatar.export.mesh import smooth_normals
    from avatar.export.texture import encode_png

    v, f = sealed_head
    path = tmp_path / "head.glb"
    uvs = np.zeros((len(v), 2), dtype=np.float32)
    path.write_bytes(build_glb(v, smooth_normals(v, f), uvs, f, encode_png(np.zeros((4, 4, 3), np.uint8)),
                               rig=sealed_rig))
    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0 and report["issues"]["numWarnings"] == 0
    gltf = GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()
    targets = gltf.meshes[0].primitives[0].targets
    assert len(targets) == 52
    stored = 0
    for t in targets:
        acc = gltf.accessors[t["POSITION"] if isinstance(t, dict) else t.POSITION]
        assert acc.sparse is not None or on_zero_view(gltf, blob, acc), "a dense morph target"
        if acc.sparse is None:
            continue
        sparse = acc.sparse
        n = sparse["count"] if isinstance(sparse, dict) else sparse.count
        values = sparse["values"] if isinstance(sparse, dict) else sparse.values
        view = gltf.bufferViews[values["bufferView"] if isinstance(values, dict) else values.bufferView]
        data = np.frombuffer(blob, dtype=np.float32, count=3 * n, offset=view.byteOffset or 0)
        assert not ((data != 0) & (np.abs(data) < 1e-6)).any(), "float noise under 1 micrometre is stored"
        stored += n
    dense = 52 * len(v) * 12
    print(f"{stored} of {52 * len(v)} target rows stored, {path.stat().st_size} bytes")
    assert stored * 16 < dense / 3  # float noise everywhere would store every row


def _chart_count(atlas) -> int:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    f = atlas.faces
    incidence = coo_matrix((np.ones(f.size), (np.repeat(np.arange(len(f)), 3), f.reshape(-1))),
                           shape=(len(f), len(atlas.uvs))).tocsr()
    return connected_components(incidence.T @ incidence, directed=False)[0]


def test_a_head_unwraps_into_tens_of_charts_covering_most_of_the_texture(sealed_head):
    from avatar.export.texture import bake_texture, unwrap_uv

    v, f = sealed_head
    atlas = unwrap_uv(v, f, 1024)
    def turned(tris: np.ndarray) -> list[tuple[int, ...]]:  # each face from its smallest index, same way round
        first = tris.argmin(axis=1)[:, None]
        return sorted(map(tuple, np.take_along_axis(tris, (first + np.arange(3)) % 3, axis=1).tolist()))

    assert turned(atlas.vmapping[atlas.faces]) == turned(f)  # the same faces, the same way round
    charts = _chart_count(atlas)
    _, coverage = bake_texture(atlas, v, lambda p: torch.full_like(p, 0.5), 1024)
    print(f"{charts} charts covering {coverage:.1%}")
    assert charts <= 80  # xatlas's own charts: 472 on this head (385 on the benchmark's)
    assert coverage >= 0.5  # xatlas's own charts: 39% (43% on the benchmark's)
    # Each chart is a valid map: no UV triangle flips against the rest of the atlas.
    uv = atlas.uvs.astype(np.float64)
    a, b = uv[atlas.faces[:, 1]] - uv[atlas.faces[:, 0]], uv[atlas.faces[:, 2]] - uv[atlas.faces[:, 0]]
    signed = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    assert min((signed > 0).mean(), (signed < 0).mean()) < 0.005


def _spheres(*specs):
    import trimesh

    verts, faces = [], []
    for radius, centre, subdiv in specs:
        m = trimesh.creation.icosphere(subdiv, radius=radius)
        faces.append(m.faces + sum(len(x) for x in verts))
        verts.append(m.vertices + np.asarray(centre))
    return np.concatenate(verts), np.concatenate(faces)


def test_clean_mesh_drops_a_shell_inside_the_head_and_keeps_what_is_outside():
    from avatar.export.mesh import clean_mesh

    v, f = _spheres((1.0, (0, 0, 0), 4), (0.5, (0.2, 0, 0), 3), (0.5, (2.0, 0, 0), 3))
    outer, inner, beside = 1280 * 4, 1280, 1280
    v2, f2 = clean_mesh(v, f)
    assert len(f2) == outer + beside
    assert np.linalg.norm(v2 - [0.2, 0, 0], axis=1).min() > 0.7  # no vertex of the inner sphere is left
    assert len(clean_mesh(v, f, drop_inner=False)[1]) == outer + inner + beside
    # An open surface inside (a cup: not a closed shell) is not an inner shell.
    cup_v, cup_f = _spheres((0.5, (0, 0, 0), 3))
    keep = cup_v[cup_f].mean(axis=1)[:, 1] < 0.3
    v3 = np.concatenate([v[:642 * 4 - 1280 * 0][:2562], cup_v])
    f3 = np.concatenate([f[:outer], cup_f[keep] + 2562])
    assert len(clean_mesh(v3, f3)[1]) == outer + keep.sum()


def test_obj_material_matches_the_glb_material():
    from avatar.export.formats import obj_files
    from avatar.export.texture import encode_png

    v, f = _spheres((0.1, (0, 0, 0), 1))
    files = obj_files(v, np.tile(np.float32([0, 1, 0]), (len(v), 1)), np.zeros((len(v), 2), np.float32), f,
                      encode_png(np.zeros((4, 4, 3), np.uint8)), roughness=0.35)
    mtl = dict(line.split(" ", 1) for line in files["avatar.mtl"].decode().splitlines()
               if line and not line.startswith("#"))
    assert mtl["newmtl"] == "avatar" and mtl["map_Kd"] == "avatar.png"
    assert [float(x) for x in mtl["Kd"].split()] == [1.0, 1.0, 1.0]  # the texture is the colour as is
    assert [float(x) for x in mtl["Ka"].split()] == [0.0, 0.0, 0.0]
    assert float(mtl["Pr"]) == pytest.approx(0.35) and float(mtl["Pm"]) == 0.0
    # Blender's OBJ importer reads roughness = 1 - sqrt(Ns / 1000).
    assert 1.0 - np.sqrt(float(mtl["Ns"]) / 1000.0) == pytest.approx(0.35)
    assert "usemtl avatar" in files["avatar.obj"].decode() and "mtllib avatar.mtl" in files["avatar.obj"].decode()
