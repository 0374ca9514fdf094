"""Issue #17 item 13: a guidance whose predictions are non-finite is noticed. Its NaNs are
zeroed in the gradient (fp16 overflow must not poison the field), so without a count a run
would "finish" having learned nothing. Learning rates of NaN or infinity are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from support import oracle_sphere_guidance, tiny_run_config

from avatar.pipeline.generate import GenerateError, run_generate, validate_config
from avatar.workspace import Workspace


def poisoned(cfg, share: float):
    """The sphere oracle with ``share`` of every prediction replaced by NaN (1: all of it)."""
    guidance = oracle_sphere_guidance(cfg)
    inner = guidance.predictor

    def predictor(x_t, t, batch):
        eps = inner(x_t, t, batch).contiguous().clone()
        flat = eps.view(-1)
        flat[: int(round(share * flat.numel()))] = float("nan")
        return eps

    guidance.predictor = predictor
    return guidance


def test_the_guidance_reports_its_non_finite_share_and_zeroes_it():
    cfg = tiny_run_config(None, 1)
    guidance = poisoned(cfg, 0.25)
    from avatar.render.cameras import orbit_cameras

    cams = orbit_cameras(1, elevation=0.0, radius=1.3, fov_y=40.0, resolution=16)
    images = torch.rand(1, 16, 16, 3, requires_grad=True)
    out = guidance.score_distillation(images, cams)
    assert float(out.extras["nonfinite"]) == pytest.approx(0.25, abs=0.01)
    assert torch.isfinite(out.grad).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(images.grad).all()


def test_a_stage_of_wholly_non_finite_guidance_stops_with_a_clear_error(tmp_path, one_thread):
    cfg = tiny_run_config(tmp_path, 3)
    ws = Workspace.create(tmp_path, "nan-guidance")
    with pytest.warns(UserWarning, match="NaN or infinite") as record, \
            pytest.raises(GenerateError, match=r"only NaN or infinite values for 3 steps.*half_precision"):
        run_generate(cfg, ws, guidance=poisoned(cfg, 1.0), progress=False)
    assert sum("NaN or infinite" in str(w.message) for w in record) == 1  # warned once
    assert ws.latest_checkpoint() is not None  # what was saved stays


def test_some_non_finite_values_warn_once_and_the_run_goes_on(tmp_path, one_thread):
    cfg = tiny_run_config(tmp_path, 3)
    ws = Workspace.create(tmp_path, "some-nan")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = run_generate(cfg, ws, guidance=poisoned(cfg, 0.1), progress=False)
    assert summary["finished"]
    assert sum("NaN or infinite" in str(w.message) for w in record) == 1
    metrics = [line for line in ws.metrics_path.read_text().splitlines() if '"sds_nonfinite"' in line]
    assert len(metrics) == 6  # logged every step, as a number


@pytest.mark.parametrize("key", ["coarse.lr", "coarse.lr_mlp", "fine.lr", "fine.texture_lr"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1e-3])
def test_learning_rates_must_be_finite_and_positive(tmp_path, key, value):
    cfg = tiny_run_config(tmp_path, 1)
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(GenerateError, match=rf"{key} must be a finite number > 0"):
        validate_config(cfg)


def test_a_nan_learning_rate_is_one_line_at_the_command_line(tmp_path, monkeypatch, capsys):
    import sys

    from avatar import cli

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["avatar", "generate", "a head", "--preset", "smoke", "--guidance", "tiny",
                                      "--out", str(out), "--set", "coarse.lr=nan"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and "coarse.lr must be a finite number > 0" in lines[0], lines
    assert not out.exists() or not any(out.iterdir())  # nothing written
