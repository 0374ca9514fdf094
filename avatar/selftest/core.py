"""The machinery of ``avatar selftest``: check results, comparisons, timing, the proof
that a native kernel served a call, input sizes per device, and the runner.

A check is a function ``(ctx: DeviceContext) -> Outcome``. It raises :class:`Skip`
only for something not installed or not present, :class:`CheckFailed` for a failure
it diagnoses itself; any other exception is caught by :func:`run_check` and becomes
a failure with a one-line reason. A check passes when every :class:`Comparison` in
its outcome is within its tolerance.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PASS, FAIL, SKIP = "pass", "fail", "skip"


class Skip(Exception):
    """The check cannot run here: something is not installed or not present (the message says what)."""


class CheckFailed(Exception):
    """The check ran and found a problem it can name (the message says what)."""


@dataclass
class Comparison:
    """One quantity compared against its reference.

    error: ``max |got - want| / max |want|`` over the compared elements (``relative``), or
    the fraction of elements that differ (``fraction``, for ids and sample lists).
    """

    what: str
    error: float
    tolerance: float
    kind: str = "relative"

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance

    @property
    def ratio(self) -> float:
        if not math.isfinite(self.error):
            return math.inf
        return self.error / self.tolerance if self.tolerance > 0 else (0.0 if self.error == 0 else math.inf)

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "error": _json_float(self.error), "tolerance": self.tolerance,
                "kind": self.kind, "ok": self.ok}


@dataclass
class Outcome:
    """What a check found. ``native_seconds`` / ``reference_seconds``: one call (forward and
    backward where the op has one) of the op under test and of its reference, same inputs."""

    comparisons: list[Comparison] = field(default_factory=list)
    size: str = ""
    native_seconds: float | None = None
    reference_seconds: float | None = None
    native_ops: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class CheckResult:
    name: str
    device: str
    status: str
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0
    outcome: Outcome | None = None

    @property
    def worst(self) -> Comparison | None:
        if self.outcome is None or not self.outcome.comparisons:
            return None
        return max(self.outcome.comparisons, key=lambda c: c.ratio)

    @property
    def speedup(self) -> float | None:
        o = self.outcome
        if o is None or not o.native_seconds or o.reference_seconds is None:
            return None
        return o.reference_seconds / o.native_seconds

    def to_dict(self) -> dict[str, Any]:
        o = self.outcome or Outcome()
        worst = self.worst
        return {
            "name": self.name, "device": self.device, "status": self.status, "reason": self.reason,
            **({"detail": self.detail} if self.detail else {}),
            "seconds": round(self.seconds, 3), "size": o.size,
            "worst": worst.what if worst else None,
            "error": _json_float(worst.error) if worst else None,
            "tolerance": worst.tolerance if worst else None,
            "comparisons": [c.to_dict() for c in o.comparisons],
            "native_seconds": _round(o.native_seconds), "reference_seconds": _round(o.reference_seconds),
            "speedup": _round(self.speedup, 3),
            "native_ops": list(o.native_ops), "notes": list(o.notes),
        }


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "nan")


# ---------------------------------------------------------------------------
# Comparisons


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None, mask: torch.Tensor | None = None) -> float:
    """``max |got - want| / max |want|`` (over ``mask`` where given); inf if the shapes or
    the positions of non-finite values differ, or one side is missing."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    got, want = got.detach(), want.detach().to(got.device)
    if got.shape != want.shape:
        return math.inf
    if mask is not None:
        mask = mask.to(got.device)
        got, want = got[mask], want[mask]
    if got.numel() == 0:
        return 0.0
    got, want = got.reshape(-1), want.reshape(-1)
    diff = scale = 0.0
    step = 1 << 24  # bounds the temporaries on large inputs
    for start in range(0, got.numel(), step):
        g, w = got[start : start + step].float(), want[start : start + step].float()
        finite = torch.isfinite(w)
        if bool((torch.isfinite(g) != finite).any()):
            return math.inf
        diff = max(diff, float(torch.where(finite, (g - w).abs(), 0.0).max()))
        scale = max(scale, float(torch.where(finite, w.abs(), 0.0).max()))
    return diff / max(scale, 1e-30)


def compare(what: str, got: torch.Tensor | None, want: torch.Tensor | None, tolerance: float,
            mask: torch.Tensor | None = None) -> Comparison:
    return Comparison(what, relative_error(got, want, mask), tolerance)


def mismatch(what: str, differs: torch.Tensor, tolerance: float = 0.0) -> Comparison:
    """Fraction of True elements of ``differs``."""
    n = differs.numel()
    return Comparison(what, float(differs.sum()) / n if n else 0.0, tolerance, kind="fraction")


