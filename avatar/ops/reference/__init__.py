"""Pure-PyTorch references of the native ops, with the same signatures.

Used by the tests as the ground truth and as the fallback engine. Each op's
reference lives in its own module; this package re-exports them.
"""

from avatar.ops.reference.compositing import composite_rays, march_rays
from avatar.ops.reference.elementwise import axpy
from avatar.ops.reference.hashgrid import hash_grid_encode
from avatar.ops.reference.raster import antialias, interpolate, rasterize

__all__ = ["antialias", "axpy", "composite_rays", "hash_grid_encode", "interpolate", "march_rays", "rasterize"]
