"""Editing guidances: identity-aware editing score distillation (IESD) and InstructPix2Pix.

IESD (HeadSculpt, Han et al. 2023, sec. 3.3; as in its released ``sd.py``): the
text-to-image UNet predicts noise twice, once under the source prompt and once under
the edit instruction, each with classifier-free guidance against the negative prompt
and each through the same multi-ControlNet:

- the landmark (MediaPipe-face) ControlNet on the head prior's landmark image, and
- the InstructPix2Pix ControlNet (``control_v11e_sd15_ip2p``) on the frozen source
  avatar's rendering from the same camera, which anchors the identity;

back views use only the InstructPix2Pix branch. The two predictions are mixed as

    eps_hat = eps_src + w_edit (eps_edit - eps_src)

so w_edit = 0 keeps the source and w_edit = 1 follows the instruction fully.

``ip2p`` mode uses the InstructPix2Pix UNet itself (Brooks et al. 2023, eq. 3), whose
input is the noisy latents concatenated with the source image's latents:

    eps_hat = eps(0, 0) + s_T (eps(c_I, c_T) - eps(c_I, 0)) + s_I (eps(c_I, 0) - eps(0, 0)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from avatar.guidance.errors import GuidanceError
from avatar.guidance.prompts import LANDMARK_VIEWS, ViewPromptEmbeddings
from avatar.guidance.sds import ControlBranch, GuidanceBatch, classifier_free_guidance, resize, unet_predictions


def iesd_combine(eps_src: torch.Tensor, eps_edit: torch.Tensor, edit_weight: float) -> torch.Tensor:
    """eps_src + w_edit (eps_edit - eps_src)."""
    return eps_src + edit_weight * (eps_edit - eps_src)


def instruct_pix2pix_guidance(eps_text: torch.Tensor, eps_image: torch.Tensor, eps_uncond: torch.Tensor,
                              text_scale: float, image_scale: float) -> torch.Tensor:
    """eps_u + s_T (eps_T - eps_I) + s_I (eps_I - eps_u): eps_T sees image and instruction, eps_I the
    image only, eps_u neither."""
    return eps_uncond + text_scale * (eps_text - eps_image) + image_scale * (eps_image - eps_uncond)


class IESDPredictor:
    """HeadSculpt's identity-aware editing noise predictor (see the module docstring).

    unet: the text-to-image UNet (4 input channels). source_prompts: the source avatar's
    prompt per view and the negative prompt; edit_prompts: the instruction (its
    ``negative`` is not used: both terms share the source's negative prompt, as in
    HeadSculpt's code). The uncond prediction is shared, so one UNet batch of three
    conditions serves both terms.
    """

    def __init__(self, unet: Any, source_prompts: ViewPromptEmbeddings, edit_prompts: ViewPromptEmbeddings, *,
                 landmark_controlnet: Any = None, identity_controlnet: Any = None, guidance_scale: float = 7.5,
                 edit_weight: float = 1.0, landmark_scale: float = 1.0, identity_scale: float = 1.0,
                 landmark_views: Sequence[str] = LANDMARK_VIEWS, dtype: torch.dtype | None = None):
        self.unet = unet
        self.source_prompts = source_prompts
        self.edit_prompts = edit_prompts
        self.landmark_controlnet = landmark_controlnet
        self.identity_controlnet = identity_controlnet
        self.guidance_scale = float(guidance_scale)
        self.edit_weight = float(edit_weight)
        self.landmark_scale = float(landmark_scale)
        self.identity_scale = float(identity_scale)
        self.landmark_views = frozenset(landmark_views)
        self.dtype = dtype or torch.float32

    def branches(self, batch: GuidanceBatch) -> list[ControlBranch]:
        out = []
        if self.landmark_controlnet is not None:
            if batch.control_images is None:
                if any(v in self.landmark_views for v in batch.views):
                    raise GuidanceError("IESD with a landmark ControlNet needs control_images (landmark images)")
            else:
                out.append(ControlBranch(self.landmark_controlnet, batch.control_images, self.landmark_scale,
                                         self.landmark_views))
        if self.identity_controlnet is not None:
            if batch.source_images is None:
                raise GuidanceError("IESD needs source_images: the source avatar rendered from the same cameras")
            out.append(ControlBranch(self.identity_controlnet, batch.source_images, self.identity_scale))
        return out

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, batch: GuidanceBatch) -> torch.Tensor:
        src, neg = self.source_prompts.select(batch.views, x_t.device, self.dtype)
        embeds = [neg, src]
        if self.edit_weight != 0.0:
            embeds.append(self.edit_prompts.select(batch.views, x_t.device, self.dtype)[0])
        preds = unet_predictions(self.unet, x_t, t, embeds, self.branches(batch), batch.views, dtype=self.dtype)
        eps_src = classifier_free_guidance(preds[0], preds[1], self.guidance_scale)
        if self.edit_weight == 0.0:
            return eps_src
        eps_edit = classifier_free_guidance(preds[0], preds[2], self.guidance_scale)
        return iesd_combine(eps_src, eps_edit, self.edit_weight)


class InstructPix2PixPredictor:
    """InstructPix2Pix UNet (8 input channels) with text and image guidance.

    The source image (``batch.source_images``) is encoded with the VAE's posterior mode
    and no scaling factor, as diffusers' ``StableDiffusionInstructPix2PixPipeline``
    prepares its image latents; the "no text" condition is ``instruction.negative``
    (the empty prompt by default, as in that pipeline).
    """

    def __init__(self, unet: Any, vae: Any, instruction: ViewPromptEmbeddings, *, text_scale: float = 7.5,
                 image_scale: float = 1.5, dtype: torch.dtype | None = None):
        self.unet = unet
        self.vae = vae
        self.instruction = instruction
        self.text_scale = float(text_scale)
        self.image_scale = float(image_scale)
        self.dtype = dtype or torch.float32
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def image_latents(self, source: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, 4, h, w)`` latents at the latent size ``size``."""
        f = self.scale_factor
        x = resize(source.float(), (size[0] * f, size[1] * f)) * 2 - 1
        return self.vae.encode(x.to(self.dtype)).latent_dist.mode().float()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, batch: GuidanceBatch) -> torch.Tensor:
        if batch.source_images is None:
            raise GuidanceError("InstructPix2Pix guidance needs source_images: the source avatar rendered from "
                                "the same cameras")
        image = self.image_latents(batch.source_images, x_t.shape[-2:])
        cond, uncond = self.instruction.select(batch.views, x_t.device, self.dtype)
        eps_text, eps_image, eps_uncond = unet_predictions(
            self.unet, x_t, t, [cond, uncond, uncond], views=batch.views,
            extra_inputs=[image, image, torch.zeros_like(image)], dtype=self.dtype)
        return instruct_pix2pix_guidance(eps_text, eps_image, eps_uncond, self.text_scale, self.image_scale)
