"""Differentiable triangle rasterisation: ``rasterize``, ``interpolate``, ``antialias``.

The three ops follow nvdiffrast's interface and output conventions exactly
(Laine et al. 2020, "Modular Primitives for High-Performance Differentiable
Rendering"), so a renderer written against them gives the same images whichever
engine serves it:

- ``nvdiffrast`` (GPU engine): used when the package is installed and the tensors
  are on CUDA, through its documented API only (``RasterizeCudaContext``,
  ``rasterize``, ``interpolate``, ``antialias``), imported on first use;
- ``native`` (portable engine): our C++ rasteriser (``cuda_ext/src/raster.cpp``,
  with a tiled CUDA fallback in ``raster.cu`` whose output equals the CPU
  engine's bit for bit) finds the triangle seen at each pixel; barycentrics are
  recomputed in PyTorch from that triangle, which makes them differentiable in
  the vertex positions;
- ``torch``: the pure-PyTorch reference, :mod:`avatar.ops.reference.raster`.

Conventions (nvdiffrast's):

- ``pos_clip``: (B, V, 4) or (V, 4) clip-space (x, y, z, w) float32, i.e. after
  the projection matrix and before the divide by w. (V, 4) renders one image.
- Image: pixel (px, py) of an (H, W) image samples the NDC point
  ((2 px + 1) / W - 1, (2 py + 1) / H - 1): pixel centres sit at half-integers,
  and **row 0 is clip-space y = -1**, the bottom of the view (OpenGL's lower-left
  origin). Flip rows (``img.flip(1)``) for a top-down picture.
- ``rast``: (B, H, W, 4) float32 = (u, v, z/w, triangle_id + 1); all zero where
  no triangle covers the pixel. (u, v) are perspective-correct barycentric weights
  of the triangle's vertices 0 and 1 (vertex 2 gets 1 - u - v); z/w is the NDC
  depth. A pixel is covered where the interpolated w > 0 and -1 <= z/w <= 1
  (OpenGL's view volume: triangles behind the camera or beyond the near/far planes
  are clipped). Both faces are drawn. The smallest z/w wins; exact ties go to the
  lower triangle id. Pixels exactly on an edge shared by two triangles belong to
  exactly one of them (a top-left fill rule).
- ``rast_db`` (with ``output_db=True``): (du/dX, du/dY, dv/dX, dv/dY) per pixel,
  X along columns and Y along rows.
- Gradients: ``rast``'s (u, v) (and ``rast_db``) carry gradients to ``pos_clip``;
  z/w and the id do not, as in nvdiffrast. ``interpolate`` is differentiable in
  ``attr`` and in ``rast``'s (u, v); ``antialias`` in ``color`` and, through the
  silhouette edges, in ``pos_clip``.

Face indices: on CPU tensors (and on the torch engine) ``faces`` are checked
against the vertex count with a clear error. On CUDA they are not: reading
their values would synchronise the device on every call. There a triangle with
an index outside [0, V) is skipped (never drawn, interpolated or blended), as
nvdiffrast's kernels and ours do.

Known differences from nvdiffrast: it snaps vertices to 1/16 pixel, so a pixel
centre within about 1/16 pixel of an edge can go to the other triangle; its
antialias gradient divides by (dy + 1e-3) where we use the exact derivative; on
a non-manifold edge (three or more triangles) we treat the edge as a silhouette
for all of them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from avatar.ops.engine import resolve_engine
from avatar.ops.reference import raster as reference

__all__ = ["rasterize", "interpolate", "antialias", "opposite_vertices"]

_GPU_ENGINES = ("nvdiffrast",)


# ---------------------------------------------------------------------------
# Validation at the door.


def _check_pos(pos_clip: torch.Tensor, op: str) -> torch.Tensor:
    if not isinstance(pos_clip, torch.Tensor):
        raise TypeError(f"{op}: pos_clip must be a tensor, got {type(pos_clip).__name__}")
    if pos_clip.dim() not in (2, 3) or pos_clip.shape[-1] != 4:
        raise ValueError(
            f"{op}: pos_clip must have shape (B, V, 4) or (V, 4) (clip x, y, z, w), got {tuple(pos_clip.shape)}"
        )
    if pos_clip.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: pos_clip must be float32 (float64 on the torch engine), got {pos_clip.dtype}")
    return pos_clip.unsqueeze(0) if pos_clip.dim() == 2 else pos_clip


def _check_faces(faces: torch.Tensor, device: torch.device, op: str) -> None:
    """Shape, dtype and device (free: no data is read)."""
    if not isinstance(faces, torch.Tensor) or faces.dim() != 2 or faces.shape[1] != 3:
        shape = tuple(faces.shape) if isinstance(faces, torch.Tensor) else type(faces).__name__
        raise ValueError(f"{op}: faces must be an (F, 3) tensor, got {shape}")
    if faces.dtype != torch.int32:
        raise TypeError(f"{op}: faces must be int32 (use faces.int()), got {faces.dtype}")
    if faces.device != device:
        raise ValueError(f"{op}: faces are on {faces.device} but the other inputs on {device}")
    if faces.shape[0] >= 1 << 24:
        raise ValueError(f"{op}: at most 2^24 - 1 triangles (ids are stored in float32), got {faces.shape[0]}")


def _check_face_values(faces: torch.Tensor, num_vertices: int, engine: str, op: str) -> None:
    """Index range, where it costs nothing: CPU tensors, or the torch engine (which
    synchronises anyway and would fail on a bad index with a device-side assert).
    Skipped for the CUDA kernels: ``int(faces.min())`` would wait for the device
    on every call, and the kernels skip triangles with bad indices."""
    if faces.numel() == 0 or (faces.device.type != "cpu" and engine != "torch"):
        return
    low, high = (int(v) for v in torch.aminmax(faces))
    if low < 0 or high >= num_vertices:
        raise ValueError(
            f"{op}: faces index vertices in [{low}, {high}] but there are {num_vertices} vertices "
            "(faces must index rows of pos_clip / attr)"
        )


def _check_rast(rast: torch.Tensor, op: str) -> None:
    if not isinstance(rast, torch.Tensor) or rast.dim() != 4 or rast.shape[-1] != 4:
        shape = tuple(rast.shape) if isinstance(rast, torch.Tensor) else type(rast).__name__
        raise ValueError(f"{op}: rast must be the (B, H, W, 4) output of rasterize, got {shape}")
    if not rast.is_floating_point():
        raise TypeError(f"{op}: rast must be a float tensor, got {rast.dtype}")


def _check_resolution(resolution) -> tuple[int, int]:
    try:
        height, width = (int(r) for r in resolution)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rasterize: resolution must be (height, width), got {resolution!r}") from exc
    if height <= 0 or width <= 0 or height > 16384 or width > 16384:
        raise ValueError(f"rasterize: resolution must be in [1, 16384], got {height} x {width}")
    return height, width


def _engine(op: str, engine: str, device: torch.device, *tensors: torch.Tensor) -> str:
    """Resolve the engine; float64 inputs are served by the torch reference only."""
    wide = any(t.dtype == torch.float64 for t in tensors)
    if wide and engine == "auto":
        return "torch"
    choice = resolve_engine(op, engine, device.type, _GPU_ENGINES)
    if wide and choice != "torch":
        raise TypeError(f"{op}: engine '{choice}' takes float32 tensors; use engine='torch' for float64")
    return choice


# ---------------------------------------------------------------------------
# nvdiffrast (GPU engine), documented API only, imported lazily.

_contexts: dict[torch.device, Any] = {}


def _nvdiffrast():
    import nvdiffrast.torch as dr

    return dr


def _nvdiffrast_context(device: torch.device):
    if device.type == "cuda" and device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    context = _contexts.get(device)
    if context is None:
        context = _contexts[device] = _nvdiffrast().RasterizeCudaContext(device=device)
    return context


def _nvdiffrast_rasterize(pos, faces, resolution, output_db):
    dr = _nvdiffrast()
    rast, rast_db = dr.rasterize(
        _nvdiffrast_context(pos.device),
        pos.contiguous(),
        faces.contiguous(),
        resolution=list(resolution),
        grad_db=output_db,
    )
    return rast, (rast_db if output_db else None)


# ---------------------------------------------------------------------------
# rasterize


def rasterize(
    pos_clip: torch.Tensor,
    faces: torch.Tensor,
    resolution: tuple[int, int],
    engine: str = "auto",
    output_db: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rasterise triangles: which triangle each pixel centre sees, and where.

    pos_clip: (B, V, 4) or (V, 4) clip-space positions, float32 (float64 on the
        torch engine); differentiable.
    faces: (F, 3) int32 vertex indices (F < 2^24).
    resolution: (H, W) in pixels.
    engine: ``auto`` | ``native`` | ``torch`` | ``nvdiffrast`` (see :mod:`avatar.ops.engine`).
    output_db: also return the image-space derivatives of (u, v).

    Returns ``(rast, rast_db)``: rast (B, H, W, 4) = (u, v, z/w, triangle_id + 1),
    zero where empty, and rast_db (B, H, W, 4) = (du/dX, du/dY, dv/dX, dv/dY) or
    None. Conventions (pixel centres, row 0 at clip y = -1, clipping, fill rule)
    are nvdiffrast's and listed in this module's docstring.
    """
    pos = _check_pos(pos_clip, "rasterize")
    _check_faces(faces, pos.device, "rasterize")
    height, width = _check_resolution(resolution)
    choice = _engine("rasterize", engine, pos.device, pos)
    _check_face_values(faces, pos.shape[1], choice, "rasterize")
    if choice == "nvdiffrast":
        return _nvdiffrast_rasterize(pos, faces, (height, width), output_db)
    if choice == "torch":
        return reference.rasterize(pos, faces, (height, width), output_db)
    with torch.no_grad():
        rast = torch.ops.avatar.rasterize_fwd(pos.detach().contiguous(), faces.contiguous(), height, width)
    if output_db or (pos.requires_grad and torch.is_grad_enabled()):
        # Same values, recomputed in PyTorch from the triangle found at each pixel
        # so that autograd reaches the vertex positions.
        return reference.rast_from_triangle_ids(pos, faces, rast[..., 3].long() - 1, output_db)
    return rast, None


