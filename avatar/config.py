"""Typed run configuration: dataclasses, presets, YAML and ``--set`` overrides.

Every field carries a docstring (the string literal under it; see
:func:`field_docs`). The dataclass defaults *are* the ``quality`` preset, which
follows HeadSculpt's scale; ``fast`` and ``smoke`` inherit from it by listing only
what they change (:data:`PRESETS`), so a preset never drifts from its parent by
copy. A run saves its resolved config as plain YAML (no Python tags) and loads
it back equal.

Override keys are dotted paths (``coarse.steps=500``); an unknown key is an
error that names the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from avatar.errors import AvatarError
from avatar.paths import outputs_root

CONFIG_VERSION = 2
"""Bumped when a saved config can no longer be read by this code."""


class ConfigError(AvatarError, ValueError):
    """A config file, preset or override is invalid; the message says how to fix it."""


# ---------------------------------------------------------------------------
# Sections


@dataclass
class PriorConfig:
    spec: str = "auto"
    """Head prior: ``anny`` (licence-free, ships with avatar), ``flame:DIR`` (your FLAME files) or
    ``auto`` (FLAME if ``AVATAR_FLAME_DIR`` is set and valid, else anny)."""


@dataclass
class EngineConfig:
    hashgrid: str = "auto"
    """Hash-grid encoding engine: ``auto``, ``tcnn`` (tiny-cuda-nn), ``native`` or ``torch``."""
    composite: str = "auto"
    """Volume compositing engine: ``auto``, ``native`` or ``torch``."""
    raster: str = "auto"
    """Triangle rasteriser: ``auto``, ``nvdiffrast``, ``native`` or ``torch``."""


@dataclass
class GuidanceConfig:
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Text-to-image model: a Hugging Face hub id, a local diffusers folder, ``tiny`` (random
    weights, plumbing only) or ``oracle:MESH`` (reconstructs MESH; for tests)."""
    controlnet: str = "CrucibleAI/ControlNetMediaPipeFace/diffusion_sd15"
    """Landmark ControlNet (MediaPipe face): hub id (``owner/name[/subfolder]``) or local folder;
    empty to disable."""
    negative_prompt: str = ""
    """Negative prompt of classifier-free guidance: empty, as HeadSculpt (``--negative``,
    main.py:17); at CFG 100 any negative text turns the guidance direction everywhere. Try e.g.
    ``"blurry, low quality, deformed, cropped, multiple faces"`` against Janus faces."""
    guidance_scale: float = 101.0
    """Classifier-free guidance weight for score distillation, in the standard CFG form
    ``eps_u + s (eps_c - eps_u)``. HeadSculpt's generation SDS writes ``eps_c + s (eps_c - eps_u)``
    (sd.py:370), so s_ours = s_HS + 1: its 100 is 101 here."""
    controlnet_scale: float = 1.0
    """Strength of the landmark ControlNet residuals."""
    half_precision: bool = True
    """Run the UNet, ControlNet and image encoder in half precision on CUDA (``half_dtype``); the
    fields, renderers and the SDS gradient stay fp32. Ignored on the CPU."""
    half_dtype: str = "auto"
    """Half precision type on CUDA: ``auto`` (bf16 where the card supports it, else fp16), ``fp16``
    or ``bf16``."""
    attention_slicing: bool = False
    """Compute attention in slices to save memory at some speed cost (off: PyTorch's fused attention)."""
    cpu_offload: bool = False
    """Keep model parts on the CPU until used (needs accelerate); for GPUs with little memory."""
    back_view_embedding: str = ""
    """Optional textual-inversion file holding a learned back-view token."""
    view_dependent_prompt: bool = True
    """Append ``front view`` / ``side view`` / ``back view of head`` to the prompt per camera."""
    weighting: str = "headsculpt"
    """SDS weighting w(t): ``headsculpt`` sqrt(abar)(1 - abar), ``dreamfusion`` 1 - abar, or ``uniform``."""
    grad_clip: float = 0.0
    """Clamp each element of the SDS gradient to +-grad_clip (0 disables)."""
    vae_resolution: int = 512
    """RGB renders are resized to this before the image encoder (SD 1.5 is trained at 512)."""
    encoder: str = "sd"
    """Image encoder of score distillation (renders -> latents, backpropagated every step): ``sd``
    (Stable Diffusion's VAE, a posterior sample) or ``tiny-ae`` (``tiny_ae``: TAESD, the same
    latent space at about a ninth of the encoder's cost). Oracle guidance ignores it."""
    tiny_ae: str = "madebyollin/taesd"
    """Where the ``tiny-ae`` encoder's weights are: a hub id or a local diffusers folder
    (diffusers' ``AutoencoderTiny``); ``--guidance tiny`` uses a tiny random one."""
    channels_last: bool = False
    """Store the UNet, ControlNet and image encoder channels-last (faster convolutions on recent GPUs)."""
    compile: bool = False
    """torch.compile the UNet, ControlNet and image encoder (the first step of each stage compiles;
    later ones are faster). Needs a C++ compiler (and Triton on CUDA)."""


