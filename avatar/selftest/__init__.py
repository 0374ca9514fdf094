"""``avatar selftest``: prove this machine's engines right, on every device present.

On each device (``cpu`` always, each ``cuda:i`` present): every native op against its
PyTorch reference in values and gradients, with its speed against the reference;
nvdiffrast and tiny-cuda-nn against ours where installed; a few steps of a tiny and
of an oracle generation; one score-distillation backward through the VAE in each
memory mode; and on CUDA one timed score-distillation step of SD 1.5's architectures per
image encoder (SD's VAE, TAESD) and precision (fp32, fp16, bf16), against its floor. CUDA
runs production sizes (2^24 points, 2^22-point table gradients, screen-filling and w < 0
triangles at 2048^2); the CPU subset is sized to run in about
a minute on two cores, and CI runs it. No network is used.

:func:`run_selftest` returns the report (a dict, what ``--json`` prints);
:func:`render_report` prints it as a table. The report's ``ok`` is False when any check
failed; a check is skipped only when something it needs is not installed or not present.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from avatar.selftest.core import FAIL, PASS, SKIP, CheckResult, CheckSpec

__all__ = ["available_devices", "check_names", "render_report", "run_selftest"]


def _checks() -> list[CheckSpec]:
    from avatar.selftest import ops_checks as o
    from avatar.selftest import pipeline_checks as p

    return [
        CheckSpec("native build", _check_native_build, description="the native extension loads for this device"),
        CheckSpec("axpy", o.check_axpy),
        CheckSpec("hashgrid", o.check_hashgrid, description="hash-grid encoding: values and point gradients"),
        CheckSpec("hashgrid table grad", o.check_hashgrid_table_grad),
        CheckSpec("hashgrid fp16 table", o.check_hashgrid_fp16, cuda_only=True),
        CheckSpec("composite", o.check_composite, description="ray compositing with early termination"),
        CheckSpec("march", o.check_march, description="occupancy-grid ray marching"),
        CheckSpec("rasterize", o.check_rasterize),
        CheckSpec("interpolate", o.check_interpolate),
        CheckSpec("antialias", o.check_antialias),
        CheckSpec("nvdiffrast", o.check_nvdiffrast, cuda_only=True),
        CheckSpec("tiny-cuda-nn", o.check_tcnn, cuda_only=True),
        CheckSpec("generate tiny", p.check_generate_tiny),
        CheckSpec("generate oracle", p.check_generate_oracle),
        CheckSpec("sds fp32", p.check_sds_fp32),
        CheckSpec("sds attention slicing", p.check_sds_slicing),
        CheckSpec("sds fp16", p.check_sds_fp16, cuda_only=True),
        CheckSpec("sds cpu offload", p.check_sds_offload, cuda_only=True),
        *[CheckSpec(name, fn, cuda_only=True, description="one timed SDS step of SD 1.5's architectures")
          for name, fn in p.TIMED_STEP_CHECKS],
    ]


def check_names() -> list[str]:
    """Every check's name, in running order (what ``--only`` matches against)."""
    return [spec.name for spec in _checks()]


def _check_native_build(ctx: Any) -> Any:
    from avatar.selftest.core import Outcome, native_module

    module = native_module(ctx.device)
    return Outcome([], notes=[f"loaded {getattr(module, '__file__', module.__name__)}"
                              + (" (with CUDA)" if getattr(module, "with_cuda", False) else "")])


# ---------------------------------------------------------------------------
# Devices and environment


def available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


def resolve_devices(requested: Sequence[str] | None) -> list[str]:
    """``None`` -> every device present; else each name checked (``cuda`` means every CUDA device)."""
    from avatar.errors import AvatarError

    present = available_devices()
    if not requested:
        return present
    out: list[str] = []
    for name in requested:
        name = name.strip().lower()
        if name == "cuda":
            found = [d for d in present if d.startswith("cuda:")]
            if not found:
                raise AvatarError("--device cuda: no CUDA device is present (torch.cuda.is_available() is False)")
            out += found
        elif name in present:
            out.append(name)
        else:
            raise AvatarError(f"--device {name}: not present here; choose from {', '.join(present)}")
    return list(dict.fromkeys(out))


