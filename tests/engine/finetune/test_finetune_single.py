"""Single-process finetuning on the tiny world: where it starts, that it learns, what it leaves on disk."""
from __future__ import annotations

import json

import pytest

from engine.core.data import encode_sample, load_jsonl
from engine.finetune import finetune


@pytest.fixture(scope="module")
def merged_run(make_config, merged_init, tmp_path_factory):
    return finetune(make_config(tmp_path_factory.mktemp("ft") / "merged", init=str(merged_init)))


def hf_score(base_dir, tokenizer, eval_file, donor_path=None):
    from actors.backends.base import BASE_REQUEST, DonorRequest
    from actors.backends.hf import HFBackend, HFOptions

    sample = encode_sample(tokenizer, load_jsonl(eval_file))
    req = DonorRequest("init", str(donor_path), 1) if donor_path else BASE_REQUEST
    (score,) = HFBackend(str(base_dir), HFOptions(device="cpu")).score([req], sample)
    assert score.error is None
    return score


def test_merged_init_starts_at_the_init_adapters_score(merged_run, merged_init, base_dir, tokenizer, eval_file):
    step0 = merged_run.evals()[0]
    assert step0["step"] == 0
    ref = hf_score(base_dir, tokenizer, eval_file, merged_init)
    assert step0["loss"] == pytest.approx(ref.loss, abs=1e-5)
    assert step0["token_accuracy"] == pytest.approx(ref.token_accuracy)
    assert step0["n_tokens"] == ref.n_tokens


def test_scratch_starts_at_the_base_loss(make_config, base_dir, eval_file, tokenizer, tmp_path):
    result = finetune(make_config(tmp_path / "scratch", init="none", steps=1))
    assert result.evals()[0]["loss"] == pytest.approx(hf_score(base_dir, tokenizer, eval_file).loss, abs=1e-5)
    assert json.loads((result.adapter / "adapter_config.json").read_text())["r"] == 8


def test_training_lowers_the_loss_and_logs_every_step(merged_run, tmp_path):
    train = [r for r in merged_run.log if r["event"] == "train"]
    evals = merged_run.evals()
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05
    assert all(r["seconds"] >= 0 for r in merged_run.log)
    assert train[0]["lr"] == 0.0 and train[1]["lr"] == pytest.approx(2e-2)  # one warm-up step, then cosine
    frame = merged_run.frame()
    import pandas as pd

    on_disk = pd.read_parquet(merged_run.adapter.parent / "log.parquet")
    assert len(on_disk) == len(frame) == 9


def test_checkpoints_reload_and_reproduce_the_logged_eval(merged_run, base_dir, tokenizer, eval_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.evaluate import evaluate

    assert [p.name for p in merged_run.checkpoints] == ["step-000003", "step-000006"]
    logged = {r["step"]: r["loss"] for r in merged_run.evals()}
    for path, step in ((merged_run.checkpoints[0], 3), (merged_run.adapter, 6)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(path))
        assert evaluate(model, tokenizer, load_jsonl(eval_file)).loss == pytest.approx(logged[step], abs=1e-5)
        assert json.loads((path / "finetune_info.json").read_text())["step"] == step
    leftovers = [p.name for p in merged_run.adapter.parent.rglob(".*")]
    assert leftovers == []


def test_grad_accumulation_does_not_change_the_objective(make_config, merged_init, tmp_path):
    """The loss is token-weighted over the whole step's batch, so splitting it into micro-batches changes nothing."""
    runs = [
        finetune(make_config(tmp_path / f"ga{ga}", init=str(merged_init), eval=None, steps=3, grad_accum=ga,
                             save_every=0))
        for ga in (1, 2)
    ]
    assert runs[0].train_losses() == pytest.approx(runs[1].train_losses(), abs=1e-6)
