"""``avatar batch`` without Ray: whole tiny runs, one after another in this process.

The runs are cut to the test sizes (tests/support.py TINY_SIZES, tiny guidance, 4 coarse +
4 fine steps, a checkpoint every 5 steps and at each stage end: steps 0, 4, 5, 8), so a
task takes seconds. The failure hook fails step 7, after the checkpoint of step 5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support import TINY_SIZES

pytestmark = pytest.mark.usefixtures("shared_cache", "one_thread")

CUT = [*TINY_SIZES, "coarse.steps=4", "fine.steps=4", "checkpoint_every=5", "preview_every=100"]
TOTAL = 8
CHECKPOINT_BEFORE_FAILURE = 5
FAIL_STEP = 7


def metrics(run: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def assert_continued_from_checkpoints(run: str | Path) -> None:
    """Every resume event is followed by the step after the checkpoint it resumed from, and the
    run ends at the last step with its final checkpoint."""
    rows = metrics(run)
    for i, row in enumerate(rows):
        if row.get("event") == "batch_resume":
            assert rows[i + 1]["step"] == row["resumed_from"] + 1, (run, rows[i:i + 2])
    assert rows[-1]["step"] == TOTAL
    assert (Path(run) / "checkpoints" / f"step-{TOTAL:08d}.pt").is_file()


@pytest.mark.slow
def test_sequential_batch_retries_from_the_checkpoint_and_a_rerun_skips_what_is_done(tmp_path, monkeypatch):
    from avatar.batch import JOURNAL, run_batch
    from avatar.guidance import models

    monkeypatch.setitem(sys.modules, "ray", None)  # any import of ray would fail the batch
    unet_loads = []
    load = models._load_component

    def counting(cls, ws, role, component, *args):
        if component == "unet":
            unet_loads.append(ws.spec)
        return load(cls, ws, role, component, *args)

    monkeypatch.setattr(models, "_load_component", counting)
    prompts = tmp_path / "heads.txt"
    prompts.write_text("an old sea captain\na young elf\n# not a prompt\na grumpy dwarf\n")
    out = tmp_path / "out"

    # First call: prompt 2 fails once at step 7; the call stops after two tasks (a kill between tasks).
    first = run_batch(prompts, preset="smoke", guidance="tiny", overrides=CUT, output_root=out, progress=False,
                      fail_at={2: FAIL_STEP}, stop_after_tasks=2)
    assert (first["succeeded"], first["failed"], first["stopped"]) == (2, 0, 1)
    assert unet_loads == ["tiny"]  # the guidance weights were read once for three runs (two tasks + a retry)
    runs = {r["index"]: r for r in first["runs"]}
    assert runs[2]["attempt"] == 2 and runs[2]["generate"] == "resumed"
    assert runs[2]["resumed_from"] == CHECKPOINT_BEFORE_FAILURE  # not 0, not the failed step
    journal = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    retrying = [r for r in journal if r.get("status") == "retrying"]
    assert len(retrying) == 1 and retrying[0]["index"] == 2 and "InjectedFailure" in retrying[0]["error"]
    rows = metrics(runs[2]["run"])
    steps = [r["step"] for r in rows if "event" not in r]
    # Steps 1-6 ran, step 7 failed, the retry resumed from the step-5 checkpoint: metrics.jsonl was
    # cut back to step 5 (issue #17 item 6), and 6, 7, 8 ran again, each logged once.
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    events = [{k: v for k, v in r.items() if k != "time"} for r in rows if "event" in r]
    assert events == [{"step": 5, "event": "batch_resume", "attempt": 2, "resumed_from": 5}]
    assert not Path(runs[3]["run"]).exists()
    done_before = {i: (Path(runs[i]["run"]) / "metrics.jsonl").read_bytes() for i in (1, 2)}

    # Second call: only prompt 3 runs.
    unet_loads.clear()
    second = run_batch(prompts, preset="smoke", guidance="tiny", overrides=CUT, output_root=out, progress=False)
    assert (second["total"], second["succeeded"], second["skipped"], second["failed"]) == (3, 3, 2, 0)
    assert [r["status"] for r in second["runs"]] == ["skipped", "skipped", "done"]
    for i in (1, 2):
        assert (Path(runs[i]["run"]) / "metrics.jsonl").read_bytes() == done_before[i]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(Path(r["run"]).name for r in second["runs"]), JOURNAL])
    assert len({r["run"] for r in second["runs"]}) == 3
    for r in second["runs"]:
        assert_continued_from_checkpoints(r["run"])
        state = json.loads((Path(r["run"]) / "batch-task.json").read_text())
        assert state["phase"] == "done" and state["prompt"] == r["prompt"]
    assert unet_loads == ["tiny"]
    assert sys.modules["ray"] is None  # still blocked: nothing imported ray (it would have raised)


@pytest.mark.slow
def test_batch_resumes_a_run_stopped_midway_and_applies_each_edit_to_the_avatar(tmp_path):
    from avatar.batch import run_batch, task_folder
    from avatar.config import EditConfig, GenerateConfig, make_config
    from avatar.pipeline.generate import run_generate
    from avatar.workspace import Workspace

    prompts = tmp_path / "heads.txt"
    prompts.write_text("an old sea captain\n")
    edits = tmp_path / "edits.txt"
    edits.write_text("give him a red woollen hat\nmake him smile\n")
    out = tmp_path / "out"
    # A batch killed during step 7 of the first prompt: its folder holds checkpoints up to step 5.
    folder = task_folder(out, "an old sea captain")
    cfg = make_config(GenerateConfig, "smoke", [*CUT, "guidance.model=tiny", "prompt=an old sea captain",
                                                f"output_root={out}"])
    for sub in (folder, folder / "checkpoints", folder / "previews"):
        sub.mkdir(parents=True)
    run_generate(cfg, Workspace(folder), progress=False, stop_after=6)
    (folder / "checkpoints" / "step-00000006.pt").unlink()  # the kill came before step 6's checkpoint

    summary = run_batch(prompts, edits_file=edits, preset="smoke", guidance="tiny",
                        overrides=[*CUT, "edit.fine.steps=2"], output_root=out, progress=False)
    assert (summary["succeeded"], summary["failed"]) == (1, 0)
    run = summary["runs"][0]
    assert run["generate"] == "resumed" and run["resumed_from"] == CHECKPOINT_BEFORE_FAILURE
    assert_continued_from_checkpoints(folder)
    assert len(run["edits"]) == 2
    for path, instruction in zip(run["edits"], ["give him a red woollen hat", "make him smile"]):
        edit = Workspace(path)
        assert Path(path).parent == folder / "edits"
        assert edit.read_info()["kind"] == "edit"
        assert edit.load_config(EditConfig).instruction == instruction
        assert (Path(path) / "checkpoints" / "step-00000002.pt").is_file()
    # Run again: nothing to do, nothing rewritten.
    again = run_batch(prompts, edits_file=edits, preset="smoke", guidance="tiny",
                      overrides=[*CUT, "edit.fine.steps=2"], output_root=out, progress=False)
    assert again["skipped"] == 1 and sorted(p.name for p in (folder / "edits").iterdir()) == \
        sorted(Path(p).name for p in run["edits"])


@pytest.mark.slow
def test_batch_exports_each_avatar_once(tmp_path):
    from avatar.batch import run_batch

    prompts = tmp_path / "heads.txt"
    prompts.write_text("an old sea captain\n")
    kwargs = {"preset": "smoke", "guidance": "tiny", "export_formats": "glb", "output_root": tmp_path / "out",
              "overrides": [*CUT, "export.texture_size=256", "export.faces=2000"], "progress": False}
    summary = run_batch(prompts, **kwargs)
    assert (summary["succeeded"], summary["failed"]) == (1, 0)
    run = Path(summary["runs"][0]["run"])
    glb = run / "export" / "avatar.glb"
    assert glb.is_file() and glb.stat().st_size > 0
    assert list(summary["runs"][0]["exports"]) == [str(run)]
    stamp = glb.stat().st_mtime_ns
    # The task is done: a re-run neither regenerates nor re-exports.
    assert run_batch(prompts, **kwargs)["skipped"] == 1 and glb.stat().st_mtime_ns == stamp
