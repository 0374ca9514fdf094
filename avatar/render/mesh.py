"""Rasterised rendering of a triangle mesh for the fine stage and for exports.

vertices -> clip (the camera's :meth:`~avatar.render.cameras.Cameras.to_clip`)
-> :func:`~avatar.ops.raster.rasterize` -> interpolate positions, normals and
camera depth -> query a texture field (or vertex colours) at the visible surface
points -> shade -> composite over the background -> :func:`~avatar.ops.raster.antialias`
(which is what gives silhouettes their gradients).

Images come out top-down (row 0 is the top) because the camera's clip matrix
already flips Y; outputs match :class:`avatar.render.volume.RenderOutput`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from avatar.ops.raster import antialias, interpolate, rasterize
from avatar.render.cameras import Cameras
from avatar.render.shading import shade
from avatar.render.volume import RenderOutput, background_colour


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) area-weighted unit vertex normals of a mesh with outward-facing
    (counter-clockwise) triangles. faces: (F, 3) integer."""
    f = faces.long()
    v0, v1, v2 = verts[f[:, 0]], verts[f[:, 1]], verts[f[:, 2]]
    face_n = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 * area
    normals = torch.zeros_like(verts)
    for k in range(3):
        normals = normals.index_add(0, f[:, k], face_n)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


class MeshRenderer:
    """Render meshes from camera batches.

    resolution is taken from the cameras. engine: rasteriser engine
    (``auto``, ``nvdiffrast``, ``native``, ``torch``).
    """

    def __init__(self, engine: str = "auto", near: float = 0.05, far: float = 10.0):
        self.engine = engine
        self.near = near
        self.far = far

    def render(self, cameras: Cameras, verts: torch.Tensor, faces: torch.Tensor,
               albedo: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | None = None,
               shading: str = "albedo", light: torch.Tensor | None = None,
               background: str | torch.Tensor | nn.Module = "white", ambient: float = 0.25,
               antialiased: bool = True) -> RenderOutput:
        """Render ``verts`` (V, 3) world (or (B, V, 3)) with ``faces`` (F, 3).

        albedo: a texture field ``(N, 3) world points -> (N, 3)`` queried at the
            visible pixels, (V, 3) vertex colours, or None (grey).
        Returns rgb, opacity, depth (camera-space, along the optical axis), normal
        (unit world normals, zero on the background), and ``extras`` with
        ``positions`` (B, H, W, 3) world points, ``mask`` and ``rast``.
        """
        b, h, w = len(cameras), cameras.height, cameras.width
        faces_i32 = faces.to(torch.int32).contiguous()
        clip = cameras.to_clip(verts, self.near, self.far).contiguous()
        rast, _ = rasterize(clip, faces_i32, (h, w), engine=self.engine)
        mask = rast[..., 3:] > 0
        v = verts if verts.dim() == 3 else verts[None]
        normals_v = torch.stack([vertex_normals(x, faces) for x in v])
        # Camera-space depth per vertex is the clip w (our projection puts -z_cam in w).
        attrs = torch.cat([v.expand(b, -1, -1), normals_v.expand(b, -1, -1), clip[..., 3:]], dim=-1)
        if isinstance(albedo, torch.Tensor):
            colours_v = albedo if albedo.dim() == 3 else albedo[None]
            attrs = torch.cat([attrs, colours_v.expand(b, -1, -1)], dim=-1)
        interp = interpolate(attrs.contiguous(), rast, faces_i32, engine=self.engine)
        positions, normals, depth = interp[..., :3], interp[..., 3:6], interp[..., 6:7]
        normals = torch.nn.functional.normalize(normals, dim=-1, eps=1e-12) * mask
        if isinstance(albedo, torch.Tensor):
            colour = interp[..., 7:10]
        elif albedo is None:
            colour = torch.full_like(positions, 0.7)
        elif positions.device.type == "cpu":  # the field only at covered pixels: it is the cost here
            colour = torch.zeros_like(positions)
            visible = mask[..., 0]
            if visible.any():
                colour = colour.index_put((visible.nonzero(as_tuple=True)), albedo(positions[visible]))
        else:  # every pixel, masked: on a GPU cheaper than reading the coverage back to the host
            colour = albedo(positions.reshape(-1, 3)).reshape(positions.shape) * mask.to(positions.dtype)
        colour = shade(colour, normals, positions, shading, light, ambient) if shading != "albedo" else colour
        _, dirs = cameras.rays()
        bg = background_colour(background, dirs)
        maskf = mask.to(colour.dtype)
        rgb = colour * maskf + bg * (1.0 - maskf)
        opacity = maskf
        if antialiased:
            both = antialias(torch.cat([rgb, opacity], dim=-1).contiguous(), rast, clip, faces_i32, engine=self.engine)
            rgb, opacity = both[..., :3], both[..., 3:]
        return RenderOutput(rgb=rgb, opacity=opacity, depth=depth * maskf, normal=normals,
                            extras={"positions": positions, "mask": mask, "rast": rast, "clip": clip})
