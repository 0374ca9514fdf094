"""Head priors behind one interface: the anny head (default), FLAME, LBS, landmarks, SDF.

``load_head_model(spec)`` returns a :class:`HeadModel`; every stage and the
exporter see only that interface (docs/DESIGN.md, "Head prior"). Importing
this package loads torch and numpy only: anny's assets, FLAME files, scipy and
trimesh are read when a model is loaded or used.
"""

from avatar.prior.errors import PriorError
from avatar.prior.head_model import FRAME_DESCRIPTION, HeadModel, HeadState
from avatar.prior.landmarks import ARKIT_BLENDSHAPE_NAMES, CLOSED_CONTOURS, CONTOUR_NAMES
from avatar.prior.load import load_head_model

__all__ = [
    "ARKIT_BLENDSHAPE_NAMES",
    "CLOSED_CONTOURS",
    "CONTOUR_NAMES",
    "FRAME_DESCRIPTION",
    "HeadModel",
    "HeadState",
    "PriorError",
    "load_head_model",
    "show_prior",
]


def show_prior(spec: str, out_dir, size: int = 512, control: bool = False) -> dict:
    """Write ``prior.obj``, ``landmarks.png`` and ``prior.json`` into ``out_dir``; see :mod:`avatar.prior.show`."""
    from avatar.prior.show import show_prior as _show_prior

    return _show_prior(spec, out_dir, size=size, control=control)
