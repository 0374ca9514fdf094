"""The ``avatar`` command line: generate, edit, export, preview, import, batch, doctor.

Heavy modules (torch, diffusers, the native extension) are imported inside the
commands, so ``avatar --help`` is instant. Errors a user can fix
(:class:`avatar.errors.AvatarError`) are printed as one message with exit code 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from avatar.errors import AvatarError


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class AvatarGroup(TyperGroup):
    """The command group: Ctrl-C prints where the run stopped and how to continue it (exit
    code 130). Typer turns a KeyboardInterrupt into a silent exit 130 before :func:`main` could
    see it, so it is caught here, inside typer's handler (where ``CliRunner`` sees it too)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            # The loop's own message says at which step it stopped and how to resume.
            typer.echo(_one_line(exc) if str(exc).strip() else "interrupted", err=True)
            raise typer.Exit(code=130) from None


app = typer.Typer(
    name="avatar",
    cls=AvatarGroup,
    help="Text prompt -> rigged, textured 3D head for game engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
prior_app = typer.Typer(help="Inspect the parametric head prior.", no_args_is_help=True)
app.add_typer(prior_app, name="prior")

PRESET_HELP = "Preset: quality (GPU, HeadSculpt scale), fast (GPU), smoke (CPU, minutes)."
SET_HELP = "Override a config value, e.g. --set coarse.steps=500 (repeatable)."
OUT_HELP = "Parent folder of run folders (default: $AVATAR_OUTPUTS, else outputs)."

Preset = Annotated[str, typer.Option("--preset", help=PRESET_HELP)]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP, metavar="KEY=VALUE")]
# Checked by avatar.config (a folder or garbled YAML is one line there, not a usage box).
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML file of config values.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the config's, 0).")]
Guidance = Annotated[Optional[str], typer.Option("--guidance", help="Hub id, local diffusers folder, 'tiny' or "
                                                 "'oracle:MESH'.")]


def _overrides(values: list[str] | None, **named: object) -> list[str]:
    """Command-line options that map onto config keys, as ``key=value`` overrides."""
    out = [f"{key}={value}" for key, value in named.items() if value is not None]
    return out + list(values or [])


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before anything loads or is written, an output folder that is a file or cannot be
    written (what is missing of it is created later, by whoever writes there). Returns the path.

    Writability is tried by making and removing a temporary folder in the nearest part of the
    path that exists (permission bits do not tell: root ignores them, a read-only mount does not)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise AvatarError(f"{option} {path} is a file, not a folder: pass a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AvatarError(f"{option} {path} cannot be created: {existing} is a file; pass a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".avatar-write-test-", dir=existing)
    except OSError as exc:
        raise AvatarError(f"{option} {path} is not writable ({exc.strerror or type(exc).__name__} in {existing}): "
                          "pass a folder you can write to") from exc
    os.rmdir(probe)
    return path


RESUMES = {"generate": "a generate run", "import": "an import run", "edit": "an edit folder"}
"""Folder kind (run.json's ``kind``) -> what it is called; each resumes with ``avatar KIND --resume``."""


def _refuse_with_resume(ctx: typer.Context) -> None:
    """``--resume`` continues a folder with its own saved settings: other arguments would be
    silently ignored, so they are refused."""
    given = []
    for param in ctx.command.params:
        if param.name in ("resume", None):
            continue
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.append(param.opts[0] if param.param_type_name == "option" else param.name.upper())
    if given:
        raise AvatarError(f"--resume continues a folder with the settings it was started with, so {', '.join(given)} "
                          f"cannot be given with it: drop {'it' if len(given) == 1 else 'them'}, or leave out "
                          "--resume to start anew")


def _open_to_resume(folder: Path, command: str) -> Any:
    """The workspace of ``folder``, checked to be the kind ``avatar COMMAND --resume`` continues
    (an edit folder given to generate is named as one, with the command that resumes it)."""
    from avatar.workspace import Workspace

    ws = Workspace.open(folder)
    kind = ws.read_info().get("kind")
    if kind is None and command == "generate":  # run.json not yet written: the loop's checks decide
        return ws
    if kind != command:
        if kind in RESUMES:
            raise AvatarError(f"{folder} is {RESUMES[kind]}, not {RESUMES[command]}: continue it with "
                              f"'avatar {kind} --resume {folder}'")
        what = f"a '{kind}' folder" if kind is not None else "a folder whose run.json does not say what made it"
        raise AvatarError(f"{folder} is {what}, not {RESUMES[command]}: pass a folder that "
                          f"'avatar {command}' wrote")
    return ws