def environment(devices: Sequence[str]) -> dict[str, Any]:
    import torch

    from avatar import __version__, _native
    from avatar.ops.engine import module_present

    described = []
    for name in devices:
        if name == "cpu":
            described.append({"name": "cpu", "description": platform.processor() or platform.machine(),
                              "threads": torch.get_num_threads()})
        else:
            index = int(name.split(":")[1])
            props = torch.cuda.get_device_properties(index)
            described.append({"name": name, "description": props.name,
                              "memory_gib": round(props.total_memory / 2**30, 1),
                              "capability": f"{props.major}.{props.minor}"})
    status = _native.status()
    return {
        "avatar": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "devices": described,
        "native": {"state": status.state, "reason": status.reason, "with_cuda": status.with_cuda},
        "optional": {name: module_present(mod) for name, mod in
                     (("nvdiffrast", "nvdiffrast"), ("tiny-cuda-nn", "tinycudann"), ("accelerate", "accelerate"))},
    }


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No network: the hub libraries' offline switches, restored afterwards."""
    keys = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _matches(name: str, only: Sequence[str] | None) -> bool:
    return not only or any(o.strip().lower() in name for o in only)


def run_selftest(devices: Sequence[str] | None = None, only: Sequence[str] | None = None,
                 on_start: Callable[[str, str], None] | None = None,
                 on_result: Callable[[CheckResult], None] | None = None) -> dict[str, Any]:
    """Run the checks on ``devices`` (default: every device present); ``only``: keep checks whose
    name contains one of these strings. Returns the report (see the module docstring)."""
    import torch

    from avatar.selftest.core import context_for, run_check

    started = time.perf_counter()
    explicit = bool(devices)
    names = resolve_devices(devices)
    specs = [s for s in _checks() if _matches(s.name, only)]
    results: list[CheckResult] = []
    with _offline():
        for name in names:
            ctx = context_for(torch.device(name))
            for spec in specs:
                if spec.cuda_only and not ctx.is_cuda:
                    continue
                if on_start:
                    on_start(spec.name, name)
                result = run_check(spec, ctx)
                results.append(result)
                if on_result:
                    on_result(result)
            ctx.cache.clear()
        if not torch.cuda.is_available() and not explicit:
            for spec in specs:
                if spec.cuda_only:
                    result = CheckResult(spec.name, "cuda", SKIP, "no CUDA device (torch.cuda.is_available() is False)")
                    results.append(result)
                    if on_result:
                        on_result(result)
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    return {
        "environment": environment(names),
        "checks": [r.to_dict() for r in results],
        "summary": {**counts, "total": len(results), "seconds": round(time.perf_counter() - started, 2)},
        "ok": counts[FAIL] == 0,
    }


# ---------------------------------------------------------------------------
# The table


def _fmt_error(check: dict[str, Any]) -> tuple[str, str]:
    error, tol = check.get("error"), check.get("tolerance")
    if error is None:
        return "", ""
    worst = max(check["comparisons"], key=lambda c: _ratio(c))
    kind = "" if worst["kind"] == "relative" else " frac"
    err = error if isinstance(error, str) else (f"{error:.1e}" if error else "0")
    return f"{err}{kind}", f"{tol:.0e}" if tol else "0"


def _ratio(c: dict[str, Any]) -> float:
    error = c["error"]
    if isinstance(error, str):
        return float("inf")
    return error / c["tolerance"] if c["tolerance"] else (0.0 if error == 0 else float("inf"))


def render_report(report: dict[str, Any], file: Any = None) -> None:
    """Print the report as a table (rich) with the environment above and the summary below."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    if not console.is_terminal:  # logs and pipes: wide enough for one line per check
        console = Console(file=file or sys.stdout, width=150)
    env = report["environment"]
    devices = ", ".join(f"{d['name']} ({d['description']})" for d in env["devices"])
    console.print(f"avatar {env['avatar']}  torch {env['torch']}  CUDA {env['cuda'] or '-'}  devices: {devices}")
    console.print(f"native extension: {env['native']['state']} ({env['native']['reason']})")
    table = Table(show_lines=False, header_style="bold")
    for column, justify in (("check", "left"), ("device", "left"), ("status", "left"), ("max error", "right"),
                            ("tolerance", "right"), ("seconds", "right"), ("speed-up", "right"),
                            ("size / reason", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    styles = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
    for check in report["checks"]:
        err, tol = _fmt_error(check)
        speed = f"{check['speedup']:.1f}x" if check.get("speedup") else ""
        status = check["status"]
        info = check["reason"] if status != PASS else check.get("size", "")
        table.add_row(check["name"], check["device"], f"[{styles[status]}]{status}[/]", err, tol,
                      f"{check['seconds']:.1f}", speed, info)
    console.print(table)
    s = report["summary"]
    verdict = "[green]all checks passed[/]" if report["ok"] else "[bold red]SOME CHECKS FAILED[/]"
    console.print(f"{s['pass']} passed, {s['fail']} failed, {s['skip']} skipped in {s['seconds']:.0f} s: {verdict}")
