"""Text -> head: the coarse NeRF stage, the fine DMTet stage, checkpoints and resume.

HeadSculpt's method (docs/DESIGN.md, "The method"):

1. **Coarse**: a :class:`~avatar.fields.nerf.NeRFField` whose density starts from the
   head prior's SDF, volume rendered (:class:`~avatar.render.volume.VolumeRenderer`,
   occupancy grid refreshed every ``coarse.occupancy_update_every`` steps) from random
   head-centric cameras with shading sampled per step (DreamFusion's albedo /
   Lambertian / textureless), optimised by score distillation conditioned on the
   prior's landmark image, plus opacity sparsity and DreamFusion's orientation loss.
2. **Fine**: the coarse density becomes the SDF of a :class:`~avatar.fields.dmtet.DMTetGeometry`
   (the prior's SDF for fine-only runs) on a grid over the head's box (:func:`fine_grid`:
   the prior's bounding box plus ``fine.grid_margin`` and ``fine.grid_headroom``, built on
   the run's device and never saved); marching tetrahedra gives a mesh every
   step, rasterised at ``fine.resolution`` and textured by a
   :class:`~avatar.fields.dmtet.TextureField` that starts as a copy of the coarse field's
   hash grid and albedo MLP (HeadSculpt keeps training the coarse weights as the
   texture); SDS continues with the fine stage's
   timestep range, plus Laplacian and normal-consistency regularisers.

One global step counter runs over both stages (coarse ``[0, Nc)``, fine
``[Nc, Nc + Nf)``). A checkpoint (``Workspace.save_checkpoint``) holds everything
the future of the run depends on: the live stage's modules and optimiser, every
RNG state (global, the camera generator, the guidance's generator), the learning
rate scale and the NaN-rollback count, so that ``resume=True`` continues exactly as
an uninterrupted run would (bit for bit on the CPU). The last checkpoint also holds
the final mesh (field units, with the :class:`~avatar.fields.frame.FieldFrame`) for
export: :func:`load_final_mesh`.

Nothing random is drawn outside the step itself: previews and checkpoints do not
touch any generator.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from avatar.errors import AvatarError
from avatar.fields.frame import FieldFrame

STAGES = ("coarse", "fine")

PRIOR_GRID = 96
"""Samples per axis of the prior SDF grid the coarse field keeps (a 0.8 cm cell at scale 2.5)."""

PREVIEW_VIEWS = 4
"""Cameras (evenly spaced in azimuth, 15 degrees up) in each preview grid."""

FIELD_DEFAULTS = {
    "cuda": {"n_levels": 16, "log2_hashmap_size": 19, "max_resolution": 2048, "hidden": 64},
    "cpu": {"n_levels": 8, "log2_hashmap_size": 15, "max_resolution": 256, "hidden": 32},
}
"""Hash-grid sizes per device type, used where the stage config has no such field.
Instant-NGP's sizes on GPUs; on CPUs a grid small enough for minutes-long runs."""



def read_back(values: dict[str, Any]) -> dict[str, float]:
    """Floats of ``values`` (tensors of one element, or numbers), reading the device once.

    Tensors on the CPU are read directly; those on a GPU are stacked and copied in one
    transfer, so a training step waits for the device once, not once per logged number.
    """
    out: dict[str, float] = {}
    on_device: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            out[name] = float(value)
        elif value.device.type == "cpu":
            out[name] = float(value.detach().reshape(()))
        else:
            on_device[name] = value.detach().reshape(()).float()
    if on_device:
        by_device: dict[torch.device, list[str]] = {}
        for name, value in on_device.items():
            by_device.setdefault(value.device, []).append(name)
        for names in by_device.values():
            out.update(zip(names, torch.stack([on_device[n] for n in names]).tolist()))
    return {name: out[name] for name in values}

class GenerateError(AvatarError, RuntimeError):
    """A generate run cannot start or continue; the message says why and what to do."""


class NonFiniteLoss(GenerateError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------
# Small helpers


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; otherwise ``torch.device(spec)``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"device '{spec}' asked for but CUDA is not available: pass --set device=cpu")
    return device


def field_options(stage_cfg: Any, device: torch.device) -> dict[str, int]:
    """Hash-grid sizes for a stage: its config fields if present, else :data:`FIELD_DEFAULTS`."""
    defaults = FIELD_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    return {name: int(getattr(stage_cfg, name, value)) for name, value in defaults.items()}


@functools.lru_cache(maxsize=2)
def load_prior(spec: str) -> Any:
    """The head prior named by ``spec``, loaded once per process (runs only read it)."""
    from avatar.prior import load_head_model

    return load_head_model(spec)


def head_frame(prior: Any, scale: float = 2.5) -> FieldFrame:
    """The field frame centred on the prior's bounding box (so cameras look at the head's middle)."""
    t = prior.template.detach().cpu().float()
    centre = ((t.min(0).values + t.max(0).values) * 0.5).tolist()
    return FieldFrame(scale=scale, centre=(float(centre[0]), float(centre[1]), float(centre[2])))


def fine_grid(fine_cfg: Any, frame: FieldFrame, prior: Any) -> Any:
    """The fine stage's tetrahedral grid (a :class:`~avatar.ops.marching_tets.TetGridSpec`):
    the head prior's bounding box in field units plus ``fine_cfg.grid_margin`` at the sides,
    front, back and below and ``fine_cfg.grid_headroom`` above (hats), clipped to the field
    cube, with ``fine_cfg.dmtet_resolution`` cubic cells along its longest side. A head spans
    about +-0.4 of the cube's +-1, so the cells are about 1.4 times smaller than those of a
    cube grid of the same resolution, and the grid has about half its tetrahedra."""
    from avatar.ops.marching_tets import TetGridSpec

    points = frame.to_field(prior.template.detach().float().cpu())
    margin, bound = float(fine_cfg.grid_margin), float(frame.bound)
    lo = (points.min(0).values - margin).clamp(min=-bound).tolist()
    hi = points.max(0).values + margin
    hi[1] = points[:, 1].max() + float(fine_cfg.grid_headroom)
    return TetGridSpec.covering(lo, hi.clamp(max=bound).tolist(), int(fine_cfg.dmtet_resolution), within=bound)


