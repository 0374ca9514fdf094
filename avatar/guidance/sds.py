"""Score distillation sampling (SDS) with classifier-free guidance and a landmark ControlNet.

DreamFusion (Poole et al. 2022, eq. 3): for a rendering x0 = g(theta), a timestep t and
noise eps ~ N(0, I), with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

    grad_theta L_SDS = E_{t, eps}[ w(t) (eps_hat(x_t; y, t) - eps) d x0 / d theta ]

where eps_hat is the diffusion model's (guided) noise prediction and the UNet Jacobian
is dropped. We write it as a loss whose gradient with respect to x0 is exactly
``w(t) (eps_hat - eps) / B`` (the batch mean of the per-camera terms):

    L = 0.5 * || x0 - stopgrad(x0 - w(t) (eps_hat - eps)) ||^2 / B.

HeadSculpt (Han et al. 2023, sec. 3.2) adds to this a MediaPipe-face ControlNet on the
head prior's landmark image for every camera except back views, and view-dependent
prompts; it weights with w(t) = sqrt(abar_t) (1 - abar_t) (DreamFusion uses 1 - abar_t).

The pieces here are small and separately testable: a timestep schedule, a weighting,
an image encoder (SD's VAE, or the identity for the oracle), a noise predictor (any
callable ``(x_t, t, batch) -> eps_hat``: the text-to-image UNet below, IESD, InstructPix2Pix
or the oracle), and :class:`ScoreDistillation`, which ties them together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from avatar.guidance.errors import GuidanceError
from avatar.guidance.prompts import LANDMARK_VIEWS, VIEWS, ViewPromptEmbeddings, view_labels
from avatar.seeding import draw

WEIGHTINGS = ("headsculpt", "dreamfusion", "uniform")
"""w(t) options: ``headsculpt`` sqrt(abar)(1 - abar) (HeadSculpt's released code), ``dreamfusion``
1 - abar (DreamFusion's sigma_t^2), ``uniform`` 1."""

ANNEALING = ("none", "linear", "sqrt")


def sds_weight(alpha_bar: torch.Tensor, kind: str = "headsculpt") -> torch.Tensor:
    """w(t) from abar_t (any shape)."""
    if kind == "headsculpt":
        return alpha_bar.sqrt() * (1 - alpha_bar)
    if kind == "dreamfusion":
        return 1 - alpha_bar
    if kind == "uniform":
        return torch.ones_like(alpha_bar)
    raise GuidanceError(f"unknown SDS weighting '{kind}': choose one of {', '.join(WEIGHTINGS)}")


@dataclass
class TimestepSchedule:
    """Which diffusion timesteps score distillation samples at each optimisation step.

    ``t_range`` is a fraction of the schedule (HeadSculpt: coarse [0.02, 0.98], fine
    [0.02, 0.5]); integer bounds are ``int(T * fraction)`` as in its code.

    anneal:
      ``none``   t ~ U{lo, ..., hi} every step;
      ``linear`` the upper bound falls linearly from hi to ``anneal_to`` over the stage
                 (large-noise steps settle the shape early, small-noise steps refine late);
      ``sqrt``   a deterministic t = hi - (hi - lo) sqrt(step / steps), the same for the whole
                 batch (HiFA's square-root schedule).
    """

    t_range: tuple[float, float] = (0.02, 0.98)
    total_steps: int = 1
    anneal: str = "none"
    anneal_to: float = 0.5
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise GuidanceError(f"t_range {self.t_range} must satisfy 0 <= low < high <= 1")
        if self.anneal not in ANNEALING:
            raise GuidanceError(f"unknown timestep annealing '{self.anneal}': choose one of {', '.join(ANNEALING)}")

    def bounds(self, step: int) -> tuple[int, int]:
        """Inclusive integer timestep bounds at ``step``."""
        n = self.num_train_timesteps
        lo = int(n * self.t_range[0])
        hi = min(int(n * self.t_range[1]), n - 1)
        frac = min(max(step / max(self.total_steps - 1, 1), 0.0), 1.0)
        if self.anneal == "linear":
            end = min(max(int(n * self.anneal_to), lo), hi)
            hi = round(hi - (hi - end) * frac)
        elif self.anneal == "sqrt":
            lo = hi = round(hi - (hi - lo) * math.sqrt(frac))
        return lo, hi

    def sample(self, batch_size: int, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B,)`` int64 timesteps on the generator's device (the CPU without one)."""
        lo, hi = self.bounds(step)
        return draw(torch.randint, lo, hi + 1, (batch_size,), generator=generator, dtype=torch.long)


# ---------------------------------------------------------------------------
# Image encoders: renders -> the space the diffusion model denoises


def to_channels_first(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """``(B, H, W, 3)`` renders (the renderer's layout) -> ``(B, 3, H, W)`` float."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise GuidanceError(f"{name} must be (B, H, W, 3) RGB in [0, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise GuidanceError(f"{name} must be a float tensor in [0, 1], got {images.dtype}")
    return images.permute(0, 3, 1, 2)


def resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` (no-op when it already matches)."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def compiled(fn: Callable[..., Any], enabled: bool = True) -> Callable[..., Any]:
    """``torch.compile(fn)`` with static shapes (each stage feeds fixed sizes, so each graph compiles
    once; a new size compiles a new static graph instead of a slower dynamic one); ``fn`` if not enabled."""
    return torch.compile(fn, dynamic=False) if enabled else fn


class VAEEncoder:
    """RGB renders -> Stable Diffusion latents, differentiably.

    images ``(B, 3, H, W)`` in [0, 1] are resized to ``resolution`` (SD 1.5 is trained at
    512), mapped to [-1, 1], encoded, and a posterior sample is scaled by the VAE's
    ``scaling_factor`` (0.18215 for SD 1.5), as HeadSculpt's ``encode_imgs`` does.
    compile: ``torch.compile`` the encoder (the VAE module itself is left as it is: it may be shared).
    """

    def __init__(self, vae: Any, resolution: int = 512, dtype: torch.dtype | None = None, compile: bool = False):
        self.vae = vae
        self.resolution = int(resolution)
        self.dtype = dtype or torch.float32
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._encode = compiled(self._moments, compile)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior's parameters (mean and log-variance, ``(B, 2C, h, w)``): what AutoencoderKL
        builds its ``latent_dist`` from, returned as a tensor so that a compiled graph ends there."""
        return self.vae.encode(x).latent_dist.parameters

    def _posterior(self, images: torch.Tensor) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        x = resize(images, (self.resolution, self.resolution)) * 2 - 1
        return DiagonalGaussianDistribution(self._encode(x.to(self.dtype)))

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        post = self._posterior(images)
        eps = draw(torch.randn, post.mean.shape, generator=generator, dtype=torch.float32, device=post.mean.device)
        z = post.mean.float() + post.std.float() * eps
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic latents (posterior mean) of a target image."""
        return self._posterior(images).mean.float() * self.vae.config.scaling_factor


class TinyAEEncoder:
    """RGB renders -> Stable Diffusion latents through TAESD (diffusers' ``AutoencoderTiny``).

    TAESD is distilled to give SD's latents directly, already in the UNet's scale: its encoder
    output is deterministic (no posterior to sample) and its config's ``scaling_factor`` is 1.0,
    which we still apply, as diffusers' pipelines do (``vae.encode(x).latents *
    vae.config.scaling_factor``). Its input is [-1, 1] like SD's VAE (``EncoderTiny`` maps it to
    [0, 1] itself). Its encoder costs about a ninth of SD's VAE encoder, forward and backward.
    """

    def __init__(self, ae: Any, resolution: int = 512, dtype: torch.dtype | None = None, compile: bool = False):
        self.ae = ae
        self.resolution = int(resolution)
        self.dtype = dtype or torch.float32
        cfg = ae.config
        self.scale_factor = 2 ** (len(getattr(cfg, "encoder_block_out_channels", cfg.block_out_channels)) - 1)
        self._encode = compiled(self._latents, compile)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(x).latents

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = resize(images, (self.resolution, self.resolution)) * 2 - 1
        return self._encode(x.to(self.dtype)).float() * self.ae.config.scaling_factor

    @torch.no_grad()
    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


class RGBEncoder:
    """The identity "VAE" of the oracle guidance: x0 = 2 rgb - 1 at the render's resolution.

    Working in RGB space makes the oracle independent of any learned model: its
    denoiser points straight at the target pixels.
    """

    scale_factor = 1

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images.float() * 2 - 1

    @torch.no_grad()
    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * 2 - 1


# ---------------------------------------------------------------------------
# Noise predictors


@dataclass
class GuidanceBatch:
    """What a noise predictor may need besides x_t and t, per camera of the batch."""

    cameras: Any
    """The renderer's cameras (opaque here; the oracle renders its target with them)."""
    views: list[str]
    """``front`` / ``side`` / ``back`` / ``overhead`` per camera."""
    control_images: torch.Tensor | None = None
    """Landmark images of the head prior, ``(B, 3, H, W)`` in [0, 1]."""
    source_images: torch.Tensor | None = None
    """Renderings of the frozen source avatar from the same cameras (editing), ``(B, 3, H, W)``."""
    step: int = 0


class NoisePredictor(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, batch: GuidanceBatch) -> torch.Tensor:
        """eps_hat, same shape as ``x_t`` ``(B, C, h, w)``."""
        ...


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + s (eps_c - eps_u) (Ho & Salimans 2022).

    HeadSculpt's generation code writes eps_c + s (eps_c - eps_u), i.e. scale s + 1 in
    this form; we use the standard form, in which s = 1 means no guidance.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def control_scale_factor(net: Any) -> int:
    """Image pixels per latent pixel that a ControlNet's conditioning embedding expects (8 for SD)."""
    cfg = getattr(net, "config", None)
    channels = getattr(cfg, "conditioning_embedding_out_channels", None)
    if channels is None and isinstance(cfg, dict):
        channels = cfg.get("conditioning_embedding_out_channels")
    return 2 ** (len(channels) - 1) if channels else 1


@dataclass
class ControlBranch:
    """One ControlNet applied to the cameras whose view is in ``views``."""

    net: Any
    images: torch.Tensor
    """``(B, 3, H, W)`` in [0, 1]; resized to the latent size times ``factor``."""
    scale: float = 1.0
    views: frozenset[str] = frozenset(VIEWS)
    factor: int | None = None

    def __post_init__(self) -> None:
        if self.factor is None:
            self.factor = control_scale_factor(self.net)


def unet_predictions(unet: Any, x_t: torch.Tensor, t: torch.Tensor, embeddings: Sequence[torch.Tensor],
                     branches: Sequence[ControlBranch] = (), views: Sequence[str] | None = None,
                     extra_inputs: Sequence[torch.Tensor | None] | None = None,
                     dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """UNet noise predictions of ``x_t`` under each text embedding, with ControlNet residuals.

    x_t ``(B, C, h, w)``, t ``(B,)``; embeddings: k tensors ``(B, L, D)`` (e.g. [uncond, cond]);
    extra_inputs: k optional tensors concatenated to x_t on channels (InstructPix2Pix's
    image latents). The cameras are grouped by which branches apply to their view (a
    back view skips the landmark ControlNet); each group runs once with its k
    conditions stacked on the batch axis. Residuals of several ControlNets are summed,
    as diffusers' ``MultiControlNetModel`` does. Returns k tensors ``(B, C_out, h, w)`` in fp32.
    """
    bsz, k = x_t.shape[0], len(embeddings)
    views = list(views) if views is not None else ["front"] * bsz
    dtype = dtype or x_t.dtype
    keys = [tuple(i for i, br in enumerate(branches) if v in br.views) for v in views]
    outs: list[torch.Tensor | None] = [None] * k
    for key in dict.fromkeys(keys):
        idx = torch.tensor([b for b in range(bsz) if keys[b] == key], device=x_t.device)
        parts = []
        for j in range(k):
            x = x_t[idx]
            if extra_inputs is not None and extra_inputs[j] is not None:
                x = torch.cat([x, extra_inputs[j][idx].to(x)], dim=1)
            parts.append(x)
        x = torch.cat(parts).to(dtype)
        tt = t[idx].repeat(k)
        enc = torch.cat([e[idx] for e in embeddings]).to(dtype)
        down, mid = None, None
        for i in key:
            br = branches[i]
            size = (x.shape[-2] * br.factor, x.shape[-1] * br.factor)
            cond = resize(br.images[idx].float(), size).to(dtype).repeat(k, 1, 1, 1)
            d, m = br.net(x, tt, encoder_hidden_states=enc, controlnet_cond=cond, conditioning_scale=br.scale,
                          return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        eps = unet(x, tt, encoder_hidden_states=enc, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, return_dict=False)[0].float()
        for j, chunk in enumerate(eps.chunk(k)):
            if outs[j] is None:
                outs[j] = torch.empty((bsz, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
            outs[j][idx] = chunk  # type: ignore[index]
    return outs  # type: ignore[return-value]


class TextToImagePredictor:
    """Text-to-image UNet with classifier-free guidance and an optional landmark ControlNet.

    eps_hat = eps_u + s (eps_c - eps_u), both with the ControlNet's residuals on the
    landmark image for every view but the back (HeadSculpt routes back views around the
    MediaPipe ControlNet, which knows only faces). The
    unconditional branch uses the negative prompt.
    """

    def __init__(self, unet: Any, prompts: ViewPromptEmbeddings, guidance_scale: float = 100.0,
                 controlnet: Any = None, controlnet_scale: float = 1.0,
                 control_views: Sequence[str] = LANDMARK_VIEWS, dtype: torch.dtype | None = None):
        self.unet = unet
        self.prompts = prompts
        self.guidance_scale = float(guidance_scale)
        self.controlnet = controlnet
        self.controlnet_scale = float(controlnet_scale)
        self.control_views = frozenset(control_views)
        self.dtype = dtype or torch.float32

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, batch: GuidanceBatch) -> torch.Tensor:
        cond, uncond = self.prompts.select(batch.views, x_t.device, self.dtype)
        branches = []
        if self.controlnet is not None:
            if batch.control_images is None:
                if any(v in self.control_views for v in batch.views):
                    raise GuidanceError("this guidance has a landmark ControlNet: pass control_images "
                                        "(the head prior's landmark image per camera)")
            else:
                branches.append(ControlBranch(self.controlnet, batch.control_images, self.controlnet_scale,
                                              self.control_views))
        eps_u, eps_c = unet_predictions(self.unet, x_t, t, [uncond, cond], branches, batch.views, dtype=self.dtype)
        return classifier_free_guidance(eps_u, eps_c, self.guidance_scale)


# ---------------------------------------------------------------------------
# The loss


def sds_gradient(eps_hat: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor, grad_clip: float | None = None,
                 grad_norm_max: float | None = None) -> torch.Tensor:
    """w(t) (eps_hat - eps), then optional element-wise clipping (HeadSculpt's ``grad_clip``) and
    per-camera L2-norm clipping; NaNs/infs become 0 (fp16 overflow must not poison the field)."""
    grad = weight.view(-1, *([1] * (eps_hat.ndim - 1))) * (eps_hat - noise)
    if grad_clip is not None and grad_clip > 0:
        grad = grad.clamp(-grad_clip, grad_clip)
    if grad_norm_max is not None and grad_norm_max > 0:
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        grad = grad * (grad_norm_max / norms).clamp(max=1.0).view(-1, *([1] * (grad.ndim - 1)))
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def score_distillation_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||latents - stopgrad(latents - grad)||^2 / B, whose gradient w.r.t. latents is grad / B."""
    target = (latents - grad).detach()
    return 0.5 * F.mse_loss(latents.float(), target.float(), reduction="sum") / latents.shape[0]


@dataclass
class SDSOutput:
    """One score-distillation step."""

    loss: torch.Tensor
    """Scalar; backpropagate it (its gradient on ``latents`` is ``grad / B``)."""
    grad: torch.Tensor
    """w(t)(eps_hat - eps) after clipping, ``(B, C, h, w)`` (detached)."""
    latents: torch.Tensor
    """x0: the encoded rendering (detached)."""
    noise: torch.Tensor
    eps_hat: torch.Tensor
    t: torch.Tensor
    """``(B,)`` int64 timesteps."""
    weight: torch.Tensor
    """``(B,)`` w(t)."""
    extras: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Scalars for ``metrics.jsonl``."""
        return {"sds_loss": float(self.loss.detach()), "sds_t": float(self.t.float().mean()),
                "sds_grad_norm": float(self.grad.flatten(1).norm(dim=1).mean())}


class ScoreDistillation:
    """A guidance: renders in, a loss out whose gradient is the SDS gradient.

    Components are passed in (diffusers' style): ``predictor`` maps (x_t, t, batch) to
    eps_hat; ``encoder`` maps renders to the predictor's space (:class:`VAEEncoder` or
    :class:`RGBEncoder`); ``alphas_cumprod`` ``(T,)`` is the noise schedule. Build one with
    :func:`avatar.guidance.make_guidance` rather than by hand.

    Randomness (timesteps, noise, the VAE posterior sample) comes from one CPU generator
    seeded with ``seed``; :meth:`state_dict` captures it so a resumed run continues the
    same sequence.
    """

    def __init__(self, predictor: NoisePredictor | Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor, *,
                 encoder: Any, timesteps: TimestepSchedule | None = None, weighting: str = "headsculpt",
                 grad_clip: float | None = None, grad_norm_max: float | None = None, seed: int = 0,
                 device: Any = "cpu", kind: str = "diffusion", records: dict[str, Any] | None = None,
                 notes: Sequence[str] = ()):
        sds_weight(torch.zeros(1), weighting)  # validate early
        self.predictor = predictor
        self.device = torch.device(device)
        self.alphas_cumprod = alphas_cumprod.detach().float().to(self.device)
        self.encoder = encoder
        self.timesteps = timesteps or TimestepSchedule(num_train_timesteps=len(alphas_cumprod))
        self.weighting = weighting
        self.grad_clip = grad_clip
        self.grad_norm_max = grad_norm_max
        self.generator = torch.Generator().manual_seed(int(seed))
        self.kind = kind
        """``diffusion`` (real weights), ``tiny`` (random weights: images mean nothing) or ``oracle``."""
        self.records = dict(records or {})
        """Model ids and revisions, for the run record."""
        self.notes = list(notes)
        """What was applied (memory options, textual inversion ...), for the run log."""

    # -- stage hand-over -------------------------------------------------------
    def set_stage(self, t_range: tuple[float, float], total_steps: int, anneal: str = "none",
                  anneal_to: float = 0.5) -> None:
        """Use a stage's timestep range and annealing (coarse and fine stages differ)."""
        self.timesteps = TimestepSchedule(tuple(t_range), int(total_steps), anneal, anneal_to,  # type: ignore[arg-type]
                                          len(self.alphas_cumprod))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    # -- the step ----------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (the DDPM forward process; equals the
        scheduler's ``add_noise``)."""
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def score_distillation(self, images: torch.Tensor, cameras: Any, control_images: torch.Tensor | None = None,
                           step: int = 0, *, source_images: torch.Tensor | None = None, as_latent: bool = False,
                           t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> SDSOutput:
        """One SDS evaluation.

        images: renders ``(B, H, W, 3)`` in [0, 1] (encoded by the VAE at its resolution),
            or with ``as_latent`` latents ``(B, C, h, w)`` passed straight to the denoiser.
        cameras: the cameras of the renders; their ``views`` labels pick prompts and routing.
        control_images: the prior's landmark images ``(B, H, W, 3)`` in [0, 1].
        source_images: the frozen source avatar rendered from the same cameras (editing).
        step: the stage's step (timestep annealing).
        t, noise: fix the timesteps ``(B,)`` and noise (tests); sampled otherwise.
        """
        bsz = images.shape[0]
        views = view_labels(cameras, bsz)
        if as_latent:
            if images.ndim != 4:
                raise GuidanceError(f"latents must be (B, C, h, w), got shape {tuple(images.shape)}")
            x0 = images.float()
        else:
            x0 = self.encoder.encode(to_channels_first(images).to(self.device), self.generator)
        batch = GuidanceBatch(
            cameras=cameras, views=views, step=step,
            control_images=None if control_images is None else
            to_channels_first(control_images, "control_images").to(self.device).float(),
            source_images=None if source_images is None else
            to_channels_first(source_images, "source_images").to(self.device).float(),
        )
        if t is None:
            t = self.timesteps.sample(bsz, step, self.generator)
        t = t.to(self.device).long()
        if noise is None:
            noise = draw(torch.randn, x0.shape, generator=self.generator, dtype=torch.float32, device=x0.device)
        noise = noise.to(x0.device, torch.float32)
        with torch.no_grad():
            x_t = self.add_noise(x0.detach(), noise, t)
            eps_hat = self.predictor(x_t, t, batch).float()
        if eps_hat.shape != x0.shape:
            raise GuidanceError(f"noise predictor returned {tuple(eps_hat.shape)} for latents {tuple(x0.shape)}")
        weight = sds_weight(self.alphas_cumprod[t], self.weighting)
        grad = sds_gradient(eps_hat, noise, weight, self.grad_clip, self.grad_norm_max)
        loss = score_distillation_loss(x0, grad)
        # The share of the prediction that was NaN or infinite (zeroed in the gradient): the loop
        # reads it back with its other numbers, warns, and stops a stage that learns nothing.
        nonfinite = (~torch.isfinite(eps_hat)).float().mean()
        return SDSOutput(loss, grad, x0.detach(), noise, eps_hat, t, weight, extras={"nonfinite": nonfinite})

    __call__ = score_distillation
