"""``avatar import MESH``: fit the fine-stage representation to a head the user already has.

The same loop as generate (:class:`~avatar.pipeline.generate.GenerateRun`: cameras,
DMTet geometry, texture field, mesh renderer, checkpoints, resume, Ctrl-C, NaN
rollback, previews, metrics) with a multi-view reconstruction objective in place
of score distillation. Every step renders the imported mesh from the step's
cameras with the step's shading and compares:

- colour: mean squared error of the shaded renders (the texture field learns the
  mesh's texture or vertex colours; under Lambertian and textureless shading the
  geometry learns the shading);
- silhouette: mean squared error of the antialiased coverage (edge gradients reach
  the SDF and the vertex offsets);
- normals: ``1 - cos`` between the rendered unit normals where both masks cover.

The fine stage starts from the mesh's own signed distance when every part of it is
closed (reconstruction then refines the surface on the tetrahedral grid and fits
the texture), and from the head prior's SDF otherwise (as fine-only generate runs
do), so an open mesh (a scan cut at the neck) imports too: there the
reconstruction moves the prior's surface onto the mesh.

The mesh is read as a head in glTF's convention: +Y up, face toward +Z. It is
moved into the prior's frame: centred on the prior's bounding box and scaled
uniformly so its height equals the prior's (a mesh in centimetres or millimetres
comes out in metres); the transform is recorded in ``run.json`` and the moved mesh
is kept in the run folder (``import-target.ply``, textures as vertex colours), so a
resume does not need the original file.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar.errors import AvatarError
from avatar.pipeline.generate import GenerateRun, MeshTarget, validate_config

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")

INITS = ("auto", "prior")
"""Where the fine stage starts: ``auto`` = the mesh's own SDF when it is closed, else the prior's."""

REGULARISER_SCALE = 0.01
"""Import's factor on ``fine.lambda_laplacian`` and ``fine.lambda_normal``: their values are
tuned against score distillation, and at full weight they pull the surface off a mesh that
the direct reconstruction terms could match (the fitted IoU drops below the starting SDF's)."""

TARGET_NAME = "import-target.ply"
"""The imported mesh, moved into the prior's frame, kept in the run folder."""

WEIGHTS = {"rgb": 100.0, "silhouette": 100.0, "normal": 10.0}
"""Weights of the reconstruction terms (each a mean over pixels, so of order 0.01-0.1)."""


class ImportError_(AvatarError, ValueError):
    """The mesh cannot be imported; the message says why and what to do."""


def read_head_mesh(path: str | Path) -> Any:
    """Load a triangle mesh (textures become vertex colours later, in MeshTarget) with clear errors."""
    import trimesh

    path = Path(path).expanduser()
    if path.is_dir():
        raise ImportError_(f"{path} is a folder, not a mesh file: pass a GLB, glTF, OBJ or PLY file")
    if not path.is_file():
        raise ImportError_(f"mesh file {path} does not exist")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise ImportError_(f"{path} is not a GLB, glTF, OBJ or PLY file: convert it to one of those")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many kinds for unreadable files
        raise ImportError_(f"cannot read {path} as a mesh ({type(exc).__name__}: {exc}); "
                           "pass a GLB, OBJ or PLY triangle mesh") from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0 or len(mesh.vertices) < 4:
        raise ImportError_(f"{path} holds no triangles: pass a triangle mesh (GLB, OBJ or PLY)")
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    if not np.isfinite(verts).all():
        raise ImportError_(f"{path} has vertices that are NaN or infinite: repair the mesh and try again")
    extent = verts.max(0) - verts.min(0)
    if float(extent.max()) <= 0 or float(extent.min()) <= 1e-3 * float(extent.max()):
        raise ImportError_(f"{path} is flat or a single point (extent {extent.tolist()}): pass a 3D head mesh")
    return mesh


def normalise_to_prior(mesh: Any, prior: Any) -> dict[str, Any]:
    """Move ``mesh`` (in place) into the prior's frame; returns the transform ``x' = (x - centre) * scale + to``."""
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    lo, hi = verts.min(0), verts.max(0)
    template = prior.template.detach().cpu().double().numpy()
    plo, phi = template.min(0), template.max(0)
    scale = float((phi[1] - plo[1]) / (hi[1] - lo[1])) if hi[1] > lo[1] else 1.0
    centre, to = 0.5 * (lo + hi), 0.5 * (plo + phi)
    mesh.vertices = (verts - centre) * scale + to
    return {"centre": centre.tolist(), "scale": scale, "to": to.tolist()}


class ReconstructionGuidance:
    """Stands where the score distillation stands in a generate run: it has no state and
    no model; the data term is :meth:`ImportRun.objective`."""

    kind = "reconstruction"

    def __init__(self, mesh_path: Path, transform: dict[str, Any]):
        self.records = {"mesh": {"role": "import", "path": str(mesh_path), "transform": transform}}
        self.notes: list[str] = []

    def set_stage(self, *args: Any, **kwargs: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def closed_mesh_sdf(mesh: Any) -> Any | None:
    """The SDF grid (metres) of a mesh whose every component is closed, else None (an open scan)."""
    from avatar.prior.sdf import cached_sdf_grid

    merged = mesh.copy()
    merged.merge_vertices()
    if len(merged.faces) == 0 or not merged.is_watertight:
        return None
    return cached_sdf_grid(np.asarray(merged.vertices), np.asarray(merged.faces))


class ImportRun(GenerateRun):
    """A fine-stage-only run fitted to a mesh (see the module docstring)."""

    kind = "import"

    def __init__(self, cfg: Any, workspace: Any, mesh_path: str | Path, progress: bool = True, init: str = "auto"):
        if init not in INITS:
            raise ImportError_(f"unknown init '{init}': choose one of {', '.join(INITS)}")
        self.mesh_path = Path(mesh_path).expanduser().resolve()
        self.init = init
        super().__init__(cfg, workspace, guidance=None, progress=progress)
        self.use_control = False

    def _make_guidance(self) -> Any:
        # The normalised copy in the run folder makes a resume independent of the original file.
        # Built without a workspace (the CLI creates the run folder once everything has loaded),
        # the copy waits in memory until write_info puts it in the folder.
        self._pending_target: bytes | None = None
        target_path = self.ws.root / TARGET_NAME if self.ws is not None else None
        if target_path is not None and target_path.is_file():
            transform = self.ws.read_info().get("guidance_records", {}).get("mesh", {}).get("transform", {})
            return self._reconstruction_guidance(target_path, transform)
        mesh = read_head_mesh(self.mesh_path)
        transform = normalise_to_prior(mesh, self.prior)
        with contextlib.suppress(Exception):  # textures become vertex colours (what MeshTarget renders)
            if mesh.visual.kind == "texture":
                mesh.visual = mesh.visual.to_color()
        data = mesh.export(file_type="ply")
        if target_path is not None:
            from avatar.workspace import atomic_write_bytes

            atomic_write_bytes(target_path, data)
            return self._reconstruction_guidance(target_path, transform)
        self._pending_target = data
        with tempfile.TemporaryDirectory(prefix="avatar-import-") as tmp:
            # Read back from the file, as a resume reads the run folder's copy: the same target bit for bit.
            path = Path(tmp) / TARGET_NAME
            path.write_bytes(data)
            return self._reconstruction_guidance(path, transform)

    def _reconstruction_guidance(self, target_path: Path, transform: dict[str, Any]) -> ReconstructionGuidance:
        self.target = MeshTarget(target_path, self.frame, self.cfg.engines.raster, self.device)
        guidance = ReconstructionGuidance(self.mesh_path, transform)
        self._target_sdf = None if self.init == "prior" else closed_mesh_sdf(read_head_mesh(target_path))
        guidance.records["mesh"]["init"] = "prior" if self._target_sdf is None else "mesh"
        return guidance

    def _fine_sdf_init(self) -> Any:
        """A closed mesh starts the fine stage from its own SDF (reconstruction then refines the
        surface and fits the texture); an open one from the prior's."""
        grid = self._target_sdf
        if grid is None:
            return super()._fine_sdf_init()
        frame = self.frame
        return lambda p: grid.lookup(frame.to_metres(p.cpu().double())).float() * frame.scale

    def write_info(self) -> None:
        if self._pending_target is not None:  # built before the run folder existed
            from avatar.workspace import atomic_write_bytes

            atomic_write_bytes(self.ws.root / TARGET_NAME, self._pending_target)
            self._pending_target = None
        self.ws.write_info(self.kind, self.cfg.seed, prompt=self.cfg.prompt, prior=self.cfg.prior.spec,
                           guidance=self.guidance.kind, guidance_records=self.guidance.records,
                           source_mesh=str(self.mesh_path), frame=self.frame.to_dict())

    def objective(self, out: Any, cameras: Any, local_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        target = self.target
        assert target is not None
        with torch.no_grad():
            ref = target.render(cameras)  # in the step's look, like the live rendering
        rgb = (out.rgb - ref.rgb).pow(2).mean()
        silhouette = (out.opacity - ref.opacity).pow(2).mean()
        both = (out.opacity.detach() > 0.5) & (ref.opacity > 0.5)
        cos = (out.normal * ref.normal).sum(-1, keepdim=True)
        normal = ((1.0 - cos) * both).sum() / both.sum().clamp(min=1)
        terms = {"rgb": rgb, "silhouette": silhouette, "normal": normal}
        loss = sum(WEIGHTS[k] * v for k, v in terms.items())
        return loss, {k: v.detach() for k, v in terms.items()}, 0.0


def import_config(cfg: Any) -> Any:
    """The config an import runs with (a new object; ``cfg`` is not changed): the fine stage
    only (coarse.steps = 0), and the mesh regularisers scaled by :data:`REGULARISER_SCALE`."""
    import copy

    out = copy.deepcopy(cfg)
    out.coarse.steps = 0
    if out.fine.steps < 1:
        raise ImportError_(f"fine.steps must be >= 1 for an import, got {out.fine.steps}")
    out.fine.lambda_laplacian *= REGULARISER_SCALE
    out.fine.lambda_normal *= REGULARISER_SCALE
    out.fine.normal_warmup_steps = 0  # a reconstruction has its target's colours from the first step
    validate_config(out)
    return out


def run_import(cfg: Any, mesh_path: str | Path, workspace: Any, progress: bool = True,
               stop_after: int | None = None, resume: bool = False, init: str = "auto") -> dict[str, Any]:
    """Fit a run folder's avatar to ``mesh_path`` (see the module docstring).

    cfg: a :class:`~avatar.config.GenerateConfig`, made into the import's by :func:`import_config`
    (``prompt`` describes the head for later edits). Resume with ``resume=True`` on the same
    folder and its saved config. init: ``auto`` or ``prior`` (:data:`INITS`).
    """
    if not resume:  # a resumed run's config.yaml is already the import's
        read_head_mesh(mesh_path)  # fail on a bad file before anything is written
        cfg = import_config(cfg)
    return ImportRun(cfg, workspace, mesh_path, progress=progress, init=init).run(resume=resume,
                                                                                     stop_after=stop_after)


__all__ = ["ImportRun", "ImportError_", "normalise_to_prior", "read_head_mesh", "run_import", "import_config"]
