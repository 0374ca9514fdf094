"""The tasks of a batch on a Ray cluster (docs/DESIGN.md, "Beyond one machine").

Ray places the work; this module only declares it. One worker actor per slot (a slot
is ``gpus_per_avatar`` GPUs when the cluster has GPUs, else ``cpus_per_avatar`` CPUs)
holds the guidance models for all the prompts it runs
(:func:`avatar.guidance.models.keep_models_loaded`): the weights are read once per
worker, not once per prompt. The driver hands each free worker the next task
(:func:`avatar.batch.task.run_task`), appends each outcome to ``batch.jsonl`` and
starts a failed task again (up to ``retries`` times; never for an error the user must
fix) on the next free worker; the task resumes from its last checkpoint, since the run
folder lives on the shared output root.
A worker that dies (out of memory, node lost) is replaced by a new actor.

Only imported when a batch asks for Ray; ``ray`` itself is imported inside the functions.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from avatar.batch.journal import BatchJournal
from avatar.batch.progress import BatchProgress
from avatar.batch.task import BatchError, BatchTask, failure_record, run_task

RAY_EXTRA = 'pip install "avatar[ray]"'

FORWARDED_ENV = ("AVATAR_CACHE_DIR", "AVATAR_FLAME_DIR", "AVATAR_OUTPUTS", "HF_HOME", "HF_HUB_CACHE",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables a local Ray cluster's workers get from the driver."""


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`BatchError` that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise BatchError(f"--ray needs Ray, which is not installed here ({exc}): {RAY_EXTRA} (or pip install "
                         "\"ray>=2.9\"), or leave out --ray to run the prompts one after another") from None
    return ray


