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


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One ``avatar generate "an old sea captain" --guidance tiny --preset smoke --seed 0``
    run for the whole test session (the edit, export and CLI tests share it; it takes a few
    minutes). Returns ``(run folder, seconds it took)``. Tests must not write into it except
    through the commands that own their subfolders (edits/, export/)."""
    import time

    from typer.testing import CliRunner

    from avatar.cli import app

    out = tmp_path_factory.mktemp("smoke-out")
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["generate", "an old sea captain", "--guidance", "tiny", "--preset", "smoke",
                                      "--seed", "0", "--out", str(out)])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output + repr(result.exception)
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0], seconds
