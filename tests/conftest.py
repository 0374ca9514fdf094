"""Fixtures shared by the test modules, and the rule that nothing skips in CI.

In CI (the ``CI`` environment variable set, as CI services do: ``CI=true``) a skipped test
fails, whether it skipped through ``skipif``, ``pytest.skip`` in the test or in a fixture,
``importorskip`` or a skipped module: everything the install provides must run there, and a
skip would hide its failure. The one exception is a test marked ``@pytest.mark.cuda``, whose
running depends on a CUDA device being present (or absent), which CI machines may lack.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA_MARKER = "cuda"


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to anything but an empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{CUDA_MARKER}: runs or skips by whether a CUDA device is present; the only skip allowed in CI (CI=true)")


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip_in_ci(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{what} skipped in CI (CI={os.environ.get('CI')}): {_skip_reason(report.longrepr)}. Everything the "
        f"install provides must run in CI: fix the install, or mark a test that needs a CUDA device with "
        f"@pytest.mark.{CUDA_MARKER}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip in setup (skipif, a fixture's pytest.skip) or in the test fails in CI."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and in_ci()
            and item.get_closest_marker(CUDA_MARKER) is None):
        _fail_skip_in_ci(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped while collected (module-level importorskip or pytest.skip) fails in CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        marked = any(m.name == CUDA_MARKER for m in getattr(collector, "own_markers", ()))
        if not marked:
            _fail_skip_in_ci(report, f"{collector.nodeid} (collection)")


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
