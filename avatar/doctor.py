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
)
"""Default guidance weights and their roles, looked up in the local Hugging Face cache."""

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


def _engines(build: bool) -> dict[str, Any]:
    import torch

    from avatar import _native

    if build and not _native.disabled():
        _native.available()  # compiles now; the status below reports the result
    st = _native.status()
    engines = {"native_cpu": _entry(st.available, f"{st.state}: {st.reason}")}
    cuda = torch.cuda.is_available()
    if not cuda:
        engines["native_cuda"] = _entry(False, "no CUDA device (torch.cuda.is_available() is False)")
    elif not st.available:
        engines["native_cuda"] = _entry(False, f"native extension unavailable: {st.reason}")
    elif st.state == "built" and not st.with_cuda:
        engines["native_cuda"] = _entry(False, "built without CUDA: install nvcc matching torch.version.cuda")
    else:
        engines["native_cuda"] = _entry(True, f"{st.state} with CUDA kernels")
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
        priors["flame"] = _entry(bool(found), f"{flame_dir}: " + (f"found {found[0]}" if found else
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