@dataclass
class CameraConfig:
    polar_range: tuple[float, float] = (20.0, 110.0)
    """Polar angle range in degrees, measured from +Y (up): 90 is level with the face."""
    radius_range: tuple[float, float] = (0.79, 1.18)
    """Camera distance range from the head centre, in field units: HeadSculpt's (1.0, 1.5)
    (main.py:93) at its 3.18 units per metre, i.e. 0.31-0.47 m, the same apparent head size."""
    fov_range: tuple[float, float] = (30.0, 50.0)
    """Vertical field-of-view range in degrees."""
    front_sector: float = 70.0
    """Width in degrees of the azimuth sector labelled ``front``."""
    back_sector: float = 70.0
    """Width in degrees of the azimuth sector labelled ``back``."""
    overhead_polar: float = 0.0
    """Cameras with a polar angle below this (degrees) are labelled ``overhead`` (prompt "overhead
    view of head"); 0 disables the label, as HeadSculpt does (its polar overrides are commented
    out), so every camera gets its azimuth sector's label and prompt."""
    sector_probs: tuple[float, float, float] = (0.25, 0.5, 0.25)
    """Probabilities of sampling the front, side (either side) and back sectors: HeadSculpt's four
    equally likely sectors (provider.py:93-109)."""
    look_at_jitter: float = 0.0
    """Standard deviation of the look-at point jitter, in field units."""


@dataclass
class StageConfig:
    steps: int = 7000
    """Optimisation steps of this stage (0 skips it)."""
    resolution: int = 64
    """Render resolution (square, pixels) fed to the guidance."""
    batch_size: int = 1
    """Cameras per step."""
    lr: float = 1e-2
    """Learning rate of the hash-grid parameters (Adam)."""
    lr_mlp: float = 1e-3
    """Learning rate of the small MLPs (Adam)."""
    t_range: tuple[float, float] = (0.02, 0.98)
    """Diffusion timestep range sampled for score distillation, as fractions of the schedule."""
    shading_probs: tuple[float, ...] = (0.0, 0.8, 0.0, 0.2)
    """Per-step probabilities of albedo, Lambertian, textureless and normal-map shading after
    the warm-up (HeadSculpt: 80% Lambertian, 20% normal map, utils.py:413-419). Three values
    (albedo, Lambertian, textureless) are read as four with no normal-map steps."""
    ambient_range: tuple[float, float] = (0.1, 1.0)
    """Range of the ambient fraction of the light, drawn uniformly per step for Lambertian and
    textureless shading (HeadSculpt: U(0.1, 1.0)); equal ends fix it."""
    normal_warmup_steps: int = 0
    """Steps at the start of the stage rendered as normal maps only, before the shading mix
    (HeadSculpt's 2000-step warm-up, utils.py:401-411). The coarse stage passes the normal map
    and opacity straight to the denoiser as latents during them (``coarse.warmup_latents``)."""
    background: str = "white"
    """Backdrop of the renders: ``white``, or ``learned`` (a small MLP of the view direction,
    coarse stage only, as HeadSculpt's NeRF learns its background)."""
    random_background_prob: float = 0.5
    """Probability, per step after the warm-up, of rendering over one random solid colour instead
    (HeadSculpt, utils.py:422-425): the backdrop cannot stand in for the head."""
    t_anneal: str = "none"
    """Timestep schedule: ``none`` (uniform in t_range), ``linear`` (upper bound falls to
    ``t_anneal_to`` over the stage) or ``sqrt`` (a decreasing t, HiFA's schedule)."""
    t_anneal_to: float = 0.5
    """Final upper bound of the ``linear`` schedule, as a fraction of the diffusion schedule."""
    n_levels: int = 16
    """Levels of the hash-grid encoding (the NeRF in the coarse stage, the texture field in the fine)."""
    log2_hashmap_size: int = 19
    """log2 of the entries per hash-grid level."""
    max_resolution: int = 2048
    """Finest hash-grid resolution over the field cube."""
    hidden: int = 64
    """Width of the small MLPs."""


