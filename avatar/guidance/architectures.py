"""Stable Diffusion 1.5's published architectures at random weights: the UNet, its ControlNet,
the VAE and TAESD (diffusers' ``AutoencoderTiny``), for costing and timing a step without
weights (``benchmarks/iteration.py``, ``benchmarks/flops.py``, the timed steps of ``avatar
selftest``). Their cost does not depend on the weights. On ``torch.device('meta')`` they hold
shapes only.
"""

from __future__ import annotations

from typing import Any

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
"""stable-diffusion-v1-5's unet/config.json (the fields that differ from diffusers' defaults)."""

SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512,
)
"""stable-diffusion-v1-5's vae/config.json."""

TAESD = dict(
    in_channels=3, out_channels=3, encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64), num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
    latent_channels=4, latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0,
)
"""madebyollin/taesd's config.json (TAESD for SD 1.x/2.x: 1.2M encoder parameters against 34M)."""


def _cast(module: Any, dtype: Any) -> None:
    # Module.to(dtype) on a diffusers model warns about loading; there are no weights to load here.
    for p in module.parameters():
        p.data = p.data.to(dtype)
    for b in module.buffers():
        if b.is_floating_point():
            b.data = b.data.to(dtype)


def sd15_models(device: Any = "cpu", dtype: Any = None, seed: int = 0) -> dict[str, Any]:
    """``{"unet", "controlnet", "vae", "tiny_ae"}``: SD 1.5's UNet, a ControlNet made from it (the
    MediaPipe-face ControlNet's architecture), the VAE and TAESD, at random weights, frozen, in
    eval mode, on ``device`` in ``dtype`` (fp32 by default)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, UNet2DConditionModel

    dtype = dtype or torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**SD15_UNET).eval()
            models = {"unet": unet, "controlnet": ControlNetModel.from_unet(unet).eval(),
                      "vae": AutoencoderKL(**SD15_VAE).eval(), "tiny_ae": AutoencoderTiny(**TAESD).eval()}
    for m in models.values():
        m.requires_grad_(False)
        if dtype != torch.float32:
            _cast(m, dtype)
    return models
