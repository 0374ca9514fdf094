"""Optimisation loops: ``generate`` (coarse NeRF -> fine DMTet by score distillation),
``edit`` (identity-aware editing of a finished avatar), ``import`` and a list of prompts
(``generate --prompts``). ``avatar batch`` drives these from above: :mod:`avatar.batch`.

Importing this package is cheap; torch and the fields load with the modules below.
"""

from __future__ import annotations

from avatar._lazy import lazy_exports

_EXPORTS = {
    "GenerateError": "generate",
    "run_generate": "generate",
    "load_final_mesh": "generate",
    "validate_config": "generate",
    "load_avatar": "artifact",
    "LoadedAvatar": "artifact",
    "ArtifactError": "artifact",
    "EditError": "edit",
    "run_edit": "edit",
    "validate_edit": "edit",
    "read_prompts": "prompts",
    "run_prompts": "prompts",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
