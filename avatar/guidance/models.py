"""Loading diffusion components: Hugging Face hub ids, local folders and the built-in tiny models.

Every source goes through diffusers' (and transformers') own ``from_pretrained``:

- a **local folder** of diffusers weights (the layout ``save_pretrained`` writes) is read
  with ``local_files_only=True``;
- a **hub id** (``owner/name``, optionally ``owner/name/sub/folder``) is read from the
  local Hugging Face cache when it is there, without touching the network; otherwise,
  unless ``HF_HUB_OFFLINE`` is set, the hub is asked once with a short timeout and the
  files are downloaded by ``from_pretrained``. With no cache and no network the load
  fails at once with :class:`WeightsUnavailableError`, naming the repository, the
  cache folder and the offline options;
- ``tiny`` builds (once) and reads the random models of :mod:`avatar.guidance.tiny`.

The components: a Stable Diffusion-shaped pipeline (:func:`load_diffusion_model`), ControlNets
(:func:`load_controlnet`) and TAESD, the tiny autoencoder of ``guidance.encoder=tiny-ae``
(:func:`load_tiny_autoencoder`).

Loading is kept apart from the math (:mod:`.sds`, :mod:`.iesd`, :mod:`.oracle`), which
receives components and never fetches them. Each loader returns a record
``{"spec", "kind", "id", "subfolder", "revision"}`` that a run stores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatar.guidance import tiny as _tiny
from avatar.guidance.errors import GuidanceError, WeightsUnavailableError

TEXT2IMG = "text2img"
INSTRUCT_PIX2PIX = "ip2p"
LANDMARK_CONTROLNET = "landmark_controlnet"
IDENTITY_CONTROLNET = "identity_controlnet"
TINY_AE = "tiny_ae"

DEFAULT_TEXT2IMG = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_LANDMARK_CONTROLNET = "CrucibleAI/ControlNetMediaPipeFace"
LANDMARK_CONTROLNET_SUBFOLDER = "diffusion_sd15"
"""The MediaPipe-face repository keeps its SD 2.1 ControlNet at the top and the SD 1.5 one
(diffusers layout) in this subfolder."""
DEFAULT_INSTRUCT_PIX2PIX = "timbrooks/instruct-pix2pix"
DEFAULT_IDENTITY_CONTROLNET = "lllyasviel/control_v11e_sd15_ip2p"
DEFAULT_TINY_AE = "madebyollin/taesd"
"""TAESD for SD 1.x/2.x latents, in diffusers' ``AutoencoderTiny`` layout (config.json at the top)."""

KNOWN_SUBFOLDERS = {DEFAULT_LANDMARK_CONTROLNET: LANDMARK_CONTROLNET_SUBFOLDER}
"""Hub repositories whose SD 1.5 weights live in a subfolder."""

HUB_PROBE_TIMEOUT = 3.0
"""Seconds to wait for the hub before declaring it unreachable."""

_ROLE_TEXT = {
    TEXT2IMG: ("text-to-image model", "--guidance DIR (a local diffusers folder) or --guidance tiny "
               "(random weights, plumbing only)"),
    INSTRUCT_PIX2PIX: ("InstructPix2Pix model", "--guidance DIR (a local diffusers folder) or --guidance tiny "
                       "(random weights, plumbing only)"),
    LANDMARK_CONTROLNET: ("landmark ControlNet", "--set guidance.controlnet=DIR (a local diffusers folder), "
                          "--set guidance.controlnet= (run without landmark control) or --guidance tiny"),
    IDENTITY_CONTROLNET: ("InstructPix2Pix ControlNet", "--set guidance.identity_controlnet=DIR (a local diffusers "
                          "folder) or --guidance tiny"),
    TINY_AE: ("tiny autoencoder (TAESD)", "--set guidance.tiny_ae=DIR (a local diffusers folder), "
              "--set guidance.encoder=sd (encode with the model's own VAE) or --guidance tiny"),
}
_TINY_FOLDER = {TEXT2IMG: _tiny.TEXT2IMG, INSTRUCT_PIX2PIX: _tiny.INSTRUCT_PIX2PIX,
                LANDMARK_CONTROLNET: _tiny.LANDMARK_CONTROLNET, IDENTITY_CONTROLNET: _tiny.IDENTITY_CONTROLNET,
                TINY_AE: _tiny.TINY_AE}
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-]+)*$")


