"""``--prompts FILE``: one run folder per prompt, past failures, with a summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatar.config import GenerateConfig, make_config
from avatar.pipeline.generate import GenerateError
from avatar.pipeline.prompts import read_prompts, run_prompts


def test_read_prompts_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# heads\n\nan old sea captain\n   \n  # indented comment\n a young elf \n")
    assert read_prompts(path) == ["an old sea captain", "a young elf"]


def test_read_prompts_errors_name_the_file(tmp_path):
    with pytest.raises(GenerateError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(GenerateError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(GenerateError, match="UTF-8"):
        read_prompts(tmp_path / "bin.txt")


def test_run_prompts_continues_past_a_failure(tmp_path):
    cfg = make_config(GenerateConfig, "smoke", [f"output_root={tmp_path}"])
    seen = []

    def fake_run(one, ws, progress=True):
        seen.append((one.prompt, ws.root.parent))
        if one.prompt == "bad":
            raise GenerateError("no luck")
        return {"finished": True}

    summary = run_prompts(cfg, ["a", "bad", "c"], progress=False, run=fake_run)
    assert summary["total"] == 3 and summary["succeeded"] == 2 and summary["failed"] == 1
    assert [r["ok"] for r in summary["runs"]] == [True, False, True]
    assert "no luck" in summary["runs"][1]["error"]
    assert [p for p, _ in seen] == ["a", "bad", "c"] and all(parent == tmp_path for _, parent in seen)
    assert len({r["run"] for r in summary["runs"]}) == 3
    assert cfg.prompt == ""  # the caller's config is not modified


def test_a_prompt_that_cannot_start_leaves_no_run_folder(tmp_path):
    cfg = make_config(GenerateConfig, "smoke", [f"output_root={tmp_path / 'runs'}",
                                                f"guidance.model=oracle:{tmp_path / 'missing.obj'}"])
    summary = run_prompts(cfg, ["a", "b"], progress=False)
    assert summary["failed"] == 2 and all(r["run"] is None for r in summary["runs"])
    assert "missing.obj" in summary["runs"][0]["error"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------------------
# avatar batch: planning, the journal, the hooks and the errors (no runs)


def _write(path, text):
    path.write_text(text)
    return path


def test_plan_batch_gives_each_prompt_a_fixed_folder_and_splits_overrides(tmp_path):
    from avatar.batch import plan_batch, task_folder

    prompts = _write(tmp_path / "heads.txt", "an old sea captain\n# skip\na young elf\nan old sea captain\n")
    edits = _write(tmp_path / "edits.txt", "give him a red hat\n\ngive him a red hat\nmake him smile\n")
    over = ["coarse.steps=3", "fine.steps=2", "seed=7", "edit.fine.steps=5", "edit.strength=0.5"]
    root, tasks = plan_batch(prompts, edits_file=edits, preset="smoke", guidance="tiny", overrides=over,
                             output_root=tmp_path / "out")
    assert root == tmp_path / "out"
    names = [Path(t.folder).name for t in tasks]
    assert [n.rsplit("-", 1)[0] for n in names[:2]] == ["an-old-sea-captain", "a-young-elf"]
    assert names[2] == names[0] + "-2" and [t.index for t in tasks] == [1, 2, 3]
    # A re-run finds the same folders, also after lines were added or moved.
    _write(prompts, "a grumpy dwarf\na young elf\nan old sea captain\nan old sea captain\n")
    again = plan_batch(prompts, edits_file=edits, preset="smoke", guidance="tiny", overrides=over,
                       output_root=tmp_path / "out")[1]
    assert {t.folder for t in again} == {t.folder for t in tasks} | {again[0].folder}
    # Prompts that share a slug still get their own folders.
    assert task_folder(tmp_path, "An old sea captain!") != task_folder(tmp_path, "an old sea captain")
    gen = tasks[0].generate
    assert (gen.coarse.steps, gen.fine.steps, gen.seed, gen.guidance.model) == (3, 2, 7, "tiny")
    assert gen.output_root == str(tmp_path / "out") and tasks[1].generate.prompt == "a young elf"
    assert [e.instruction for e in tasks[0].edits] == ["give him a red hat", "make him smile"]  # repeats dropped
    edit = tasks[0].edits[0]
    assert (edit.fine.steps, edit.strength, edit.seed, edit.guidance.model) == (5, 0.5, 7, "tiny")
    assert tasks[0].export is None and all(t.fail_at_step is None for t in tasks)
    # The default output root is named after the prompts file, so the same command resumes the same batch.
    assert plan_batch(prompts, preset="smoke")[0].name == "batch-heads"


def test_plan_batch_rejects_bad_inputs_before_any_work(tmp_path, monkeypatch):
    from avatar.batch import FAIL_ENV, BatchError, plan_batch
    from avatar.config import ConfigError

    prompts = _write(tmp_path / "p.txt", "a\nb\n")
    with pytest.raises(GenerateError, match="holds no prompts"):
        plan_batch(_write(tmp_path / "empty.txt", "#\n"), preset="smoke")
    with pytest.raises(BatchError, match="edits file"):
        plan_batch(prompts, edits_file=tmp_path / "missing.txt", preset="smoke")
    with pytest.raises(ConfigError, match="coarse.steps"):
        plan_batch(prompts, preset="smoke", overrides=["coarse.step=3"])
    with pytest.raises(GenerateError, match="nothing to do"):
        plan_batch(prompts, preset="smoke", overrides=["coarse.steps=0", "fine.steps=0"])
    monkeypatch.setenv(FAIL_ENV, "2@x")
    with pytest.raises(BatchError, match="INDEX@STEP"):
        plan_batch(prompts, preset="smoke", output_root=tmp_path / "out")
    monkeypatch.setenv(FAIL_ENV, "2@5")
    _, tasks = plan_batch(prompts, preset="smoke", output_root=tmp_path / "out")
    assert [t.fail_at_step for t in tasks] == [None, 5]
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_export_without_the_export_pipeline_is_refused_up_front(tmp_path, monkeypatch):
    import sys

    from avatar.batch import BatchError, plan_batch

    monkeypatch.setitem(sys.modules, "avatar.export", None)  # as before the export pipeline existed
    with pytest.raises(BatchError, match="export"):
        plan_batch(_write(tmp_path / "p.txt", "a\n"), preset="smoke", export_formats="glb")


def test_asking_for_ray_without_ray_names_the_extra(tmp_path, monkeypatch):
    import sys

    from avatar.batch import BatchError, run_batch

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(BatchError, match=r'pip install "avatar\[ray\]"'):
        run_batch(_write(tmp_path / "p.txt", "a\n"), ray="local", preset="smoke", output_root=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_journal_counts_a_task_done_only_if_its_last_record_says_so_and_its_folder_exists(tmp_path):
    from avatar.batch import BatchJournal

    journal = BatchJournal(tmp_path)
    a, b, c = (str(tmp_path / name) for name in ("a", "b", "c"))
    for folder in (a, c):
        Path(folder).mkdir()
    journal.append({"event": "start"})
    journal.append({"index": 1, "prompt": "a", "run": a, "status": "retrying"})
    journal.append({"index": 1, "prompt": "a", "run": a, "status": "done"})
    journal.append({"index": 2, "prompt": "b", "run": b, "status": "done"})  # its folder was deleted since
    journal.append({"index": 3, "prompt": "c", "run": c, "status": "done"})
    journal.append({"index": 3, "prompt": "c", "run": c, "status": "failed"})
    with open(journal.path, "a") as fh:
        fh.write('{"index": 4, "prompt": "d", "sta')  # a line cut by a kill
    assert set(journal.done()) == {"a"}
    assert len(journal.records()) == 6


@pytest.mark.usefixtures("shared_cache", "one_thread")
def test_a_batch_worker_reads_the_guidance_weights_once():
    from avatar.guidance import models as M

    with M.models_kept_loaded():
        a = M.load_diffusion_model("tiny")
        b = M.load_diffusion_model("tiny")
        net_a, rec_a = M.load_controlnet("tiny")
        net_b, rec_b = M.load_controlnet("tiny")
        assert a.unet is b.unet and a.vae is b.vae and a.scheduler is b.scheduler and net_a is net_b
        # Text encoders are changed in place (textual inversion) and freed by the guidance: never shared.
        assert a.text_encoder is not b.text_encoder and a.tokenizer is not b.tokenizer
        assert a.record == b.record and a.record is not b.record and rec_a == rec_b and rec_a is not rec_b
        b.text_encoder = None  # what the guidance factory does after encoding the prompts
        assert M.load_diffusion_model("tiny").text_encoder is not None
    c = M.load_diffusion_model("tiny")
    assert c.unet is not a.unet  # outside the block every load reads the weights again


def test_progress_table_shows_done_running_failed_steps_and_eta(tmp_path):
    import json

    from rich.console import Console

    from avatar.batch import TASK_STATE, BatchProgress, plan_batch

    prompts = _write(tmp_path / "p.txt", "a\nb\nc\nd\n")
    _, tasks = plan_batch(prompts, preset="smoke", output_root=tmp_path / "out")
    running = Path(tasks[1].folder)
    running.mkdir(parents=True)
    (running / TASK_STATE).write_text(json.dumps({"phase": "generate", "phase_dir": str(running),
                                                  "phase_total": 300}))
    (running / "metrics.jsonl").write_text('{"step": 1}\n{"step": 75}\n')
    table = BatchProgress(tasks, skipped={1}, workers=2, enabled=False)
    table.set(2, "running", attempt=1)
    table.started[2] -= 30.0  # 75 of 300 steps in 30 s: 120 s per task
    table.set(3, "failed", attempt=3, seconds=4.0)
    console = Console(record=True, width=150)
    console.print(table)
    text = console.export_text()
    assert "1/4 done (1 earlier), 1 running, 1 failed, 1 queued" in text
    assert "generate 75/300" in text and "skipped" in text and "failed" in text
    eta = table.eta()
    assert eta is not None and abs(eta - (120 + 90) / 2) < 5  # one queued task + the running one's rest, 2 workers


def test_export_settings_are_checked_before_any_work(tmp_path):
    from avatar.batch import plan_batch
    from avatar.errors import AvatarError

    prompts = _write(tmp_path / "p.txt", "a\n")
    with pytest.raises(AvatarError, match="gltf2"):
        plan_batch(prompts, preset="smoke", export_formats="glb,gltf2", output_root=tmp_path / "out")
    _, tasks = plan_batch(prompts, preset="smoke", export_formats="glb", overrides=["export.texture_size=512"],
                          output_root=tmp_path / "out")
    assert tuple(tasks[0].export.formats) == ("glb",) and tasks[0].export.texture_size == 512
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Errors the user must fix: refused before any work, or failed at once, never retried


def test_a_missing_guidance_folder_is_one_line_with_exit_code_2_before_any_work(tmp_path):
    import os
    import subprocess
    import sys

    prompts = _write(tmp_path / "p.txt", "a\nb\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "avatar.cli", "batch", str(prompts), "--guidance",
                           str(tmp_path / "no-such-weights"), "--preset", "smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "no-such-weights" in proc.stderr and "--guidance" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # no run folder, no journal


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("error, attempts, code", [
    ("user", 1, 2),   # e.g. the guidance's weights are not in the cache and there is no network
    ("crash", 3, 1),  # anything else is retried (from the checkpoint) twice
])
def test_a_task_that_fails_with_a_user_error_is_not_retried(tmp_path, monkeypatch, error, attempts, code):
    import json

    from typer.testing import CliRunner

    from avatar.batch import JOURNAL, task
    from avatar.cli import app
    from avatar.guidance.errors import WeightsUnavailableError

    calls = []

    def failing_generate(t, attempt, guidance, state):
        calls.append(attempt)
        if error == "user":
            raise WeightsUnavailableError("no weights for some/model in the local cache and no network: download "
                                          "them with ... or pass --guidance DIR")
        raise RuntimeError("a bug")

    monkeypatch.setattr(task, "_generate_phase", failing_generate)
    prompts = _write(tmp_path / "p.txt", "a\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["batch", str(prompts), "--preset", "smoke", "--out", str(out)])
    assert result.exit_code == code, result.output
    assert calls == list(range(1, attempts + 1))
    records = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    tasks = [r for r in records if "status" in r]
    assert [r["status"] for r in tasks] == ["retrying"] * (attempts - 1) + ["failed"]
    assert tasks[-1]["user_error"] is (error == "user")
    if error == "user":  # the message itself, one line, as the CLI prints it
        assert tasks[-1]["error"].startswith("no weights for some/model") and "\n" not in tasks[-1]["error"]
        assert "no weights for some/model" in result.output
    assert records[-1]["event"] == "end" and records[-1]["user_errors"] == (1 if error == "user" else 0)


def test_a_task_folder_with_checkpoints_but_no_config_is_an_error_not_a_fresh_run(tmp_path):
    from avatar.batch.journal import TaskState
    from avatar.batch.task import BatchTask, _generate_phase
    from avatar.config import ConfigError

    folder = tmp_path / "task"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step-00000004.pt").write_bytes(b"x")
    task = BatchTask(1, "a head", str(folder), make_config(GenerateConfig, "smoke"))
    with pytest.raises(ConfigError, match="config.yaml is missing"):
        _generate_phase(task, 1, None, TaskState(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints"]  # nothing started over it