def validate_config(cfg: Any) -> None:
    """Reject values no run can use, before any work starts."""
    problems = []
    if not str(cfg.prompt).strip():
        problems.append("the prompt is empty: pass a description, e.g. avatar generate \"an old sea captain\"")
    for name in STAGES:
        st = getattr(cfg, name)
        if st.steps < 0:
            problems.append(f"{name}.steps must be >= 0, got {st.steps}")
        if st.resolution < 8:
            problems.append(f"{name}.resolution must be >= 8 pixels, got {st.resolution}")
        if st.batch_size < 1:
            problems.append(f"{name}.batch_size must be >= 1, got {st.batch_size}")
        rates = {"lr": st.lr, "lr_mlp": st.lr_mlp, **({"texture_lr": st.texture_lr} if name == "fine" else {})}
        for key, rate in rates.items():
            if not (math.isfinite(rate) and rate > 0):
                problems.append(f"{name}.{key} must be a finite number > 0, got {rate}")
        lo, hi = st.t_range
        if not 0.0 <= lo < hi <= 1.0:
            problems.append(f"{name}.t_range must satisfy 0 <= low < high <= 1, got {st.t_range}")
        probs = tuple(st.shading_probs)
        if len(probs) not in (3, 4) or any(not p >= 0 for p in probs) or not sum(probs) > 0:
            problems.append(f"{name}.shading_probs must be 3 or 4 probabilities (albedo, Lambertian, textureless"
                            f"[, normal]) >= 0 with a positive sum, got {list(probs)}")
        lo, hi = st.ambient_range
        if not 0.0 <= lo <= hi <= 1.0:
            problems.append(f"{name}.ambient_range must satisfy 0 <= low <= high <= 1, got {st.ambient_range}")
        if st.normal_warmup_steps < 0:
            problems.append(f"{name}.normal_warmup_steps must be >= 0, got {st.normal_warmup_steps}")
        if not 0.0 <= st.random_background_prob <= 1.0:
            problems.append(f"{name}.random_background_prob must be in [0, 1], got {st.random_background_prob}")
        allowed = ("white", "learned") if name == "coarse" else ("white",)
        if st.background not in allowed:
            problems.append(f"{name}.background must be one of {', '.join(allowed)}, got '{st.background}'")
    if cfg.coarse.steps + cfg.fine.steps == 0:
        problems.append("coarse.steps and fine.steps are both 0: nothing to do")
    if cfg.coarse.samples_per_ray < 4:
        problems.append(f"coarse.samples_per_ray must be >= 4, got {cfg.coarse.samples_per_ray}")
    if cfg.coarse.occupancy_update_every < 1:
        problems.append("coarse.occupancy_update_every must be >= 1")
    if not cfg.coarse.normal_eps > 0:
        problems.append(f"coarse.normal_eps must be > 0 field units, got {cfg.coarse.normal_eps}")
    if cfg.fine.dmtet_resolution < 4:
        problems.append(f"fine.dmtet_resolution must be >= 4, got {cfg.fine.dmtet_resolution}")
    for name in ("grid_margin", "grid_headroom"):
        if not getattr(cfg.fine, name) > 0:
            problems.append(f"fine.{name} must be > 0 field units (room around the head), got "
                            f"{getattr(cfg.fine, name)}")
    if cfg.checkpoint_every < 1 or cfg.preview_every < 1:
        problems.append("checkpoint_every and preview_every must be >= 1")
    if problems:
        raise GenerateError("invalid generate config: " + "; ".join(problems))


# ---------------------------------------------------------------------------
# The oracle's target


class MeshTarget:
    """Renders a mesh file for the oracle guidance: ``target(cameras) -> (B, H, W, 3)``.

    The mesh (metres, the prior's frame) is moved to field units with ``frame``.
    Colours: the mesh's vertex colours (a texture is converted to them), else a colour
    that varies with position so that geometry shows in the albedo too. ``shading``
    and ``light`` are set by the loop before each guidance call so the target is
    shaded exactly like the rendering it is compared with.
    """

    def __init__(self, path: str | Path, frame: FieldFrame, engine: str = "auto", device: Any = "cpu"):
        import trimesh

        from avatar.render.mesh import MeshRenderer

        path = Path(path).expanduser()
        if path.is_dir():
            raise GenerateError(f"oracle mesh {path} is a folder, not a mesh file: pass --guidance oracle:PATH to a "
                                "GLB/OBJ/PLY file")
        if not path.is_file():
            raise GenerateError(f"oracle mesh {path} does not exist: pass --guidance oracle:PATH to a GLB/OBJ/PLY")
        try:
            mesh = trimesh.load(path, force="mesh", process=False)
        except Exception as exc:  # trimesh raises many kinds for unreadable files
            raise GenerateError(f"cannot read {path} as a mesh ({type(exc).__name__}: {exc})") from exc
        if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
            raise GenerateError(f"{path} holds no triangles: pass a triangle mesh (GLB, OBJ or PLY)")
        verts_m = torch.as_tensor(mesh.vertices, dtype=torch.float32)
        self.vertices = frame.to_field(verts_m).to(device)
        self.faces = torch.as_tensor(mesh.faces, dtype=torch.int64).to(device)
        colours = None
        with contextlib.suppress(Exception):
            if mesh.visual.kind == "texture":
                mesh.visual = mesh.visual.to_color()
            if mesh.visual.kind == "vertex":
                colours = torch.as_tensor(mesh.visual.vertex_colors[:, :3], dtype=torch.float32) / 255.0
        if colours is None or colours.shape[0] != verts_m.shape[0]:
            colours = position_colours(self.vertices.cpu())
        self.colours = colours.to(device)
        self.renderer = MeshRenderer(engine)
        self.look = StepLook()

    @torch.no_grad()
    def render(self, cameras: Any) -> Any:
        """The mesh from ``cameras`` in this step's look (a RenderOutput)."""
        look = self.look
        return self.renderer.render(cameras, self.vertices, self.faces, albedo=self.colours, shading=look.shading,
                                    light=look.light, ambient=look.ambient, background=look.solid_background())

    def __call__(self, cameras: Any) -> torch.Tensor:
        return self.render(cameras).rgb


