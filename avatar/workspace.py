"""A run folder: config, checkpoints, previews, metrics, exports and edits.

Layout (``outputs/<slug>-<YYYYmmdd-HHMMSS>/``)::

    config.yaml        resolved config (plain YAML)
    run.json           command line, seed, versions, git revision, kind, parent run
    run.lock           present while a process writes the run
    metrics.jsonl      one JSON object per logged step
    checkpoints/       step-00000500.pt ... (atomic writes, last N kept)
    previews/          image grids every N steps
    export/            avatar.glb, avatar.obj + textures, turntable.mp4
    edits/<slug>-<timestamp>/   one run folder per edit (the source is never modified)

Nothing a user made is deleted or overwritten: checkpoints are written to a temp
file, flushed and renamed; a bad checkpoint gives an error and stays in place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import socket
import subprocess
import sys
import time
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from avatar.errors import AvatarError

CHECKPOINT_FORMAT = "avatar-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")


class WorkspaceError(AvatarError, RuntimeError):
    """A run folder problem; the message names the cause and the fix."""


class CheckpointError(WorkspaceError):
    """A checkpoint is missing, truncated, foreign or from a newer avatar."""


class RunLockedError(WorkspaceError):
    """Another live process is writing this run."""


def slugify(text: str, max_len: int = 40) -> str:
    """``"An old sea captain!"`` -> ``"an-old-sea-captain"`` (ASCII, never empty)."""
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", norm.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "avatar"


def timestamp(now: _dt.datetime | None = None) -> str:
    return (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class RunLock:
    """An exclusive lock on a run folder (``run.lock`` holding pid, host and time).

    A lock left by a dead process on this host is stale: it is taken over with a
    warning. A live holder, or a holder on another host, is an error.
    """

    def __init__(self, folder: Path):
        self.path = folder / "run.lock"
        self.held = False

    def _info(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise RunLockedError(f"could not lock {self.path.parent}: the lock keeps changing hands")

    def _handle_existing(self) -> None:
        info = self._info()
        if info is None:
            # Empty or half-written: its writer died between create and write, or
            # is writing right now. Give a live writer a moment before calling it stale.
            time.sleep(0.2)
            info = self._info()
        if info is not None:
            pid, host = int(info.get("pid", -1)), str(info.get("host", ""))
            if host and host != socket.gethostname():
                raise RunLockedError(
                    f"run {self.path.parent} is locked by pid {pid} on host '{host}'; if that process "
                    f"is gone, delete {self.path} and retry"
                )
            if pid > 0 and _pid_alive(pid):
                raise RunLockedError(
                    f"run {self.path.parent} is in use by process {pid}; wait for it to finish or stop it "
                    f"(kill {pid}) and retry"
                )
        warnings.warn(f"taking over the stale lock of {self.path.parent} "
                      f"(holder {info.get('pid') if info else 'unknown'} is gone)", stacklevel=3)
        # Rename first so that only one of two competing takers removes it.
        grave = self.path.with_name(f".run.lock.stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, grave)
            grave.unlink()

    def release(self) -> None:
        if self.held:
            info = self._info()
            if info is not None and info.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Workspace:
    """One run folder. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info_path(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def previews_dir(self) -> Path:
        return self.root / "previews"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def edits_dir(self) -> Path:
        return self.root / "edits"

    # -- life cycle ------------------------------------------------------------
    @classmethod
    def create(cls, parent: str | Path, name: str, now: _dt.datetime | None = None) -> Workspace:
        """Make ``parent/<slug(name)>-<timestamp>`` (suffixed ``-2``, ``-3``... if taken)."""
        parent = Path(parent)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(f"cannot create the output folder {parent}: {exc.strerror}; "
                                 "pass --out to a writable folder") from exc
        base = f"{slugify(name)}-{timestamp(now)}"
        for i in range(1, 1000):
            root = parent / (base if i == 1 else f"{base}-{i}")
            try:
                root.mkdir()
            except FileExistsError:
                continue
            ws = cls(root)
            for sub in (ws.checkpoints_dir, ws.previews_dir):
                sub.mkdir()
            return ws
        raise WorkspaceError(f"too many runs named {base} in {parent}")

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        """Open an existing run folder, checking it is one."""
        root = Path(path)
        if not root.is_dir():
            raise WorkspaceError(f"run folder {root} does not exist: pass the folder printed by "
                                 "'avatar generate' (under outputs/)")
        ws = cls(root)
        if not ws.config_path.is_file() and not ws.info_path.is_file():
            raise WorkspaceError(f"{root} is not an avatar run folder (no config.yaml or run.json)")
        return ws

    def lock(self) -> RunLock:
        return RunLock(self.root)

    # -- records ---------------------------------------------------------------
    def write_info(self, kind: str, seed: int, argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        """Record what made this run: kind, command line, seed, versions, git revision."""
        from avatar import __version__

        info = {
            "kind": kind,
            "avatar_version": __version__,
            "checkpoint_version": CHECKPOINT_VERSION,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": list(sys.argv if argv is None else argv),
            "seed": seed,
            "host": socket.gethostname(),
            "versions": package_versions(),
            "git_revision": git_revision(),
            **extra,
        }
        atomic_write_bytes(self.info_path, json.dumps(info, indent=2).encode())
        return info

    def read_info(self) -> dict[str, Any]:
        try:
            return json.loads(self.info_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise WorkspaceError(f"{self.info_path} is not valid JSON ({exc}); it was left in place") from exc

    def save_config(self, cfg: Any) -> None:
        from avatar.config import save_config

        save_config(cfg, self.config_path)

    def load_config(self, cls: type) -> Any:
        """The run's saved config; :class:`~avatar.config.ConfigError` (one line, naming the
        file) if it is missing, unreadable or garbled: it is never replaced by defaults."""
        from avatar.config import ConfigError, load_config

        if not self.config_path.is_file():
            raise ConfigError(f"{self.config_path} is missing: it records the run's settings, which resume, edit "
                              "and export need; restore it from a backup of the run folder")
        return load_config(cls, self.config_path)

    def log_metrics(self, step: int, **values: Any) -> None:
        """Append one JSON line ``{"step": step, "time": ..., **values}``."""
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    # -- checkpoints ---------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if _CKPT_RE.match(p.name)]
        return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, state: dict[str, Any], step: int, keep: int = 3) -> Path:
        """Write ``state`` atomically as ``step-XXXXXXXX.pt`` and keep the last ``keep``."""
        import torch

        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._remove_dead_temp_files()
        path = self.checkpoints_dir / f"step-{step:08d}.pt"
        tmp = self.checkpoints_dir / f".{path.name}.tmp-{os.getpid()}"
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step), "state": state}
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.checkpoints_dir)
        if keep > 0:
            for old in self.checkpoints()[:-keep]:
                old.unlink()
        return path

    def _remove_dead_temp_files(self) -> None:
        for tmp in self.checkpoints_dir.glob(".step-*.pt.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def load_checkpoint(self, path: str | Path | None = None, map_location: str = "cpu") -> dict[str, Any]:
        """Load a checkpoint (the latest by default) and return ``{"step", "state"}``.

        Raises :class:`CheckpointError` naming the file and the fix; never deletes it.
        """
        import pickle
        import zipfile

        import torch

        if path is None:
            path = self.latest_checkpoint()
            if path is None:
                raise CheckpointError(f"run {self.root} has no checkpoint yet: start it again without --resume")
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                f"it was left in place. Resume from an earlier checkpoint by moving this one aside."
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not an avatar checkpoint (no '{CHECKPOINT_FORMAT}' header)")
        version = payload.get("version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{path} was written by a newer avatar (checkpoint version {version}, this one reads "
                f"{CHECKPOINT_VERSION}): upgrade avatar to resume or edit it"
            )
        return {"step": payload["step"], "state": payload["state"], "path": path}

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, oldest first ([] if it does not exist); a line cut
    by a crash or a kill, or one that is not an object, is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                rows.append(record)
    return rows


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot log {type(obj).__name__} as JSON")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a run's result."""
    from importlib import metadata

    names = ("torch", "numpy", "diffusers", "transformers", "anny", "trimesh")
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision() -> str | None:
    """The source checkout's commit (with ``+dirty``), or None outside a checkout."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


@contextlib.contextmanager
def locked(ws: Workspace) -> Iterator[Workspace]:
    """``with locked(ws):`` holds the run's lock for the block."""
    with ws.lock():
        yield ws
