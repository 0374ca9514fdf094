"""Text edits of a finished avatar: identity-aware editing score distillation (IESD).

HeadSculpt's editing (docs/DESIGN.md, "The method" step 4): only the fine stage is
tuned. The source avatar (a generate, import or earlier edit folder) is read with
:func:`~avatar.pipeline.artifact.load_avatar`; its DMTet geometry and texture field
start the live fine stage, and a frozen copy of it is the identity reference. Every
step renders that reference from the step's cameras as albedo with ambient 1 (no light,
white background), as HeadSculpt renders its frozen copy for the InstructPix2Pix
ControlNet (its ``run_dmtet`` with albedo shading, ambient 1.0), never with the step's
random shading; the guidance (:func:`~avatar.guidance.make_edit_guidance`) mixes

    eps_hat = eps_src + w_edit (eps_edit - eps_src)

where the identity term eps_src sees the source prompt, the prior's landmark image
and the reference rendering (InstructPix2Pix ControlNet), and the edit term the
instruction; ``strength`` is w_edit. With the ``oracle:MESH`` guidance the two terms
pull toward the reference and toward MESH, each rendered with the step's shading and
light like the live rendering (the IESD oracle pair the tests use): a real denoiser
conditioned on the albedo reference still predicts the identity as the noisy, shaded
rendering shows it, so the oracle's identity target is the reference shaded alike, not
the albedo ControlNet image.

The loop is generate's (:class:`~avatar.pipeline.generate.GenerateRun`): a run with
no coarse stage whose fine stage starts from the source, so checkpoints, bit-identical
resume, Ctrl-C, NaN rollback, progress bar, previews and metrics behave as there.
``texture_only`` freezes the SDF and the vertex offsets (their learning rates are 0
and they take no gradient), so the surface stays exactly the source's; textureless
shading is then never sampled (it shows only the locked geometry: no gradient at all).

Configuration: an :class:`~avatar.config.EditConfig` (saved as the edit's
``config.yaml``). The loop itself runs on a :class:`~avatar.config.GenerateConfig`
composed from it (:func:`loop_config`): the source's prior and guidance model, the
edit's cameras and fine-stage settings, no coarse stage. The fine stage continues the
source's fields, so their sizes (:data:`SOURCE_FINE_FIELDS`: DMTet resolution and
box, offset bound, hash-grid sizes, MLP width) always come from the source's config, whatever the
edit preset says; :func:`resolve_edit_config` copies them into the edit's config, so
the saved config describes the edit folder's own checkpoints (which is what
``load_avatar`` and ``avatar export`` read) and a chained edit finds them there.

Output: ``SOURCE/edits/<slug(instruction)>-<timestamp>/`` (``output_root`` is not
used), holding config.yaml, run.json (kind ``edit``, the source folder and its
checkpoint's SHA-256, the instructions applied so far, the source's guidance config
for chained edits), checkpoints (the last one holds the final mesh), previews,
metrics.jsonl and ``previews/before-after.png`` (source and edit from the same
cameras). The source folder is only read.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from avatar.errors import AvatarError
from avatar.fields.frame import FieldFrame
from avatar.pipeline.generate import (
    PREVIEW_VIEWS,
    GenerateError,
    GenerateRun,
    MeshTarget,
    StepLook,
    nonfinite_term,
    validate_config,
)

SOURCE_FINE_FIELDS = ("dmtet_resolution", "grid_margin", "grid_headroom", "deform_scale", "n_levels",
                      "log2_hashmap_size", "max_resolution", "hidden")
"""Fine-stage config fields that size the source's modules: an edit always takes them from the source."""

BEFORE_AFTER = "before-after.png"
"""Name (in ``previews/``) of the grid of the source (top rows) and the edit (bottom rows)."""


class EditError(AvatarError, RuntimeError):
    """An edit cannot start or continue; the message says why and what to do."""


# ---------------------------------------------------------------------------
# Configuration