@dataclass
class CoarseStageConfig(StageConfig):
    normal_warmup_steps: int = 2000
    background: str = "learned"
    samples_per_ray: int = 1024
    """Lattice steps across the field cube's diagonal, the most samples a ray takes (HeadSculpt's
    1024, main.py:91: a 3.5 mm step at 2.5 units per metre)."""
    occupancy_update_every: int = 16
    """Refresh the occupancy grid (empty-space skipping) every this many steps."""
    occupancy_resolution: int = 128
    """Cells per side of the occupancy grid."""
    prior_sdf_width: float = 0.005
    """Width (metres) of the smooth step turning the prior's SDF into initial density."""
    lambda_opacity: float = 1e-3
    """Weight of the opacity sparsity regulariser."""
    lambda_orientation: float = 5e-4
    """Weight of the normal-orientation regulariser (DreamFusion eq. 6), a mean over the rays'
    samples of w max(n.d, 0)^2, as HeadSculpt weighs it (5e-4, main.py:106)."""
    orientation_per_ray: bool = False
    """Sum the orientation term along each ray and average over rays (the form before version 2
    of the config, kept for runs that started with it) instead of averaging over samples."""
    warmup_latents: bool = True
    """During ``normal_warmup_steps``, feed the normal map and opacity, resized to the latent
    size and mapped to [-1, 1], to a diffusion model directly as its 4 latent channels (no
    encoder; HeadSculpt's and Fantasia3D's fast geometry start). Other guidance (the oracle)
    gets the normal map as an image."""
    normal_eps: float = 8e-3
    """Finite-difference step (field units) of the NeRF's density-gradient normals: HeadSculpt's
    1e-2 of its units (3.1 mm) rescaled to our 2.5 units per metre."""


@dataclass
class FineStageConfig(StageConfig):
    steps: int = 7000
    resolution: int = 512
    t_range: tuple[float, float] = (0.02, 0.5)
    lr: float = 1e-2
    """Learning rate of the SDF, held in [-1, 1] (one grid cell of distance per unit, saturated
    beyond), and of the vertex offsets: HeadSculpt's 1e-2 (network_grid.py:288-289)."""
    normal_warmup_steps: int = 2000
    dmtet_resolution: int = 156
    """DMTet grid resolution: cubic cells along the longest side of the grid's box (the head
    prior's bounding box plus ``grid_margin`` and ``grid_headroom``); the other sides get as
    many cells of the same size as they need. 156 gives HeadSculpt's grid size, 11M
    tetrahedra, with 3.6 mm cells."""
    grid_margin: float = 0.25
    """Room the DMTet grid leaves around the head prior's bounding box at the sides, front, back
    and below, in field units (0.25 = 10 cm at the field frame's 2.5 units per metre): hair and
    beards must fit in it. The grid is clipped to the field cube: 1 here and in ``grid_headroom``
    spans the whole cube, as grids did before they spanned the head's box."""
    grid_headroom: float = 0.5
    """Room the DMTet grid leaves above the head prior's crown, in field units (0.5 = 20 cm):
    hats and hair must fit in it (a surface cannot grow past the grid)."""
    deform_scale: float = 0.5
    """Bound on DMTet vertex offsets, in grid cells."""
    lambda_laplacian: float = 0.25
    """Weight of the Laplacian smoothness regulariser, the mean length (unsquared, field units) of
    each vertex's offset from its neighbours' mean: HeadSculpt's 0.2 (main.py:109) in its
    units, 0.25 in ours."""
    laplacian_squared: bool = False
    """Average the squared Laplacian length instead (the form before version 2 of the config,
    kept for runs that started with it)."""
    lambda_normal: float = 0.0
    """Weight of the normal-consistency regulariser (HeadSculpt: 0)."""
    texture_lr: float = 1e-2
    """Learning rate of the texture field's hash grid."""


