"""``avatar doctor`` on the CUDA kernels: what will happen before a build, what was built
after, with nvcc and torch's CUDA version checked against each other (same major, the
rule of torch's own extension build) and the headers the build needs looked up.

A CUDA machine is simulated: torch's CUDA version, a device, and a toolkit folder with
a stand-in ``nvcc`` that prints a chosen version.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from avatar import _native, doctor


def fake_toolkit(root: Path, version: str, runtime_header: bool = True) -> Path:
    home = root / f"cuda-{version}"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.0'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    if runtime_header:
        (home / "include" / "cuda_runtime.h").write_text("")
    return home


def fake_torch_include(root: Path, generated_macros: bool = True) -> Path:
    include = root / "torch-include"
    for header in _native.TORCH_CUDA_HEADERS:
        if header.endswith("cuda_cmake_macros.h") and not generated_macros:
            continue
        (include / header).parent.mkdir(parents=True, exist_ok=True)
        (include / header).write_text("")
    return include


@pytest.fixture
def cuda_machine(tmp_path, monkeypatch):
    """Returns set_up(torch_cuda, nvcc_version, **headers) making this process look
    like a machine with one GPU, that torch CUDA version and that toolkit."""
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    monkeypatch.delenv("AVATAR_NO_CUDA_EXT", raising=False)
    monkeypatch.delenv("AVATAR_NO_NATIVE", raising=False)
    for name in ("_module", "_error", "_cuda_error", "_info"):
        monkeypatch.setattr(_native, name, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def set_up(torch_cuda: str | None, nvcc_version: str, runtime_header: bool = True, macros: bool = True):
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
        home = fake_toolkit(tmp_path, nvcc_version, runtime_header)
        include = fake_torch_include(tmp_path, macros)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
        monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: [str(include)])
        return home

    return set_up


def native_cuda() -> dict:
    entry = doctor._engines(build=False)["native_cuda"]
    json.dumps(entry)  # what --json prints
    return entry


def test_compatible_toolkit_will_build_with_cuda(cuda_machine):
    home = cuda_machine("12.8", "12.4")
    entry = native_cuda()
    assert entry["state"] == "will_build" and entry["available"] is True
    assert entry["toolkit"]["nvcc"] == str(home / "bin" / "nvcc")
    assert entry["toolkit"]["nvcc_version"] == "12.4" and entry["toolkit"]["torch_cuda"] == "12.8"
    assert entry["toolkit"]["compatible"] is True and all(entry["toolkit"]["headers"].values())
    assert entry["build"] is None
    reason = entry["reason"]
    assert "not built yet" in reason and "sm_86" in reason and "nvcc 12.4" in reason and "torch CUDA 12.8" in reason


def test_major_version_mismatch_is_reported_before_any_build(cuda_machine):
    cuda_machine("12.8", "13.0")
    entry = native_cuda()
    assert entry["available"] is False and entry["state"] == "unavailable"
    assert entry["toolkit"]["compatible"] is False
    assert "nvcc 13.0" in entry["reason"] and "12.8" in entry["reason"] and "major" in entry["reason"]
    assert "CUDA toolkit 12.x" in entry["reason"]  # the fix


@pytest.mark.parametrize("missing", ["cuda_runtime.h", "c10/cuda/impl/cuda_cmake_macros.h"])
def test_missing_headers_are_named(cuda_machine, missing):
    if missing == "cuda_runtime.h":
        cuda_machine("12.8", "12.8", runtime_header=False)
    else:
        cuda_machine("12.8", "12.8", macros=False)
    entry = native_cuda()
    assert entry["available"] is False and entry["toolkit"]["headers"][missing] is False
    assert missing in entry["reason"]


def test_what_was_built_is_reported(cuda_machine, monkeypatch, tmp_path):
    cuda_machine("12.8", "12.8")
    built = _native.NativeStatus("built", "loaded", True, str(tmp_path / "ext"), ("sm_80", "sm_86"))
    monkeypatch.setattr(_native, "status", lambda: built)
    entry = native_cuda()
    assert entry["available"] is True and entry["state"] == "built"
    assert entry["build"] == {"with_cuda": True, "arch_list": ["sm_80", "sm_86"], "path": str(tmp_path / "ext")}
    assert "built with CUDA for sm_80, sm_86" in entry["reason"] and str(tmp_path / "ext") in entry["reason"]


def test_cpu_only_build_after_a_cuda_failure_says_why(cuda_machine, monkeypatch, tmp_path):
    cuda_machine("12.8", "12.8")
    built = _native.NativeStatus("built", "loaded", False, str(tmp_path / "cpu"),
                                 cuda_error="building the native extension (with CUDA) failed: hashgrid.h(130): error")
    monkeypatch.setattr(_native, "status", lambda: built)
    entry = native_cuda()
    assert entry["available"] is False and entry["state"] == "cpu_only"
    assert entry["build"]["with_cuda"] is False
    assert "built CPU-only" in entry["reason"] and "hashgrid.h(130): error" in entry["reason"]


def test_cpu_only_torch(cuda_machine):
    cuda_machine(None, "12.8")
    entry = native_cuda()
    assert entry["available"] is False and "CPU-only build" in entry["reason"]
    assert entry["toolkit"]["torch_cuda"] is None and entry["toolkit"]["nvcc_version"] == "12.8"


def test_no_device(cuda_machine, monkeypatch):
    cuda_machine("12.8", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    entry = native_cuda()
    assert entry["available"] is False and entry["state"] == "no_device"
    assert "nvcc 12.8" in entry["reason"]  # the toolkit is still reported
