"""Pure-PyTorch references of the native ops, with the same signatures.

Used by the tests as the ground truth and as the fallback engine. Each op's
reference lives in its own module; this package re-exports them.
"""

from avatar.ops.reference.elementwise import axpy

__all__ = ["axpy"]
