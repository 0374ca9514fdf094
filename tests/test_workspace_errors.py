"""A damaged run folder is a one-line error with exit code 2, never a traceback.

A 0-byte or cut checkpoint, garbage YAML in config.yaml, a run.json that is a
folder, and a full disk during a checkpoint write (the temp file is removed, the
previous checkpoint kept). Checked on the Workspace and through ``avatar`` itself
(``avatar.cli.main``: what a user runs).
"""

from __future__ import annotations

import errno
import sys

import pytest
import torch

from avatar import config as C
from avatar.errors import AvatarError
from avatar.workspace import CheckpointError, Workspace, WorkspaceError


@pytest.fixture
def run(tmp_path):
    """A generate run folder with its config, run.json and one good checkpoint (step 10)."""
    ws = Workspace.create(tmp_path / "outputs", "damaged")
    ws.save_config(C.make_config(C.GenerateConfig, "smoke", ["prompt=damaged", "guidance.model=tiny"]))
    ws.write_info("generate", seed=0, argv=["avatar", "generate", "damaged"])
    ws.save_checkpoint({"w": torch.ones(3)}, 10)
    return ws


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run ``avatar ARGS`` as the console script does; returns (exit code, stderr)."""
    from avatar.cli import main

    monkeypatch.setattr(sys, "argv", ["avatar", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip() and "\n" not in message, repr(message)
    return message


@pytest.mark.parametrize("size", [0, 1, 100, "half"])
def test_empty_or_cut_checkpoint_is_one_line(run, size):
    path = run.save_checkpoint({"w": torch.randn(1000)}, 20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if size == "half" else data[:size])
    with pytest.raises(CheckpointError) as info:
        run.load_checkpoint()
    message = one_line(info.value)
    assert str(path) in message and "left in place" in message
    assert path.stat().st_size == (len(data) // 2 if size == "half" else size)  # never deleted


def test_empty_checkpoint_through_the_cli_exits_2(run, monkeypatch, capsys):
    (run.checkpoints_dir / "step-00000020.pt").write_bytes(b"")
    code, err = cli(monkeypatch, capsys, "export", str(run.root))
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "step-00000020.pt" in err, err


def test_garbage_yaml_config_is_one_line(run, monkeypatch, capsys):
    run.config_path.write_text("coarse: [steps: {\n\t- !!python/object:os.system 'x'\n")
    with pytest.raises(AvatarError) as info:
        run.load_config(C.GenerateConfig)
    assert "config.yaml" in one_line(info.value)
    code, err = cli(monkeypatch, capsys, "generate", "--resume", str(run.root))
    assert code == 2 and "config.yaml" in err and err.count("\n") == 1, err


def test_run_json_that_is_a_folder_is_one_line(run, monkeypatch, capsys):
    run.info_path.unlink()
    run.info_path.mkdir()
    with pytest.raises(WorkspaceError) as info:
        run.read_info()
    assert "run.json" in one_line(info.value) and "folder" in str(info.value)
    with pytest.raises(WorkspaceError) as info:
        run.write_info("generate", seed=0)
    assert "run.json" in one_line(info.value)
    assert [p.name for p in run.root.iterdir() if ".tmp-" in p.name] == []  # no temp file left
    code, err = cli(monkeypatch, capsys, "generate", "--resume", str(run.root))
    assert code == 2 and "run.json" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("value", ["[1, 2]", "not json {"])
def test_run_json_that_is_not_a_record_is_one_line(run, value):
    run.info_path.write_text(value)
    with pytest.raises(WorkspaceError) as info:
        run.read_info()
    assert "run.json" in one_line(info.value)


def test_disk_full_during_checkpoint_write(run, monkeypatch):
    before = run.latest_checkpoint()
    good = before.read_bytes()

    def full_disk(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as info:
        run.save_checkpoint({"w": torch.zeros(3)}, 20)
    message = one_line(info.value)
    assert "No space left on device" in message and "step-00000010.pt" in message and "--resume" in message
    assert isinstance(info.value, AvatarError)  # the CLI prints it as one line, exit code 2
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-00000010.pt"]  # no temp file
    assert run.latest_checkpoint() == before and before.read_bytes() == good
    monkeypatch.undo()
    assert torch.equal(run.load_checkpoint()["state"]["w"], torch.ones(3))


def test_interrupt_during_checkpoint_write_leaves_no_temp_file(run, monkeypatch):
    def interrupted(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint({"w": torch.zeros(3)}, 20)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-00000010.pt"]