@dataclass
class RunConfig:
    """What every optimisation run shares."""

    seed: int = 0
    """Random seed; a fixed seed on the CPU gives bit-identical runs."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda[:N]``."""
    output_root: str = field(default_factory=lambda: str(outputs_root()))
    """Parent folder of run folders (default: ``AVATAR_OUTPUTS``, else ``outputs``)."""
    checkpoint_every: int = 500
    """Write a checkpoint every this many steps (and at each stage end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep per run."""
    preview_every: int = 500
    """Write a preview grid every this many steps."""
    engines: EngineConfig = field(default_factory=EngineConfig)
    """Engine per heavy op."""


@dataclass
class GenerateConfig(RunConfig):
    prompt: str = ""
    """The text describing the head."""
    preset: str = "quality"
    """The preset these values started from (recorded; set with ``--preset``)."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """Parametric head prior."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Diffusion guidance."""
    cameras: CameraConfig = field(default_factory=CameraConfig)
    """Random training cameras."""
    coarse: CoarseStageConfig = field(default_factory=CoarseStageConfig)
    """Coarse stage: hash-grid NeRF, volume rendered."""
    fine: FineStageConfig = field(default_factory=FineStageConfig)
    """Fine stage: DMTet mesh with a texture field, rasterised."""


@dataclass
class EditGuidanceConfig:
    mode: str = "iesd"
    """``iesd`` (HeadSculpt: SD 1.5 with the landmark and InstructPix2Pix ControlNets) or ``ip2p``
    (the InstructPix2Pix UNet with image guidance)."""
    model: str = "timbrooks/instruct-pix2pix"
    """InstructPix2Pix UNet for ``ip2p`` mode: hub id, local folder, ``tiny`` or ``oracle:...``."""
    base_model: str = ""
    """Text-to-image model for ``iesd``; empty uses the source run's guidance model."""
    identity_controlnet: str = "lllyasviel/control_v11e_sd15_ip2p"
    """ControlNet conditioned on the original avatar's renderings (identity term)."""
    identity_controlnet_scale: float = 1.0
    """Strength of the InstructPix2Pix ControlNet residuals."""
    guidance_scale: float = 100.0
    """Text guidance weight, in the standard CFG form ``eps_u + s (eps_c - eps_u)``. In ``iesd`` mode
    it is the CFG of both the identity (source prompt) and the edit (instruction) predictions; in
    ``ip2p`` mode the text scale s_T of InstructPix2Pix. HeadSculpt uses 100 for both (its main.py
    ``--guidance_scale``), and its edit branch already writes the standard form, so 100 here equals
    its 100 (unlike the generation branch, where s_ours = s_HS + 1)."""
    image_guidance_scale: float = 20.0
    """Image guidance weight s_I of InstructPix2Pix (``ip2p`` mode only):
    ``eps_u + s_T (eps_T - eps_I) + s_I (eps_I - eps_u)``. HeadSculpt uses 20 (its
    ``--image_guidance_scale``); diffusers' 1.5 is a sampling default, not a distillation one."""
    half_precision: bool = True
    """Run the diffusion model in fp16 on CUDA (ignored on CPU)."""


