"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A private avatar cache that shares the user's compiled native extension, prior
    caches and tiny models (built there once if missing), so that tests of whole runs
    rebuild none of them (that takes minutes). Use with ``pytestmark = pytest.mark.usefixtures``."""
    from avatar.paths import cache_dir

    root = tmp_path_factory.mktemp("avatar-cache")
    for shared in ("ext", "prior", "tiny"):
        (root / shared).symlink_to(cache_dir(shared), target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("AVATAR_CACHE_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture
def one_thread():
    """Tiny runs gain nothing from threads, and on a shared 2-core machine OpenMP
    threads waiting on each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
