"""Many prompts, one run folder each: ``avatar generate --prompts FILE`` and ``avatar batch``.

Two entry points:

- :func:`run_prompts` (``avatar generate --prompts``): one new timestamped run folder per
  prompt, one after another; a failed prompt is recorded and the batch goes on.
- :func:`run_batch` (``avatar batch``): a re-runnable batch. Each prompt is one *task*
  (generate, then the optional edits, then the optional export) with a fixed run folder
  ``OUT/<slug>-<hash of the prompt>`` (:func:`task_folder`), so that running the same batch
  again finds its work, even after lines were added, removed or moved in the prompts file.
  ``OUT/batch.jsonl`` (:class:`BatchJournal`) lists the tasks that are done and they are
  skipped; an unfinished run folder is resumed from its last checkpoint (bit for bit as an
  uninterrupted run). A failed task is retried up to ``retries`` times, each
  retry resuming from the task's last checkpoint. With ``ray=None`` the tasks run in this
  process, one after another, without importing Ray; with ``ray="local"|"auto"|ADDRESS``
  they go to a Ray cluster (:mod:`avatar.pipeline.ray_batch`, docs/DESIGN.md "Beyond one
  machine"), one worker actor per GPU (or per CPU) that keeps the guidance models loaded
  for all the prompts it runs.

A task in detail (:func:`run_task`): generate (or resume, or skip when the run finished);
for each line of the edits file, an edit of the generated avatar in ``RUN/edits/`` (each
instruction is applied to the generated head, not chained; a stopped edit is resumed);
then, when formats are given, the export of the run and of each edit folder. The task
records its progress in ``RUN/batch-task.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from avatar.errors import AvatarError
from avatar.pipeline.generate import GenerateError, GenerateRun, run_generate

JOURNAL = "batch.jsonl"
"""Name of the batch summary in the output root (one JSON object per line, appended as tasks end)."""

TASK_STATE = "batch-task.json"
"""Name of the task's own record in its run folder (phase, edit folders, exports)."""

FAIL_ENV = "AVATAR_BATCH_FAIL"
"""Test hook: ``INDEX@STEP[,INDEX@STEP...]`` makes the first attempt of task INDEX (1-based
line of the prompts file, blank and # lines not counted) fail at generate step STEP, so that
retries and resume can be tested (also from the command line)."""

FORWARDED_ENV = ("AVATAR_CACHE_DIR", "AVATAR_FLAME_DIR", "AVATAR_OUTPUTS", "HF_HOME", "HF_HUB_CACHE",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables a local Ray cluster's workers get from the driver."""


class BatchError(AvatarError, RuntimeError):
    """A batch cannot start or continue; the message says why and what to do."""


class InjectedFailure(RuntimeError):
    """Raised by the :data:`FAIL_ENV` test hook (not an :class:`AvatarError`: it stands for a crash)."""


# ---------------------------------------------------------------------------
# Input files


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file, one per line; blank lines and ``#`` comment lines are skipped."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerateError(f"cannot read the prompts file {path} ({exc}); pass a UTF-8 text file with one "
                            "prompt per line") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise GenerateError(f"the prompts file {path} holds no prompts (only blank or # lines)")
    return prompts


def read_edits(path: str | Path) -> list[str]:
    """Edit instructions of a file, one per line (blank and ``#`` lines skipped, repeats dropped)."""
    try:
        lines = read_prompts(path)
    except GenerateError as exc:
        raise BatchError(str(exc).replace("prompts file", "edits file").replace("prompt per line",
                                                                                "instruction per line")) from exc
    return list(dict.fromkeys(lines))


def run_prompts(cfg: Any, prompts: list[str], progress: bool = True,
                run: Callable[..., dict[str, Any]] = run_generate) -> dict[str, Any]:
    """Run ``run(cfg_with_prompt, workspace, progress=...)`` for each prompt, each in a new
    run folder under ``cfg.output_root``; continue past failures. The guidance models are
    loaded once for all prompts (:func:`~avatar.guidance.models.models_kept_loaded`).

    Returns ``{"total", "succeeded", "failed", "runs": [{"prompt", "run", "ok", "error"?}]}``.
    """
    from avatar.guidance.models import models_kept_loaded

    with models_kept_loaded():
        results = [_run_one(cfg, prompt, progress, run) for prompt in prompts]
    ok = sum(r["ok"] for r in results)
    return {"total": len(results), "succeeded": ok, "failed": len(results) - ok, "runs": results}


