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


FACES_PER_CHART = 4000
"""Target chart size in faces. The mesh is cut into pieces of about this many faces (k-means on
face centres), each flattened as one chart by a least-squares conformal map; xatlas only packs
them. (xatlas's own chart growing left a 50k-face head in 334 charts, hundreds of them one to
three faces, covering 43% of the texture, and slows down far faster than linearly with mesh
size, jpcy/xatlas#36, #103.)"""
MAX_AREA_DISTORTION = 4.0
"""A chart is cut in two while more than 2% of its area has a UV-to-surface area ratio (normalised
by the chart's own) off by more than this factor."""
MAX_CHART_LENGTH = 0.5
"""A chart is cut in two while its UV box is longer than this times the square root of the mesh's
area (the side of a square holding all of it)."""
MAX_FLIPPED = 0.005
"""Share of a chart's faces (not folded in 3D) that may flip in its map; more and it is cut in two."""


def unwrap_uv(verts: np.ndarray, faces: np.ndarray, texture_size: int, padding: int = 4,
              faces_per_chart: int = FACES_PER_CHART) -> UVAtlas:
    """Charts of about ``faces_per_chart`` faces (:func:`conformal_charts`) packed into a
    ``texture_size`` square texture with at least ``padding`` texels between charts (what the
    dilation fills, so bilinear and mip-mapped lookups do not bleed) by :func:`pack_charts`.

    The returned faces are a permutation of ``faces`` (grouped by chart), over new vertices.
    """
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    charts, used = [], []
    for ids, uv in conformal_charts(verts, faces, faces_per_chart):
        vertex, local = np.unique(faces[ids], return_inverse=True)
        charts.append((uv, local.reshape(-1, 3)))
        used.append(vertex)
    vmaps, tris, coords, offset = [], [], [], 0
    for vertex, (vmapping, indices, uvs) in zip(used, pack_charts(charts, int(texture_size), int(padding)),
                                                strict=True):
        vmaps.append(vertex[vmapping])
        tris.append(indices + offset)
        coords.append(uvs)
        offset += len(vmapping)
    return UVAtlas(np.concatenate(vmaps), np.concatenate(tris),
                   np.clip(np.concatenate(coords), 0.0, 1.0).astype(np.float32))


