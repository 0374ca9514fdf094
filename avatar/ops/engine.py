"""Engine selection for heavy ops: one interface, several engines.

``engine`` is one of ``auto``, ``native`` (our cuda_ext kernels), ``torch`` (the
pure-PyTorch reference), ``tcnn`` (tiny-cuda-nn) or ``nvdiffrast``. ``auto``
picks the best engine present for the op and device and logs the choice once;
a missing engine is an error only when asked for by name, and the error says
how to install it.
"""

from __future__ import annotations

import importlib.util
import logging

from avatar.errors import AvatarError

ENGINES = ("auto", "native", "torch", "tcnn", "nvdiffrast")

log = logging.getLogger("avatar.ops")

_INSTALL = {
    "tcnn": (
        "tinycudann",
        "tiny-cuda-nn is not installed: on a CUDA machine run "
        "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch",
    ),
    "nvdiffrast": (
        "nvdiffrast",
        "nvdiffrast is not installed: on a CUDA machine run "
        "pip install --no-build-isolation git+https://github.com/NVlabs/nvdiffrast.git",
    ),
}

_logged: set[tuple[str, str, str]] = set()


class EngineError(AvatarError, RuntimeError):
    """An engine was asked for by name and cannot serve the op."""


def module_present(name: str) -> bool:
    """True if a module can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None


def gpu_engine_present(engine: str) -> bool:
    """True if the optional GPU engine's Python package is installed."""
    return module_present(_INSTALL[engine][0])


def resolve_engine(op: str, requested: str, device_type: str, gpu_engines: tuple[str, ...] = ()) -> str:
    """Return the concrete engine (``native``, ``torch`` or a GPU engine) for ``op``.

    op: a name for messages and logs (``hashgrid``, ``composite``, ``rasterize``).
    requested: one of :data:`ENGINES`.
    device_type: ``"cpu"`` or ``"cuda"``, the device of the op's inputs.
    gpu_engines: third-party engines able to serve this op on CUDA, best first.
    """
    from avatar import _native

    if requested not in ENGINES:
        raise EngineError(f"unknown engine '{requested}' for {op}: choose one of {', '.join(ENGINES)}")
    if requested == "torch":
        return "torch"
    if requested in ("tcnn", "nvdiffrast"):
        if requested not in gpu_engines:
            raise EngineError(f"engine '{requested}' does not implement {op}; it serves other ops")
        if not gpu_engine_present(requested):
            raise EngineError(_INSTALL[requested][1])
        if device_type != "cuda":
            raise EngineError(f"engine '{requested}' needs CUDA tensors, got {device_type}; use engine='auto'")
        return requested
    if requested == "native":
        try:
            module = _native.load()
        except _native.NativeUnavailable as exc:
            raise EngineError(f"native engine unavailable for {op}: {exc}") from exc
        if device_type == "cuda" and not getattr(module, "with_cuda", False):
            why = _native.cuda_unavailable_reason()
            raise EngineError(
                f"native engine for {op} was built without CUDA kernels"
                + (f" ({why})" if why else "")
                + ": install the CUDA toolkit (nvcc) of torch.version.cuda's major version, set CUDA_HOME to it "
                "and run again (`avatar doctor` shows what it finds)"
            )
        return "native"
    # auto
    choice = "torch"
    if device_type == "cuda":
        for name in gpu_engines:
            if gpu_engine_present(name):
                choice = name
                break
    if choice == "torch" and _native.available():
        module = _native.load()
        if device_type != "cuda" or getattr(module, "with_cuda", False):
            choice = "native"
    key = (op, device_type, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("engine for %s on %s: %s", op, device_type, choice)
    return choice