# ---------------------------------------------------------------------------
# interpolate


def _interpolate_grad_attr(grad, attr, rast, faces):
    """d out / d attr: each pixel's gradient spread over its triangle's vertices by (u, v, 1 - u - v).

    Dense over pixels (empty ones and triangles with bad indices add zeros), so
    nothing waits for the device: no ``nonzero``, whose output size needs a sync.
    """
    attr_batch, num_vertices, channels = attr.shape
    pixels = rast.shape[1] * rast.shape[2]
    num_faces = faces.shape[0]
    out = torch.zeros(attr_batch * num_vertices, channels, dtype=attr.dtype, device=attr.device)
    if num_faces == 0 or num_vertices == 0:
        return out.view(attr_batch, num_vertices, channels)
    tri = rast[..., 3].reshape(-1).long() - 1
    valid = (tri >= 0) & (tri < num_faces)
    vid = faces.long()[tri.clamp(0, num_faces - 1)]  # (N, 3)
    valid &= ((vid >= 0) & (vid < num_vertices)).all(1)  # as the kernel's raster_pixel_vertices
    vid = vid.clamp(0, num_vertices - 1)
    if attr_batch > 1:
        image = torch.arange(tri.shape[0], device=tri.device) // pixels
        vid = vid + (image * num_vertices)[:, None]
    flat = rast.reshape(-1, 4)
    u, v = flat[:, 0], flat[:, 1]
    grad_flat = grad.reshape(-1, channels)
    for corner, weight in enumerate((u, v, (1.0 - u) - v)):
        contrib = torch.where(valid[:, None], weight[:, None] * grad_flat, 0.0)
        out.index_add_(0, vid[:, corner], contrib)
    return out.view(attr_batch, num_vertices, channels)


