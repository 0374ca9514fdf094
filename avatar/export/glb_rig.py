"""glTF 2.0 binary (GLB) writer for a rigged, multi-part head (issue 18): one skin, shared morph targets.
(Or a static one: ``skeleton=None`` writes the parts alone, with no skin and no morph targets.)

Plain data in (:class:`GLBPart`, :class:`GLBMaterial`, :class:`Skeleton`, NumPy arrays),
bytes out (:func:`build_rigged_glb`), assembled accessor by accessor with pygltflib
after the glTF 2.0 specification (sections 3.6 to 3.9):

- **Nodes.** The glTF scene is named ``scene_name``; its root nodes are the skeleton's
  root joint and one node per part. Godot names the imported scene's root after the
  scene and renames a node that clashes with it ("avatar 2"), so no node carries the
  scene's name, and node names never repeat a mesh's: joint ``j`` is the node
  ``skeleton.names[j]`` (the bone names animations address), part ``p`` is the node
  ``"<p>_mesh"`` holding the mesh ``"<p>_geometry"``. The part nodes are scene roots,
  not children of a node of their own: the spec ignores a skinned mesh node's parent
  transforms and the Khronos validator warns about such a parent
  (``NODE_SKINNED_MESH_NON_ROOT``).
- **Skin.** Every part is skinned by the one skin over the joint nodes; a joint node
  holds its rest translation relative to its parent (no rotation or scale: the default
  pose is the rest pose), and its inverse bind matrix is the inverse of its rest world
  transform, ``translate(-skeleton.positions[j])``. ``JOINTS_0`` is an unsigned byte
  (<= 256 joints) or short, with each vertex's duplicate joints merged, the heaviest
  first and joint 0 wherever the weight is 0 (the validator warns about a weightless
  joint other than 0); ``WEIGHTS_0`` is float, renormalised in float32.
- **Morph targets.** Every part's primitive has all ``morph_names`` in the same order,
  so one weight vector or one animation channel per node drives the whole head;
  ``mesh.extras.targetNames`` names them (the convention Blender, three.js, Babylon and
  Godot read) and ``mesh.weights`` is zero (the rest pose). Position deltas, and normal
  deltas where given, are sparse accessors over a zero base (a shared bufferView of
  zeros per vertex count: the spec allows none, but Godot 3 then reads bufferView 0) that
  hold only the vertices with a delta component of at least :data:`POSITION_EPSILON_M`
  (1 micrometre) or, for normals, :data:`NORMAL_EPSILON`: a dense target is mostly float
  noise (issue 18 measured 22 MB against 5.25 MB). A target that moves nothing in a part
  is that zero view's accessor with no ``sparse`` (``sparse.count`` must be
  at least 1); a target that moves so many vertices that the indices cost more than
  they save is stored dense. POSITION accessors carry ``min``/``max`` (required), over
  the zeros as well.
- **Materials** (a few, shared by parts: skin, eyes, mouth): ``pbrMetallicRoughness``
  with the base colour PNG or JPEG (sRGB by the spec; the prior export writes JPEG, a tenth
  of the PNG's size for a detailed skin); a tangent-space normal map; and one ORM
  image (R = ambient occlusion, G = roughness, B = metallic) behind both
  ``occlusionTexture`` and ``metallicRoughnessTexture`` (one texture, as glTF intends
  for a packed ORM). A material's ``roughness``/``metallic`` are glTF's factors: with
  an ORM they multiply its G/B channels (pass 1.0 to use the map as it is). All
  textures share one sampler: trilinear with mipmaps, clamped to the edge (an atlas's
  charts are padded; it does not tile). Images are embedded in the binary chunk; normal
  and ORM maps are PNG only (lossless).
  A part whose material has a normal map gets a ``TANGENT`` attribute: the caller's,
  or :func:`vertex_tangents` (a portable tangent frame: without one the validator
  warns ``MESH_PRIMITIVE_GENERATED_TANGENT_SPACE``); a baker that bakes against
  :func:`vertex_tangents` matches the file exactly.
- **Static** (``skeleton=None``, ``avatar export --no-rig``): no joint nodes, no skin, no
  ``JOINTS_0``/``WEIGHTS_0`` and no morph targets; the part nodes are the scene's roots.
- +Y up, metres, the face toward +Z; no extensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatar.export.bake import vertex_tangents  # the frame the normal maps are baked in

POSITION_EPSILON_M = 1e-6
"""A morph target's position delta is stored for a vertex when a component reaches this (metres)."""
NORMAL_EPSILON = 1e-4
"""A morph target's normal delta is stored for a vertex when a component reaches this (unit vectors:
1e-4 is 0.006 degrees, far below what shading shows and far above float32 noise)."""

