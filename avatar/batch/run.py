"""``avatar batch``: many avatars from a prompts file, re-runnable (:func:`run_batch`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from avatar.batch.journal import BatchJournal
from avatar.batch.local import run_sequential
from avatar.batch.plan import plan_batch
from avatar.batch.task import BatchError


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
    retries: how many times a failed task is started again (each resumes its checkpoint); an
    error the user must fix (:func:`~avatar.batch.task.is_user_error`: a missing guidance
    folder, a foreign run in the task's folder ...) fails its task at once.
    stop_after_tasks: stop once this many tasks ended in this call, stopping running ones
    (they resume next time): for running a batch in slices and for tests.
    fail_at: test hook ``{index: step}`` (also :data:`FAIL_ENV`).

    Returns ``{"root", "journal", "total", "succeeded", "skipped", "failed", "user_errors",
    "stopped", "seconds", "mode", "workers", "runs": [journal record per task]}``
    (``user_errors``: how many of the failed tasks failed with an error the user must fix).
    Raises :class:`BatchError` (or a config error) before any work for bad inputs;
    asking for Ray without it installed names ``pip install "avatar[ray]"``.
    """
    if retries < 0:
        raise BatchError(f"retries must be >= 0, got {retries}")
    if ray is not None:
        from avatar.batch.ray_runner import require_ray

        require_ray()
    root, tasks = plan_batch(prompts_file, edits_file=edits_file, preset=preset, guidance=guidance,
                             export_formats=export_formats, overrides=overrides, output_root=output_root,
                             config_file=config_file, fail_at=fail_at)
    journal = BatchJournal(root)
    done = journal.done()
    skipped = {t.index for t in tasks if Path(t.folder).name in done}
    todo = [t for t in tasks if t.index not in skipped]
    started = time.time()
    mode = "sequential" if ray is None else f"ray:{ray}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        journal.append({"event": "start", "prompts_file": str(prompts_file), "mode": mode, "tasks": len(tasks),
                        "skipping": sorted(skipped)})
    except OSError as exc:
        raise BatchError(f"cannot write the batch folder {root} ({exc.strerror or exc}): pass --out to a "
                         "writable folder") from exc
    if ray is None:
        workers = 1
        results = run_sequential(todo, tasks, skipped, journal, retries, progress, stop_after_tasks)
    else:
        from avatar.batch.ray_runner import run_on_ray

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
        "user_errors": sum(r["status"] == "failed" and bool(r.get("user_error")) for r in runs),
        "stopped": sum(r["status"] in ("stopped", "queued") for r in runs),
        "seconds": round(time.time() - started, 2), "mode": mode, "workers": workers, "runs": runs,
    }
    journal.append({"event": "end", **{k: v for k, v in summary.items() if k not in ("runs", "journal", "root")}})
    return summary


__all__ = ["run_batch"]