# ---------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class WeightsSpec:
    """Where a model's weights come from."""

    spec: str
    """What the user wrote (``owner/name``, a folder, ``tiny``)."""
    kind: str
    """``hub``, ``local`` or ``tiny``."""
    location: str
    """Repository id (``owner/name``) or absolute folder."""
    subfolder: str | None = None
    """Folder inside the repository that holds this model (hub only)."""


def is_tiny(spec: str) -> bool:
    return spec.strip().lower() == "tiny"


def oracle_mesh(spec: str) -> str | None:
    """``oracle:MESH`` -> ``MESH``; anything else -> None."""
    return spec.split(":", 1)[1] if spec.strip().lower().startswith("oracle:") else None


def parse_weights_spec(spec: str, role: str = TEXT2IMG) -> WeightsSpec:
    """Classify ``spec``: an existing folder, ``tiny`` or a hub id (``owner/name[/sub/folder]``)."""
    text = spec.strip()
    if not text:
        raise GuidanceError(f"empty weights spec for the {_ROLE_TEXT[role][0]}")
    if is_tiny(text):
        return WeightsSpec(text, "tiny", "tiny")
    path = Path(text).expanduser()
    if path.is_dir():
        return WeightsSpec(text, "local", str(path.resolve()))
    if path.exists():
        raise GuidanceError(f"{text} is a file; the {_ROLE_TEXT[role][0]} needs a folder of diffusers weights "
                            "(config.json + weights, as save_pretrained writes) or a hub id")
    if _REPO_RE.match(text) and not text.startswith((".", "/", "~")):
        parts = text.split("/")
        repo = "/".join(parts[:2])
        sub = "/".join(parts[2:]) or KNOWN_SUBFOLDERS.get(repo)
        return WeightsSpec(text, "hub", repo, sub)
    raise GuidanceError(f"'{text}' is neither an existing folder nor a Hugging Face hub id (owner/name) for the "
                        f"{_ROLE_TEXT[role][0]}; use {_ROLE_TEXT[role][1]}")


def _tiny_path(role: str, seed: int = 0) -> Path:
    return _tiny.tiny_models_dir(seed) / _TINY_FOLDER[role]


