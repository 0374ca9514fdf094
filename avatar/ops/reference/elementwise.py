"""Reference of the trivial elementwise op that proves the native build path."""

from __future__ import annotations

import torch


def axpy(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * x + y``. x, y: same shape, float32."""
    return alpha * x + y
