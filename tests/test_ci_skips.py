"""The rule of tests/conftest.py: in CI (``CI=true``) a skip fails, except for tests marked
``@pytest.mark.cuda``; outside CI a skip stays a skip. Run on small generated test files
with pytester, under this suite's own conftest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SKIPPING = '''
import pytest

needs_nothing = pytest.mark.skipif(True, reason="the extension did not build")


@pytest.fixture
def tool():
    pytest.skip("node is not installed")


def test_plain_skip():
    pytest.skip("no compiler")


@needs_nothing
def test_skipif():
    pass


def test_fixture_skip(tool):
    pass


def test_importorskip():
    pytest.importorskip("a_module_that_is_not_there")


@pytest.mark.cuda
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_cuda_only():
    pass


@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    assert False


def test_runs():
    pass
'''


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_skipping=SKIPPING)
    return pytester


def test_every_skip_fails_in_ci_but_a_cuda_marked_one(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("-p", "no:cacheprovider", "-rA")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped") == 1 and outcomes.get("passed") == 1 and outcomes.get("xfailed") == 1
    # Skips in the test body fail as failures, those in setup (skipif, fixtures) as errors.
    assert outcomes.get("failed") == 2 and outcomes.get("errors") == 2
    result.stdout.fnmatch_lines(["*test_plain_skip*skipped in CI (CI=true): no compiler*"])
    result.stdout.fnmatch_lines(["*test_fixture_skip*skipped in CI*node is not installed*"])
    result.stdout.fnmatch_lines(["*test_skipif*skipped in CI*the extension did not build*"])
    result.stdout.fnmatch_lines(["*test_importorskip*skipped in CI*a_module_that_is_not_there*"])
    result.stdout.fnmatch_lines(["SKIPPED*needs a CUDA device*"])
    assert result.ret != 0


def test_a_skipped_module_fails_collection_in_ci(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_module_skip='import pytest\npytest.importorskip("not_installed_anywhere")\n\n'
                                         'def test_never():\n    pass\n')
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped in CI*not_installed_anywhere*"])
    monkeypatch.delenv("CI")
    assert pytester.runpytest("-p", "no:cacheprovider").parseoutcomes() == {"skipped": 1}


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_a_skip_stays_a_skip(suite, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    outcomes = suite.runpytest("-p", "no:cacheprovider").parseoutcomes()
    assert outcomes == {"skipped": 5, "passed": 1, "xfailed": 1}
