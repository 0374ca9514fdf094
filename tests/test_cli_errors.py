"""Errors a user can fix: one line on stderr, exit code 2, and nothing written before them
(issue 17, items 3, 7, 8, 9, 10, 11 and 14). Ctrl-C says where a run stopped.

The commands run in this process (:func:`avatar.cli.main`, the console entry point, or
``CliRunner`` on :data:`avatar.cli.app`); the heavy loops are stood in for by
:class:`FakeRun` where a test is about the command line, not the loop.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import trimesh
import yaml
from support import TINY_SIZES
from typer.testing import CliRunner

from avatar import cli
from avatar.config import EditConfig, GenerateConfig, to_dict

pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """AVATAR_OUTPUTS, not yet created; the working folder is a fresh one (where ``outputs/``
    would appear if AVATAR_OUTPUTS were ignored)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = tmp_path / "avatar-outputs"
    monkeypatch.setenv("AVATAR_OUTPUTS", str(root))
    return root


def written(outputs: Path) -> list[Path]:
    """Everything a command left under AVATAR_OUTPUTS or in the working folder."""
    found = list(outputs.rglob("*")) if outputs.exists() else []
    return found + list(Path.cwd().rglob("*"))


@pytest.fixture
def avatar(monkeypatch, capsys):
    """``avatar ARGS...`` through the console entry point: (exit code, stdout, stderr)."""

    def call(*args: object) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["avatar", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            cli.main()
        out = capsys.readouterr()
        return info.value.code, out.out, out.err

    return call


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def head_mesh(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mesh") / "head.ply"
    trimesh.creation.icosphere(2, radius=0.1).export(path)
    return path


def run_folder(parent: Path, name: str, kind: str | None, config: bool = True) -> Path:
    """A run folder as the commands leave it (run.json, config.yaml, one checkpoint name)."""
    root = parent / name
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step-00000002.pt").write_bytes(b"")
    if kind is not None:
        (root / "run.json").write_text(json.dumps({"kind": kind, "source_mesh": "head.ply"}))
    if config:
        cfg = EditConfig(instruction="add a hat") if kind == "edit" else GenerateConfig(prompt="x")
        (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return root


class FakeRun:
    """Stands for GenerateRun and ImportRun: ``run()`` leaves a checkpoint name at step
    ``saved`` and then raises ``stop`` at step ``step`` (or returns)."""

    made: list[FakeRun]
    stop: BaseException | None = None
    saved, step_at_stop = 3, 3

    def __init__(self, cfg, workspace, *args, **kwargs):
        self.cfg, self.ws, self.step, self.total = cfg, workspace, 0, 10
        type(self).made.append(self)

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        self.resumed = resume
        self.ws.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        (self.ws.checkpoints_dir / f"step-{self.saved:08d}.pt").write_bytes(b"")
        self.step = self.step_at_stop
        if self.stop is not None:
            raise self.stop
        return {"finished": True}


@pytest.fixture
def fake_runs(monkeypatch):
    import avatar.pipeline.generate as generate
    import avatar.pipeline.import_mesh as import_mesh

    class Run(FakeRun):
        made: list[FakeRun] = []

    monkeypatch.setattr(generate, "GenerateRun", Run)
    monkeypatch.setattr(import_mesh, "ImportRun", Run)
    return Run


# ---------------------------------------------------------------------------
# Item 3: nothing is created before the guidance, the oracle's mesh and the prior load


@pytest.mark.parametrize("case", ["guidance folder", "oracle mesh missing", "generate prior", "import prior",
                                  "import folder as mesh"])
def test_a_failed_load_leaves_no_run_folder(case, outputs, tmp_path, head_mesh, avatar):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    no_flame = f"flame:{tmp_path / 'no-flame'}"
    args, needle = {
        "guidance folder": (["generate", "x", "--guidance", empty], str(empty)),
        "oracle mesh missing": (["generate", "x", "--guidance", f"oracle:{tmp_path / 'gone.ply'}"], "gone.ply"),
        "generate prior": (["generate", "x", "--head-model", no_flame], "no-flame"),
        "import prior": (["import", head_mesh, "--head-model", no_flame], "no-flame"),
        # Item 14: a folder where a mesh is expected is named as a folder.
        "import folder as mesh": (["import", empty], "is a folder, not a mesh file"),
    }[case]
    code, _, err = avatar(*args, "--preset", "smoke")
    assert_one_line_error(code, err, needle)
    assert written(outputs) == []


def test_the_run_folder_is_made_after_the_run_is_built(outputs, fake_runs, avatar):
    code, _, err = avatar("generate", "an old sea captain", "--preset", "smoke", "--guidance", "tiny")
    assert code == 0, err
    (run,) = fake_runs.made
    assert run.ws is not None and run.ws.root.parent == outputs  # item 10: AVATAR_OUTPUTS is the default root


def test_a_bad_out_is_refused_before_anything_loads(outputs, tmp_path, fake_runs, avatar):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = avatar("generate", "x", "--preset", "smoke", "--out", blocker / "runs")
    assert_one_line_error(code, err, "is a file")
    assert fake_runs.made == []


# ---------------------------------------------------------------------------
# Item 7: --seed, garbled --config files, output folders that cannot be written


@pytest.mark.parametrize("command", ["generate", "import", "edit"])
@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_bad_seed_is_refused_before_anything_is_written(command, seed, outputs, tmp_path, head_mesh, avatar):
    source = run_folder(tmp_path, "source", "generate")
    before = sorted(source.rglob("*"))
    args = {"generate": ["generate", "x", "--guidance", "tiny"], "import": ["import", head_mesh],
            "edit": ["edit", source, "add a hat", "--guidance", "tiny"]}[command]
    code, _, err = avatar(*args, "--preset", "smoke", "--seed", seed)
    assert_one_line_error(code, err, f"seed must be a whole number from 0 to 4294967295, got {seed}")
    assert written(outputs) == [] and sorted(source.rglob("*")) == before


GARBLED = {
    "deeply nested": "[" * 50_000,
    "unclosed list": "coarse:\n  steps: [12\n  lr: : 1\n",
    "tab indent": "coarse:\n\tsteps: 3\n",
    "python tag": "prompt: !!python/object/apply:os.system ['echo pwned']\n",
    "binary": b"\x00\x01\x02\xff\xfe",
    "not utf-8": b"prompt: \xff\xfe\n",
    "a list": "- coarse.steps\n- 3\n",
    "a number": "42\n",
    "section as value": "coarse: 5\n",
    "wrong type": "coarse:\n  steps: [1, 2]\n",
    "unknown key": "coarse:\n  stepz: 3\n",
    "undefined alias": "coarse: *nowhere\n",
    "a folder": None,
}


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_a_garbled_config_file_is_one_line_naming_it(case, outputs, tmp_path, fake_runs, avatar):
    path = tmp_path / "my-config.yaml"
    content = GARBLED[case]
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, _, err = avatar("generate", "x", "--preset", "smoke", "--config", path)
    assert_one_line_error(code, err, "my-config.yaml")
    assert fake_runs.made == [] and written(outputs) == []


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_output_folder_that_cannot_be_written_is_refused(case, tmp_path, monkeypatch):
    """``check_output_folder`` (what generate, import and batch call before anything loads)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = {"a file": blocker, "under a file": blocker / "runs", "read-only": tmp_path / "ro" / "runs"}[case]
    if case == "read-only":
        (tmp_path / "ro").mkdir(mode=0o555)
        if os.geteuid() == 0:  # root writes through permission bits: stand in for a read-only mount

            def refuse(*args, **kwargs):
                raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(cli.tempfile, "mkdtemp", refuse)
    with pytest.raises(cli.AvatarError) as info:
        cli.check_output_folder(target)
    message = str(info.value)
    assert "\n" not in message and str(target) in message and "--out" in message
    assert not (tmp_path / "ro" / "runs").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a-file", "ro"][: 2 if case == "read-only" else 1])


def test_a_writable_output_folder_is_left_as_it_was(tmp_path):
    assert cli.check_output_folder(tmp_path / "new" / "runs") == tmp_path / "new" / "runs"
    assert list(tmp_path.iterdir()) == []  # nothing made: whoever writes there creates it


# ---------------------------------------------------------------------------
# Items 8 and 14: resuming the right kind of folder, with nothing else given


@pytest.mark.parametrize("command, kind, needle", [
    ("generate", "edit", "is an edit folder, not a generate run: continue it with 'avatar edit --resume"),
    ("generate", "import", "is an import run, not a generate run: continue it with 'avatar import --resume"),
    ("import", "edit", "is an edit folder, not an import run: continue it with 'avatar edit --resume"),
    ("edit", "generate", "is a generate run, not an edit folder: continue it with 'avatar generate --resume"),
    ("edit", "import", "is an import run, not an edit folder: continue it with 'avatar import --resume"),
])
def test_resuming_another_kind_of_folder_names_the_command_that_resumes_it(command, kind, needle, outputs,
                                                                            tmp_path, fake_runs, avatar):
    folder = run_folder(tmp_path, "folder", kind)
    code, _, err = avatar(command, "--resume", folder)
    assert_one_line_error(code, err, needle, str(folder))
    assert "unknown config key" not in err and fake_runs.made == []


@pytest.mark.parametrize("command, kind", [("generate", "generate"), ("import", "import"), ("edit", "edit")])
@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_resuming_without_a_readable_config_names_the_file(command, kind, damage, outputs, tmp_path, fake_runs,
                                                           avatar):
    folder = run_folder(tmp_path, "folder", kind, config=damage != "missing")
    if damage == "garbled":
        (folder / "config.yaml").write_text("fine:\n  dmtet_resolution: [12\n")
    code, _, err = avatar(command, "--resume", folder)
    assert_one_line_error(code, err, str(folder / "config.yaml"))
    assert fake_runs.made == []


@pytest.mark.parametrize("command, extra, named", [
    ("edit", ["RUN", "give him a hat"], "RUN, INSTRUCTION"),
    ("edit", ["--strength", "0.5", "--texture-only"], "--strength, --texture-only"),
    ("generate", ["a prompt", "--seed", "3"], "PROMPT, --seed"),
    ("generate", ["--set", "coarse.steps=5"], "--set"),
    ("import", ["--preset", "fast"], "--preset"),
])
def test_resume_refuses_arguments_it_would_ignore(command, extra, named, outputs, tmp_path, fake_runs, avatar,
                                                  monkeypatch):
    import avatar.pipeline.edit as edit

    calls = []
    monkeypatch.setattr(edit, "run_edit", lambda *a, **k: calls.append((a, k)))
    folder = run_folder(tmp_path, "folder", command)
    source = run_folder(tmp_path, "RUN", "generate")
    extra = [str(source) if e == "RUN" else e for e in extra]
    code, _, err = avatar(command, *extra, "--resume", folder)
    assert_one_line_error(code, err, f"so {named} cannot be given with it")
    assert calls == [] and fake_runs.made == []


def test_a_plain_resume_still_resumes(outputs, tmp_path, fake_runs, avatar):
    folder = run_folder(tmp_path, "folder", "generate")
    code, _, err = avatar("generate", "--resume", folder)
    assert code == 0, err
    (run,) = fake_runs.made
    assert run.resumed and run.ws.root == folder and run.cfg.prompt == "x"


# ---------------------------------------------------------------------------
# Item 11: Ctrl-C says where the run stopped and how to continue it


@pytest.mark.parametrize("command", ["generate", "import"])
@pytest.mark.parametrize("how", ["at a step end", "mid-step"])
def test_ctrl_c_prints_where_the_run_stopped(command, how, outputs, head_mesh, fake_runs, monkeypatch):
    if how == "at a step end":  # the loop's first Ctrl-C: a checkpoint of the step, then this
        monkeypatch.setattr(fake_runs, "stop", KeyboardInterrupt("interrupted at step 3; resume with --resume R"))
    else:  # a second Ctrl-C: at once, inside step 5
        monkeypatch.setattr(fake_runs, "stop", KeyboardInterrupt())
        monkeypatch.setattr(fake_runs, "step_at_stop", 4)
    args = ["generate", "x", "--guidance", "tiny"] if command == "generate" else ["import", str(head_mesh)]
    result = CliRunner().invoke(cli.app, [*args, "--preset", "smoke"])
    assert result.exit_code == 130, result.output
    (run,) = fake_runs.made
    kept = "" if how == "at a step end" else " (resume continues from the checkpoint of step 3)"
    assert result.stderr.strip() == (f"stopped at step {run.step} of 10{kept}; resume with "
                                     f"'avatar {command} --resume {run.ws.root}'")


def test_ctrl_c_in_an_edit_prints_the_loops_message(tmp_path, monkeypatch):
    import avatar.pipeline.edit as edit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("interrupted at step 2; resume with --resume EDIT")

    monkeypatch.setattr(edit, "run_edit", interrupted)
    source = run_folder(tmp_path, "source", "generate")
    result = CliRunner().invoke(cli.app, ["edit", str(source), "add a hat", "--preset", "smoke"])
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted at step 2; resume with --resume EDIT"


def test_ctrl_c_during_a_real_run_stops_with_a_checkpoint_and_says_so(outputs, tmp_path, monkeypatch, one_thread):
    """The real loop: the first SIGINT is turned into a stop at the end of the step."""
    from avatar.pipeline.generate import GenerateRun

    sphere = tmp_path / "sphere.ply"
    trimesh.creation.icosphere(2, radius=0.35).export(sphere)
    real_step = GenerateRun.train_step

    def train_step(self, stage):
        record = real_step(self, stage)
        if self.step == 1:  # during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(GenerateRun, "train_step", train_step)
    sets = [a for s in [*TINY_SIZES, "coarse.steps=4", "fine.steps=0", "engines.hashgrid=torch"] for a in ("--set", s)]
    result = CliRunner().invoke(cli.app, ["generate", "x", "--preset", "smoke", "--guidance", f"oracle:{sphere}",
                                          *sets])
    assert result.exit_code == 130, result.output
    (run,) = [p for p in outputs.iterdir() if p.is_dir()]
    assert result.stderr.strip().splitlines()[-1] == (f"stopped at step 2 of 4; resume with "
                                                      f"'avatar generate --resume {run}'")
    assert (run / "checkpoints" / "step-00000002.pt").is_file()
