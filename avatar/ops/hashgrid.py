"""Multi-resolution hash encoding (Instant-NGP, Muller et al. 2022, Sec. 3).

``hash_grid_encode(points, table, ...)`` encodes points of the unit cube with a
parameter table; :class:`HashGridEncoding` owns the table and is what fields use.

The grid layout (level scales, resolutions, dense or hashed levels, table rows)
is tiny-cuda-nn's ``HashGrid`` exactly (see :mod:`avatar.ops.reference.hashgrid`),
and the table is stored as tcnn stores it (level-major rows of F features), so
weights move between the engines unchanged:

- ``native``: our cuda_ext kernel, CPU (float32/float64; race-free deterministic
  table gradient) and CUDA (float32/float64, or a float16 table with float32
  points; atomicAdd table gradient accumulated in float32); CUDA matches the CPU
  engine to rtol 1e-5, atol 1e-6 in float32 (atomic sums in another order, and nvcc
  contracts multiply-adds);
- ``torch``: the pure-PyTorch reference (any dtype and device, any derivative order);
- ``tcnn``: tiny-cuda-nn's ``Encoding`` on CUDA, only through
  :class:`HashGridEncoding` (tcnn owns its parameter buffer; the functional form
  cannot hand it an external table).

The native backward is first-order: gradients of gradients (e.g. an eikonal loss
on analytic normals) need ``engine="torch"``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from avatar.ops.engine import EngineError, resolve_engine
from avatar.ops.reference import hashgrid as reference
from avatar.ops.reference.hashgrid import (
    HashGridLayout,
    hash_grid_layout,
    max_resolution_to_per_level_scale,
)

__all__ = [
    "HashGridEncoding",
    "HashGridLayout",
    "hash_grid_encode",
    "hash_grid_layout",
    "max_resolution_to_per_level_scale",
]

_NATIVE_FEATURES = (1, 2, 4, 8)


class _HashGridNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points: torch.Tensor, table: torch.Tensor, layout: HashGridLayout) -> torch.Tensor:
        ctx.layout = layout
        ctx.save_for_backward(points, table)
        return torch.ops.avatar.hashgrid_forward(
            points, table, list(layout.offsets), list(layout.scales), list(layout.resolutions)
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        points, table = ctx.saved_tensors
        layout: HashGridLayout = ctx.layout
        need_points, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_points or need_table):
            return None, None, None
        grad_table, grad_points = torch.ops.avatar.hashgrid_backward(
            grad_out.contiguous().to(points.dtype),
            points,
            table,
            list(layout.offsets),
            list(layout.scales),
            list(layout.resolutions),
            bool(need_table),
            bool(need_points),
        )
        return (grad_points if need_points else None), (grad_table if need_table else None), None


def _native_supports(points: torch.Tensor, table: torch.Tensor) -> bool:
    if table.shape[1] not in _NATIVE_FEATURES or points.dtype not in (torch.float32, torch.float64):
        return False
    if table.dtype == points.dtype:
        return True
    return points.is_cuda and table.dtype == torch.float16 and points.dtype == torch.float32


def _check(points: torch.Tensor, table: torch.Tensor, layout: HashGridLayout) -> None:
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"hash_grid_encode: points must be (N, 3), got {tuple(points.shape)}")
    if table.dim() != 2 or table.shape[0] != layout.n_rows:
        raise ValueError(
            f"hash_grid_encode: the layout needs a table of shape ({layout.n_rows}, F), got {tuple(table.shape)}"
        )
    if points.device != table.device:
        raise ValueError(f"hash_grid_encode: points on {points.device} but table on {table.device}")
    if not points.is_floating_point() or not table.is_floating_point():
        raise TypeError(f"hash_grid_encode: expected floating tensors, got {points.dtype} and {table.dtype}")


def hash_grid_encode(
    points: torch.Tensor,
    table: torch.Tensor,
    n_levels: int = 16,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    per_level_scale: float = 2.0,
    engine: str = "auto",
) -> torch.Tensor:
    """Encode points of the unit cube with a multi-resolution hash grid.

    points: (N, 3) float32 or float64 in [0, 1]^3; values outside are clamped
        (and get zero gradient).
    table: (hash_grid_layout(...).n_rows, F) parameters, F in {1, 2, 4, 8} for the
        native engine; same dtype as points (float16 allowed on CUDA with float32
        points, native engine only).
    n_levels, log2_hashmap_size, base_resolution, per_level_scale: L, T, N_min, b.
    engine: ``auto`` | ``native`` | ``torch`` (see :mod:`avatar.ops.engine`).
    Returns (N, L * F) in the points' dtype, level-major. Differentiable in points
    and table (first order with the native engine).
    """
    layout = hash_grid_layout(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
    _check(points, table, layout)
    if engine == "tcnn":
        raise EngineError(
            "hash_grid_encode: tiny-cuda-nn owns its parameter buffer, so it serves the hash grid "
            "only through HashGridEncoding(engine='tcnn')"
        )
    choice = resolve_engine("hashgrid", engine, points.device.type)
    if choice == "native":
        if not _native_supports(points, table):
            if engine == "native":
                raise EngineError(
                    f"native hash grid supports F in {_NATIVE_FEATURES} and float32/float64 tables "
                    f"(float16 on CUDA); got F={table.shape[1]}, points {points.dtype}, table {table.dtype} "
                    f"on {points.device.type}: use engine='torch'"
                )
            choice = "torch"
    if choice == "native":
        return _HashGridNative.apply(points.contiguous(), table.contiguous(), layout)
    if table.dtype != points.dtype:
        table = table.to(points.dtype)
    return reference.hash_grid_encode(points, table, n_levels, log2_hashmap_size, base_resolution, per_level_scale)


class HashGridEncoding(nn.Module):
    """A multi-resolution hash grid with its parameter table.

    Configuration (defaults: threestudio's NeRF setting, 16 levels from 16 to a finest
    resolution of 4096 over the unit box, 2^19 rows per level):

    n_levels: L, number of resolution levels (<= 32).
    n_features_per_level: F, features stored per grid vertex (1, 2, 4 or 8).
    log2_hashmap_size: T, each level holds at most 2^T rows; coarse levels whose
        grid fits are dense, finer ones are hashed (Instant-NGP Eq. 4).
    base_resolution: N_min, resolution of the coarsest level.
    per_level_scale: b, resolution growth per level; see
        :func:`max_resolution_to_per_level_scale` to derive it from a finest resolution.
    dtype: table dtype; float32 (default), float64, or float16 (CUDA only: halves
        the table's memory, the encoding is still computed in float32).
    engine: ``auto`` | ``native`` | ``torch`` | ``tcnn``. ``auto`` uses tiny-cuda-nn
        for CUDA inputs when ``tinycudann`` is installed, else the native kernel,
        else the reference.
    init_scale: the table starts uniform in [-init_scale, init_scale] (tcnn: 1e-4).

    The parameter is ``params``, flat ``(n_rows * F,)`` as in ``tinycudann.Encoding``,
    so state dicts are interchangeable with tcnn's; :attr:`table` is its ``(n_rows, F)`` view.

    Input: points (..., 3) in [0, 1]^3. Output: (..., L * F) float32 (float64 for
    a float64 table).
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.4472692374403782,
        dtype: torch.dtype = torch.float32,
        engine: str = "auto",
        init_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        if n_features_per_level < 1:
            raise ValueError(f"HashGridEncoding: n_features_per_level must be >= 1, got {n_features_per_level}")
        if dtype not in (torch.float32, torch.float64, torch.float16):
            raise TypeError(f"HashGridEncoding: dtype must be float32, float64 or float16, got {dtype}")
        self.layout = hash_grid_layout(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = float(per_level_scale)
        self.engine = engine
        params = torch.empty(self.layout.n_rows * n_features_per_level, dtype=torch.float32)
        params.uniform_(-init_scale, init_scale)
        self.params = nn.Parameter(params.to(dtype))
        self._tcnn: dict[str, object] = {}  # not a submodule: it shares `params`, stored once

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    @property
    def table(self) -> torch.Tensor:
        """The parameters as the (n_rows, F) table the kernels read."""
        return self.params.view(self.layout.n_rows, self.n_features_per_level)

    def tcnn_config(self) -> dict:
        """The tiny-cuda-nn encoding config describing this grid."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }

    def extra_repr(self) -> str:
        return (
            f"L={self.n_levels}, F={self.n_features_per_level}, T={self.log2_hashmap_size}, "
            f"N_min={self.base_resolution}, b={self.per_level_scale:.6g}, rows={self.layout.n_rows}, "
            f"dtype={self.params.dtype}, engine={self.engine}"
        )

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != 3:
            raise ValueError(f"HashGridEncoding: points must be (..., 3), got {tuple(points.shape)}")
        batch = points.shape[:-1]
        flat = points.reshape(-1, 3)
        choice = resolve_engine("hashgrid", self.engine, flat.device.type, gpu_engines=("tcnn",))
        if choice == "tcnn" and self.engine == "auto" and self.params.dtype == torch.float64:
            choice = resolve_engine("hashgrid", "auto", flat.device.type)  # tcnn has no float64 grid
        if choice == "tcnn":
            out = self._forward_tcnn(flat)
        else:
            compute = torch.float64 if self.params.dtype == torch.float64 else torch.float32
            out = hash_grid_encode(
                flat.to(compute),
                self.table,
                self.n_levels,
                self.log2_hashmap_size,
                self.base_resolution,
                self.per_level_scale,
                engine="torch" if choice == "torch" else self.engine,
            )
        return out.reshape(*batch, self.n_output_dims)

    def _forward_tcnn(self, points: torch.Tensor) -> torch.Tensor:
        """tiny-cuda-nn path: ``tinycudann.Encoding(n_input_dims, encoding_config, dtype=...)``.

        The tcnn module is built once per device and given our ``params`` as its
        ``params`` (the attribute tcnn modules keep their weights in), so the
        optimiser and the state dict see one tensor whichever engine runs.
        """
        import tinycudann as tcnn  # lazy: optional, CUDA only

        key = str(points.device)
        module = self._tcnn.get(key)
        if module is None:
            if self.params.dtype == torch.float64:
                raise EngineError("tiny-cuda-nn has no float64 hash grid: use engine='native' or 'torch'")
            with torch.cuda.device(points.device):
                module = tcnn.Encoding(3, self.tcnn_config(), dtype=self.params.dtype)
            if module.params.numel() != self.params.numel():
                raise EngineError(
                    f"tiny-cuda-nn's HashGrid has {module.params.numel()} parameters, ours "
                    f"{self.params.numel()}: this tinycudann version uses another layout; use engine='native'"
                )
            self._tcnn[key] = module
        module.params = self.params
        return module(points.contiguous()).float()

    def _apply(self, fn, *args, **kwargs):
        # Moving/casting the module invalidates the tcnn modules bound to the old tensor.
        self._tcnn.clear()
        return super()._apply(fn, *args, **kwargs)
