"""Build a guidance from the run config: plain functions, no registry.

``make_guidance`` (generation: SDS with the landmark ControlNet) and
``make_edit_guidance`` (editing: IESD, InstructPix2Pix, or the IESD oracle) load the
components (:mod:`.models`), encode the prompts once (:mod:`.prompts`), free the text
encoder, apply the memory options (:mod:`.memory`) and hand everything to a
:class:`~avatar.guidance.sds.ScoreDistillation`, whose image encoder is the model's VAE
(``guidance.encoder=sd``) or TAESD (``tiny-ae``). InstructPix2Pix's image latents always come
from the SD VAE (its posterior mode, as the model was trained).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from avatar.guidance import models as M
from avatar.guidance import tiny as _tiny
from avatar.guidance.errors import GuidanceError
from avatar.guidance.iesd import IESDPredictor, InstructPix2PixPredictor
from avatar.guidance.memory import MemoryOptions, apply_memory_options, guidance_dtype
from avatar.guidance.oracle import OracleEditPredictor, OraclePredictor, RenderFn
from avatar.guidance.prompts import TextEmbedder, encode_view_prompts, file_digest, load_back_view_embedding
from avatar.guidance.sds import (
    RGBEncoder,
    ScoreDistillation,
    TextToImagePredictor,
    TimestepSchedule,
    TinyAEEncoder,
    VAEEncoder,
)

EDIT_MODES = ("iesd", "ip2p")
ENCODERS = ("sd", "tiny-ae")
"""``guidance.encoder``: the model's own VAE, or TAESD (:class:`~avatar.guidance.sds.TinyAEEncoder`)."""

TINY_NOTICE = ("guidance 'tiny' has random weights: it exercises the pipeline, its images mean nothing")
ORACLE_NOTICE = "oracle guidance: reconstructs a known mesh (a diagnostic, not generation)"


def _opt(cfg: Any, name: str, default: Any) -> Any:
    """A config field that may not exist (yet) in this config class, or a None config."""
    return getattr(cfg, name, default)


def embedding_cache_key(record: dict[str, Any], extra: str = "") -> str:
    """What identifies a text encoder's outputs: id and revision (a local folder: its files' stamps)."""
    if record["kind"] == "local":
        folder = Path(record["id"]) / "text_encoder"
        stamp = ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob("*"))
                         if p.is_file())
        key = f"local:{record['id']}:{stamp}"
    else:
        key = f"{record['kind']}:{record['id']}@{record['revision']}"
    return key + (f"|{extra}" if extra else "")


def _text_embedder(model: M.DiffusionModel, where: torch.device, extra_key: str = "") -> TextEmbedder:
    if where.type == "cpu" and model.text_encoder.dtype == torch.float16:
        model.text_encoder.float()  # offloaded fp16 runs: encode the prompts once, in fp32, on the CPU
    return TextEmbedder(model.tokenizer, model.text_encoder, embedding_cache_key(model.record, extra_key), where)


def _free_text_encoder(model: M.DiffusionModel) -> None:
    model.text_encoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _schedule(t_range: tuple[float, float] | None, total_steps: int, anneal: str, anneal_to: float,
              n: int) -> TimestepSchedule:
    return TimestepSchedule(tuple(t_range or (0.02, 0.98)), int(total_steps), anneal, anneal_to,  # type: ignore[arg-type]
                            num_train_timesteps=n)


def _memory(cfg: Any, base: Any = None) -> MemoryOptions:
    """Memory options of ``cfg``, falling back to ``base`` (the source run's guidance) for those it lacks."""
    def get(name: str, default: bool) -> bool:
        return bool(_opt(cfg, name, _opt(base, name, default)))

    return MemoryOptions(half_precision=get("half_precision", True),
                         half_dtype=str(_opt(cfg, "half_dtype", _opt(base, "half_dtype", "auto"))),
                         attention_slicing=get("attention_slicing", False), cpu_offload=get("cpu_offload", False),
                         channels_last=get("channels_last", False), compile=get("compile", False))


def _encoder_name(name: str) -> str:
    name = str(name).strip().lower()
    if name not in ENCODERS:
        raise GuidanceError(f"unknown guidance.encoder '{name}': choose one of {', '.join(ENCODERS)}")
    return name