def _run_to_end(run: Any, command: str, resume: bool = False) -> dict[str, Any]:
    """``run.run()``; Ctrl-C becomes a KeyboardInterrupt saying where the run stopped and how to
    continue it (the CLI prints it; typer alone would exit silently)."""
    try:
        return run.run(resume=resume)
    except KeyboardInterrupt as exc:
        latest = run.ws.latest_checkpoint()
        saved = int(latest.stem.split("-")[-1]) if latest is not None else None
        if saved is None:
            raise KeyboardInterrupt(f"stopped before the first checkpoint of {run.ws.root}: start the run "
                                    "again") from exc
        kept = "" if saved == run.step else f" (resume continues from the checkpoint of step {saved})"
        raise KeyboardInterrupt(f"stopped at step {run.step} of {run.total}{kept}; resume with "
                                f"'avatar {command} --resume {run.ws.root}'") from exc


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[Optional[str], typer.Argument(help="Text describing the head.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line "
                                                    "(blank and # lines skipped); one run per prompt.")] = None,
    preset: Preset = "quality",
    guidance: Guidance = None,
    head_model: Annotated[Optional[str], typer.Option("--head-model", help="Head prior: anny, flame:DIR "
                                                      "or auto.")] = None,
    seed: Seed = None,
    out: Annotated[Optional[Path], typer.Option("--out", help=OUT_HELP)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue RUN from its last "
                                                   "checkpoint.")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Optimise a head from a text prompt (coarse NeRF, then fine DMTet mesh)."""
    from dataclasses import replace

    from avatar.config import GenerateConfig, make_config

    if resume is not None:
        from avatar.pipeline.generate import GenerateRun

        _refuse_with_resume(ctx)
        ws = _open_to_resume(resume, "generate")
        _run_to_end(GenerateRun(ws.load_config(GenerateConfig), ws), "generate", resume=True)
        return
    if prompts is None and not (prompt or "").strip():
        raise AvatarError("the prompt is empty: avatar generate \"an old sea captain with a grey beard\" "
                          "(or --prompts FILE, or --resume RUN)")
    if prompts is not None and not prompts.is_file():
        raise AvatarError(f"prompts file {prompts} does not exist or is not a file")
    cfg = make_config(GenerateConfig, preset, config_file=config, overrides=_overrides(
        set_, prompt=prompt, seed=seed, output_root=out,
        **{"guidance.model": guidance, "prior.spec": head_model}))
    check_output_folder(cfg.output_root)
    from avatar.pipeline import read_prompts, run_prompts, validate_config
    from avatar.pipeline.generate import GenerateRun
    from avatar.workspace import Workspace

    if prompts is not None:
        prompt_list = read_prompts(prompts)
        for text in prompt_list:
            validate_config(replace(cfg, prompt=text))
        summary = run_prompts(cfg, prompt_list)
        for run in summary["runs"]:
            status = "ok    " if run["ok"] else "FAILED"
            typer.echo(f"{status} {run['prompt']} -> {run['run'] or '(no folder)'} {run.get('error', '')}".rstrip())
        typer.echo(f"{summary['succeeded']}/{summary['total']} prompts succeeded")
        if summary["failed"]:
            raise typer.Exit(code=1)
        return
    # The prior, the guidance and an oracle's mesh load (and fail) before the run folder exists.
    run = GenerateRun(cfg, None)
    run.ws = Workspace.create(cfg.output_root, cfg.prompt)
    _run_to_end(run, "generate")


@app.command()
def edit(
    ctx: typer.Context,
    run: Annotated[Optional[Path], typer.Argument(help="Run folder (or an earlier edit) to edit.")] = None,
    instruction: Annotated[Optional[str], typer.Argument(help="What to change, e.g. 'give him a red woollen "
                                                         "hat'.")] = None,
    source_prompt: Annotated[Optional[str], typer.Option("--source-prompt", help="Prompt of the source "
                                                         "avatar (default: the run's).")] = None,
    strength: Annotated[Optional[float], typer.Option("--strength", help="Edit weight against identity "
                                                      "(0 keeps the source, 1 default).")] = None,
    texture_only: Annotated[bool, typer.Option("--texture-only", help="Lock geometry; recolour only.")] = False,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimisation steps.")] = None,
    preset: Preset = "quality",
    guidance: Annotated[Optional[str], typer.Option("--guidance", help="Edit guidance: hub id, local folder, "
                                                    "'tiny' or 'oracle:MESH'.")] = None,
    seed: Seed = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue an edit folder from its last "
                                                   "checkpoint.")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Edit an avatar by text, keeping its identity (IESD); writes RUN/edits/<slug>-<time>/."""
    from avatar.config import EditConfig, make_config
    from avatar.pipeline.edit import run_edit

    if resume is not None:
        _refuse_with_resume(ctx)
        _open_to_resume(resume, "edit")
        run_edit(None, None, resume_dir=resume)
        return
    if run is None or instruction is None or not instruction.strip():
        raise AvatarError("the instruction is empty: avatar edit RUN \"give him a red woollen hat\" "
                          "(or --resume EDIT_FOLDER)")
    from avatar.workspace import Workspace

    Workspace.open(run)
    cfg = make_config(EditConfig, preset, config_file=config, overrides=_overrides(
        set_, instruction=instruction, source_prompt=source_prompt, strength=strength, seed=seed,
        texture_only=texture_only or None, **{"fine.steps": steps, "guidance.model": guidance}))
    run_edit(cfg, run)