def _source(source_run: Any, device: Any = "cpu") -> Any:
    """``load_avatar`` of the source with its errors as :class:`EditError` (a LoadedAvatar passes through)."""
    from avatar.pipeline.artifact import LoadedAvatar, load_avatar

    if isinstance(source_run, LoadedAvatar):
        if not source_run.has_fine:
            raise EditError(f"run {source_run.root} has no fine stage: edits need the fine mesh")
        return source_run
    try:
        return load_avatar(source_run, device=device, need_fine=True)
    except AvatarError as exc:
        raise EditError(f"cannot edit {source_run}: {exc}") from exc


def source_guidance_config(source: Any) -> Any:
    """The :class:`~avatar.config.GuidanceConfig` the source avatar was made with (what IESD
    reuses: model, landmark ControlNet, negative prompt ...). An edit folder records its
    source's in run.json (``base_guidance``), so chained edits keep the original one."""
    from avatar.config import GuidanceConfig, from_dict

    data = source.info.get("base_guidance")
    if not isinstance(data, dict):
        data = source.config.get("guidance") if isinstance(source.config.get("guidance"), dict) else {}
    known = {f.name for f in dataclasses.fields(GuidanceConfig)}
    return from_dict(GuidanceConfig, {k: v for k, v in data.items() if k in known}, source=str(source.root))


def resolve_edit_config(cfg: Any, source: Any) -> Any:
    """A copy of ``cfg`` completed from the source: the fine-stage sizes
    (:data:`SOURCE_FINE_FIELDS`) and, when empty, the source prompt."""
    from avatar.config import FineStageConfig, from_dict

    cfg = dataclasses.replace(cfg, fine=dataclasses.replace(cfg.fine))
    src_fine = from_dict(FineStageConfig, source.config.get("fine") or {}, source=str(source.root))
    for name in SOURCE_FINE_FIELDS:
        setattr(cfg.fine, name, getattr(src_fine, name))
    if not cfg.source_prompt.strip():
        cfg.source_prompt = source.prompt
    return cfg


def loop_config(cfg: Any, source: Any) -> Any:
    """The :class:`~avatar.config.GenerateConfig` the generate loop runs an edit with: no
    coarse stage, the edit's fine stage and cameras, the source's prior and guidance
    (whose landmark ControlNet decides whether control images are made). ``prompt``
    is the instruction (it captions the previews)."""
    from avatar.config import CoarseStageConfig, GenerateConfig, PriorConfig, RunConfig

    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    fine = cfg.fine
    if cfg.texture_only:
        # A textureless render shows only the (locked) geometry: nothing to learn from it.
        # Nor does a normal map; and the normal warm-up would teach nothing either.
        albedo, lambert = fine.shading_probs[:2]
        total = albedo + lambert
        probs = (albedo / total, lambert / total, 0.0, 0.0) if total > 0 else (1.0, 0.0, 0.0, 0.0)
        fine = dataclasses.replace(fine, shading_probs=probs, normal_warmup_steps=0)
    return GenerateConfig(**shared, prompt=cfg.instruction, preset=cfg.preset,
                          prior=PriorConfig(spec=source.prior_spec), guidance=source_guidance_config(source),
                          cameras=cfg.cameras, coarse=CoarseStageConfig(steps=0), fine=fine)


def validate_edit(cfg: Any, source_run: Any) -> Any:
    """Check an edit before any work or folder: the config's values and the source
    (a finished run with a fine stage, written by this or an older avatar).
    Returns the source as a :class:`~avatar.pipeline.artifact.LoadedAvatar`.
    Raises :class:`EditError` naming the cause and the fix."""
    from avatar.guidance.factory import EDIT_MODES

    problems = []
    if not str(cfg.instruction).strip():
        problems.append("the instruction is empty: pass what to change, e.g. avatar edit RUN "
                        "\"give him a red woollen hat\"")
    if not 0.0 <= float(cfg.strength) <= 1.0:
        problems.append(f"strength must be in [0, 1] (0 keeps the source, 1 follows the instruction), "
                        f"got {cfg.strength}")
    if cfg.fine.steps < 1:
        problems.append(f"fine.steps (--steps) must be >= 1, got {cfg.fine.steps}")
    if cfg.guidance.mode not in EDIT_MODES:
        problems.append(f"guidance.mode must be one of {', '.join(EDIT_MODES)}, got '{cfg.guidance.mode}'")
    if problems:
        raise EditError("invalid edit config: " + "; ".join(problems))
    source = _source(source_run)
    try:
        validate_config(loop_config(resolve_edit_config(cfg, source), source))
    except GenerateError as exc:
        raise EditError(str(exc).replace("invalid generate config", "invalid edit config")) from exc
    return source


