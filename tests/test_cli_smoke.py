"""Acceptance of ``avatar generate`` at the command line with the exact smoke preset (issue 7)."""

from __future__ import annotations

import json

import pytest

from avatar.config import GenerateConfig
from avatar.pipeline.artifact import load_avatar
from avatar.workspace import Workspace

pytestmark = pytest.mark.slow


def test_tiny_smoke_generate_leaves_a_full_run_folder(smoke_run):
    # The time it takes is printed for the record; its goal (five minutes) is measured in
    # benchmarks/, never asserted in a test.
    run, seconds = smoke_run
    print(f"avatar generate --guidance tiny --preset smoke: {seconds:.0f} s")
    ws = Workspace.open(run)
    cfg = ws.load_config(GenerateConfig)
    assert cfg.preset == "smoke" and cfg.guidance.model == "tiny" and cfg.prompt == "an old sea captain"
    info = json.loads(ws.info_path.read_text())
    assert info["kind"] == "generate" and info["guidance"] == "tiny" and info["seed"] == 0
    total = cfg.coarse.steps + cfg.fine.steps
    rows = [r for r in ws.read_metrics() if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert {r["stage"] for r in rows} == {"coarse", "fine"}
    assert ws.latest_checkpoint().name == f"step-{total:08d}.pt"
    previews = sorted(p.name for p in ws.previews_dir.glob("*.png"))
    assert f"coarse-step-{cfg.coarse.steps:08d}.png" in previews and f"fine-step-{total:08d}.png" in previews
    avatar = load_avatar(run)
    assert avatar.has_fine and avatar.faces.shape[0] > 500