@dataclass
class EditConfig(RunConfig):
    preset_keeps: ClassVar[tuple[str, ...]] = ("fine.normal_warmup_steps", "fine.lr")
    """Keys whose edit defaults no preset changes (the presets' values are generation's)."""

    instruction: str = ""
    """What to change, e.g. ``give him a red woollen hat``."""
    source_prompt: str = ""
    """Prompt describing the source avatar; empty uses the one stored in the run."""
    strength: float = 1.0
    """Weight of the edit term against the identity term (0 keeps the source)."""
    texture_only: bool = False
    """Lock geometry and change only the texture (recolouring edits)."""
    lambda_anchor: float = 30.0
    """Weight of the geometry anchor: the squared change of every SDF value and vertex offset
    from the source's, in grid cells, summed (so its pull per grid vertex does not depend on
    the grid's size), times ``1 - strength`` (it is part of the identity side). It gives the
    whole grid a pull back to the source that the edit term overcomes where it asks for new shape."""
    preset: str = "quality"
    """The preset these values started from."""
    guidance: EditGuidanceConfig = field(default_factory=EditGuidanceConfig)
    """Editing guidance (IESD)."""
    cameras: CameraConfig = field(default_factory=CameraConfig)
    """Random training cameras."""
    fine: FineStageConfig = field(default_factory=lambda: FineStageConfig(steps=1500, normal_warmup_steps=0, lr=5e-2))
    """Fine-stage settings used while editing. No normal warm-up (the source is already
    textured), and the SDF learning rate 5e-2 rather than generation's 1e-2: a DMTet surface
    grows about ``lr`` cells per step, and an edit has 1500 steps where HeadSculpt's has 7000
    (its ``--iters``), so a hat can grow as far as in HeadSculpt's edit."""


@dataclass
class ExportConfig:
    formats: tuple[str, ...] = ("glb", "obj", "ply")
    """Files to write: any of ``glb``, ``obj``, ``ply``, ``video``."""
    topology: str = "prior"
    """``prior`` (the default): the anny head on its own topology (skin, eyes, teeth, tongue,
    jaw), fitted to the generated surface, with the prior's own blendshapes and visemes, base
    colour, normal and ORM maps baked on its UV layout, and an accessory mesh for what it
    cannot follow (runs on the anny prior; runs on another prior export their surface).
    ``surface``: the generated surface itself, decimated, its own UV atlas, the prior's
    blendshapes and weights transferred by closest point."""
    faces: int = 20_000
    """Triangle budget. ``prior``: the head's, up to which the skin is subdivided (blendshapes
    and weights carried through the subdivision). ``surface``: the decimation target."""
    texture_size: int = 2048
    """Texture size in pixels: a power of two from 256 to 4096 (1024, 2048 or 4096 for engines)."""
    rig: bool = True
    """Write blendshapes and a skeleton; false writes a static mesh."""
    roughness: float = 0.7
    """PBR roughness of the ``surface`` material (metallic is always 0); the ``prior`` head's ORM
    maps carry their own."""
    video_frames: int = 120
    """Frames of the turntable video."""
    video_size: int = 512
    """Turntable video size in pixels (a multiple of 16, as video encoders want)."""


# ---------------------------------------------------------------------------
# Presets: each names its parent and only what it changes.