# ---------------------------------------------------------------------------
# The run


class EditRun(GenerateRun):
    """One edit (see the module docstring). Use :func:`run_edit`.

    cfg: an :class:`~avatar.config.EditConfig` already completed by :func:`resolve_edit_config`.
    source: the source's :class:`~avatar.pipeline.artifact.LoadedAvatar`.
    workspace: the edit folder; None until :func:`run_edit` creates it (after the
    guidance loaded, so a missing model leaves no empty folder).
    """

    kind = "edit"

    def __init__(self, cfg: Any, source: Any, workspace: Any = None, guidance: Any = None, progress: bool = True):
        self.edit_cfg = cfg
        self.source = source
        super().__init__(loop_config(cfg, source), workspace, guidance=guidance, progress=progress)
        if cfg.guidance.mode == "ip2p":
            self.use_control = False  # the InstructPix2Pix UNet reads no landmark image
        # The frozen identity reference: the source's final surface and texture field.
        self.source_vertices = source.vertices.to(self.device)
        self.source_faces = source.faces.to(self.device)
        self.source_texture = source.texture.to(self.device).requires_grad_(False).eval()
        from avatar.render.mesh import MeshRenderer

        self.source_renderer = MeshRenderer(cfg.engines.raster)

    # -- construction --------------------------------------------------------
    def _field_frame(self) -> FieldFrame:
        return self.source.frame

    def _make_guidance(self) -> Any:
        from avatar.guidance import make_edit_guidance
        from avatar.guidance.models import oracle_mesh

        cfg = self.edit_cfg
        mesh = oracle_mesh(cfg.guidance.model)
        if mesh is not None:
            self.target = MeshTarget(mesh, self.frame, cfg.engines.raster, self.device)
        f = cfg.fine
        return make_edit_guidance(cfg.guidance, cfg.source_prompt, cfg.instruction, self.device,
                                  strength=cfg.strength, seed=cfg.seed, base=self.cfg.guidance,
                                  render_edit=self.target,
                                  render_source=self.source_like_step if mesh is not None else None,
                                  t_range=tuple(f.t_range), total_steps=max(f.steps, 1),
                                  anneal=f.t_anneal, anneal_to=f.t_anneal_to)

    def _fine_grid(self) -> Any:
        """The source's DMTet grid (read from its checkpoint): the edit continues its SDF."""
        return self.source.geometry.spec

    def _build_fine(self) -> None:
        from avatar.pipeline.generate import FineStage

        fine = FineStage(self.cfg, self.frame, self.device, lambda p: p.new_zeros(p.shape[0]), self._fine_grid())
        fine.geometry.load_state_dict(self.source.geometry.state_dict())
        fine.texture.load_state_dict(self.source.texture.state_dict())
        self.fine = fine
        self._lock_geometry()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._lock_geometry()

    def _lock_geometry(self) -> None:
        """texture_only: no gradient to, and a zero learning rate for, the SDF and offsets."""
        if not self.edit_cfg.texture_only or self.fine is None:
            return
        for name in ("sdf", "deform"):
            getattr(self.fine.geometry, name).requires_grad_(False)
            self.fine.base_lrs[name] = 0.0
        self._apply_lr_scale()

    # -- one step --------------------------------------------------------------
    @torch.no_grad()
    def render_source(self, cameras: Any, look: Any = None) -> Any:
        """The frozen source avatar from ``cameras``: a RenderOutput (rgb (B, H, W, 3) in [0, 1]).
        look: a :class:`~avatar.pipeline.generate.StepLook`; None renders albedo over white
        (ambient 1, no light)."""
        if look is None:
            return self.source_renderer.render(cameras, self.source_vertices, self.source_faces,
                                               albedo=self.source_texture, background="white")
        return self.source_renderer.render(cameras, self.source_vertices, self.source_faces,
                                           albedo=self.source_texture, shading=look.shading, light=look.light,
                                           ambient=look.ambient, background=look.solid_background())

    def source_like_step(self, cameras: Any) -> torch.Tensor:
        """The frozen source rendered in this step's look (shading, light, ambient, backdrop), like
        the live rendering: (B, H, W, 3) in [0, 1]. The IESD oracle's identity target and the
        ``source_mse`` metric."""
        cached = getattr(self, "_source_like_step", None)
        if cached is not None and cached[0] is cameras:
            return cached[1]
        return self.render_source(cameras, self.look).rgb

    def objective(self, out: Any, cameras: Any, local_step: int
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """IESD: the InstructPix2Pix ControlNet sees the source as albedo with ambient 1 (HeadSculpt,
        docs/METHOD.md E2), whatever this step's shading; the live rendering is compared with the
        source shaded alike."""
        source = self.render_source(cameras).rgb  # albedo: ambient 1, no light
        plain = self.look.shading == "albedo" and isinstance(self.look.solid_background(), str)
        alike = source if plain else self.render_source(cameras, self.look).rgb
        self._source_like_step = (cameras, alike)
        control = self._control(cameras)
        sds = self.guidance.score_distillation(out.rgb, cameras, control_images=control, step=local_step,
                                               source_images=source)
        drift = (out.rgb.detach() - alike).pow(2).mean()
        loss = sds.loss
        terms = {"iesd": sds.loss.detach(), "source_mse": drift, **nonfinite_term(sds)}
        # The anchor belongs to the identity side of IESD, whose share is 1 - strength.
        weight = float(self.edit_cfg.lambda_anchor) * (1.0 - float(self.edit_cfg.strength))
        if weight > 0 and not self.edit_cfg.texture_only:
            geo = self.fine.geometry
            if getattr(self, "_anchor", None) is None:  # the source's values, on the live stage's device
                self._anchor = (self.source.geometry.sdf.detach().to(geo.sdf.device),
                                self.source.geometry.deform.detach().to(geo.deform.device))
            sdf0, deform0 = self._anchor
            anchor = (geo.sdf - sdf0).pow(2).sum() + (geo.deform - deform0).pow(2).sum()  # the SDF is in cells
            loss = loss + weight * anchor
            terms["anchor"] = anchor.detach()
        return loss, terms, sds.t.float().mean()

    # -- records -----------------------------------------------------------------
    def write_config(self) -> None:
        self.ws.save_config(self.edit_cfg)

    def write_info(self) -> None:
        cfg, src = self.edit_cfg, self.source
        from avatar.config import to_dict

        chain = [*src.info.get("edit_chain", []), cfg.instruction] if src.kind == "edit" else [cfg.instruction]
        self.ws.write_info(
            self.kind, cfg.seed, prompt=src.prompt, prior=src.prior_spec, instruction=cfg.instruction,
            source_prompt=cfg.source_prompt, strength=cfg.strength, texture_only=cfg.texture_only,
            source_run=str(Path(src.root).resolve()), source_kind=src.kind,
            source_checkpoint=os.path.relpath(Path(src.checkpoint).resolve(), Path(src.root).resolve()),
            source_checkpoint_sha256=src.checkpoint_sha256, edit_chain=chain,
            base_guidance=to_dict(self.cfg.guidance), guidance=self.guidance.kind,
            guidance_records=self.guidance.records, guidance_notes=self.guidance.notes, frame=self.frame.to_dict())

    def save_checkpoint(self, final_mesh: bool = False) -> Path:
        path = super().save_checkpoint(final_mesh)
        if final_mesh:
            self.write_before_after()
        return path

    @torch.no_grad()
    def write_before_after(self) -> Path:
        """``previews/before-after.png``: source albedo and normals, then the edit's, from the same cameras."""
        from avatar.render.cameras import orbit_cameras
        from avatar.render.preview import save_preview

        assert self.fine is not None
        cams = orbit_cameras(PREVIEW_VIEWS, elevation=15.0, radius=1.3, fov_y=40.0,
                             resolution=self.edit_cfg.fine.resolution, device=self.device)
        after = self.fine.preview(cams)
        channels = {"source": self.render_source(cams).rgb,
                    "source normal": self.render_source(cams, StepLook("normal")).rgb,
                    "edit": after["rgb"], "edit normal": after["normal"]}
        return save_preview(self.ws.previews_dir / BEFORE_AFTER, channels, prompt=self.edit_cfg.instruction,
                            step=self.step)


# ---------------------------------------------------------------------------
# Entry points


def run_edit(cfg: Any = None, source_run: Any = None, *, guidance: Any = None, progress: bool = True,
             stop_after: int | None = None, resume_dir: str | Path | None = None) -> dict[str, Any]:
    """Edit the avatar of ``source_run``, or with ``resume_dir`` continue an edit.

    cfg: an :class:`~avatar.config.EditConfig` (None with ``resume_dir``: the edit's own
    config.yaml is used; a given one is refused, since a resume must run as the edit began).
    source_run: a generate, import or edit folder (or a Workspace / LoadedAvatar). With
    ``resume_dir`` it defaults to the source recorded in the edit's run.json (or the
    folder two levels up), whose checkpoint must still have the recorded SHA-256.
    guidance: a ready :class:`~avatar.guidance.sds.ScoreDistillation` (tests); None builds
    the one ``cfg.guidance`` names (``oracle:MESH`` renders MESH as the edit target).
    stop_after: stop once this many steps are done, with a checkpoint there.
    Returns generate's summary (``run`` is the edit folder) plus ``source`` and
    ``before_after`` (the grid's path once finished).
    Raises :class:`EditError` before any folder exists for bad inputs (see :func:`validate_edit`).
    """
    from avatar.config import EditConfig
    from avatar.workspace import Workspace

    if resume_dir is not None:
        if cfg is not None:
            raise EditError("a resumed edit uses its own config.yaml: pass cfg=None with resume_dir")
        try:
            ws = Workspace.open(resume_dir)
            info = ws.read_info()
            cfg = ws.load_config(EditConfig)
        except AvatarError as exc:
            raise EditError(f"cannot resume the edit {resume_dir}: {exc}") from exc
        if info.get("kind") != "edit":
            raise EditError(f"{resume_dir} is not an edit folder (kind '{info.get('kind')}'): resume runs with "
                            "'avatar generate --resume'")
        if source_run is None:
            recorded = Path(str(info.get("source_run", "")))
            source_run = recorded if recorded.is_dir() else ws.root.parent.parent
        source = validate_edit(cfg, source_run)
        if source.checkpoint_sha256 != info.get("source_checkpoint_sha256"):
            raise EditError(f"the source {source.root} changed since this edit started (its checkpoint "
                            f"{source.checkpoint} no longer has the recorded SHA-256): the edit cannot continue "
                            "the same way; start a new edit")
        run = EditRun(resolve_edit_config(cfg, source), source, ws, guidance=guidance, progress=progress)
        summary = run.run(resume=True, stop_after=stop_after)
    else:
        if cfg is None or source_run is None:
            raise EditError("run_edit needs an EditConfig and a source run (or resume_dir)")
        source = validate_edit(cfg, source_run)
        cfg = resolve_edit_config(cfg, source)
        run = EditRun(cfg, source, None, guidance=guidance, progress=progress)
        run.ws = Workspace.create(Workspace(source.root).edits_dir, cfg.instruction)
        summary = run.run(stop_after=stop_after)
    grid = run.ws.previews_dir / BEFORE_AFTER
    summary.update(source=str(source.root), instruction=cfg.instruction,
                   before_after=str(grid) if summary["finished"] and grid.is_file() else None)
    return summary


__all__ = ["EditError", "EditRun", "SOURCE_FINE_FIELDS", "loop_config", "resolve_edit_config", "run_edit",
           "source_guidance_config", "validate_edit"]