class _InterpolateNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        attr, rast = attr.contiguous(), rast.contiguous()
        ctx.save_for_backward(attr, rast, faces)
        return torch.ops.avatar.interpolate_fwd(attr, rast, faces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        attr, rast, faces = ctx.saved_tensors
        grad = grad.contiguous()
        grad_attr = _interpolate_grad_attr(grad, attr, rast, faces) if ctx.needs_input_grad[0] else None
        grad_rast = torch.ops.avatar.interpolate_grad_rast(grad, attr, rast, faces) if ctx.needs_input_grad[1] else None
        return grad_attr, grad_rast, None


def interpolate(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor, engine: str = "auto") -> torch.Tensor:
    """Interpolate vertex attributes over the rasterised image.

    attr: (V, C), or (1 or B, V, C), float32 (float64 on the torch engine).
    rast: (B, H, W, 4) from :func:`rasterize`.
    faces: (F, 3) int32, as given to :func:`rasterize`.
    engine: ``auto`` | ``native`` | ``torch`` | ``nvdiffrast``.

    Returns (B, H, W, C) = u * attr[f0] + v * attr[f1] + (1 - u - v) * attr[f2] for
    the triangle f at each pixel, 0 where empty. Differentiable in attr and in
    rast's (u, v), hence in the vertex positions given to :func:`rasterize`.
    (nvdiffrast's ``interpolate`` returns a pair; this returns the image only.)
    """
    if not isinstance(attr, torch.Tensor) or attr.dim() not in (2, 3):
        raise ValueError(
            f"interpolate: attr must be (V, C) or (B, V, C), got "
            f"{tuple(attr.shape) if isinstance(attr, torch.Tensor) else type(attr).__name__}"
        )
    _check_rast(rast, "interpolate")
    attr3 = attr.unsqueeze(0) if attr.dim() == 2 else attr
    if attr3.shape[0] not in (1, rast.shape[0]):
        raise ValueError(f"interpolate: attr has batch {attr3.shape[0]} but rast has {rast.shape[0]} images")
    if attr3.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"interpolate: attr must be float32, got {attr3.dtype}")
    if attr3.device != rast.device:
        raise ValueError(f"interpolate: attr is on {attr3.device} but rast on {rast.device}")
    _check_faces(faces, rast.device, "interpolate")
    choice = _engine("interpolate", engine, rast.device, attr3, rast)
    _check_face_values(faces, attr3.shape[1], choice, "interpolate")
    if choice == "nvdiffrast":
        out, _ = _nvdiffrast().interpolate(attr.contiguous(), rast.contiguous(), faces.contiguous())
        return out
    if choice == "torch":
        return reference.interpolate(attr3, rast, faces)
    return _InterpolateNative.apply(attr3, rast, faces.contiguous())


