"""One task of a batch: a prompt's generate, then its edits, then its exports, in a fixed
run folder, resumable at every phase (:func:`run_task`).

A task in detail: generate (or resume, or skip when the run finished); for each line of
the edits file, an edit of the generated avatar in ``RUN/edits/`` (each instruction is
applied to the generated head, not chained; a stopped edit is resumed); then, when formats
are given, the export of the run and of each edit folder. The task records its progress in
``RUN/batch-task.json`` (:class:`~avatar.batch.journal.TaskState`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from avatar.batch.journal import TaskState, read_json
from avatar.errors import AvatarError

FAIL_ENV = "AVATAR_BATCH_FAIL"
"""Test hook: ``INDEX@STEP[,INDEX@STEP...]`` makes the first attempt of task INDEX (1-based
line of the prompts file, blank and # lines not counted) fail at generate step STEP, so that
retries and resume can be tested (also from the command line)."""


class BatchError(AvatarError, RuntimeError):
    """A batch cannot start or continue; the message says why and what to do."""


class InjectedFailure(RuntimeError):
    """Raised by the :data:`FAIL_ENV` test hook (not an :class:`AvatarError`: it stands for a crash)."""


def is_user_error(exc: BaseException) -> bool:
    """True for an error the user must fix (an :class:`~avatar.errors.AvatarError`: a missing
    guidance folder, a bad config, a foreign run in the task's folder ...): retrying it would
    fail the same way, so the task fails at once. Two kinds pass by themselves and are
    retried: a run locked by a process that is still exiting, and a loss that became
    non-finite (crash-like)."""
    from avatar.pipeline.generate import NonFiniteLoss
    from avatar.workspace import RunLockedError

    return isinstance(exc, AvatarError) and not isinstance(exc, (RunLockedError, NonFiniteLoss))


def error_text(exc: BaseException) -> str:
    """One line for the journal: the message of a user error, ``Type: message`` of anything else."""
    text = str(exc).strip() or type(exc).__name__
    return text if is_user_error(exc) else f"{type(exc).__name__}: {text}"


def failure_record(task: BatchTask, attempt: int, exc: BaseException, seconds: float) -> dict[str, Any]:
    """The journal record of a failed attempt (``status`` ``error``; the runner sets ``retrying``
    or ``failed``)."""
    return {"index": task.index, "prompt": task.prompt, "run": task.folder, "status": "error", "attempt": attempt,
            "error": error_text(exc), "user_error": is_user_error(exc), "seconds": round(seconds, 2)}


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


def _hooked_run(cfg: Any, ws: Any, guidance: Any, fail_at_step: int) -> Any:
    """A generate run whose first attempt fails at a given step (the :data:`FAIL_ENV` hook)."""
    from avatar.pipeline.generate import GenerateRun

    class HookedRun(GenerateRun):
        def train_step(self, stage_obj: Any) -> dict[str, Any]:
            if self.step + 1 == fail_at_step:
                raise InjectedFailure(f"test hook {FAIL_ENV}: failing at step {fail_at_step}")
            return super().train_step(stage_obj)

    return HookedRun(cfg, ws, guidance=guidance, progress=False)


def _generate_phase(task: BatchTask, attempt: int, guidance: Any, state: TaskState) -> dict[str, Any]:
    from avatar.config import GenerateConfig
    from avatar.pipeline.generate import GenerateError, run_generate
    from avatar.workspace import Workspace

    root = Path(task.folder)
    ws = Workspace(root)
    # Checkpoints mean a run began here: it resumes with its own config.yaml, and a missing or
    # unreadable one is an error naming the file (never a fresh run over the old one's folder).
    resume_from = _checkpoint_step(ws)
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
        summary = _hooked_run(cfg, ws, guidance, int(task.fail_at_step)).run(resume=resume_from is not None)
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
        if read_json(ws.info_path).get("kind") != "edit" or ws.latest_checkpoint() is None:
            continue
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
            cfg = yaml.safe_load(ws.config_path.read_text()) or {}
            if cfg.get("instruction") == instruction:
                found.append((folder, int(cfg["fine"]["steps"])))
    return found[-1] if found else None


def _edit_phase(task: BatchTask, state: TaskState) -> list[str]:
    from avatar.workspace import Workspace

    if not task.edits:
        return []
    from avatar.pipeline.edit import run_edit

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


def _export_phase(task: BatchTask, folders: list[str], state: TaskState) -> dict[str, Any]:
    if task.export is None:
        return {}
    from avatar.export.run import FILES, export_run, validate_export_config

    names = [n for f in validate_export_config(task.export) for n in FILES[f]]
    out = {}
    for folder in folders:
        done = state.data["exports"].get(folder)
        if done is not None:
            out[folder] = done
            continue
        state.update(phase="export", phase_dir="", phase_total=0)
        # An export is whole or absent; one that is there but not recorded was made by an
        # earlier attempt of this task killed before it could record it: it is made again.
        force = any((Path(folder) / "export" / n).exists() for n in names)
        result = export_run(folder, copy.deepcopy(task.export), force=force)
        out[folder] = _jsonable(result)
        state.data["exports"][folder] = out[folder]
        state.update()
    return out


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def run_task(task: BatchTask, attempt: int = 1, guidance: Any = None) -> dict[str, Any]:
    """Do (or continue) one task in its run folder; return its record for the journal.

    Every phase looks at the folder first, so calling this again after a failure or a kill
    skips finished phases and resumes the unfinished one from its last checkpoint.
    guidance: a ready guidance for the generate phase (tests); None builds the configured one
    (a batch worker keeps its weights loaded between tasks).
    Raises whatever the phase raised (the caller records it and may retry it unless
    :func:`is_user_error`).
    """
    import socket

    started = time.time()
    Path(task.folder).mkdir(parents=True, exist_ok=True)
    state = TaskState(Path(task.folder))
    state.update(index=task.index, prompt=task.prompt, attempt=attempt, host=socket.gethostname(), pid=os.getpid())
    gen = _generate_phase(task, attempt, guidance, state)
    edits = _edit_phase(task, state)
    exports = _export_phase(task, [task.folder, *edits], state)
    state.update(phase="done", phase_dir="", phase_total=0)
    return {"index": task.index, "prompt": task.prompt, "run": task.folder, "status": "done", "attempt": attempt,
            **gen, "edits": edits, "exports": exports, "seconds": round(time.time() - started, 2),
            "host": socket.gethostname(), "pid": os.getpid()}


__all__ = ["FAIL_ENV", "BatchError", "BatchTask", "InjectedFailure", "error_text", "failure_record",
           "is_user_error", "parse_fail_hook", "run_task", "task_folder"]
