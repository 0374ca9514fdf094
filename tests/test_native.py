"""The native extension builds on first use, runs, and can be switched off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from avatar import _native
from avatar.ops import reference
from avatar.ops.elementwise import axpy
from avatar.ops.engine import EngineError, resolve_engine


def test_import_avatar_does_not_build_or_import_torch():
    code = "import sys, avatar, avatar.cli, avatar.config; print('torch' in sys.modules, 'avatar._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_native_axpy_builds_and_matches_reference():
    _native.load()  # builds on first use (cached by source hash)
    assert _native.status().state == "built"
    x = torch.randn(100_003, requires_grad=True)
    y = torch.randn(100_003, requires_grad=True)
    out = axpy(x, y, 2.5, engine="native")
    torch.testing.assert_close(out, reference.axpy(x, y, 2.5), rtol=1e-6, atol=0)
    out.sum().backward()
    assert torch.all(x.grad == 2.5) and torch.all(y.grad == 1.0)
    assert axpy(torch.empty(0), torch.empty(0), 1.0, engine="native").numel() == 0


def test_native_checks_inputs_at_the_door():
    _native.load()
    with pytest.raises(RuntimeError, match="must have dtype"):
        torch.ops.avatar.axpy(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.avatar.axpy(torch.zeros(4, 4).t(), torch.zeros(4, 4), 1.0)
    with pytest.raises(ValueError, match="one shape"):
        axpy(torch.zeros(3), torch.zeros(4), 1.0)


def test_engine_selection_errors_name_the_fix():
    with pytest.raises(EngineError, match="unknown engine 'fast'"):
        resolve_engine("axpy", "fast", "cpu")
    with pytest.raises(EngineError, match="does not implement"):
        resolve_engine("axpy", "nvdiffrast", "cpu", gpu_engines=())
    with pytest.raises(EngineError, match="pip install"):
        resolve_engine("rasterize", "nvdiffrast", "cpu", gpu_engines=("nvdiffrast",))
    assert resolve_engine("axpy", "torch", "cpu") == "torch"


def test_no_native_env_falls_back_to_reference():
    code = (
        "import torch, warnings\n"
        "from avatar import _native\n"
        "from avatar.ops.elementwise import axpy\n"
        "from avatar.ops.engine import resolve_engine, EngineError\n"
        "assert _native.status().state == 'disabled'\n"
        "assert resolve_engine('axpy', 'auto', 'cpu') == 'torch'\n"
        "x = torch.ones(3)\n"
        "assert torch.equal(axpy(x, x, 2.0), torch.full((3,), 3.0))\n"
        "try:\n"
        "    resolve_engine('axpy', 'native', 'cpu')\n"
        "except EngineError as e:\n"
        "    print('refused:', e)\n"
        "import sys; print('compiled' if 'avatar_C' in sys.modules or 'avatar._C' in sys.modules else 'not compiled')\n"
    )
    env = {**os.environ, "AVATAR_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "refused: native engine unavailable for axpy: disabled by AVATAR_NO_NATIVE=1" in out.stdout
    assert "not compiled" in out.stdout


def test_failed_build_is_reported_once_with_reason(tmp_path):
    # A broken source tree in a scratch folder: the build fails, the reason names the
    # compiler error, the failure is remembered, and neither a second call nor a second
    # process runs the build again (the build function is counted, not timed).
    src = tmp_path / "cuda_ext"

    shutil.copytree(_native.source_dir() / "include", src / "include")
    (src / "src").mkdir()
    (src / "src" / "broken.cpp").write_text("#include <ATen/ATen.h>\nint broken( { return 0; }\n")
    code = (
        "import warnings\n"
        "from pathlib import Path\n"
        "from torch.utils import cpp_extension\n"
        "from avatar import _native\n"
        f"_native.source_dir = lambda: Path({str(src)!r})\n"
        "builds, real_load = [], cpp_extension.load\n"
        "def counted_load(*args, **kwargs):\n"
        "    builds.append(1)\n"
        "    return real_load(*args, **kwargs)\n"
        "cpp_extension.load = counted_load\n"
        "for attempt in ('first', 'second'):\n"
        "    try:\n"
        "        _native.load()\n"
        "    except _native.NativeUnavailable as e:\n"
        "        print(f'{attempt}:', 'broken.cpp' in str(e), 'builds', len(builds))\n"
        "print('status:', _native.status().state)\n"
    )
    env = {**os.environ, "AVATAR_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("AVATAR_EXT_BUILD_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "first: True builds 1" in lines and "second: True builds 1" in lines, out.stdout
    assert "status: failed" in lines
    # Another process finds the recorded failure and does not compile these sources again.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "first: True builds 0" in out.stdout.splitlines(), out.stdout


def test_failed_cuda_build_falls_back_to_the_cpu_kernels(tmp_path):
    # A CUDA build that fails (a stand-in nvcc rejects every .cu file) is reported once
    # with the compiler's reason and remembered under the CUDA variant's own cache key;
    # the CPU-only variant is then built and loaded: CUDA trouble never takes the CPU
    # kernels down. A second process goes straight to the cached CPU-only build.
    src = tmp_path / "cuda_ext"
    (src / "include").mkdir(parents=True)
    (src / "src").mkdir()
    (src / "src" / "module.cpp").write_text(  # a minimal extension module: compiles in a second
        "#include <Python.h>\n"
        "#define STR2(x) #x\n#define STR(x) STR2(x)\n#define CAT2(a, b) a##b\n#define CAT(a, b) CAT2(a, b)\n"
        "static PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};\n"
        "PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }\n"
    )
    (src / "src" / "kernel.cu").write_text("__global__ void kernel() {}\n")
    home = tmp_path / "toolkit"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    calls = tmp_path / "nvcc-calls"
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--version*) echo "Cuda compilation tools, release 12.8, V12.8.93"; exit 0;; esac\n'
        f'echo "$@" >> {calls}\n'
        'echo "kernel.cu(1): error: the stand-in nvcc rejects this file" >&2\n'
        "exit 1\n"
    )
    nvcc.chmod(0o755)
    code = (
        "import warnings\n"
        "from pathlib import Path\n"
        "from torch.utils import cpp_extension\n"
        "from avatar import _native\n"
        f"_native.source_dir = lambda: Path({str(src)!r})\n"
        "_native.cuda_wanted = lambda: True\n"
        "_native._cuda_build_blocker = lambda: None  # the toolkit passes; its compiler fails\n"
        f"cpp_extension.CUDA_HOME = {str(home)!r}\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    module = _native.load()\n"
        "    _native.load()\n"
        "ours = [str(w.message) for w in caught if str(w.message).startswith('avatar:')]\n"
        "print('module:', module.__name__)\n"
        "print('warnings:', len(ours), 'reason:', 'stand-in nvcc rejects' in ours[0])\n"
        "st = _native.status()\n"
        "print('status:', st.state, st.with_cuda, 'stand-in nvcc rejects' in (st.cuda_error or ''))\n"
        "print('recorded:', (_native.build_dir(True) / 'build-failed.json').is_file())\n"
    )
    env = {**os.environ, "AVATAR_CACHE_DIR": str(tmp_path / "cache"), "TORCH_CUDA_ARCH_LIST": "8.0"}
    env.pop("AVATAR_EXT_BUILD_DIR", None)
    env.pop("AVATAR_NO_CUDA_EXT", None)
    for attempt in ("first", "second"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert "module: avatar_C" in lines, (attempt, out.stdout)
        assert "warnings: 1 reason: True" in lines, (attempt, out.stdout, out.stderr)
        assert "status: built False True" in lines and "recorded: True" in lines, (attempt, out.stdout)
        assert len(calls.read_text().splitlines()) == 1, attempt  # nvcc ran in the first process only


def test_native_on_cuda_without_cuda_kernels_says_why(monkeypatch):
    import types

    monkeypatch.setattr(_native, "load", lambda: types.SimpleNamespace(with_cuda=False))
    monkeypatch.setattr(_native, "cuda_unavailable_reason", lambda: "nvcc 13.0 and torch's CUDA 12.8 differ")
    with pytest.raises(EngineError, match=r"without CUDA kernels \(nvcc 13.0 and torch's CUDA 12.8 differ\)"):
        resolve_engine("axpy", "native", "cuda")
