"""Interrupted writes never leave an artifact a later stage would trust, and a changed merged adapter is refused.

The writers are real processes SIGKILLed mid-write: a bare `engine.core.atomic` writer, and `mashup finetune` saving a
checkpoint every step. (The merge's own kill test is tests/engine/merge/test_merge_io.py.)
"""
from __future__ import annotations
from engine.api import merge

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.core.atomic import atomic_dir, atomic_write_text
from engine.cli import main
from engine.core.errors import ConfigError
from engine.finetune.common import check_init_dir

REPO = Path(__file__).resolve().parents[2]
WRITER = """
import sys, time
from pathlib import Path
from engine.core.atomic import atomic_dir, atomic_file
mode, target = sys.argv[1], Path(sys.argv[2])
with (atomic_file(target) if mode == "file" else atomic_dir(target)) as tmp:
    path = tmp if mode == "file" else tmp / "adapter_model.safetensors"
    with open(path, "w") as fh:
        fh.write("half of the new content")
        fh.flush()
        print("writing", flush=True)
        time.sleep(120)
"""


def temps(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


def kill_mid_write(mode: str, target: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, mode, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_file_writer_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = atomic_write_text(tmp_path / "report.md", "old report")
    kill_mid_write("file", target)
    assert target.read_text() == "old report" and len(temps(target)) == 1
    atomic_write_text(target, "new report")
    assert target.read_text() == "new report" and temps(target) == []


def test_killed_folder_writer_leaves_no_folder_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "adapter"
    kill_mid_write("dir", target)
    assert not target.exists() and len(temps(target)) == 1
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_text("complete")
    assert (target / "adapter_model.safetensors").read_text() == "complete" and temps(target) == []


def test_sigkilled_finetune_leaves_only_complete_checkpoints(tmp_path, base_dir, task_file):
    from engine.run import finished_run

    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "engine.cli", "finetune", "--base", str(base_dir), "--data", str(task_file),
           "--out", str(out), "--steps", "500", "--batch-size", "2", "--save-every", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(list((out / "checkpoints").glob("step-*"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "finetune ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert sorted(p.name for p in ckpt.iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "finetune_info.json"], ckpt
        assert load_file(str(ckpt / "adapter_model.safetensors")) and json.loads((ckpt / "finetune_info.json").read_text())
    from engine.finetune import FinetuneConfig

    def ft(steps: int) -> FinetuneConfig:
        return FinetuneConfig(base=str(base_dir), data=str(task_file), out=str(out), steps=steps, batch_size=2,
                              save_every=1)

    assert not (out / "adapter").exists() and not (out / "log.parquet").exists() and not finished_run(ft(500))
    assert main(cmd[3:] + ["--overwrite", "--steps", "2"]) == 0 and finished_run(ft(2))
    assert not finished_run(ft(3))  # another config: the run does not count as done


@pytest.fixture(scope="module")
def merged(tmp_path_factory, pool_dir) -> Path:
    return merge([pool_dir / "qv" / "donor1", pool_dir / "qv" / "donor3"], out=tmp_path_factory.mktemp("m") / "merged")


def test_merge_info_records_the_merged_adapters_own_sha256(merged):
    info = json.loads((merged / "merge_info.json").read_text())
    # hashlib on the raw bytes, not engine.core.adapter.sha256_file (the function that wrote the field)
    assert info["adapter_sha256"] == hashlib.sha256((merged / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert check_init_dir(str(merged)) == merged


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_an_init_adapter_changed_since_its_merge_is_refused_in_one_line(merged, tmp_path, base_dir, task_file, capsys,
                                                                       damage):
    import shutil

    init = Path(shutil.copytree(merged, tmp_path / "init"))
    weights = init / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw) if damage == "flip" else bytes(raw[: len(raw) // 2]))
    with pytest.raises(ConfigError, match="adapter_sha256"):
        check_init_dir(str(init))
    assert main(["finetune", "--base", str(base_dir), "--data", str(task_file), "--init", str(init),
                 "--out", str(tmp_path / "ft")]) == 2
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert str(weights) in line and "re-run the merge" in line
    assert not (tmp_path / "ft").exists()