def _load_encoder(name: str, spec: str, tiny: bool, dtype: Any, where: torch.device, modules: dict[str, Any],
                  records: dict[str, Any], keep_vae: bool = False) -> None:
    """For ``tiny-ae``: load TAESD (the tiny family's own with ``tiny``) into ``modules['tiny_ae']``
    before the memory options are applied to it, and drop the SD VAE from ``modules`` unless
    ``keep_vae`` (InstructPix2Pix's image latents need it); ``sd`` uses the model's VAE, already loaded."""
    if name == "tiny-ae":
        modules["tiny_ae"], records["tiny_ae"] = M.load_tiny_autoencoder("tiny" if tiny else spec, dtype, where)
        if not keep_vae:
            modules.pop("vae", None)


def _load_device(device: torch.device, opts: MemoryOptions) -> torch.device:
    # Sequential offload wants the weights on the CPU; accelerate moves them layer by layer.
    return torch.device("cpu") if opts.cpu_offload and device.type == "cuda" else device


def make_oracle_guidance(render_target: RenderFn, *, device: Any = "cpu", seed: int = 0,
                         t_range: tuple[float, float] | None = None, total_steps: int = 1, anneal: str = "none",
                         anneal_to: float = 0.5, weighting: str = "headsculpt", grad_clip: float | None = None,
                         mesh: str | None = None) -> ScoreDistillation:
    """SDS whose denoiser reconstructs ``render_target(cameras)`` (RGB space; see :mod:`.oracle`)."""
    alphas = M.noise_schedule().alphas_cumprod
    return ScoreDistillation(
        OraclePredictor(render_target, alphas), alphas, encoder=RGBEncoder(),
        timesteps=_schedule(t_range, total_steps, anneal, anneal_to, len(alphas)), weighting=weighting,
        grad_clip=grad_clip, seed=seed, device=device, kind="oracle",
        records={"model": {"role": "oracle", "spec": f"oracle:{mesh}" if mesh else "oracle", "kind": "oracle",
                           "id": mesh, "revision": None}},
        notes=[ORACLE_NOTICE],
    )


def make_guidance(cfg: Any, prompt: str, device: Any = "cpu", *, seed: int = 0,
                  render_target: RenderFn | None = None, t_range: tuple[float, float] | None = None,
                  total_steps: int = 1, anneal: str = "none", anneal_to: float = 0.5) -> ScoreDistillation:
    """The generation guidance described by a :class:`~avatar.config.GuidanceConfig`.

    cfg.model: hub id / folder / ``tiny`` / ``oracle:MESH`` (then ``render_target`` must be
    given: it renders MESH for a batch of cameras). With ``tiny`` every part is tiny,
    including the landmark ControlNet unless ``cfg.controlnet`` is empty.
    t_range, total_steps, anneal, anneal_to: the first stage's timestep schedule (``set_stage``
    switches to the next stage's).
    """
    device = torch.device(device)
    weighting = _opt(cfg, "weighting", "headsculpt")
    grad_clip = _opt(cfg, "grad_clip", 0.0) or None
    mesh = M.oracle_mesh(cfg.model)
    if mesh is not None:
        if render_target is None:
            raise GuidanceError(f"guidance 'oracle:{mesh}' needs a renderer of the target mesh (render_target); "
                                "the generate pipeline supplies it")
        return make_oracle_guidance(render_target, device=device, seed=seed, t_range=t_range,
                                    total_steps=total_steps, anneal=anneal, anneal_to=anneal_to,
                                    weighting=weighting, grad_clip=grad_clip, mesh=mesh)
    opts = _memory(cfg)
    encoder = _encoder_name(_opt(cfg, "encoder", "sd"))
    dtype = guidance_dtype(device, opts.half_precision, opts.half_dtype)
    where = _load_device(device, opts)
    tiny = M.is_tiny(cfg.model)
    model = M.load_diffusion_model(cfg.model, M.TEXT2IMG, dtype, where)
    records: dict[str, Any] = {"model": model.record}
    notes: list[str] = [TINY_NOTICE] if tiny else []
    modules: dict[str, Any] = {"unet": model.unet, "vae": model.vae}
    cn_spec = cfg.controlnet.strip()
    if cn_spec:
        net, records["controlnet"] = M.load_controlnet("tiny" if tiny else cn_spec, M.LANDMARK_CONTROLNET, dtype,
                                                       where)
        modules["controlnet"] = net
    _load_encoder(encoder, _opt(cfg, "tiny_ae", M.DEFAULT_TINY_AE), tiny, dtype, where, modules, records)
    back_token, ti_digest = None, ""
    if cfg.back_view_embedding:
        back_token = load_back_view_embedding(cfg.back_view_embedding, model)
        ti_digest = file_digest(Path(cfg.back_view_embedding).expanduser())
        records["back_view_embedding"] = {"path": str(Path(cfg.back_view_embedding).expanduser().resolve()),
                                          "sha256": ti_digest, "token": back_token}
        notes.append(f"back views use the learned token {back_token}")
    embedder = _text_embedder(model, where, ti_digest)
    prompts = encode_view_prompts(embedder, prompt, cfg.negative_prompt, view_dependent=cfg.view_dependent_prompt,
                                  back_token=back_token)
    _free_text_encoder(model)
    modules, applied = apply_memory_options(modules, device, opts)
    predictor = TextToImagePredictor(modules["unet"], prompts, cfg.guidance_scale, modules.get("controlnet"),
                                     cfg.controlnet_scale, dtype=dtype)
    resolution = _tiny.TINY_IMAGE_SIZE if tiny else _opt(cfg, "vae_resolution", 512)
    return _diffusion_sds(predictor, model, modules, resolution, dtype, tiny, opts.compile,
                          _schedule(t_range, total_steps, anneal, anneal_to, len(model.scheduler.alphas_cumprod)),
                          weighting, grad_clip, seed, device, records, notes + applied)


