"""Many prompts, one run folder each: ``avatar generate --prompts FILE``.

A failed prompt is recorded and the batch goes on; the summary lists every run
and every failure with its reason. Ctrl-C stops the batch (the interrupted run
has written its checkpoint). For many GPUs, hand the prompts to Ray instead
(docs/DESIGN.md, "Beyond one machine").
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from avatar.pipeline.generate import GenerateError, run_generate


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file, one per line; blank lines and ``#`` comment lines are skipped."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerateError(f"cannot read the prompts file {path} ({exc}); pass a UTF-8 text file with one "
                            "prompt per line") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise GenerateError(f"the prompts file {path} holds no prompts (only blank or # lines)")
    return prompts


def run_prompts(cfg: Any, prompts: list[str], progress: bool = True,
                run: Callable[..., dict[str, Any]] = run_generate) -> dict[str, Any]:
    """Run ``run(cfg_with_prompt, workspace, progress=...)`` for each prompt, each in a new
    run folder under ``cfg.output_root``; continue past failures.

    Returns ``{"total", "succeeded", "failed", "runs": [{"prompt", "run", "ok", "error"?}]}``.
    """
    from avatar.workspace import Workspace

    results: list[dict[str, Any]] = []
    for prompt in prompts:
        one = copy.deepcopy(cfg)
        one.prompt = prompt
        ws = Workspace.create(one.output_root, prompt)
        entry: dict[str, Any] = {"prompt": prompt, "run": str(ws.root), "ok": False}
        try:
            run(one, ws, progress=progress)
            entry["ok"] = True
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failed prompt must not stop the batch; its reason is kept
            entry["error"] = f"{type(exc).__name__}: {exc}"
        results.append(entry)
    ok = sum(r["ok"] for r in results)
    return {"total": len(results), "succeeded": ok, "failed": len(results) - ok, "runs": results}
