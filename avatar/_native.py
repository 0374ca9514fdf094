"""Build and load the native extension ``avatar._C`` (sources in ``cuda_ext/``).

One build description serves both paths:

- ahead of time: ``setup.py`` calls :func:`extension_kwargs` when
  ``AVATAR_BUILD_EXT=1`` and builds ``avatar._C`` next to the package;
- just in time: :func:`load` compiles the same sources on first use into
  ``<cache>/ext/<hash>/``, where the hash covers the sources, the torch and
  Python versions and whether CUDA is compiled, so a changed kernel is rebuilt
  and an unchanged one is loaded from the cache in milliseconds.

Nothing here runs at ``import avatar``: the first call to :func:`load` builds.
``AVATAR_NO_NATIVE=1`` disables the extension (ops use their PyTorch
references). A failed build is reported once, with the compiler's reason, and
remembered in the cache so later processes do not retry the same sources.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

EXTENSION_NAME = "avatar_C"
# ATen's parallel_for is OpenMP inlined from its headers: without -fopenmp every
# native loop would run on one thread. libgomp resolves to the copy torch loaded.
CXX_FLAGS = ("-O3", "-std=c++17", "-fopenmp")
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr")
LD_FLAGS = ("-fopenmp",)
_FAILURE_FILE = "build-failed.json"


class NativeUnavailable(RuntimeError):
    """The native extension is disabled or could not be built."""


@dataclass(frozen=True)
class NativeStatus:
    """What the native engine can do on this machine (for ``avatar doctor``).

    state: ``built`` (loaded or in the cache), ``buildable`` (compiler present,
    not built yet), ``failed`` (last build of these sources failed),
    ``disabled`` (``AVATAR_NO_NATIVE=1``) or ``unbuildable`` (no compiler/sources).
    """

    state: str
    reason: str
    with_cuda: bool = False

    @property
    def available(self) -> bool:
        return self.state in ("built", "buildable")


def source_dir() -> Path | None:
    """The ``cuda_ext`` folder: beside the package in a checkout, inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "cuda_ext", here / "_cuda_ext"):
        if (candidate / "src").is_dir():
            return candidate
    return None


def sources(with_cuda: bool, root: Path | None = None) -> list[Path]:
    """C++ translation units, plus the ``.cu`` ones when compiling for CUDA."""
    root = root or source_dir()
    if root is None:
        return []
    files = sorted((root / "src").glob("*.cpp"))
    if with_cuda:
        files += sorted((root / "src").glob("*.cu"))
    return files


def cuda_wanted() -> bool:
    """Compile the ``.cu`` files only where torch has CUDA and nvcc is present."""
    if os.environ.get("AVATAR_NO_CUDA_EXT") == "1":
        return False
    import torch
    from torch.utils import cpp_extension

    return bool(torch.version.cuda) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def extension_kwargs(with_cuda: bool, root: Path | None = None) -> dict:
    """Compiler flags shared by ``setup.py`` and the just-in-time build."""
    root = root or source_dir()
    assert root is not None, "cuda_ext sources not found"
    cxx, nvcc = list(CXX_FLAGS), list(NVCC_FLAGS)
    if with_cuda:
        cxx.append("-DAVATAR_WITH_CUDA")
        nvcc.append("-DAVATAR_WITH_CUDA")
    return {
        "sources": [str(p) for p in sources(with_cuda, root)],
        "extra_include_paths": [str(root / "include")],
        "extra_cflags": cxx,
        "extra_cuda_cflags": nvcc,
        "extra_ldflags": list(LD_FLAGS),
    }


def source_hash(with_cuda: bool) -> str:
    """A key over everything that changes the binary."""
    import torch

    root = source_dir()
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|cuda={with_cuda}".encode())
    digest.update(repr((CXX_FLAGS, NVCC_FLAGS, LD_FLAGS)).encode())
    if root is not None:
        for path in sorted((root / "include").rglob("*")) + sources(True, root):
            if path.is_file():
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_dir(with_cuda: bool) -> Path:
    """``<cache>/ext/<hash>``; ``AVATAR_EXT_BUILD_DIR`` pins one folder instead, so
    kernel developers get ninja's incremental rebuilds."""
    pinned = os.environ.get("AVATAR_EXT_BUILD_DIR")
    if pinned:
        folder = Path(pinned).expanduser() / ("cuda" if with_cuda else "cpu")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    from avatar.paths import cache_dir

    return cache_dir("ext", source_hash(with_cuda))


