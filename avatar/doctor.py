"""``avatar doctor``: what this machine can run, and why not where it cannot.

Every engine entry is ``{"available": bool, "reason": str}``; the reason says
what is there or what to install. Nothing here builds or downloads anything
unless asked (``build=True`` compiles the native extension).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from avatar.config import EditGuidanceConfig, GuidanceConfig

GUIDANCE_DEFAULTS = (
    (GuidanceConfig.model, "text2img"),
    (GuidanceConfig.controlnet, "landmark_controlnet"),
    (EditGuidanceConfig.model, "ip2p"),
    (EditGuidanceConfig.identity_controlnet, "identity_controlnet"),
    (GuidanceConfig.tiny_ae, "tiny_ae"),
)
"""Default guidance weights and their roles, looked up in the local Hugging Face cache (the tiny
autoencoder: TAESD, the ``fast`` preset's ``guidance.encoder=tiny-ae``)."""

FLAME_MODEL_FILES = ("generic_model.pkl", "FLAME_NEUTRAL.pkl")


def _entry(available: bool, reason: str, **extra: Any) -> dict[str, Any]:
    return {"available": bool(available), "reason": reason, **extra}


def _device() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                "cuda_version": torch.version.cuda}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda_version": torch.version.cuda}


def _native_cuda(st: Any) -> dict[str, Any]:
    """The CUDA kernels of our extension: what was built, or what a build will do and why.

    Extra keys: ``state`` (``built``, ``will_build``, ``cpu_only``, ``no_device``,
    ``unavailable`` or ``disabled``), ``toolkit`` (nvcc path and version, CUDA_HOME,
    ``torch.version.cuda``, whether they are compatible (same major version, torch's
    own rule), each required header -> present) and ``build`` (``with_cuda``,
    ``arch_list``, ``path`` of the built extension, or None before a build).
    """
    import torch

    from avatar import _native

    toolkit = _native.cuda_toolkit()
    details = {
        "toolkit": {
            "nvcc": toolkit.nvcc,
            "nvcc_version": toolkit.nvcc_version,
            "cuda_home": toolkit.cuda_home,
            "torch_cuda": toolkit.torch_cuda,
            "compatible": toolkit.compatible,
            "headers": dict(toolkit.headers),
        },
        "build": ({"with_cuda": st.with_cuda, "arch_list": list(st.arch_list), "path": st.path}
                  if st.state == "built" else None),
    }
    summary = toolkit.summary()

    def entry(available: bool, state: str, reason: str) -> dict[str, Any]:
        return _entry(available, reason, state=state, **details)

    if st.state == "disabled":
        return entry(False, "disabled", "disabled: AVATAR_NO_NATIVE=1 is set")
    if st.state == "built" and st.with_cuda:
        targets = ", ".join(st.arch_list) or "an unrecorded arch list"
        return entry(True, "built", f"built with CUDA for {targets} in {st.path} ({summary})")
    if not torch.version.cuda:
        return entry(False, "unavailable", f"torch {torch.__version__} is a CPU-only build: the CUDA kernels need a "
                     f"CUDA build of torch ({summary})")
    if not torch.cuda.is_available():
        return entry(False, "no_device", f"no CUDA device (torch.cuda.is_available() is False); toolkit: {summary}")
    if os.environ.get("AVATAR_NO_CUDA_EXT") == "1":
        return entry(False, "cpu_only", f"AVATAR_NO_CUDA_EXT=1 builds the extension CPU-only ({summary})")
    why = st.cuda_error or toolkit.blocker()
    if st.state == "built":
        return entry(False, "cpu_only", f"built CPU-only in {st.path}: {why or 'no CUDA toolkit was found'}")
    if st.state in ("failed", "unbuildable"):
        return entry(False, "unavailable", f"native extension unavailable: {st.reason}")
    if why:
        return entry(False, "unavailable", f"will build CPU-only: {why}")
    targets = ", ".join(st.arch_list) or "the visible GPUs"
    return entry(True, "will_build", f"not built yet: will compile with CUDA for {targets} on first use into "
                 f"{st.path} ({summary}); `avatar doctor --build` builds it now")


