"""Optimisation loops: ``generate`` (coarse NeRF -> fine DMTet by score distillation),
``edit`` (identity-aware editing of a finished avatar) and batches of prompts.

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
    "read_prompts": "batch",
    "run_prompts": "batch",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
