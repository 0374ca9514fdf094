"""Batch throughput: prompts per hour, in-process (sequential) vs a local Ray cluster.

Each mode runs the same prompts (smoke preset, tiny guidance by default) into a fresh
output folder, in its own Python process so that all pay the same start-up (imports,
guidance load; Ray also starts its runtime and one worker actor per CPU). ``sequential``
gives torch all ``--cpus`` threads, ``sequential-1thread`` one (it isolates what OpenMP
threads cost on a busy machine); Ray runs one avatar per CPU with one thread each.
Reported per mode: wall seconds of the whole batch (start-up included), prompts per hour
from it, and the seconds of each task as the workers saw them; and the load average,
since on a shared machine the figures move with it.

    python benchmarks/batch.py --prompts 4 --cpus 2 --set coarse.steps=20 --set fine.steps=20

prints JSON. ``--set`` cuts the preset (the report lists what was cut).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADS = ["an old sea captain with a grey beard", "a young elf with silver hair", "a grumpy dwarf with a red beard",
         "a tired knight with a scar", "a smiling grandmother with glasses", "a punk with a green mohawk",
         "a bald monk", "a pirate with an eye patch"]


def _one_mode(mode: str, prompts_file: str, out: str, cpus: int, preset: str, guidance: str,
              overrides: list[str]) -> dict:
    """Runs in the child process: one batch, timed."""
    started = time.perf_counter()
    if mode.startswith("sequential"):
        import torch

        torch.set_num_threads(1 if mode == "sequential-1thread" else cpus)
        ray = None
    else:
        import ray as ray_module

        ray_module.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray = "local"
    from avatar.batch import run_batch

    summary = run_batch(prompts_file, ray=ray, preset=preset, guidance=guidance, overrides=overrides,
                        output_root=out, progress=False)
    wall = time.perf_counter() - started
    if ray is not None:
        import ray as ray_module

        ray_module.shutdown()
    tasks = [r for r in summary["runs"] if r["status"] == "done"]
    return {
        "mode": mode, "workers": summary["workers"], "prompts": summary["total"], "succeeded": summary["succeeded"],
        "wall_seconds": round(wall, 1), "prompts_per_hour": round(3600 * summary["succeeded"] / wall, 1),
        "mean_task_seconds": round(sum(r["seconds"] for r in tasks) / max(1, len(tasks)), 1),
        "task_seconds": [r["seconds"] for r in tasks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="How many prompts (default 4).")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for both modes (default 2).")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--guidance", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Config override (repeatable), e.g. coarse.steps=30.")
    parser.add_argument("--modes", default="sequential,ray", help="Comma list of sequential (torch uses all "
                        "--cpus threads), sequential-1thread, ray.")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, out = args.child
        print(json.dumps(_one_mode(mode, args.prompts_file, out, args.cpus, args.preset, args.guidance,
                                   args.overrides)))
        return
    with tempfile.TemporaryDirectory(prefix="avatar-batch-bench-") as tmp:
        prompts_file = Path(tmp) / "heads.txt"
        heads = [HEADS[i % len(HEADS)] + ("" if i < len(HEADS) else f", variant {i // len(HEADS) + 1}")
                 for i in range(args.prompts)]
        prompts_file.write_text("\n".join(heads) + "\n")
        results = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            cmd = [sys.executable, __file__, "--child", mode, str(Path(tmp) / mode), "--prompts-file",
                   str(prompts_file), "--cpus", str(args.cpus), "--preset", args.preset, "--guidance",
                   args.guidance, *[f"--set={o}" for o in args.overrides]]
            env = {**os.environ, "OMP_NUM_THREADS": "1" if mode == "sequential-1thread" else str(args.cpus)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    import torch

    report = {
        "benchmark": "batch", "preset": args.preset, "guidance": args.guidance, "overrides": args.overrides,
        "prompts": args.prompts, "cpus": args.cpus, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "results": results,
    }
    by_mode = {r["mode"]: r for r in results}
    for base in ("sequential", "sequential-1thread"):
        if {base, "ray"} <= by_mode.keys():
            speedup = by_mode["ray"]["prompts_per_hour"] / by_mode[base]["prompts_per_hour"]
            report[f"ray_speedup_over_{base}"] = round(speedup, 2)
    report["load_average"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
