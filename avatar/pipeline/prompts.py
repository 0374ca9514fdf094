"""Many prompts, one new run folder each: ``avatar generate --prompts FILE``.

:func:`run_prompts` runs the prompts one after another, each in a new timestamped run
folder; a failed prompt is recorded and the rest go on. The re-runnable batch (fixed
folders, a journal, retries, edits, exports, Ray) is :mod:`avatar.batch`, a layer above.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from avatar.pipeline.generate import GenerateError


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
                run: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run each prompt in a new run folder under ``cfg.output_root``; continue past failures.
    The guidance models are loaded once for all prompts
    (:func:`~avatar.guidance.models.models_kept_loaded`). Each run is built (prior, guidance,
    an oracle's mesh) before its folder is made, so a prompt that cannot start leaves none.

    run: None runs :class:`~avatar.pipeline.generate.GenerateRun`; a callable
    ``run(cfg_with_prompt, workspace, progress=...)`` replaces it (tests).
    Returns ``{"total", "succeeded", "failed", "runs": [{"prompt", "run", "ok", "error"?}]}``;
    ``run`` is None for a prompt that failed before its folder was made.
    """
    from avatar.guidance.models import models_kept_loaded

    with models_kept_loaded():
        results = [_run_one(cfg, prompt, progress, run) for prompt in prompts]
    ok = sum(r["ok"] for r in results)
    return {"total": len(results), "succeeded": ok, "failed": len(results) - ok, "runs": results}


def _run_one(cfg: Any, prompt: str, progress: bool, run: Callable[..., dict[str, Any]] | None) -> dict[str, Any]:
    from avatar.pipeline.generate import GenerateRun
    from avatar.workspace import Workspace

    one = copy.deepcopy(cfg)
    one.prompt = prompt
    entry: dict[str, Any] = {"prompt": prompt, "run": None, "ok": False}
    try:
        if run is None:
            job = GenerateRun(one, None, progress=progress)
            job.ws = Workspace.create(one.output_root, prompt)
            entry["run"] = str(job.ws.root)
            job.run()
        else:
            ws = Workspace.create(one.output_root, prompt)
            entry["run"] = str(ws.root)
            run(one, ws, progress=progress)
        entry["ok"] = True
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failed prompt must not stop the batch; its reason is kept
        entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


__all__ = ["read_prompts", "run_prompts"]
