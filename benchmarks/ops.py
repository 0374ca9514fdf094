"""Native ops against their PyTorch references: speed and peak memory, as one JSON object.

    python benchmarks/ops.py            # all cases, JSON on stdout, progress on stderr
    python benchmarks/ops.py --quick    # smaller repeat counts

Cases (issue 4's sizes):
- hashgrid: 2^18 points in [0,1]^3, L=16, F=2, T=19 (N_min=16, b=1.4473), forward
  and forward+backward to the table (the training case: sample positions carry no
  gradient); also forward+backward to table and points (hashgrid_point_grad).
- compositing: 4,096 rays x 128 samples, RGB, forward and forward+backward to
  densities and colours (loss on colour, opacity and depth).
- raster: ``bench_raster()`` from ``benchmarks/raster_bench.py`` when that file exists.

Method: every case runs in a fresh subprocess (so one case's allocations cannot
hide another's), each engine with the same thread count (``--threads``, default
torch's default) and the same number of runs. Time: wall clock, the best of N
runs after one warm-up run (the minimum is the figure least disturbed by other
processes on a shared machine; the median is given too). Both engines of a case
get the same N: a best-of-N minimum falls as N grows, so unequal N would favour
the engine timed more often. Memory: one more
run after freed heap memory went back to the OS (malloc_trim); the growth of the
process's peak resident set (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs) over the resident set before that run, i.e. everything
the op allocates beyond its inputs (outputs, gradients, temporaries), in MiB.
torch's CPU tensors live in malloc'd memory, so this counts them (tracemalloc
would not).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from peak_memory import peak_growth_mib  # noqa: E402

HASHGRID = dict(n_points=1 << 18, n_levels=16, n_features=2, log2_hashmap_size=19, base_resolution=16,
                per_level_scale=1.4472692374403782)
COMPOSITING = dict(n_rays=4096, samples_per_ray=128, channels=3, transmittance_threshold=1e-4)
TARGETS = {"hashgrid": 8.0, "compositing": 5.0}
RASTER_REPEATS = 5


# --- measuring inside a case process ----------------------------------------------------


def _measure(run, repeats: int, reset=lambda: None) -> dict:
    """Time ``repeats`` calls (the caller has warmed up), then one call for peak memory.

    reset: called before every run, untimed (drops the previous run's gradients, as
    ``zero_grad(set_to_none=True)`` does, so that they count in the peak).
    """
    times = []
    for _ in range(repeats):
        reset()
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result = {"ms": round(min(times) * 1e3, 2), "ms_median": round(sorted(times)[len(times) // 2] * 1e3, 2),
              "runs": len(times)}
    peak = peak_growth_mib(run, reset)
    if peak is not None:
        result["peak_mem_mib"] = peak
    return result


def _case_hashgrid(engine: str, point_grad: bool, repeats: int) -> dict:
    import torch

    from avatar.ops.hashgrid import hash_grid_encode, hash_grid_layout

    c = HASHGRID
    cfg = dict(n_levels=c["n_levels"], log2_hashmap_size=c["log2_hashmap_size"],
               base_resolution=c["base_resolution"], per_level_scale=c["per_level_scale"])
    layout = hash_grid_layout(**cfg)
    g = torch.Generator().manual_seed(0)
    points = torch.rand(c["n_points"], 3, generator=g).requires_grad_(point_grad)
    table = ((torch.rand(layout.n_rows, c["n_features"], generator=g) * 2 - 1) * 1e-2).requires_grad_(True)
    upstream = torch.randn(c["n_points"], c["n_levels"] * c["n_features"], generator=g)

    def forward():
        with torch.no_grad():
            hash_grid_encode(points, table, **cfg, engine=engine)

    def reset():
        table.grad = None
        points.grad = None

    def forward_backward():
        hash_grid_encode(points, table, **cfg, engine=engine).backward(upstream)

    forward_backward()  # warm-up
    out = {} if point_grad else {"forward": _measure(forward, repeats, reset)}
    out["forward_backward"] = _measure(forward_backward, repeats, reset)
    out["table_rows"] = layout.n_rows
    return out


def _case_compositing(engine: str, repeats: int) -> dict:
    import torch

    from avatar.ops.compositing import composite_rays

    c = COMPOSITING
    n_rays, per_ray = c["n_rays"], c["samples_per_ray"]
    n = n_rays * per_ray
    g = torch.Generator().manual_seed(0)
    offsets = torch.arange(n_rays + 1) * per_ray
    # Densities up to 20 over a ray of length ~1.5: most rays end nearly opaque and
    # some terminate early, as a converged head does.
    sigmas = (torch.rand(n, generator=g) * 20).requires_grad_(True)
    rgbs = torch.rand(n, c["channels"], generator=g).requires_grad_(True)
    deltas = torch.full((n,), 1.5 / per_ray)
    ts = (torch.arange(n) % per_ray + 0.5).float() * (1.5 / per_ray)
    thr = c["transmittance_threshold"]

    def forward():
        with torch.no_grad():
            composite_rays(sigmas, rgbs, deltas, ts, offsets, thr, engine=engine)

    def reset():
        sigmas.grad = None
        rgbs.grad = None

    def forward_backward():
        res = composite_rays(sigmas, rgbs, deltas, ts, offsets, thr, engine=engine)
        (res.colour.sum() + res.opacity.sum() + res.depth.sum()).backward()

    forward_backward()  # warm-up
    return {"forward": _measure(forward, repeats, reset),
            "forward_backward": _measure(forward_backward, repeats, reset)}


def _run_case(name: str, repeats: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    op, engine = name.rsplit(":", 1)
    if op == "hashgrid":
        result = _case_hashgrid(engine, False, repeats)
    elif op == "hashgrid_point_grad":
        result = _case_hashgrid(engine, True, repeats)
    elif op == "compositing":
        result = _case_compositing(engine, repeats)
    else:
        raise SystemExit(f"unknown case {name}")
    result["threads"] = torch.get_num_threads()
    return result


# --- the driver -----------------------------------------------------------------------------


def _subprocess_case(name: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--repeats", str(repeats),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(reference: dict, native: dict, key: str) -> float | None:
    try:
        return round(reference[key]["ms"] / native[key]["ms"], 2)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _bench_raster() -> dict:
    path = Path(__file__).resolve().parent / "raster_bench.py"
    if not path.is_file():
        return {"skipped": "benchmarks/raster_bench.py not found: the rasteriser benchmark is not written yet"}
    try:
        spec = importlib.util.spec_from_file_location("avatar_raster_bench", path)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        # The same number of timed frames for both engines (best of N favours the larger N).
        return module.bench_raster(native_repeats=RASTER_REPEATS, reference_repeats=RASTER_REPEATS)
    except Exception as exc:  # report, do not lose the other figures
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rougher figure, faster)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for every case and engine (default: torch's default)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_run_case(args.case, max(1, args.repeats), args.threads)))
        return

    started = time.perf_counter()
    import torch

    from avatar import _native

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    log("building/loading the native extension")
    native_ok = _native.available()
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    # Runs per engine, the same for both engines of a case: many for the fast
    # compositing case, fewer for the hash grid (the reference takes seconds per run).
    runs = {"compositing": 3 if args.quick else 7, "hashgrid": 1 if args.quick else 3,
            "hashgrid_point_grad": 1 if args.quick else 2}
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
                    "python": platform.python_version(), "native": native_ok},
        "method": {
            "time": "wall clock, best of N runs after one warm-up (same N and threads for both engines); "
                    "ms_median also given",
            "memory": "peak RSS growth during one run over the RSS before it (after malloc_trim; VmHWM "
                      "reset via /proc/self/clear_refs), fresh subprocess per case, MiB",
            "speedup": "reference ms / native ms",
        },
    }
    plan = [
        ("hashgrid", HASHGRID, "hashgrid"),
        ("hashgrid_point_grad", HASHGRID, None),
        ("compositing", COMPOSITING, "compositing"),
    ]
    for op, config, target_key in plan:
        entry: dict = {"config": config}
        engines = ("native", "torch") if native_ok else ("torch",)
        for engine in engines:
            log(f"{op} / {engine}")
            entry[engine] = _subprocess_case(f"{op}:{engine}", runs[op], threads)
        if native_ok:
            if "forward" in entry["native"]:
                entry["speedup_forward"] = _ratio(entry["torch"], entry["native"], "forward")
            entry["speedup_forward_backward"] = _ratio(entry["torch"], entry["native"], "forward_backward")
            if target_key:
                entry["target_forward_backward"] = TARGETS[target_key]
                ratio = entry["speedup_forward_backward"]
                entry["meets_target"] = ratio is not None and ratio >= TARGETS[target_key]
        report[op] = entry
    log("raster")
    report["raster"] = _bench_raster()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    log("done")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