# ---------------------------------------------------------------------------
# antialias

_topology_cache: tuple[weakref.ref, int, torch.Tensor] | None = None
_topology_hash_cache: tuple[weakref.ref, int, Any] | None = None


def _nvdiffrast_topology_hash(faces: torch.Tensor):
    """nvdiffrast's ``antialias_construct_topology_hash`` for ``faces``, built once per
    face tensor (and rebuilt if it is modified in place): without it nvdiffrast's
    ``antialias`` rebuilds the hash on every call."""
    global _topology_hash_cache
    cached = _topology_hash_cache
    if cached is not None and cached[0]() is faces and cached[1] == faces._version:
        return cached[2]
    topology = _nvdiffrast().antialias_construct_topology_hash(faces)
    _topology_hash_cache = (weakref.ref(faces), faces._version, topology)
    return topology


def opposite_vertices(faces: torch.Tensor) -> torch.Tensor:
    """Mesh topology for :func:`antialias`: the vertex across each triangle edge.

    faces: (F, 3) int32 -> (F, 3) int32 (see
    :func:`avatar.ops.reference.raster.opposite_vertices`). The last result is
    cached for the same, unmodified ``faces`` tensor.
    """
    global _topology_cache
    cached = _topology_cache
    if cached is not None and cached[0]() is faces and cached[1] == faces._version:
        return cached[2]
    result = reference.opposite_vertices(faces).contiguous()
    _topology_cache = (weakref.ref(faces), faces._version, result)
    return result