# ---------------------------------------------------------------------------
# Randomness, synchronisation, timing


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw on the global generators of every device, seeded, and restore their state after
    (so draws happen on the device that uses them and leave no trace)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, min_seconds: float, max_reps: int) -> float:
    """Median seconds of ``fn()`` (already warmed up), repeated until ``min_seconds`` or ``max_reps``."""
    times: list[float] = []
    synchronize(device)
    while True:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if sum(times) >= min_seconds or len(times) >= max_reps:
            break
    times.sort()
    return times[len(times) // 2]


class NativeCalls(TorchDispatchMode):
    """Records every ``avatar::`` op that reaches the dispatcher, with its device: the proof that
    the native kernel (not a silent fallback to the reference) served a call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", "") == "avatar":
            devices = [a.device.type for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((func._schema.name, devices[0] if devices else "?"))
        return func(*args, **(kwargs or {}))

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.calls})

    def require(self, expected: Sequence[str], device: torch.device) -> list[str]:
        """Raise :class:`CheckFailed` unless each ``avatar::<op>`` in ``expected`` ran on ``device``'s type."""
        served = {name for name, dev in self.calls if dev == device.type}
        missing = [op for op in expected if f"avatar::{op}" not in served]
        if missing:
            seen = ", ".join(f"{n} on {d}" for n, d in sorted(set(self.calls))) or "no avatar op"
            raise CheckFailed(f"the native kernel did not serve the call (silent fallback?): expected "
                              f"{', '.join('avatar::' + m for m in missing)} on {device.type}, saw {seen}")
        return self.names()


def native_module(device: torch.device) -> Any:
    """The loaded native extension, or :class:`CheckFailed` with the build's reason."""
    from avatar import _native

    try:
        module = _native.load()
    except _native.NativeUnavailable as exc:
        raise CheckFailed(f"native extension unavailable: {exc}") from None
    if device.type == "cuda" and not getattr(module, "with_cuda", False):
        raise CheckFailed("the native extension was built without CUDA: install the CUDA toolkit (nvcc) matching "
                          "torch.version.cuda and delete the avatar ext cache to rebuild")
    return module


# ---------------------------------------------------------------------------
# Sizes per device type


@dataclass(frozen=True)
class Sizes:
    """Input sizes of the checks on one kind of device."""

    axpy: int
    hash_points: int
    """Points of the forward / point-gradient hash-grid check (and the fp16 table check)."""
    hash_table_points: int
    """Points of the table-gradient hash-grid checks."""
    hash_grid: tuple[int, int, int, int, int]
    """(levels, features, log2 table size, base resolution, finest resolution)."""
    hash_chunk: int
    """Points per chunk of the reference (bounds its autograd memory)."""
    composite_rays: int
    composite_max_samples: int
    march_rays: int
    march_resolution: int
    march_step: float
    raster_resolution: tuple[int, int]
    raster_batch: int
    raster_triangles: int
    generate_steps: int
    generate_overrides: tuple[str, ...]
    min_seconds: float
    max_reps: int


# Small enough that the whole CPU subset runs in about a minute on 2 cores (CI runs it).
CPU_SIZES = Sizes(
    axpy=1 << 20, hash_points=1 << 15, hash_table_points=1 << 15, hash_grid=(8, 2, 15, 16, 256), hash_chunk=1 << 20,
    composite_rays=4096, composite_max_samples=64, march_rays=2048, march_resolution=32, march_step=0.005,
    raster_resolution=(96, 128), raster_batch=2, raster_triangles=1500, generate_steps=2,
    generate_overrides=("coarse.resolution=16", "coarse.samples_per_ray=24", "coarse.occupancy_update_every=2",
                        "fine.resolution=24", "fine.dmtet_resolution=12"),
    min_seconds=0.15, max_reps=5,
)

# Production sizes (Instant-NGP's grid; 2^24 points, 2^22-point table gradients,
# 2^24 ray samples, 2048^2 images): well under a minute of op checks on one GPU.
CUDA_SIZES = Sizes(
    axpy=1 << 26, hash_points=1 << 24, hash_table_points=1 << 22, hash_grid=(16, 2, 19, 16, 2048),
    hash_chunk=1 << 21, composite_rays=1 << 17, composite_max_samples=255, march_rays=1 << 16,
    march_resolution=128, march_step=0.005, raster_resolution=(2048, 2048), raster_batch=2,
    raster_triangles=1 << 18, generate_steps=4, generate_overrides=(), min_seconds=0.5, max_reps=20,
)


def pow2(n: int) -> str:
    """``2^k`` for powers of two, else the number with thousands separators."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else f"{n:,}"


# ---------------------------------------------------------------------------
# Devices and the runner


@dataclass
class DeviceContext:
    """What a check needs to know about the device it runs on."""

    device: torch.device
    sizes: Sizes
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def timed(self, fn: Callable[[], Any]) -> float:
        return time_call(fn, self.device, self.sizes.min_seconds, self.sizes.max_reps)


def context_for(device: torch.device) -> DeviceContext:
    return DeviceContext(device, CUDA_SIZES if device.type == "cuda" else CPU_SIZES)


@dataclass(frozen=True)
class CheckSpec:
    """A named check. ``cuda_only``: listed once under ``cuda`` as skipped when no CUDA device is present."""

    name: str
    fn: Callable[[DeviceContext], Outcome]
    cuda_only: bool = False
    description: str = ""


def one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_check(spec: CheckSpec, ctx: DeviceContext) -> CheckResult:
    """Run one check; every exception becomes a failure with a one-line reason."""
    start = time.perf_counter()
    result = CheckResult(spec.name, ctx.name, FAIL)
    device_guard = torch.cuda.device(ctx.device) if ctx.is_cuda else contextlib.nullcontext()
    try:
        with device_guard:
            outcome = spec.fn(ctx)
            synchronize(ctx.device)
        result.outcome = outcome
        bad = [c for c in outcome.comparisons if not c.ok]
        if bad:
            result.reason = "; ".join(f"{c.what}: {_fmt(c.error)} > {_fmt(c.tolerance)}" for c in bad)
        else:
            result.status = PASS
    except Skip as exc:
        result.status, result.reason = SKIP, one_line(exc)
    except CheckFailed as exc:
        result.reason, result.detail = one_line(exc), str(exc) if "\n" in str(exc) else ""
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a check must never take the command down
        text = f"{type(exc).__name__}: {exc}"
        result.reason, result.detail = one_line(text), text if "\n" in text.strip() else ""
    finally:
        result.seconds = time.perf_counter() - start
        gc.collect()
        if ctx.is_cuda:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    return result


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return "0" if value == 0 else f"{value:.2g}"