_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ('{cxx}' not on PATH): install g++ (apt-get install g++)"
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed: pip install ninja"
    return None


def _read_failure(folder: Path, key: str) -> str | None:
    """The recorded reason if the build of exactly these sources (``key``) failed."""
    path = folder / _FAILURE_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (ValueError, OSError):
            return None
        if record.get("sources") == key:
            return str(record.get("reason", "unknown"))
    return None


def _ahead_of_time() -> ModuleType | None:
    try:
        return importlib.import_module("avatar._C")
    except ImportError:
        return None


def _jit_build(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    with_cuda = cuda_wanted()
    folder = build_dir(with_cuda)
    key = source_hash(with_cuda)
    previous = _read_failure(folder, key)
    if previous is not None:
        raise NativeUnavailable(
            f"native build failed earlier for these sources ({folder}): {previous}. "
            f"Fix the cause (or delete {folder / _FAILURE_FILE}) to retry."
        )
    missing = _compiler_missing()
    if missing:
        raise NativeUnavailable(missing)
    kwargs = extension_kwargs(with_cuda)
    try:
        return cpp_extension.load(
            name=EXTENSION_NAME,
            build_directory=str(folder),
            with_cuda=with_cuda,
            is_python_module=True,
            verbose=verbose,
            **kwargs,
        )
    except Exception as exc:  # the compiler's reason is in the message
        reason = _last_lines(str(exc))
        (folder / _FAILURE_FILE).write_text(json.dumps({"sources": key, "reason": reason}))
        raise NativeUnavailable(f"building the native extension failed: {reason}") from exc


def _last_lines(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:]) if lines else "unknown error"


def disabled() -> bool:
    return os.environ.get("AVATAR_NO_NATIVE", "") not in ("", "0")


def load(verbose: bool = False) -> ModuleType:
    """Return the loaded extension, building it on first use.

    Raises :class:`NativeUnavailable` (with the reason) when it is disabled or
    cannot be built; the reason is also reported once as a warning.
    """
    global _module, _error
    if disabled():
        raise NativeUnavailable("disabled by AVATAR_NO_NATIVE=1")
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise NativeUnavailable(_error)
        module = _ahead_of_time()
        if module is None:
            try:
                module = _jit_build(verbose)
            except NativeUnavailable as exc:
                _error = str(exc)
                warnings.warn(f"avatar: native ops unavailable, using PyTorch references ({_error})", stacklevel=2)
                raise
        _module = module
        return module


def available() -> bool:
    """True if :func:`load` succeeds (building if needed)."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def status() -> NativeStatus:
    """Report without building: loaded/cached, buildable, failed or disabled."""
    if disabled():
        return NativeStatus("disabled", "AVATAR_NO_NATIVE=1 is set")
    if _module is not None:
        return NativeStatus("built", "loaded", bool(getattr(_module, "with_cuda", False)))
    if _error is not None:
        return NativeStatus("failed", _error)
    if importlib.util.find_spec("avatar._C") is not None:
        return NativeStatus("built", "built ahead of time (avatar._C)")
    if source_dir() is None:
        return NativeStatus("unbuildable", "cuda_ext sources are not shipped with this install")
    with_cuda = cuda_wanted()
    folder = build_dir(with_cuda)
    failure = _read_failure(folder, source_hash(with_cuda))
    if failure is not None:
        return NativeStatus("failed", failure, with_cuda)
    if any(folder.glob(f"{EXTENSION_NAME}*.so")) or any(folder.glob(f"{EXTENSION_NAME}*.pyd")):
        return NativeStatus("built", f"cached in {folder}", with_cuda)
    missing = _compiler_missing()
    if missing:
        return NativeStatus("unbuildable", missing, with_cuda)
    return NativeStatus("buildable", f"will compile on first use into {folder}", with_cuda)