# ---------------------------------------------------------------------------
# The Hugging Face cache and the hub


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder in use (HF_HUB_CACHE / HF_HOME aware)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_command(ws: WeightsSpec, role: str) -> str:
    """The ``hf download`` command that fetches what this loader reads (configs, vocabulary and
    fp32 safetensors; not the single-file checkpoints, EMA or fp16 copies many repositories also hold)."""
    if role in (TEXT2IMG, INSTRUCT_PIX2PIX):
        pats = ["model_index.json", "*/*.json", "*/*.txt", "text_encoder/model.safetensors",
                "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    else:
        # Some ControlNet repositories hold only an fp16 variant: take whichever safetensors exist
        # (TAESD's repository is laid out like a ControlNet's: config.json and the weights at the top).
        prefix = f"{ws.subfolder}/" if ws.subfolder else ""
        pats = [f"{prefix}config.json", f"{prefix}diffusion_pytorch_model*.safetensors"]
    if ws.subfolder and role in (TEXT2IMG, INSTRUCT_PIX2PIX):
        pats = [f"{ws.subfolder}/{p}" for p in pats]
    return f"hf download {ws.location} --include " + " ".join(f'"{p}"' for p in pats)


def _unavailable(ws: WeightsSpec, role: str, reason: str) -> WeightsUnavailableError:
    what, options = _ROLE_TEXT[role]
    where = ws.location + (f" (subfolder {ws.subfolder})" if ws.subfolder else "")
    return WeightsUnavailableError(
        f"no weights for the {what} {where} in the local Hugging Face cache {hub_cache_dir()} and {reason}. "
        f"Download them where there is network with `{download_command(ws, role)}` (into that cache: set "
        f"HF_HUB_CACHE or HF_HOME to use another), or pass {options}."
    )


def _probe_hub(ws: WeightsSpec, role: str) -> str:
    """Ask the hub for the repository's current commit, failing fast; return the revision."""
    if hub_offline():
        raise _unavailable(ws, role, "HF_HUB_OFFLINE is set (no downloads)")
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi(endpoint=constants.ENDPOINT).model_info(ws.location, timeout=HUB_PROBE_TIMEOUT)
    except GatedRepoError as exc:
        raise _unavailable(ws, role, f"the repository is gated: accept its licence on the hub and log in with "
                                     f"`hf auth login` ({exc.__class__.__name__})") from None
    except RepositoryNotFoundError:
        raise _unavailable(ws, role, "the hub has no such repository (check the id)") from None
    except Exception as exc:  # connection refused, DNS, timeout, proxy: all mean "no network"
        raise _unavailable(ws, role, f"the hub is unreachable ({type(exc).__name__}: {exc})") from None
    return str(info.sha)


def _cached_snapshot(repo: str, probe_file: str) -> Path | None:
    """The cached snapshot folder of ``repo`` (its ``main`` ref) if ``probe_file`` is in it."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, probe_file, cache_dir=hub_cache_dir())
    if not isinstance(hit, str):
        return None
    return Path(hit).parents[len(Path(probe_file).parts) - 1]


# ---------------------------------------------------------------------------
# One component


_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def _variant(folder: Path) -> str | None:
    """``fp16`` when a folder holds only fp16-variant weights (as some hub repositories do)."""
    names = {p.name for p in folder.glob("*")}
    full = any(f"{s}.{e}" in names for s in _WEIGHT_STEMS for e in ("safetensors", "bin"))
    half = any(f"{s}.fp16.{e}" in names for s in _WEIGHT_STEMS for e in ("safetensors", "bin"))
    return "fp16" if half and not full else None


def _quiet_kwargs(cls: type) -> dict[str, Any]:
    # Without accelerate, diffusers warns on every load that it cannot use low_cpu_mem_usage.
    if cls.__module__.startswith("diffusers.models") and importlib.util.find_spec("accelerate") is None:
        return {"low_cpu_mem_usage": False}
    return {}


def _from_folder(cls: type, folder: Path, probes: tuple[str, ...], dtype: Any, what: str) -> Any:
    if not any((folder / p).is_file() for p in probes):
        raise GuidanceError(f"{folder} has no {' or '.join(probes)}: it is not a {what} folder in diffusers layout "
                            "(as save_pretrained writes)")
    kwargs: dict[str, Any] = {"local_files_only": True, **_quiet_kwargs(cls)}
    if cls.__module__.startswith("diffusers.models"):
        kwargs["torch_dtype"] = dtype
        if (variant := _variant(folder)) is not None:
            kwargs["variant"] = variant
    obj = cls.from_pretrained(str(folder), **kwargs)
    if cls.__module__.startswith("transformers.models") and hasattr(obj, "to") and dtype is not None:
        obj = obj.to(dtype)  # transformers renamed torch_dtype -> dtype in v5: cast after loading instead
    return obj


def _load_component(cls: type, ws: WeightsSpec, role: str, component: str | None, probes: tuple[str, ...],
                    dtype: Any, record: dict[str, Any]) -> Any:
    """Load ``cls`` from ``ws`` (``component`` = its subfolder in a pipeline repository, e.g. ``unet``);
    ``probes``: files of which one marks the component as present (``config.json`` ...)."""
    what = _ROLE_TEXT[role][0]
    if ws.kind in ("local", "tiny"):
        base = Path(ws.location) if ws.kind == "local" else _tiny_path(role)
        return _from_folder(cls, base / component if component else base, probes, dtype, what)
    sub = "/".join(p for p in (ws.subfolder, component) if p)
    snapshot = None
    for probe in probes:
        snapshot = snapshot or _cached_snapshot(ws.location, f"{sub}/{probe}" if sub else probe)
    if snapshot is not None:
        try:
            obj = _from_folder(cls, snapshot / sub if sub else snapshot, probes, dtype, what)
        except (OSError, ValueError) as exc:  # config cached but weights missing: a partial download
            if hub_offline():
                raise _unavailable(ws, role, f"the cached copy is incomplete ({exc})") from None
        else:
            record.setdefault("revision", snapshot.name)
            return obj
    revision = record.get("revision") or _probe_hub(ws, role)
    record["revision"] = revision
    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": str(hub_cache_dir()), **_quiet_kwargs(cls)}
    if sub:
        kwargs["subfolder"] = sub
    if cls.__module__.startswith("diffusers.models"):
        kwargs["torch_dtype"] = dtype
    obj = cls.from_pretrained(ws.location, **kwargs)
    if cls.__module__.startswith("transformers.models") and hasattr(obj, "to") and dtype is not None:
        obj = obj.to(dtype)
    return obj


def _new_record(ws: WeightsSpec, role: str) -> dict[str, Any]:
    record: dict[str, Any] = {"role": role, "spec": ws.spec, "kind": ws.kind, "id": ws.location,
                              "subfolder": ws.subfolder}
    if ws.kind == "tiny":
        record["id"] = str(_tiny_path(role))
        record["revision"] = f"tiny-v{_tiny.TINY_VERSION}"
    elif ws.kind == "local":
        record["revision"] = None
    return record


# ---------------------------------------------------------------------------
# Keeping loaded models for later runs of the same process (batch workers)

_shared: dict[tuple[Any, ...], Any] | None = None
"""Loaded modules by (what, kind, location, subfolder, role, dtype, device); None: not kept."""


def keep_models_loaded() -> None:
    """From now on, :func:`load_diffusion_model`, :func:`load_controlnet` and
    :func:`load_tiny_autoencoder` keep the UNet, VAE, scheduler, ControlNets and TAESD they load
    and hand the same modules to later calls with the same
    spec, role, dtype and device, for the rest of the process. A batch worker calls this once so
    that it reads the weights once for all its prompts. The modules are shared, so callers must
    not change them (the guidance only reads them; text encoders are never shared)."""
    global _shared
    if _shared is None:
        _shared = {}


@contextlib.contextmanager
def models_kept_loaded() -> Iterator[None]:
    """:func:`keep_models_loaded` for the block only (unless it was already on)."""
    global _shared
    was_on = _shared is not None
    keep_models_loaded()
    try:
        yield
    finally:
        if not was_on:
            _shared = None


def _shared_key(what: str, ws: WeightsSpec, role: str, dtype: Any, device: Any) -> tuple[Any, ...]:
    import torch

    where = str(_tiny_path(role)) if ws.kind == "tiny" else ws.location  # the tiny models follow AVATAR_CACHE_DIR
    return (what, ws.kind, where, ws.subfolder, role, str(dtype), str(torch.device(device)))


def _shared_get(key: tuple[Any, ...]) -> Any:
    if _shared is None or key not in _shared:
        return None
    modules = [m for m in _shared[key] if hasattr(m, "parameters")]
    if any(hasattr(m, "_hf_hook") for m in modules):
        # accelerate's CPU offload hooks them in place and must not be applied twice: load afresh.
        del _shared[key]
        return None
    return _shared[key]


def _shared_put(key: tuple[Any, ...], value: Any) -> None:
    if _shared is not None:
        _shared[key] = value


# ---------------------------------------------------------------------------
# Public loaders


@dataclass
class DiffusionModel:
    """The parts of a Stable Diffusion-shaped pipeline (text-to-image or InstructPix2Pix).

    ``text_encoder`` is set to None once the prompt embeddings are computed (to free memory).
    """

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler: Any
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD 1.5, 2 for tiny)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_diffusion_model(spec: str, role: str = TEXT2IMG, dtype: Any = None, device: Any = "cpu") -> DiffusionModel:
    """Tokenizer, text encoder, UNet, VAE and scheduler of ``spec`` (hub id, folder or ``tiny``).

    role: ``text2img`` (SD 1.5-shaped, UNet with 4 input channels) or ``ip2p``
    (InstructPix2Pix, UNet with 8). The DDIM scheduler is read from the repository's
    ``scheduler`` config (only its noise schedule is used).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = dtype or torch.float32
    ws = parse_weights_spec(spec, role)
    record = _new_record(ws, role)
    config = ("config.json",)
    key = _shared_key("diffusion", ws, role, dtype, device)
    hit = _shared_get(key)
    if hit is not None:
        unet, vae, scheduler, shared_record = hit
        record = dict(shared_record)
    else:
        unet = _load_component(UNet2DConditionModel, ws, role, "unet", config, dtype, record)
        vae = _load_component(AutoencoderKL, ws, role, "vae", config, dtype, record)
        scheduler = _load_component(DDIMScheduler, ws, role, "scheduler", ("scheduler_config.json",), None, record)
    # The text encoder and tokenizer are always fresh: callers change them in place (textual
    # inversion adds a token) and free the encoder once the prompts are encoded.
    text_encoder = _load_component(CLIPTextModel, ws, role, "text_encoder", config, dtype, record)
    tokenizer = _load_component(CLIPTokenizer, ws, role, "tokenizer", ("vocab.json", "tokenizer.json"), None, record)
    want = 8 if role == INSTRUCT_PIX2PIX else 4
    if unet.config.in_channels != want:
        kind = "an InstructPix2Pix" if want == 8 else "a text-to-image"
        raise GuidanceError(f"{spec}: its UNet takes {unet.config.in_channels} input channels, {kind} UNet takes "
                            f"{want}; check that the right model is given for the {_ROLE_TEXT[role][0]}")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(device)
    _shared_put(key, (unet, vae, scheduler, dict(record)))
    return DiffusionModel(tokenizer, text_encoder, unet, vae, scheduler, record)


def _load_single(cls: Any, what: str, spec: str, role: str, dtype: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """A one-folder component (a ControlNet, a tiny autoencoder) of ``spec``, frozen on ``device``,
    and its record; shared between runs of the process like the other components."""
    import torch

    dtype = dtype or torch.float32
    ws = parse_weights_spec(spec, role)
    key = _shared_key(what, ws, role, dtype, device)
    hit = _shared_get(key)
    if hit is not None:
        return hit[0], dict(hit[1])
    record = _new_record(ws, role)
    module = _load_component(cls, ws, role, None, ("config.json",), dtype, record)
    module.requires_grad_(False).eval().to(device)
    _shared_put(key, (module, dict(record)))
    return module, record


def load_controlnet(spec: str, role: str = LANDMARK_CONTROLNET, dtype: Any = None,
                    device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """A ``ControlNetModel`` and its record. For the default MediaPipe-face repository the SD 1.5
    weights are read from its ``diffusion_sd15`` subfolder."""
    from diffusers import ControlNetModel

    return _load_single(ControlNetModel, "controlnet", spec, role, dtype, device)


def load_tiny_autoencoder(spec: str, dtype: Any = None, device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """An ``AutoencoderTiny`` (TAESD: ``madebyollin/taesd`` by default) and its record, through the
    same hub / local folder / ``tiny`` paths as the other components. Its latents are already in
    the UNet's scale (its config's ``scaling_factor`` is 1.0)."""
    from diffusers import AutoencoderTiny

    return _load_single(AutoencoderTiny, "tiny_ae", spec, TINY_AE, dtype, device)


def noise_schedule(num_train_timesteps: int = 1000) -> Any:
    """SD 1.5's noise schedule as a DDIM scheduler built from its config (no weights needed);
    used by the oracle, which has no diffusion model of its own."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def local_cache_status(spec: str, role: str = TEXT2IMG) -> dict[str, Any]:
    """For ``avatar doctor``: is ``spec`` loadable without network? ``{"available", "reason"}``."""
    try:
        ws = parse_weights_spec(spec, role)
    except GuidanceError as exc:
        return {"available": False, "reason": str(exc)}
    if ws.kind == "tiny":
        return {"available": True, "reason": "built in (random weights: plumbing and smoke tests only)"}
    if ws.kind == "local":
        return {"available": True, "reason": f"local folder {ws.location}"}
    probe = "unet/config.json" if role in (TEXT2IMG, INSTRUCT_PIX2PIX) else "config.json"
    probe = f"{ws.subfolder}/{probe}" if ws.subfolder else probe
    snap = _cached_snapshot(ws.location, probe)
    if snap is not None:
        return {"available": True, "reason": f"cached in {snap} (revision {snap.name})"}
    return {"available": False, "reason": f"not in {hub_cache_dir()}: {download_command(ws, role)} "
                                          f"(or pass {_ROLE_TEXT[role][1]})"}
