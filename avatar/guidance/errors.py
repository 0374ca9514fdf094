"""Errors of the guidance package: each names the cause and the fix."""

from __future__ import annotations

from avatar.errors import AvatarError


class GuidanceError(AvatarError, RuntimeError):
    """A guidance model cannot be built as asked (bad spec, missing option, wrong inputs)."""


class WeightsUnavailableError(GuidanceError):
    """Diffusion weights are neither in a local folder nor in the Hugging Face cache, and cannot be downloaded."""
