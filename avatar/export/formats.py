"""OBJ + MTL + PNG and PLY (vertex colours), written by trimesh with ``process=False`` so
vertex order and indices stay exactly ours."""

from __future__ import annotations

import numpy as np


def obj_files(positions: np.ndarray, normals: np.ndarray, uvs: np.ndarray, faces: np.ndarray, png: bytes,
              name: str = "avatar") -> dict[str, bytes]:
    """``{name}.obj``, ``{name}.mtl`` and ``{name}.png`` as bytes.

    uvs: (N, 2) glTF convention (v down); OBJ's v points up, so it gets ``1 - v``.
    The material is white diffuse (the texture is the colour), no specular.
    """
    import io

    import trimesh
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    material = trimesh.visual.material.SimpleMaterial(image=image, name=name, diffuse=(255, 255, 255, 255),
                                                      ambient=(255, 255, 255, 255), specular=(0, 0, 0, 255),
                                                      glossiness=1.0)
    uv_obj = np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1)
    mesh = trimesh.Trimesh(vertices=positions, faces=faces, vertex_normals=normals,
                           visual=trimesh.visual.TextureVisuals(uv=uv_obj, material=material), process=False)
    text, files = trimesh.exchange.obj.export_obj(mesh, include_normals=True, include_texture=True,
                                                  return_texture=True, mtl_name=f"{name}.mtl")
    out = {f"{name}.obj": text.encode()}
    for key, data in files.items():
        out[key] = data
    out[f"{name}.png"] = png  # our PNG, byte for byte the GLB's
    return out


def ply_bytes(positions: np.ndarray, normals: np.ndarray, faces: np.ndarray, colours: np.ndarray) -> bytes:
    """Binary PLY with per-vertex normals and RGBA colours (colours: (N, 3) uint8)."""
    import trimesh

    rgba = np.concatenate([colours, np.full((len(colours), 1), 255, dtype=np.uint8)], axis=1)
    mesh = trimesh.Trimesh(vertices=positions, faces=faces, vertex_normals=normals, vertex_colors=rgba,
                           process=False)
    return trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=True, include_attributes=False)


__all__ = ["obj_files", "ply_bytes"]