def make_edit_guidance(cfg: Any, source_prompt: str, instruction: str, device: Any = "cpu", *,
                       strength: float = 1.0, seed: int = 0, base: Any = None,
                       render_edit: RenderFn | None = None, render_source: RenderFn | None = None,
                       t_range: tuple[float, float] | None = None, total_steps: int = 1,
                       anneal: str = "none", anneal_to: float = 0.5) -> ScoreDistillation:
    """The editing guidance described by an :class:`~avatar.config.EditGuidanceConfig`.

    strength: w_edit (0 keeps the source, 1 follows the instruction).
    base: the source run's :class:`~avatar.config.GuidanceConfig`. IESD reuses its text-to-image
    model, landmark ControlNet (and scale), negative prompt, back-view embedding and
    view-dependent prompting (the defaults when None); ``cfg`` fields of the same names,
    where they exist, take precedence. ``cfg.model`` is the ``ip2p`` mode's model; ``tiny``
    makes every part tiny in both modes.
    cfg.model ``oracle:MESH``: the IESD oracle pair, toward ``render_edit(cameras)`` (MESH)
    and the source (``render_source`` or the ``source_images`` of each call).
    The call then needs ``source_images`` (the source avatar from the same cameras) and,
    with a landmark ControlNet, ``control_images``.
    """
    device = torch.device(device)

    def inherit(name: str, default: Any) -> Any:
        return _opt(cfg, name, _opt(base, name, default))

    weighting = inherit("weighting", "headsculpt")
    grad_clip = inherit("grad_clip", 0.0) or None
    mesh = M.oracle_mesh(cfg.model)
    if mesh is not None:
        if render_edit is None:
            raise GuidanceError(f"guidance 'oracle:{mesh}' needs a renderer of the edit-target mesh (render_edit)")
        alphas = M.noise_schedule().alphas_cumprod
        return ScoreDistillation(
            OracleEditPredictor(render_edit, alphas, render_source=render_source, edit_weight=strength), alphas,
            encoder=RGBEncoder(), timesteps=_schedule(t_range, total_steps, anneal, anneal_to, len(alphas)),
            weighting=weighting, grad_clip=grad_clip, seed=seed, device=device, kind="oracle",
            records={"model": {"role": "oracle", "spec": cfg.model, "kind": "oracle", "id": mesh, "revision": None}},
            notes=[ORACLE_NOTICE],
        )
    mode = _opt(cfg, "mode", "iesd")
    if mode not in EDIT_MODES:
        raise GuidanceError(f"unknown edit guidance mode '{mode}': choose one of {', '.join(EDIT_MODES)}")
    opts = _memory(cfg, base)
    encoder = _encoder_name(inherit("encoder", "sd"))
    dtype = guidance_dtype(device, opts.half_precision, opts.half_dtype)
    where = _load_device(device, opts)
    tiny = M.is_tiny(cfg.model)
    notes: list[str] = [TINY_NOTICE] if tiny else []
    negative = inherit("negative_prompt", "")
    view_dependent = inherit("view_dependent_prompt", True)
    if mode == "ip2p":
        model = M.load_diffusion_model(cfg.model, M.INSTRUCT_PIX2PIX, dtype, where)
        records: dict[str, Any] = {"model": model.record}
        embedder = _text_embedder(model, where)
        # InstructPix2Pix is trained on bare instructions; its "no text" condition is the empty prompt.
        instruction_embeds = encode_view_prompts(embedder, instruction, "", view_dependent=False)
        _free_text_encoder(model)
        modules = {"unet": model.unet, "vae": model.vae}
        _load_encoder(encoder, inherit("tiny_ae", M.DEFAULT_TINY_AE), tiny, dtype, where, modules, records,
                      keep_vae=True)
        modules, applied = apply_memory_options(modules, device, opts)
        # The image latents InstructPix2Pix is conditioned on stay the SD VAE's (its posterior mode).
        predictor: Any = InstructPix2PixPredictor(
            modules["unet"], modules["vae"], instruction_embeds, text_scale=cfg.guidance_scale,
            image_scale=cfg.image_guidance_scale, dtype=dtype)
    else:
        base_spec = _opt(cfg, "base_model", "") or _opt(base, "model", M.DEFAULT_TEXT2IMG)
        if M.oracle_mesh(base_spec) is not None:  # a source made with the oracle: edit with the real model
            base_spec = M.DEFAULT_TEXT2IMG
        if M.is_tiny(base_spec) and not tiny:  # a tiny source run edits with tiny models throughout
            tiny, notes = True, [TINY_NOTICE]
        base_spec = "tiny" if tiny else base_spec
        lmk_spec = str(inherit("controlnet", M.DEFAULT_LANDMARK_CONTROLNET)).strip()
        id_spec = cfg.identity_controlnet.strip()
        model = M.load_diffusion_model(base_spec, M.TEXT2IMG, dtype, where)
        records = {"model": model.record}
        modules = {"unet": model.unet, "vae": model.vae}
        if lmk_spec:
            modules["controlnet_landmark"], records["controlnet"] = M.load_controlnet(
                "tiny" if tiny else lmk_spec, M.LANDMARK_CONTROLNET, dtype, where)
        if id_spec:
            modules["controlnet_identity"], records["identity_controlnet"] = M.load_controlnet(
                "tiny" if tiny else id_spec, M.IDENTITY_CONTROLNET, dtype, where)
        _load_encoder(encoder, inherit("tiny_ae", M.DEFAULT_TINY_AE), tiny, dtype, where, modules, records)
        back_token, ti_digest = None, ""
        back_file = inherit("back_view_embedding", "")
        if back_file:
            back_token = load_back_view_embedding(back_file, model)
            ti_digest = file_digest(Path(back_file).expanduser())
            records["back_view_embedding"] = {"path": str(Path(back_file).expanduser().resolve()),
                                              "sha256": ti_digest, "token": back_token}
        embedder = _text_embedder(model, where, ti_digest)
        source_embeds = encode_view_prompts(embedder, source_prompt, negative, view_dependent=view_dependent,
                                            back_token=back_token)
        edit_embeds = encode_view_prompts(embedder, instruction, negative, view_dependent=False)
        _free_text_encoder(model)
        modules, applied = apply_memory_options(modules, device, opts)
        predictor = IESDPredictor(
            modules["unet"], source_embeds, edit_embeds, landmark_controlnet=modules.get("controlnet_landmark"),
            identity_controlnet=modules.get("controlnet_identity"), guidance_scale=cfg.guidance_scale,
            edit_weight=strength, landmark_scale=inherit("controlnet_scale", 1.0),
            identity_scale=_opt(cfg, "identity_controlnet_scale", 1.0), dtype=dtype)
    resolution = _tiny.TINY_IMAGE_SIZE if tiny else inherit("vae_resolution", 512)
    return _diffusion_sds(predictor, model, modules, resolution, dtype, tiny, opts.compile,
                          _schedule(t_range, total_steps, anneal, anneal_to, len(model.scheduler.alphas_cumprod)),
                          weighting, grad_clip, seed, device, records, notes + applied)


def _diffusion_sds(predictor: Any, model: Any, modules: dict[str, Any], resolution: int, dtype: Any, tiny: bool,
                   compile: bool, timesteps: TimestepSchedule, weighting: str, grad_clip: float, seed: int,
                   device: Any, records: Any, notes: list[str]) -> ScoreDistillation:
    """The score distillation both text-to-image and editing guidance end in: the model's noise
    schedule, and as the image encoder TAESD where it was loaded (``modules['tiny_ae']``), else
    the model's VAE."""
    if "tiny_ae" in modules:
        encoder: Any = TinyAEEncoder(modules["tiny_ae"], resolution, dtype, compile=compile)
        notes = [*notes, "image encoder: tiny-ae (TAESD)"]
    else:
        encoder = VAEEncoder(modules["vae"], resolution, dtype, compile=compile)
    return ScoreDistillation(
        predictor, model.scheduler.alphas_cumprod, encoder=encoder,
        timesteps=timesteps, weighting=weighting,
        grad_clip=grad_clip, seed=seed, device=device, kind="tiny" if tiny else "diffusion", records=records,
        notes=notes,
    )
