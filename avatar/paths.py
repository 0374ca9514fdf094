"""Where avatar keeps things on disk: the user cache and the default outputs root.

Both honour environment variables so tests and CI can redirect them:
``AVATAR_CACHE_DIR`` (default ``$XDG_CACHE_HOME/avatar`` or ``~/.cache/avatar``) and
``AVATAR_OUTPUTS`` (default ``./outputs``).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the avatar user cache."""
    root = os.environ.get("AVATAR_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "avatar"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def outputs_root() -> Path:
    """The default parent folder of run folders (not created here)."""
    return Path(os.environ.get("AVATAR_OUTPUTS", "outputs")).expanduser()
