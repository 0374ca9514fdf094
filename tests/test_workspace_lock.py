"""The run lock under contention: two processes racing for one run never both hold it.

Two worker processes race, trial after trial, for the lock of a fresh run folder
whose ``run.lock`` was left by a dead process (the case where taking over a stale
lock let both takers win). Both start each trial at one instant (a barrier,
then a spin to a shared clock time); the winner holds the lock until both have tried. Exactly one must win every trial.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from avatar.workspace import RunLock, RunLockedError, Workspace

TRIALS = 400


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_stale_lock(folder: Path, pid: int) -> None:
    (folder / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))


def _racer(index: int, folders: list[str], barrier, go_at, results) -> None:
    """One side of every race: try the lock, hold it until both sides tried, release."""
    warnings.simplefilter("ignore")  # the stale-lock takeover warning
    outcome = []
    for folder in folders:
        barrier.wait(timeout=60)
        if index == 0:
            go_at.value = time.monotonic_ns() + 2_000_000
        barrier.wait(timeout=60)
        while time.monotonic_ns() < go_at.value:  # both start within microseconds, not a wake-up apart
            pass
        lock = RunLock(Path(folder))
        try:
            lock.acquire()
            won = "won"
        except RunLockedError:
            won = "refused"
        except Exception as exc:  # anything else is a failure the parent reports
            won = f"error {type(exc).__name__}: {exc}"
        barrier.wait(timeout=60)  # both have tried: the winner still holds it
        outcome.append(won)
        if won == "won":
            lock.release()
    results.put((os.getpid(), outcome))


def test_racing_pairs_never_both_hold_the_lock(tmp_path):
    dead = _dead_pid()
    folders = []
    for i in range(TRIALS):
        folder = tmp_path / f"run-{i:03d}"
        folder.mkdir()
        _plant_stale_lock(folder, dead)
        folders.append(str(folder))
    ctx = mp.get_context("spawn")  # no fork of a process that may hold threads
    barrier, go_at, results = ctx.Barrier(2), ctx.Value("q", 0), ctx.Queue()
    workers = [ctx.Process(target=_racer, args=(i, folders, barrier, go_at, results)) for i in range(2)]
    for w in workers:
        w.start()
    try:
        outcomes = [results.get(timeout=120)[1] for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    errors = [o for side in outcomes for o in side if o.startswith("error")]
    assert not errors, errors[:3]
    both = sum(a == b == "won" for a, b in zip(*outcomes))
    neither = sum(a == b == "refused" for a, b in zip(*outcomes))
    assert (both, neither) == (0, 0), f"{both} of {TRIALS} trials had two holders, {neither} had none"
    assert not any((Path(f) / "run.lock").exists() for f in folders)  # each winner cleaned up


def test_lock_of_a_dead_pid_is_taken_over(tmp_path):
    ws = Workspace.create(tmp_path / "outputs", "stale")
    _plant_stale_lock(ws.root, _dead_pid())
    with pytest.warns(UserWarning, match="stale lock"):
        with ws.lock() as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
            with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
                ws.lock().acquire()
    assert not lock.path.exists()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    # The holder is killed (no release, no clean-up): the OS dropped its lock.
    ws = Workspace.create(tmp_path / "outputs", "killed")
    holder = subprocess.run(
        [sys.executable, "-c",
         "import os, sys; from avatar.workspace import Workspace\n"
         "Workspace(sys.argv[1]).lock().acquire(); os.kill(os.getpid(), 9)", str(ws.root)])
    assert holder.returncode == -9
    assert json.loads((ws.root / "run.lock").read_text())["pid"] != os.getpid()
    with pytest.warns(UserWarning, match="stale lock"):
        with ws.lock():
            pass


def test_unreadable_folder_is_one_line_error(tmp_path):
    from avatar.workspace import WorkspaceError

    with pytest.raises(WorkspaceError, match="cannot lock run .*must be writable"):
        RunLock(tmp_path / "missing-folder").acquire()
