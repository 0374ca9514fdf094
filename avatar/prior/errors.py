"""The head prior's error type."""

from __future__ import annotations

from avatar.errors import AvatarError


class PriorError(AvatarError, ValueError):
    """A head model could not be loaded or was given bad parameters.

    The message names the cause (spec, file, parameter) and what was expected;
    the CLI prints it as one line. It is also a ``ValueError``, which is what a
    bad argument is.
    """