@app.command("export")
def export_(
    run: Annotated[Path, typer.Argument(help="Run or edit folder to export.")],
    format_: Annotated[Optional[str], typer.Option("--format", help="Comma list of glb, obj, ply, video.")] = None,
    faces: Annotated[Optional[int], typer.Option("--faces", help="Triangle budget (default 20,000): prior: the "
                                                 "head's, the skin subdivided up to it; surface: the decimation "
                                                 "target.")] = None,
    texture_size: Annotated[Optional[int], typer.Option("--texture-size", help="Texture size: 1024, 2048 "
                                                        "(default) or 4096.")] = None,
    no_rig: Annotated[bool, typer.Option("--no-rig", help="Static meshes: no blendshapes, no skeleton, "
                                         "no skin.")] = False,
    topology: Annotated[Optional[str], typer.Option("--topology", help="prior (default: the head prior's own head "
                                                    "fitted to the avatar, with eyes, teeth, tongue, jaw, visemes, "
                                                    "normal and ORM maps; on a prior without one, the surface) or "
                                                    "surface (the generated surface itself).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the files of these formats if the folder "
                                        "holds them (other formats are kept).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write to (default RUN/export).")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Write RUN/export/: avatar.glb (the prior's head fitted to the avatar: skin, eyes, teeth, tongue; PBR maps,
    ARKit blendshapes and visemes, skeleton), OBJ, PLY; export.json lists them."""
    from avatar.config import ExportConfig, make_config
    from avatar.export import export_run
    from avatar.workspace import Workspace

    Workspace.open(run)
    cfg = make_config(ExportConfig, config_file=config, overrides=_overrides(
        set_, formats=format_, faces=faces, texture_size=texture_size, rig=False if no_rig else None,
        topology=topology))
    summary = export_run(run, cfg, out_dir=out, force=force, progress=True)
    for kind, path in summary["files"].items():
        typer.echo(f"{kind:6s} {path}")


@app.command()
def preview(
    run: Annotated[Path, typer.Argument(help="Run or edit folder.")],
    frames: Annotated[int, typer.Option("--frames", help="Turntable frames.")] = 120,
    size: Annotated[int, typer.Option("--size", help="Video size in pixels (multiple of 16).")] = 512,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing preview.")] = False,
) -> None:
    """Write preview.mp4 (a turntable) and an offline preview.html viewer next to the GLB."""
    from avatar.export import preview_run
    from avatar.workspace import Workspace

    Workspace.open(run)
    summary = preview_run(run, frames=frames, size=size, force=force, progress=True)
    for kind in ("glb", "video", "html"):
        typer.echo(f"{kind:6s} {summary[kind]}")


@app.command("import")
def import_(
    ctx: typer.Context,
    mesh: Annotated[Optional[Path], typer.Argument(help="Head mesh: GLB, OBJ or PLY (textured or "
                                                   "vertex-coloured), +Y up, facing +Z.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="What the head is (the source prompt "
                                                  "of later edits; default: the file name).")] = None,
    preset: Preset = "quality",
    head_model: Annotated[Optional[str], typer.Option("--head-model", help="Head prior for landmarks, "
                                                      "blendshapes and skin.")] = None,
    seed: Seed = None,
    out: Annotated[Optional[Path], typer.Option("--out", help=OUT_HELP)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue an import RUN from its last "
                                                   "checkpoint.")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Fit the avatar representation to an existing head mesh, so it can be edited and exported."""
    from avatar.config import GenerateConfig, make_config
    from avatar.pipeline.import_mesh import ImportRun, import_config, read_head_mesh
    from avatar.workspace import Workspace

    if resume is not None:
        _refuse_with_resume(ctx)
        ws = _open_to_resume(resume, "import")
        run = ImportRun(ws.load_config(GenerateConfig), ws, str(ws.read_info().get("source_mesh", "")))
        _run_to_end(run, "import", resume=True)
        return
    if mesh is None:
        raise AvatarError("no mesh given: avatar import HEAD.glb (or --resume RUN)")
    read_head_mesh(mesh)
    cfg = make_config(GenerateConfig, preset, config_file=config, overrides=_overrides(
        set_, prompt=prompt or mesh.stem.replace("_", " "), seed=seed, output_root=out,
        **{"prior.spec": head_model}))
    check_output_folder(cfg.output_root)
    # The prior and the mesh load (and fail) before the run folder exists.
    run = ImportRun(import_config(cfg), None, mesh)
    run.ws = Workspace.create(cfg.output_root, f"import-{cfg.prompt}")
    _run_to_end(run, "import")


@app.command()
def batch(
    prompts_file: Annotated[Path, typer.Argument(help="One prompt per line (blank and # lines skipped).")],
    edits: Annotated[Optional[Path], typer.Option("--edits", help="One edit instruction per line, applied "
                                                  "to every avatar.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Run on Ray: local, auto or a cluster address "
                                               "(default: one after another in this process).")] = None,
    gpus_per_avatar: Annotated[float, typer.Option("--gpus-per-avatar", help="GPUs per task on a GPU "
                                                   "cluster.")] = 1.0,
    preset: Preset = "quality",
    guidance: Guidance = None,
    export: Annotated[Optional[str], typer.Option("--export", help="Export each avatar (and edit): a comma "
                                                  "list of glb, obj, ply, video.")] = None,
    retries: Annotated[int, typer.Option("--retries", help="Restarts of a failed task (each resumes its "
                                         "checkpoint).")] = 2,
    out: Annotated[Optional[Path], typer.Option("--out", help="Batch folder (default outputs/batch-<file "
                                                "name>); re-running resumes it.")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Many avatars from a prompt file, on Ray or one after another; re-running skips what is done."""
    from avatar.batch import run_batch

    summary = run_batch(prompts_file, edits_file=edits, ray=ray, gpus_per_avatar=gpus_per_avatar, preset=preset,
                        guidance=guidance, export_formats=export, overrides=set_ or [], output_root=out,
                        config_file=config, retries=retries)
    for r in summary["runs"]:
        typer.echo(f"{r['status']:8} {r['prompt']} -> {r['run']} {r.get('error', '')}".rstrip())
    typer.echo(f"{summary['succeeded']}/{summary['total']} done ({summary['skipped']} earlier), "
               f"{summary['failed']} failed -> {summary['journal']}")
    if summary["failed"]:  # 2 when every failure is an error the user must fix (never retried), as elsewhere
        raise typer.Exit(code=2 if summary["user_errors"] == summary["failed"] else 1)


@app.command()
def doctor(
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    build: Annotated[bool, typer.Option("--build", help="Build the native extension now if needed.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Outputs folder to check for disk space.")] = None,
) -> None:
    """Report versions, device, engines, head priors, cached guidance weights and free disk."""
    import json

    from avatar import doctor as doc
    from avatar.paths import outputs_root

    report = doc.collect(out or outputs_root(), build=build)
    if json_:
        typer.echo(json.dumps(report, indent=2))
    else:
        doc.render(report)


@app.command()
def selftest(
    json_: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    device: Annotated[Optional[list[str]], typer.Option("--device", help="Only this device: cpu, cuda or cuda:N "
                                                        "(repeatable; default: every device present).")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Only checks whose name contains this, "
                                                      "e.g. hashgrid or sds (repeatable).")] = None,
) -> None:
    """Prove this machine right: native ops vs references, tiny/oracle runs, SDS memory modes, per device.

    Exits non-zero if any check fails. On a new GPU machine, run this first.
    """
    import contextlib
    import json

    from avatar.selftest import render_report, run_selftest

    if json_:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
            report = run_selftest(device, only)
        typer.echo(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        err = Console(stderr=True)
        status = err.status("avatar selftest") if err.is_terminal else contextlib.nullcontext()
        with status as live:
            def started(name: str, dev: str) -> None:
                if live is not None:
                    live.update(f"selftest: {name} on {dev}")

            report = run_selftest(device, only, on_start=started)
        render_report(report)
    if not report["ok"]:
        raise typer.Exit(code=1)


@prior_app.command("show")
def prior_show(
    spec: Annotated[str, typer.Argument(help="Head prior: anny, flame:DIR or auto.")] = "auto",
    out: Annotated[Path, typer.Option("--out", help="Folder to write prior.obj, landmarks.png, prior.json "
                                      "(and control/ with --control).")] = Path("prior-show"),
    control: Annotated[bool, typer.Option("--control", help="Also write, for front, ±20/±35/±40° yaw, pitched and "
                       "back cameras and a few expressions, the shaded render and the ControlNet's landmark image "
                       "side by side and separately, with control/control.json listing the cameras.")] = False,
) -> None:
    """Write the prior's neutral mesh (OBJ), a landmark render (PNG) and a JSON summary."""
    import json

    from avatar.prior.show import show_prior

    summary = show_prior(spec, out, control=control)
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:
    """Console entry point: user errors become one clear line, not a traceback."""
    try:
        app()
    except AvatarError as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a command (AvatarGroup handles those)
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
