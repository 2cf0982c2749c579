"""`mashup finetune` end to end, and its user errors: one line, exit 2, before anything trains."""
from __future__ import annotations

import pytest

from engine.cli import main


def test_finetune_command_trains_from_scratch_and_reports(base_dir, task_file, eval_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--base", str(base_dir), "--data", str(task_file), "--eval", str(eval_file), "--init", "none",
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--lr", "1e-3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "finetuned 2 steps" in printed and "eval loss" in printed and "choice accuracy" in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "log.jsonl").is_file() and (out / "log.parquet").is_file()

    assert main(argv) == 2
    assert "already holds a finetune run" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--steps", "1"]) == 0
    assert "finetuned 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize("extra,phrase", [
    (["--init", "{world}"], "is not a PEFT adapter directory"),
    (["--eval", "{world}/missing.jsonl"], "eval: file does not exist"),
    (["--batch-size", "3", "--grad-accum", "2"], "batch_size 3 must be a multiple of grad_accum"),
])
def test_user_errors_are_one_line(base_dir, task_file, world, tmp_path, capsys, extra, phrase):
    argv = ["finetune", "--base", str(base_dir), "--data", str(task_file), "--out", str(tmp_path / "o")]
    assert main(argv + [a.format(world=world) for a in extra]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and phrase in lines[0], lines
    assert not (tmp_path / "o" / "adapter").exists()
