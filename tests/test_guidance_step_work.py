"""No repeated work inside a score-distillation step of a real run (issue 16): the landmark
control image is drawn once per step, and the prompts are encoded once per run."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("shared_cache", "one_thread"), pytest.mark.slow]


def test_a_generate_step_draws_its_control_image_once_and_never_reencodes_prompts(tmp_path, monkeypatch):
    from avatar.config import GenerateConfig, make_config
    from avatar.guidance.prompts import TextEmbedder
    from avatar.pipeline.generate import GenerateRun
    from avatar.render import control as control_module
    from avatar.workspace import Workspace

    cfg = make_config(GenerateConfig, "smoke", [
        "prompt=a head", "guidance.model=tiny", "prior.spec=anny", "device=cpu", "coarse.steps=2", "fine.steps=2",
        "coarse.normal_warmup_steps=1", "fine.normal_warmup_steps=0", "checkpoint_every=100000",
        "preview_every=100000", "coarse.resolution=16", "coarse.samples_per_ray=24", "fine.resolution=24",
        "fine.dmtet_resolution=12",
    ])
    run = GenerateRun(cfg, Workspace.create(tmp_path / "runs", cfg.prompt), progress=False)
    drawn: list[int] = []
    real = control_module.control_images

    def counting(*args, **kwargs):
        drawn.append(run.step)
        return real(*args, **kwargs)

    monkeypatch.setattr(control_module, "control_images", counting)
    monkeypatch.setattr(TextEmbedder, "__call__", lambda *a, **k: pytest.fail("prompts encoded during the run"))
    steps: list[int] = []
    inner = run.train_step

    def train_step(stage):
        steps.append(run.step)
        return inner(stage)

    monkeypatch.setattr(run, "train_step", train_step)
    assert run.run()["finished"]
    assert len(steps) == 4
    assert drawn == steps  # once per step, no more
    assert torch.is_tensor(run.guidance.predictor.prompts.negative)
