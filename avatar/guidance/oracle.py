"""Oracle guidance: a "denoiser" that knows the answer, so score distillation becomes reconstruction.

Given a target rendering x_tgt from the same camera (in the space the guidance works
in: RGB through :class:`~avatar.guidance.sds.RGBEncoder` by default, or latents), the
oracle predicts the noise that leads from x_t to the target:

    eps_hat = (x_t - sqrt(abar_t) x_tgt) / sqrt(1 - abar_t).

Then eps_hat - eps = sqrt(abar_t / (1 - abar_t)) (x0 - x_tgt): the SDS gradient is a
positively weighted pull of the rendering toward the target, and the generate pipeline
(cameras, fields, renderers, SDS weighting, stage hand-over, extraction, export) must
recover the target head. Only the noise predictor differs from a real guidance: the
oracle goes through the same :class:`~avatar.guidance.sds.ScoreDistillation`.

The target is rendered by a callable ``render_target(cameras) -> (B, H, W, 3)`` in
[0, 1], supplied by the pipeline (it renders the ``oracle:MESH`` mesh).

:class:`OracleEditPredictor` is the IESD counterpart: a source target and an edit
target mixed with the same :func:`~avatar.guidance.iesd.iesd_combine` as IESD, so that
w_edit = 0 pulls toward the source and w_edit = 1 toward the edit target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from avatar.guidance.errors import GuidanceError
from avatar.guidance.iesd import iesd_combine
from avatar.guidance.sds import GuidanceBatch, RGBEncoder, resize, to_channels_first

RenderFn = Callable[[Any], torch.Tensor]
"""cameras -> renders ``(B, H, W, 3)`` in [0, 1]."""


def oracle_noise(x_t: torch.Tensor, alpha_bar: torch.Tensor, x_target: torch.Tensor) -> torch.Tensor:
    """(x_t - sqrt(abar) x_target) / sqrt(1 - abar); alpha_bar ``(B,)``."""
    a = alpha_bar.view(-1, *([1] * (x_t.ndim - 1))).to(x_t)
    return (x_t - a.sqrt() * x_target) / (1 - a).sqrt()


def _encode_target(render: RenderFn, cameras: Any, encoder: Any, like: torch.Tensor) -> torch.Tensor:
    images = render(cameras)
    x = encoder.encode_target(to_channels_first(torch.as_tensor(images), "render_target output").to(like.device))
    if x.shape[0] != like.shape[0] or x.shape[1] != like.shape[1]:
        raise GuidanceError(f"oracle target encodes to {tuple(x.shape)}, the rendering to {tuple(like.shape)}")
    return resize(x, like.shape[-2:])


class OraclePredictor:
    """Noise predictor pointing at ``render_target(cameras)`` (see the module docstring)."""

    def __init__(self, render_target: RenderFn, alphas_cumprod: torch.Tensor, encoder: Any = None):
        self.render_target = render_target
        self.alphas_cumprod = alphas_cumprod.float()
        self.encoder = encoder or RGBEncoder()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, batch: GuidanceBatch) -> torch.Tensor:
        target = _encode_target(self.render_target, batch.cameras, self.encoder, x_t)
        return oracle_noise(x_t, self.alphas_cumprod.to(t.device)[t], target)


class OracleEditPredictor:
    """IESD oracle pair: eps_src toward the source target, eps_edit toward the edit target.

    render_source: the identity target, the frozen source rendered like the live rendering
    (the edit pipeline passes the source with the step's shading and light, since its
    ``source_images`` are the albedo images the InstructPix2Pix ControlNet sees). None uses
    ``batch.source_images`` as the target.
    """

    def __init__(self, render_edit: RenderFn, alphas_cumprod: torch.Tensor, *, render_source: RenderFn | None = None,
                 edit_weight: float = 1.0, encoder: Any = None):
        self.render_edit = render_edit
        self.render_source = render_source
        self.alphas_cumprod = alphas_cumprod.float()
        self.edit_weight = float(edit_weight)
        self.encoder = encoder or RGBEncoder()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, batch: GuidanceBatch) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        if self.render_source is not None:
            source = _encode_target(self.render_source, batch.cameras, self.encoder, x_t)
        elif batch.source_images is not None:
            source = resize(self.encoder.encode_target(batch.source_images), x_t.shape[-2:])
        else:
            raise GuidanceError("the IESD oracle needs a source: render_source or source_images")
        edit = _encode_target(self.render_edit, batch.cameras, self.encoder, x_t)
        return iesd_combine(oracle_noise(x_t, a, source), oracle_noise(x_t, a, edit), self.edit_weight)
