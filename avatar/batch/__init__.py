"""``avatar batch``: many avatars from a prompts file, each generated, edited and exported
in a fixed run folder, in this process or on a Ray cluster; re-runnable.

This package sits above :mod:`avatar.pipeline` (the loops it drives) and
:mod:`avatar.export`; nothing below imports it. Its modules, each importing only those
listed before it:

- ``journal``: ``OUT/batch.jsonl`` (:class:`BatchJournal`) and each task's
  ``RUN/batch-task.json``;
- ``task``: :class:`BatchTask`, :func:`task_folder` (``OUT/<slug>-<hash of the prompt>``,
  the same folder every time the batch runs) and :func:`run_task` (generate, edits,
  exports; every phase resumes from the folder), :class:`BatchError`, which errors are
  the user's to fix (:func:`is_user_error`: never retried);
- ``plan``: :func:`plan_batch`, every config built and checked before any work;
- ``progress``: the live table (:class:`BatchProgress`);
- ``local``: the in-process runner (one task after another, Ray never imported);
- ``ray_runner``: the Ray runner (one worker actor per GPU or CPU keeping the guidance
  models loaded; docs/DESIGN.md "Beyond one machine");
- ``run``: :func:`run_batch`, which plans, skips what the journal says is done and hands
  the rest to a runner; a failed task is retried from its last checkpoint.

Importing this package is cheap.
"""

from __future__ import annotations

from avatar._lazy import lazy_exports

_EXPORTS = {
    "JOURNAL": "journal",
    "TASK_STATE": "journal",
    "BatchJournal": "journal",
    "FAIL_ENV": "task",
    "BatchError": "task",
    "BatchTask": "task",
    "InjectedFailure": "task",
    "is_user_error": "task",
    "run_task": "task",
    "task_folder": "task",
    "plan_batch": "plan",
    "read_edits": "plan",
    "BatchProgress": "progress",
    "run_batch": "run",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
