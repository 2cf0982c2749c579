"""A finetune run's checkpoints as donors (engine/checkpoints.py): manifest from the run's own log, the MWA paper's
weights by hand, and a merge checked against a weighted average read straight from the safetensors files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.checkpoints import checkpoint_weights, merge_checkpoints
from engine.core.run_folder import Checkpoint, checkpoint_rows
from engine.cli import main


@pytest.fixture(scope="module")
def ft_run(base_dir, task_file, tmp_path_factory) -> Path:
    """8 steps, a checkpoint every 2: four checkpoints (2, 4, 6, 8), the last one also the final adapter."""
    from engine.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("ckpt") / "run"
    finetune(FinetuneConfig(base=str(base_dir), data=str(task_file), out=str(out), steps=8, batch_size=4, lr=2e-2,
                            save_every=2, progress=False, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    return out


def _rows(losses, steps):
    return [Checkpoint(id=f"c{i}", path=f"c{i}", step=s, train_loss=l) for i, (l, s) in enumerate(zip(losses, steps))]


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_weights_are_the_papers_formula(p):
    losses, steps = [2.0, 1.25, 0.5, 0.4], [10, 20, 30, 40]
    rows = _rows(losses, steps)
    by_loss = [l ** -p for l in losses]
    by_step = [s ** p for s in steps]
    assert checkpoint_weights(rows, "loss", p) == pytest.approx([w / sum(by_loss) for w in by_loss], rel=1e-12)
    assert checkpoint_weights(rows, "step", p) == pytest.approx([w / sum(by_step) for w in by_step], rel=1e-12)
    if p == 0:
        assert checkpoint_weights(rows, "loss", p) == pytest.approx([0.25] * 4)
        assert checkpoint_weights(rows, "step", p) == pytest.approx([0.25] * 4)
    else:  # lower loss / later step gets more weight
        assert checkpoint_weights(rows, "loss", p) == sorted(checkpoint_weights(rows, "loss", p))
        assert checkpoint_weights(rows, "step", p) == sorted(checkpoint_weights(rows, "step", p))
    assert checkpoint_weights(rows, "uniform") == pytest.approx([0.25] * 4)


def test_manifest_has_one_row_per_checkpoint_with_step_and_window_loss(ft_run):
    import pandas as pd

    log = pd.read_parquet(ft_run / "log.parquet")
    train = log[log.event == "train"].set_index("step")["loss"]
    written = [json.loads(line) for line in (ft_run / "checkpoints.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [2, 4, 6, 8]
    assert [r["path"] for r in written] == [f"checkpoints/step-{s:06d}" for s in (2, 4, 6, 8)]
    for row in written:
        expected = train.loc[row["step"] - 1: row["step"]].mean()  # the 2 steps since the previous checkpoint
        assert row["train_loss"] == pytest.approx(expected, rel=1e-12)
        assert row["window"] == [row["step"] - 1, row["step"]]
        assert (ft_run / row["path"] / "adapter_model.safetensors").exists()
    assert [r.model_dump(exclude_none=True) for r in checkpoint_rows(ft_run)] == [
        {**r, "window": tuple(r["window"])} for r in written]


def test_final_adapter_counts_when_no_checkpoint_has_its_step(ft_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ft_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000008")
    rows = checkpoint_rows(run)
    assert [(r.id, r.step) for r in rows] == [("step-000002", 2), ("step-000004", 4), ("step-000006", 6), ("adapter", 8)]


@pytest.mark.parametrize("metric,p", [("loss", 2.0), ("step", 1.0)])
def test_merge_loads_in_peft_and_equals_the_weighted_average_of_the_files(ft_run, base_dir, tmp_path, metric, p):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    written = [json.loads(line) for line in (ft_run / "checkpoints.jsonl").read_text().splitlines()]
    raw = [r["train_loss"] ** -p if metric == "loss" else r["step"] ** p for r in written]
    weights = [w / sum(raw) for w in raw]
    files = [ft_run / r["path"] / "adapter_model.safetensors" for r in written]
    tensors = [load_file(str(f)) for f in files]
    expected = {k: sum(w * t[k].double() for w, t in zip(weights, tensors)) for k in tensors[0]}

    out = merge_checkpoints(ft_run, tmp_path / "merged", metric, p)
    merged = load_file(str(out / "adapter_model.safetensors"))
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].double(), value, rtol=1e-6, atol=1e-7)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["sha256"] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert info["weights"] == pytest.approx(weights, rel=1e-12)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out))
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(expected)
    for key, value in state.items():
        file_key = key.replace(".default", "")
        torch.testing.assert_close(value.double(), expected[file_key], rtol=1e-6, atol=1e-7)


def test_cli_selection_then_merge_equals_the_one_step_merge(ft_run, tmp_path, capsys):
    sel, one = tmp_path / "sel.json", tmp_path / "one"
    assert main(["checkpoints", str(ft_run), "--metric", "step", "--penalty", "2", "--out", str(sel),
                 "--merge", str(one)]) == 0
    assert main(["merge", "--selection", str(sel), "--out", str(tmp_path / "two")]) == 0
    digest = [hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest() for d in (one, tmp_path / "two")]
    assert digest[0] == digest[1]
    selection = json.loads(sel.read_text())
    assert selection["strategy"] == "checkpoints" and selection["weighting"] == "mwa-steps" and selection["penalty"] == 2
    assert [d["donor"] for d in selection["donors"]] == ["step-000002", "step-000004", "step-000006", "step-000008"]


def test_cached_merge_is_redone_when_weights_change(ft_run, tmp_path):
    out = merge_checkpoints(ft_run, tmp_path / "m", "loss", 1.0)
    first = json.loads((out / "merge_info.json").read_text())["weights"]
    merge_checkpoints(ft_run, tmp_path / "m", "loss", 4.0)
    second = json.loads((out / "merge_info.json").read_text())["weights"]
    assert second != pytest.approx(first)


def test_a_folder_without_checkpoints_is_one_clear_error(tmp_path, capsys):
    assert main(["checkpoints", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoints" in err[0]


def test_a_method_needing_options_is_one_clear_error(ft_run, tmp_path, capsys):
    assert main(["checkpoints", str(ft_run), "--merge", str(tmp_path / "m"), "--method", "ties"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "density" in err[0]
