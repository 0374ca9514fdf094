"""The in-process runner: the tasks of a batch one after another in this process, with the
guidance weights kept loaded between them; Ray is not imported."""

from __future__ import annotations

import time
from typing import Any

from avatar.batch.journal import BatchJournal
from avatar.batch.progress import BatchProgress
from avatar.batch.task import BatchTask, failure_record, run_task


def run_sequential(todo: list[BatchTask], tasks: list[BatchTask], skipped: set[int], journal: BatchJournal,
                   retries: int, progress: bool, stop_after_tasks: int | None) -> dict[int, dict[str, Any]]:
    """Run ``todo``; return the final record per task index. A failed task is retried (resuming
    its checkpoint) up to ``retries`` times, unless the error is the user's to fix
    (:func:`~avatar.batch.task.is_user_error`): that fails the task at once."""
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
                except Exception as exc:  # recorded, retried (unless the user must fix it), and the batch goes on
                    record = failure_record(task, attempt, exc, time.time() - t0)
                    final = attempt > retries or record["user_error"]
                    record["status"] = "failed" if final else "retrying"
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


__all__ = ["run_sequential"]
