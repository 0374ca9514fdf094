"""A run folder: config, checkpoints, previews, metrics, exports and edits.

Layout (``outputs/<slug>-<YYYYmmdd-HHMMSS>/``)::

    config.yaml        resolved config (plain YAML)
    run.json           command line, seed, versions, git revision, kind, parent run
    run.lock           present while a process writes the run (flock; pid inside)
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
import math
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
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a folder in the way, an interrupt: leave no temp file
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (just the type name for an empty message)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line[:limit]}" if line else type(exc).__name__


class RunLock:
    """An exclusive lock on a run folder: an OS lock (``flock``) on ``run.lock``.

    The kernel holds the lock for as long as the holder keeps the file open, and
    drops it when the holder exits, however it dies: two processes never hold one
    run, and the lock of a dead process is free at once (taken over with a
    warning). The pid, host and start time written inside are information only,
    for the "in use by process N" message. A file naming another host is refused
    (a network filesystem may not share locks between hosts).

    Without ``fcntl`` (not a POSIX system) the lock is the file's exclusive
    creation; a lock left by a dead process must then be deleted by hand.
    """

    def __init__(self, folder: Path):
        self.path = folder / "run.lock"
        self.held = False
        self._fd: int | None = None

    def _info(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _holder_info(self) -> dict[str, Any] | None:
        # The holder writes its pid just after it locks: give a holder that is writing a moment.
        for _ in range(10):
            info = self._info()
            if info is not None:
                return info
            time.sleep(0.02)
        return None

    def _locked_error(self, info: dict[str, Any] | None) -> RunLockedError:
        pid = info.get("pid", "unknown") if info else "unknown"
        host = str(info.get("host", "")) if info else ""
        if host and host != socket.gethostname():
            return RunLockedError(f"run {self.path.parent} is locked by pid {pid} on host '{host}'; if that "
                                  f"process is gone, delete {self.path} and retry")
        return RunLockedError(f"run {self.path.parent} is in use by process {pid}; wait for it to finish or stop "
                              f"it (kill {pid}) and retry")

    def acquire(self) -> None:
        if self.held:
            raise RunLockedError(f"run {self.path.parent} is already locked by this lock")
        try:
            import fcntl
        except ImportError:  # not POSIX
            fcntl = None
        try:
            if fcntl is None:
                self._acquire_exclusive_create()
            else:
                self._acquire_flock(fcntl)
        except OSError as exc:
            raise WorkspaceError(f"cannot lock run {self.path.parent}: {exc.strerror or exc} ({self.path}); "
                                 "the run folder must be writable") from exc

    def _acquire_flock(self, fcntl: Any) -> None:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._locked_error(self._holder_info()) from None
            except BaseException:
                os.close(fd)
                raise
            # A releasing holder unlinks run.lock before it unlocks: a lock on an unlinked
            # (or since replaced) file locks nothing, so check the path still names this file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            return
        raise RunLockedError(f"could not lock {self.path.parent}: the lock keeps changing hands")

    def _take(self, fd: int) -> None:
        """We hold the OS lock on ``fd``: check what the last holder left, write ourselves in."""
        previous = os.read(fd, 4096)
        info = None
        with contextlib.suppress(ValueError):
            info = json.loads(previous) if previous.strip() else None
        if isinstance(info, dict) and str(info.get("host", "")) not in ("", socket.gethostname()):
            raise self._locked_error(info)
        if previous.strip():
            holder = info.get("pid") if isinstance(info, dict) else "unknown"
            warnings.warn(f"taking over the stale lock of {self.path.parent} (holder {holder} is gone)", stacklevel=4)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd, self.held = fd, True

    def _acquire_exclusive_create(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = self._holder_info()
            error = self._locked_error(info)
            raise RunLockedError(f"{error}; if process {info.get('pid') if info else 'unknown'} is gone, "
                                 f"delete {self.path}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        fd, self._fd, self.held = self._fd, None, False
        try:
            if fd is None:  # exclusive-create lock
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                return
            # Unlink while still holding the lock (see _acquire_flock), then unlock by closing.
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.path.unlink()
        finally:
            if fd is not None:
                os.close(fd)

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
        try:
            atomic_write_bytes(self.info_path, json.dumps(info, indent=2, default=_json_default).encode())
        except OSError as exc:
            raise WorkspaceError(f"cannot write {self.info_path} ({_first_line(exc)}): the run folder must be "
                                 "writable, with free space, and run.json a file") from exc
        return info

    def read_info(self) -> dict[str, Any]:
        try:
            info = json.loads(self.info_path.read_text())
        except FileNotFoundError:
            return {}
        except IsADirectoryError as exc:
            raise WorkspaceError(f"{self.info_path} is a folder, not the run's record (a JSON file): move it "
                                 "aside and restore run.json from a backup of the run folder") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkspaceError(f"cannot read {self.info_path} ({_first_line(exc)}); it was left in place") from exc
        except ValueError as exc:
            raise WorkspaceError(f"{self.info_path} is not valid JSON ({_first_line(exc)}); it was left in "
                                 "place: restore it from a backup of the run folder") from exc
        if not isinstance(info, dict):
            raise WorkspaceError(f"{self.info_path} holds a JSON {type(info).__name__}, not the run's record "
                                 "(an object); restore it from a backup of the run folder")
        return info

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
        """Append one JSON line ``{"step": step, "time": ..., **values}``; a NaN or an
        infinity is written as ``null`` (JSON has no such numbers)."""
        record = _finite_or_null({"step": int(step), "time": round(time.time(), 3), **values})
        line = json.dumps(record, allow_nan=False, default=_json_default) + "\n"
        with open(self.metrics_path, "a") as fh:
            fh.write(line)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, step: int) -> int:
        """Keep the records of steps ``<= step`` (a resume from the checkpoint of ``step``
        replays the later ones); a line cut by a kill goes too. Returns the lines dropped."""
        if not self.metrics_path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
            except (ValueError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_bytes(self.metrics_path, "".join(f"{line}\n" for line in kept).encode())
        return dropped

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
        try:
            with open(tmp, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # never leave a half-written temp file behind
                tmp.unlink()
            if isinstance(exc, OSError):  # a full disk, a quota, a folder gone read-only
                latest = self.latest_checkpoint()
                kept = f"the last checkpoint ({latest.name}) is intact" if latest else "no checkpoint was written"
                raise CheckpointError(
                    f"cannot write the checkpoint of step {step} in {self.checkpoints_dir} ({_first_line(exc)}); "
                    f"{kept}: free space there and resume with --resume {self.root}") from exc
            raise
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

    def load_checkpoint(self, path: str | Path | None = None, map_location: str = "cpu",
                        resume: bool = False) -> dict[str, Any]:
        """Load a checkpoint (the latest by default) and return ``{"step", "state", "path"}``.

        resume: the run continues from this checkpoint, so ``metrics.jsonl`` is cut back to
        its step (the later steps are replayed and logged again; see :meth:`truncate_metrics`).
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
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes: its write was cut off); it was left in "
                                  "place. Resume from an earlier checkpoint by moving this one aside.")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
                KeyError, IndexError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt ({_first_line(exc)}); "
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
        if not isinstance(payload.get("step"), int) or not isinstance(payload.get("state"), dict):
            raise CheckpointError(f"checkpoint {path} lacks its step or state; it was left in place. Resume from an "
                                  "earlier checkpoint by moving this one aside.")
        if resume:
            self.truncate_metrics(payload["step"])
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


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinity (float, tensor or numpy scalar) replaced by None."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0 and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _finite_or_null(obj.tolist())
    return obj


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
