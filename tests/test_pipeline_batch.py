"""``--prompts FILE``: one run folder per prompt, past failures, with a summary."""

from __future__ import annotations

import pytest

from avatar.config import GenerateConfig, make_config
from avatar.pipeline.batch import read_prompts, run_prompts
from avatar.pipeline.generate import GenerateError


def test_read_prompts_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# heads\n\nan old sea captain\n   \n  # indented comment\n a young elf \n")
    assert read_prompts(path) == ["an old sea captain", "a young elf"]


def test_read_prompts_errors_name_the_file(tmp_path):
    with pytest.raises(GenerateError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(GenerateError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(GenerateError, match="UTF-8"):
        read_prompts(tmp_path / "bin.txt")


def test_run_prompts_continues_past_a_failure(tmp_path):
    cfg = make_config(GenerateConfig, "smoke", [f"output_root={tmp_path}"])
    seen = []

    def fake_run(one, ws, progress=True):
        seen.append((one.prompt, ws.root.parent))
        if one.prompt == "bad":
            raise GenerateError("no luck")
        return {"finished": True}

    summary = run_prompts(cfg, ["a", "bad", "c"], progress=False, run=fake_run)
    assert summary["total"] == 3 and summary["succeeded"] == 2 and summary["failed"] == 1
    assert [r["ok"] for r in summary["runs"]] == [True, False, True]
    assert "no luck" in summary["runs"][1]["error"]
    assert [p for p, _ in seen] == ["a", "bad", "c"] and all(parent == tmp_path for _, parent in seen)
    assert len({r["run"] for r in summary["runs"]}) == 3
    assert cfg.prompt == ""  # the caller's config is not modified
