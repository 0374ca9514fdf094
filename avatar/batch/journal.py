"""What a batch has done: ``OUT/batch.jsonl`` (one line per task outcome) and each task's
``RUN/batch-task.json`` (its phase and the folders it made)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

JOURNAL = "batch.jsonl"
"""Name of the batch summary in the output root (one JSON object per line, appended as tasks end)."""

TASK_STATE = "batch-task.json"
"""Name of the task's own record in its run folder (phase, edit folders, exports)."""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` for a missing, unreadable or non-object file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class BatchJournal:
    """``OUT/batch.jsonl``: one JSON object per line, appended (and flushed to disk) as tasks end.

    Task lines carry ``index``, ``prompt``, ``run``, ``status`` (``done``, ``retrying``,
    ``failed``, ``stopped``), ``attempt``, ``seconds`` and, for failures, ``error`` and
    ``user_error`` (an error the user must fix: never retried); ``event`` lines (``start``,
    ``end``) frame each invocation. A task (known by its run folder) counts as done when its
    last line says so and the folder still exists.
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


class TaskState:
    """``RUN/batch-task.json``: what the task has done so far and what it is doing."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / TASK_STATE
        self.data = read_json(self.path)
        self.data.setdefault("edits", {})
        self.data.setdefault("exports", {})

    def update(self, **values: Any) -> None:
        from avatar.workspace import atomic_write_bytes

        self.data.update(values)
        atomic_write_bytes(self.path, json.dumps(self.data, indent=2).encode())


__all__ = ["JOURNAL", "TASK_STATE", "BatchJournal", "TaskState", "read_json"]
