"""Build and load the native extension ``avatar._C`` (sources in ``cuda_ext/``).

One build description serves both paths:

- ahead of time: ``setup.py`` calls :func:`extension_kwargs` when
  ``AVATAR_BUILD_EXT=1`` and builds ``avatar._C`` next to the package;
- just in time: :func:`load` compiles the same sources on first use into
  ``<cache>/ext/<hash>/``, where the hash covers the sources, the flags, the torch
  and Python versions, whether CUDA is compiled and (then) the CUDA toolkit and
  arch list, so a changed kernel is rebuilt and an unchanged one is loaded from
  the cache in milliseconds. It also covers every absolute path ninja's build
  file records (the source folder, the environment's prefix, torch's and Python's
  include folders, the compiler), so two checkouts or two environments sharing
  one cache get a folder each instead of rebuilding each other's extension. A
  build holds an exclusive lock on ``<folder>.lock``: a second process waits for
  it, then loads the first one's build.

Two variants, each with its own cache key and module name: with CUDA
(``avatar_C_cuda``: the ``.cu`` kernels too, where torch has CUDA, a GPU is
present and nvcc is found) and CPU-only (``avatar_C``). A CUDA toolkit that cannot
work (nvcc's major version differs from ``torch.version.cuda``, headers missing)
or a failed CUDA build is reported once, with the reason, and the CPU-only
variant is built and loaded instead: CUDA trouble never takes the CPU kernels
down. The CUDA compiler flags are torch's own (``torch.utils.cpp_extension``
adds ``-D__CUDA_NO_HALF_CONVERSIONS__`` and friends) plus :data:`NVCC_FLAGS`;
``tests/test_cuda_compile.py`` compiles every translation unit with exactly the
build file torch writes.

Nothing here runs at ``import avatar``: the first call to :func:`load` builds.
``AVATAR_NO_NATIVE=1`` disables the extension (ops use their PyTorch
references); ``AVATAR_NO_CUDA_EXT=1`` builds the CPU-only variant. A failed build
is reported once, with the compiler's reason, and remembered in the cache so
later processes do not retry the same sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType

EXTENSION_NAME = "avatar_C"
CUDA_EXTENSION_NAME = "avatar_C_cuda"
# ATen's parallel_for is OpenMP inlined from its headers: without -fopenmp every
# native loop would run on one thread. libgomp resolves to the copy torch loaded.
CXX_FLAGS = ("-O3", "-std=c++17", "-fopenmp")
# No --use_fast_math: it swaps expf and division for approximations and flushes
# denormals, so CUDA results would drift from the CPU engine's and the references'
# (raster.cu is bit-exact with the CPU without it; see include/avatar/common.h).
# The kernels are memory bound; the approximations would buy nothing measurable.
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr")
LD_FLAGS = ("-fopenmp",)
_FAILURE_FILE = "build-failed.json"
_INFO_FILE = "build-info.json"

# Headers the CUDA variant compiles against: the CUDA runtime (the .cu files), and
# c10's stream and guard headers (the bindings; no ATen/cuda, which would need the
# cuBLAS/cuSPARSE/cuSOLVER headers). cuda_cmake_macros.h is generated into CUDA
# builds of torch only.
CUDA_TOOLKIT_HEADERS = ("cuda_runtime.h",)
TORCH_CUDA_HEADERS = ("c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h", "c10/cuda/impl/cuda_cmake_macros.h")


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
    path: str | None = None
    """The build folder (or module file) of the variant that is or will be loaded."""
    arch_list: tuple[str, ...] = ()
    """GPU targets the CUDA kernels were compiled for (``sm_86``; ``compute_90`` = PTX)."""
    cuda_error: str | None = None
    """Why the CUDA kernels are not (or will not be) built, where they were wanted."""

    @property
    def available(self) -> bool:
        return self.state in ("built", "buildable")


@dataclass(frozen=True)
class CudaToolkit:
    """What the CUDA variant would be compiled with (for ``avatar doctor`` and the build).

    torch_cuda: ``torch.version.cuda`` (None for a CPU-only torch); cuda_home: the
    toolkit folder torch's build uses (``CUDA_HOME``/``CUDA_PATH``, else nvcc on
    PATH, else ``/usr/local/cuda``); nvcc: its compiler, if present; nvcc_version:
    ``"12.8"`` from ``nvcc --version``; headers: each required header -> present.
    """

    torch_cuda: str | None
    cuda_home: str | None
    nvcc: str | None
    nvcc_version: str | None
    headers: dict[str, bool] = field(default_factory=dict)

    @property
    def compatible(self) -> bool:
        """Same major version, the rule torch's own extension build enforces."""
        if not self.torch_cuda or not self.nvcc_version:
            return False
        return self.torch_cuda.split(".")[0] == self.nvcc_version.split(".")[0]

    def blocker(self) -> str | None:
        """Why a CUDA build cannot succeed here, or None if nothing is known to stop it."""
        import torch

        if not self.torch_cuda:
            return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        if self.nvcc is None:
            return ("nvcc not found: install the CUDA toolkit " + self.torch_cuda.split(".")[0]
                    + ".x and set CUDA_HOME (or put its bin/ on PATH)")
        if self.nvcc_version is None:
            return f"could not read the version of {self.nvcc} (nvcc --version)"
        if not self.compatible:
            return (f"nvcc {self.nvcc_version} ({self.nvcc}) and torch's CUDA {self.torch_cuda} differ in major "
                    f"version, which torch's extension build rejects: install CUDA toolkit "
                    f"{self.torch_cuda.split('.')[0]}.x and point CUDA_HOME at it")
        missing = [h for h, ok in self.headers.items() if not ok]
        if missing:
            return (f"missing headers {', '.join(missing)}: the CUDA runtime headers come with the toolkit "
                    f"({self.cuda_home}/include), the c10/cuda ones with a CUDA build of torch")
        return None

    def summary(self) -> str:
        """One line: nvcc and torch CUDA versions, whether they fit, headers."""
        nvcc = f"nvcc {self.nvcc_version} ({self.nvcc})" if self.nvcc else "no nvcc"
        torch_cuda = f"torch CUDA {self.torch_cuda}" if self.torch_cuda else "CPU-only torch"
        fit = "compatible" if self.compatible else "not compatible"
        missing = [h for h, ok in self.headers.items() if not ok]
        headers = "headers present" if not missing else f"missing {', '.join(missing)}"
        return f"{nvcc}, {torch_cuda}: {fit}; {headers}"


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
    """Try the CUDA variant where torch has CUDA, a GPU is present and nvcc is found
    (whether that toolkit fits is :meth:`CudaToolkit.blocker`'s question)."""
    if os.environ.get("AVATAR_NO_CUDA_EXT") == "1":
        return False
    import torch
    from torch.utils import cpp_extension

    return bool(torch.version.cuda) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _cuda_home() -> str | None:
    """torch's toolkit folder; on a CPU-only torch (where torch leaves it None) the
    folder torch's own search would find, so that doctor can still report it."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        return str(cpp_extension.CUDA_HOME)
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        if nvcc is not None:
            home = str(Path(nvcc).parent.parent)
        elif Path("/usr/local/cuda").exists():
            home = "/usr/local/cuda"
    return home


@lru_cache(maxsize=8)
def _nvcc_version(nvcc: str) -> str | None:
    """``"12.8"`` from ``nvcc --version``, or None if it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_toolkit() -> CudaToolkit:
    """Inspect (without compiling) the toolkit the CUDA variant would be built with."""
    import torch
    from torch.utils import cpp_extension

    home = _cuda_home()
    nvcc = None
    if home is not None:
        candidate = Path(home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
        nvcc = str(candidate) if candidate.is_file() else None
    torch_include = Path(cpp_extension.include_paths()[0])
    headers = {h: home is not None and (Path(home) / "include" / h).is_file() for h in CUDA_TOOLKIT_HEADERS}
    headers.update({h: (torch_include / h).is_file() for h in TORCH_CUDA_HEADERS})
    return CudaToolkit(
        torch_cuda=torch.version.cuda,
        cuda_home=home,
        nvcc=nvcc,
        nvcc_version=_nvcc_version(nvcc) if nvcc else None,
        headers=headers,
    )


def _cuda_build_blocker() -> str | None:
    return cuda_toolkit().blocker()


def cuda_arch_list() -> tuple[str, ...]:
    """The GPU targets a CUDA build here compiles for: ``sm_XY`` (and ``compute_XY``
    for PTX), from ``TORCH_CUDA_ARCH_LIST`` or else the visible GPUs, as torch picks them."""
    from torch.utils import cpp_extension

    try:
        # Private, but it is exactly what torch passes to nvcc; read only.
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception:  # no GPU and no TORCH_CUDA_ARCH_LIST, or the private API changed
        flags = []
    targets = sorted({m.group(1) for f in flags for m in [re.search(r",code=(\w+)", f)] if m})
    if targets:
        return tuple(targets)
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    return tuple(a.strip() for a in re.split(r"[;\s]+", wanted) if a.strip())


def extension_name(with_cuda: bool) -> str:
    """Module name of a variant (distinct, so both can sit in one cache and process)."""
    return CUDA_EXTENSION_NAME if with_cuda else EXTENSION_NAME


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


def build_paths(root: Path | None = None) -> dict[str, str | None]:
    """The absolute paths that ninja's build file holds: where the sources are, the
    environment (``sys.prefix``: one per venv), torch's and Python's headers, the compiler.
    A folder built for other paths would be rebuilt by ninja, so each set gets its own."""
    import torch

    root = root or source_dir()
    return {
        "sources": str(root.resolve()) if root is not None else None,
        "prefix": sys.prefix,
        "torch": str(Path(torch.__file__).resolve().parent),
        "python_include": sysconfig.get_paths().get("include"),
        "cxx": os.environ.get("CXX", "c++"),
    }


def source_hash(with_cuda: bool) -> str:
    """A key over everything that changes the binary or the build file that makes it."""
    import torch

    root = source_dir()
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|cuda={with_cuda}".encode())
    digest.update(repr((CXX_FLAGS, NVCC_FLAGS, LD_FLAGS)).encode())
    digest.update(json.dumps(build_paths(root), sort_keys=True).encode())
    if with_cuda:  # another toolkit or arch list is another binary
        toolkit = cuda_toolkit()
        digest.update(f"{toolkit.cuda_home}|{toolkit.nvcc_version}|{cuda_arch_list()}".encode())
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
_cuda_error: str | None = None  # why the CUDA variant is not the one loaded, where it was wanted
_info: dict | None = None  # build-info of the loaded module


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


def _read_info(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold ``<folder>.lock`` exclusively (``flock``, waiting for a holder) for a build into
    ``folder``: two processes never compile into one folder at once. The kernel drops the
    lock of a process that dies. The lock file stays (removing it would let a waiter lock a
    file no one else sees). Without ``fcntl`` (not POSIX) builds are not serialised."""
    try:
        import fcntl

        fh = open(folder.parent / f"{folder.name}.lock", "a+b")  # closed by the with below
    except (ImportError, OSError):  # not POSIX, or a read-only cache (a finished build loads unlocked)
        yield
        return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            # torch's own build baton ('lock' in the folder) left by a build that was killed
            # would make every later build wait forever; under our lock no build is running.
            with contextlib.suppress(FileNotFoundError):
                (folder / "lock").unlink()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_variant(with_cuda: bool, verbose: bool) -> ModuleType:
    """Build (or load from the cache) one variant; NativeUnavailable says why not."""
    folder = build_dir(with_cuda)
    with build_lock(folder):
        return _build_variant_locked(with_cuda, verbose, folder)


def _build_variant_locked(with_cuda: bool, verbose: bool, folder: Path) -> ModuleType:
    global _info
    from torch.utils import cpp_extension

    key = source_hash(with_cuda)
    previous = _read_failure(folder, key)  # read under the lock: a build that just failed counts
    kind = "with CUDA" if with_cuda else "CPU-only"
    if previous is not None:
        raise NativeUnavailable(
            f"the native build ({kind}) failed earlier for these sources ({folder}): {previous}. "
            f"Fix the cause (or delete {folder / _FAILURE_FILE}) to retry."
        )
    missing = _compiler_missing()
    if missing:
        raise NativeUnavailable(missing)
    kwargs = extension_kwargs(with_cuda)
    try:
        module = cpp_extension.load(
            name=extension_name(with_cuda),
            build_directory=str(folder),
            with_cuda=with_cuda,
            is_python_module=True,
            verbose=verbose,
            **kwargs,
        )
    except Exception as exc:  # the compiler's reason is in the message
        reason = _last_lines(str(exc))
        (folder / _FAILURE_FILE).write_text(json.dumps({"sources": key, "reason": reason}))
        raise NativeUnavailable(f"building the native extension ({kind}) failed: {reason}") from exc
    info = {"with_cuda": with_cuda, "path": str(folder), "arch_list": list(cuda_arch_list()) if with_cuda else []}
    if _read_info(folder) != info:
        (folder / _INFO_FILE).write_text(json.dumps(info))
    _info = info
    return module


def _jit_build(verbose: bool) -> ModuleType:
    """The CUDA variant where wanted and possible, else (with one warning saying
    why) the CPU-only variant."""
    global _cuda_error
    if cuda_wanted():
        blocker = _cuda_build_blocker()
        if blocker is None:
            try:
                return _build_variant(True, verbose)
            except NativeUnavailable as exc:
                blocker = str(exc)
        _cuda_error = blocker
        warnings.warn(
            f"avatar: native CUDA kernels unavailable ({blocker}); using the CPU-only native extension, "
            "so CUDA tensors use the other engines (nvdiffrast, tiny-cuda-nn or the PyTorch references)",
            stacklevel=3,
        )
    return _build_variant(False, verbose)


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


def cuda_unavailable_reason() -> str | None:
    """Why the loaded (or cached) extension lacks the CUDA kernels, if known."""
    if _cuda_error is not None:
        return _cuda_error
    return status().cuda_error


def _cached(folder: Path, with_cuda: bool) -> bool:
    name = extension_name(with_cuda)
    return any(folder.glob(f"{name}*.so")) or any(folder.glob(f"{name}*.pyd"))


def status() -> NativeStatus:
    """Report without building: loaded/cached, buildable, failed or disabled, and
    for the CUDA variant what was built (arch list, folder) or why it was not."""
    if disabled():
        return NativeStatus("disabled", "AVATAR_NO_NATIVE=1 is set")
    if _module is not None:
        info = _info or {}
        with_cuda = bool(getattr(_module, "with_cuda", False))
        where = info.get("path") or getattr(_module, "__file__", None)
        kind = "with CUDA" if with_cuda else "CPU-only"
        return NativeStatus("built", f"loaded ({kind}) from {where}", with_cuda, where,
                            tuple(info.get("arch_list", ())), _cuda_error)
    if _error is not None:
        return NativeStatus("failed", _error, cuda_error=_cuda_error)
    spec = importlib.util.find_spec("avatar._C")
    if spec is not None:
        return NativeStatus("built", f"built ahead of time (avatar._C, {spec.origin})", path=spec.origin)
    if source_dir() is None:
        return NativeStatus("unbuildable", "cuda_ext sources are not shipped with this install")
    cuda_error = None
    if cuda_wanted():
        folder = build_dir(True)
        if _cached(folder, True):
            info = _read_info(folder) or {}
            return NativeStatus("built", f"cached (with CUDA) in {folder}", True, str(folder),
                                tuple(info.get("arch_list", ())))
        cuda_error = _cuda_build_blocker() or _read_failure(folder, source_hash(True))
        if cuda_error is None:
            missing = _compiler_missing()
            if missing:
                return NativeStatus("unbuildable", missing, True)
            return NativeStatus("buildable", f"will compile (with CUDA) on first use into {folder}", True,
                                str(folder), cuda_arch_list())
    folder = build_dir(False)
    failure = _read_failure(folder, source_hash(False))
    if failure is not None:
        return NativeStatus("failed", failure, False, str(folder), cuda_error=cuda_error)
    if _cached(folder, False):
        return NativeStatus("built", f"cached (CPU-only) in {folder}", False, str(folder), cuda_error=cuda_error)
    missing = _compiler_missing()
    if missing:
        return NativeStatus("unbuildable", missing, False, cuda_error=cuda_error)
    return NativeStatus("buildable", f"will compile (CPU-only) on first use into {folder}", False, str(folder),
                        cuda_error=cuda_error)