def nonfinite_term(sds: Any) -> dict[str, Any]:
    """``{"sds_nonfinite": share}`` of a guidance output that reports its non-finite share."""
    value = getattr(sds, "extras", {}).get("nonfinite")
    return {} if value is None else {"sds_nonfinite": value}


class StepLook:
    """How one step's renders look: shading, light, ambient and backdrop.

    shading: ``albedo``, ``lambertian``, ``textureless`` or ``normal``. light: (B, 3) point
    lights on the run's device (None for albedo and normal shading). ambient: the ambient
    fraction. background: ``white``, a (3,) colour on the device, or a module (the coarse
    stage's learned backdrop). The oracle's target and an edit's frozen source are rendered
    in the same look as the live field, so the comparison is like for like.
    """

    def __init__(self, shading: str = "albedo", light: torch.Tensor | None = None, ambient: float = 1.0,
                 background: Any = "white"):
        self.shading, self.light, self.ambient, self.background = shading, light, ambient, background

    def solid_background(self) -> Any:
        """The backdrop for a mesh that has no learned one: the step's colour, else white."""
        return self.background if isinstance(self.background, (str, torch.Tensor)) else "white"


def sample_look(st: Any, local_step: int, eyes: torch.Tensor, generator: torch.Generator, device: torch.device,
                default_background: Any = "white") -> StepLook:
    """The look of one step of a stage (HeadSculpt's recipe, utils.py:401-425).

    During ``st.normal_warmup_steps``: normal maps over the stage's backdrop. Afterwards:
    shading drawn from ``st.shading_probs`` (albedo, Lambertian, textureless[, normal]), a
    point light near each camera (``eyes``, (B, 3) on the host), the ambient fraction drawn
    from ``st.ambient_range``, and with probability ``st.random_background_prob`` one random
    solid colour as the backdrop. Every draw is made with ``generator`` (on the host), so
    a resumed run draws exactly what an uninterrupted one would.
    """
    from avatar.render.shading import random_light, sample_shading
    from avatar.seeding import draw

    if local_step < st.normal_warmup_steps:
        return StepLook("normal", None, 1.0, default_background)
    probs = tuple(float(p) for p in st.shading_probs)
    shading = sample_shading(probs + (0.0,) * (4 - len(probs)), generator)
    light = random_light(eyes, generator).to(device, non_blocking=True)
    lo, hi = (float(a) for a in st.ambient_range)
    ambient = lo + (hi - lo) * float(draw(torch.rand, 1, generator=generator, dtype=torch.float64))
    background = default_background
    if st.random_background_prob > 0:
        if float(draw(torch.rand, 1, generator=generator, dtype=torch.float64)) < st.random_background_prob:
            background = draw(torch.rand, 3, generator=generator).to(device, non_blocking=True)
    return StepLook(shading, None if shading in ("albedo", "normal") else light, ambient, background)


def position_colours(points: torch.Tensor) -> torch.Tensor:
    """(N, 3) smooth colours from field-unit positions (a head spans about +-0.4)."""
    return (0.5 + points / 0.9).clamp(0.05, 0.95)


# ---------------------------------------------------------------------------
# Stages


def _adam(groups: list[dict[str, Any]]) -> torch.optim.Adam:
    # eps 1e-15 as Instant-NGP uses for hash tables (sparse gradients).
    return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)


