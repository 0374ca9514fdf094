"""The command line: fast help, doctor report, clear errors, honest placeholders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

AVATAR = [sys.executable, "-m", "avatar.cli"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*AVATAR, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_help_lists_commands():
    # How fast --help is belongs to a benchmark, not a test: a loaded machine is slow.
    out = run("--help")
    assert out.returncode == 0, out.stderr
    for command in ("generate", "edit", "export", "preview", "import", "batch", "doctor", "prior", "selftest"):
        assert command in out.stdout


def test_doctor_json_is_valid_and_engines_have_reasons(tmp_path):
    out = run("doctor", "--json", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["python"] == sys.version.split()[0]
    assert report["device"]["type"] in ("cpu", "cuda")
    for name in ("native_cpu", "native_cuda", "nvdiffrast", "tiny_cuda_nn"):
        entry = report["engines"][name]
        assert isinstance(entry["available"], bool)
        assert isinstance(entry["reason"], str) and (entry["available"] or entry["reason"])
    assert report["head_priors"]["anny"]["available"] is True
    assert report["guidance_weights"]["tiny"]["available"] is True
    assert report["disk"]["free_gb"] > 0


def test_doctor_reports_disabled_native(tmp_path):
    out = run("doctor", "--json", "--out", str(tmp_path), env={"AVATAR_NO_NATIVE": "1"})
    entry = json.loads(out.stdout)["engines"]["native_cpu"]
    assert entry == {"available": False, "reason": "disabled: AVATAR_NO_NATIVE=1 is set"}


def test_doctor_human_output(tmp_path):
    out = run("doctor", "--out", str(tmp_path))
    assert out.returncode == 0 and "engines" in out.stdout and "native_cpu" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "  "], "the prompt is empty"),
    (["generate", "x", "--set", "coarse.step=3"], "did you mean 'coarse.steps'"),
    (["generate", "x", "--preset", "turbo"], "unknown preset 'turbo'"),
    (["generate", "--prompts", "no-such-file.txt"], "prompts file no-such-file.txt does not exist"),
    (["edit", "no-such-run", "add a hat"], "run folder no-such-run does not exist"),
    (["export", "no-such-run"], "run folder no-such-run does not exist"),
    (["import", "no-such-mesh.obj"], "mesh file no-such-mesh.obj does not exist"),
])
def test_user_errors_are_one_clear_line(args, message):
    out = run(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_import_of_a_mesh_that_is_no_head_fails_clearly_and_writes_nothing(tmp_path):
    mesh = tmp_path / "head.obj"
    mesh.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    out = run("import", str(mesh), "--out", str(tmp_path / "outputs"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "holds no triangles" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()