def pack_charts(charts: list[tuple[np.ndarray, np.ndarray]], size: int, padding: int
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Place charts ``[(uvs (v, 2), faces (f, 3) over them)]``, one texel density for all, in the
    unit square by xatlas's packer (``add_uv_mesh``: the charts are ours, xatlas only moves and
    turns them), at least ``padding`` texels of a ``size`` texture apart.

    Returns per chart (vertex of the chart (n,), faces (f, 3) over the n, glTF UVs (n, 2))."""
    import xatlas

    # Charts some tens of units across: xatlas takes a UV area under its float epsilon for a
    # degenerate face.
    scale = 32.0 / max(float(np.median([np.ptp(uv, axis=0).max() for uv, _ in charts])), 1e-30)
    gutter = int(padding)
    for _ in range(3):
        atlas = xatlas.Atlas()
        for uv, tris in charts:
            atlas.add_uv_mesh(np.ascontiguousarray(uv * scale, dtype=np.float32),
                              np.ascontiguousarray(tris, dtype=np.uint32))
        pack = xatlas.PackOptions()
        pack.resolution = int(size)
        pack.padding = gutter
        pack.bilinear = True
        pack.rotate_charts = True
        atlas.generate(xatlas.ChartOptions(), pack)
        # The atlas can come out larger than asked for; its texels then shrink into the texture's.
        shrink = max(atlas.width, atlas.height) / float(size)
        if gutter >= padding * shrink:
            break
        gutter = int(np.ceil(padding * shrink))
    out = []
    for k, (_, tris) in enumerate(charts):
        _, indices, uvs = atlas.get_mesh(k)
        indices = indices.astype(np.int64).reshape(-1, 3)
        if indices.shape != tris.shape:
            raise RuntimeError(f"xatlas packed {len(indices)} of a chart's {len(tris)} faces")
        # xatlas keeps the faces in order but welds UV vertices that coincide (a collapsed needle),
        # so each corner's vertex is read from the chart's own faces, not from xatlas's mapping.
        pairs, corner = np.unique(np.stack([tris.reshape(-1), indices.reshape(-1)], axis=1), axis=0,
                                  return_inverse=True)
        uvs, corner = uvs[pairs[:, 1]], corner.reshape(-1, 3)
        # xatlas turns a chart by a quarter by swapping u and v, which mirrors it: mirror it back
        # within its own box, so every chart keeps the surface's winding (and a normal map's frame).
        if _signed_uv_area(uvs, corner).sum() * _signed_uv_area(charts[k][0], tris).sum() < 0:
            uvs = uvs.copy()
            uvs[:, 0] = uvs[:, 0].min() + uvs[:, 0].max() - uvs[:, 0]
        out.append((pairs[:, 0], corner, uvs))
    return out


def conformal_charts(verts: np.ndarray, faces: np.ndarray, faces_per_chart: int = FACES_PER_CHART
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a mesh into charts and flatten each: ``[(face ids (f,), uvs (v, 2) over the chart's
    used vertices in ascending order)]``, UV area equal to surface area (one texel density).

    Pieces of about ``faces_per_chart`` faces (k-means on face centres, then connected
    components) are mapped by :func:`lscm`; a piece whose map flips a face or stretches area by
    more than :data:`MAX_AREA_DISTORTION` is cut in two and tried again (a single triangle
    always maps), so every chart is valid."""
    import warnings

    from scipy.cluster.vq import kmeans2

    centres = verts[faces].mean(axis=1)
    folded = _folded_faces(verts, faces)
    longest = MAX_CHART_LENGTH * np.sqrt(face_areas_of(verts, faces).sum())
    pieces = max(1, round(len(faces) / max(1, faces_per_chart)))
    if pieces > 1:
        _, label = kmeans2(centres, pieces, minit="++", seed=0, iter=10)
    else:
        label = np.zeros(len(faces), dtype=np.int64)
    queue = [np.flatnonzero(label == k) for k in range(pieces)]
    charts = []
    while queue:
        ids = queue.pop()
        if len(ids) == 0:
            continue
        for part in _face_components(faces[ids]):
            part_ids = ids[part]
            used, local = np.unique(faces[part_ids], return_inverse=True)
            local = local.reshape(-1, 3)
            uv = lscm(verts[used], local) if len(part_ids) > 1 else _triangle_uv(verts[used])
            if len(part_ids) == 1 or _chart_ok(uv, verts[used], local, folded[part_ids], longest):
                charts.append((part_ids, _unit_density(uv, verts[used], local)))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty cluster is handled below
                _, half = kmeans2(centres[part_ids], 2, minit="++", seed=0, iter=5)
            if half.min() == half.max():  # k-means could not split it: halve along the longest axis
                axis = np.ptp(centres[part_ids], axis=0).argmax()
                half = centres[part_ids, axis] > np.median(centres[part_ids, axis])
                if half.all() or not half.any():
                    half = np.arange(len(part_ids)) >= len(part_ids) // 2
            queue += [part_ids[half == 0], part_ids[half == 1]] if half.dtype != bool else \
                [part_ids[~half], part_ids[half]]
    charts = _merge_small_charts(verts, faces, charts, folded, longest)
    # xatlas cannot pack a chart of no area (a lone degenerate face): each such face gets a small
    # right triangle of its own, at the size of a typical face (it covers no surface to bake).
    side = np.sqrt(max(float(np.median(face_areas_of(verts, faces))), 1e-30))
    out = []
    for ids, uv in charts:
        _, local = np.unique(faces[ids], return_inverse=True)
        if (_signed_uv_area(uv, local.reshape(-1, 3)).sum() > 1e-6 * side * side * len(ids)
                and np.ptp(uv, axis=0).max() <= longest):
            out.append((ids, uv))
            continue
        for k in ids:  # a needle's own shape, or a small triangle where it has none
            tri = verts[faces[k]]
            uv = _triangle_uv(tri)
            if (face_areas_of(tri, np.array([[0, 1, 2]]))[0] < 1e-6 * side * side
                    or np.ptp(uv, axis=0).max() > longest):
                uv = np.array([[0.0, 0.0], [side, 0.0], [0.0, side]])
            out.append((np.array([k]), uv))
    return out


SMALL_CHART = 64
"""Charts of fewer faces are offered to their neighbour (the one they share most edges with)."""