def _run_one(cfg: Any, prompt: str, progress: bool, run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    from avatar.workspace import Workspace

    one = copy.deepcopy(cfg)
    one.prompt = prompt
    ws = Workspace.create(one.output_root, prompt)
    entry: dict[str, Any] = {"prompt": prompt, "run": str(ws.root), "ok": False}
    try:
        run(one, ws, progress=progress)
        entry["ok"] = True
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failed prompt must not stop the batch; its reason is kept
        entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


# ---------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass
class BatchTask:
    """One prompt of a batch: everything a worker needs (picklable, no open files)."""

    index: int
    """1-based position among the prompts of the file."""
    prompt: str
    folder: str
    """Its run folder (:func:`task_folder`)."""
    generate: Any
    """The :class:`~avatar.config.GenerateConfig` of a new run (a resumed run uses its own config.yaml)."""
    edits: list[Any] = dataclasses.field(default_factory=list)
    """One :class:`~avatar.config.EditConfig` per instruction."""
    export: Any = None
    """An :class:`~avatar.config.ExportConfig`, or None for no export."""
    fail_at_step: int | None = None
    """Test hook (:data:`FAIL_ENV`): the first attempt raises :class:`InjectedFailure` at this step."""


def task_folder(root: str | Path, prompt: str, repeat: int = 1) -> Path:
    """``root/<slug(prompt)>-<first 8 hex digits of the prompt's SHA-1>`` (``-2``, ``-3`` ... for
    the second, third ... line with the same prompt): the same folder every time the batch
    runs, wherever the prompt sits in the file. The hash tells apart prompts whose slugs agree."""
    import hashlib

    from avatar.workspace import slugify

    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    return Path(root) / (f"{slugify(prompt)}-{digest}" + (f"-{repeat}" if repeat > 1 else ""))


def _finished(ws: Any, total: int) -> bool:
    latest = ws.latest_checkpoint()
    return latest is not None and latest.name == f"step-{total:08d}.pt"


def _checkpoint_step(ws: Any) -> int | None:
    latest = ws.latest_checkpoint()
    return None if latest is None else int(latest.stem.split("-")[1])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _TaskState:
    """``RUN/batch-task.json``: what the task has done so far and what it is doing."""

    def __init__(self, folder: Path):
        self.path = folder / TASK_STATE
        self.data = _read_json(self.path)
        self.data.setdefault("edits", {})
        self.data.setdefault("exports", {})

    def update(self, **values: Any) -> None:
        from avatar.workspace import atomic_write_bytes

        self.data.update(values)
        atomic_write_bytes(self.path, json.dumps(self.data, indent=2).encode())


class _HookedRun(GenerateRun):
    """A generate run whose first attempt fails at a given step (the :data:`FAIL_ENV` hook)."""

    fail_at_step: int = 0

    def train_step(self, stage_obj: Any) -> dict[str, Any]:
        if self.step + 1 == self.fail_at_step:
            raise InjectedFailure(f"test hook {FAIL_ENV}: failing at step {self.fail_at_step}")
        return super().train_step(stage_obj)


def _generate_phase(task: BatchTask, attempt: int, guidance: Any, state: _TaskState) -> dict[str, Any]:
    from avatar.config import GenerateConfig
    from avatar.workspace import Workspace

    root = Path(task.folder)
    ws = Workspace(root)
    resume_from = _checkpoint_step(ws) if ws.config_path.is_file() else None
    if resume_from is not None:
        cfg = ws.load_config(GenerateConfig)
        if cfg.prompt != task.prompt:
            raise BatchError(f"{root} holds a run of the prompt '{cfg.prompt}', not '{task.prompt}': move it "
                             "aside or pass --out to a new folder")
        if _finished(ws, cfg.coarse.steps + cfg.fine.steps):
            return {"generate": "already finished", "resumed_from": None}
    else:
        cfg = copy.deepcopy(task.generate)
        cfg.prompt = task.prompt
        for sub in (root, ws.checkpoints_dir, ws.previews_dir):
            sub.mkdir(parents=True, exist_ok=True)
    state.update(phase="generate", phase_dir=str(root), phase_total=cfg.coarse.steps + cfg.fine.steps)
    if resume_from is not None:
        ws.log_metrics(resume_from, event="batch_resume", attempt=attempt, resumed_from=resume_from)
    if task.fail_at_step is not None and attempt == 1:
        run = _HookedRun(cfg, ws, guidance=guidance, progress=False)
        run.fail_at_step = int(task.fail_at_step)
        summary = run.run(resume=resume_from is not None)
    else:
        summary = run_generate(cfg, ws, guidance=guidance, progress=False, resume=resume_from is not None)
    if not summary.get("finished"):
        raise GenerateError(f"the run {root} stopped at step {summary.get('step')} without finishing")
    return {"generate": "resumed" if resume_from is not None else "ran", "resumed_from": resume_from}


def _find_edit(run_root: Path, instruction: str) -> tuple[Path, int] | None:
    """(folder, its steps) of the newest edit of ``run_root`` for ``instruction`` that has a
    checkpoint (an edit stopped by a failure or a kill, or finished)."""
    import yaml

    from avatar.workspace import Workspace

    found = []
    edits_dir = Workspace(run_root).edits_dir
    for folder in sorted(edits_dir.glob("*")) if edits_dir.is_dir() else []:
        ws = Workspace(folder)
        if _read_json(ws.info_path).get("kind") != "edit" or ws.latest_checkpoint() is None:
            continue
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
            cfg = yaml.safe_load(ws.config_path.read_text()) or {}
            if cfg.get("instruction") == instruction:
                found.append((folder, int(cfg["fine"]["steps"])))
    return found[-1] if found else None


def _edit_phase(task: BatchTask, state: _TaskState) -> list[str]:
    from avatar.workspace import Workspace

    if not task.edits:
        return []
    try:
        from avatar.pipeline.edit import run_edit
    except ImportError as exc:  # pragma: no cover - the edit pipeline is built separately
        raise BatchError(f"edits need avatar.pipeline.edit.run_edit, which this avatar lacks ({exc})") from exc
    folders = []
    for n, edit_cfg in enumerate(task.edits, 1):
        instruction = edit_cfg.instruction
        done = state.data["edits"].get(instruction)
        if done and Path(done).is_dir():
            folders.append(done)
            continue
        found = _find_edit(Path(task.folder), instruction)
        existing, total = found if found is not None else (None, int(edit_cfg.fine.steps))
        state.update(phase=f"edit {n}/{len(task.edits)}", phase_dir=str(existing or ""), phase_total=total)
        if existing is not None and _finished(Workspace(existing), total):
            summary = {"run": str(existing)}
        elif existing is not None:  # resumes with the edit's own config.yaml
            summary = run_edit(None, task.folder, progress=False, resume_dir=existing)
        else:
            summary = run_edit(copy.deepcopy(edit_cfg), task.folder, progress=False)
        if summary.get("finished") is False:
            raise BatchError(f"the edit {summary.get('run')} stopped without finishing")
        folders.append(str(summary["run"]))
        state.data["edits"][instruction] = str(summary["run"])
        state.update()
    return folders


def _export_phase(task: BatchTask, folders: list[str], state: _TaskState) -> dict[str, Any]:
    if task.export is None:
        return {}
    export_run = _export_function()
    out = {}
    for folder in folders:
        done = state.data["exports"].get(folder)
        if done is not None:
            out[folder] = done
            continue
        state.update(phase="export", phase_dir="", phase_total=0)
        export_dir = Path(folder) / "export"
        # A half-written export of an earlier attempt is this batch's own: it is replaced.
        force = export_dir.is_dir() and any(export_dir.iterdir())
        result = export_run(folder, copy.deepcopy(task.export), force=force)
        out[folder] = _jsonable(result)
        state.data["exports"][folder] = out[folder]
        state.update()
    return out


def _export_function() -> Callable[..., Any]:
    try:
        from avatar.export import export_run
    except ImportError as exc:
        raise BatchError(f"--export needs avatar.export.export_run, which this avatar lacks ({exc}); run the "
                         "batch without --export and export the run folders later") from exc
    return export_run


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_task(task: BatchTask, attempt: int = 1, guidance: Any = None) -> dict[str, Any]:
    """Do (or continue) one task in its run folder; return its record for the journal.

    Every phase looks at the folder first, so calling this again after a failure or a kill
    skips finished phases and resumes the unfinished one from its last checkpoint.
    guidance: a ready guidance for the generate phase (tests); None builds the configured one
    (a batch worker keeps its weights loaded between tasks).
    Raises whatever the phase raised (the caller records it and may retry).
    """
    import socket

    started = time.time()
    Path(task.folder).mkdir(parents=True, exist_ok=True)
    state = _TaskState(Path(task.folder))
    state.update(index=task.index, prompt=task.prompt, attempt=attempt, host=socket.gethostname(), pid=os.getpid())
    gen = _generate_phase(task, attempt, guidance, state)
    edits = _edit_phase(task, state)
    exports = _export_phase(task, [task.folder, *edits], state)
    state.update(phase="done", phase_dir="", phase_total=0)
    return {"index": task.index, "prompt": task.prompt, "run": task.folder, "status": "done", "attempt": attempt,
            **gen, "edits": edits, "exports": exports, "seconds": round(time.time() - started, 2),
            "host": socket.gethostname(), "pid": os.getpid()}


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# The journal


class BatchJournal:
    """``OUT/batch.jsonl``: one JSON object per line, appended (and flushed to disk) as tasks end.

    Task lines carry ``index``, ``prompt``, ``run``, ``status`` (``done``, ``retrying``,
    ``failed``, ``stopped``), ``attempt``, ``seconds`` and, for failures, ``error``; ``event``
    lines (``start``, ``end``) frame each invocation. A task (known by its run folder) counts as
    done when its last line says so and the folder still exists.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / JOURNAL

    def records(self) -> list[dict[str, Any]]:
        from avatar.workspace import read_jsonl

        return read_jsonl(self.path)

    def done(self) -> dict[str, dict[str, Any]]:
        """``run folder name -> last record`` of the tasks whose last record is ``done`` (by name,
        so a batch folder reached by another path, or moved, still resumes)."""
        last: dict[str, dict[str, Any]] = {}
        for record in self.records():
            if "status" in record and "run" in record:
                last[Path(str(record["run"])).name] = record
        return {name: r for name, r in last.items() if r["status"] == "done" and (self.path.parent / name).is_dir()}

    def append(self, record: dict[str, Any]) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------
# The live table


class BatchProgress:
    """Live table of a batch (done / running / failed, ETA); each running task's step is read
    from its run folder (``batch-task.json`` and the last line of ``metrics.jsonl``), so the
    same table serves in-process and Ray batches."""

    def __init__(self, tasks: list[BatchTask], skipped: set[int], workers: int, enabled: bool = True):
        self.tasks = {t.index: t for t in tasks}
        self.status: dict[int, str] = {t.index: ("skipped" if t.index in skipped else "queued") for t in tasks}
        self.attempt: dict[int, int] = {}
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.workers = max(1, workers)
        self.t0 = time.time()
        self.enabled = enabled
        self._live: Any = None

    def __enter__(self) -> BatchProgress:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self, console=Console(stderr=True), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)

    def set(self, index: int, status: str, attempt: int | None = None, seconds: float | None = None) -> None:
        self.status[index] = status
        if status == "running":
            self.started[index] = time.time()
        if attempt is not None:
            self.attempt[index] = attempt
        if seconds is not None:
            self.seconds[index] = seconds

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("done", "skipped", "running", "queued", "failed", "retrying")}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out

    @staticmethod
    def _step(task: BatchTask) -> tuple[str, int | None, int]:
        """(phase, current step, phase total) of a running task, from its folder."""
        state = _read_json(Path(task.folder) / TASK_STATE)
        phase, folder, total = str(state.get("phase", "starting")), state.get("phase_dir"), state.get("phase_total")
        step = None
        if folder:
            with contextlib.suppress(OSError, ValueError), open(Path(folder) / "metrics.jsonl", "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 4096))
                lines = fh.read().decode("utf-8", "replace").strip().splitlines()
                step = int(json.loads(lines[-1])["step"]) if lines else None
        return phase, step, int(total or 0)

    def eta(self) -> float | None:
        c = self.counts()
        per_task = [self.seconds[i] for i, s in self.status.items() if s == "done" and i in self.seconds]
        for index, s in self.status.items():
            if s == "running" and index in self.started:
                _, step, total = self._step(self.tasks[index])
                if step and total and self.tasks[index].edits == [] and self.tasks[index].export is None:
                    per_task.append((time.time() - self.started[index]) * total / step)
        if not per_task:
            return None
        mean = sum(per_task) / len(per_task)
        running_left = sum(max(0.0, mean - (time.time() - self.started.get(i, time.time())))
                           for i, s in self.status.items() if s == "running")
        return (mean * (c["queued"] + c["retrying"]) + running_left) / self.workers

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        c = self.counts()
        eta = self.eta()
        title = (f"batch: {c['done'] + c['skipped']}/{len(self.tasks)} done ({c['skipped']} earlier), "
                 f"{c['running']} running, {c['failed']} failed, {c['queued'] + c['retrying']} queued  "
                 f"elapsed {time.time() - self.t0:.0f} s  ETA {'?' if eta is None else f'{eta:.0f} s'}")
        table = Table(expand=False)
        for name in ("#", "prompt", "status", "try", "progress", "s"):
            table.add_column(name, justify="right" if name in ("#", "try", "s") else "left")
        for index, task in self.tasks.items():
            s = self.status[index]
            progress = ""
            if s == "running":
                phase, step, total = self._step(task)
                progress = f"{phase} {step if step is not None else 0}/{total}" if total else phase
            seconds = self.seconds.get(index)
            if s == "running" and index in self.started:
                seconds = time.time() - self.started[index]
            style = {"done": "green", "failed": "red", "running": "yellow", "retrying": "magenta"}.get(s, "")
            table.add_row(str(index), task.prompt[:48], f"[{style}]{s}[/]" if style else s,
                          str(self.attempt.get(index, "")), progress,
                          "" if seconds is None else f"{seconds:.0f}")
        return Group(Text(title, style="bold"), table)


# ---------------------------------------------------------------------------
# The batch


def parse_fail_hook(text: str | None) -> dict[int, int]:
    """``"2@5,3@1"`` -> ``{2: 5, 3: 1}`` (see :data:`FAIL_ENV`)."""
    out: dict[int, int] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        index, sep, step = item.partition("@")
        if not sep or not index.isdigit() or not step.isdigit() or int(step) < 1:
            raise BatchError(f"{FAIL_ENV}={text!r}: expected INDEX@STEP[,INDEX@STEP...], e.g. 2@5")
        out[int(index)] = int(step)
    return out


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str], list[str]]:
    """--set values for generate, edits (``edit.KEY``) and export (``export.KEY``)."""
    gen, edit, export = [], [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("edit."):
            edit.append(item.strip()[len("edit."):])
        elif key.startswith("export."):
            export.append(item.strip()[len("export."):])
        else:
            gen.append(item)
    return gen, edit, export


def plan_batch(prompts_file: str | Path, *, edits_file: str | Path | None = None, preset: str = "quality",
               guidance: str | None = None, export_formats: list[str] | str | None = None,
               overrides: list[str] | None = None, output_root: str | Path | None = None,
               config_file: str | Path | None = None,
               fail_at: dict[int, int] | None = None) -> tuple[Path, list[BatchTask]]:
    """Read the files, build and check every config before any work; return (output root, tasks).

    Overrides (``--set``) are generate keys; those whose key an edit config also has (``seed``,
    ``device``, ``fine.steps``, ``checkpoint_every`` ...; not ``guidance.*``) apply to the
    edits too. ``edit.KEY=VALUE`` applies to the edits only, ``export.KEY=VALUE`` to the export.
    """
    from avatar.config import EditConfig, ExportConfig, GenerateConfig, all_keys, make_config
    from avatar.paths import outputs_root
    from avatar.pipeline.generate import validate_config
    from avatar.workspace import slugify

    prompts_file = Path(prompts_file).expanduser()
    prompts = read_prompts(prompts_file)
    instructions = read_edits(edits_file) if edits_file is not None else []
    gen_over, edit_over, export_over = _split_overrides(list(overrides or []))
    named = [f"guidance.model={guidance}"] if guidance else []
    root = Path(output_root).expanduser() if output_root else outputs_root() / f"batch-{slugify(prompts_file.stem)}"
    gen_cfg = make_config(GenerateConfig, preset, config_file=config_file,
                          overrides=[*named, *gen_over, f"output_root={root}"])
    edit_keys = set(all_keys(EditConfig))
    shared = [o for o in gen_over if o.partition("=")[0].strip() in edit_keys
              and not o.partition("=")[0].strip().startswith("guidance.")]
    edit_named = ["guidance.model=tiny"] if guidance and guidance.strip().lower() == "tiny" else []
    edit_cfgs = [make_config(EditConfig, preset, overrides=[*edit_named, *shared, *edit_over, f"instruction={text}"])
                 for text in instructions]
    for cfg in edit_cfgs:
        if cfg.fine.steps < 1:
            raise BatchError(f"edit fine.steps must be >= 1, got {cfg.fine.steps} (--set edit.fine.steps=N)")
    export_cfg = None
    if export_formats or export_over:
        formats = export_formats.split(",") if isinstance(export_formats, str) else list(export_formats or [])
        fmt = [f"formats={','.join(f.strip() for f in formats if f.strip())}"] if formats else []
        export_cfg = make_config(ExportConfig, overrides=[*fmt, *export_over])
        _export_function()  # fail now, not after hours of generation
        with contextlib.suppress(ImportError):
            from avatar.export import validate_export_config

            validate_export_config(export_cfg)
    if instructions:
        try:
            import avatar.pipeline.edit  # noqa: F401
        except ImportError as exc:  # pragma: no cover
            raise BatchError(f"--edits needs avatar.pipeline.edit, which this avatar lacks ({exc})") from exc
    fail_at = {**parse_fail_hook(os.environ.get(FAIL_ENV)), **(fail_at or {})}
    tasks: list[BatchTask] = []
    for index, prompt in enumerate(prompts, 1):
        cfg = dataclasses.replace(gen_cfg, prompt=prompt)
        validate_config(cfg)
        repeat = 1 + sum(t.prompt == prompt for t in tasks)
        tasks.append(BatchTask(index, prompt, str(task_folder(root, prompt, repeat)), cfg, edit_cfgs, export_cfg,
                               fail_at.get(index)))
    return root, tasks


def run_batch(prompts_file: str | Path, *, edits_file: str | Path | None = None, ray: str | None = None,
              gpus_per_avatar: float = 1.0, cpus_per_avatar: float = 1.0, preset: str = "quality",
              guidance: str | None = None, export_formats: list[str] | str | None = None,
              overrides: list[str] | None = None, output_root: str | Path | None = None,
              config_file: str | Path | None = None, retries: int = 2, progress: bool = True,
              stop_after_tasks: int | None = None, fail_at: dict[int, int] | None = None) -> dict[str, Any]:
    """Generate (then edit and export) one avatar per prompt of ``prompts_file``; re-runnable.

    ray: None runs the tasks in this process, one after another (Ray is not imported);
    ``"local"`` uses the Ray runtime this process already started (``ray.init``) or starts
    one on this machine; ``"auto"`` joins the running cluster; else a cluster address
    (``ray://host:10001`` or ``host:6379``).
    gpus_per_avatar: GPUs per task when the cluster has GPUs (fractions share a GPU);
    cpus_per_avatar: CPUs per task when it has none. One worker actor per slot.
    output_root: the batch folder (run folders and ``batch.jsonl``); default
    ``outputs/batch-<prompts file name>``, so the same command resumes the same batch.
    retries: how many times a failed task is started again (each resumes its checkpoint).
    stop_after_tasks: stop once this many tasks ended in this call, stopping running ones
    (they resume next time): for running a batch in slices and for tests.
    fail_at: test hook ``{index: step}`` (also :data:`FAIL_ENV`).

    Returns ``{"root", "journal", "total", "succeeded", "skipped", "failed", "stopped",
    "seconds", "mode", "workers", "runs": [journal record per task]}``.
    Raises :class:`BatchError` (or a config error) before any work for bad inputs;
    asking for Ray without it installed names ``pip install "avatar[ray]"``.
    """
    if retries < 0:
        raise BatchError(f"retries must be >= 0, got {retries}")
    if ray is not None:
        from avatar.pipeline.ray_batch import require_ray

        require_ray()
    root, tasks = plan_batch(prompts_file, edits_file=edits_file, preset=preset, guidance=guidance,
                             export_formats=export_formats, overrides=overrides, output_root=output_root,
                             config_file=config_file, fail_at=fail_at)
    root.mkdir(parents=True, exist_ok=True)
    journal = BatchJournal(root)
    done = journal.done()
    skipped = {t.index for t in tasks if Path(t.folder).name in done}
    todo = [t for t in tasks if t.index not in skipped]
    started = time.time()
    mode = "sequential" if ray is None else f"ray:{ray}"
    journal.append({"event": "start", "prompts_file": str(prompts_file), "mode": mode, "tasks": len(tasks),
                    "skipping": sorted(skipped)})
    if ray is None:
        workers = 1
        results = _run_sequential(todo, tasks, skipped, journal, retries, progress, stop_after_tasks)
    else:
        from avatar.pipeline.ray_batch import run_on_ray

        results, workers = run_on_ray(todo, tasks, skipped, journal, ray=ray, gpus_per_avatar=gpus_per_avatar,
                                      cpus_per_avatar=cpus_per_avatar, retries=retries, progress=progress,
                                      stop_after_tasks=stop_after_tasks)
    runs = [({**done[Path(t.folder).name], "index": t.index, "run": t.folder, "status": "skipped"}
             if t.index in skipped
             else results.get(t.index, {"index": t.index, "prompt": t.prompt, "run": t.folder, "status": "queued"}))
            for t in tasks]
    summary = {
        "root": str(root), "journal": str(journal.path), "total": len(tasks),
        "succeeded": sum(r["status"] in ("done", "skipped") for r in runs), "skipped": len(skipped),
        "failed": sum(r["status"] == "failed" for r in runs),
        "stopped": sum(r["status"] in ("stopped", "queued") for r in runs),
        "seconds": round(time.time() - started, 2), "mode": mode, "workers": workers, "runs": runs,
    }
    journal.append({"event": "end", **{k: v for k, v in summary.items() if k not in ("runs", "journal", "root")}})
    return summary


def _run_sequential(todo: list[BatchTask], tasks: list[BatchTask], skipped: set[int], journal: BatchJournal,
                    retries: int, progress: bool, stop_after_tasks: int | None) -> dict[int, dict[str, Any]]:
    """The tasks one after another in this process (the guidance weights are kept loaded between them)."""
    from avatar.guidance.models import models_kept_loaded

    results: dict[int, dict[str, Any]] = {}
    ended = 0
    with models_kept_loaded(), BatchProgress(tasks, skipped, 1, progress) as table:
        for task in todo:
            if stop_after_tasks is not None and ended >= stop_after_tasks:
                break
            for attempt in range(1, retries + 2):
                table.set(task.index, "running", attempt)
                t0 = time.time()
                try:
                    record = run_task(task, attempt)
                except KeyboardInterrupt:
                    journal.append({"index": task.index, "prompt": task.prompt, "run": task.folder,
                                    "status": "stopped", "attempt": attempt, "seconds": round(time.time() - t0, 2)})
                    raise
                except Exception as exc:  # recorded, retried, and the batch goes on
                    final = attempt > retries
                    record = {"index": task.index, "prompt": task.prompt, "run": task.folder,
                              "status": "failed" if final else "retrying", "attempt": attempt,
                              "error": _error_text(exc), "seconds": round(time.time() - t0, 2)}
                    journal.append(record)
                    table.set(task.index, record["status"], attempt, record["seconds"])
                    if final:
                        results[task.index] = record
                        break
                    continue
                journal.append(record)
                results[task.index] = record
                table.set(task.index, "done", attempt, record["seconds"])
                break
            ended += 1
    return results


__all__ = ["BatchError", "BatchJournal", "BatchProgress", "BatchTask", "FAIL_ENV", "InjectedFailure", "JOURNAL",
           "TASK_STATE", "plan_batch", "read_edits", "read_prompts", "run_batch", "run_prompts", "run_task",
           "task_folder"]
