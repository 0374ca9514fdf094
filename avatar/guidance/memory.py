"""GPU memory switches users expect from diffusers: fp16, attention slicing, sequential CPU
offload, channels-last and ``torch.compile``; and what of it applies on this machine.

They are applied to the components (UNet, ControlNets, VAE) after loading, the way
diffusers' pipelines apply them (``enable_attention_slicing`` calls the models'
``set_attention_slice``; ``enable_sequential_cpu_offload`` wraps each model with
accelerate's ``cpu_offload``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from avatar.guidance.errors import GuidanceError


@dataclass
class MemoryOptions:
    half_precision: bool = True
    """fp16 weights and activations on CUDA (ignored on the CPU, where fp16 is slow or unsupported)."""
    attention_slicing: bool = False
    """Compute attention in slices: less peak memory, a little slower."""
    cpu_offload: bool = False
    """Sequential CPU offload (accelerate): weights live on the CPU and visit the GPU layer by layer."""
    channels_last: bool = False
    """UNet/ControlNet weights in channels-last memory format (faster convolutions on recent GPUs)."""
    compile: bool = False
    """Wrap the UNet in ``torch.compile`` (slow first step, faster later ones)."""


def guidance_dtype(device: Any, half_precision: bool) -> Any:
    """fp16 on CUDA when asked, else fp32."""
    import torch

    return torch.float16 if half_precision and torch.device(device).type == "cuda" else torch.float32


def apply_memory_options(modules: dict[str, Any], device: Any, opts: MemoryOptions) -> tuple[dict[str, Any], list[str]]:
    """Apply ``opts`` to the named modules (``unet``, ``vae``, ``controlnet_*``); return the
    (possibly wrapped) modules and a list of what was applied, for the run log.

    With ``cpu_offload`` the modules must still be on the CPU (the loader leaves them there).
    """
    import torch

    device = torch.device(device)
    applied: list[str] = []
    if guidance_dtype(device, opts.half_precision) == torch.float16:
        applied.append("fp16")
    if opts.attention_slicing:
        for module in modules.values():
            if hasattr(module, "set_attention_slice"):
                module.set_attention_slice("auto")
        applied.append("attention_slicing")
    if opts.channels_last:
        for name, module in modules.items():
            if name == "unet" or name.startswith("controlnet"):
                module.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if opts.cpu_offload:
        if device.type != "cuda":
            applied.append("cpu_offload skipped (no CUDA device: the models already live on the CPU)")
        elif importlib.util.find_spec("accelerate") is None:
            raise GuidanceError("guidance.cpu_offload needs the accelerate package: pip install accelerate "
                                "(or pip install 'avatar[gpu]'), or turn cpu_offload off")
        else:
            from accelerate import cpu_offload

            for module in modules.values():
                cpu_offload(module, execution_device=device)
            applied.append("cpu_offload")
    if opts.compile:
        if not hasattr(torch, "compile"):
            raise GuidanceError("guidance.compile needs torch.compile (PyTorch 2.0 or newer)")
        modules = dict(modules)
        modules["unet"] = torch.compile(modules["unet"])
        applied.append("torch.compile(unet)")
    return modules, applied


def memory_options_report() -> dict[str, dict[str, Any]]:
    """For ``avatar doctor``: each option -> ``{"available": bool, "reason": str}`` on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    accelerate = importlib.util.find_spec("accelerate") is not None
    no_gpu = "no CUDA device: guidance runs in fp32 on the CPU"
    report = {
        "fp16": (cuda, "CUDA device present: weights load in fp16 (guidance.half_precision)" if cuda else no_gpu),
        "attention_slicing": (True, "always available (guidance.attention_slicing)"),
        "cpu_offload": (
            cuda and accelerate,
            "accelerate installed and a CUDA device present (guidance.cpu_offload)" if cuda and accelerate
            else ("needs a CUDA device" if not cuda else "needs accelerate: pip install accelerate"),
        ),
        "channels_last": (True, "always available; helps convolutions on recent GPUs" if cuda
                          else "available; no speed-up expected on the CPU"),
        "torch_compile": (hasattr(torch, "compile") and cuda,
                          "torch.compile available with a CUDA device" if cuda
                          else "torch.compile present but only worth it on a GPU"),
    }
    return {name: {"available": bool(ok), "reason": why} for name, (ok, why) in report.items()}
