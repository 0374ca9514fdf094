"""The live table of a batch (done / running / failed, each running task's phase and step, ETA)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from avatar.batch.journal import TASK_STATE, read_json
from avatar.batch.task import BatchTask


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
        state = read_json(Path(task.folder) / TASK_STATE)
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


__all__ = ["BatchProgress"]