class CoarseStage:
    """NeRF field + occupancy grid + volume renderer + Adam (hash grid and MLPs at their own rates)."""

    name = "coarse"

    def __init__(self, cfg: Any, frame: FieldFrame, prior: Any, device: torch.device):
        from avatar.fields.nerf import NeRFField
        from avatar.ops.compositing import OccupancyGrid
        from avatar.render.volume import BackgroundMLP, VolumeRenderer

        c = cfg.coarse
        self.cfg = c
        self.field = NeRFField(frame, prior_sdf=prior.sdf if prior is not None else None, sdf_width=c.prior_sdf_width,
                               prior_grid=PRIOR_GRID, engine=cfg.engines.hashgrid, normal_eps=c.normal_eps,
                               **field_options(c, device)).to(device)
        grid_res = int(getattr(c, "occupancy_resolution", max(16, min(128, c.samples_per_ray))))
        self.occupancy = OccupancyGrid(resolution=grid_res, update_every=c.occupancy_update_every).to(device)
        self.renderer = VolumeRenderer(self.field, frame.bound, c.samples_per_ray, self.occupancy,
                                       cfg.engines.composite)
        # HeadSculpt's learned backdrop (network_grid.py:114-120), trained with the MLPs' rate.
        self.background: Any = BackgroundMLP().to(device) if c.background == "learned" else "white"
        self.base_lrs = {"encoding": c.lr, "mlp": c.lr_mlp, "background": c.lr_mlp}
        self.optimizer = self._optimizer()

    def _optimizer(self) -> torch.optim.Adam:
        c = self.cfg
        mlps = list(self.field.density_net.parameters()) + list(self.field.albedo_net.parameters())
        groups = [{"params": list(self.field.encoding.parameters()), "lr": c.lr, "name": "encoding"},
                  {"params": mlps, "lr": c.lr_mlp, "name": "mlp"}]
        if isinstance(self.background, torch.nn.Module):
            groups.append({"params": list(self.background.parameters()), "lr": c.lr_mlp, "name": "background"})
        return _adam(groups)

    def state_dict(self) -> dict[str, Any]:
        return {"field": self.field.state_dict(), "occupancy": self.occupancy.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "background": self.background.state_dict() if isinstance(self.background, torch.nn.Module) else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.field.load_state_dict(state["field"])
        self.occupancy.load_state_dict(state["occupancy"])
        if isinstance(self.background, torch.nn.Module):
            if state.get("background") is None:
                # A checkpoint from before the learned backdrop (or with it off): keep its white one.
                self.background = "white"
                self.optimizer = self._optimizer()
            else:
                self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])

    def render(self, cameras: Any, look: StepLook, generator: torch.Generator,
               local_step: int) -> tuple[Any, dict[str, torch.Tensor]]:
        """Refresh the occupancy grid when due, render in ``look``, and compute the regularisers."""
        self.renderer.update_occupancy(local_step, generator=generator)
        out = self.renderer.render(cameras, shading=look.shading, light=look.light, background=look.background,
                                   jitter=True, generator=generator, ambient=look.ambient)
        # Opacity sparsity (threestudio's form of DreamFusion's regulariser): pushes
        # pixels toward empty or opaque and the backdrop toward empty.
        opacity = (out.opacity.pow(2) + 0.01).sqrt().mean()
        regs = {"opacity": (self.cfg.lambda_opacity, opacity)}
        normals = out.extras.get("normals")
        if normals is not None:
            # DreamFusion eq. 6: penalise visible normals facing away from the camera, averaged
            # over the samples as HeadSculpt does (renderer.py:767-770).
            dirs = out.extras["dirs"][out.extras["ray_indices"]]
            facing = (normals * dirs).sum(-1).clamp(min=0.0).pow(2)
            orient = out.extras["weights"].detach() * facing
            orient = orient.sum() / out.extras["dirs"].shape[0] if self.cfg.orientation_per_ray else orient.mean()
            regs["orientation"] = (self.cfg.lambda_orientation, orient)
        return out, regs

    @torch.no_grad()
    def preview(self, cameras: Any) -> dict[str, torch.Tensor]:
        albedo = self.renderer.render(cameras, shading="albedo")
        normal = self.renderer.render(cameras, shading="normal")
        return {"rgb": albedo.rgb, "normal": normal.rgb, "opacity": albedo.opacity}

    @torch.no_grad()
    def density_sdf(self, level: float, cell: float, chunk: int = 1 << 16) -> Any:
        """An SDF-like init for DMTet from the density: (level - density) / level, clamped to
        [-1, 1] and scaled to a grid cell (negative inside, zero on the ``level`` set). The
        geometry stores it in cells, so it holds HeadSculpt's clamp(density - level, -1, 1) form
        (renderer.py:845-863) up to the 1/level slope."""
        def sdf(points: torch.Tensor) -> torch.Tensor:
            pts = points.to(next(self.field.parameters()).device)
            dens = torch.cat([self.field.density(pts[i:i + chunk]) for i in range(0, pts.shape[0], chunk)])
            return ((level - dens) / level).clamp(-1.0, 1.0) * cell
        return sdf