PRESETS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "quality": (None, {}),
    "fast": (
        "quality",
        {
            "coarse.steps": 2000,
            "coarse.normal_warmup_steps": 500,
            "fine.steps": 1500,
            "fine.normal_warmup_steps": 400,
            "fine.resolution": 256,
            "fine.dmtet_resolution": 96,
            "checkpoint_every": 250,
            "preview_every": 250,
            "guidance.encoder": "tiny-ae",
        },
    ),
    "smoke": (
        "fast",
        {
            "device": "cpu",
            "coarse.steps": 150,
            "coarse.normal_warmup_steps": 30,
            "coarse.resolution": 32,
            "coarse.samples_per_ray": 48,
            "coarse.occupancy_update_every": 8,
            "fine.steps": 150,
            "fine.normal_warmup_steps": 20,
            "fine.resolution": 64,
            "fine.dmtet_resolution": 22,
            "coarse.n_levels": 8,
            "coarse.log2_hashmap_size": 15,
            "coarse.max_resolution": 256,
            "coarse.hidden": 32,
            "coarse.occupancy_resolution": 48,
            "fine.n_levels": 8,
            "fine.log2_hashmap_size": 15,
            "fine.max_resolution": 256,
            "fine.hidden": 32,
            "checkpoint_every": 50,
            "preview_every": 50,
            "guidance.half_precision": False,
        },
    ),
}
"""Preset name -> (parent preset, dotted overrides applied on top of the parent)."""


def preset_overrides(name: str) -> dict[str, Any]:
    """All overrides of ``name``, parents first, as one flat dotted dict."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    parent, own = PRESETS[name]
    merged = preset_overrides(parent) if parent else {}
    merged.update(own)
    return merged


C = TypeVar("C")


def make_config(cls: type[C], preset: str = "quality", overrides: list[str] | None = None,
                config_file: str | Path | None = None) -> C:
    """Build a config: defaults -> preset -> YAML file -> ``key=value`` overrides."""
    cfg = cls()
    known = set(all_keys(cls))
    for key, value in preset_overrides(preset).items():
        # A preset may tune sections (coarse.*) or keys (guidance.encoder) that a config kind
        # does not have: an edit's guidance section is not generate's.
        if key in known and key not in getattr(cls, "preset_keeps", ()):
            set_value(cfg, key, value)
    if hasattr(cfg, "preset"):
        cfg.preset = preset
    if config_file is not None:
        cfg = merge_dict(cfg, read_yaml(config_file), source=str(config_file))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. coarse.steps=500")
        set_value(cfg, key.strip(), parse_value(cfg, key.strip(), text))
    return cfg


# ---------------------------------------------------------------------------
# Keys, values, types


def all_keys(cls: type) -> list[str]:
    """Every dotted leaf key of a config class."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += [f"{f.name}.{sub}" for sub in all_keys(tp)]
        else:
            keys.append(f.name)
    return keys


def _has_key(cls: type, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def _unknown(key: str, cls: type) -> ConfigError:
    keys = all_keys(cls)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # compare the last part too: "coarse.step" vs "...steps"
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in keys if difflib.get_close_matches(tail, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:1]
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(keys)}"
    return ConfigError(f"unknown config key '{key}' for {cls.__name__}{hint}")


def _resolve(cfg: Any, key: str) -> tuple[Any, str, Any]:
    """Return (owner object, field name, field type) for a dotted key."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or not _has_key(type(obj), part):
            raise _unknown(key, type(cfg))
        tp = typing.get_type_hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. '{key}.{all_keys(tp)[0]}'")
            return obj, part, tp
        obj = getattr(obj, part)
    raise AssertionError("unreachable")


def get_value(cfg: Any, key: str) -> Any:
    obj, name, _ = _resolve(cfg, key)
    return getattr(obj, name)


SEED_RANGE = (0, 2**32)
"""Seeds NumPy accepts (``seed_everything`` seeds it too): checked when a config is built, so a bad
``--seed`` is refused before anything is written."""


def _checked(key: str, value: Any) -> Any:
    """``value`` after the checks of its key that its type cannot express."""
    if key == "seed" and not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise ConfigError(f"seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1] - 1}, got {value}: "
                          "pass e.g. --seed 0")
    return value


def set_value(cfg: Any, key: str, value: Any) -> None:
    """Set a dotted key after checking and converting the value to the field's type."""
    obj, name, tp = _resolve(cfg, key)
    setattr(obj, name, _checked(key, coerce(value, tp, key)))


