"""``axpy``: the smallest native op, kept as the template for new kernels.

It shows the whole path every op follows: header math in ``cuda_ext/include``,
a CPU loop and a CUDA launch of the same math, a checked torch binding, an
autograd Function here, and a reference in :mod:`avatar.ops.reference`.
"""

from __future__ import annotations

import torch

from avatar.ops import reference
from avatar.ops.engine import resolve_engine


class _AxpyNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return torch.ops.avatar.axpy(x.contiguous(), y.contiguous(), float(alpha))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.alpha, grad, None


def axpy(x: torch.Tensor, y: torch.Tensor, alpha: float, engine: str = "auto") -> torch.Tensor:
    """Return ``alpha * x + y``.

    x, y: tensors of one shape, float32, on one device.
    engine: ``auto`` | ``native`` | ``torch`` (see :mod:`avatar.ops.engine`).
    """
    if x.shape != y.shape:
        raise ValueError(f"axpy: x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != torch.float32 or y.dtype != torch.float32:
        raise TypeError(f"axpy: expected float32 tensors, got {x.dtype} and {y.dtype}")
    if resolve_engine("axpy", engine, x.device.type) == "native":
        return _AxpyNative.apply(x, y, alpha)
    return reference.axpy(x, y, alpha)
