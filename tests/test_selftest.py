"""``avatar selftest``: the CPU subset passes through the real command line, every native
check is served by the native kernels themselves, and planted faults are caught (a wrong
reference, a silent fallback to the reference, a missing native build, a crashing check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from avatar.cli import app

pytestmark = pytest.mark.usefixtures("shared_cache")

NATIVE_OPS = {
    "axpy": {"avatar::axpy"},
    "hashgrid": {"avatar::hashgrid_forward", "avatar::hashgrid_backward"},
    "hashgrid table grad": {"avatar::hashgrid_forward", "avatar::hashgrid_backward"},
    "composite": {"avatar::composite_forward", "avatar::composite_backward"},
    "march": {"avatar::occupancy_march"},
    "rasterize": {"avatar::rasterize_fwd"},
    "interpolate": {"avatar::interpolate_fwd", "avatar::interpolate_grad_rast"},
    "antialias": {"avatar::antialias_analysis"},
}
CPU_CHECKS = ["native build", *NATIVE_OPS, "generate tiny", "generate oracle", "sds fp32", "sds attention slicing"]
TIMED_STEPS = [f"sds step {enc} {prec}" for prec in ("fp32", "fp16", "bf16") for enc in ("sd", "tiny-ae")]
CUDA_ONLY = ["hashgrid fp16 table", "nvdiffrast", "tiny-cuda-nn", "sds fp16", "sds cpu offload", *TIMED_STEPS]


def selftest(*args: str):
    """The command in this process (so monkeypatches apply); returns (exit code, report or None, result)."""
    result = CliRunner().invoke(app, ["selftest", *args])
    json_out = "--json" in args and result.stdout.strip().startswith("{")
    return result.exit_code, json.loads(result.stdout) if json_out else None, result


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.slow
def test_cpu_subset_passes_with_native_kernels_serving():
    """The CI run: the whole CPU subset through the installed command line, as JSON."""
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "selftest", "--json", "--device", "cpu"],
                         capture_output=True, text=True, timeout=900, env={**os.environ})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(out.stdout)
    assert report["ok"] is True
    checks = by_name(report)
    assert list(checks) == CPU_CHECKS
    assert report["summary"] == {**report["summary"], "pass": len(CPU_CHECKS), "fail": 0, "skip": 0}
    for name, check in checks.items():
        assert check["device"] == "cpu" and check["status"] == "pass", check
        for comparison in check["comparisons"]:
            assert comparison["ok"] and comparison["error"] <= comparison["tolerance"], (name, comparison)
    for name, ops in NATIVE_OPS.items():
        check = checks[name]
        assert ops <= set(check["native_ops"]), (name, check["native_ops"])
        assert check["comparisons"], name
        assert check["native_seconds"] > 0 and check["reference_seconds"] > 0 and check["speedup"] > 0
    assert report["environment"]["native"]["state"] == "built"
    for name in ("generate tiny", "generate oracle"):
        notes = " ".join(checks[name]["notes"])
        assert "coarse loss" in notes and "fine loss" in notes and "moved" in notes


@pytest.mark.cuda  # it skips where a CUDA device is present
def test_cuda_only_checks_are_skipped_with_a_reason_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: these checks run")
    code, report, result = selftest("--json", *[f"--only={name}" for name in CUDA_ONLY])
    assert code == 0, result.output
    checks = by_name(report)
    assert set(checks) == set(CUDA_ONLY)
    for check in checks.values():
        assert check["status"] == "skip" and check["device"] == "cuda"
        assert "no CUDA device" in check["reason"]


def test_timed_steps_run_one_sds_step_per_encoder_and_report_it_against_the_floor(one_thread):
    """What ``sds step <encoder> <precision>`` does on a GPU, run here with the tiny models in
    place of SD 1.5's (the checks themselves are CUDA-only, listed as skipped above)."""
    from avatar.guidance.tiny import TINY_IMAGE_SIZE, build_tiny_components
    from avatar.selftest.core import context_for
    from avatar.selftest.pipeline_checks import timed_sds_step

    c = build_tiny_components(0)
    models = {"unet": c["unet"], "controlnet": c["controlnets"]["controlnet-landmark"], "vae": c["vae"],
              "tiny_ae": c["tiny_ae"]}
    for m in models.values():
        m.requires_grad_(False)
    ctx = context_for(torch.device("cpu"))
    for encoder in ("sd", "tiny-ae"):
        outcome = timed_sds_step(ctx, encoder, "fp32", models=models, resolution=TINY_IMAGE_SIZE)
        notes = dict(n.split("=") for n in outcome.notes)
        assert set(notes) == {"step_ms", "floor_ms", "step_over_floor"}
        assert float(notes["step_ms"]) > 0 and float(notes["floor_ms"]) > 0
        assert ("TAESD" in outcome.size) == (encoder == "tiny-ae")
        assert outcome.native_seconds > 0


