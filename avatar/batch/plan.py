"""Planning a batch: read the prompts and edits files, build and check every config before
any work (:func:`plan_batch`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from avatar.batch.task import FAIL_ENV, BatchError, BatchTask, parse_fail_hook, task_folder


def read_edits(path: str | Path) -> list[str]:
    """Edit instructions of a file, one per line (blank and ``#`` lines skipped, repeats dropped)."""
    from avatar.pipeline.generate import GenerateError
    from avatar.pipeline.prompts import read_prompts

    try:
        lines = read_prompts(path)
    except GenerateError as exc:
        raise BatchError(str(exc).replace("prompts file", "edits file").replace("prompt per line",
                                                                                "instruction per line")) from exc
    return list(dict.fromkeys(lines))


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str], list[str]]:
    """--set values for generate, edits (``edit.KEY``) and export (``export.KEY``)."""
    gen, edit, export = [], [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("edit."):
            edit.append(item.strip()[len("edit."):])
        elif key.startswith("export."):
            export.append(item.strip()[len("export."):])
        else:
            gen.append(item)
    return gen, edit, export


def check_guidance(gen_cfg: Any, edit_cfgs: list[Any]) -> None:
    """Refuse, before any work, guidance that names a folder or mesh that is not there (or a
    spec that is neither a folder nor a hub id): every task would fail on it. Whether a hub
    model is in the cache is left to the run (it may be downloaded meanwhile)."""
    from avatar.guidance import models as M

    def check(spec: str, role: str) -> None:
        mesh = M.oracle_mesh(spec)
        if mesh is not None:
            if not Path(mesh).expanduser().is_file():
                raise BatchError(f"the oracle guidance's mesh {mesh} does not exist: pass --guidance oracle:MESH "
                                 "with a mesh file (GLB, OBJ or PLY)")
            return
        M.parse_weights_spec(spec, role)

    check(str(gen_cfg.guidance.model), M.TEXT2IMG)
    controlnet = str(gen_cfg.guidance.controlnet or "").strip()
    if controlnet and not M.is_tiny(str(gen_cfg.guidance.model)) and M.oracle_mesh(gen_cfg.guidance.model) is None:
        check(controlnet, M.LANDMARK_CONTROLNET)
    for cfg in edit_cfgs:
        model = str(cfg.guidance.model)
        if M.oracle_mesh(model) is not None:
            check(model, M.INSTRUCT_PIX2PIX)
        elif M.is_tiny(model):
            continue
        elif str(getattr(cfg.guidance, "mode", "iesd")) == "ip2p":
            check(model, M.INSTRUCT_PIX2PIX)
        elif str(getattr(cfg.guidance, "base_model", "") or "").strip():
            check(str(cfg.guidance.base_model), M.TEXT2IMG)


def plan_batch(prompts_file: str | Path, *, edits_file: str | Path | None = None, preset: str = "quality",
               guidance: str | None = None, export_formats: list[str] | str | None = None,
               overrides: list[str] | None = None, output_root: str | Path | None = None,
               config_file: str | Path | None = None,
               fail_at: dict[int, int] | None = None) -> tuple[Path, list[BatchTask]]:
    """Read the files, build and check every config (and the guidance's folders) before any
    work; return (output root, tasks). Writes nothing.

    Overrides (``--set``) are generate keys; those whose key an edit config also has (``seed``,
    ``device``, ``fine.steps``, ``checkpoint_every`` ...; not ``guidance.*``) apply to the
    edits too. ``edit.KEY=VALUE`` applies to the edits only, ``export.KEY=VALUE`` to the export.
    """
    from avatar.config import EditConfig, ExportConfig, GenerateConfig, all_keys, make_config
    from avatar.paths import outputs_root
    from avatar.pipeline.generate import validate_config
    from avatar.pipeline.prompts import read_prompts
    from avatar.workspace import slugify

    prompts_file = Path(prompts_file).expanduser()
    prompts = read_prompts(prompts_file)
    instructions = read_edits(edits_file) if edits_file is not None else []
    gen_over, edit_over, export_over = _split_overrides(list(overrides or []))
    named = [f"guidance.model={guidance}"] if guidance else []
    root = Path(output_root).expanduser() if output_root else outputs_root() / f"batch-{slugify(prompts_file.stem)}"
    gen_cfg = make_config(GenerateConfig, preset, config_file=config_file,
                          overrides=[*named, *gen_over, f"output_root={root}"])
    edit_keys = set(all_keys(EditConfig))
    shared = [o for o in gen_over if o.partition("=")[0].strip() in edit_keys
              and not o.partition("=")[0].strip().startswith("guidance.")]
    edit_named = ["guidance.model=tiny"] if guidance and guidance.strip().lower() == "tiny" else []
    edit_cfgs = [make_config(EditConfig, preset, overrides=[*edit_named, *shared, *edit_over, f"instruction={text}"])
                 for text in instructions]
    for cfg in edit_cfgs:
        if cfg.fine.steps < 1:
            raise BatchError(f"edit fine.steps must be >= 1, got {cfg.fine.steps} (--set edit.fine.steps=N)")
    export_cfg = None
    if export_formats or export_over:
        formats = export_formats.split(",") if isinstance(export_formats, str) else list(export_formats or [])
        fmt = [f"formats={','.join(f.strip() for f in formats if f.strip())}"] if formats else []
        export_cfg = make_config(ExportConfig, overrides=[*fmt, *export_over])
        try:  # fail now, not after hours of generation
            from avatar.export import validate_export_config
        except ImportError as exc:
            raise BatchError(f"--export needs avatar.export, which this avatar lacks ({exc}); run the batch "
                             "without --export and export the run folders later") from exc
        validate_export_config(export_cfg)
    fail_at = {**parse_fail_hook(os.environ.get(FAIL_ENV)), **(fail_at or {})}
    tasks: list[BatchTask] = []
    for index, prompt in enumerate(prompts, 1):
        cfg = dataclasses.replace(gen_cfg, prompt=prompt)
        validate_config(cfg)
        repeat = 1 + sum(t.prompt == prompt for t in tasks)
        tasks.append(BatchTask(index, prompt, str(task_folder(root, prompt, repeat)), cfg, edit_cfgs, export_cfg,
                               fail_at.get(index)))
    check_guidance(gen_cfg, edit_cfgs)
    return root, tasks


__all__ = ["check_guidance", "plan_batch", "read_edits"]
