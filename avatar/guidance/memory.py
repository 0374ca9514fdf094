"""GPU memory and speed switches users expect from diffusers: half precision (fp16 or bf16),
attention slicing, sequential CPU offload, channels-last and ``torch.compile``; and what of it
applies on this machine.

Attention is PyTorch's fused ``scaled_dot_product_attention`` (diffusers' default
``AttnProcessor2_0``: flash or memory-efficient kernels on a GPU) unless slicing is asked for.

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

HALF_DTYPES = ("auto", "fp16", "bf16")
"""``guidance.half_dtype`` choices: ``auto`` is bf16 where the card supports it, else fp16."""

CONV_MODELS = ("unet", "controlnet", "vae", "tiny_ae")
"""Module names (and prefixes: ``controlnet_landmark``) that channels-last applies to: the
convolution-heavy models. The text encoder is freed before the options are applied."""


@dataclass
class MemoryOptions:
    half_precision: bool = True
    """Half-precision weights and activations on CUDA (ignored on the CPU, where fp16 is slow or unsupported)."""
    half_dtype: str = "auto"
    """``auto`` (bf16 where the card supports it, else fp16), ``fp16`` or ``bf16``."""
    attention_slicing: bool = False
    """Compute attention in slices: less peak memory, a little slower."""
    cpu_offload: bool = False
    """Sequential CPU offload (accelerate): weights live on the CPU and visit the GPU layer by layer."""
    channels_last: bool = False
    """UNet, ControlNet and image-encoder weights in channels-last memory format (faster convolutions
    on recent GPUs)."""
    compile: bool = False
    """``torch.compile`` the UNet and ControlNets here, and the image encoder (where the guidance
    builds it: :func:`avatar.guidance.sds.compiled`); slow first step, faster later ones."""


def choose_dtype(device_type: str, half_precision: bool, half_dtype: str = "auto",
                 bf16_supported: bool = False) -> Any:
    """The diffusion models' dtype: a pure function of the device type, the options and whether
    the card supports bf16 (``torch.cuda.is_bf16_supported()``).

    fp32 off CUDA or without half precision; on CUDA ``fp16`` or ``bf16`` as asked, and for
    ``auto`` bf16 where supported (fp16's range overflows in large activations; bf16's does not),
    else fp16. Asking for bf16 on a card without it is an error that says what to set instead.
    """
    import torch

    if half_dtype not in HALF_DTYPES:
        raise GuidanceError(f"unknown guidance.half_dtype '{half_dtype}': choose one of {', '.join(HALF_DTYPES)}")
    if not half_precision or device_type != "cuda":
        return torch.float32
    if half_dtype == "fp16":
        return torch.float16
    if half_dtype == "bf16" and not bf16_supported:
        raise GuidanceError("guidance.half_dtype=bf16 but this GPU does not support bf16: set guidance.half_dtype=fp16 "
                            "(or auto)")
    return torch.bfloat16 if bf16_supported else torch.float16


def bf16_supported(device: Any) -> bool:
    """Whether the CUDA device ``device`` computes in bf16 natively (False off CUDA)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def guidance_dtype(device: Any, half_precision: bool, half_dtype: str = "auto") -> Any:
    """:func:`choose_dtype` for this device (its bf16 support asked of the driver)."""
    import torch

    device = torch.device(device)
    return choose_dtype(device.type, half_precision, half_dtype, bf16_supported(device) if device.type == "cuda"
                        else False)


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``fp16`` (``bf16``, ``fp32``)."""
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def _is_conv_model(name: str) -> bool:
    return any(name == m or name.startswith(f"{m}_") for m in CONV_MODELS)


def apply_memory_options(modules: dict[str, Any], device: Any, opts: MemoryOptions) -> tuple[dict[str, Any], list[str]]:
    """Apply ``opts`` to the named modules (``unet``, ``vae``, ``tiny_ae``, ``controlnet_*``); return
    the (possibly wrapped) modules and a list of what was applied, for the run log.

    With ``cpu_offload`` the modules must still be on the CPU (the loader leaves them there).
    ``compile`` wraps the UNet and ControlNets (``torch.compile`` returns a wrapper: the loaded,
    possibly shared, modules stay as they are); the autoencoders' encoders are compiled by the
    guidance's image encoder, which calls only their encoder half.
    """
    import torch

    device = torch.device(device)
    applied: list[str] = []
    dtype = guidance_dtype(device, opts.half_precision, opts.half_dtype)
    if dtype != torch.float32:
        applied.append(dtype_name(dtype))
    if opts.attention_slicing:
        for module in modules.values():
            if hasattr(module, "set_attention_slice"):
                module.set_attention_slice("auto")
        applied.append("attention_slicing")
    if opts.channels_last:
        for name, module in modules.items():
            if _is_conv_model(name):
                module.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if opts.compile and opts.cpu_offload:
        raise GuidanceError("guidance.compile and guidance.cpu_offload do not go together (offloading moves every "
                            "layer's weights at each call): turn one of them off")
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
        from avatar.guidance.sds import compiled

        modules = dict(modules)
        names = [n for n in modules if n == "unet" or n.startswith("controlnet")]
        for name in names:
            modules[name] = compiled(modules[name])
        applied.append(f"torch.compile({', '.join(names)})")
    return modules, applied


def memory_options_report() -> dict[str, dict[str, Any]]:
    """For ``avatar doctor``: each option -> ``{"available": bool, "reason": str}`` on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    accelerate = importlib.util.find_spec("accelerate") is not None
    no_gpu = "no CUDA device: guidance runs in fp32 on the CPU"
    bf16 = cuda and bf16_supported("cuda")
    report = {
        "fp16": (cuda, ("CUDA device present: guidance.half_dtype=fp16 loads the models in fp16" if bf16 else
                        "CUDA device present: weights load in fp16 (guidance.half_precision)") if cuda else no_gpu),
        "bf16": (bf16, "this GPU supports bf16: guidance.half_dtype=auto (the default) loads the models in bf16"
                 if bf16 else ("this GPU has no native bf16: auto uses fp16" if cuda else no_gpu)),
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
