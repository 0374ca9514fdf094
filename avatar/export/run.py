"""``export_run`` and ``preview_run``: a finished run folder -> files for engines and people.

export_run: read the avatar (:func:`~avatar.pipeline.artifact.load_avatar`) ->
extract the surface at export resolution -> clean -> decimate -> smooth normals ->
UV atlas -> bake the texture field -> transfer the prior's blendshapes and skin ->
write ``avatar.glb``, ``avatar.obj`` (+ ``.mtl``, ``.png``), ``avatar.ply`` and, on
request, ``turntable.mp4`` into ``RUN/export/``, plus ``export.json`` saying what was
done. Every argument is checked before any work; an existing file is never replaced
without ``force``; every file is written to a temp name and renamed.

preview_run: ``turntable.mp4`` and the offline ``preview.html`` viewer next to the
GLB (exported first if missing), both made from the GLB itself.
"""

from __future__ import annotations

import json
import os
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
PREVIEW_FILES = ("turntable.mp4", "preview.html")
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
                          "(default 50000)")
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


def prepare_output(out_dir: Path, names: list[str], force: bool) -> None:
    """Create ``out_dir`` and check it is writable and holds none of ``names`` (unless ``force``)."""
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not force:
        raise ExportError(f"{out_dir} already holds {', '.join(existing)}: pass --force to replace "
                          "them, or --out to write somewhere else")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write to {out_dir} ({exc.strerror or exc}): make it writable or pass "
                          "--out to a writable folder") from exc


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

    Writes into ``out_dir`` (default ``RUN/export/``): ``avatar.glb`` (textured PBR,
    ARKit morph targets, neck/head/eye skin unless ``cfg.rig`` is false),
    ``avatar.obj`` + ``avatar.mtl`` + ``avatar.png``, ``avatar.ply`` (vertex colours),
    ``turntable.mp4`` (with ``video`` in ``cfg.formats``) and ``export.json``.
    Returns the summary also written to ``export.json``: files, counts, seconds.

    Raises :class:`ExportError` (or the run's own errors) before any work for: a
    missing or unfinished run, a bad texture size, too few faces, an unknown format,
    an unwritable output folder, or files that exist without ``force``.
    """
    from avatar.config import ExportConfig
    from avatar.export.formats import obj_files, ply_bytes
    from avatar.export.gltf import build_glb
    from avatar.export.rig import transfer_rig
    from avatar.export.texture import encode_png
    from avatar.pipeline.artifact import load_avatar
    from avatar.workspace import atomic_write_bytes

    cfg = cfg or ExportConfig()
    started = time.perf_counter()
    formats = validate_export_config(cfg)
    ws = _open_run(run)
    out = Path(out_dir) if out_dir is not None else ws.export_dir
    names = [n for f in formats for n in FILES[f]]
    prepare_output(out, names, force)
    report = _reporter(progress)
    with _run_lock(ws):
        avatar = load_avatar(ws)
        engine = str((avatar.config.get("engines") or {}).get("raster", "auto"))
        mesh = build_export_mesh(avatar, int(cfg.faces), int(cfg.texture_size), engine=engine, report=report)
        seconds = mesh.stats["seconds"]
        positions_m = avatar.frame.to_metres(torch.as_tensor(mesh.vertices)).numpy()
        png = encode_png(mesh.texture)
        written: dict[str, str] = {}
        rig = None
        if "glb" in formats:
            if cfg.rig:
                with _timed(seconds, "rig", report):
                    source_m = avatar.frame.to_metres(torch.as_tensor(mesh.source_vertices)).numpy()
                    rig = _index_rig(transfer_rig(source_m, _resolved_prior(avatar)), mesh.source_index)
            with _timed(seconds, "glb", report):
                data = build_glb(positions_m, mesh.normals, mesh.uvs, mesh.faces, png, roughness=float(cfg.roughness),
                                 rig=rig, extras=_json_ready(asset_extras(avatar)))
                atomic_write_bytes(out / "avatar.glb", data)
                written["glb"] = str(out / "avatar.glb")
        if "obj" in formats:
            with _timed(seconds, "obj", report):
                for name, data in obj_files(positions_m, mesh.normals, mesh.uvs, mesh.faces, png).items():
                    atomic_write_bytes(out / name, data)
                written["obj"] = str(out / "avatar.obj")
        if "ply" in formats:
            with _timed(seconds, "ply", report):
                with torch.no_grad():
                    colours = avatar.albedo(torch.as_tensor(mesh.source_vertices, dtype=torch.float32)).clamp(0, 1)
                colours = (colours.cpu().numpy() * 255).round().astype(np.uint8)
                source_m = avatar.frame.to_metres(torch.as_tensor(mesh.source_vertices)).numpy()
                atomic_write_bytes(out / "avatar.ply", ply_bytes(source_m, mesh.source_normals, mesh.source_faces,
                                                                 colours))
                written["ply"] = str(out / "avatar.ply")
        if "video" in formats:
            from avatar.export.video import write_turntable

            with _timed(seconds, "video", report):
                write_turntable(out / "turntable.mp4", torch.as_tensor(mesh.vertices, dtype=torch.float32),
                                torch.as_tensor(mesh.faces), torch.as_tensor(mesh.uvs),
                                torch.as_tensor(mesh.texture, dtype=torch.float32) / 255.0,
                                int(cfg.video_frames), int(cfg.video_size), engine=engine)
                written["video"] = str(out / "turntable.mp4")
    summary = {
        "run": str(ws.root), "out": str(out), "files": written, "formats": list(formats),
        "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
        "mesh_vertices": int(len(mesh.source_vertices)), "texture_size": int(cfg.texture_size),
        "rig": rig is not None, "morph_targets": len(rig.target_names) if rig is not None else 0,
        "joints": list(rig.joint_names) if rig is not None else [],
        **{k: v for k, v in mesh.stats.items() if k != "seconds"},
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 3)},
    }
    atomic_write_bytes(out / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
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
    """Write ``turntable.mp4`` and ``preview.html`` next to the run's ``export/avatar.glb``
    (exporting the GLB with default settings first if it is missing).

    Both are made from the GLB: the video renders its mesh with its texture, the viewer
    embeds the file. Raises :class:`ExportError` for a size that is not a multiple of 16,
    existing files without ``force``, or an unwritable folder.
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
    prepare_output(out, list(PREVIEW_FILES), force)
    glb_path = out / "avatar.glb"
    exported = None
    if not glb_path.is_file():
        exported = export_run(ws, ExportConfig(formats=("glb",)), progress=progress)
    glb = read_glb(glb_path)
    frame_dict = (glb.extras or {}).get("field_frame")
    if frame_dict is None:
        from avatar.pipeline.artifact import load_avatar

        frame = load_avatar(ws).frame
    else:
        frame = FieldFrame.from_dict(frame_dict)
    seconds: dict[str, float] = {}
    report = _reporter(progress)
    with _timed(seconds, "video", report):
        verts = frame.to_field(torch.as_tensor(glb.positions, dtype=torch.float32))
        write_turntable(out / "turntable.mp4", verts, torch.as_tensor(glb.faces), torch.as_tensor(glb.uvs),
                        torch.as_tensor(glb.texture, dtype=torch.float32) / 255.0, int(frames), int(size))
    with _timed(seconds, "html", report):
        html = viewer_html(glb_path.read_bytes(), title=str((glb.extras or {}).get("prompt") or ws.root.name),
                           target_names=glb.target_names)
        atomic_write_bytes(out / "preview.html", html.encode())
    return {"run": str(ws.root), "video": str(out / "turntable.mp4"), "html": str(out / "preview.html"),
            "glb": str(glb_path), "frames": int(frames), "size": int(size), "exported": exported is not None,
            "seconds": {**seconds, "total": round(time.perf_counter() - started, 3)}}


__all__ = ["FILES", "FORMATS", "ExportError", "ExportMesh", "asset_extras", "build_export_mesh", "export_run",
           "prepare_output", "preview_run", "validate_export_config", "validate_video"]
