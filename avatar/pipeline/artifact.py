"""A finished avatar read back from its folder: what edit and export start from.

Every kind of run folder (``generate``, ``import``, ``edit``) ends with a checkpoint
whose state holds ``mesh`` (the final surface, field units, with its frame) and,
when the fine stage ran, ``fine`` (the DMTet geometry, the texture field and their
optimiser). :func:`load_avatar` rebuilds the modules from that state and the run's
``config.yaml`` (which gives the sizes of the fields), without building any
guidance or optimiser. Nothing in the folder is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avatar.errors import AvatarError
from avatar.fields.frame import FieldFrame

RUN_KINDS = ("generate", "import", "edit")


class ArtifactError(AvatarError, RuntimeError):
    """A run folder cannot be used as a finished avatar; the message says why and what to do."""


@dataclass
class LoadedAvatar:
    """A finished avatar.

    vertices / faces: the final surface in field units (``frame.to_metres`` gives metres).
    geometry / texture: the fine stage's :class:`~avatar.fields.dmtet.DMTetGeometry` and
    :class:`~avatar.fields.dmtet.TextureField` (None for a coarse-only run).
    albedo: callable (N, 3) field units -> (N, 3) colour in [0, 1] (the texture field, or
    the coarse NeRF's albedo for a coarse-only run).
    info: the folder's ``run.json``; config: its ``config.yaml`` as a plain dict.
    prompt: the prompt of the avatar (an edit keeps its source's); prior_spec: the head prior.
    checkpoint / checkpoint_sha256: the checkpoint read and its hash (edits record it).
    """

    root: Path
    kind: str
    frame: FieldFrame
    vertices: torch.Tensor
    faces: torch.Tensor
    albedo: Callable[[torch.Tensor], torch.Tensor]
    geometry: Any = None
    texture: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    prior_spec: str = "auto"
    checkpoint: Path | None = None
    checkpoint_sha256: str = ""

    @property
    def vertices_metres(self) -> torch.Tensor:
        return self.frame.to_metres(self.vertices)

    @property
    def has_fine(self) -> bool:
        return self.geometry is not None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _stage_config(section: dict[str, Any] | None, cls: type) -> Any:
    from avatar.config import from_dict

    return from_dict(cls, section or {}, source="config.yaml")


def load_avatar(run: str | Path | Any, device: str | torch.device = "cpu", need_fine: bool = False) -> LoadedAvatar:
    """Read the finished avatar of a run, import or edit folder (a path or a Workspace).

    need_fine: raise :class:`ArtifactError` when the run has no fine stage (edits need one).
    Raises :class:`ArtifactError` for an unfinished run, a folder that is not a run, or a
    run written by a newer avatar.
    """
    from avatar.config import CONFIG_VERSION, EngineConfig, FineStageConfig
    from avatar.workspace import Workspace

    ws = run if isinstance(run, Workspace) else Workspace.open(run)
    info = ws.read_info()
    kind = str(info.get("kind", "generate"))
    if kind not in RUN_KINDS:
        raise ArtifactError(f"{ws.root} is a '{kind}' folder, not an avatar run: pass a generate, import or edit "
                            "folder")
    raw = _saved_config(ws.config_path)
    version = raw.get("config_version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ArtifactError(f"{ws.root} was written by a newer avatar (config version {version}, this one reads "
                            f"{CONFIG_VERSION}): upgrade avatar (pip install -U avatar) to use it")
    path = ws.latest_checkpoint()
    if path is None:
        raise ArtifactError(f"run {ws.root} has no checkpoint: it never started; run it again")
    ckpt = ws.load_checkpoint(path)
    state = ckpt["state"]
    mesh = state.get("mesh")
    if mesh is None:
        raise ArtifactError(f"run {ws.root} has not finished (its last checkpoint is step {ckpt['step']}): "
                            f"resume it with 'avatar generate --resume {ws.root}' (or 'avatar edit --resume')")
    frame = FieldFrame.from_dict(mesh["frame"])
    device = torch.device(device)
    engines = _stage_config(raw.get("engines"), EngineConfig)
    geometry = texture = None
    if state.get("fine") is not None:
        from avatar.fields.dmtet import DMTetGeometry, TextureField
        from avatar.pipeline.generate import field_options

        fine_cfg = _stage_config(raw.get("fine"), FineStageConfig)
        try:
            # The grid comes from the checkpoint (its spec, or the grid older ones stored), built
            # once on ``device``: never from the config's resolution.
            geometry = DMTetGeometry.from_state_dict(state["fine"]["geometry"], frame, fine_cfg.deform_scale, device)
            texture = TextureField(frame, engine=engines.hashgrid, **field_options(fine_cfg, device))
            texture.load_state_dict(state["fine"]["texture"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ArtifactError(f"the checkpoint {path} does not fit the field sizes in {ws.config_path} "
                                f"({' '.join(str(exc).split())[:200]}): restore the run's own config.yaml") from exc
        geometry, texture = geometry.eval(), texture.to(device).eval()
        albedo: Callable[[torch.Tensor], torch.Tensor] = texture
    elif need_fine:
        raise ArtifactError(f"run {ws.root} has no fine stage (it ran with fine.steps=0): edits need the fine "
                            "mesh; run generate with fine steps, or resume this run with more fine steps")
    elif state.get("coarse") is not None:
        albedo = _coarse_albedo(state["coarse"], raw, frame, engines, device)
    else:
        def albedo(points: torch.Tensor) -> torch.Tensor:
            return torch.full_like(points, 0.7)
    return LoadedAvatar(
        root=ws.root, kind=kind, frame=frame, vertices=mesh["vertices"].float().to(device),
        faces=mesh["faces"].long().to(device), albedo=albedo, geometry=geometry, texture=texture, info=info,
        config=raw, prompt=str(info.get("prompt", raw.get("prompt", ""))),
        prior_spec=str(info.get("prior", (raw.get("prior") or {}).get("spec", "auto"))), checkpoint=path,
        checkpoint_sha256=file_sha256(path))


def _saved_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as a plain dict. It holds the sizes of the run's fields, which no
    default may stand in for, so a missing, unreadable or garbled file is an
    :class:`ArtifactError` (one line, naming the file), never the defaults."""
    from avatar.config import ConfigError, read_config_file

    if not path.is_file():
        raise ArtifactError(f"{path} is missing: it records the run's settings (the sizes of its fields), which "
                            "export and edit need; restore it from a backup of the run folder")
    try:
        raw = read_config_file(path)
    except ConfigError as exc:
        raise ArtifactError(f"{exc}; it records the run's settings, which export and edit need") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} is not a mapping of config keys (it holds a {type(raw).__name__}): restore the "
                            "run's config.yaml from a backup of the run folder")
    return raw


def _coarse_albedo(state: dict[str, Any], raw: dict[str, Any], frame: FieldFrame, engines: Any,
                   device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from avatar.config import CoarseStageConfig
    from avatar.fields.nerf import NeRFField
    from avatar.pipeline.generate import field_options

    cfg = _stage_config(raw.get("coarse"), CoarseStageConfig)
    nerf = NeRFField(frame, prior_sdf=None, sdf_width=cfg.prior_sdf_width, engine=engines.hashgrid,
                     **field_options(cfg, device))
    weights = dict(state["field"])
    nerf.prior_sdf_grid = weights.pop("prior_sdf_grid", nerf.prior_sdf_grid)  # sized by the run, not by us
    nerf.load_state_dict(weights, strict=False)
    nerf = nerf.to(device).eval()

    def albedo(points: torch.Tensor) -> torch.Tensor:
        return nerf(points)[1]

    return albedo


__all__ = ["ArtifactError", "LoadedAvatar", "RUN_KINDS", "file_sha256", "load_avatar"]