_BYTE, _UBYTE, _USHORT, _UINT, _FLOAT = 5120, 5121, 5123, 5125, 5126
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_COMPONENT = {np.dtype(np.float32): _FLOAT, np.dtype(np.uint8): _UBYTE, np.dtype(np.uint16): _USHORT,
              np.dtype(np.uint32): _UINT}
_TYPE = {1: "SCALAR", 2: "VEC2", 3: "VEC3", 4: "VEC4", 16: "MAT4"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"


@dataclass
class GLBPart:
    """One mesh of the head (skin, an eyeball, the teeth...): one node, one primitive.

    Attributes:
        name: the part's name; its node is ``"<name>_mesh"``, its mesh ``"<name>_geometry"``.
        positions: (V, 3) rest positions, metres, +Y up, the face toward +Z.
        normals: (V, 3) unit normals (renormalised in float32 here).
        uvs: (V, 2) texture coordinates, glTF orientation (origin at the image's top-left).
        faces: (F, 3) int triangles, counter-clockwise seen from outside.
        material: the :attr:`GLBMaterial.name` this part is drawn with.
        joints: (V, 4) int skeleton indices (into :attr:`Skeleton.names`); None for a static file.
        weights: (V, 4) non-negative skin weights, rows summing to 1 (renormalised here); None
            for a static file.
        morphs: morph name -> (V, 3) position deltas in metres; a name of ``morph_names``
            missing here moves nothing in this part.
        morph_normals: morph name -> (V, 3) normal deltas, or None (no normal targets).
            Where given, every target of this part gets a NORMAL delta (zero where missing).
        tangents: (V, 4) tangents (xyz unit, w = +-1 the bitangent's sign), or None.
    """

    name: str
    positions: np.ndarray
    normals: np.ndarray
    uvs: np.ndarray
    faces: np.ndarray
    material: str
    joints: np.ndarray | None
    weights: np.ndarray | None
    morphs: dict[str, np.ndarray] = field(default_factory=dict)
    morph_normals: dict[str, np.ndarray] | None = None
    tangents: np.ndarray | None = None


@dataclass
class GLBMaterial:
    """A PBR metallic-roughness material; images are PNG files' bytes (the base colour may be a JPEG's).

    Attributes:
        name: the material's name (parts refer to it).
        base_colour_image: the base colour (sRGB) as PNG or JPEG bytes, or None (the factor alone).
        normal_png: a tangent-space normal map (OpenGL convention, +Y up), or None.
        orm_png: R = ambient occlusion, G = roughness, B = metallic (linear), or None.
        base_colour_factor: RGBA multiplier of the base colour.
        roughness, metallic: glTF's roughness and metallic factors (multiplying the ORM's
            G and B channels when there is one).
        double_sided: draw back faces too.
    """

    name: str
    base_colour_image: bytes | None = None
    normal_png: bytes | None = None
    orm_png: bytes | None = None
    base_colour_factor: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    roughness: float = 0.6
    metallic: float = 0.0
    double_sided: bool = False


@dataclass
class Skeleton:
    """A joint tree in its rest pose.

    Attributes:
        names: (J,) joint names (the nodes' names).
        parents: (J,) parent index of each joint, -1 for the one root.
        positions: (J, 3) rest positions in the model's frame, metres.
    """

    names: list[str]
    parents: list[int]
    positions: np.ndarray


# ---------------------------------------------------------------------------
# Geometry helpers


def top_joint_weights(weights: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` heaviest joints of each vertex from dense skin weights, renormalised.

    Args:
        weights: (V, J) non-negative weights.

    Returns:
        joints: (V, k) int64, the heaviest first (0 where the weight is 0); weights: (V, k)
        float64 summing to 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape[1] < k:
        w = np.concatenate([w, np.zeros((len(w), k - w.shape[1]))], axis=1)
    order = np.argsort(-w, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(w, order, axis=1)
    total = top.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("top_joint_weights: a vertex has no positive skin weight")
    return np.where(top > 0, order, 0), top / total


# ---------------------------------------------------------------------------
# Checks at the door and canonical forms


def _array(name: str, value: Any, shape: tuple[int | None, ...], dtype: Any = np.float64) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")
    arr = arr.astype(dtype)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return arr


def _unit32(name: str, vectors: np.ndarray) -> np.ndarray:
    """Unit vectors in float32 (renormalised after the cast, as the validator checks them)."""
    length = np.linalg.norm(vectors, axis=1)
    if (length < 1e-12).any():
        raise ValueError(f"{name}: {int((length < 1e-12).sum())} zero-length vectors (every one must be unit length)")
    out = (vectors / length[:, None]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _canonical_skin(name: str, joints: np.ndarray, weights: np.ndarray, num_joints: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """JOINTS_0 / WEIGHTS_0 as glTF wants them: duplicates merged, heaviest first, joint 0
    where the weight is 0, float32 weights summing to 1."""
    if (weights < 0).any():
        raise ValueError(f"{name}: negative skin weights")
    joints = np.where(weights > 0, joints, 0)  # a weightless slot's joint does not matter
    if joints.min() < 0 or joints.max() >= num_joints:
        raise ValueError(f"{name}: joint indices must lie in [0, {num_joints}), got "
                         f"[{joints.min()}, {joints.max()}]")
    k = joints.shape[1]
    # Merge repeated joints of a vertex: each slot takes the weight of all slots naming its joint.
    same = joints[:, :, None] == joints[:, None, :]
    first = ~np.tril(same, k=-1).any(axis=2)  # the first slot of each distinct joint
    merged = np.where(first, (same * weights[:, None, :]).sum(axis=2), 0.0)
    order = np.argsort(-merged, axis=1, kind="stable")
    w = np.take_along_axis(merged, order, axis=1)
    total = w.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError(f"{name}: {int((total <= 0).sum())} vertices have no positive skin weight")
    w32 = (w / total).astype(np.float32)
    # Put the float32 rounding residue on the heaviest weight so each row sums to 1 in float32.
    w32[:, 0] += (np.float32(1.0) - w32.sum(axis=1, dtype=np.float32))
    # After the cast: a weight that underflowed to 0 must name joint 0 too.
    j = np.where(w32 > 0, np.take_along_axis(joints, order, axis=1), 0)
    dtype = np.uint8 if num_joints <= 256 else np.uint16
    return j.astype(dtype).reshape(-1, k), w32


def _image(label: str, data: bytes | None, jpeg: bool = False) -> tuple[bytes, str] | None:
    """An image's bytes and MIME type: PNG, or JPEG where ``jpeg`` (a base colour; a normal or
    ORM map stays lossless)."""
    if data is None:
        return None
    data = bytes(data)
    if data.startswith(_PNG_SIGNATURE):
        return data, "image/png"
    if jpeg and data.startswith(_JPEG_SIGNATURE):
        return data, "image/jpeg"
    raise ValueError(f"{label}: expected {'PNG or JPEG' if jpeg else 'PNG'} bytes (the file signature is missing)")


def _check_skeleton(skeleton: Skeleton) -> tuple[np.ndarray, list[int]]:
    names, parents = list(skeleton.names), [int(p) for p in skeleton.parents]
    num = len(names)
    positions = _array("skeleton.positions", skeleton.positions, (num, 3))
    if num == 0 or len(parents) != num:
        raise ValueError(f"skeleton: expected one parent per joint and at least one joint, got {num} names and "
                         f"{len(parents)} parents")
    if parents.count(-1) != 1:
        raise ValueError(f"skeleton: expected exactly one root (parent -1), got {parents.count(-1)}")
    for j, p in enumerate(parents):
        if not (-1 <= p < num) or p == j:
            raise ValueError(f"skeleton: joint {names[j]!r} has an invalid parent {p}")
    for j in range(num):  # every chain reaches the root without a cycle
        seen, k = set(), j
        while parents[k] >= 0:
            if k in seen:
                raise ValueError(f"skeleton: the parents of {names[j]!r} form a cycle")
            seen.add(k)
            k = parents[k]
    return positions, parents


# ---------------------------------------------------------------------------
# Buffer assembly


def add_skin(gltf: Any, builder: Any, names: list[str], parents: list[int], positions: np.ndarray,
             skin_name: str) -> int:
    """Append a joint node per joint (from ``len(gltf.nodes)`` on, each holding its rest translation
    relative to its parent, no rotation: the default pose is the rest pose) and the skin over
    them, whose inverse bind matrices invert each joint's rest world transform. Returns the root
    joint's node index (skin index: ``len(gltf.skins) - 1``)."""
    from pygltflib import Node, Skin

    first = len(gltf.nodes)
    positions = np.asarray(positions, dtype=np.float64)
    for j, joint_name in enumerate(names):
        parent = parents[j]
        rel = positions[j] - (positions[parent] if parent >= 0 else 0.0)
        children = [first + c for c, q in enumerate(parents) if q == j]
        gltf.nodes.append(Node(name=str(joint_name), translation=[float(x) for x in rel], children=children or None))
    ibm = np.tile(np.eye(4), (len(names), 1, 1))
    ibm[:, :3, 3] = -positions  # the inverse of each joint's rest world transform (a translation)
    # glTF matrices are column-major: store each row-major matrix transposed.
    ibm_acc = builder.accessor(np.ascontiguousarray(ibm.transpose(0, 2, 1), dtype=np.float32).reshape(-1, 16))
    root = first + parents.index(-1)
    gltf.skins.append(Skin(name=skin_name, joints=list(range(first, first + len(names))),
                           inverseBindMatrices=ibm_acc, skeleton=root))
    return root


class _Builder:
    """Packs arrays into the one binary buffer (each view 4-byte aligned) and makes accessors."""

    def __init__(self, gltf: Any):
        self.gltf = gltf
        self.blob = bytearray()
        self._zeros: dict[int, int] = {}
        self._zero_views: dict[int, int] = {}

    def view(self, data: bytes, target: int | None = None) -> int:
        from pygltflib import BufferView

        self.blob.extend(b"\0" * (-len(self.blob) % 4))
        view = BufferView(buffer=0, byteOffset=len(self.blob), byteLength=len(data))
        if target is not None:
            view.target = target
        self.blob.extend(data)
        self.gltf.bufferViews.append(view)
        return len(self.gltf.bufferViews) - 1

    def _add(self, accessor: Any) -> int:
        self.gltf.accessors.append(accessor)
        return len(self.gltf.accessors) - 1

    def accessor(self, array: np.ndarray, target: int | None = None, bounds: bool = False) -> int:
        from pygltflib import Accessor

        array = np.ascontiguousarray(array)
        width = 1 if array.ndim == 1 else int(np.prod(array.shape[1:]))
        acc = Accessor(bufferView=self.view(array.tobytes(), target), byteOffset=0,
                       componentType=_COMPONENT[array.dtype], count=int(array.shape[0]), type=_TYPE[width])
        if bounds:
            flat = array.reshape(array.shape[0], -1)
            acc.min = [float(x) for x in flat.min(axis=0)]
            acc.max = [float(x) for x in flat.max(axis=0)]
        return self._add(acc)

    def zero_view(self, count: int) -> int:
        """A bufferView of ``count`` float VEC3 zeros (stride 12, vertex data), one per count, that
        every zero accessor and sparse base of that count reads. The spec lets those accessors
        have no bufferView (3.6.2.3), but Godot 3's importer then reads bufferView 0 instead (the
        first image: shapes thrown 1e20 m, or none moving), so every accessor gets one."""
        if count not in self._zero_views:
            self._zero_views[count] = self.view(bytes(12 * count), _ARRAY_BUFFER)
            self.gltf.bufferViews[-1].byteStride = 12  # shared by several vertex accessors
        return self._zero_views[count]

    def zeros_vec3(self, count: int) -> int:
        """A (count, 3) float accessor of zeros over :meth:`zero_view`, no sparse; one per count."""
        from pygltflib import Accessor

        if count not in self._zeros:
            self._zeros[count] = self._add(Accessor(bufferView=self.zero_view(count), byteOffset=0,
                                                    componentType=_FLOAT, count=count, type="VEC3",
                                                    min=[0.0] * 3, max=[0.0] * 3))
        return self._zeros[count]

    def delta_vec3(self, deltas: np.ndarray, epsilon: float, bounds: bool) -> tuple[int, int]:
        """A morph target's (V, 3) deltas with rows under ``epsilon`` in every component dropped.

        Components under ``epsilon`` of the rows kept are zeroed too (float noise).

        Returns (accessor index, rows stored): sparse over a zero base, dense where the
        sparse indices would cost more than the zeros they save, the shared zero accessor
        where nothing moves.
        """
        from pygltflib import Accessor, AccessorSparseIndices, AccessorSparseValues, Sparse

        count = len(deltas)
        d32 = np.ascontiguousarray(deltas, dtype=np.float32)
        moved = np.flatnonzero((np.abs(d32) >= np.float32(epsilon)).any(axis=1))
        if len(moved) == 0:
            return self.zeros_vec3(count), 0
        index_dtype = np.uint8 if count <= 256 else np.uint16 if count <= 65536 else np.uint32
        if len(moved) * (12 + np.dtype(index_dtype).itemsize) >= count * 12:
            dense = np.where(np.abs(d32) >= np.float32(epsilon), d32, np.float32(0))
            return self.accessor(dense, _ARRAY_BUFFER, bounds=bounds), len(moved)
        values = np.where(np.abs(d32[moved]) >= np.float32(epsilon), d32[moved], np.float32(0))  # no noise
        acc = Accessor(bufferView=self.zero_view(count), byteOffset=0, componentType=_FLOAT, count=count,
                       type="VEC3", sparse=Sparse(count=len(moved),
                                     indices=AccessorSparseIndices(bufferView=self.view(moved.astype(index_dtype)
                                                                                        .tobytes()),
                                                                   byteOffset=0,
                                                                   componentType=_COMPONENT[np.dtype(index_dtype)]),
                                     values=AccessorSparseValues(bufferView=self.view(values.tobytes()),
                                                                 byteOffset=0)))
        if bounds:
            lo, hi = values.min(axis=0), values.max(axis=0)
            if len(moved) < count:  # the base's zeros are elements too
                lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
            acc.min, acc.max = [float(x) for x in lo], [float(x) for x in hi]
        return self._add(acc), len(moved)


# ---------------------------------------------------------------------------
# The writer


def build_rigged_glb(parts: list[GLBPart], materials: list[GLBMaterial], skeleton: Skeleton | None,
                     morph_names: list[str], *, scene_name: str = "avatar",
                     extras: dict[str, Any] | None = None) -> bytes:
    """A GLB file as bytes: every part a skinned mesh node, one skin, shared morph targets; with
    ``skeleton=None`` a static file (every part a plain mesh node, its joints, weights and
    morphs not written).

    See the module docstring for the layout.

    Args:
        parts: the meshes (at least one); names unique.
        materials: the materials the parts name (names unique; only those used are
            written, in this order).
        skeleton: the joints every part is skinned to; None: a static file.
        morph_names: the morph targets of every part, in this order (none for a static file).
        scene_name: the glTF scene's name (no node is named so).
        extras: ``asset.extras`` (JSON-serialisable).

    Raises:
        ValueError: inputs of the wrong shape, non-finite values, unknown materials, joints
            or morph names, a clash of names, or images that are not PNG.
    """
    from pygltflib import (
        GLTF2,
        Asset,
        Attributes,
        Buffer,
        Image,
        Material,
        Mesh,
        Node,
        NormalMaterialTexture,
        OcclusionTextureInfo,
        PbrMetallicRoughness,
        Primitive,
        Sampler,
        Scene,
        Texture,
        TextureInfo,
    )

    from avatar import __version__

    # --- checks at the door
    if not parts:
        raise ValueError("build_rigged_glb: expected at least one part")
    rigged = skeleton is not None
    joint_names = list(skeleton.names) if rigged else []
    num_joints = len(joint_names)
    morph_names = list(morph_names)
    if not rigged and morph_names:
        raise ValueError("build_rigged_glb: a static file (skeleton None) has no morph targets: pass "
                         "morph_names=[]")
    if len(set(morph_names)) != len(morph_names):
        raise ValueError("build_rigged_glb: morph_names repeat a name")
    by_material = {m.name: m for m in materials}
    if len(by_material) != len(materials):
        raise ValueError("build_rigged_glb: two materials share a name")
    part_names = [p.name for p in parts]
    node_names = [*joint_names, *(f"{n}_mesh" for n in part_names)]
    mesh_names = [f"{n}_geometry" for n in part_names]
    taken = node_names + mesh_names + [scene_name]
    if len(set(taken)) != len(taken):
        clashes = sorted({n for n in taken if taken.count(n) > 1})
        raise ValueError(f"build_rigged_glb: names clash {clashes} (joints, '<part>_mesh' nodes, "
                         f"'<part>_geometry' meshes and the scene {scene_name!r} must all differ)")
    for p in parts:
        if p.material not in by_material:
            raise ValueError(f"part {p.name!r}: unknown material {p.material!r}; expected one of {list(by_material)}")
        if not rigged:
            continue
        unknown = sorted(set(p.morphs) - set(morph_names)) + sorted(set(p.morph_normals or {}) - set(morph_names))
        if unknown:
            raise ValueError(f"part {p.name!r}: morphs {unknown} are not in morph_names")

    gltf = GLTF2(asset=Asset(version="2.0", generator=f"avatar {__version__} (pygltflib)", extras=extras or {}))
    b = _Builder(gltf)

    # --- materials and their textures (only those the parts use)
    used = [m for m in materials if any(p.material == m.name for p in parts)]
    material_index: dict[str, int] = {}
    needs_tangents: dict[str, bool] = {}
    if any(m.base_colour_image or m.normal_png or m.orm_png for m in used):
        gltf.samplers.append(Sampler(magFilter=_LINEAR, minFilter=_LINEAR_MIPMAP_LINEAR, wrapS=_CLAMP_TO_EDGE,
                                     wrapT=_CLAMP_TO_EDGE))

    def texture(image: tuple[bytes, str], label: str) -> int:
        gltf.images.append(Image(bufferView=b.view(image[0]), mimeType=image[1], name=label))
        gltf.textures.append(Texture(sampler=0, source=len(gltf.images) - 1, name=label))
        return len(gltf.textures) - 1

    for m in used:
        base_image = _image(f"material {m.name!r} base colour", m.base_colour_image, jpeg=True)
        normal_png = _image(f"material {m.name!r} normal map", m.normal_png)
        orm_png = _image(f"material {m.name!r} ORM map", m.orm_png)
        factor = [float(x) for x in m.base_colour_factor]
        if len(factor) != 4:
            raise ValueError(f"material {m.name!r}: base_colour_factor must be RGBA, got {factor}")
        pbr = PbrMetallicRoughness(baseColorFactor=factor, metallicFactor=float(m.metallic),
                                   roughnessFactor=float(m.roughness))
        mat = Material(name=m.name, pbrMetallicRoughness=pbr, doubleSided=bool(m.double_sided), alphaMode="OPAQUE")
        if base_image is not None:
            pbr.baseColorTexture = TextureInfo(index=texture(base_image, f"{m.name}_basecolor"), texCoord=0)
        if normal_png is not None:
            mat.normalTexture = NormalMaterialTexture(index=texture(normal_png, f"{m.name}_normal"), texCoord=0,
                                                      scale=1.0)
        if orm_png is not None:
            orm = texture(orm_png, f"{m.name}_orm")
            pbr.metallicRoughnessTexture = TextureInfo(index=orm, texCoord=0)
            mat.occlusionTexture = OcclusionTextureInfo(index=orm, texCoord=0, strength=1.0)
        material_index[m.name] = len(gltf.materials)
        needs_tangents[m.name] = normal_png is not None
        gltf.materials.append(mat)

    # --- joints: nodes 0 .. J-1, local translations from the rest positions
    roots = []
    if rigged:
        joint_positions, parents = _check_skeleton(skeleton)
        roots.append(add_skin(gltf, b, joint_names, parents, joint_positions, f"{scene_name}_skeleton"))

    # --- parts: one mesh, one primitive, one node each
    part_nodes = []
    for p, node_name, mesh_name in zip(parts, node_names[num_joints:], mesh_names):
        label = f"part {p.name!r}"
        positions = _array(f"{label} positions", p.positions, (None, 3))
        count = len(positions)
        normals = _unit32(f"{label} normals", _array(f"{label} normals", p.normals, (count, 3)))
        uvs = _array(f"{label} uvs", p.uvs, (count, 2))
        faces = _array(f"{label} faces", p.faces, (None, 3), np.int64)
        if len(faces) == 0 or faces.min() < 0 or faces.max() >= count:
            raise ValueError(f"{label}: faces must be non-empty and index its {count} vertices")
        attrs = Attributes(POSITION=b.accessor(positions.astype(np.float32), _ARRAY_BUFFER, bounds=True),
                           NORMAL=b.accessor(normals, _ARRAY_BUFFER),
                           TEXCOORD_0=b.accessor(uvs.astype(np.float32), _ARRAY_BUFFER))
        tangents = p.tangents
        if tangents is None and needs_tangents[p.material]:
            tangents = vertex_tangents(positions, normals, uvs, faces)
        if tangents is not None:
            tangents = _array(f"{label} tangents", tangents, (count, 4))
            sign = np.where(tangents[:, 3] < 0, -1.0, 1.0).astype(np.float32)
            attrs.TANGENT = b.accessor(np.concatenate([_unit32(f"{label} tangents", tangents[:, :3]), sign[:, None]],
                                                      axis=1), _ARRAY_BUFFER)
        if rigged:
            joints, weights = _canonical_skin(label, _array(f"{label} joints", p.joints, (count, 4), np.int64),
                                              _array(f"{label} weights", p.weights, (count, 4)), num_joints)
            attrs.JOINTS_0 = b.accessor(joints, _ARRAY_BUFFER)
            attrs.WEIGHTS_0 = b.accessor(weights, _ARRAY_BUFFER)
        index_dtype = np.uint16 if count < 65535 else np.uint32  # 65535 is the restart value
        primitive = Primitive(attributes=attrs, indices=b.accessor(faces.reshape(-1).astype(index_dtype),
                                                                   _ELEMENT_ARRAY_BUFFER),
                              material=material_index[p.material], mode=4)
        mesh = Mesh(name=mesh_name, primitives=[primitive])
        if morph_names:
            primitive.targets = []
            for morph in morph_names:
                target = Attributes()
                if morph in p.morphs:
                    delta = _array(f"{label} morph {morph!r}", p.morphs[morph], (count, 3))
                    target.POSITION = b.delta_vec3(delta, POSITION_EPSILON_M, bounds=True)[0]
                else:
                    target.POSITION = b.zeros_vec3(count)
                if p.morph_normals is not None:
                    if morph in p.morph_normals:
                        delta = _array(f"{label} morph normals {morph!r}", p.morph_normals[morph], (count, 3))
                        target.NORMAL = b.delta_vec3(delta, NORMAL_EPSILON, bounds=False)[0]
                    else:
                        target.NORMAL = b.zeros_vec3(count)
                primitive.targets.append(target)
            mesh.weights = [0.0] * len(morph_names)
            mesh.extras = {"targetNames": morph_names}
        gltf.meshes.append(mesh)
        gltf.nodes.append(Node(name=node_name, mesh=len(gltf.meshes) - 1, skin=0 if rigged else None))
        part_nodes.append(len(gltf.nodes) - 1)

    gltf.scenes.append(Scene(name=scene_name, nodes=[*roots, *part_nodes]))
    gltf.scene = 0
    gltf.buffers.append(Buffer(byteLength=len(b.blob)))
    gltf.set_binary_blob(bytes(b.blob))
    return b"".join(gltf.save_to_bytes())


__all__ = ["GLBMaterial", "GLBPart", "NORMAL_EPSILON", "POSITION_EPSILON_M", "Skeleton", "build_rigged_glb",
           "top_joint_weights", "vertex_tangents"]
