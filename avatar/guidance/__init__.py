"""Diffusion guidance: model loading (hub, local, tiny), score distillation with a landmark
ControlNet, identity-aware editing score distillation (IESD), and the oracle.

Modules, lowest first: :mod:`.errors`, :mod:`.tiny` (random offline models),
:mod:`.models` (loading), :mod:`.memory` (GPU memory switches), :mod:`.prompts`
(view prompts, embedding cache, textual inversion), :mod:`.sds` (the SDS math, the image
encoders: SD's VAE and TAESD, and the text-to-image noise predictor), :mod:`.iesd`,
:mod:`.oracle`, :mod:`.factory` (build one from the config), and :mod:`.architectures`
(SD 1.5's architectures at random weights, for costing and timing a step). Importing this
package is cheap: torch and diffusers load when a name below is first used.
"""

from __future__ import annotations

from avatar._lazy import lazy_exports

_EXPORTS = {
    "GuidanceError": "errors",
    "WeightsUnavailableError": "errors",
    "make_guidance": "factory",
    "make_edit_guidance": "factory",
    "make_oracle_guidance": "factory",
    "ScoreDistillation": "sds",
    "SDSOutput": "sds",
    "TimestepSchedule": "sds",
    "load_diffusion_model": "models",
    "load_controlnet": "models",
    "load_tiny_autoencoder": "models",
    "local_cache_status": "models",
    "memory_options_report": "memory",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
