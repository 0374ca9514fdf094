"""The native build cache: one folder per set of paths ninja records, one build at a time.

No compiler runs here: the build function (``cpp_extension.load``) is replaced by a
fake that writes a stand-in module file, so these tests take seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from avatar import _native


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AVATAR_EXT_BUILD_DIR", raising=False)
    return tmp_path / "cache"


def _checkout(where: Path) -> Path:
    """A copy of the extension's sources: same bytes, another absolute path."""
    src = where / "cuda_ext"
    shutil.copytree(_native.source_dir(), src, ignore=shutil.ignore_patterns("build", "*.so"))
    return src


def test_two_checkouts_get_two_build_folders(tmp_path, cache, monkeypatch):
    # ninja's build file holds absolute paths: two checkouts sharing one folder would
    # rebuild each other's extension on every switch.
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    monkeypatch.setattr(_native, "source_dir", lambda: a)
    folder_a = _native.build_dir(False)
    assert _native.build_dir(False) == folder_a  # stable for one checkout
    monkeypatch.setattr(_native, "source_dir", lambda: b)
    folder_b = _native.build_dir(False)
    assert folder_a != folder_b and folder_a.parent == folder_b.parent == cache / "ext"
    assert _native.build_paths(b)["sources"] == str(b.resolve())


def test_two_environments_get_two_build_folders(cache, monkeypatch):
    # Another venv (sys.prefix) or another torch install is another build file too.
    first = _native.source_hash(False)
    monkeypatch.setattr(sys, "prefix", "/opt/other-venv")
    assert _native.source_hash(False) != first
    monkeypatch.undo()
    assert _native.source_hash(False) == first
    monkeypatch.setenv("CXX", "clang++")
    assert _native.source_hash(False) != first


RACER = r"""
import os, sys, time, types
from pathlib import Path
from torch.utils import cpp_extension
from avatar import _native

log, ready = Path(sys.argv[1]), Path(sys.argv[2])
_native._compiler_missing = lambda: None


def fake_load(name, build_directory, **kwargs):
    # ninja's behaviour, faked: build the module file if missing, else just load it.
    folder = Path(build_directory)
    module_file, building = folder / f"{name}.so", folder / "building"
    if module_file.exists():
        event = "loaded"
    else:
        try:
            os.close(os.open(building, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            event = "overlap"  # another process is compiling into this folder right now
        else:
            time.sleep(0.5)
            module_file.write_bytes(b"fake")
            building.unlink()
            event = "built"
    with open(log, "a") as fh:
        fh.write(event + "\n")
    return types.ModuleType(name)


cpp_extension.load = fake_load
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 2:  # start both builds at once
    time.sleep(0.005)
_native._build_variant(False, False)
"""


def test_concurrent_builds_into_one_folder_are_serialised(tmp_path):
    log, ready = tmp_path / "log", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "AVATAR_EXT_BUILD_DIR": str(tmp_path / "build")}
    env.pop("AVATAR_NO_NATIVE", None)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(log), str(ready)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    # The second waited for the first's lock, then loaded its build.
    assert sorted(log.read_text().split()) == ["built", "loaded"]
    assert (tmp_path / "build" / "cpu.lock").is_file()


def test_a_killed_builds_baton_does_not_block_the_next_build(tmp_path, monkeypatch):
    # torch waits forever on the 'lock' file a killed build left in the folder; under our
    # lock no build is running, so it is stale and removed.
    from torch.utils import cpp_extension

    monkeypatch.setenv("AVATAR_EXT_BUILD_DIR", str(tmp_path / "build"))
    folder = _native.build_dir(False)
    (folder / "lock").write_text("")
    seen = []

    def fake_load(name, build_directory, **kwargs):
        seen.append((Path(build_directory) / "lock").exists())
        return types.ModuleType(name)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_native, "_compiler_missing", lambda: None)
    _native._build_variant(False, False)
    assert seen == [False]
