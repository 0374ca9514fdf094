"""UV atlas (xatlas) and base-colour baking in UV space with our rasteriser.

UV convention: glTF's. (u, v) in [0, 1], (0, 0) is the top-left corner of the
image, v grows downward. Rasterising with clip coordinates (2u - 1, 2v - 1, 0, 1)
puts texel row i at v = (i + 0.5) / H (our rasteriser's row 0 is clip y = -1),
which is exactly glTF's texel row i: no flip anywhere. OBJ (v up) gets ``1 - v``.

Colours: the texture field outputs the colour the renderer shows (display,
sRGB-encoded values), so they are stored as 8-bit sRGB directly, which is what
glTF's ``baseColorTexture`` and PNG viewers expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class UVAtlas:
    """A mesh split along UV seams.

    vmapping: (N,) index of the source vertex of each atlas vertex.
    faces: (F, 3) int64 faces over the atlas vertices (same order as the source faces).
    uvs: (N, 2) float32 in [0, 1], glTF convention (v down).
    """

    vmapping: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray


FACES_PER_PIECE = 200
"""xatlas's chart growing slows down far faster than linearly with mesh size (minutes for
a 50k-face head in one piece, jpcy/xatlas#36, #103), so the mesh is cut into pieces of about
this many faces (k-means on face centres) that it charts independently and packs together."""


def unwrap_uv(verts: np.ndarray, faces: np.ndarray, texture_size: int, padding: int = 4,
              faces_per_piece: int = FACES_PER_PIECE) -> UVAtlas:
    """Charts and packing by xatlas for a ``texture_size`` square texture with ``padding`` texels
    between charts (what the dilation fills, so bilinear and mip-mapped lookups do not bleed).

    The returned faces are a permutation of ``faces`` (grouped by piece), over new vertices.
    """
    import xatlas
    from scipy.cluster.vq import kmeans2

    verts = np.ascontiguousarray(verts, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    pieces = max(1, len(faces) // max(1, faces_per_piece))
    if pieces > 1:
        centres = verts[faces].mean(axis=1).astype(np.float64)
        _, label = kmeans2(centres, pieces, minit="++", seed=0, iter=5)
    else:
        label = np.zeros(len(faces), dtype=np.int64)
    atlas = xatlas.Atlas()
    groups = []
    for k in np.unique(label):
        piece = faces[label == k]
        used, local = np.unique(piece, return_inverse=True)
        atlas.add_mesh(verts[used], local.reshape(-1, 3).astype(np.uint32))
        groups.append(used)
    chart = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    pack.rotate_charts = True
    atlas.generate(chart, pack)
    vmaps, tris, coords, offset = [], [], [], 0
    for k, used in enumerate(groups):
        vmapping, indices, uvs = atlas.get_mesh(k)
        vmaps.append(used[vmapping.astype(np.int64)])
        tris.append(indices.astype(np.int64) + offset)
        coords.append(uvs)
        offset += len(vmapping)
    return UVAtlas(np.concatenate(vmaps), np.concatenate(tris),
                   np.clip(np.concatenate(coords), 0.0, 1.0).astype(np.float32))


def rasterize_uv(uvs: torch.Tensor, faces: torch.Tensor, size: int, engine: str = "auto") -> torch.Tensor:
    """Rasterise the atlas: rast (1, size, size, 4) with texel row i at v = (i + 0.5) / size."""
    from avatar.ops.raster import rasterize

    clip = torch.cat([uvs * 2.0 - 1.0, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], dim=-1)
    rast, _ = rasterize(clip[None].float().contiguous(), faces.to(torch.int32).contiguous(), (size, size),
                        engine=engine)
    return rast


def dilate(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill every texel outside ``mask`` with the colour of the nearest texel inside it.

    image: (H, W, C); mask: (H, W) bool. Filling the whole gutter (not a few rings)
    keeps every mip level free of background colour at chart borders.
    """
    from scipy.ndimage import distance_transform_edt

    if mask.all() or not mask.any():
        return image
    _, (ii, jj) = distance_transform_edt(~mask, return_indices=True)
    return image[ii, jj]


def bake_texture(atlas: UVAtlas, positions: np.ndarray, albedo: Callable[[torch.Tensor], torch.Tensor],
                 size: int, engine: str = "auto", chunk: int = 1 << 18) -> tuple[np.ndarray, float]:
    """Bake ``albedo`` over the atlas.

    positions: (N_src, 3) source vertex positions in the units ``albedo`` reads
    (field units for a texture field). albedo: (P, 3) points -> (P, 3) in [0, 1].
    Returns the image (size, size, 3) uint8 (row 0 = v 0) and the chart coverage
    (fraction of texels inside a triangle).
    """
    from avatar.ops.raster import interpolate

    uvs = torch.as_tensor(atlas.uvs, dtype=torch.float32)
    faces = torch.as_tensor(atlas.faces, dtype=torch.int64)
    rast = rasterize_uv(uvs, faces, size, engine)
    pos = torch.as_tensor(positions[atlas.vmapping], dtype=torch.float32)
    points = interpolate(pos[None].contiguous(), rast, faces.to(torch.int32).contiguous(), engine=engine)[0]
    mask = (rast[0, ..., 3] > 0).numpy()
    colour = np.zeros((size, size, 3), dtype=np.float32)
    inside = points[torch.as_tensor(mask)]
    with torch.no_grad():
        values = [albedo(p).float().clamp(0, 1) for p in inside.split(chunk)]
    if values:
        colour[mask] = torch.cat(values).numpy()
    colour = dilate(colour, mask)
    return np.round(colour * 255.0).astype(np.uint8), float(mask.mean())


def sample_texture(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup like a GPU sampler with clamp-to-edge: image (H, W, 3) in [0, 1],
    uv (..., 2) in glTF convention -> (..., 3)."""
    grid = (uv * 2.0 - 1.0).reshape(1, -1, 1, 2)
    out = torch.nn.functional.grid_sample(image.permute(2, 0, 1)[None], grid, mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out[0, :, :, 0].T.reshape(*uv.shape[:-1], image.shape[-1])


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (sRGB)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


__all__ = ["UVAtlas", "bake_texture", "dilate", "encode_png", "rasterize_uv", "sample_texture", "unwrap_uv"]
