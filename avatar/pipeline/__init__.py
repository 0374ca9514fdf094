"""Optimisation loops: ``generate`` (coarse NeRF -> fine DMTet by score distillation) and
batches of prompts.

Importing this package is cheap; torch and the fields load with the modules below.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerateError": "generate",
    "run_generate": "generate",
    "load_final_mesh": "generate",
    "validate_config": "generate",
    "read_prompts": "batch",
    "run_prompts": "batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
