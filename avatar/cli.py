"""The ``avatar`` command line: generate, edit, export, preview, import, batch, doctor.

Heavy modules (torch, diffusers, the native extension) are imported inside the
commands, so ``avatar --help`` is instant. Errors a user can fix
(:class:`avatar.errors.AvatarError`) are printed as one message with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="avatar",
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

Preset = Annotated[str, typer.Option("--preset", help=PRESET_HELP)]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP, metavar="KEY=VALUE")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML file of config values.",
                                                    exists=False, dir_okay=False)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the config's, 0).")]
Guidance = Annotated[Optional[str], typer.Option("--guidance", help="Hub id, local diffusers folder, 'tiny' or "
                                                 "'oracle:MESH'.")]


def _overrides(values: list[str] | None, **named: object) -> list[str]:
    """Command-line options that map onto config keys, as ``key=value`` overrides."""
    out = [f"{key}={value}" for key, value in named.items() if value is not None]
    return out + list(values or [])


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="Text describing the head.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line "
                                                    "(blank and # lines skipped); one run per prompt.")] = None,
    preset: Preset = "quality",
    guidance: Guidance = None,
    head_model: Annotated[Optional[str], typer.Option("--head-model", help="Head prior: anny, flame:DIR "
                                                      "or auto.")] = None,
    seed: Seed = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Parent folder of run folders.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue RUN from its last "
                                                   "checkpoint.")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Optimise a head from a text prompt (coarse NeRF, then fine DMTet mesh)."""
    from dataclasses import replace

    from avatar.config import GenerateConfig, make_config
    from avatar.errors import AvatarError

    if resume is None and prompts is None and not (prompt or "").strip():
        raise AvatarError("the prompt is empty: avatar generate \"an old sea captain with a grey beard\" "
                          "(or --prompts FILE, or --resume RUN)")
    if prompts is not None and not prompts.is_file():
        raise AvatarError(f"prompts file {prompts} does not exist or is not a file")
    from avatar.workspace import Workspace

    if resume is not None:
        from avatar.pipeline import run_generate

        ws = Workspace.open(resume)
        cfg = ws.load_config(GenerateConfig)
        run_generate(cfg, ws, resume=True)
        return
    cfg = make_config(GenerateConfig, preset, config_file=config, overrides=_overrides(
        set_, prompt=prompt, seed=seed, output_root=out,
        **{"guidance.model": guidance, "prior.spec": head_model}))
    from avatar.pipeline import read_prompts, run_generate, run_prompts, validate_config

    if prompts is not None:
        prompt_list = read_prompts(prompts)
        for text in prompt_list:
            validate_config(replace(cfg, prompt=text))
        summary = run_prompts(cfg, prompt_list)
        for run in summary["runs"]:
            status = "ok    " if run["ok"] else "FAILED"
            typer.echo(f"{status} {run['prompt']} -> {run['run']} {run.get('error', '')}".rstrip())
        typer.echo(f"{summary['succeeded']}/{summary['total']} prompts succeeded")
        if summary["failed"]:
            raise typer.Exit(code=1)
        return
    validate_config(cfg)  # before a run folder exists
    run_generate(cfg, Workspace.create(cfg.output_root, cfg.prompt))


@app.command()
def edit(
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
    from avatar.errors import AvatarError
    from avatar.pipeline.edit import run_edit

    if resume is not None:
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
    faces: Annotated[Optional[int], typer.Option("--faces", help="Target face count (default 50,000).")] = None,
    texture_size: Annotated[Optional[int], typer.Option("--texture-size", help="Texture size: 1024, 2048 "
                                                        "or 4096.")] = None,
    no_rig: Annotated[bool, typer.Option("--no-rig", help="Static mesh: no blendshapes, no skeleton.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write to (default RUN/export).")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Write RUN/export/: avatar.glb (PBR, ARKit blendshapes, skeleton), OBJ, PLY."""
    from avatar.config import ExportConfig, make_config
    from avatar.export import export_run
    from avatar.workspace import Workspace

    Workspace.open(run)
    cfg = make_config(ExportConfig, config_file=config, overrides=_overrides(
        set_, formats=format_, faces=faces, texture_size=texture_size, rig=False if no_rig else None))
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
    """Write a turntable MP4 and an offline preview.html viewer next to the GLB."""
    from avatar.export import preview_run
    from avatar.workspace import Workspace

    Workspace.open(run)
    summary = preview_run(run, frames=frames, size=size, force=force, progress=True)
    for kind in ("glb", "video", "html"):
        typer.echo(f"{kind:6s} {summary[kind]}")


@app.command("import")
def import_(
    mesh: Annotated[Optional[Path], typer.Argument(help="Head mesh: GLB, OBJ or PLY (textured or "
                                                   "vertex-coloured), +Y up, facing +Z.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="What the head is (the source prompt "
                                                  "of later edits; default: the file name).")] = None,
    preset: Preset = "quality",
    head_model: Annotated[Optional[str], typer.Option("--head-model", help="Head prior for landmarks, "
                                                      "blendshapes and skin.")] = None,
    seed: Seed = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Parent folder of run folders.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue an import RUN from its last "
                                                   "checkpoint.")] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
) -> None:
    """Fit the avatar representation to an existing head mesh, so it can be edited and exported."""
    from avatar.config import GenerateConfig, make_config
    from avatar.errors import AvatarError
    from avatar.pipeline.import_mesh import import_config, read_head_mesh, run_import
    from avatar.workspace import Workspace

    if resume is not None:
        ws = Workspace.open(resume)
        info = ws.read_info()
        if info.get("kind") != "import":
            raise AvatarError(f"{resume} is not an import run (it is a '{info.get('kind')}' run)")
        run_import(ws.load_config(GenerateConfig), info["source_mesh"], ws, resume=True)
        return
    if mesh is None:
        raise AvatarError("no mesh given: avatar import HEAD.glb (or --resume RUN)")
    read_head_mesh(mesh)
    cfg = make_config(GenerateConfig, preset, config_file=config, overrides=_overrides(
        set_, prompt=prompt or mesh.stem.replace("_", " "), seed=seed, output_root=out,
        **{"prior.spec": head_model}))
    import_config(cfg)  # validates, before a run folder exists
    run_import(cfg, mesh, Workspace.create(cfg.output_root, f"import-{cfg.prompt}"))


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
    from avatar.pipeline.batch import run_batch

    summary = run_batch(prompts_file, edits_file=edits, ray=ray, gpus_per_avatar=gpus_per_avatar, preset=preset,
                        guidance=guidance, export_formats=export, overrides=set_ or [], output_root=out,
                        config_file=config, retries=retries)
    for r in summary["runs"]:
        typer.echo(f"{r['status']:8} {r['prompt']} -> {r['run']} {r.get('error', '')}".rstrip())
    typer.echo(f"{summary['succeeded']}/{summary['total']} done ({summary['skipped']} earlier), "
               f"{summary['failed']} failed -> {summary['journal']}")
    if summary["failed"]:
        raise typer.Exit(code=1)


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
    from avatar.errors import AvatarError

    try:
        app()
    except AvatarError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
