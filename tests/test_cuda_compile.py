"""Every CUDA translation unit compiles with plain ``nvcc -c``.

The ``.cu`` files depend only on the CUDA runtime and ``cuda_ext/include``, so
they can be checked on machines without a GPU; skipped only where nvcc is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cuda_ext"
CU_FILES = sorted((ROOT / "src").glob("*.cu"))


def test_there_are_cuda_sources():
    assert CU_FILES, "cuda_ext/src has no .cu files"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source: Path, tmp_path: Path):
    cmd = [
        "nvcc", "-c", "-std=c++17", "-O2", "--expt-relaxed-constexpr", "-DAVATAR_WITH_CUDA",
        "-I", str(ROOT / "include"), str(source), "-o", str(tmp_path / (source.stem + ".o")),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