class FineStage:
    """DMTet geometry + texture field + mesh renderer + Adam.

    grid: the DMTet grid's :class:`~avatar.ops.marching_tets.TetGridSpec`; None takes
    :func:`fine_grid` of the config and its head prior. The grid is built on ``device``.
    """

    name = "fine"

    def __init__(self, cfg: Any, frame: FieldFrame, device: torch.device, sdf_init: Any, grid: Any = None):
        from avatar.fields.dmtet import DMTetGeometry, TextureField
        from avatar.render.mesh import MeshRenderer

        f = cfg.fine
        self.cfg = f
        if grid is None:
            grid = fine_grid(f, frame, load_prior(cfg.prior.spec))
        self.geometry = DMTetGeometry(grid, frame, sdf_init, f.deform_scale, device=device)
        self.texture = TextureField(frame, engine=cfg.engines.hashgrid, **field_options(f, device)).to(device)
        self.renderer = MeshRenderer(cfg.engines.raster)
        self.base_lrs = {"sdf": f.lr, "deform": f.lr, "texture": f.texture_lr, "texture_mlp": f.lr_mlp}
        self.optimizer = _adam([
            {"params": [self.geometry.sdf], "lr": f.lr, "name": "sdf"},
            {"params": [self.geometry.deform], "lr": f.lr, "name": "deform"},
            {"params": list(self.texture.encoding.parameters()), "lr": f.texture_lr, "name": "texture"},
            {"params": list(self.texture.net.parameters()), "lr": f.lr_mlp, "name": "texture_mlp"},
        ])

    def state_dict(self) -> dict[str, Any]:
        return {"geometry": self.geometry.state_dict(), "texture": self.texture.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from avatar.fields.dmtet import sdf_in_field_units

        legacy = sdf_in_field_units(state["geometry"])
        self.geometry.load_state_dict(state["geometry"])  # a field-unit SDF is converted to cells
        self.texture.load_state_dict(state["texture"])
        self.optimizer.load_state_dict(state["optimizer"])
        if legacy:
            # Adam's moments of the SDF, in the same units: the gradient per cell is cell times the
            # gradient per field unit.
            cell = self.geometry.cell
            sdf_state = self.optimizer.state.get(self.geometry.sdf, {})
            if "exp_avg" in sdf_state:
                sdf_state["exp_avg"].mul_(cell)
                sdf_state["exp_avg_sq"].mul_(cell * cell)

    def mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        verts, faces = self.geometry.extract()
        if faces.shape[0] == 0:
            raise GenerateError("the fine-stage surface vanished (marching tetrahedra found no triangles); "
                                "lower fine.lr or raise fine.lambda_laplacian and resume from an earlier checkpoint")
        return verts, faces

    background = "white"

    def render(self, cameras: Any, look: StepLook, generator: torch.Generator,
               local_step: int) -> tuple[Any, dict[str, torch.Tensor]]:
        from avatar.fields.dmtet import laplacian_loss, normal_consistency_loss

        verts, faces = self.mesh()
        out = self.renderer.render(cameras, verts, faces, albedo=self.texture, shading=look.shading, light=look.light,
                                   background=look.solid_background(), ambient=look.ambient)
        regs = {"laplacian": (self.cfg.lambda_laplacian, laplacian_loss(verts, faces, self.cfg.laplacian_squared)),
                "normal_consistency": (self.cfg.lambda_normal, normal_consistency_loss(verts, faces))}
        return out, regs

    @torch.no_grad()
    def preview(self, cameras: Any) -> dict[str, torch.Tensor]:
        verts, faces = self.geometry.extract()
        if faces.shape[0] == 0:
            blank = torch.ones(len(cameras), cameras.height, cameras.width, 3)
            return {"rgb": blank, "normal": blank}
        albedo = self.renderer.render(cameras, verts, faces, albedo=self.texture)
        normal = self.renderer.render(cameras, verts, faces, albedo=self.texture, shading="normal")
        return {"rgb": albedo.rgb, "normal": normal.rgb, "opacity": albedo.opacity}


# ---------------------------------------------------------------------------
# The run


class _Interrupt:
    """Turns the first Ctrl-C into a flag checked between steps (so the checkpoint
    written on exit is of a whole step); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class GenerateRun:
    """One generate run in a workspace (see the module docstring). Use :func:`run_generate`."""

    def __init__(self, cfg: Any, workspace: Any, guidance: Any = None, progress: bool = True):
        validate_config(cfg)
        self.cfg = cfg
        self.ws = workspace
        self.progress = progress
        self.device = resolve_device(cfg.device)
        self.prior = load_prior(cfg.prior.spec)
        self.frame = self._field_frame()
        self.n_coarse, self.n_fine = cfg.coarse.steps, cfg.fine.steps
        self.total = self.n_coarse + self.n_fine
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        self.coarse: CoarseStage | None = None
        self.fine: FineStage | None = None
        self.step = 0
        self.lr_scale = 1.0
        self.nan_rollbacks = 0
        self.target: MeshTarget | None = None
        self.guidance = guidance if guidance is not None else self._make_guidance()
        self._guidance_stage: str | None = None
        self.use_control = self.guidance.kind != "oracle" and bool(str(cfg.guidance.controlnet).strip())
        # The prior in field units, for the landmark control images. They are drawn on the host
        # from the step's host cameras (lines are drawn by PIL), so these stay on the CPU.
        self.prior_verts = self.frame.to_field(self.prior.template.detach().float().cpu())
        self.prior_faces = self.prior.all_faces().cpu()
        self.prior_landmarks = self.frame.to_field(self.prior.neutral_landmarks().detach().float().cpu())
        self._step_cameras: tuple[Any, Any] | None = None  # (on the device, on the host) of this step
        self.last_record: dict[str, Any] = {}
        self.look = StepLook()  # how the current step's renders look (shading, light, ambient, backdrop)

    # -- construction --------------------------------------------------------
    def _field_frame(self) -> FieldFrame:
        """The frame of the fields: centred on the prior (an edit keeps its source's)."""
        return head_frame(self.prior)

    def _make_guidance(self) -> Any:
        from avatar.guidance import make_guidance
        from avatar.guidance.models import oracle_mesh

        cfg = self.cfg
        mesh = oracle_mesh(cfg.guidance.model)
        if mesh is not None:
            self.target = MeshTarget(mesh, self.frame, cfg.engines.raster, self.device)
        first = cfg.coarse if self.n_coarse > 0 else cfg.fine
        return make_guidance(cfg.guidance, cfg.prompt, self.device, seed=cfg.seed, render_target=self.target,
                             t_range=tuple(first.t_range), total_steps=max(first.steps, 1),
                             anneal=first.t_anneal, anneal_to=first.t_anneal_to)

    def stage_of(self, step: int) -> str:
        return "coarse" if step < self.n_coarse else "fine"

    def _build_coarse(self) -> None:
        self.coarse = CoarseStage(self.cfg, self.frame, self.prior, self.device)

    def _fine_grid(self) -> Any:
        """The DMTet grid of this run's fine stage (:func:`fine_grid`; an edit keeps its source's)."""
        return fine_grid(self.cfg.fine, self.frame, self.prior)

    def _fine_sdf_init(self) -> Any:
        cell = self._fine_grid().cell
        if self.coarse is not None:
            # The prior's surface sits where the density bias is half way up its step
            # (NeRFField.density_bias); the coarse field's level set at that density is its surface.
            level = 0.5 * (self.coarse.field.density_inside - 5.0)
            return self.coarse.density_sdf(level, cell)
        frame, prior = self.frame, self.prior
        return lambda p: prior.sdf(frame.to_metres(p.cpu())).float() * frame.scale

    def _build_fine(self) -> None:
        self.fine = FineStage(self.cfg, self.frame, self.device, self._fine_sdf_init(), self._fine_grid())
        if self.coarse is not None and not self.fine.texture.copy_albedo_from(self.coarse.field):
            # HeadSculpt's fine stage keeps training the coarse model's grid and albedo
            # (main.py:192-200); with differently sized grids the texture starts afresh.
            warnings.warn("the fine texture field starts from random weights, not the coarse albedo: the coarse.* "
                          "and fine.* hash-grid sizes (n_levels, log2_hashmap_size, max_resolution, hidden) "
                          "differ; set them equal to carry the coarse texture over", stacklevel=2)
        self.coarse = None  # the coarse field is no longer needed

    def _ensure_stage(self) -> Any:
        stage = self.stage_of(self.step)
        if stage == "coarse" and self.coarse is None:
            self._build_coarse()
        if stage == "fine" and self.fine is None:
            if self.coarse is None and self.n_coarse > 0:
                raise GenerateError("internal: the fine stage needs the coarse field or its checkpoint")
            self._build_fine()
        self._apply_lr_scale()  # a stage built after a NaN rollback starts at the lowered rates
        if self._guidance_stage != stage:
            st = getattr(self.cfg, stage)
            self.guidance.set_stage(tuple(st.t_range), max(st.steps, 1), st.t_anneal, st.t_anneal_to)
            self._guidance_stage = stage
        return self.coarse if stage == "coarse" else self.fine

    # -- state -----------------------------------------------------------------
    def state_dict(self, final_mesh: bool = False) -> dict[str, Any]:
        from avatar.seeding import rng_state

        state: dict[str, Any] = {
            "stage": self.stage_of(min(self.step, self.total - 1)),
            "step": self.step,
            "steps": {"coarse": self.n_coarse, "fine": self.n_fine},
            "frame": self.frame.to_dict(),
            "rng": rng_state(),
            "cameras_generator": self.generator.get_state(),
            "guidance": self.guidance.state_dict(),
            "lr_scale": self.lr_scale,
            "nan_rollbacks": self.nan_rollbacks,
            "coarse": self.coarse.state_dict() if self.coarse is not None else None,
            "fine": self.fine.state_dict() if self.fine is not None else None,
        }
        if final_mesh:
            state["mesh"] = self.final_mesh()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from avatar.seeding import set_rng_state

        if state["steps"] != {"coarse": self.n_coarse, "fine": self.n_fine}:
            raise GenerateError(f"the checkpoint is of a run with stages {state['steps']}, the config says "
                                f"coarse.steps={self.n_coarse}, fine.steps={self.n_fine}: resume with the run's "
                                "own config.yaml")
        self.step = int(state["step"])
        self.coarse = self.fine = None
        if state.get("coarse") is not None:
            self._build_coarse()
            self.coarse.load_state_dict(state["coarse"])  # type: ignore[union-attr]
        if state.get("fine") is not None:
            from avatar.fields.dmtet import grid_of_state

            # The grid the saved SDF lives on (older checkpoints: the cube grid they stored).
            grid = grid_of_state(state["fine"]["geometry"])
            self.fine = FineStage(self.cfg, self.frame, self.device, lambda p: p.new_zeros(p.shape[0]), grid)
            self.fine.load_state_dict(state["fine"])
        self.lr_scale = float(state["lr_scale"])
        self.nan_rollbacks = int(state["nan_rollbacks"])
        self.guidance.load_state_dict(state["guidance"])
        self._guidance_stage = None
        self.generator.set_state(state["cameras_generator"])
        set_rng_state(state["rng"])
        self._apply_lr_scale()

    def _apply_lr_scale(self) -> None:
        for stage in (self.coarse, self.fine):
            if stage is None:
                continue
            for group in stage.optimizer.param_groups:
                group["lr"] = stage.base_lrs[group["name"]] * self.lr_scale

    def save_checkpoint(self, final_mesh: bool = False) -> Path:
        return self.ws.save_checkpoint(self.state_dict(final_mesh), self.step, keep=self.cfg.keep_checkpoints)

    def final_mesh(self) -> dict[str, Any]:
        """The current surface, field units, with the frame that maps it to metres."""
        with torch.no_grad():
            if self.fine is not None:
                verts, faces = self.fine.geometry.extract()
            else:
                from avatar.fields.dmtet import DMTetGeometry

                geo = DMTetGeometry(self._fine_grid(), self.frame, self._fine_sdf_init(), self.cfg.fine.deform_scale,
                                    device=self.device)
                verts, faces = geo.extract()
        return {"vertices": verts.detach().float().cpu(), "faces": faces.to(torch.int64).cpu(),
                "frame": self.frame.to_dict(), "units": "field"}

    # -- one step --------------------------------------------------------------
    def _control(self, cameras: Any) -> torch.Tensor | None:
        if not self.use_control:
            return None
        from avatar.render.control import CONTROL_RESOLUTION, control_images

        size = CONTROL_RESOLUTION if self.guidance.kind == "diffusion" else cameras.height
        # The step's cameras were sampled on the host: drawing from that copy reads nothing
        # back from the GPU.
        step = self._step_cameras
        host = step[1] if step is not None and step[0] is cameras else cameras.to("cpu")
        images = control_images(host.with_resolution(size), self.prior_landmarks, self.prior.landmark_contours,
                                self.prior_verts, self.prior_faces, closed=self.prior.closed_contours,
                                engine=self.cfg.engines.raster)
        return images.to(self.device, non_blocking=True)

    def objective(self, out: Any, cameras: Any, local_step: int
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float], torch.Tensor | float]:
        """The data term of one step: (loss, logged terms, mean timestep). Generate uses score
        distillation conditioned on the landmark image; edit and import replace this. Terms may
        be tensors: the step reads every logged number back from the device at once."""
        control = self._control(cameras)
        latents = self._warmup_latents(out)
        if latents is not None:
            sds = self.guidance.score_distillation(latents, cameras, control_images=control, step=local_step,
                                                   as_latent=True)
        else:
            sds = self.guidance.score_distillation(out.rgb, cameras, control_images=control, step=local_step)
        return sds.loss, {"sds": sds.loss.detach(), **nonfinite_term(sds)}, sds.t.float().mean()

    def _warmup_latents(self, out: Any) -> torch.Tensor | None:
        """During the coarse normal warm-up with a diffusion model: the normal map and opacity,
        bilinearly resized to the latent size and mapped to [-1, 1], as the denoiser's 4 latent
        channels (HeadSculpt's ``as_latent``, utils.py:451-452 and sd.py:239-240). None otherwise."""
        if (self.look.shading != "normal" or self.stage_of(self.step) != "coarse"
                or self.step >= self.cfg.coarse.normal_warmup_steps or not self.cfg.coarse.warmup_latents
                or self.guidance.kind not in ("diffusion", "tiny")):
            return None
        enc = self.guidance.encoder
        side = int(enc.resolution) // int(enc.scale_factor)
        x = torch.cat([out.rgb, out.opacity], dim=-1).permute(0, 3, 1, 2)
        return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False) * 2 - 1

    def train_step(self, stage_obj: Any) -> dict[str, Any]:
        from avatar.render.cameras import sample_cameras

        stage = stage_obj.name
        st = getattr(self.cfg, stage)
        local = self.step - (self.n_coarse if stage == "fine" else 0)
        t0 = time.perf_counter()
        # Cameras, shading and light are drawn on the host (the run's generator lives there)
        # and sent to the device without waiting for it.
        cameras_host = sample_cameras(st.batch_size, self.cfg.cameras, st.resolution, self.generator, "cpu")
        cameras = cameras_host.to(self.device)
        self._step_cameras = (cameras, cameras_host)
        look = sample_look(st, local, cameras_host.eye, self.generator, self.device, stage_obj.background)
        out, regs = stage_obj.render(cameras, look, self.generator, local)
        t1 = time.perf_counter()
        self.look = look  # the objective may render other things alike (the oracle's target, an edit's source)
        if self.target is not None:
            self.target.look = look
        loss, terms, t_mean = self.objective(out, cameras, local)
        t2 = time.perf_counter()
        for name, (weight, value) in regs.items():
            loss = loss + weight * value
            terms[name] = value.detach()
        logged = {"loss": loss.detach(), **terms, "t": t_mean}
        if stage == "coarse":
            logged["occupancy"] = stage_obj.occupancy.occupied_fraction()
        # The one read-back of the step: every logged number at once, before the backward
        # (a non-finite loss must not reach the optimiser).
        numbers = read_back(logged)
        if not math.isfinite(numbers["loss"]):
            raise NonFiniteLoss(f"loss is {numbers['loss']} at step {self.step + 1} ({stage})")
        self._watch_guidance(stage, numbers.get("sds_nonfinite"))
        stage_obj.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stage_obj.optimizer.step()
        t3 = time.perf_counter()
        record: dict[str, Any] = {
            "stage": stage, "loss": numbers.pop("loss"), **numbers, "shading": look.shading,
            **{f"lr_{g['name']}": g["lr"] for g in stage_obj.optimizer.param_groups},
            "seconds_render": round(t1 - t0, 4), "seconds_guidance": round(t2 - t1, 4),
            "seconds_backward": round(t3 - t2, 4),
        }
        if "occupancy" in record:
            record["occupancy"] = round(record["occupancy"], 4)
        return record

    NONFINITE_PATIENCE = 100
    """Steps in a row whose guidance prediction was wholly non-finite after which a stage stops
    (or all of a shorter stage's steps)."""

    def _watch_guidance(self, stage: str, nonfinite: float | None) -> None:
        """The guidance's non-finite values are zeroed in its gradient, so a broken model would
        let a run "finish" having learned nothing: warn once at the first, and stop when a
        stage's predictions were wholly non-finite for :data:`NONFINITE_PATIENCE` steps in a row
        (or the whole stage)."""
        if not nonfinite:
            self._nonfinite_run = 0
            return
        if not getattr(self, "_nonfinite_warned", False):
            self._nonfinite_warned = True
            warnings.warn(f"the guidance predicted NaN or infinite values at step {self.step + 1} ({stage}, "
                          f"{100 * nonfinite:.3g}% of the values); they are zeroed in the gradient. If this "
                          "repeats, the diffusion model overflows in half precision: try --set "
                          "guidance.half_dtype=fp16 (or bf16), or guidance.half_precision=false", stacklevel=2)
        self._nonfinite_run = getattr(self, "_nonfinite_run", 0) + 1 if nonfinite >= 1.0 else 0
        patience = min(self.NONFINITE_PATIENCE, max(getattr(self.cfg, stage).steps, 1))
        if self._nonfinite_run >= patience:
            raise GenerateError(
                f"the guidance predicted only NaN or infinite values for {self._nonfinite_run} steps in a row "
                f"(to step {self.step + 1}, {stage}): the run learns nothing, so it stopped. The diffusion model "
                "overflows or its weights are broken: try --set guidance.half_precision=false (or "
                "guidance.half_dtype=fp16/bf16), check the weights with `avatar doctor`, and resume with "
                f"--resume {self.ws.root}")

    # -- previews ----------------------------------------------------------------
    def write_preview(self, stage_obj: Any) -> Path:
        from avatar.render.cameras import orbit_cameras
        from avatar.render.preview import save_preview

        res = getattr(self.cfg, stage_obj.name).resolution
        cams = orbit_cameras(PREVIEW_VIEWS, elevation=15.0, radius=1.3, fov_y=40.0, resolution=res,
                             device=self.device)
        channels = stage_obj.preview(cams)
        path = self.ws.previews_dir / f"{stage_obj.name}-step-{self.step:08d}.png"
        return save_preview(path, channels, prompt=self.cfg.prompt, step=self.step)

    # -- the loop ----------------------------------------------------------------
    kind = "generate"

    def write_config(self) -> None:
        """config.yaml of a new run (an edit saves its own config, not the loop's)."""
        self.ws.save_config(self.cfg)

    def write_info(self) -> None:
        """run.json of a new run (subclasses add what they record)."""
        self.ws.write_info(self.kind, self.cfg.seed, prompt=self.cfg.prompt, prior=self.cfg.prior.spec,
                           guidance=self.guidance.kind, guidance_records=self.guidance.records,
                           guidance_notes=self.guidance.notes, frame=self.frame.to_dict())

    def _rollback(self, exc: NonFiniteLoss) -> None:
        failed_at = self.step + 1
        if self.nan_rollbacks >= 1:
            raise GenerateError(
                f"{exc}, again after rolling back once and halving the learning rates; the run stopped. "
                f"Checkpoints in {self.ws.checkpoints_dir} are intact: lower the learning rates (e.g. --set "
                f"{self.stage_of(self.step)}.lr=...) or the guidance scale and resume") from exc
        ckpt = self.ws.load_checkpoint()
        self.load_state_dict(ckpt["state"])
        self.nan_rollbacks = 1
        self.lr_scale *= 0.5
        self._apply_lr_scale()
        self.ws.log_metrics(failed_at, event="nan_rollback", reason=str(exc), resumed_from=self.step,
                            lr_scale=self.lr_scale)

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        from avatar.seeding import seed_everything

        started = time.perf_counter()
        with self.ws.lock(), _Interrupt() as interrupt, self._progress() as bar:
            if resume:
                seed_everything(self.cfg.seed)  # deterministic algorithms; the RNG states come from the checkpoint
                ckpt = self.ws.load_checkpoint(resume=True)  # metrics.jsonl is cut back to its step
                self.load_state_dict(ckpt["state"])
            else:
                self.write_config()
                self.write_info()
                seed_everything(self.cfg.seed)
                self.generator.manual_seed(int(self.cfg.seed))
                self._ensure_stage()
                self.save_checkpoint()  # step 0: what a first NaN rolls back to
            bar_update = bar(self.step)
            while self.step < self.total:
                if stop_after is not None and self.step >= stop_after:
                    break
                stage_obj = self._ensure_stage()
                try:
                    record = self.train_step(stage_obj)
                except NonFiniteLoss as exc:
                    self._rollback(exc)
                    bar_update(self.step, self.stage_of(self.step), None)
                    continue
                self.step += 1
                self.last_record = record
                self.ws.log_metrics(self.step, **record)
                stage_end = self.step in (self.n_coarse, self.total)
                if self.step % self.cfg.preview_every == 0 or stage_end:
                    self.write_preview(stage_obj)
                if self.step % self.cfg.checkpoint_every == 0 or stage_end:
                    self.save_checkpoint(final_mesh=self.step == self.total)
                bar_update(self.step, stage_obj.name, record)
                if interrupt.requested:
                    if self.step % self.cfg.checkpoint_every != 0 and not stage_end:
                        self.save_checkpoint()
                    raise KeyboardInterrupt(f"stopped at step {self.step}; resume with 'avatar {self.kind} --resume "
                                            f"{self.ws.root}'")
            if stop_after is not None and self.step < self.total:
                latest = self.ws.latest_checkpoint()
                if latest is None or not latest.name.endswith(f"{self.step:08d}.pt"):
                    self.save_checkpoint()
        summary = {
            "run": str(self.ws.root), "step": self.step, "total_steps": self.total,
            "finished": self.step >= self.total, "stage": self.stage_of(min(self.step, self.total - 1)),
            "seconds": round(time.perf_counter() - started, 2), "guidance": self.guidance.kind,
            "notes": list(self.guidance.notes), "nan_rollbacks": self.nan_rollbacks,
            "checkpoint": str(self.ws.latest_checkpoint()), "last": self.last_record,
        }
        if self.progress:
            from rich.console import Console

            state = "finished" if summary["finished"] else f"stopped at step {self.step}/{self.total}"
            Console(stderr=True).print(f"{self.kind} {state} in {summary['seconds']:.0f} s -> {self.ws.root}")
        return summary

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        with Progress(*columns, disable=not self.progress, transient=False) as prog:
            task: list[Any] = []

            def start(step: int) -> Any:
                task.append(prog.add_task(self.kind, total=self.total, completed=step,
                                          stage=self.stage_of(min(step, self.total - 1)), info=""))

                def update(now: int, stage: str, record: dict[str, Any] | None) -> None:
                    info = ""
                    if record is not None:
                        secs = record["seconds_render"] + record["seconds_guidance"] + record["seconds_backward"]
                        info = f"loss {record['loss']:.4g}  {1.0 / max(secs, 1e-9):.2f} it/s"
                    prog.update(task[0], completed=now, stage=stage, info=info)
                return update

            yield start


