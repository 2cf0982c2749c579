"""`mashup run` with a checkpoint-merge arm: finetune, merge the run's own checkpoints, report the merge beside the final."""
from __future__ import annotations

import json

import pytest

from engine.core.errors import ConfigError
from engine.run import RunConfig, run


def _config(tmp_path, base_dir, task_file, eval_file, **arm):
    return RunConfig.model_validate({
        "out": str(tmp_path / "run"), "base": str(base_dir), "donors": [str(tmp_path)],
        "train": str(task_file), "val": str(eval_file), "eval": str(task_file),
        "finetune": {"steps": 6, "batch_size": 4, "lr": 2e-2, "eval_every": 3, "progress": False,
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "arms": [{"name": "scratch", "init": "none"}, {"name": "ckpt", "init": "none", **arm}],
        "sweep": {"seeds": [0, 1]},
    })


@pytest.fixture(scope="module")
def eval_file(world):
    from bench.world.tiny import write_task

    return write_task(world / "ckpt_val.jsonl", 12, seed=5, op="reverse", choices=4)


def test_arm_merges_its_checkpoints_and_reports_them(tmp_path, base_dir, task_file, eval_file, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.core.data import load_jsonl
    from engine.evaluate import evaluate

    cfg = _config(tmp_path, base_dir, task_file, eval_file,
                  checkpoint_merge={"metric": "loss", "penalty": 2.0, "save_every": 2})
    report = run(cfg)

    text = report.read_text()
    assert "## Checkpoint merges" in text and "| ckpt | loss p=2 |" in text
    [entry] = json.loads((cfg.out / "results.json").read_text())["checkpoint_merge"]
    assert entry["arm"] == "ckpt" and entry["metric"] == "accuracy"
    merged_acc, held, final_acc, final_loss, held_final = [], [], [], [], []

    def load(adapter):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                         str(adapter))

    for seed in (0, 1):
        run_dir = cfg.out / "arms" / "ckpt" / "runs" / f"seed{seed}"
        rows = [json.loads(line) for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4, 6]
        info = json.loads((run_dir / "checkpoint_merge" / "merge_info.json").read_text())
        raw = [r["train_loss"] ** -2.0 for r in rows]
        assert info["weights"] == pytest.approx([w / sum(raw) for w in raw], rel=1e-12)
        model = load(run_dir / "checkpoint_merge")
        merged_acc.append(evaluate(model, tokenizer, load_jsonl(eval_file)).accuracy)
        held.append(evaluate(model, tokenizer, load_jsonl(task_file)).accuracy)
        model = load(run_dir / "adapter")  # the run's final checkpoint, as it saved it
        final = evaluate(model, tokenizer, load_jsonl(eval_file))
        final_acc.append(final.accuracy)
        final_loss.append(final.loss)
        held_final.append(evaluate(model, tokenizer, load_jsonl(task_file)).accuracy)
    assert entry["merged"] == pytest.approx(sum(merged_acc) / 2)
    assert entry["heldout_merged"] == pytest.approx(sum(held) / 2)
    # The final checkpoint, evaluated here from its saved adapter, not copied from the run's own results
    assert entry["final"] == pytest.approx(sum(final_acc) / 2)
    assert entry["final_loss"] == pytest.approx(sum(final_loss) / 2, rel=1e-5)
    assert entry["heldout_final"] == pytest.approx(sum(held_final) / 2)
    assert not (cfg.out / "arms" / "scratch" / "runs" / "seed0" / "checkpoints").exists()  # only the merge arm saves


def test_arm_without_checkpoints_is_a_config_error(tmp_path, base_dir, task_file, eval_file):
    cfg = _config(tmp_path, base_dir, task_file, eval_file, checkpoint_merge={"metric": "step"})
    with pytest.raises(ConfigError, match="arms.ckpt.checkpoint_merge"):
        cfg.check()
