"""Rendering the exported mesh with its baked texture, and the turntable video.

:class:`~avatar.render.mesh.MeshRenderer` shades texture fields or vertex colours;
an exported mesh carries a UV texture instead, so :func:`render_textured` runs the
same ops (camera clip matrix, :func:`~avatar.ops.raster.rasterize`,
:func:`~avatar.ops.raster.interpolate`, :func:`~avatar.ops.raster.antialias`) and
looks the colour up in the image at the interpolated UVs, bilinearly with
clamp-to-edge like a GPU sampler. Same conventions and background as MeshRenderer,
so the two can be compared pixel for pixel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from avatar.export.texture import sample_texture


def render_textured(cameras, verts: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, image: torch.Tensor,
                    shading: str = "albedo", light: torch.Tensor | None = None, ambient: float = 0.35,
                    background: str = "white", engine: str = "auto", near: float = 0.05,
                    far: float = 10.0) -> torch.Tensor:
    """Images (B, H, W, 3) of a UV-textured mesh.

    verts: (V, 3) world (field units for the project's cameras); faces: (F, 3);
    uvs: (V, 2) glTF convention; image: (Ht, Wt, 3) float in [0, 1], row 0 = v 0.
    shading: ``albedo`` or ``lambertian`` (a point light, :func:`avatar.render.shading.shade`).
    """
    from avatar.ops.raster import antialias, interpolate, rasterize
    from avatar.render.mesh import vertex_normals
    from avatar.render.shading import shade
    from avatar.render.volume import background_colour

    b, h, w = len(cameras), cameras.height, cameras.width
    faces_i32 = faces.to(torch.int32).contiguous()
    clip = cameras.to_clip(verts, near, far).contiguous()
    rast, _ = rasterize(clip, faces_i32, (h, w), engine=engine)
    mask = rast[..., 3:] > 0
    normals_v = vertex_normals(verts, faces)
    attrs = torch.cat([verts, normals_v, uvs], dim=-1)[None].expand(b, -1, -1).contiguous()
    interp = interpolate(attrs, rast, faces_i32, engine=engine)
    positions, normals, uv = interp[..., :3], interp[..., 3:6], interp[..., 6:8]
    colour = sample_texture(image, uv)
    if shading != "albedo":
        normals = torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)
        colour = shade(colour, normals, positions, shading, light, ambient)
    _, dirs = cameras.rays()
    maskf = mask.to(colour.dtype)
    rgb = colour * maskf + background_colour(background, dirs) * (1.0 - maskf)
    return antialias(rgb.contiguous(), rast, clip, faces_i32, engine=engine)


def turntable_cameras(frames: int, size: int, elevation: float = 10.0):
    """``frames`` cameras around the head, starting at the front view."""
    from avatar.render.cameras import orbit_cameras

    return orbit_cameras(frames, elevation=elevation, radius=1.6, fov_y=35.0, resolution=size)


def write_turntable(path: Path, verts: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, image: torch.Tensor,
                    frames: int, size: int, fps: int = 30, batch: int = 8, engine: str = "auto",
                    progress=None) -> None:
    """Render a lit turntable of the textured mesh (field units) and encode it as H.264 MP4
    (imageio-ffmpeg's bundled ffmpeg), written to a temp file and renamed."""
    import imageio.v2 as imageio

    cams = turntable_cameras(frames, size)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=16, ffmpeg_log_level="error")
    try:
        for start in range(0, frames, batch):
            sub = cams[start:start + batch]
            # Key light above and to the right of each camera.
            light = sub.eye + torch.tensor([0.6, 0.8, 0.0]) * sub.radius[:, None]
            with torch.no_grad():
                rgb = render_textured(sub, verts, faces, uvs, image, shading="lambertian", light=light,
                                      engine=engine)
            for frame in (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy():
                writer.append_data(np.ascontiguousarray(frame))
            if progress is not None:
                progress(min(start + batch, frames))
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)


__all__ = ["render_textured", "turntable_cameras", "write_turntable"]