def run_generate(cfg: Any, workspace: Any, guidance: Any = None, progress: bool = True,
                 stop_after: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` continue) a generate run in ``workspace``.

    cfg: a :class:`~avatar.config.GenerateConfig`. workspace: a
    :class:`~avatar.workspace.Workspace` (created by the caller; locked while running).
    guidance: a ready :class:`~avatar.guidance.sds.ScoreDistillation`; None builds the one
    ``cfg.guidance`` names (``oracle:MESH`` gets a renderer of MESH as its target).
    stop_after: stop once this many steps (counted over both stages) are done and
    write a checkpoint there (resume continues from it).
    Returns a summary dict (run folder, steps, seconds, last metrics record, checkpoint).
    Raises :class:`GenerateError` for bad configs, a vanished surface or repeated NaN losses.
    """
    return GenerateRun(cfg, workspace, guidance=guidance, progress=progress).run(resume=resume, stop_after=stop_after)


def load_final_mesh(workspace: Any) -> tuple[torch.Tensor, torch.Tensor, FieldFrame]:
    """The finished run's mesh: vertices (V, 3) in metres, faces (F, 3) int64, and the frame."""
    ckpt = workspace.load_checkpoint()
    mesh = ckpt["state"].get("mesh")
    if mesh is None:
        raise GenerateError(f"run {workspace.root} has not finished (its last checkpoint is step {ckpt['step']}): "
                            f"resume it with --resume {workspace.root}")
    frame = FieldFrame.from_dict(mesh["frame"])
    return frame.to_metres(mesh["vertices"]), mesh["faces"], frame


__all__ = ["GenerateError", "NonFiniteLoss", "GenerateRun", "MeshTarget", "StepLook", "sample_look", "run_generate",
           "load_final_mesh",
           "validate_config", "resolve_device", "field_options", "head_frame", "load_prior", "fine_grid"]