def _merge_small_charts(verts: np.ndarray, faces: np.ndarray, charts: list[tuple[np.ndarray, np.ndarray]],
                        folded: np.ndarray, longest: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Join each chart of fewer than :data:`SMALL_CHART` faces to its edge neighbour where the
    union still maps well (cutting a piece in two leaves crumbs where the cut met a hard spot)."""
    owner = np.zeros(len(faces), dtype=np.int64)
    for c, (ids, _) in enumerate(charts):
        owner[ids] = c
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, edge_id = np.unique(edges, axis=0, return_inverse=True)
    edge_id = edge_id.reshape(-1)
    face_of = np.repeat(np.arange(len(faces)), 3)
    order = np.argsort(edge_id, kind="stable")
    # Pairs of faces across an edge (manifold edges; a non-manifold edge pairs its first two).
    same = edge_id[order][1:] == edge_id[order][:-1]
    pairs = np.stack([face_of[order][:-1][same], face_of[order][1:][same]], axis=1)
    members = {c: ids for c, (ids, _) in enumerate(charts)}
    uvs = {c: uv for c, (_, uv) in enumerate(charts)}
    for c in sorted(members, key=lambda k: len(members[k])):
        if c not in members or len(members[c]) >= SMALL_CHART:
            continue
        a, b = owner[pairs[:, 0]], owner[pairs[:, 1]]
        across = np.concatenate([b[(a == c) & (b != c)], a[(b == c) & (a != c)]])
        for other in np.bincount(across).argsort()[::-1][:2] if len(across) else []:
            if other not in members or other == c or not (across == other).any():
                continue
            ids = np.concatenate([members[other], members[c]])
            used, local = np.unique(faces[ids], return_inverse=True)
            local = local.reshape(-1, 3)
            if len(_face_components(local)) != 1:
                continue
            uv = lscm(verts[used], local)
            if _chart_ok(uv, verts[used], local, folded[ids], longest):
                members[other], uvs[other] = ids, _unit_density(uv, verts[used], local)
                owner[members[c]] = other
                del members[c], uvs[c]
                break
    return [(members[c], uvs[c]) for c in sorted(members)]


def _face_components(faces: np.ndarray) -> list[np.ndarray]:
    """Face ids of each edge-connected component. (Faces that share only a corner are apart: a
    conformal map leaves their relative scale free.)"""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(faces)
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, edge_id = np.unique(edges, axis=0, return_inverse=True)
    edge_id = edge_id.reshape(-1)
    incidence = coo_matrix((np.ones(3 * n), (np.repeat(np.arange(n), 3), edge_id)),
                           shape=(n, int(edge_id.max()) + 1)).tocsr()
    count, labels = connected_components(incidence @ incidence.T, directed=False)
    return [np.flatnonzero(labels == c) for c in range(count)]


def lscm(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Least squares conformal map (Levy et al. 2002, "Least squares conformal maps for automatic
    texture atlas generation") of a connected piece with a boundary: verts (V, 3), faces (F, 3)
    -> uvs (V, 2), two far-apart vertices pinned. Each triangle's conformal energy
    ``|W (u + i v)|^2 / (2 A)`` in its own orthonormal frame (their eq. 8), solved by the normal
    equations."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    n, nf = len(verts), len(faces)
    p0, p1, p2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    normal = np.cross(e1, e2)
    area2 = np.maximum(np.linalg.norm(normal, axis=1), 1e-30)
    len1 = np.maximum(np.linalg.norm(e1, axis=1), 1e-30)
    x = e1 / len1[:, None]
    y = np.cross(normal / area2[:, None], x)
    q = np.zeros((nf, 3, 2))  # the triangle in its own plane: q0 = 0, q1 on the x axis
    q[:, 1, 0] = len1
    q[:, 2, 0], q[:, 2, 1] = (e2 * x).sum(1), (e2 * y).sum(1)
    # A degenerate face (zero area: a marching-tetrahedra needle) has no conformal energy to speak
    # of; weighted by 1/sqrt(area) it would swamp the whole piece's map.
    scale = np.where(area2 > 1e-9 * float(np.median(area2)), 1.0 / np.sqrt(area2), 0.0)
    t = np.arange(nf)
    rows, cols, vals = [], [], []
    for j in range(3):
        w = (q[:, (j + 2) % 3] - q[:, (j + 1) % 3]) * scale[:, None]
        vj = faces[:, j]
        # (w_r + i w_i)(u + i v): real part in row t, imaginary part in row nf + t.
        rows += [t, t, t + nf, t + nf]
        cols += [vj, vj + n, vj, vj + n]
        vals += [w[:, 0], -w[:, 1], w[:, 1], w[:, 0]]
    a_mat = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(2 * nf, 2 * n)).tocsc()
    first = int(np.argmax(np.linalg.norm(verts - verts.mean(0), axis=1)))
    second = int(np.argmax(np.linalg.norm(verts - verts[first], axis=1)))
    span = float(np.linalg.norm(verts[second] - verts[first]))
    fixed = np.array([first, second, first + n, second + n])
    fixed_value = np.array([0.0, span, 0.0, 0.0])
    free = np.setdiff1d(np.arange(2 * n), fixed)
    a_free = a_mat[:, free]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a singular piece (closed, degenerate) is caught by _chart_ok
        solution = spsolve((a_free.T @ a_free).tocsc(), a_free.T @ (-(a_mat[:, fixed] @ fixed_value)))
    out = np.zeros(2 * n)
    out[fixed], out[free] = fixed_value, solution
    return np.stack([out[:n], out[n:]], axis=1)


def face_areas_of(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) triangle areas."""
    return 0.5 * np.linalg.norm(np.cross(verts[faces[:, 1]] - verts[faces[:, 0]],
                                         verts[faces[:, 2]] - verts[faces[:, 0]]), axis=1)


def _signed_uv_area(uv: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b = uv[faces[:, 1]] - uv[faces[:, 0]], uv[faces[:, 2]] - uv[faces[:, 0]]
    return 0.5 * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])