def antialias(
    color: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, faces: torch.Tensor, engine: str = "auto"
) -> torch.Tensor:
    """Analytic antialiasing of silhouette edges, with gradients to vertex positions.

    Where neighbouring pixels see different triangles and a silhouette edge of the
    closer one passes between their centres, the colours are blended by the
    edge's estimated coverage (Laine et al. 2020, "Modular Primitives for
    High-Performance Differentiable Rendering", section 3.4, as nvdiffrast's
    ``antialias``). This is what lets image losses move silhouettes. As in
    nvdiffrast, only edges of the triangles seen at the two pixel centres are
    considered, so rims made of sub-pixel triangles get fewer blends.

    color: (B, H, W, C) float32 shaded image (e.g. from :func:`interpolate`).
    rast: (B, H, W, 4) from :func:`rasterize` with the same positions.
    pos_clip: (B, V, 4) or (V, 4) clip-space positions given to :func:`rasterize`.
    faces: (F, 3) int32.
    engine: ``auto`` | ``native`` | ``torch`` | ``nvdiffrast``.

    Returns the antialiased (B, H, W, C) image, differentiable in color and pos_clip.
    """
    pos = _check_pos(pos_clip, "antialias")
    _check_rast(rast, "antialias")
    if not isinstance(color, torch.Tensor) or color.dim() != 4 or color.shape[:3] != rast.shape[:3]:
        shape = tuple(color.shape) if isinstance(color, torch.Tensor) else type(color).__name__
        raise ValueError(f"antialias: color must be (B, H, W, C) matching rast {tuple(rast.shape[:3])}, got {shape}")
    if not color.is_floating_point():
        raise TypeError(f"antialias: color must be a float tensor, got {color.dtype}")
    if pos.shape[0] not in (1, rast.shape[0]):
        raise ValueError(f"antialias: pos_clip has batch {pos.shape[0]} but rast has {rast.shape[0]} images")
    if color.device != pos.device or rast.device != pos.device:
        raise ValueError("antialias: color, rast and pos_clip must be on one device")
    _check_faces(faces, pos.device, "antialias")
    if pos.shape[0] != rast.shape[0]:
        pos = pos.expand(rast.shape[0], -1, -1)
    choice = _engine("antialias", engine, pos.device, color, pos, rast)
    _check_face_values(faces, pos.shape[1], choice, "antialias")
    if choice == "nvdiffrast":
        tri = faces.contiguous()  # the same tensor when already contiguous, so the hash cache hits
        return _nvdiffrast().antialias(
            color.contiguous(), rast.contiguous(), pos.contiguous(), tri, topology_hash=_nvdiffrast_topology_hash(tri)
        )
    if choice == "torch":
        return reference.antialias(color, rast, pos, faces)
    codes = torch.ops.avatar.antialias_analysis(
        rast.detach().contiguous(), pos.detach().contiguous(), faces.contiguous(), opposite_vertices(faces)
    )
    return reference.antialias_blend(color, rast, pos, faces, codes)