def _engines(build: bool) -> dict[str, Any]:
    import torch

    from avatar import _native

    if build and not _native.disabled():
        _native.available()  # compiles now; the status below reports the result
    st = _native.status()
    engines = {"native_cpu": _entry(st.available, f"{st.state}: {st.reason}"), "native_cuda": _native_cuda(st)}
    cuda = torch.cuda.is_available()
    for name, module, hint in (
        ("nvdiffrast", "nvdiffrast", "pip install --no-build-isolation git+https://github.com/NVlabs/nvdiffrast.git"),
        ("tiny_cuda_nn", "tinycudann",
         "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"),
    ):
        present = importlib.util.find_spec(module) is not None
        if not present:
            engines[name] = _entry(False, f"not installed (optional GPU engine): {hint}")
        elif not cuda:
            engines[name] = _entry(False, "installed, but there is no CUDA device")
        else:
            engines[name] = _entry(True, "installed")
    return engines


def _priors() -> dict[str, Any]:
    priors = {}
    if importlib.util.find_spec("anny") is not None:
        priors["anny"] = _entry(True, "ships with avatar (Apache-2.0 code, CC0 assets)")
    else:
        priors["anny"] = _entry(False, "the anny package is missing: pip install anny")
    flame_dir = os.environ.get("AVATAR_FLAME_DIR")
    if not flame_dir:
        priors["flame"] = _entry(False, "not configured: set AVATAR_FLAME_DIR to your FLAME folder")
    elif not Path(flame_dir).is_dir():
        priors["flame"] = _entry(False, f"AVATAR_FLAME_DIR={flame_dir} is not a folder")
    else:
        found = [f for f in FLAME_MODEL_FILES if (Path(flame_dir) / f).is_file()]
        from avatar.prior.flame import MEDIAPIPE_EMBEDDING

        landmarks = (f"landmarks: MediaPipe embedding ({MEDIAPIPE_EMBEDDING})"
                     if (Path(flame_dir) / MEDIAPIPE_EMBEDDING).is_file() else
                     f"landmarks: iBUG 68 only (control images with single-line brows, no pupils); add "
                     f"{MEDIAPIPE_EMBEDDING} from the FLAME site")
        priors["flame"] = _entry(bool(found), f"{flame_dir}: " + (f"found {found[0]}; {landmarks}" if found else
                                 f"none of {', '.join(FLAME_MODEL_FILES)} found"))
    return priors


def _guidance() -> dict[str, Any]:
    from avatar.guidance.models import local_cache_status

    found = {spec: local_cache_status(spec, role) for spec, role in GUIDANCE_DEFAULTS}
    found["tiny"] = local_cache_status("tiny")
    return found


def _disk(outputs: Path) -> dict[str, Any]:
    probe = outputs.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"outputs": str(outputs), "free_gb": round(usage.free / 1e9, 1)}


def collect(outputs: Path, build: bool = False) -> dict[str, Any]:
    """The full report as a JSON-ready dict."""
    import torch

    from avatar import __version__
    from avatar.guidance.memory import memory_options_report

    return {
        "avatar": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": _device(),
        "engines": _engines(build),
        "head_priors": _priors(),
        "guidance_weights": _guidance(),
        "guidance_memory": memory_options_report(),
        "disk": _disk(outputs),
    }


def render(report: dict[str, Any]) -> None:
    """Print the report for people."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    dev = report["device"]
    console.print(f"[bold]avatar {report['avatar']}[/]  python {report['python']}  torch {report['torch']}")
    console.print(f"device: {dev['type']} ({dev['name']})")
    for title, key in (("engines", "engines"), ("head priors", "head_priors"),
                       ("guidance weights", "guidance_weights"), ("guidance memory options", "guidance_memory")):
        table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
        for name, entry in report[key].items():
            mark = "[green]yes[/]" if entry["available"] else "[yellow]no[/]"
            table.add_row(f"  {name}", mark, entry["reason"])
        console.print(table)
    disk = report["disk"]
    console.print(f"disk: {disk['free_gb']} GB free for {disk['outputs']}")