def parse_value(cfg: Any, key: str, text: str) -> Any:
    """Parse the text of ``key=text``: strings stay verbatim, other types go through YAML."""
    _, _, tp = _resolve(cfg, key)
    if tp is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value '{text}' for '{key}': {exc}") from exc


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples etc."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"'{key}' expects {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3, 1E3 and inf as strings: take every spelling float() takes.
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and (args[-1] is Ellipsis or "," in value):  # --set cameras.fov_range=25,45
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        if args and args[-1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"'{key}' expects {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    raise ConfigError(f"'{key}' has an unsupported type {tp}")


# ---------------------------------------------------------------------------
# Dicts and YAML


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for ``yaml.safe_dump``."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def merge_dict(cfg: C, data: dict[str, Any], source: str = "config") -> C:
    """Apply a nested dict onto ``cfg`` (in place, returned), checking every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            obj, fname, tp = None, None, None
            try:
                obj, fname, tp = _resolve(cfg, key)
            except ConfigError as exc:
                if isinstance(value, dict) and "is a section" in str(exc):
                    walk(key + ".", value)
                    continue
                raise ConfigError(f"{source}: {exc}") from None
            try:
                setattr(obj, fname, _checked(key, coerce(value, tp, key)))
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None

    walk("", data)
    return cfg


def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from a nested dict; keys not given keep their defaults."""
    return merge_dict(cls(), data, source)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a config file; :class:`ConfigError` (one line, naming the file) when
    it is missing, unreadable or not YAML."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else exc!r})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({_yaml_problem(exc)}): fix the file or restore it "
                          "from a backup") from exc
    except RecursionError as exc:  # PyYAML recurses once per level of nesting
        raise ConfigError(f"{path} is not a config file (its YAML is nested too deeply): fix the file or "
                          "restore it from a backup") from exc


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = read_config_file(path)
    if data is None:
        return {}
    if isinstance(data, dict):
        data.pop("config_version", None)
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as plain YAML with a version stamp."""
    data = {"config_version": CONFIG_VERSION, **to_dict(cfg)}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


LEGACY_VALUES: dict[int, dict[str, Any]] = {
    1: {
        # Version 2 took HeadSculpt's recipe (docs/METHOD.md). A run saved before it lacks these
        # keys; these values keep it running as it started (no warm-up, a fixed ambient, white
        # backdrops, the old regulariser forms).
        "coarse.normal_warmup_steps": 0, "fine.normal_warmup_steps": 0,
        "coarse.ambient_range": (0.25, 0.25), "fine.ambient_range": (0.25, 0.25),
        "coarse.background": "white", "coarse.random_background_prob": 0.0, "fine.random_background_prob": 0.0,
        "coarse.orientation_per_ray": True, "fine.laplacian_squared": True,
    },
}
"""Config version -> the values that reproduce that version's behaviour for keys its files lack."""


def _has_dotted(data: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a config saved by :func:`save_config` (refusing newer versions). Keys a file of an
    older version lacks take that version's behaviour (:data:`LEGACY_VALUES`), not today's
    defaults, so a run resumes as it started."""
    path = Path(path)
    raw = read_config_file(path) or {}
    version = raw.get("config_version", CONFIG_VERSION) if isinstance(raw, dict) else CONFIG_VERSION
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ConfigError(
            f"{path} was written by a newer avatar (config version {version}, this one reads "
            f"{CONFIG_VERSION}): upgrade avatar (pip install -U avatar) to use it"
        )
    data = read_yaml(path)
    cfg = cls()
    known = set(all_keys(cls))
    for old in range(version, CONFIG_VERSION):
        for key, value in LEGACY_VALUES.get(old, {}).items():
            if key in known and not _has_dotted(data, key):
                set_value(cfg, key, value)
    return merge_dict(cfg, data, source=str(path))


# ---------------------------------------------------------------------------
# Field documentation


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields (the string literal under each field),
    including inherited ones; a subclass re-declaring a field without a docstring
    keeps its parent's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
