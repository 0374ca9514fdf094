"""``avatar batch --ray local`` on a local Ray cluster of 2 CPUs (the issue's acceptance).

Four prompts, smoke preset with tiny guidance, cut to the test sizes (tests/support.py
TINY_SIZES, 4 coarse + 4 fine steps, checkpoints at steps 0, 4, 5 and 8). Two worker
actors (one per CPU) start in fresh processes, so each call of the batch spends most of
its time importing torch and diffusers there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import TINY_SIZES

pytestmark = [pytest.mark.usefixtures("shared_cache"), pytest.mark.slow]

CUT = [*TINY_SIZES, "coarse.steps=4", "fine.steps=4", "checkpoint_every=5", "preview_every=100"]
TOTAL = 8
PROMPTS = ["an old sea captain", "a young elf", "a grumpy dwarf", "a tired knight"]


@pytest.fixture(scope="module")
def ray_cluster(shared_cache):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def metrics(run: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_workers_see_the_drivers_avatar_cache(ray_cluster, shared_cache):
    @ray_cluster.remote(num_cpus=1)
    def cache_dir() -> str | None:
        return os.environ.get("AVATAR_CACHE_DIR")

    assert ray_cluster.get(cache_dir.remote()) == str(shared_cache)


def test_ray_batch_completes_retries_from_checkpoints_and_a_rerun_runs_only_the_missing(ray_cluster, tmp_path):
    from avatar.batch import JOURNAL, run_batch

    prompts = tmp_path / "heads.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    kwargs = {"ray": "local", "preset": "smoke", "guidance": "tiny", "overrides": CUT, "output_root": out,
              "progress": False}

    # First call: prompt 1 fails once at step 7; the batch is stopped after two tasks end,
    # killing the worker that is in the middle of another prompt.
    first = run_batch(prompts, fail_at={1: 7}, stop_after_tasks=2, **kwargs)
    assert first["mode"] == "ray:local" and first["workers"] == 2
    assert (first["succeeded"], first["failed"], first["stopped"]) == (2, 0, 2)
    journal = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    retrying = [r for r in journal if r.get("status") == "retrying"]
    assert [r["index"] for r in retrying] == [1] and "InjectedFailure" in retrying[0]["error"]
    # The retry (on whichever worker was free) resumed from the step-5 checkpoint, not from 0.
    rows = metrics(first["runs"][0]["run"])
    resume = [r for r in rows if r.get("event") == "batch_resume" and r["attempt"] == 2]
    assert len(resume) == 1 and resume[0]["resumed_from"] == 5
    assert [r["step"] for r in rows if "event" not in r][:6] == [1, 2, 3, 4, 5, 6]
    done_first = {r["index"] for r in first["runs"] if r["status"] == "done"}
    assert len(done_first) == 2
    before = {i: (Path(first["runs"][i - 1]["run"]) / "metrics.jsonl").read_bytes() for i in done_first}

    # Second call: only the two missing prompts run; the stopped one resumes its checkpoint.
    second = run_batch(prompts, **kwargs)
    assert (second["total"], second["succeeded"], second["skipped"], second["failed"]) == (4, 4, 2, 0)
    assert {r["index"] for r in second["runs"] if r["status"] == "skipped"} == done_first
    for i in done_first:
        assert (Path(second["runs"][i - 1]["run"]) / "metrics.jsonl").read_bytes() == before[i]
    folders = [Path(r["run"]) for r in second["runs"]]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f.name for f in folders), JOURNAL])
    assert len(set(folders)) == 4 and all(f.parent == out for f in folders)
    for run in second["runs"]:
        rows = metrics(run["run"])
        for i, row in enumerate(rows):
            if row.get("event") == "batch_resume":  # each resume continues after its checkpoint
                assert rows[i + 1]["step"] == row["resumed_from"] + 1
        assert rows[-1]["step"] == TOTAL
        assert (Path(run["run"]) / "checkpoints" / f"step-{TOTAL:08d}.pt").is_file()
    ran = [r for r in second["runs"] if r["status"] == "done"]
    assert len({(r["host"], r["pid"]) for r in ran}) <= 2  # the tasks ran in the two worker actors
