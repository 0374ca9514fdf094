"""Packaging with an optional ahead-of-time build of the native extension.

A plain ``pip install .`` / ``pip install -e .`` installs pure Python: the
extension ``avatar._C`` is built just in time on first use (see
``avatar/_native.py``). Set ``AVATAR_BUILD_EXT=1`` to build it ahead of time
with the same sources and flags; torch must then already be installed, so use
``pip install --no-build-isolation``.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ship cuda_ext/ inside the wheel (as avatar/_cuda_ext) for just-in-time builds."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "avatar" / "_cuda_ext"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "cuda_ext", target)


def native_extensions():
    if os.environ.get("AVATAR_BUILD_EXT") != "1":
        return [], {}
    sys.path.insert(0, str(ROOT))
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    from avatar import _native

    with_cuda = _native.cuda_wanted()
    blocker = _native.cuda_toolkit().blocker() if with_cuda else None
    if blocker:  # as the just-in-time build: CUDA trouble leaves the CPU kernels
        print(f"avatar: building avatar._C CPU-only: {blocker}", file=sys.stderr)
        with_cuda = False
    kw = _native.extension_kwargs(with_cuda, ROOT / "cuda_ext")
    cls = CUDAExtension if with_cuda else CppExtension
    ext = cls(
        name="avatar._C",
        sources=[os.path.relpath(s, ROOT) for s in kw["sources"]],
        include_dirs=kw["extra_include_paths"],
        extra_compile_args={"cxx": kw["extra_cflags"], "nvcc": kw["extra_cuda_cflags"]},
        extra_link_args=kw["extra_ldflags"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, ext_cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass})
