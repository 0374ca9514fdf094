"""glTF 2.0 binary (GLB) writer: textured PBR mesh, morph targets and a skin (pygltflib).

trimesh writes neither morph targets nor skins, so the file is assembled here,
accessor by accessor, following the glTF 2.0 specification:

- one mesh, one triangle primitive: POSITION, NORMAL, TEXCOORD_0, indices (and
  JOINTS_0 / WEIGHTS_0 when rigged); every buffer view 4-byte aligned;
- material ``pbrMetallicRoughness`` with metallicFactor 0, roughnessFactor as
  configured and the baked PNG as baseColorTexture (sRGB by the spec);
- morph targets: one POSITION displacement accessor per expression, sparse over a zero
  base with only the vertices that move by at least 1 micrometre (components under it are
  float noise and are zeroed; glb_rig's ``delta_vec3``: issue 18 measured a dense 22 MB
  GLB), with min/max (required for POSITION), ``mesh.extras.targetNames`` (the de facto
  convention read by Blender, three.js, Babylon and Godot) and zero default weights;
- skin: a node per joint with its rest translation relative to its parent, the
  inverse bind matrices (inverse of each joint's rest world transform) and the
  skinned mesh node at the scene root (the spec ignores its transform);
- +Y up, metres, the face toward +Z; no ``extensionsRequired``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from avatar.export.glb_rig import POSITION_EPSILON_M, add_skin
from avatar.export.glb_rig import _Builder as _RigBuilder
from avatar.export.rig import Rig

_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963


class _Builder(_RigBuilder):
    """Packs arrays into one binary buffer and makes accessors (dense, and the sparse morph
    targets of :meth:`~avatar.export.glb_rig._Builder.delta_vec3`)."""


def build_glb(positions: np.ndarray, normals: np.ndarray, uvs: np.ndarray, faces: np.ndarray, png: bytes,
              roughness: float = 0.7, rig: Rig | None = None, extras: dict[str, Any] | None = None,
              name: str = "avatar") -> bytes:
    """A GLB file as bytes.

    positions, normals: (N, 3) metres / unit vectors. uvs: (N, 2) glTF convention.
    faces: (F, 3) indices. png: the base colour image. rig: morph targets and skin
    for these N vertices (None: a static mesh). extras: ``asset.extras``.
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
        PbrMetallicRoughness,
        Primitive,
        Sampler,
        Scene,
        Texture,
        TextureInfo,
    )

    from avatar import __version__

    gltf = GLTF2(asset=Asset(version="2.0", generator=f"avatar {__version__} (pygltflib)", extras=extras or {}))
    b = _Builder(gltf)
    n = len(positions)
    pos = b.accessor(positions.astype(np.float32), _ARRAY_BUFFER, bounds=True)
    nrm = b.accessor(normals.astype(np.float32), _ARRAY_BUFFER)
    tex = b.accessor(uvs.astype(np.float32), _ARRAY_BUFFER)
    index_dtype = np.uint16 if n < 65535 else np.uint32
    idx = b.accessor(faces.reshape(-1).astype(index_dtype), _ELEMENT_ARRAY_BUFFER)
    attrs = Attributes(POSITION=pos, NORMAL=nrm, TEXCOORD_0=tex)

    image_view = b.view(png)
    gltf.images.append(Image(bufferView=image_view, mimeType="image/png", name=f"{name}_basecolor"))
    # LINEAR / LINEAR_MIPMAP_LINEAR, clamp to edge: charts are padded, the atlas does not tile.
    gltf.samplers.append(Sampler(magFilter=9729, minFilter=9987, wrapS=33071, wrapT=33071))
    gltf.textures.append(Texture(sampler=0, source=0))
    gltf.materials.append(Material(
        name=f"{name}_material",
        pbrMetallicRoughness=PbrMetallicRoughness(baseColorTexture=TextureInfo(index=0, texCoord=0),
                                                  baseColorFactor=[1.0, 1.0, 1.0, 1.0], metallicFactor=0.0,
                                                  roughnessFactor=float(roughness)),
        doubleSided=False, alphaMode="OPAQUE"))

    primitive = Primitive(attributes=attrs, indices=idx, material=0, mode=4)
    mesh = Mesh(name=name, primitives=[primitive])
    # The node is not named like the scene: Godot names the scene's root after the scene (or the
    # file) and renames a node that clashes with it ("avatar 2"); its mesh becomes "<scene>_<mesh>".
    mesh_node = Node(name=f"{name}_mesh", mesh=0)
    gltf.nodes.append(mesh_node)
    roots = [0]
    if rig is not None:
        primitive.targets = []
        for target in rig.targets:
            primitive.targets.append(Attributes(POSITION=b.delta_vec3(target, POSITION_EPSILON_M, bounds=True)[0]))
        mesh.weights = [0.0] * len(rig.targets)
        mesh.extras = {"targetNames": list(rig.target_names)}
        attrs.JOINTS_0 = b.accessor(rig.joints, _ARRAY_BUFFER)
        attrs.WEIGHTS_0 = b.accessor(rig.weights.astype(np.float32), _ARRAY_BUFFER)
        root_joint = add_skin(gltf, b, list(rig.joint_names), list(rig.parents), rig.joint_positions,
                              f"{name}_skeleton")
        mesh_node.skin = 0
        roots.append(root_joint)
    gltf.meshes.append(mesh)
    gltf.scenes.append(Scene(name=name, nodes=roots))
    gltf.scene = 0
    gltf.buffers.append(Buffer(byteLength=len(b.blob)))
    gltf.set_binary_blob(bytes(b.blob))
    return b"".join(gltf.save_to_bytes())


__all__ = ["build_glb"]
