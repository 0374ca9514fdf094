"""Peak resident-memory growth of one call, for the benchmarks (Linux /proc).

PyTorch's CPU allocator is the system malloc, so tracemalloc sees nothing; we read
the kernel's high-water mark instead: trim the heap, reset VmHWM to the current
RSS through /proc/self/clear_refs, run, and report VmHWM minus the RSS before.
"""

from __future__ import annotations

import ctypes
import gc
import re
from collections.abc import Callable
from pathlib import Path


def status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def release_freed_memory() -> None:
    """Return freed heap memory to the OS so that the next run's RSS growth is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_growth_mib(run: Callable[[], object], reset: Callable[[], object] | None = None) -> float | None:
    """Peak RSS growth (MiB) of one call of ``run`` over the RSS before it.

    reset: called first, untimed (e.g. dropping the previous run's gradients).
    """
    if reset is not None:
        reset()
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = status_kib("VmRSS")
    run()
    peak = status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return round(max(0, peak - before) / 1024, 1)