def _folded_faces(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) True for a face turned against its edge neighbours (normal more than 90 degrees from
    their mean): a marching-tetrahedra crease that flips in any flat map."""
    normal = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, edge_id = np.unique(edges, axis=0, return_inverse=True)
    edge_sum = np.zeros((int(edge_id.max()) + 1, 3))
    np.add.at(edge_sum, edge_id.reshape(-1), np.repeat(normal, 3, axis=0))
    around = edge_sum[edge_id.reshape(-1, 3)].sum(axis=1) - 3.0 * normal  # the edge neighbours' normals
    return (around * normal).sum(axis=1) < 0.0


def _chart_ok(uv: np.ndarray, verts: np.ndarray, faces: np.ndarray, folded: np.ndarray,
              longest: float = np.inf) -> bool:
    """At most :data:`MAX_FLIPPED` of the faces that are not ``folded`` in 3D flipped or collapsed
    (a folded face flips in any flat map; it overlaps a few texels rather than cutting the chart
    down to one-face charts), and at most 2% of the area stretched by more than
    :data:`MAX_AREA_DISTORTION`, and no longer than ``longest`` at unit density (a ring around
    the neck unrolls into a strip that would set the atlas's width alone)."""
    if not np.isfinite(uv).all():
        return False
    if longest < np.inf and np.ptp(_unit_density(uv, verts, faces), axis=0).max() > longest:
        return False
    signed = _signed_uv_area(uv, faces)
    if (signed < 0).sum() > (signed > 0).sum():
        signed = -signed
    area = 0.5 * np.linalg.norm(np.cross(verts[faces[:, 1]] - verts[faces[:, 0]],
                                         verts[faces[:, 2]] - verts[faces[:, 0]]), axis=1)
    flipped = signed <= 0
    if (flipped & ~folded).sum() > MAX_FLIPPED * len(faces) or area.sum() <= 0 or signed[~flipped].sum() <= 0:
        return False
    signed, area = signed[~flipped], area[~flipped]
    ratio = signed / np.maximum(area, 1e-30) * (area.sum() / signed.sum())
    # By area, not by face count: a needle's ratio is numerically meaningless and covers no texels.
    stretched = (ratio < 1.0 / MAX_AREA_DISTORTION) | (ratio > MAX_AREA_DISTORTION)
    return bool(area[stretched].sum() <= 0.02 * area.sum())


def _triangle_uv(verts: np.ndarray) -> np.ndarray:
    """A single triangle laid flat: (3, 2)."""
    e1, e2 = verts[1] - verts[0], verts[2] - verts[0]
    len1 = max(float(np.linalg.norm(e1)), 1e-30)
    x = e1 / len1
    y = e2 - (e2 @ x) * x
    return np.array([[0.0, 0.0], [len1, 0.0], [e2 @ x, np.linalg.norm(y)]])


def _unit_density(uv: np.ndarray, verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``uv`` counter-clockwise, moved to the origin and scaled so its area is the surface's."""
    signed = _signed_uv_area(uv, faces)
    if signed.sum() < 0:
        uv = uv * np.array([-1.0, 1.0])
    area = 0.5 * np.linalg.norm(np.cross(verts[faces[:, 1]] - verts[faces[:, 0]],
                                         verts[faces[:, 2]] - verts[faces[:, 0]]), axis=1).sum()
    scale = np.sqrt(max(area, 1e-30) / max(abs(float(signed.sum())), 1e-30))
    return (uv - uv.min(axis=0)) * scale


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


JPEG_QUALITY = 90
"""Quality of a JPEG base colour: a 2048^2 skin texture with fine detail is 0.5-1.1 MB at 90 against
3.7-6.8 MB as PNG, and a GLB's size budget (issue #18: 10 MB) is mostly its images."""


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 -> baseline JPEG bytes (sRGB, 4:4:4 so colour edges between UV charts stay sharp).

    For base colour only: glTF 2.0 allows JPEG for any image, but a normal or ORM map must stay
    lossless (block artefacts turn into bumps and speckled roughness)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=int(quality), subsampling=0)
    return buf.getvalue()


__all__ = ["FACES_PER_CHART", "UVAtlas", "bake_texture", "conformal_charts", "dilate", "encode_jpeg", "encode_png",
           "lscm", "pack_charts", "rasterize_uv", "sample_texture", "unwrap_uv"]