def test_a_wrong_reference_fails_the_command(monkeypatch):
    from avatar.ops.reference import compositing

    honest = compositing.composite_rays

    def planted(*args, **kwargs):
        out = honest(*args, **kwargs)
        return out._replace(weights=out.weights * 1.001)  # 0.1%: far above the 1e-5 tolerance

    monkeypatch.setattr(compositing, "composite_rays", planted)
    code, report, result = selftest("--json", "--device", "cpu", "--only", "composite")
    assert code == 1, result.output
    assert report["ok"] is False and report["summary"]["fail"] == 1
    (check,) = report["checks"]
    assert check["name"] == "composite" and check["status"] == "fail"
    assert check["error"] > check["tolerance"] and check["reason"].startswith("weights: ")
    failed = {c["what"] for c in check["comparisons"] if not c["ok"]}
    assert "weights" in failed and not failed & {"opacity", "depth", "colour"}  # only what was planted


def test_a_silent_fallback_to_the_reference_is_caught(monkeypatch):
    """Values would match perfectly; the check must still fail because no native kernel ran."""
    import avatar.ops.hashgrid as hashgrid

    monkeypatch.setattr(hashgrid, "resolve_engine", lambda *args, **kwargs: "torch")
    code, report, result = selftest("--json", "--device", "cpu", "--only", "hashgrid table grad")
    assert code == 1, result.output
    (check,) = report["checks"]
    assert check["status"] == "fail"
    assert "did not serve" in check["reason"] and "avatar::hashgrid_forward" in check["reason"]


def test_without_the_native_build_native_checks_fail_with_the_reason(monkeypatch):
    monkeypatch.setenv("AVATAR_NO_NATIVE", "1")
    code, report, result = selftest("--json", "--device", "cpu", "--only", "native build", "--only", "axpy")
    assert code == 1, result.output
    checks = by_name(report)
    assert set(checks) == {"native build", "axpy"}
    for check in checks.values():
        assert check["status"] == "fail" and "AVATAR_NO_NATIVE" in check["reason"], check


def test_an_error_inside_a_check_is_one_failure_not_a_crash(monkeypatch):
    import avatar.ops.raster as raster

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure\nwith a second line")

    monkeypatch.setattr(raster, "interpolate", broken)
    code, report, result = selftest("--json", "--device", "cpu", "--only", "interpolate", "--only", "axpy")
    assert code == 1, result.output
    checks = by_name(report)
    assert checks["axpy"]["status"] == "pass"
    assert checks["interpolate"]["status"] == "fail"
    assert checks["interpolate"]["reason"] == "RuntimeError: planted failure"
    assert "second line" in checks["interpolate"]["detail"]


def test_table_for_people():
    code, _, result = selftest("--device", "cpu", "--only", "axpy")
    assert code == 0, result.output
    for text in ("axpy", "cpu", "pass", "speed-up", "1 passed, 0 failed"):
        assert text in result.stdout, result.stdout


def test_an_absent_device_is_a_clear_error():
    from avatar.errors import AvatarError

    result = CliRunner().invoke(app, ["selftest", "--device", "cuda:99"])
    assert isinstance(result.exception, AvatarError)
    assert "not present" in str(result.exception) or "no CUDA device" in str(result.exception)
