"""The CUDA build compiles, with exactly the flags of the just-in-time build.

``torch.utils.cpp_extension`` writes the real ``build.ninja`` of our extension
(``with_cuda=True``, :func:`avatar._native.extension_kwargs`, TORCH_CUDA_ARCH_LIST
= 8.0;8.6;9.0 since no GPU is asked) and ninja compiles every object target: the
``.cu`` kernels and the ``.cpp`` bindings with ``-DAVATAR_WITH_CUDA``. Only the
link is left out (a CPU-only torch has no libc10_cuda). So torch's own nvcc flags
(``-D__CUDA_NO_HALF_CONVERSIONS__`` and friends) apply, and the bindings compile
against a toolkit that has nvcc and the CUDA runtime headers only (no cuBLAS,
cuSPARSE or cuSOLVER headers: the bindings use c10/cuda, not ATen/cuda).

Without a GPU this also checks, from source and PTX: every CUDA entry point takes
a device guard before it takes the stream, and the rasteriser's kernels contain
no fused or contractible multiply-adds (their output is bit-exact with the CPU's).

Needs nvcc (CUDA_HOME, or a toolkit under /usr/local/cuda*): skipped without one,
except in CI (CI=true), where a missing toolkit fails.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from avatar import _native

ROOT = Path(__file__).resolve().parents[1] / "cuda_ext"
CU_FILES = sorted((ROOT / "src").glob("*.cu"))
CPP_FILES = sorted((ROOT / "src").glob("*.cpp"))
ARCH_LIST = "8.0;8.6;9.0"
EXTENSION = "avatar_C_compile_check"


def test_there_are_cuda_sources():
    assert CU_FILES, "cuda_ext/src has no .cu files"


# --------------------------------------------------------------------------
# source checks (no compiler needed)


def _strip(text: str) -> str:
    """C++ source without comments, string/char literals and preprocessor lines."""
    text = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\\n])*"', '""', text)
    text = re.sub(r"'(?:\\.|[^'\\\n])*'", "''", text)
    return re.sub(r"^\s*#[^\n]*", "", text, flags=re.M)


def function_bodies(text: str) -> list[tuple[str, int, int]]:
    """(header, start, end) of every function defined at namespace scope in stripped
    C++ ``text``: its body is text[start:end]. Lambdas and blocks belong to their function."""
    scopes: list[str] = []
    found = []
    opened: list[tuple[int, str]] = []
    last = 0
    for i, ch in enumerate(text):
        if ch == ";":
            last = i + 1
        elif ch == "{":
            header = " ".join(text[last:i].split())
            if scopes and scopes[-1] not in ("namespace", "extern"):
                kind = "block"
            elif re.match(r"\s*namespace\b", header):
                kind = "namespace"
            elif re.match(r'\s*extern\s*""', header):
                kind = "extern"
            elif "(" in header and not re.search(r"\b(struct|class|union|enum)\b", header):
                kind = "function"
            else:
                kind = "type"
            scopes.append(kind)
            opened.append((i, header))
            last = i + 1
        elif ch == "}":
            kind, (start, header) = scopes.pop(), opened.pop()
            if kind == "function":
                found.append((header, start, i))
            last = i + 1
    return found


GUARD = re.compile(r"\bc10::cuda::(Optional)?CUDAGuard\s+\w+\s*[({]\s*(at::)?device_of\s*\(")
STREAM = re.compile(r"\bgetCurrentCUDAStream\s*\(")
LAUNCH = re.compile(r"\b(?!is_cuda\b)\w+_cuda\s*\(")


def unguarded_cuda_calls(text: str) -> list[str]:
    """Stream or launcher calls not preceded, in their function, by a device guard."""
    text = _strip(text)
    bodies = function_bodies(text)
    problems = []
    for pattern in (STREAM, LAUNCH):
        for match in pattern.finditer(text):
            owner = [(h, s, e) for h, s, e in bodies if s < match.start() < e]
            if not owner:
                problems.append(f"{match.group()} outside any function the check understands")
                continue
            header, start, _ = owner[0]
            guard = GUARD.search(text, start, match.start())
            if guard is None:
                problems.append(f"{header.split('(')[0].split()[-1]}: {match.group()} before any device guard")
    return problems


def test_every_cuda_entry_point_takes_a_device_guard():
    # A tensor on cuda:1 must launch on device 1 and its current stream: each binding
    # that takes the stream or launches declares OptionalCUDAGuard(device_of(...)) first.
    checked = 0
    for path in CPP_FILES:
        text = path.read_text()
        assert not unguarded_cuda_calls(text), f"{path.name}: {unguarded_cuda_calls(text)}"
        checked += len(STREAM.findall(_strip(text)))
    assert checked >= 10  # every op's CUDA branch was seen


def test_guard_check_catches_a_missing_guard():
    text = (ROOT / "src" / "axpy.cpp").read_text()
    broken = re.sub(r"\n\s*const c10::cuda::OptionalCUDAGuard[^\n]*", "\n", text)
    assert broken != text and unguarded_cuda_calls(broken)
    guard = "    const c10::cuda::OptionalCUDAGuard device_guard(at::device_of(x));\n"
    stream = "    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();\n"
    assert guard + stream in text
    late = text.replace(guard + stream, stream + guard)
    assert unguarded_cuda_calls(late)  # a guard after the stream does not count


def test_bindings_use_c10_cuda_not_aten_cuda():
    # ATen/cuda/CUDAContext.h pulls in cuBLAS, cuSPARSE and cuSOLVER headers; a toolkit
    # with nvcc and cudart only must suffice (the compile tests below prove it where
    # the toolkit lacks cusparse.h, as /usr/local/cuda-13.0 on the dev machines does).
    for path in sorted(ROOT.rglob("*")):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            assert not re.search(r"#include\s*[<\"]ATen/cuda", path.read_text()), path.name


# --------------------------------------------------------------------------
# the real build file


def find_cuda_home() -> Path | None:
    """A CUDA toolkit folder: CUDA_HOME/CUDA_PATH, else the one nvcc on PATH belongs
    to, else the newest /usr/local/cuda*; it must hold bin/nvcc and cuda_runtime.h."""

    def ok(home: Path) -> bool:
        return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [str(Path(nvcc).parent.parent), str(Path(nvcc).resolve().parent.parent)]
    candidates += sorted((str(p) for p in Path("/usr/local").glob("cuda*")), reverse=True)
    for home in candidates:
        if home and ok(Path(home)):
            return Path(home)
    return None


def require_toolkit() -> Path:
    home = find_cuda_home()
    if home is None:
        message = "no CUDA toolkit (nvcc and cuda_runtime.h): set CUDA_HOME to one"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI installs nvcc, so this must not be skipped there")
        pytest.skip(message)
    return home


def _object(source: Path) -> str:
    return f"{source.stem}.cuda.o" if source.suffix == ".cu" else f"{source.stem}.o"


def write_jit_build_file(folder: Path, cuda_home: Path) -> Path:
    """Have torch write the build.ninja that ``cpp_extension.load`` would for our
    CUDA variant. Uses torch's private ``_write_ninja_file_to_build_library``; if
    that changed, falls back (with a warning) to a file made from torch's public
    flag lists, which may then miss flags torch added."""
    from torch.utils import cpp_extension

    kwargs = _native.extension_kwargs(True)
    cflags = list(kwargs["extra_cflags"])
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        # A CPU-only torch wheel lacks this one generated header of CUDA builds (it only
        # sets Windows DLL export macros); c10 documents this switch for its absence.
        cflags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "build.ninja"
    writer = getattr(cpp_extension, "_write_ninja_file_to_build_library", None)
    args = {
        "path": str(path), "name": EXTENSION, "sources": kwargs["sources"], "extra_cflags": cflags,
        "extra_cuda_cflags": kwargs["extra_cuda_cflags"], "extra_sycl_cflags": [],
        "extra_ldflags": kwargs["extra_ldflags"], "extra_include_paths": kwargs["extra_include_paths"],
        "with_cuda": True, "with_sycl": False, "is_standalone": False,
    }
    if writer is not None:
        accepted = inspect.signature(writer).parameters
        try:
            writer(**{k: v for k, v in args.items() if k in accepted})
            return path
        except TypeError as exc:
            reason = f"its signature changed ({exc})"
    else:
        reason = "it is gone"
    warnings.warn(f"torch.utils.cpp_extension._write_ninja_file_to_build_library: {reason}; "
                  "compiling with flags assembled from torch's public lists instead", stacklevel=2)
    includes = [f"-I{p}" for p in kwargs["extra_include_paths"]]
    includes += [f"-isystem {p}" for p in cpp_extension.include_paths("cuda")]
    common = [f"-DTORCH_EXTENSION_NAME={EXTENSION}", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes]
    gencode = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}" for a in ARCH_LIST.split(";")]
    cuda_flags = [*common, *cpp_extension.COMMON_NVCC_FLAGS, *gencode, "--compiler-options", "'-fPIC'",
                  *kwargs["extra_cuda_cflags"]]
    lines = [
        f"cxx = {os.environ.get('CXX', 'c++')}", f"nvcc = {cuda_home / 'bin' / 'nvcc'}",
        f"cflags = {' '.join([*common, '-fPIC', *cflags])}", f"cuda_cflags = {' '.join(cuda_flags)}",
        "rule compile", "  command = $cxx $cflags -c $in -o $out",
        "rule cuda_compile", "  command = $nvcc $cuda_cflags -c $in -o $out",
    ]
    for source in kwargs["sources"]:
        rule = "cuda_compile" if source.endswith(".cu") else "compile"
        lines.append(f"build {_object(Path(source))}: {rule} {source}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def jit_build(tmp_path_factory):
    """(folder, {object: ninja log of its failure or None}) after compiling every
    object target of the real build file once."""
    from torch.utils import cpp_extension

    cuda_home = require_toolkit()
    cpp_extension.verify_ninja_availability()
    folder = tmp_path_factory.mktemp("cuda-jit-build")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_CUDA_ARCH_LIST", ARCH_LIST)
        mp.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))  # None in a CPU-only torch
        write_jit_build_file(folder, cuda_home)
    targets = [_object(p) for p in CU_FILES + CPP_FILES]
    run = subprocess.run(
        ["ninja", "-k", "0", "-j", str(os.cpu_count() or 2), *targets],
        cwd=folder, capture_output=True, text=True, timeout=1800,
    )
    log = run.stdout + run.stderr
    results = {}
    for target in targets:
        if (folder / target).is_file():
            results[target] = None
        else:
            section = re.search(rf"FAILED: {re.escape(target)}\s*\n(.*?)(?=\n\[\d+/\d+\]|\nninja: |\Z)", log, re.S)
            results[target] = section.group(1)[-6000:] if section else log[-6000:]
    return folder, results


@pytest.mark.slow
def test_build_file_carries_torch_flags(jit_build):
    from torch.utils import cpp_extension

    folder, _ = jit_build
    text = (folder / "build.ninja").read_text()
    cuda_cflags = re.search(r"^cuda_cflags = (.*)$", text, re.M).group(1)
    cflags = re.search(r"^cflags = (.*)$", text, re.M).group(1)
    for flag in [*cpp_extension.COMMON_NVCC_FLAGS, *_native.NVCC_FLAGS, "-DAVATAR_WITH_CUDA"]:
        assert flag in cuda_cflags.split(), flag
    assert "-D__CUDA_NO_HALF_CONVERSIONS__" in cuda_cflags.split()
    for arch in ("80", "86", "90"):
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in cuda_cflags
    assert "--use_fast_math" not in cuda_cflags
    assert "-DAVATAR_WITH_CUDA" in cflags.split() and "cuda_ext/include" in cflags


@pytest.mark.slow
@pytest.mark.parametrize("source", CU_FILES + CPP_FILES, ids=lambda p: p.name)
def test_compiles_under_the_jit_build_flags(source: Path, jit_build):
    _, results = jit_build
    failure = results[_object(source)]
    assert failure is None, f"{source.name} does not compile in the CUDA JIT build:\n{failure}"


# nvcc contracts a * b + c into fma (-fmad=true) unless each operation is an explicit
# round-to-nearest one; ptxas may still fuse PTX mul/add without a rounding modifier.
FUSED = re.compile(r"^\s*(?:@!?%p\d+\s+)?(fma|mad)\.\S*f(32|64)\b", re.M)
FUSIBLE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(mul|add|sub)(\.ftz)?(\.sat)?\.f(32|64)\b", re.M)


@pytest.mark.slow
def test_raster_kernels_have_no_fused_multiply_adds(jit_build, tmp_path):
    # raster.cu's output is documented bit-exact with the CPU engine: its float math is
    # written with mul_rn/add_rn, so its PTX has no fma and no mul/add ptxas could fuse.
    folder, results = jit_build
    assert results["raster.cuda.o"] is None
    command = subprocess.run(["ninja", "-t", "commands", "raster.cuda.o"], cwd=folder, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
    keep = tmp_path / "keep"
    keep.mkdir()
    assert " -o raster.cuda.o" in command
    command = command.replace(" -o raster.cuda.o", f" -o {tmp_path / 'raster.o'} --keep --keep-dir {keep}")
    out = subprocess.run(command, shell=True, cwd=folder, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    ptx = sorted(keep.glob("*.ptx"))
    assert len(ptx) >= 3, sorted(p.name for p in keep.iterdir())  # one per arch
    for path in ptx:
        text = path.read_text()
        assert "raster_tile_kernel" in text and "antialias_analysis_kernel" in text
        fused, fusible = FUSED.findall(text), FUSIBLE.findall(text)
        assert not fused and not fusible, f"{path.name}: {len(fused)} fma, {len(fusible)} unrounded mul/add/sub"
