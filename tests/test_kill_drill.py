"""The kill -9 and resume drill (``benchmarks/kill_drill.py``, issue 17) on two moments: a
SIGKILL during the coarse stage and at the coarse -> fine hand-over, each resumed with
``avatar generate --resume RUN``, must end bit-identical to the uninterrupted run, losing
at most one checkpoint interval of steps. The whole six-moment drill is the script's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY = 5

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_cache")]


def test_kill_during_coarse_and_at_the_hand_over_resumes_bit_identical(tmp_path):
    drill = tmp_path / "drill"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kill_drill.py"), "--moments", "coarse,handover",
         "--coarse-steps", "20", "--fine-steps", "10", "--checkpoint-every", str(CHECKPOINT_EVERY),
         "--keep", str(drill)],
        capture_output=True, text=True, timeout=900)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    print(json.dumps(report["moments"]))
    assert "error" not in report, report["error"]
    by_moment = {m["moment"]: m for m in report["moments"]}
    assert set(by_moment) == {"coarse", "handover"}
    for name, moment in by_moment.items():
        assert "missed" not in moment, f"{name}: {moment['missed']}"
        assert moment["resume_exit_code"] == 0, f"{name}: {moment.get('resume_error')}"
        assert moment["bit_identical"], f"{name}: differs from the uninterrupted run in {moment['differences']}"
        assert 30 in moment["checkpoints_compared"]  # the final checkpoint, with the final mesh
        (kill,) = moment["kills"]
        assert kill["resumed_from_step"] is not None and 0 <= kill["steps_lost"] <= CHECKPOINT_EVERY
        assert moment["temp_files_left"] == []
    coarse = by_moment["coarse"]["kills"][0]
    assert CHECKPOINT_EVERY <= coarse["resumed_from_step"] <= coarse["killed_at_step"] < 20  # killed in coarse
    handover = by_moment["handover"]["kills"][0]
    assert handover["resumed_from_step"] == 20  # resumed from the coarse stage's last checkpoint
    assert report["ok"] and proc.returncode == 0
