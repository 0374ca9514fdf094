"""OBJ + MTL + PNG and PLY (vertex colours), written by trimesh with ``process=False`` so
vertex order and indices stay exactly ours."""

from __future__ import annotations

import numpy as np


def obj_files(positions: np.ndarray, normals: np.ndarray, uvs: np.ndarray, faces: np.ndarray, png: bytes,
              name: str = "avatar", roughness: float = 0.7) -> dict[str, bytes]:
    """``{name}.obj``, ``{name}.mtl`` and ``{name}.png`` as bytes.

    uvs: (N, 2) glTF convention (v down); OBJ's v points up, so it gets ``1 - v``.
    The material is the GLB's (:func:`mtl_text`): the texture is the colour, ``roughness``.
    """
    import io

    import trimesh
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    material = trimesh.visual.material.SimpleMaterial(image=image, name=name)
    uv_obj = np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1)
    mesh = trimesh.Trimesh(vertices=positions, faces=faces, vertex_normals=normals,
                           visual=trimesh.visual.TextureVisuals(uv=uv_obj, material=material), process=False)
    text, _ = trimesh.exchange.obj.export_obj(mesh, include_normals=True, include_texture=True,
                                              return_texture=True, mtl_name=f"{name}.mtl")
    return {f"{name}.obj": text.encode(), f"{name}.mtl": mtl_text(name, f"{name}.png", roughness).encode(),
            f"{name}.png": png}  # our PNG, byte for byte the GLB's


def mtl_text(name: str, texture: str, roughness: float) -> str:
    """The MTL of the GLB's material (metallic 0, ``roughness``, the base colour texture).

    Every field a reader might default is written: ``Kd`` white so ``map_Kd`` is the colour as
    is (readers multiply them), ``Ka`` black (a white ambient washes the head out in viewers that
    add it), ``Ks`` 0.04 (the 4% reflectance glTF's metal-rough model gives a dielectric),
    ``Ns = 1000 (1 - roughness)^2`` (the inverse of Blender's OBJ importer, roughness
    ``1 - sqrt(Ns / 1000)``), and the PBR extension's ``Pr`` / ``Pm`` (roughness, metallic) for
    readers that know it (Blender, three.js's MTLLoader ignores them).
    """
    r = min(max(float(roughness), 0.0), 1.0)
    return (f"# avatar: the GLB's material (metallic 0, roughness {r:.3f}, base colour {texture})\n"
            f"newmtl {name}\n"
            "Ka 0.000000 0.000000 0.000000\n"
            "Kd 1.000000 1.000000 1.000000\n"
            "Ks 0.040000 0.040000 0.040000\n"
            "Ke 0.000000 0.000000 0.000000\n"
            f"Ns {1000.0 * (1.0 - r) ** 2:.6f}\n"
            "Ni 1.500000\n"
            "d 1.000000\n"
            "illum 2\n"
            f"Pr {r:.6f}\n"
            "Pm 0.000000\n"
            f"map_Kd {texture}\n")


def ply_bytes(positions: np.ndarray, normals: np.ndarray, faces: np.ndarray, colours: np.ndarray) -> bytes:
    """Binary PLY with per-vertex normals and RGBA colours (colours: (N, 3) uint8)."""
    import trimesh

    rgba = np.concatenate([colours, np.full((len(colours), 1), 255, dtype=np.uint8)], axis=1)
    mesh = trimesh.Trimesh(vertices=positions, faces=faces, vertex_normals=normals, vertex_colors=rgba,
                           process=False)
    return trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=True, include_attributes=False)


__all__ = ["mtl_text", "obj_files", "ply_bytes"]
