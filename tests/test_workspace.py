"""Run folders: layout, atomic checkpoints, locks, bad checkpoints, metrics."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
import torch

from avatar import config as C
from avatar.workspace import CheckpointError, RunLockedError, Workspace, WorkspaceError, slugify


@pytest.fixture
def ws(tmp_path):
    return Workspace.create(tmp_path / "outputs", "An old sea captain, grey beard!",
                            now=dt.datetime(2026, 11, 23, 18, 30, 5))


def test_layout_and_name(ws, tmp_path):
    assert ws.root.name == "an-old-sea-captain-grey-beard-20261123-183005"
    assert ws.checkpoints_dir.is_dir() and ws.previews_dir.is_dir()
    again = Workspace.create(tmp_path / "outputs", "An old sea captain, grey beard!",
                             now=dt.datetime(2026, 11, 23, 18, 30, 5))
    assert again.root.name.endswith("-2")  # never reuses a folder
    assert slugify("Ünïcödé ☃") == "unicode" and slugify("!!!") == "avatar"


def test_info_records_command_seed_versions(ws):
    cfg = C.make_config(C.GenerateConfig, "smoke", ["prompt=x"])
    ws.save_config(cfg)
    info = ws.write_info("generate", seed=7, argv=["avatar", "generate", "x"])
    assert info["seed"] == 7 and info["command"] == ["avatar", "generate", "x"]
    assert "torch" in info["versions"] and info["avatar_version"]
    assert Workspace.open(ws.root).read_info()["kind"] == "generate"
    assert ws.load_config(C.GenerateConfig) == cfg


def test_open_rejects_non_runs(tmp_path):
    with pytest.raises(WorkspaceError, match="does not exist"):
        Workspace.open(tmp_path / "nope")
    with pytest.raises(WorkspaceError, match="not an avatar run folder"):
        Workspace.open(tmp_path)


def test_metrics_jsonl(ws):
    ws.log_metrics(1, stage="coarse", loss=torch.tensor(0.5), lr=1e-2)
    ws.log_metrics(2, stage="coarse", loss=0.25)
    with open(ws.metrics_path, "a") as fh:
        fh.write('{"step": 3, "los')  # a line cut by a crash
    rows = ws.read_metrics()
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 0.5
    assert all(json.loads(line) for line in ws.metrics_path.read_text().splitlines()[:2])


def _strict_json(line: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_metrics_write_non_finite_numbers_as_null(ws):
    import numpy as np

    ws.log_metrics(1, loss=float("nan"), lr=float("inf"), grad=torch.tensor(float("-inf")),
                   score=np.float32("nan"), parts={"sds": float("nan"), "reg": 0.5}, history=[1.0, float("inf")],
                   ok=torch.tensor(0.25))
    line = ws.metrics_path.read_text().splitlines()[0]
    record = _strict_json(line)  # valid JSON: no bare NaN or Infinity
    assert record["loss"] is None and record["lr"] is None and record["grad"] is None and record["score"] is None
    assert record["parts"] == {"sds": None, "reg": 0.5} and record["history"] == [1.0, None]
    assert record["ok"] == 0.25 and record["step"] == 1


def test_resume_cuts_metrics_back_to_the_checkpoint_step(ws):
    for step in range(1, 9):
        ws.log_metrics(step, stage="coarse", loss=1.0 / step)
        if step == 5:
            ws.save_checkpoint({"w": torch.ones(2)}, 5)
            ws.log_metrics(5, event="batch_resume", resumed_from=5)  # an event at the checkpoint's step
    with open(ws.metrics_path, "a") as fh:
        fh.write('{"step": 9, "lo')  # the kill cut this line
    assert ws.load_checkpoint()["step"] == 5  # a plain load (export, rollback) leaves metrics alone
    assert [r["step"] for r in ws.read_metrics()] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert ws.load_checkpoint(resume=True)["step"] == 5
    assert [r["step"] for r in ws.read_metrics()] == [1, 2, 3, 4, 5, 5]
    # The replayed steps are logged once each, and every line is whole JSON.
    for step in range(6, 9):
        ws.log_metrics(step, stage="coarse", loss=1.0 / step)
    lines = ws.metrics_path.read_text().splitlines()
    assert [_strict_json(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert ws.truncate_metrics(8) == 0


def test_checkpoint_round_trip_and_keep_last(ws):
    for step in (10, 20, 30, 40):
        ws.save_checkpoint({"w": torch.full((3,), float(step)), "stage": "coarse"}, step, keep=2)
    assert [p.name for p in ws.checkpoints()] == ["step-00000030.pt", "step-00000040.pt"]
    loaded = ws.load_checkpoint()
    assert loaded["step"] == 40 and torch.equal(loaded["state"]["w"], torch.full((3,), 40.0))
    assert loaded["state"]["stage"] == "coarse"


def test_crash_between_write_and_rename_keeps_old_checkpoint(ws, monkeypatch):
    ws.save_checkpoint({"w": torch.ones(4)}, 100)
    real_replace = os.replace

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")  # the process dies before the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ws.save_checkpoint({"w": torch.zeros(4)}, 200)
    monkeypatch.setattr(os, "replace", real_replace)
    # The new data never replaced a checkpoint; the old one is intact and still the latest.
    assert [p.name for p in ws.checkpoints()] == ["step-00000100.pt"]
    assert torch.equal(ws.load_checkpoint()["state"]["w"], torch.ones(4))


def test_truncated_checkpoint_gives_clear_error_and_is_kept(ws):
    path = ws.save_checkpoint({"w": torch.randn(1000)}, 5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*left in place"):
        ws.load_checkpoint()
    assert path.is_file() and path.stat().st_size == len(data) // 2


def test_foreign_missing_and_newer_checkpoints(ws):
    foreign = ws.checkpoints_dir / "step-00000001.pt"
    torch.save({"model": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an avatar checkpoint"):
        ws.load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        ws.load_checkpoint(ws.checkpoints_dir / "step-00000099.pt")
    newer = ws.checkpoints_dir / "step-00000002.pt"
    torch.save({"format": "avatar-checkpoint", "version": 99, "step": 2, "state": {}}, newer)
    with pytest.raises(CheckpointError, match="newer avatar"):
        ws.load_checkpoint(newer)
    empty = Workspace.create(ws.root.parent, "empty")
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        empty.load_checkpoint()


def test_lock_contention(ws):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from avatar.workspace import Workspace\n"
         "lock = Workspace(sys.argv[1]).lock(); lock.acquire(); print('locked', flush=True); time.sleep(60)",
         str(ws.root)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            ws.lock().acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its lock is stale and is taken over with a warning.
    with pytest.warns(UserWarning, match="stale lock"):
        with ws.lock() as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (ws.root / "run.lock").exists()


def test_same_process_cannot_lock_twice(ws):
    with ws.lock():
        with pytest.raises(RunLockedError):
            ws.lock().acquire()


def test_lock_on_other_host_is_not_stolen(ws):
    (ws.root / "run.lock").write_text(json.dumps({"pid": 1, "host": "render-node-7", "started": 0}))
    with pytest.raises(RunLockedError, match="render-node-7"):
        ws.lock().acquire()
