"""Pick a head prior from a spec string: ``auto``, ``anny`` or ``flame:DIR``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from avatar.prior.errors import PriorError
from avatar.prior.head_model import HeadModel

FLAME_DIR_ENV = "AVATAR_FLAME_DIR"
SPEC_HELP = "'auto' (FLAME if $AVATAR_FLAME_DIR holds valid FLAME files, else anny), 'anny' or 'flame:DIR'"


def load_head_model(
    spec: str = "auto", *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> HeadModel:
    """Load a head prior.

    Args:
        spec: ``"anny"`` (default prior, always available), ``"flame:DIR"`` (FLAME
            files in DIR) or ``"auto"``: FLAME if ``$AVATAR_FLAME_DIR`` is set and
            holds valid FLAME files, else anny (with a warning naming why FLAME
            was skipped when the variable is set).
        dtype, device: where the model's tensors live.

    Raises:
        PriorError: unknown spec, or a FLAME folder that is missing files (the
            message lists the files found and expected) or holds the wrong kind.
    """
    if not isinstance(spec, str):
        raise PriorError(f"head model spec must be a string: {SPEC_HELP}; got {spec!r}")
    text = spec.strip()
    if text == "auto":
        flame_dir = os.environ.get(FLAME_DIR_ENV)
        if flame_dir:
            try:
                return _flame(flame_dir, dtype, device)
            except PriorError as exc:
                warnings.warn(f"${FLAME_DIR_ENV} is set but unusable, using the anny head: {exc}", stacklevel=2)
        return _anny(dtype, device)
    if text == "anny":
        return _anny(dtype, device)
    if text.startswith("flame:"):
        folder = text[len("flame:") :].strip()
        if not folder:
            raise PriorError(f"'flame:' needs a folder, e.g. flame:~/models/flame; valid specs: {SPEC_HELP}")
        return _flame(folder, dtype, device)
    if text == "flame":
        raise PriorError(f"'flame' needs its folder: flame:DIR; valid specs: {SPEC_HELP}")
    raise PriorError(f"unknown head model spec {spec!r}; valid specs: {SPEC_HELP}")


def _anny(dtype: torch.dtype, device) -> HeadModel:
    from avatar.prior.anny_head import load_anny_head

    return load_anny_head(dtype=dtype).to(device=device)


def _flame(folder: str | Path, dtype: torch.dtype, device) -> HeadModel:
    from avatar.prior.flame import load_flame

    return load_flame(Path(folder).expanduser(), dtype=dtype).to(device=device)