class BatchWorker:
    """A Ray actor running batch tasks with the guidance weights kept loaded between them."""

    def __init__(self, threads: int = 0):
        from avatar.guidance.models import keep_models_loaded

        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        keep_models_loaded()

    def where(self) -> dict[str, Any]:
        import socket

        return {"host": socket.gethostname(), "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def run(self, task: BatchTask, attempt: int) -> dict[str, Any]:
        """The task's record; a failure is returned as a record (``status`` ``error``, with the
        traceback unless it is the user's to fix), not raised."""
        import socket
        import traceback

        t0 = time.time()
        try:
            return run_task(task, attempt)
        except Exception as exc:  # reported to the driver, which records and retries it
            record = {**failure_record(task, attempt, exc, time.time() - t0), "host": socket.gethostname(),
                      "pid": os.getpid()}
            if not record["user_error"]:
                record["traceback"] = traceback.format_exc(limit=8)
            return record


def connect(ray: Any, address: str, progress: bool = True) -> bool:
    """Join or start the Ray runtime named by ``address``; True when this call started it
    (the caller then shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=not progress, logging_level="WARNING")
        else:
            ray.init(address=address, log_to_driver=not progress, logging_level="WARNING")
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError, depending on the Ray version
        where = "a local Ray runtime" if address == "local" else f"the Ray cluster at '{address}'"
        raise BatchError(f"cannot start or join {where} ({type(exc).__name__}: {exc}); start a cluster with "
                         "`ray start --head`, pass --ray local to run on this machine, or leave out --ray") from exc
    return True


def worker_options(ray: Any, gpus_per_avatar: float, cpus_per_avatar: float) -> tuple[dict[str, Any], int, int]:
    """(actor options, how many workers fit the cluster, torch threads per worker)."""
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus_per_avatar <= 0 or cpus_per_avatar <= 0:
        raise BatchError("gpus_per_avatar and cpus_per_avatar must be > 0")
    if gpus > 0:
        if gpus_per_avatar > gpus:
            raise BatchError(f"--gpus-per-avatar {gpus_per_avatar} is more than the cluster's {gpus:g} GPUs")
        return {"num_gpus": gpus_per_avatar, "num_cpus": 1}, int(gpus // gpus_per_avatar), 0
    if cpus_per_avatar > cpus:
        raise BatchError(f"{cpus_per_avatar:g} CPUs per avatar is more than the cluster's {cpus:g} CPUs")
    return {"num_cpus": cpus_per_avatar}, int(cpus // cpus_per_avatar), max(1, int(cpus_per_avatar))


def run_on_ray(todo: list[BatchTask], tasks: list[BatchTask], skipped: set[int], journal: BatchJournal, *,
               ray: str, gpus_per_avatar: float = 1.0, cpus_per_avatar: float = 1.0, retries: int = 2,
               progress: bool = True, stop_after_tasks: int | None = None) -> tuple[dict[int, dict[str, Any]], int]:
    """Run ``todo`` on Ray; return (record per task index, number of workers)."""
    rt = require_ray()
    started_here = connect(rt, ray, progress)
    results: dict[int, dict[str, Any]] = {}
    actors: list[Any] = []
    where: dict[Any, Any] = {}
    inflight: dict[Any, tuple[Any, BatchTask, int, float]] = {}
    try:
        options, slots, threads = worker_options(rt, gpus_per_avatar, cpus_per_avatar)
        n_workers = max(1, min(slots, len(todo)))
        if ray == "local":
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            if env:
                options["runtime_env"] = {"env_vars": env}
        remote = rt.remote(BatchWorker)

        def new_actor() -> Any:
            actor = remote.options(**options).remote(threads)
            where[actor] = actor.where.remote()
            return actor

        if not todo:
            return results, 0
        actors = [new_actor() for _ in range(n_workers)]
        idle = list(actors)
        queue: deque[tuple[BatchTask, int]] = deque((t, 1) for t in todo)
        ended = 0
        with BatchProgress(tasks, skipped, n_workers, progress) as table:
            while queue or inflight:
                stopping = stop_after_tasks is not None and ended >= stop_after_tasks
                if stopping:
                    break
                while queue and idle:
                    task, attempt = queue.popleft()
                    actor = idle.pop()
                    inflight[actor.run.remote(task, attempt)] = (actor, task, attempt, time.time())
                    table.set(task.index, "running", attempt)
                ready, _ = rt.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    actor, task, attempt, t0 = inflight.pop(ref)
                    try:
                        record = rt.get(ref)
                        idle.append(actor)
                    except rt.exceptions.RayError as exc:  # the worker died: replace it
                        record = failure_record(task, attempt, exc, time.time() - t0)
                        record["error"] = f"the worker died ({record['error'][:500]})"
                        actors.remove(actor)
                        replacement = new_actor()
                        actors.append(replacement)
                        idle.append(replacement)
                    if record["status"] == "done":
                        journal.append(record)
                        results[task.index] = record
                        table.set(task.index, "done", attempt, record["seconds"])
                        ended += 1
                        continue
                    final = attempt > retries or bool(record.get("user_error"))
                    record = {**record, "status": "failed" if final else "retrying"}  # with the worker's traceback
                    journal.append(record)
                    table.set(task.index, record["status"], attempt, record["seconds"])
                    if final:
                        results[task.index] = record
                        ended += 1
                    else:
                        queue.appendleft((task, attempt + 1))  # resumes from its checkpoint
        return results, n_workers
    finally:
        # Running tasks stop here (end of a slice, Ctrl-C, an error): their folders keep their
        # last checkpoint and the next run of the batch resumes them.
        for _actor, task, attempt, t0 in inflight.values():
            record = {"index": task.index, "prompt": task.prompt, "run": task.folder, "status": "stopped",
                      "attempt": attempt, "seconds": round(time.time() - t0, 2)}
            journal.append(record)
            results[task.index] = record
        for actor in actors:
            try:
                rt.kill(actor)
            except Exception:  # noqa: S110 - an actor already gone is fine
                pass
        _wait_gone([where[a] for a in actors if a in where], rt)
        if started_here:
            rt.shutdown()


def _wait_gone(where_refs: list[Any], rt: Any, timeout: float = 15.0) -> None:
    """Wait until killed workers on this host have exited, so that a batch run again at once
    finds their run folders' locks stale (a live holder is an error) rather than held."""
    import socket

    from avatar.workspace import _pid_alive

    pids = []
    for ref in where_refs:
        try:
            info = rt.get(ref, timeout=1.0)
        except Exception:  # noqa: S112 - a worker that never started holds nothing
            continue
        if info.get("host") == socket.gethostname():
            pids.append(int(info["pid"]))
    deadline = time.time() + timeout
    while any(_pid_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)


__all__ = ["BatchWorker", "RAY_EXTRA", "connect", "require_ray", "run_on_ray", "worker_options"]
